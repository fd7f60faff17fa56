"""LM-head heads beside the cross-entropy: log-probabilities, greedy tokens.

Each head is per-tile math run over the token chunks of ``_linear``'s loop
(``_over_chunks`` over ``chunk_size`` tokens, a ragged last chunk its own
tile, each tile's logits formed by ``_tile_logits`` with float32
accumulation); the ``(N, V)`` logits never exist. Differentiable heads plug
into ``linear_cross_entropy``'s machinery itself (``_Static.head``): its
custom_jvp rules push the tangents of ``x``, ``w``, ``bias`` and the scalar
options through each recomputed chunk, so forward and reverse mode and
higher orders work as for the cross-entropy.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jxent import _linear as linear_module
from jxent._kernels import (
    _partitioned_by_xla,
    capped_logits,
    compute_dtype,
    invalid_soft_cap,
    on_cpu,
)
from jxent._linear import (
    _block_sizes,
    _class_block,
    _class_mask_for_tokens,
    _Data,
    _default_chunk_size,
    _default_vocab_chunk_size,
    _dw_passes,
    _over_chunks,
    _Params,
    _per_token_loss,
    _positive_int_or_none,
    _row_chunk,
    _Static,
    _summed_loss,
    _tile_logits,
    _unsaved_tile_logits,
    check_lm_head,
    explicit_lm_head_layout,
    num_tokens_of,
    run_explicit_lm_head,
)
from jxent._reduction import reduce_loss
from jxent._rl import (
    check_same_logits_shapes,
    check_temperature,
    distillation_terms,
    divergence_mode,
    safe_beta,
    safe_temperature,
    token_log_probs,
)
from jxent._safe_math import poison
from jxent._sharding import (
    UNSHARDED,
    ClassShards,
    as_axis_names,
    batch_sum,
    check_split_like_the_classes,
    refuse_untyped_derivatives,
)
from jxent._types import Reduction
from jxent._validation import (
    as_float_array,
    as_int_target,
    check_bool,
    check_concrete_target_range,
    check_ignore_index,
    check_reduction,
    check_soft_cap,
    check_unit_interval,
    promoted_dtype,
)


class _HeadStatic(NamedTuple):
    """Options that change the program (static under jit)."""

    chunk_size: int
    vocab_chunk_size: int
    row_mask: bool  # `where` varies per token (else one (1, V) class mask)
    shards: ClassShards = UNSHARDED
    strided: bool = False  # tokens split by XLA's partitioner (_over_chunks)
    # Off the CPU (0: the same): linear_cross_entropy's class-block tiles.
    # At (8192, 4096, 131072) bfloat16 the H100 program's roofline time was
    # 27 ms with the CPU's 1024 tokens x 1024 classes (each chunk's x read
    # again for every block) and 16 ms with 2048 x 4096 (80 MiB of
    # temporaries); a v5e's 55 and 50 ms.
    chip_chunk_size: int = 0
    chip_vocab_chunk_size: int = 0


def _chip_row_chunk(x, vocab: int, chunk_size, row_chunk: int) -> int:
    """The per-token heads' whole rows off the CPU.

    The user's chunk (as clamped in ``row_chunk``), else the chips' default.
    """
    if chunk_size is not None:
        return row_chunk
    return _row_chunk(max(1, num_tokens_of(x)), vocab)


def _explicit_layout(x, w, class_axis_name, batch_axis_name):
    """The Explicit-sharding layout to run a head in (None: run as is)."""
    if class_axis_name is not None or batch_axis_name is not None:
        return None
    return explicit_lm_head_layout(x, w)


def head_chunks(x, vocab, chunk_size, vocab_chunk_size, *, where: bool):
    """``(chunk, vocab_chunk)``: the token chunk and the vocabulary block.

    Both default to ``linear_cross_entropy``'s: the block of the ``dw``
    update is a float32 ``(D, block)`` product of at most 16 MiB (a whole
    vocabulary row would form a ``(D, V)`` temporary per chunk).
    """
    num_tokens = max(1, num_tokens_of(x))
    chunk = _positive_int_or_none(chunk_size, "chunk_size", "tokens per chunk")
    if chunk is None:
        chunk = _default_chunk_size(num_tokens, x.shape[-1], vocab, where=where)
    block = _positive_int_or_none(
        vocab_chunk_size, "vocab_chunk_size", "classes per block"
    )
    if block is None:
        block = _default_vocab_chunk_size(x.shape[-1], vocab)
    return min(chunk, num_tokens), min(block, vocab)


# --- argmax ---------------------------------------------------------------------


def _first_max(logits: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
    """Per row: the largest value and its first index (+ offset), NaN largest."""
    # int32 indices also under jax_enable_x64 (jnp.argmax's would be int64).
    index = lax.argmax(logits, 1, jnp.int32)
    value = jnp.take_along_axis(logits, index[:, None], axis=1)[:, 0]
    return value, index + offset


def _beats(new: jax.Array, old: jax.Array) -> jax.Array:
    """Whether ``new`` is strictly larger than ``old`` (NaN above everything)."""
    new_nan, old_nan = jnp.isnan(new), jnp.isnan(old)
    return (new_nan & ~old_nan) | (~new_nan & ~old_nan & (new > old))


def _tile_argmax(x_c, w, bias, mask_c, soft_cap, block: int):
    """``(max, first argmax)`` of one token chunk's logits.

    ``block`` classes at a time; the last block is shifted left to stay in
    bounds (the columns it repeats keep their indices, so ties still go to the
    first).
    """
    vocab = w.shape[1]

    def block_max(start):
        w_b = _class_block(w, start, block)
        b_b = None if bias is None else _class_block(bias, start, block)
        logits = capped_logits(_tile_logits(x_c, w_b, b_b), soft_cap)
        if mask_c is not None:
            logits = jnp.where(_class_block(mask_c, start, block), logits, -jnp.inf)
        return _first_max(logits, start)

    best = block_max(0)
    num_blocks = -(-vocab // block)
    if num_blocks == 1:
        return best

    def body(i, best):
        value, index = block_max(jnp.minimum(i * block, vocab - block))
        better = _beats(value, best[0])
        return jnp.where(better, value, best[0]), jnp.where(better, index, best[1])

    return lax.fori_loop(1, num_blocks, body, best)


def _across_shards(value, index, shards: ClassShards):
    """The global first argmax from each class shard's ``(max, index)``."""
    if not shards.sharded:
        return index
    nan = jnp.isnan(value)
    # NaN beats everything; among equal maxima the lowest global index wins.
    top_nan = shards.max(nan.astype(jnp.int32)) > 0
    candidate = nan == top_nan
    key = jnp.where(nan, 0.0, value)
    top = shards.max(jnp.where(candidate, key, -jnp.inf))
    candidate = candidate & (key == top)
    big = jnp.iinfo(jnp.int32).max
    return lax.pmin(jnp.where(candidate, index, big), shards.axis_names)


@functools.partial(jax.jit, static_argnames=("static",))
def _linear_argmax(x, w, bias, soft_cap, mask, *, static: _HeadStatic):
    batch_shape = x.shape[:-1]
    num_tokens = num_tokens_of(x)
    tokens_x = x.reshape(num_tokens, x.shape[-1])
    row_mask = mask.reshape(num_tokens, w.shape[1]) if static.row_mask else None
    offset = static.shards.index() * w.shape[1] if static.shards.sharded else 0

    def over_chunks(chunk: int, block: int):
        def body(carry, tokens):
            x_c, mask_c = tokens
            mask_c = mask if mask_c is None else mask_c
            value, index = _tile_argmax(x_c, w, bias, mask_c, soft_cap, block)
            return carry, (value, index + offset)

        return lambda: _over_chunks(
            body, None, (tokens_x, row_mask), chunk, static.strided
        )[1]

    cpu = (static.chunk_size, static.vocab_chunk_size)
    chip = (
        static.chip_chunk_size or cpu[0],
        static.chip_vocab_chunk_size or cpu[1],
    )
    if chip == cpu:
        value, index = over_chunks(*cpu)()
    else:
        value, index = on_cpu(over_chunks(*cpu), over_chunks(*chip))
    return _across_shards(value, index, static.shards).reshape(batch_shape)


def linear_argmax(
    x: ArrayLike,
    w: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""The index of the largest logit per position, without the logits.

    ``jnp.argmax(z, axis=-1)`` for ``z = x @ w + bias`` computed with float32
    accumulation (float64 for float64 inputs), soft-capped to
    ``soft_cap · tanh(z / soft_cap)`` when ``soft_cap`` is given and with the
    classes that ``where`` excludes left out: for accuracy and greedy decoding
    from hidden states. As ``jnp.argmax``, ties go to the first (lowest)
    index, a NaN logit counts as the largest, and a position with every class
    excluded gives 0.

    The ``(N, V)`` logits never exist: tokens are processed ``chunk_size`` at
    a time and each chunk's logits ``vocab_chunk_size`` classes at a time,
    each block reduced to a per-token maximum and its index. Not
    differentiable (the result is an integer). Each block is its own matmul,
    whose sums (and soft cap) XLA may round differently from one matmul of
    the whole ``x @ w``: logits within a few float32 ulps of each other
    (columns of ``w`` equal to ~1e-7) may then be ordered differently; exact
    ties, as from equal columns, go to the first index.

    Args:
      x: floating array ``(..., D)`` of hidden states.
      w: floating array ``(D, V)``.
      bias: optional length-V bias.
      soft_cap: ``None`` or a finite cap ``> 0`` (a traced cap that is not makes every
        logit NaN: the result is then 0, as ``jnp.argmax`` of NaN logits).
        ``tanh`` saturates, so capped logits can tie where the raw ones do
        not: the result is the argmax of the capped logits, as used.
      where: optional boolean mask broadcastable to ``(..., V)``: False
        excludes a class.
      chunk_size: tokens per chunk; default (None) that of
        [`jxent.linear_cross_entropy`][].
      vocab_chunk_size: classes per block of a chunk's logits; default (None)
        the whole (local) vocabulary.
      class_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the vocabulary is split (``w``, ``bias`` and ``where`` are this
        device's contiguous slice): the result is the global index, ties
        going to the lowest global index. Only O(N) values are all-reduced.
      batch_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the tokens are split (accepted for symmetry with the losses:
        each position's result is local).

    Returns:
      int32 array of shape ``x.shape[:-1]``.

    Raises:
      TypeError: non-floating ``x``, ``w`` or ``bias``; a non-boolean
        ``where``.
      ValueError: mismatched shapes of ``x``, ``w``, ``bias`` or ``where``, a
        ``chunk_size`` or ``vocab_chunk_size`` that is not a positive int, a
        concrete ``soft_cap <= 0``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> x = jax.random.normal(jax.random.key(0), (8, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 100))
      >>> greedy = jxent.linear_argmax(x, w, chunk_size=3, vocab_chunk_size=32)
      >>> bool(jnp.all(greedy == jnp.argmax(x @ w, axis=-1)))
      True
    """
    x, w, bias = check_lm_head(x, w, bias)
    soft_cap = check_soft_cap(soft_cap)
    layout = _explicit_layout(x, w, class_axis_name, batch_axis_name)
    if layout is not None:
        return run_explicit_lm_head(
            linear_argmax, layout, x, w, {}, {"bias": bias},
            {"soft_cap": soft_cap}, where,
            {"chunk_size": chunk_size, "vocab_chunk_size": vocab_chunk_size},
            ("tokens",),
        )  # fmt: skip
    vocab = w.shape[1]
    mask, row_mask = _class_mask_for_tokens(where, x.shape[:-1], vocab)
    chunk, block = head_chunks(
        x, vocab, chunk_size, vocab_chunk_size, where=mask is not None
    )
    shards = ClassShards(as_axis_names(class_axis_name, "class_axis_name"))
    as_axis_names(batch_axis_name, "batch_axis_name")
    check_split_like_the_classes(shards, w=w, bias=bias)
    _, chip_chunk, chip_block = _block_sizes(
        max(1, num_tokens_of(x)), x.shape[-1], vocab, chunk_size, vocab_chunk_size
    )
    static = _HeadStatic(
        chunk, block, row_mask, shards, _partitioned_by_xla(x), chip_chunk, chip_block
    )
    return _linear_argmax(x, w, bias, soft_cap, mask, static=static)


def _flags(p: _Params, flag_of) -> _Params:
    """Per given input, ``flag_of(name)``: set, its derivatives are NaN."""
    return _Params(*(
        None if v is None else flag_of(name)
        for name, v in zip(_Params._fields, p, strict=True)
    ))  # fmt: skip


# --- log-probabilities and entropy -----------------------------------------------


class _LogProbsHead(NamedTuple):
    """Per-tile ``(log p[target], entropy)`` (hashable: a static option)."""

    with_entropy: bool
    class_sliced: tuple[str, ...] = ("w", "bias")

    def __call__(self, logits, probs_c, target_c, mask_c, small, static: _Static):
        del probs_c
        soft_cap, temperature = small[3:5]
        mask = None if mask_c is None else jnp.broadcast_to(mask_c, logits.shape)
        if soft_cap is not None:
            # An ignored position's logits (padding: NaN or inf hidden states
            # too) are replaced before capping, whose slope there would be NaN
            # (its zero cotangent times NaN).
            valid = (target_c != static.ignore_index)[:, None]
            logits = jnp.where(valid, logits, jnp.zeros((), logits.dtype))
        lp, ent = token_log_probs(
            capped_logits(logits, soft_cap), target_c, temperature, mask, axis=1,
            ignore_index=static.ignore_index, with_entropy=self.with_entropy,
            shards=static.shards,
        )  # fmt: skip
        ent = jnp.zeros_like(lp) if ent is None else ent
        # A bad cap: NaN at the ignored positions too, as a bad temperature.
        bad_cap = invalid_soft_cap(soft_cap)
        return poison(lp, bad_cap), poison(ent, bad_cap)


@functools.partial(jax.jit, static_argnames=("static", "return_entropy"))
def _linear_log_probs(p: _Params, data: _Data, *, static, return_entropy):
    batch_shape = p.x.shape[:-1]
    num_tokens = num_tokens_of(p.x)
    p = p._replace(x=p.x.reshape(num_tokens, p.x.shape[-1]))
    mask = data.mask
    if static.row_mask:
        mask = mask.reshape(num_tokens, p.w.shape[1])
    # A bad temperature: NaN values and NaN derivatives (the ignored
    # positions' too).
    bad = safe_temperature(p.temperature, p.temperature.dtype)[1]
    bad = bad | invalid_soft_cap(p.soft_cap)
    data = _Data(data.target.reshape(num_tokens), mask, _flags(p, lambda _: bad))
    lp, ent = _per_token_loss(static, p, data)
    lp = lp.reshape(batch_shape)
    return (lp, ent.reshape(batch_shape)) if return_entropy else lp


@overload
def linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: Literal[False] = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array: ...


@overload
def linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: Literal[True],
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]: ...


@overload
def linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def linear_log_probs(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    *,
    bias: ArrayLike | None = None,
    temperature: ArrayLike = 1.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Token log-probabilities (and entropy) from hidden states, for RL.

    [`jxent.log_probs`][] of the logits ``z = soft_cap(x @ w + bias) / T``
    without ever holding them: with ``z`` formed with float32 accumulation,
    soft-capped as in [`jxent.linear_cross_entropy`][] (``cap · tanh(z /
    cap)``) and then divided by the temperature ``T``, and the classes that
    ``where`` excludes left out, per position ``n``:

    ``log_probs_n = z[n, y_n] - log Σ_c exp(z[n, c])``, and with
    ``return_entropy=True`` also
    ``entropy_n = -Σ_c p_c log p_c`` of the same ``p = softmax(z)``.

    Positions whose target is ``ignore_index`` give 0 for both, with zero
    gradients. Tokens are processed ``chunk_size`` at a time with
    ``linear_cross_entropy``'s machinery: each chunk's float32 logits are
    reduced to the two per-token values and dropped. Derivatives w.r.t.
    ``x``, ``w`` and ``bias`` go class block by class block: reverse mode
    recomputes each block's logits chunk by chunk and accumulates that block
    of ``dw`` over all tokens in float32 (no float32 array of ``w``'s size);
    with derivatives w.r.t. ``temperature`` or ``soft_cap``, or classes
    split over a mesh axis, each chunk of whole rows is recomputed instead.
    Differentiable w.r.t. ``x``, ``w``, ``bias``, ``temperature`` and
    ``soft_cap``, in reverse and forward mode, to any order.

    Args:
      x: floating array ``(..., D)`` of hidden states.
      w: floating array ``(D, V)``.
      target: integer class indices (the sampled tokens) of shape
        ``x.shape[:-1]``.
      bias: optional length-V bias.
      temperature: ``T > 0`` (traced: changing it does not recompile).
      soft_cap: ``None`` or a finite cap ``> 0``, applied before the temperature (a
        traced cap that is not finite and > 0 makes the results and gradients NaN).
      where: optional boolean mask broadcastable to ``(..., V)``: False
        excludes a class. A target on an excluded class gives NaN.
      ignore_index: target value whose positions give 0.
      return_entropy: also return the entropy.
      chunk_size: tokens per chunk of whole rows; given, also the tokens
        per tile of the derivatives' class blocks. Default (None): that of
        [`jxent.linear_cross_entropy`][], and tiles of 32 MiB in float32
        (1024 tokens of an 8192-class block).
      vocab_chunk_size: classes per block of the derivatives; default
        (None) 8192 (at most V), or a multiple of 128 between 4096 and 8192
        that divides V (else the last block is shifted).
      class_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the vocabulary is split (``w``, ``bias`` and ``where`` are this
        device's contiguous slice, targets are global indices). Only O(N)
        values are all-reduced.
      batch_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the tokens are split (accepted: each token's values are local).

    Returns:
      ``log_probs`` of shape ``x.shape[:-1]`` in the accumulation dtype
      (float32, float64 for float64 inputs); with ``return_entropy``,
      ``(log_probs, entropy)``. Under ``jit`` a target outside ``[0, V)``
      (not ``ignore_index``) gives NaN at its position and ``temperature <=
      0`` NaN everywhere, values and gradients.

    Raises:
      TypeError: non-floating ``x``/``w``/``bias``, a non-integer target, a
        non-boolean ``where``.
      ValueError: mismatched shapes of ``x``, ``w``, ``bias``, ``target`` or
        ``where``, a concrete target out of range, a concrete ``temperature
        <= 0`` or ``soft_cap <= 0``, a ``chunk_size`` that is not a positive
        int.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> x = jax.random.normal(jax.random.key(0), (8, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 100))
      >>> t = jnp.arange(8)
      >>> lp, ent = jxent.linear_log_probs(x, w, t, temperature=0.7,
      ...                                  return_entropy=True, chunk_size=3)
      >>> ref_lp, ref_ent = jxent.log_probs(x @ w, t, temperature=0.7,
      ...                                   return_entropy=True)
      >>> bool(jnp.allclose(lp, ref_lp, rtol=1e-5))
      True
      >>> bool(jnp.allclose(ent, ref_ent, rtol=1e-5))
      True
    """
    ignore_index = check_ignore_index(ignore_index)
    return_entropy = check_bool(return_entropy, "return_entropy")
    x, w, bias = check_lm_head(x, w, bias)
    vocab = w.shape[1]
    target = as_int_target(target)
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"`target` must have shape x.shape[:-1] = {x.shape[:-1]} (class "
            f"indices), got {target.shape} (x.shape={x.shape})."
        )
    temperature = check_temperature(temperature)
    soft_cap = check_soft_cap(soft_cap)
    layout = _explicit_layout(x, w, class_axis_name, batch_axis_name)
    if layout is not None:
        options = dict(
            ignore_index=ignore_index, return_entropy=return_entropy,
            chunk_size=chunk_size, vocab_chunk_size=vocab_chunk_size,
        )  # fmt: skip
        scalars = {"temperature": temperature, "soft_cap": soft_cap}
        outs = ("tokens", "tokens") if return_entropy else ("tokens",)
        return run_explicit_lm_head(
            linear_log_probs, layout, x, w, {"target": target}, {"bias": bias},
            scalars, where, options, outs,
        )  # fmt: skip
    mask, row_mask = _class_mask_for_tokens(where, x.shape[:-1], vocab)
    # The log-probabilities' tile math keeps about three float32 tiles alive
    # (XLA's temporaries on the CPU), as `where` does for the cross-entropy.
    chunk, block = head_chunks(x, vocab, chunk_size, vocab_chunk_size, where=True)
    shards = ClassShards(as_axis_names(class_axis_name, "class_axis_name"))
    batch_axes = as_axis_names(batch_axis_name, "batch_axis_name")
    check_split_like_the_classes(shards, w=w, bias=bias)
    x, w, bias = refuse_untyped_derivatives(
        "linear_log_probs", shards, batch_axes, x, w, bias
    )
    check_concrete_target_range(target, shards.num_classes(vocab), ignore_index)
    row_chunk, block_tokens, block_classes = _block_sizes(
        max(1, num_tokens_of(x)), x.shape[-1], vocab, chunk_size, vocab_chunk_size,
        per_token=True,
    )  # fmt: skip
    static = _Static(
        ignore_index=ignore_index, smoothing=False, with_z_loss=False,
        chunk_size=chunk, vocab_chunk_size=block, soft=False, row_mask=row_mask,
        shards=shards, batch_axes=batch_axes, head=_LogProbsHead(return_entropy),
        strided=_partitioned_by_xla(x), row_chunk=row_chunk,
        chip_row_chunk=_chip_row_chunk(x, vocab, chunk_size, row_chunk),
        block_tokens=block_tokens, block_classes=block_classes,
        vocab_outer=linear_module._VOCAB_OUTER,
    )  # fmt: skip
    acc = compute_dtype(x.dtype)
    params = _Params(
        x=x, w=w, bias=bias, probs=None, weight=None, label_smoothing=None,
        z_loss=None, soft_cap=None if soft_cap is None else jnp.asarray(soft_cap, acc),
        temperature=jnp.asarray(temperature, acc),
    )  # fmt: skip
    return _linear_log_probs(
        params, _Data(target, mask), static=static, return_entropy=return_entropy
    )


# --- distillation -------------------------------------------------------------------


class _DistillationHead(NamedTuple):
    """Per-tile divergence of the student's tile from the teacher's.

    The teacher's hidden states arrive in the token-input slot (``probs_c``),
    its ``w`` and ``bias`` with the scalar options (``small``): the teacher's
    tile of logits is formed here, so that the loop's derivative rules
    differentiate through it like through the student's.
    """

    mode: str
    # The teacher's hidden states are replicated over class shards: the
    # gradient of the tile w.r.t. them is already summed over the shards.
    class_sliced: tuple[str, ...] = ("w", "bias", "teacher_w", "teacher_bias")

    def __call__(self, logits, teacher_x_c, target_c, mask_c, small, static):
        del mask_c
        temperature, beta, teacher_w, teacher_bias = small[4:8]
        teacher = _unsaved_tile_logits(teacher_x_c, teacher_w, teacher_bias)
        dtype = logits.dtype
        temperature, bad_t = safe_temperature(temperature, dtype)
        beta, bad_beta = safe_beta(beta, dtype)
        num_classes = static.shards.num_classes(logits.shape[1])
        valid = target_c != static.ignore_index
        bad = valid & ~((target_c >= 0) & (target_c < num_classes))
        loss = distillation_terms(
            logits, teacher.astype(dtype), valid, temperature, beta,
            mode=self.mode, axis=1, shards=static.shards,
        )  # fmt: skip
        loss = poison(loss, bad | bad_t | bad_beta)
        return loss, jnp.zeros_like(loss)


@functools.partial(jax.jit, static_argnames=("static", "reduction"))
def _linear_distillation_loss(p: _Params, data: _Data, *, static, reduction):
    batch_shape = p.x.shape[:-1]
    num_tokens = num_tokens_of(p.x)
    p = p._replace(
        x=p.x.reshape(num_tokens, p.x.shape[-1]),
        probs=p.probs.reshape(num_tokens, p.probs.shape[-1]),
    )
    target = data.target.reshape(num_tokens)
    acc = compute_dtype(p.x.dtype)
    valid = target != static.ignore_index
    num_classes = static.shards.num_classes(p.w.shape[1])
    bad_target = jnp.any(valid & ~((target >= 0) & (target < num_classes)))
    bad = safe_temperature(p.temperature, acc)[1] | safe_beta(p.beta, acc)[1]
    if reduction == "none":
        # A bad temperature or beta: NaN values and NaN derivatives (the
        # ignored positions' too); a bad target: NaN derivatives of the
        # shared scalars too (beta's at 0 or 1 had no path to it).
        flags = dict.fromkeys(("temperature", "beta"), bad | bad_target)
        data = _Data(target, None, _flags(p, lambda name: flags.get(name, bad)))
        loss, _ = _per_token_loss(static, p, data)
        return loss.reshape(batch_shape)
    # A NaN sum or mean has NaN derivatives w.r.t. every input.
    bad = bad | bad_target
    bad = batch_sum(bad.astype(jnp.int32), static.batch_axes) > 0  # one flag
    data = _Data(target, None, _flags(p, lambda _: bad))
    total = _summed_loss(static, p, data)
    denominator = jnp.sum(valid.astype(acc))
    return reduce_loss(total, reduction, denominator, acc, batch_axes=static.batch_axes)


def linear_distillation_loss(
    x: ArrayLike,
    w: ArrayLike,
    teacher_x: ArrayLike,
    teacher_w: ArrayLike,
    target: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    teacher_bias: ArrayLike | None = None,
    beta: ArrayLike = 0.0,
    temperature: ArrayLike = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    chunk_size: int | None = None,
    vocab_chunk_size: int | None = None,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array:
    r"""Distillation from a teacher's hidden states, without either's logits.

    [`jxent.distillation_loss`][] of the student's logits ``x @ w + bias``
    and the teacher's ``teacher_x @ teacher_w + teacher_bias`` (both formed
    with float32 accumulation), without holding either ``(N, V)`` array: per
    position, with ``p = softmax(student / T)`` and ``q = softmax(teacher /
    T)``, ``beta = 0`` gives the forward KL ``KL(q ‖ p)``, ``beta = 1`` the
    reverse KL ``KL(p ‖ q)`` and ``0 < beta < 1`` the generalised
    Jensen-Shannon divergence ``beta · KL(q ‖ m) + (1 - beta) · KL(p ‖ m)``,
    ``m = beta · q + (1 - beta) · p``. There is no ``T²`` factor: multiply
    by ``temperature**2`` for Hinton et al.'s scaling.

    Positions whose ``target`` is ``ignore_index`` are excluded (0, zero
    gradients); ``"mean"`` divides by the number of included positions (0
    when there are none). The teacher may have its own hidden size. Tokens
    are processed ``chunk_size`` at a time with ``linear_cross_entropy``'s
    machinery: for ``"mean"``/``"sum"`` the gradients are computed with the
    loss in one pass over the chunks (off the CPU in class blocks), for
    ``"none"`` each block of classes is recomputed chunk by chunk in the
    backward pass (as for [`jxent.linear_log_probs`][]). Gradients w.r.t.
    every floating input (``x``, ``w``, ``bias``, ``teacher_x``,
    ``teacher_w``, ``teacher_bias``,
    ``temperature`` and ``beta``), in reverse and forward mode; wrap the
    teacher's inputs in ``jax.lax.stop_gradient`` (or do not differentiate
    w.r.t. them) to keep it fixed. The teacher's head stays in its dtype
    (its tiles accumulate in float32); for 16-bit inputs whose float32 ``dw``
    takes 512 MiB or more, ``dw`` is accumulated in two column halves, as by
    [`jxent.linear_cross_entropy`][].

    Args:
      x: the student's floating hidden states ``(..., D)``.
      w: the student's ``(D, V)`` LM-head weight.
      teacher_x: the teacher's hidden states ``(..., D')``, the positions of
        ``x``.
      teacher_w: the teacher's ``(D', V)`` weight, the same vocabulary.
      target: optional integer class indices of shape ``x.shape[:-1]``:
        positions equal to ``ignore_index`` are excluded.
      bias: optional length-V bias of the student.
      teacher_bias: optional length-V bias of the teacher.
      beta: in ``[0, 1]`` (traced; a concrete value selects the formula).
      temperature: ``T > 0`` (traced).
      ignore_index: the target value of excluded positions.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      chunk_size: tokens per chunk; default (None) that of
        [`jxent.linear_cross_entropy`][] with room for two logits tiles.
      vocab_chunk_size: classes per block of the student's ``dw`` update (as
        in [`jxent.linear_cross_entropy`][]); with ``reduction="none"``, of
        the derivatives' class blocks (default 8192, as in
        [`jxent.linear_log_probs`][]).
      class_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the vocabulary is split: ``w``, ``bias``, ``teacher_w`` and
        ``teacher_bias`` are this device's slice. Only O(N) values (and the
        O(N·D) hidden-state gradients) are all-reduced.
      batch_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the tokens are split: ``"mean"``/``"sum"`` are global.

    Returns:
      The loss in the accumulation dtype (float32, float64 for float64
      inputs): a scalar, or ``x.shape[:-1]`` for ``"none"``. Under ``jit`` a
      target outside ``[0, V)`` (not ``ignore_index``), ``temperature <= 0``
      or ``beta`` outside ``[0, 1]`` give NaN, values and gradients.

    Raises:
      TypeError: non-floating inputs, a non-integer target.
      ValueError: student and teacher with different positions or
        vocabularies (naming both shapes), mismatched ``w``/``bias`` shapes, a
        concrete target out of range, a concrete ``temperature <= 0`` or
        ``beta`` outside ``[0, 1]``, a bad ``reduction`` or ``chunk_size``.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> k = jax.random.split(jax.random.key(0), 4)
      >>> x, tx = jax.random.normal(k[0], (8, 16)), jax.random.normal(k[1], (8, 24))
      >>> w, tw = jax.random.normal(k[2], (16, 50)), jax.random.normal(k[3], (24, 50))
      >>> fused = jxent.linear_distillation_loss(x, w, tx, tw, beta=0.5,
      ...                                        temperature=2.0, chunk_size=3)
      >>> ref = jxent.distillation_loss(x @ w, tx @ tw, beta=0.5, temperature=2.0)
      >>> bool(jnp.allclose(fused, ref, rtol=1e-5))
      True
    """
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    x, w, bias = check_lm_head(x, w, bias)
    teacher_x = as_float_array(teacher_x, "teacher_x")
    teacher_w = as_float_array(teacher_w, "teacher_w")
    if teacher_w.ndim != 2 or teacher_w.shape[0] != teacher_x.shape[-1]:
        raise ValueError(
            "`teacher_w` must have shape (D', V) with D' = teacher_x.shape[-1] = "
            f"{teacher_x.shape[-1]}, got teacher_w.shape={teacher_w.shape} "
            f"(teacher_x.shape={teacher_x.shape})."
        )
    check_same_logits_shapes(
        (*x.shape[:-1], w.shape[1]), (*teacher_x.shape[:-1], teacher_w.shape[1]),
        "x @ w", "teacher_x @ teacher_w",
        f" (x.shape={x.shape}, w.shape={w.shape}, teacher_x.shape="
        f"{teacher_x.shape}, teacher_w.shape={teacher_w.shape})",
    )  # fmt: skip
    vocab = w.shape[1]
    if teacher_bias is not None:
        teacher_bias = as_float_array(teacher_bias, "teacher_bias")
        if teacher_bias.shape != (vocab,):
            raise ValueError(
                f"`teacher_bias` must have shape (V,) = ({vocab},), got "
                f"{teacher_bias.shape}."
            )
    shards = ClassShards(as_axis_names(class_axis_name, "class_axis_name"))
    batch_axes = as_axis_names(batch_axis_name, "batch_axis_name")
    check_split_like_the_classes(
        shards, w=w, bias=bias, teacher_w=teacher_w, teacher_bias=teacher_bias
    )
    x, w, bias, teacher_x, teacher_w, teacher_bias = refuse_untyped_derivatives(
        "linear_distillation_loss", shards, batch_axes,
        x, w, bias, teacher_x, teacher_w, teacher_bias,
    )  # fmt: skip
    if target is None:
        # Every position counts: a class index that is never `ignore_index`.
        target = jnp.zeros(x.shape[:-1], jnp.int32)
        ignore_index = -1
    else:
        target = as_int_target(target)
        if target.shape != x.shape[:-1]:
            raise ValueError(
                f"`target` must have shape x.shape[:-1] = {x.shape[:-1]} (class "
                f"indices), got {target.shape} (x.shape={x.shape})."
            )
        check_concrete_target_range(target, shards.num_classes(vocab), ignore_index)
    temperature = check_temperature(temperature)
    beta = check_unit_interval(beta, "beta")
    layout = _explicit_layout(x, w, class_axis_name, batch_axis_name)
    if layout is not None:
        options = dict(
            ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size,
        )  # fmt: skip
        return run_explicit_lm_head(
            linear_distillation_loss, layout, x, w,
            {"teacher_x": teacher_x, "target": target},
            {"teacher_w": teacher_w, "bias": bias, "teacher_bias": teacher_bias},
            {"beta": beta, "temperature": temperature}, None, options,
            ("tokens" if reduction == "none" else "scalar",),
        )  # fmt: skip
    chunk, block = head_chunks(x, vocab, chunk_size, vocab_chunk_size, where=True)
    row_chunk, block_tokens, block_classes = _block_sizes(
        max(1, num_tokens_of(x)), x.shape[-1], vocab, chunk_size, vocab_chunk_size,
        per_token=reduction == "none",
    )  # fmt: skip
    dw_passes = _dw_passes(x.shape[-1], vocab, x.dtype)
    if dw_passes > 1 and chunk_size is None and reduction != "none":
        # The first pass over the chunks also keeps the tile math's reductions
        # and their cotangents: half the tokens per chunk keep the
        # divergence's temporaries within the budget (at (2048, 1024, 131072)
        # bfloat16, 0.52 and 0.62 of it for the KL and the JSD, against 0.73
        # and 1.03 with whole chunks).
        chunk = max(1, chunk // 2)
    static = _Static(
        ignore_index=ignore_index, smoothing=False, with_z_loss=False,
        chunk_size=chunk, vocab_chunk_size=block, soft=False, row_mask=False,
        shards=shards, batch_axes=batch_axes,
        head=_DistillationHead(divergence_mode(beta)),
        strided=_partitioned_by_xla(x),
        dw_passes=dw_passes,
        row_chunk=row_chunk, block_tokens=block_tokens,
        chip_row_chunk=_chip_row_chunk(x, vocab, chunk_size, row_chunk),
        block_classes=block_classes, vocab_outer=linear_module._VOCAB_OUTER,
    )  # fmt: skip
    acc = compute_dtype(x.dtype, teacher_x.dtype)
    # The teacher's head in its own dtype (its tiles accumulate in float32): a
    # float32 copy of a 16-bit teacher_w would take twice its memory.
    teacher_dtype = promoted_dtype(teacher_x, "teacher_x", teacher_w, "teacher_w")
    params = _Params(
        x=x, w=w, bias=bias, probs=teacher_x.astype(teacher_dtype), weight=None,
        label_smoothing=None,
        z_loss=None, soft_cap=None, temperature=jnp.asarray(temperature, acc),
        beta=jnp.asarray(beta, acc), teacher_w=teacher_w.astype(teacher_dtype),
        teacher_bias=None if teacher_bias is None else teacher_bias.astype(acc),
    )  # fmt: skip
    return _linear_distillation_loss(
        params, _Data(target, None), static=static, reduction=reduction
    )
