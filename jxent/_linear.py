"""``linear_cross_entropy``: the LM-head matmul fused with cross-entropy.

The (N, V) logits never exist at once: tokens are processed in chunks inside a
``jax.custom_vjp``. For ``"mean"`` and ``"sum"`` the gradients are computed in
the same pass as the loss (the cotangent of a scalar loss only scales them),
so each chunk's logits are computed once: three matmuls in all, as for the
unfused version. For ``"none"`` and ``return_lse`` the forward pass keeps only
O(N) residuals and the backward pass recomputes each chunk's logits.
Accumulators (logsumexp, loss, dx, dw, dbias) are float32 whatever the input
dtype.
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jxent._classification import (
    _as_int_target,
    _is_static_zero,
    hard_target_loss,
    target_terms,
)
from jxent._kernels import compute_dtype
from jxent._reduction import reduce_loss
from jxent._sharding import UNSHARDED, ClassShards, as_axis_names, batch_sum
from jxent._types import Reduction
from jxent._validation import (
    as_float_array,
    check_bool,
    check_concrete_target_range,
    check_ignore_index,
    check_nonnegative,
    check_reduction,
    check_soft_cap,
    check_unit_interval,
    check_weight,
)

# Default chunk: about this many bytes of float32 logits per chunk.
_CHUNK_BYTES = 16 * 2**20


class _Static(NamedTuple):
    """Options that change the program (hashable, static under jit)."""

    ignore_index: int
    smoothing: bool
    with_z_loss: bool
    chunk_size: int
    row_mask: bool  # `where` varies per token (else one (1, V) class mask)
    shards: ClassShards = UNSHARDED  # vocabulary split over mesh axes
    batch_axes: tuple[str, ...] = ()  # tokens split over mesh axes


class _Consts(NamedTuple):
    """Traced values the loss depends on but is not differentiated against."""

    weight: jax.Array | None
    label_smoothing: jax.Array
    z_loss: jax.Array
    soft_cap: jax.Array | None


def _chunk_loss(logits, target, mask, consts: _Consts, static: _Static):
    """Per-token (loss, lse) of one chunk of logits (classes last)."""
    loss, lse, _ = hard_target_loss(
        logits,
        target,
        consts.weight,
        consts.label_smoothing,
        consts.z_loss,
        consts.soft_cap,
        None if mask is None else jnp.broadcast_to(mask, logits.shape),
        ignore_index=static.ignore_index,
        axis=1,
        smoothing=static.smoothing,
        with_z_loss=static.with_z_loss,
        shards=static.shards,
    )
    return loss, lse


def _accumulation_dtype(x, w):
    return compute_dtype(jnp.result_type(x.dtype, w.dtype))


def _chunk_logits(x, w, b):
    acc = _accumulation_dtype(x, w)
    logits = lax.dot_general(x, w, (((1,), (0,)), ((), ())), preferred_element_type=acc)
    return logits if b is None else logits + b.astype(acc)[None, :]


def _split(a, chunk):
    """(N, ...) -> (N / chunk, chunk, ...)."""
    return a.reshape((a.shape[0] // chunk, chunk, *a.shape[1:]))


def _mask_chunks(mask, static):
    return _split(mask, static.chunk_size) if static.row_mask else None


def _scan(x, w, b, target, mask, consts, static, cotangents):
    """Runs every chunk, accumulating gradients when ``cotangents`` are given.

    ``cotangents`` are per-token cotangents of (loss, lse). Returns
    ``(loss, lse, grads)`` with ``grads = (dx, dw, db)`` or ``None``.
    """
    chunk = static.chunk_size
    with_grads = cotangents is not None
    xs = (_split(x, chunk), _split(target, chunk), _mask_chunks(mask, static))
    if with_grads:
        xs = (*xs, _split(cotangents[0], chunk), _split(cotangents[1], chunk))
    class_mask = None if static.row_mask else mask
    acc = _accumulation_dtype(x, w)

    def body(carry, inputs):
        x_c, t_c, m_c = inputs[:3]
        m_c = class_mask if m_c is None else m_c
        logits = _chunk_logits(x_c, w, b)
        if not with_grads:
            loss, lse = _chunk_loss(logits, t_c, m_c, consts, static)
            return carry, (loss, lse)
        (loss, lse), vjp = jax.vjp(
            lambda z: _chunk_loss(z, t_c, m_c, consts, static), logits
        )
        (dz,) = vjp(_vary_like(tuple(inputs[3:]), loss))
        dz_in = dz.astype(x.dtype)
        # Each vocabulary shard contributes to every token's dx: O(N·D) psum.
        dx_c = static.shards.sum(
            lax.dot_general(
                dz_in, w, (((1,), (1,)), ((), ())), preferred_element_type=acc
            )
        )
        dw_acc, db_acc = carry
        dw_acc = _accumulate_outer(dw_acc, x_c, dz_in)
        if db_acc is not None:
            db_acc = db_acc + jnp.sum(dz, axis=0)
        return (dw_acc, db_acc), (loss, lse, dx_c)

    init = None
    if with_grads:
        # zeros_like keeps w's sharding type (varying over a vocabulary axis);
        # each token shard accumulates its own partial gradient.
        db0 = None if b is None else jnp.zeros_like(b, dtype=acc)
        init = (jnp.zeros_like(w, dtype=acc), db0)
        init = _vary_like(init, x)
    carry, out = lax.scan(body, init, xs)
    loss, lse = out[0].reshape(-1), out[1].reshape(-1)
    if not with_grads:
        return loss, lse, None
    # Inside shard_map, w and bias are shared by the token shards: their partial
    # gradients add up over the axes the tokens vary on and w does not.
    dw, db = jax.tree.map(_sum_over_extra_axes, carry, (w, b))
    dx = out[2].reshape(x.shape)
    grads = (
        dx.astype(x.dtype),
        dw.astype(w.dtype),
        None if b is None else db.astype(b.dtype),
    )
    return loss, lse, grads


# Largest float32 block of dw computed at once: accumulating x_c^T dz in one
# dot would first write a whole (D, V) temporary, as large as dw itself.
_DW_BLOCK_BYTES = 16 * 2**20


def _accumulate_outer(acc, x_c, dz):
    """``acc + x_c^T dz`` in place, over column blocks of the vocabulary."""
    depth, vocab = acc.shape
    block = max(1, min(vocab, _DW_BLOCK_BYTES // (acc.dtype.itemsize * depth)))
    num_blocks = -(-vocab // block)

    def contract(a, b):
        return lax.dot_general(
            a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc.dtype
        )

    if num_blocks == 1:
        return acc + contract(x_c, dz)

    def body(i, acc):
        # The last block is shifted left to stay in bounds; the columns it
        # shares with the previous block are zeroed so they count once.
        start = jnp.minimum(i * block, vocab - block)
        dz_block = lax.dynamic_slice_in_dim(dz, start, block, axis=1)
        column = start + lax.broadcasted_iota(jnp.int32, (1, block), 1)
        dz_block = jnp.where(column >= i * block, dz_block, 0)
        update = lax.dynamic_slice_in_dim(acc, start, block, axis=1)
        update = update + contract(x_c, dz_block)
        return lax.dynamic_update_slice_in_dim(acc, update, start, axis=1)

    return lax.fori_loop(0, num_blocks, body, acc)


def _terms(target, consts, w, static, dtype):
    """Target terms with the global vocabulary size."""
    num_classes = static.shards.num_classes(w.shape[1])
    return target_terms(
        target, consts.weight, num_classes, static.ignore_index, dtype, static.shards
    )


def _vary_like(tree, like):
    """Marks ``tree`` as varying over the shard_map axes that ``like`` varies on.

    (A scan carry must keep its type: the gradient accumulators vary over the
    token shards once the first chunk is added.)
    """
    axes = _varying(like)

    def cast(a):
        missing = tuple(sorted(axes - _varying(a)))
        return lax.pcast(a, missing, to="varying") if missing else a

    return jax.tree.map(cast, tree)


def _varying(a) -> frozenset:
    """The shard_map axes over which ``a`` varies (empty outside shard_map)."""
    kind = getattr(jax.typeof(a), "manual_axis_type", None)
    return frozenset(getattr(kind, "varying", frozenset()))


def _sum_over_extra_axes(grad, primal):
    """Sums ``grad`` over the axes it varies on and ``primal`` does not."""
    if grad is None:
        return None
    extra = tuple(sorted(_varying(grad) - _varying(primal)))
    return lax.psum(grad, extra) if extra else grad


def _zero_cotangents(tree):
    return jax.tree.map(jnp.zeros_like, tree)


# --- mean / sum: gradients computed in the forward pass ------------------------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6, 7))
def _reduced_loss(x, w, b, target, mask, consts, static, reduction):
    return _reduced_fwd(x, w, b, target, mask, consts, static, reduction)[0]


def _reduced_fwd(x, w, b, target, mask, consts, static, reduction):
    dtype = _accumulation_dtype(x, w)
    terms = _terms(target, consts, w, static, dtype)
    denominator = jnp.sum(terms.target_weight)
    if reduction == "mean":
        total = batch_sum(denominator, static.batch_axes)
        scale = jnp.where(total == 0, 0.0, 1.0 / jnp.where(total == 0, 1.0, total))
    else:
        scale = jnp.ones((), dtype)
    per_token = jnp.broadcast_to(scale, target.shape)
    loss, _, grads = _scan(
        x, w, b, target, mask, consts, static,
        (per_token, jnp.zeros(target.shape, dtype)),
    )  # fmt: skip
    value = reduce_loss(loss, reduction, denominator, batch_axes=static.batch_axes)
    residuals = (grads, consts)
    return value, residuals


def _reduced_bwd(static, reduction, residuals, g):
    (dx, dw, db), consts = residuals
    scale = lambda a: None if a is None else (g * a.astype(g.dtype)).astype(a.dtype)
    return (
        scale(dx),
        scale(dw),
        scale(db),
        None,
        None,
        _zero_cotangents(consts),
    )


_reduced_loss.defvjp(_reduced_fwd, _reduced_bwd)


# --- per token (reduction "none" or return_lse): recompute in the backward ------


@functools.partial(jax.custom_vjp, nondiff_argnums=(6,))
def _per_token_loss(x, w, b, target, mask, consts, static):
    loss, lse, _ = _scan(x, w, b, target, mask, consts, static, None)
    return loss, lse


def _per_token_fwd(x, w, b, target, mask, consts, static):
    out = _per_token_loss(x, w, b, target, mask, consts, static)
    return out, (x, w, b, target, mask, consts)


def _per_token_bwd(static, residuals, cotangents):
    x, w, b, target, mask, consts = residuals
    _, _, (dx, dw, db) = _scan(x, w, b, target, mask, consts, static, cotangents)
    return dx, dw, db, None, None, _zero_cotangents(consts)


_per_token_loss.defvjp(_per_token_fwd, _per_token_bwd)


@functools.partial(jax.jit, static_argnames=("static", "reduction", "return_lse"))
def _linear_cross_entropy(
    x, w, b, target, mask, consts, *, static, reduction, return_lse
):
    batch_shape = target.shape
    num_tokens = target.size
    x = x.reshape(num_tokens, x.shape[-1])
    target = target.reshape(num_tokens)
    if static.row_mask:
        mask = mask.reshape(num_tokens, mask.shape[-1])
    pad = -num_tokens % static.chunk_size
    if pad:
        x = jnp.pad(x, ((0, pad), (0, 0)))
        target = jnp.pad(target, (0, pad), constant_values=static.ignore_index)
        if static.row_mask:
            mask = jnp.pad(mask, ((0, pad), (0, 0)), constant_values=True)
    out_dtype = jnp.result_type(x.dtype, w.dtype)
    if not return_lse and reduction != "none":
        loss = _reduced_loss(x, w, b, target, mask, consts, static, reduction)
        return loss.astype(out_dtype)
    loss, lse = _per_token_loss(x, w, b, target, mask, consts, static)
    loss, lse = loss[:num_tokens], lse[:num_tokens]
    terms = _terms(target[:num_tokens], consts, w, static, loss.dtype)
    loss = reduce_loss(
        loss.reshape(batch_shape), reduction, jnp.sum(terms.target_weight),
        out_dtype, batch_axes=static.batch_axes,
    )  # fmt: skip
    lse = lse.reshape(batch_shape)
    return (loss, lse) if return_lse else loss


def _default_chunk_size(num_tokens: int, vocab: int) -> int:
    rows = max(1, _CHUNK_BYTES // (4 * max(vocab, 1)))
    rows = 1 << (rows.bit_length() - 1)  # a power of two
    return max(1, min(rows, num_tokens))


def _check_chunk_size(chunk_size, num_tokens: int, vocab: int) -> int:
    if chunk_size is None:
        return _default_chunk_size(num_tokens, vocab)
    if (
        isinstance(chunk_size, bool)
        or not isinstance(chunk_size, int)
        or chunk_size <= 0
    ):
        raise ValueError(
            f"`chunk_size` must be a positive int (tokens per chunk) or None, got "
            f"{chunk_size!r}."
        )
    return max(1, min(chunk_size, num_tokens))


def _class_mask_for_tokens(where, batch_shape, vocab):
    """Returns (mask, row_mask): a (1, V) class mask or a (..., V) token mask."""
    if where is None:
        return None, False
    mask = jnp.asarray(where)
    if mask.dtype != jnp.bool_:
        raise TypeError(f"`where` must be a boolean array, got dtype {mask.dtype}.")
    shape = (*batch_shape, vocab)
    try:
        ok = jnp.broadcast_shapes(mask.shape, shape) == shape
    except ValueError:
        ok = False
    if not ok:
        raise ValueError(
            f"`where` of shape {mask.shape} does not broadcast to the logits' shape "
            f"{shape} (x.shape[:-1] + (V,))."
        )
    if all(d == 1 for d in mask.shape[:-1]) and mask.shape[-1] == vocab:
        return mask.reshape(1, vocab), False
    mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
    return jnp.broadcast_to(mask, shape), True


@overload
def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    chunk_size: int | None = None,
    return_lse: Literal[False] = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array: ...


@overload
def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    chunk_size: int | None = None,
    return_lse: Literal[True],
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]: ...


@overload
def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def linear_cross_entropy(
    x: ArrayLike,
    w: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    bias: ArrayLike | None = None,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    chunk_size: int | None = None,
    return_lse: bool = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""``cross_entropy(x @ w + bias, target, ...)`` without the logits in memory.

    The same value as :func:`jxent.cross_entropy` on the materialised logits
    ``x @ w + bias`` (computed with float32 accumulation), with every option
    meaning the same, but the ``(N, V)`` logits never exist: tokens are
    processed ``chunk_size`` at a time inside a ``jax.custom_vjp`` that keeps
    only O(N) residuals. For ``"mean"`` and ``"sum"`` the gradients are
    computed during the forward pass (three matmuls in all, as unfused);
    ``"none"`` and ``return_lse`` recompute each chunk's logits in the
    backward pass. The logsumexp, the loss and the gradients of ``x``, ``w``
    and ``bias`` are accumulated in float32 for any input dtype.

    Gradients flow to ``x``, ``w`` and ``bias``; ``weight``,
    ``label_smoothing``, ``z_loss`` and ``soft_cap`` are treated as constants
    (``stop_gradient``). Targets are integer class indices (probability
    targets would be logits-sized).

    Args:
      x: floating array ``(..., D)`` of hidden states.
      w: floating array ``(D, V)`` (pass ``embedding.T`` for tied embeddings).
      target: integer array ``x.shape[:-1]`` of class indices.
      weight: optional length-V class weights.
      bias: optional length-V bias.
      ignore_index: target value that is ignored.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      label_smoothing: ``ε`` in ``[0, 1]``.
      z_loss: coefficient ``>= 0`` of ``lse²`` added per non-ignored token.
      soft_cap: ``None`` or a cap ``> 0``: logits become ``cap·tanh(z/cap)``.
      where: optional boolean mask broadcastable to ``(..., V)``; excluded
        classes take no part in the softmax or the smoothing.
      chunk_size: tokens per chunk (default: about 16 MiB of float32 logits).
      return_lse: also return the per-token logsumexp (float32).
      class_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the vocabulary is split: ``w``, ``bias``, ``weight`` and
        ``where`` are this device's contiguous slice of the classes, targets
        are global indices; ``dx`` is all-reduced (O(N·D)), nothing of logits
        size moves.
      batch_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the tokens are split: ``"mean"``/``"sum"`` are global and the
        gradients of ``w`` and ``bias`` are summed over the token shards.

    Returns:
      The loss (scalar, or ``x.shape[:-1]`` for ``"none"``) in the dtype of
      ``x @ w``; with ``return_lse``, ``(loss, lse)``.

    Raises:
      TypeError: non-floating ``x``/``w``/``bias``, non-integer ``target``.
      ValueError: mismatched shapes of ``x``, ``w``, ``bias``, ``target`` or
        ``where``, a bad ``chunk_size``, ``soft_cap <= 0``, ``z_loss < 0``, and
        every error :func:`jxent.cross_entropy` raises.

    Examples:
      >>> import jax
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> x = jax.random.normal(jax.random.key(0), (8, 16))
      >>> w = jax.random.normal(jax.random.key(1), (16, 100))
      >>> t = jnp.arange(8)
      >>> fused = jxent.linear_cross_entropy(x, w, t, chunk_size=3)
      >>> bool(jnp.allclose(fused, jxent.cross_entropy(x @ w, t), rtol=1e-5))
      True
    """
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    return_lse = check_bool(return_lse, "return_lse")
    x = as_float_array(x, "x")
    w = as_float_array(w, "w")
    if x.ndim < 1:
        raise ValueError(f"`x` must have shape (..., D), got a scalar {x.shape}.")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"`w` must have shape (D, V) with D = x.shape[-1] = {x.shape[-1]}, got "
            f"w.shape={w.shape} (x.shape={x.shape})."
        )
    vocab = w.shape[1]
    if bias is not None:
        bias = as_float_array(bias, "bias")
        if bias.shape != (vocab,):
            raise ValueError(
                f"`bias` must have shape (V,) = ({vocab},), got {bias.shape}."
            )
    target = jnp.asarray(target)
    if jnp.issubdtype(target.dtype, jnp.floating):
        raise TypeError(
            "`target` must hold integer class indices for linear_cross_entropy "
            f"(probability targets would be logits-sized), got {target.dtype}."
        )
    target = _as_int_target(target)
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"`target` must have shape x.shape[:-1] = {x.shape[:-1]}, got "
            f"{target.shape}."
        )
    weight = check_weight(weight, vocab)
    label_smoothing = check_unit_interval(label_smoothing, "label_smoothing")
    z_loss = check_nonnegative(z_loss, "z_loss")
    soft_cap = check_soft_cap(soft_cap)
    mask, row_mask = _class_mask_for_tokens(where, target.shape, vocab)
    chunk = _check_chunk_size(chunk_size, max(target.size, 1), vocab)
    shards = ClassShards(as_axis_names(class_axis_name, "class_axis_name"))
    batch_axes = as_axis_names(batch_axis_name, "batch_axis_name")
    if not shards.sharded:
        check_concrete_target_range(target, vocab, ignore_index)
    static = _Static(
        ignore_index=ignore_index,
        smoothing=not _is_static_zero(label_smoothing),
        with_z_loss=not _is_static_zero(z_loss),
        chunk_size=chunk,
        row_mask=row_mask,
        shards=shards,
        batch_axes=batch_axes,
    )
    acc = compute_dtype(jnp.result_type(x.dtype, w.dtype))
    consts = lax.stop_gradient(
        _Consts(
            weight=None if weight is None else jnp.asarray(weight, acc),
            label_smoothing=jnp.asarray(label_smoothing, acc),
            z_loss=jnp.asarray(z_loss, acc),
            soft_cap=None if soft_cap is None else jnp.asarray(soft_cap, acc),
        )
    )
    return _linear_cross_entropy(
        x, w, bias, target, mask, consts, static=static, reduction=reduction,
        return_lse=return_lse,
    )  # fmt: skip
