"""``linear_cross_entropy``: the LM-head matmul fused with cross-entropy.

The (N, V) logits never exist at once: tokens are processed ``chunk_size`` at
a time (a ragged last chunk is its own, smaller tile), each chunk's logits are
formed with float32 accumulation, reduced to per-token values and dropped.

Differentiation goes through two ``jax.custom_jvp`` rules, so reverse mode,
forward mode and higher orders all work:

* ``"mean"``/``"sum"``: the rule computes the summed loss and its gradients
  w.r.t. every floating input in one pass over the chunks (the gradient of a
  scalar only scales), and returns the tangent ``Σ_i <g_i, t_i>``. Reverse mode
  transposes that into ``g_i · cotangent``: the residuals are the gradients
  themselves and each chunk's logits are computed once (three matmuls in all,
  as unfused). The gradient computation is plain JAX, so it differentiates
  again (Hessians).
* ``"none"``/``return_lse``: the rule pushes the tangents through each chunk
  inside a ``jax.checkpoint``, so reverse mode recomputes each chunk's logits
  instead of saving them: for integer targets and tangents of x, w and bias
  alone class block by class block (``_per_token_block_tangents``, no
  float32 ``dw`` of the head's size), else token chunk by token chunk.

Accumulators (logsumexp, loss, dx, dw, dbias and the O(V) class-weight
gradient) are float32 for 16- and 32-bit inputs, float64 for float64 inputs.
For 16-bit inputs with a large ``dw`` the "mean"/"sum" rule makes a second
pass for the second half of ``dw``'s columns (see ``_DW_SPLIT_BYTES``).

Off the CPU the "mean"/"sum" gradients w.r.t. x, w and bias are accumulated
in the vocabulary-outer order (``_vocab_outer_gradients``): per-token
statistics first, then one class block at a time over all token chunks.
"""

from __future__ import annotations

import functools
import math
import numbers
from collections.abc import Callable
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jxent._classification import (
    _is_static_zero,
    hard_target_loss,
    hard_target_row_cotangents,
    soft_target_loss,
    target_terms,
)
from jxent._kernels import (
    _partitioned_by_xla,
    _tangent_map,
    _total_weight,
    compute_dtype,
    known_sizes,
    on_cpu,
)
from jxent._reduction import reduce_loss
from jxent._rounded_dot import rounded_transpose_dot
from jxent._safe_math import poisoned_tangent
from jxent._sharding import (
    UNSHARDED,
    ClassShards,
    as_axis_names,
    axes_of,
    check_class_split,
    check_split_like_the_classes,
    explicit_layout,
    refuse_untyped_derivatives,
    vary_like,
)
from jxent._types import Reduction
from jxent._validation import (
    as_float_array,
    as_int_target,
    as_target_array,
    check_bool,
    check_concrete_target_range,
    check_ignore_index,
    check_nonnegative,
    check_reduction,
    check_soft_cap,
    check_unit_interval,
    check_weight,
    is_concrete,
    promoted_dtype,
)

# Default token chunk (see _default_chunk_size): the issue's memory budget for
# the extra memory of value_and_grad is 1.5 x (dx + dw in float32) + 64 MiB;
# dx and dw themselves take 1 x, so the chunk's temporaries may take the other
# 0.5 x + 64 MiB. On the CPU they measure one float32 logits tile plus the two
# dw blocks in flight plus a few MiB (XLA's temp_size at (2048, 1024, 131072):
# 89, 154 and 284 MiB for tiles of 64, 128 and 256 MiB).
# Label smoothing keeps the logits tile alive next to its gradient (one more
# tile), `where` adds its mask and the masked logits (two more). The process's
# resident memory runs 40-100 MiB above XLA's accounting (allocator caches):
# 48 MiB of the 64 MiB slack are kept for it.
_SLACK_BYTES = 64 * 2**20
_RUNTIME_BYTES = 48 * 2**20
_TEMPORARIES_PER_TILE = 1.25
_TILES_FOR_SMOOTHING = 1.0
_TILES_FOR_WHERE = 2.0
_MIN_TILE_BYTES = 16 * 2**20
_MAX_TILE_BYTES = 512 * 2**20
# Default vocabulary block of the dw update: a float32 (D, block) product of at
# most this many bytes (one x_c^T dz over the whole vocabulary would first
# write a (D, V) temporary as large as dw itself).
_DW_BLOCK_BYTES = 16 * 2**20
# The vocabulary-outer gradients (off the CPU): the forward's whole-row float32
# tiles take at most _ROW_TILE_BYTES, the class blocks' tiles at most
# _BLOCK_TILE_BYTES, a block's float32 dw at most _BLOCK_DW_BYTES. The TPU
# compiler keeps about five block tiles alive; dx (float32) lives through the
# whole pass. Each forward chunk reads all of w, so the forward moves
# D / row_chunk passes over the bf16 logits in w alone: 64 at (8192, 4096,
# 131072) with 32 MiB row tiles, the largest part of the traffic, measured
# 85 ms against the naive program's 37 on an H200. With 256 MiB row tiles
# the compiled programs' temporaries stayed 0.19 GiB on a v5e and went from
# 0.22 to 0.38 GiB on an H100, and the roofline time fell from 398 to 262 ms
# (v5e) and from 103 to 67 ms (H100); at (8192, 2304, 256000) from 619 to
# 317 ms and 166 to 87 ms, temporaries 0.07 and 0.13 to 0.31 GiB. A row tile
# also takes at most 1/_ROW_TILE_SHARE of the tokens (but never less than
# _BLOCK_TILE_BYTES), so that it stays a small part of the float32 logits
# when the batch is small.
_ROW_TILE_BYTES = 256 * 2**20
_ROW_TILE_SHARE = 16
_BLOCK_TILE_BYTES = 32 * 2**20
# linear_cross_entropy's class blocks (which run off the CPU only) take tiles
# of up to _LOSS_BLOCK_TILE_BYTES: at (8192, 4096, 131072) all 8192 tokens in
# one tile, so that each block's float32 dw is written once instead of read
# and written once per token chunk. The roofline time fell from 67 to 55 ms
# on an H100 (temporaries 0.38 GiB either way) and from 262 to 251 ms on a
# v5e (0.19 to 0.38 GiB). The heads' blocks keep _BLOCK_TILE_BYTES: the CPU
# runs those too, tuned to its memory budget.
_LOSS_BLOCK_TILE_BYTES = 128 * 2**20
_BLOCK_DW_BYTES = 64 * 2**20
# Classes per block of the per-token heads' derivatives (log-probabilities,
# distillation per position), whatever D: their tiles then take 1024 tokens.
# On the CPU, value_and_grad of linear_log_probs took 1.17, 0.99, 1.05 and
# 1.01 x the naive program's time at (2048, 512, 65536) and (2048, 1024,
# 131072), float32 and bfloat16, against 1.57, 1.37, 1.27 and 1.00 with the
# blocks of _BLOCK_DW_BYTES and 128-token tiles; 4096 classes cost bfloat16
# 1.22 at D = 1024 (per-block work on w), 16384 classes float32 1.32 at D = 512.
_PER_TOKEN_BLOCK_CLASSES = 8192
# Tests force the vocabulary-outer order (True) or the token-outer one (False)
# on any platform; None: chosen for the platform compiled for.
_VOCAB_OUTER: bool | None = None
# 16-bit inputs whose float32 dw takes at least this many bytes accumulate it
# in two column halves, one pass over the chunks each (every chunk's logits
# computed twice: four matmuls instead of three): the float32 accumulator and
# the 16-bit result then take 1 x instead of 1.5 x the float32 dw. At
# (2048, 1024, 131072) bfloat16 one pass measured 853-897 MiB of extra memory
# against the 844 MiB budget, whatever the chunk.
_DW_SPLIT_BYTES = 512 * 2**20


class _Static(NamedTuple):
    """Options that change the program (hashable, static under jit)."""

    ignore_index: int
    smoothing: bool
    with_z_loss: bool
    chunk_size: int
    vocab_chunk_size: int
    soft: bool  # probability targets
    row_mask: bool  # `where` varies per token (else one (1, V) class mask)
    shards: ClassShards = UNSHARDED  # vocabulary split over mesh axes
    batch_axes: tuple[str, ...] = ()  # tokens split over mesh axes
    dw_passes: int = 1  # passes over the chunks, one per column range of dw
    # The vocabulary-outer gradients (TPU and GPU): whole-row tokens per chunk
    # of the forward, tokens per chunk of the class blocks; None: chosen for
    # the platform compiled for, True/False: forced (tests).
    row_chunk: int = 1
    # The per-token heads' whole rows off the CPU (0: row_chunk): their
    # forward pass runs on the CPU too, with rows sized for its budget.
    chip_row_chunk: int = 0
    block_tokens: int = 1
    block_classes: int = 1
    vocab_outer: bool | None = None
    # Tokens split over devices by XLA's partitioner: chunks are strided.
    strided: bool = False
    # Another head's per-tile math in place of the cross-entropy's (see
    # _linear_heads): a hashable callable with _tile_loss's signature.
    head: Callable | None = None
    # The class blocks' matmuls from float32 copies of 16-bit operands (a
    # CPU whose 16-bit matmuls are slow, see _loss_and_gradients).
    float32_blocks: bool = False
    # The cross-entropy's per-token lse is an output (return_lse); else the
    # per-token rule gives zeros for it and differentiates the loss alone.
    per_token_lse: bool = True


class _Params(NamedTuple):
    """The differentiable inputs (None where absent), tokens flattened."""

    x: jax.Array  # (N, D)
    w: jax.Array  # (D, V)
    bias: jax.Array | None  # (V,)
    probs: jax.Array | None  # (N, V) probability targets, or a head's other
    # per-token input (the distillation head: the teacher's (N, D') states)
    weight: jax.Array | None  # (V,) class weights
    label_smoothing: jax.Array
    z_loss: jax.Array
    soft_cap: jax.Array | None
    # The heads' options (see _linear_heads): sampling temperature, the
    # divergence's beta and the teacher's LM head (sliced like w and bias).
    temperature: jax.Array | None = None
    beta: jax.Array | None = None
    teacher_w: jax.Array | None = None
    teacher_bias: jax.Array | None = None


# Inputs whose slices of the class axis live on this device (with class shards
# their contributions to a tangent are summed over the shards).
_CLASS_SLICED = ("w", "bias", "probs", "weight", "teacher_w", "teacher_bias")


def _class_sliced(static: _Static) -> tuple[str, ...]:
    """The inputs sliced over the class shards (their tangent terms are summed).

    A head names its own: its token input may be replicated over the class
    shards, and the gradient w.r.t. it then already summed.
    """
    return _CLASS_SLICED if static.head is None else static.head.class_sliced


# Inputs used whole by every chunk: their gradients are accumulated over chunks.
_SMALL = ("weight", "label_smoothing", "z_loss", "soft_cap", "temperature", "beta",
          "teacher_w", "teacher_bias")  # fmt: skip


class _Data(NamedTuple):
    """Non-differentiable inputs, tokens flattened."""

    target: jax.Array | None  # (N,) class indices (None for probabilities)
    mask: jax.Array | None  # (1, V) class mask or (N, V) token mask
    # Per input, a flag whose being set makes that input's derivatives NaN
    # (bad data or options), or None; applied in the custom_jvp rules
    # (_poisoned_tangents).
    flags: _Params | None = None


def _poisoned_tangents(tp: _Params, data: _Data) -> _Params:
    """The tangents, NaN where the input's flag in ``data.flags`` is set.

    Inside the rules, not by ``poison_gradients`` on their inputs: under a
    vmap of the targets or an option alone, the flags are batched and x and
    w are not, and a custom_jvp's primal and tangent inputs must be batched
    alike.
    """
    if data.flags is None:
        return tp
    return _Params(*(
        t if flag is None else poisoned_tangent(t, flag)
        for t, flag in zip(tp, data.flags, strict=True)
    ))  # fmt: skip


def _accumulation_dtype(p: _Params):
    return compute_dtype(p.x.dtype)


def _tile_logits(x_c, w, bias):
    """``x_c @ w + bias`` in the accumulation dtype (float32 for 16-bit)."""
    acc = compute_dtype(x_c.dtype)
    logits = lax.dot_general(
        x_c, w, (((1,), (0,)), ((), ())), preferred_element_type=acc
    )
    return logits if bias is None else logits + bias.astype(acc)[None, :]


def _opaque(f, *, opaque_under_jvp: bool = True):
    """``f`` as one opaque call for JAX's partial evaluation (same values).

    A ``custom_jvp`` whose rule is ``f``'s own JVP: a ``custom_jvp_call`` has
    no partial-evaluation rule, so a call whose inputs are all known is kept
    whole. Two things then stay out of the differentiated programs:

    * Hoisting: partial evaluation of a ``lax.scan`` (differentiating a
      custom_jvp rule) moves every value of the loop body that does not
      depend on the loop (iotas, broadcast constants, masks) out of the loop
      as stored arrays; each chunk then reads tile-sized constants (on the
      CPU, one int32 and one float32 logits tile).
    * Saving: a user's ``jax.checkpoint(..., policy=dots_saveable)`` (or any
      policy that saves matmuls) reaches the primal matmuls of the per-token
      tangent maps too, nested checkpoints included, and saves their outputs
      stacked over the loops' trips: the logits, the very arrays the loops
      avoid (``linear_log_probs``' value_and_grad at (2048, 256, 32768)
      float32 held 651 MiB against 130). A policy sees one call, not a
      matmul, and recomputes it.

    Derivatives are ``f``'s, to any order. Only for primal values: a tangent
    map's linear terms must stay transposable primitives. Under a jvp (a
    tile's math, second order) the rule's primal value is the opaque call
    again (``opaque_under_jvp``), which a policy would otherwise see as the
    matmul of ``jvp(f)``; or ``jvp(f)``'s own, where the tangent needs most of
    ``f``'s work anyway (the summed losses' gradient pass: an opaque call
    would run it twice, jvp of grad of ``linear_cross_entropy`` at (1024,
    256, 16384) 1.53e10 flops against 1.31e10).
    """

    @jax.custom_jvp
    def call(*args):
        return f(*args)

    @call.defjvp
    def call_jvp(primals, tangents):
        out, tangent = jax.jvp(f, primals, tangents)
        return (call(*primals) if opaque_under_jvp else out), tangent

    return call


def _unsaved_tile_logits(x_c, w, bias):
    """``_tile_logits`` of primal operands, never saved by a checkpoint policy."""
    return _opaque(_tile_logits)(x_c, w, bias)


def _tile_loss(logits, probs_c, target_c, mask_c, small, static: _Static):
    """Per-token ``(loss, lse)`` of one tile of logits (classes last).

    ``small`` holds the inputs named in ``_SMALL``.
    """
    if static.head is not None:
        return static.head(logits, probs_c, target_c, mask_c, small, static)
    weight, label_smoothing, z_loss, soft_cap = small[:4]
    mask = None if mask_c is None else jnp.broadcast_to(mask_c, logits.shape)
    options = dict(
        axis=1,
        smoothing=static.smoothing,
        with_z_loss=static.with_z_loss,
        shards=static.shards,
    )
    if static.soft:
        return soft_target_loss(
            logits, probs_c, weight, label_smoothing, z_loss, soft_cap, mask,
            **options,
        )  # fmt: skip
    loss, lse, _ = hard_target_loss(
        logits, target_c, weight, label_smoothing, z_loss, soft_cap, mask,
        ignore_index=static.ignore_index, **options,
    )  # fmt: skip
    return loss, lse


def _over_chunks(body, carry, tokens, chunk: int, strided: bool = False):
    """``lax.scan`` of ``body`` over full chunks of ``tokens``, then the rest.

    ``tokens`` is a pytree of arrays with the tokens first; the ragged last
    chunk runs as its own smaller tile (nothing is padded, so no padded token
    can add to a loss). Returns the carry and the outputs, tokens first.

    ``strided``: chunk ``c`` of ``k`` holds tokens ``c, c + k, c + 2k, ...``
    instead of a contiguous run, so that tokens split over devices (by XLA's
    partitioner) split every chunk alike: each device computes its own
    tokens' share of every chunk, instead of all-gathering each chunk.
    """
    n = jax.tree.leaves(tokens)[0].shape[0]
    full = n - n % chunk
    outs = []
    if full:
        num = full // chunk
        if strided:

            def split(a):
                a = a[:full].reshape(chunk, num, *a.shape[1:])
                return jnp.swapaxes(a, 0, 1)

            def merge(o):
                return jnp.swapaxes(o, 0, 1).reshape(full, *o.shape[2:])
        else:

            def split(a):
                return a[:full].reshape(num, chunk, *a.shape[1:])

            def merge(o):
                return o.reshape(full, *o.shape[2:])

        if num == 1:
            # One chunk: no loop. XLA drops a loop of one trip itself, but not
            # under x64, whose int64 loop counters kept the TPU's loop over
            # the tokens of each class block, and a float32 dw block with it.
            carry, out = body(carry, jax.tree.map(lambda a: a[:full], tokens))
        else:
            carry, out = lax.scan(body, carry, jax.tree.map(split, tokens))
            out = jax.tree.map(merge, out)
        outs.append(out)
    if n > full or not full:
        carry, out = body(carry, jax.tree.map(lambda a: a[full:], tokens))
        outs.append(out)
    if len(outs) == 1:
        return carry, outs[0]
    return carry, jax.tree.map(lambda *o: jnp.concatenate(o), *outs)


def _small(p: _Params):
    return tuple(getattr(p, name) for name in _SMALL)


def _token_inputs(p: _Params, data: _Data, static: _Static):
    return (p.x, p.probs, data.target, data.mask if static.row_mask else None)


def _live_tokens(target, static: _Static) -> jax.Array | None:
    """False at the ignored tokens (padding), or None where none can be."""
    if target is None or static.soft:
        return None
    return target != static.ignore_index


def _zeroed_if_ignored(a, live):
    """``a``, its non-finite entries at the ignored tokens (``live`` False) 0.

    Padding's hidden states may be NaN or inf (a fully masked attention
    row): their tiles' gradients are exactly 0, but ``x_cᵀ dz`` would still
    form ``NaN · 0`` in ``dw``. Finite states are kept, so that a returned
    logsumexp of an ignored token (and its gradient) stays its own. Applied
    chunk by chunk, so that no second (N, D) array exists.
    """
    if a is None or live is None:
        return a
    dead = ~live[:, None] & ~jnp.isfinite(a)
    return jnp.where(dead, jnp.zeros((), a.dtype), a)


def _padding_zeroed(tokens, static: _Static, *, x: bool = True):
    """A chunk's ``(x_c, probs_c, target_c, ...)``, padding's bad states zeroed.

    A head's token input (the teacher's hidden states) too; ``x=False``
    leaves ``x_c`` (whose logits give an ignored token's logsumexp).
    """
    x_c, probs_c, target_c, *rest = tokens
    live = _live_tokens(target_c, static)
    if x:
        x_c = _zeroed_if_ignored(x_c, live)
    if static.head is not None:
        probs_c = _zeroed_if_ignored(probs_c, live)
    return (x_c, probs_c, target_c, *rest)


def _class_mask(data: _Data, static: _Static):
    return None if static.row_mask else data.mask


# --- forward: per-token loss and lse ------------------------------------------


def _per_token_values(static: _Static, p: _Params, data: _Data, logits_of=None):
    """Per-token ``(loss, lse)`` over all chunks, no derivatives.

    ``logits_of``: how a chunk's logits are formed (``_tile_logits``).
    """
    small = _small(p)
    class_mask = _class_mask(data, static)
    logits_of = logits_of or _tile_logits

    def body(carry, tokens):
        x_c, probs_c, target_c, mask_c = tokens
        mask_c = class_mask if mask_c is None else mask_c
        logits = logits_of(x_c, p.w, p.bias)
        return carry, _tile_loss(logits, probs_c, target_c, mask_c, small, static)

    _, (loss, lse) = _over_chunks(
        body, None, _token_inputs(p, data, static), static.chunk_size, static.strided
    )
    return loss, lse


# --- "mean" / "sum": the gradients computed with the loss ----------------------


def _accumulate_outer(acc, x_c, dz, block: int):
    """``acc + x_c^T dz`` in place, over column blocks of ``block`` classes."""
    block, num_blocks, start, fresh = _column_blocks(acc.shape[1], block)

    def contract(a, b):
        return lax.dot_general(
            a, b, (((0,), (0,)), ((), ())), preferred_element_type=acc.dtype
        )

    if num_blocks == 1:
        return acc + contract(x_c, dz)

    def body(i, acc):
        # The shifted last block's columns shared with the previous block are
        # zeroed so they count once.
        dz_block = lax.dynamic_slice_in_dim(dz, start(i), block, axis=1)
        if fresh(i) is not None:
            dz_block = jnp.where(fresh(i), dz_block, 0)
        update = lax.dynamic_slice_in_dim(acc, start(i), block, axis=1)
        update = update + contract(x_c, dz_block)
        return lax.dynamic_update_slice_in_dim(acc, update, start(i), axis=1)

    return lax.fori_loop(0, num_blocks, body, acc)


def _column_blocks(vocab: int, block: int):
    """``(block, num_blocks, start(j), fresh(j))`` of column blocks.

    Blocks of ``block`` classes (at most ``vocab``); the last one is shifted
    left to stay in bounds, and ``fresh(j)`` marks its columns not in an
    earlier block ((1, block) booleans, None when the blocks divide
    ``vocab``).
    """
    block = min(block, vocab)
    num_blocks = -(-vocab // block)

    def start(j):
        return jnp.minimum(j * block, vocab - block)

    def fresh(j):
        if not vocab % block:
            return None
        return start(j) + lax.broadcasted_iota(jnp.int32, (1, block), 1) >= j * block

    return block, num_blocks, start, fresh


def _logits_from_float32_blocks(x_c, w, bias, block: int):
    """``_tile_logits`` of 16-bit operands, from float32 copies.

    ``x_c`` and each ``block`` columns of ``w`` are converted to float32
    (one block at a time: no float32 copy of ``w``), their product written
    into the tile in place. For a CPU whose XLA runs float32 matmuls faster
    than 16-bit ones with float32 results (``_cpu_has_fast_bfloat16_matmuls``).
    """
    acc = jnp.float32
    vocab = w.shape[1]
    block, num_blocks, start, _ = _column_blocks(vocab, block)
    x32 = x_c.astype(acc)

    def body(j, logits):
        w_j = _class_block(w, start(j), block).astype(acc)
        z = lax.dot_general(x32, w_j, (((1,), (0,)), ((), ())))
        # The shifted last block rewrites its shared columns with equal values.
        return lax.dynamic_update_slice_in_dim(logits, z, start(j), axis=1)

    logits = jnp.zeros((x_c.shape[0], vocab), acc)
    # Varying like the tokens and like w's class shards.
    logits = vary_like(vary_like(logits, x_c), w)
    logits = lax.fori_loop(0, num_blocks, body, logits)
    return logits if bias is None else logits + bias.astype(acc)[None, :]


def _dx_from_float32_blocks(d_in, w, block: int):
    """``d_in @ w^T`` (16-bit operands) from float32 copies.

    Block by block of the classes, as ``_logits_from_float32_blocks``,
    summed in float32 (a shifted last block's shared columns once).
    """
    acc = jnp.float32
    vocab = w.shape[1]
    block, num_blocks, start, fresh = _column_blocks(vocab, block)

    def body(j, dx):
        w_j = _class_block(w, start(j), block).astype(acc)
        d_j = lax.dynamic_slice_in_dim(d_in, start(j), block, axis=1).astype(acc)
        if fresh(j) is not None:
            d_j = jnp.where(fresh(j), d_j, 0.0)
        return dx + lax.dot_general(d_j, w_j, (((1,), (1,)), ((), ())))

    dx = jnp.zeros((d_in.shape[0], w.shape[0]), acc)
    return lax.fori_loop(0, num_blocks, body, vary_like(vary_like(dx, d_in), w))


def _dw_column_ranges(vocab: int, passes: int) -> list[tuple[int, int]]:
    """``passes`` contiguous column ranges of ``dw`` (one per pass), none empty."""
    passes = max(1, min(passes, vocab))
    return [(vocab * i // passes, vocab * (i + 1) // passes) for i in range(passes)]


def _loss_and_gradients(static: _Static, p: _Params, data: _Data, need: dict):
    """Per-token losses and the gradients of their sum named in ``need``.

    Gradients are this device's partial sums over its tokens (inside
    shard_map with batch axes, the tangent rule's contraction with the
    tangents, or its transpose, sums them over the token shards).

    With ``static.dw_passes > 1`` (16-bit ``w``) the float32 ``dw`` is
    accumulated one column range at a time, each range rounded to the 16-bit
    dtype inside its loop, so that one range's float32 accumulator at a time
    lives next to the 16-bit gradient; ``dw`` is then returned as the tuple
    of the ranges' gradients. The first range comes with the pass over the
    chunks' whole rows; the later ones recompute only their own columns'
    logits, class block by class block, from what that pass kept per token
    (a head's tapped reductions, integer targets' logsumexp), or else
    (classes split over devices, a program XLA may partition, probability
    targets) in another pass over the chunks' whole rows each. At (2048,
    1024, 131072) bfloat16 on the CPU: 0.85x the time of whole rows again.
    """
    acc = _accumulation_dtype(p)
    class_mask = _class_mask(data, static)
    # The options vary like the tokens: their per-chunk gradients are then
    # local partial sums, added up once (no collective per chunk).
    small = vary_like(_small(p), p.x)
    ranges = _dw_column_ranges(p.w.shape[1], static.dw_passes if need["w"] else 1)
    split = len(ranges) > 1

    def dw_carry(lo, hi):
        # Varying like w (its class shards) as well as like the tokens.
        zeros = vary_like(jnp.zeros((p.w.shape[0], hi - lo), acc), p.w)
        return (zeros, zeros.astype(p.w.dtype)) if split else zeros

    def accumulate_dw(dw, x_c, d_logits, lo, hi):
        d_in = d_logits[:, lo:hi].astype(p.w.dtype)
        if not split:
            return _accumulate_outer(dw, x_c, d_in, static.vocab_chunk_size)
        total = _accumulate_outer(dw[0], x_c, d_in, static.vocab_chunk_size)
        return total, total.astype(p.w.dtype)

    carry = {}
    if need["w"]:
        carry["w"] = dw_carry(*ranges[0])
    if need["bias"]:
        carry["bias"] = jnp.zeros_like(p.bias, dtype=acc)
    for name, value in zip(_SMALL, small, strict=True):
        if need[name]:
            carry[name] = jnp.zeros_like(value, dtype=acc)
    carry = vary_like(carry, p.x)

    # A head's later column ranges of dw recompute only their own columns'
    # logits (_range_gradients): the first pass keeps, per token, the tile
    # math's class-axis reductions and their cotangents.
    keep_rows = (
        split and static.head is not None and not static.shards.sharded
        and not static.strided
    )  # fmt: skip
    # So do integer targets' (_hard_target_block_d_logits): from each token's
    # logsumexp, kept by the first pass.
    keep_lse = (
        split and static.head is None and not static.soft
        and not static.shards.sharded and not static.strided
    )  # fmt: skip

    # 16-bit w on a CPU with slow 16-bit matmuls: the logits and dx
    # from float32 copies of the column blocks of w, faster there: at (2048,
    # 512, 65536) bfloat16 value_and_grad in 0.82-0.88x the time (1.01-1.06x
    # the naive program's, against 1.22-1.25x), temporaries 156 -> 172 MiB
    # (dw's blocks from float32 copies measured no faster). Not where XLA may
    # partition the classes.
    float32_blocks = (
        jnp.finfo(p.w.dtype).bits == 16 and not static.strided
        and not _cpu_has_fast_bfloat16_matmuls()
    )  # fmt: skip

    def logits_of(x_c):
        def by_blocks():
            return _logits_from_float32_blocks(
                x_c, p.w, p.bias, static.vocab_chunk_size
            )

        def direct():
            return _tile_logits(x_c, p.w, p.bias)

        return on_cpu(by_blocks, direct) if float32_blocks else direct()

    def dx_of(d_in):
        def by_blocks():
            return _dx_from_float32_blocks(d_in, p.w, static.vocab_chunk_size)

        def direct():
            return lax.dot_general(
                d_in, p.w, (((1,), (1,)), ((), ())), preferred_element_type=acc
            )

        return on_cpu(by_blocks, direct) if float32_blocks else direct()

    def tile_gradients(tokens, keep: bool = False):
        x_c, probs_c, target_c, mask_c = tokens
        mask_c = class_mask if mask_c is None else mask_c
        logits = logits_of(x_c)
        if not keep:
            (loss, lse), vjp = jax.vjp(
                lambda z, q, s: _tile_loss(z, q, target_c, mask_c, s, static),
                logits, probs_c, small,
            )  # fmt: skip
            ones = vary_like((jnp.ones_like(loss), jnp.zeros_like(lse)), loss)
            return loss, vjp(ones), lse

        def tile(z, q, s, taps):
            tapped = _Tapped(static.shards, p.w.shape[1], taps)
            shards = static._replace(shards=tapped)
            return _tile_loss(z, q, target_c, mask_c, s, shards), tapped.values

        _, values = jax.eval_shape(tile, logits, probs_c, small, None)
        taps = [
            vary_like(jnp.zeros(v.shape, v.dtype), x_c) if _floating(v) else None
            for v in values
        ]
        (loss, lse), vjp, values = jax.vjp(
            tile, logits, probs_c, small, taps, has_aux=True
        )
        ones = vary_like((jnp.ones_like(loss), jnp.zeros_like(lse)), loss)
        d_logits, d_probs, d_small, cts = vjp(ones)
        return loss, (d_logits, d_probs, d_small), (tuple(values), tuple(cts))

    def dw_rows(tokens):
        """The chunk's ``x_c`` for ``dw`` (padding's non-finite states zeroed)."""
        return _zeroed_if_ignored(tokens[0], _live_tokens(tokens[2], static))

    def body(carry, tokens):
        tokens = _padding_zeroed(tokens, static, x=False)
        loss, (d_logits, d_probs, d_small), rows = tile_gradients(tokens, keep_rows)
        out = {"loss": loss}
        if keep_rows:
            out["rows"] = rows
        if keep_lse:
            out["lse"] = rows
        if need["x"]:
            # Each vocabulary shard contributes to every token's dx (O(N·D)).
            out["x"] = static.shards.sum(dx_of(d_logits.astype(p.w.dtype)))
        if need["probs"]:
            out["probs"] = d_probs.astype(acc)
        new = dict(carry)
        if need["w"]:
            new["w"] = accumulate_dw(carry["w"], dw_rows(tokens), d_logits, *ranges[0])
        if need["bias"]:
            new["bias"] = carry["bias"] + jnp.sum(d_logits, axis=0)
        for name, g in zip(_SMALL, d_small, strict=True):
            if need[name]:
                new[name] = carry[name] + g.astype(acc)
        return new, out

    def dw_pass(lo, hi, done):
        """A later pass over the chunks: ``dw[:, lo:hi]`` only.

        Its zero accumulator is made to depend on ``done`` (the earlier
        ranges' 16-bit gradients: one element, times 0), so that XLA does not
        allocate it before the earlier passes have finished (both float32
        ranges would be live; XLA's CPU backend drops optimization barriers
        before scheduling).
        """

        def body(dw, tokens):
            tokens = _padding_zeroed(tokens, static, x=False)
            _, (d_logits, _, _), _ = tile_gradients(tokens)
            return accumulate_dw(dw, dw_rows(tokens), d_logits, lo, hi), None

        last = done[-1][0, 0].astype(acc)
        zero = jnp.where(jnp.isfinite(last), last, 0.0) * 0.0
        init = jax.tree.map(lambda z: z + zero.astype(z.dtype), dw_carry(lo, hi))
        (_, dw), _ = _over_chunks(
            body, vary_like(init, p.x), tokens, static.chunk_size, static.strided
        )
        return dw

    tokens = _token_inputs(p, data, static)
    carry, out = _over_chunks(body, carry, tokens, static.chunk_size, static.strided)
    kept = ("loss", "rows", "lse")
    grads = {**carry, **{k: v for k, v in out.items() if k not in kept}}
    if keep_rows or keep_lse:  # (split: need["w"])
        if keep_rows:
            values, cts = out["rows"]
            rows = (p.probs, data.target, values, cts)

            def block_math(s):
                return rows, _head_block_d_logits(s, p)
        else:

            def block_math(s):
                return _hard_target_block_d_logits(s, p, data, out["lse"])

        def later_ranges(float32_blocks: bool):
            blocks = static._replace(float32_blocks=float32_blocks)
            return lambda: _range_gradients(blocks, p, data, block_math, ranges[1:])

        if float32_blocks:
            later = on_cpu(later_ranges(True), later_ranges(False))
        else:
            later = later_ranges(False)()
        grads["w"] = (grads["w"][1], *later)
    elif split and need["w"]:
        done = (grads["w"][1],)
        for lo, hi in ranges[1:]:
            done = (*done, dw_pass(lo, hi, done))
        grads["w"] = done
    # Kept in the inputs' dtypes: for 16-bit inputs the float32 dw is freed
    # before the backward pass instead of living next to the 16-bit result.
    grads = {k: jax.tree.map(lambda g, k=k: g.astype(getattr(p, k).dtype), g)
             for k, g in grads.items()}  # fmt: skip
    return out["loss"], grads


class _VocabBlock(NamedTuple):
    """A block of every position's classes, differentiated alone.

    The classes ``start + k · stride`` for ``k < size``: a contiguous run
    (``stride`` 1) or every ``stride``-th class. Stands in for
    ``ClassShards`` in ``cross_entropy_stats``' tangent map: targets are
    localised to the block and the tangent sums stay the block's own share,
    whose transpose is the gradient w.r.t. the block's logits.
    """

    start: jax.Array  # global index of the block's first class
    stride: int = 1

    @property
    def sharded(self) -> bool:
        return True

    def localise(self, target: jax.Array, local: int):
        gap = target - self.start
        local_target = gap // self.stride
        here = (gap >= 0) & (gap % self.stride == 0) & (local_target < local)
        return jnp.where(here, local_target, 0), here

    def sum(self, x):
        return x


def _vocab_outer_eligible(static: _Static, need: dict) -> bool:
    """Whether the vocabulary-outer gradients apply.

    Integer targets (or a head's tile math), gradients w.r.t. ``x``, ``w``
    and ``bias`` only.
    """
    others = (name for name in _Params._fields if name not in ("x", "w", "bias"))
    return (
        (static.head is not None or not static.soft)
        and not any(need[name] for name in others)
        and (need["x"] or need["w"] or need["bias"])
    )


class _Block(NamedTuple):
    """One block of classes inside the vocabulary-outer pass."""

    take: Callable  # block of an array whose last axis is the (local) classes
    where: _VocabBlock  # the block's classes, for the tile math
    fresh: jax.Array | None  # (1, block): columns this block owns (None: all)


def _vocab_outer_gradients(static: _Static, p: _Params, data: _Data, need: dict):
    """``_loss_and_gradients`` with ``dw`` accumulated one class block at a time.

    First the per-token losses and logsumexps, token chunk by token chunk
    (whole rows of ``static.row_chunk`` tokens). Then (``_block_gradients``)
    each block's logits are recomputed and transposed through
    ``cross_entropy_stats``' tangent map with the per-token cotangents of its
    statistics.
    """
    forward = static._replace(chunk_size=static.row_chunk)
    loss, lse = _per_token_values(forward, p, data)
    rows, d_logits = _hard_target_block_d_logits(static, p, data, lse)
    return loss, _block_gradients(static, p, data, need, rows, d_logits)


def _hard_target_block_d_logits(static: _Static, p: _Params, data: _Data, lse):
    """Integer targets' ``(rows, d_logits)`` for ``_block_gradients``.

    From each token's logsumexp ``lse`` over the whole rows: the per-token
    cotangents of ``cross_entropy_stats``' statistics, through whose tangent
    map each block's logits transpose into their gradient.
    """
    acc = _accumulation_dtype(p)
    num_tokens = p.x.shape[0]
    vocab = p.w.shape[1]
    shards = static.shards
    weight, label_smoothing, z_loss, soft_cap = _small(p)[:4]
    terms, cts = hard_target_row_cotangents(
        lse, data.target, weight, label_smoothing, z_loss, soft_cap, data.mask,
        num_classes=shards.num_classes(vocab), ignore_index=static.ignore_index,
        smoothing=static.smoothing, with_z_loss=static.with_z_loss, shards=shards,
    )  # fmt: skip
    total_weight = jnp.zeros((num_tokens,), acc)
    if static.smoothing:
        shape = jax.ShapeDtypeStruct((1, vocab), acc)
        total = _total_weight(weight, data.mask, shape, 1, shards)
        total_weight = jnp.broadcast_to(jnp.reshape(total, (-1,)), (num_tokens,))
    rows = (terms.safe_target, terms.valid, lse, cts, total_weight)
    return rows, _hard_target_d_logits(static, p)


def _hard_target_d_logits(static: _Static, p: _Params):
    """Integer targets' ``d_logits(logits, rows_c, mask_c, block)``.

    A block's gradient from its logits and its tokens' rows (as
    ``_hard_target_block_d_logits`` forms them, cotangents among them).
    """
    weight, _, _, soft_cap = _small(p)[:4]
    tangent_map = functools.partial(_tangent_map, axis=1, smoothing=static.smoothing)

    def d_logits(logits, rows_c, mask_c, block: _Block):
        target_c, live_c, lse_c, cts_c, total_c = rows_c
        weight_j = None
        if weight is not None and static.smoothing:
            weight_j = block.take(weight)
        tangents = functools.partial(
            tangent_map, logits, target_c, live_c, weight_j, mask_c, soft_cap,
            lse_c, t_weight=None, t_cap=None, shards=block.where,
            total_weight=total_c,
        )  # fmt: skip
        outs, transpose = jax.vjp(tangents, jnp.zeros_like(logits))
        # Each cotangent varies like its output: without smoothing the
        # smoothing sum's tangent is zeros that vary like the tokens only.
        return transpose(jax.tree.map(vary_like, cts_c, outs))[0]

    return d_logits


class _Tapped:
    """Class-axis reductions of a head's tile math, kept and tapped.

    Stands in for ``ClassShards`` over whole rows: each sum, maximum and pick
    is the real one (over the class shards, if any); its results are kept in
    call order (``values``), and a zero ``tap`` is added to each floating one
    so that a vjp w.r.t. the taps gives the cotangent of every reduction.
    """

    sharded = True

    def __init__(self, shards: ClassShards, vocab: int, taps=None):
        self.shards, self.vocab, self.taps, self.values = shards, vocab, taps, []

    def num_classes(self, local: int) -> int:
        return self.shards.num_classes(self.vocab)

    def localise(self, target, local):
        if self.shards.sharded:
            return self.shards.localise(target, local)
        return target, (target >= 0) & (target < local)

    def _keep(self, value):
        def keep(leaf):
            tap = None if self.taps is None else self.taps[len(self.values)]
            self.values.append(leaf)
            return leaf if tap is None else leaf + tap

        return jax.tree.map(keep, value)

    def sum(self, x):
        return self._keep(self.shards.sum(x))

    def max(self, x):
        return self._keep(self.shards.max(x))

    def pick(self, values, here):
        return self.sum(jnp.where(here, values, jnp.zeros_like(values)))


class _BlockShares:
    """The tapped reductions again, for one block of the classes.

    Each reduction returns its kept whole-row value (a constant) and keeps
    the block's own share: ``Σ_k <ct_k, share_k>`` then has the gradient of
    the whole rows' loss w.r.t. the block's logits (every path from a logit
    to the loss goes through some reduction).
    """

    sharded = True

    def __init__(self, values, block: _VocabBlock, num_classes: int):
        self.values, self.shares = list(values), []
        self.block, self.global_classes = block, num_classes

    def num_classes(self, local: int) -> int:
        return self.global_classes

    def localise(self, target, local):
        return self.block.localise(target, local)

    def _whole(self, local):
        def replace(share):
            self.shares.append(share)
            # Closed over: a constant for the block's gradient, still a
            # function of the inputs for higher derivatives.
            whole = self.values[len(self.shares) - 1]
            return whole.reshape(share.shape).astype(share.dtype)

        return jax.tree.map(replace, local)

    def sum(self, x):
        return self._whole(x)

    def max(self, x):
        return self._whole(x)

    def pick(self, values, here):
        return self.sum(jnp.where(here, values, jnp.zeros_like(values)))


def _floating(a) -> bool:
    return jnp.issubdtype(a.dtype, jnp.floating)


def _tapped_rows(static: _Static, p: _Params, data: _Data, outputs: int):
    """A head's per-token outputs over whole rows, with its tapped reductions.

    Token chunks of ``static.row_chunk`` whole rows. Returns the tile math's
    two per-token outputs, the class-axis reductions it made (``_Tapped``,
    tokens first) and, for each of the first ``outputs`` outputs, the
    cotangents of those reductions when that output's own cotangent is 1
    (None for a reduction that is not floating).
    """
    vocab = p.w.shape[1]
    small = _small(p)
    class_mask = _class_mask(data, static)

    def body(carry, tokens):
        x_c, probs_c, target_c, mask_c = tokens
        mask_c = class_mask if mask_c is None else mask_c
        logits = _unsaved_tile_logits(x_c, p.w, p.bias)

        def tile(taps):
            tapped = _Tapped(static.shards, vocab, taps)
            out = _tile_loss(
                logits, probs_c, target_c, mask_c, small,
                static._replace(shards=tapped),
            )  # fmt: skip
            return out, tapped.values

        _, values = tile(None)
        taps = [jnp.zeros_like(v) if _floating(v) else None for v in values]
        out, vjp, values = jax.vjp(tile, taps, has_aux=True)
        cts = []
        for k in range(outputs):
            unit = tuple(
                vary_like(jnp.ones_like(o) if i == k else jnp.zeros_like(o), o)
                for i, o in enumerate(out)
            )
            cts.append(tuple(vjp(unit)[0]))
        return carry, (out, tuple(values), tuple(cts))

    _, (out, values, cts) = _over_chunks(
        body, None, _token_inputs(p, data, static), static.row_chunk, static.strided
    )
    return out, values, cts


def _head_vocab_outer_gradients(static, p: _Params, data: _Data, need: dict):
    """The vocabulary-outer gradients for a head's "mean"/"sum" (any head).

    The forward pass (whole rows) keeps the class-axis reductions of the
    head's tile math and their cotangents (``_Tapped``); each block's tile
    math then forms its shares of the same reductions (``_BlockShares``),
    whose products with those cotangents have the block's gradient.
    """
    (loss, _), values, (cts,) = _tapped_rows(static, p, data, 1)
    rows = (p.probs, data.target, values, cts)
    d_logits = _head_block_d_logits(static, p)
    return loss, _block_gradients(static, p, data, need, rows, d_logits)


def _head_block_d_logits(static: _Static, p: _Params):
    """A head's ``d_logits`` for ``_block_gradients``, from kept reductions.

    Its per-token rows are ``(probs, target, values, cts)``: the head's
    token input, the targets, the whole rows' tapped reductions and their
    cotangents (``_Tapped``).
    """
    small = _small(p)
    num_classes = static.shards.num_classes(p.w.shape[1])
    sliced = _class_sliced(static)

    def d_logits(logits, rows_c, mask_c, block: _Block):
        probs_c, target_c, values_c, cts_c = rows_c
        small_j = tuple(
            block.take(v) if v is not None and name in sliced else v
            for name, v in zip(_SMALL, small, strict=True)
        )

        def objective(z):
            shares = _BlockShares(values_c, block.where, num_classes)
            _tile_loss(
                z, probs_c, target_c, mask_c, small_j,
                static._replace(shards=shares),
            )  # fmt: skip
            total = jnp.zeros((), logits.dtype)
            for share, ct in zip(shares.shares, cts_c, strict=True):
                if ct is not None:
                    total = total + jnp.sum(share * ct.reshape(share.shape))
            return total

        return jax.grad(objective)(logits)

    return d_logits


def _range_gradients(static, p: _Params, data: _Data, block_math, ranges):
    """``dw``'s later column ranges of the token-outer gradients.

    The first pass over the chunks (whole rows) kept, per token, what the
    tile math's gradient needs beyond a block's own logits (a head's tapped
    reductions and their cotangents, integer targets' logsumexp);
    ``block_math(static)`` gives the ``(rows, d_logits)`` of
    ``_block_gradients`` from it. Each range's gradient is then formed from
    that range's logits alone, recomputed class block by class block,
    instead of every chunk's whole rows again: half the logits of a second
    pass (for the distillation head, the student's and the teacher's).
    """
    need = {name: name == "w" for name in _Params._fields}
    blocked = static._replace(dw_passes=1)
    rows, d_logits = block_math(blocked)
    grads = _block_gradients(blocked, p, data, need, rows, d_logits, ranges=ranges)
    return grads["w"] if isinstance(grads["w"], tuple) else (grads["w"],)


def _block_gradients(
    static, p: _Params, data: _Data, need: dict, rows, d_logits, ranges=None
):
    """dx, dw and dbias from the class blocks, given each tile's gradient.

    For each block of ``static.block_classes`` classes, a pass over token
    chunks of ``static.block_tokens``: the block's logits are recomputed,
    ``d_logits(logits, rows_c, mask_c, block)`` gives their gradient (``rows``
    are per-token inputs, tokens first), and the block's ``dw`` is
    accumulated in float32 and written once, rounded to ``w``'s dtype; ``dx``
    (float32) and ``dbias`` gather every block's share (``ranges``: only
    these column ranges of ``dw``, one part each). No float32 array of
    ``dw``'s size exists, nor any tile wider than a block.
    """
    acc = _accumulation_dtype(p)
    num_tokens, depth = p.x.shape
    vocab = p.w.shape[1]
    shards = static.shards
    row_mask = data.mask if static.row_mask else None
    position = jnp.arange(num_tokens, dtype=jnp.int32)
    live = _live_tokens(data.target, static)
    rows = vary_like((p.x, position, live, rows), p.x)
    offset = 0 if not shards.sharded else shards.index() * vocab
    chunk = static.block_tokens
    num_full = num_tokens // chunk

    def add_rows(dx, part, first):
        """``dx`` plus ``part`` at a chunk's rows (``first``: its first row).

        A full strided chunk holds rows ``first + k · num_full``; otherwise the
        rows are contiguous. Added in place, so that no second (N, D) array
        exists.
        """
        if static.strided and part.shape[0] == chunk and num_full > 1:
            whole = num_full * chunk == num_tokens
            view = (dx if whole else dx[: num_full * chunk]).reshape(
                chunk, num_full, depth
            )
            old = lax.dynamic_index_in_dim(view, first, axis=1)
            view = lax.dynamic_update_index_in_dim(view, old + part[:, None], first, 1)
            view = view.reshape(num_full * chunk, depth)
            return view if whole else jnp.concatenate([view, dx[num_full * chunk :]])
        old = lax.dynamic_slice_in_dim(dx, first, part.shape[0])
        return lax.dynamic_update_slice_in_dim(dx, old + part, first, 0)

    def block_pass(carry, lo: int, hi: int):
        """One column range's ``dw`` (float32 per block), and dx, dbias.

        Blocks are contiguous runs of classes; when XLA's partitioner may
        split the classes over devices and the blocks divide them, block
        ``j`` of ``k`` holds every ``k``-th class from ``j`` instead, so that
        each device holds its share of every block (a contiguous block would
        make XLA all-gather ``w``).
        """
        block = min(static.block_classes, hi - lo)
        num_blocks = -(-(hi - lo) // block)
        strided = (
            static.strided and num_blocks > 1 and (lo, hi) == (0, vocab)
            and vocab % block == 0
        )  # fmt: skip
        # 16-bit dw_range as its bits until the blocks are all written
        # (_as_bits).
        dw_range = None
        if need["w"]:
            dw_range = _as_bits(jnp.zeros((depth, hi - lo), p.w.dtype))

        def take(a, j, start):
            """Block ``j`` of the columns ``[lo, hi)`` of ``a`` (classes last)."""
            if strided:
                a = lax.slice_in_dim(a, lo, hi, axis=a.ndim - 1)
                a = a.reshape(*a.shape[:-1], block, num_blocks)
                return lax.dynamic_index_in_dim(a, j, a.ndim - 1, keepdims=False)
            return _class_block(a, start, block)

        def put(a, new, j, start, fresh, offset=0):
            """``a`` (classes ``[lo, hi)`` last) with block ``j`` set to ``new``."""
            if strided:
                shape = a.shape
                a = a.reshape(*shape[:-1], block, num_blocks)
                index = (0,) * (a.ndim - 1) + (j,)
                return lax.dynamic_update_slice(a, new[..., None], index).reshape(shape)
            old = lax.dynamic_slice_in_dim(a, start - offset, block, axis=a.ndim - 1)
            new = jnp.where(fresh.reshape(fresh.shape[-1:]), new, old)
            return lax.dynamic_update_slice_in_dim(a, new, start - offset, a.ndim - 1)

        def over_blocks(j, state):
            dw_range, dx, dbias = state
            if strided:
                start, fresh = lo + j, None
                where_block = _VocabBlock(offset + start, num_blocks)
            else:
                # The last block is shifted left to stay in bounds; the columns
                # it shares with the previous block are zeroed and kept as they
                # were.
                start = lo + jnp.minimum(j * block, hi - lo - block)
                column = start + lax.broadcasted_iota(jnp.int32, (1, block), 1)
                fresh = column >= lo + j * block
                where_block = _VocabBlock(offset + start)
            info = _Block(functools.partial(take, j=j, start=start), where_block, fresh)
            w_j = take(p.w, j, start)

            # float32 copies: the block's once, each chunk's x_c and dz
            # (rounded to w's dtype first, as the 16-bit matmuls take it).
            def for_dot(a):
                return a.astype(acc) if static.float32_blocks else a

            w_dot = for_dot(w_j)
            bias_j = None if p.bias is None else take(p.bias, j, start)
            class_mask = None
            if data.mask is not None and not static.row_mask:
                class_mask = take(data.mask, j, start)

            def over_tokens(state, tokens):
                dw_j, dx, dbias_j = state
                (x_c, position_c, live_c, rows_c), mask_c = tokens
                if mask_c is None:
                    mask_c = class_mask
                x_dot = for_dot(x_c)
                logits = _tile_logits(x_dot, w_dot, bias_j)
                grad = d_logits(logits, rows_c, mask_c, info)
                if fresh is not None:
                    grad = jnp.where(fresh, grad, 0.0)
                d_in = for_dot(grad.astype(p.w.dtype))
                if need["w"]:
                    dw_j = dw_j + lax.dot_general(
                        _zeroed_if_ignored(x_dot, live_c), d_in,
                        (((0,), (0,)), ((), ())), preferred_element_type=acc,
                    )  # fmt: skip
                if need["x"]:
                    part = lax.dot_general(
                        d_in, w_dot, (((1,), (1,)), ((), ())),
                        preferred_element_type=acc,
                    )  # fmt: skip
                    # An empty chunk (no tokens at all) adds nothing.
                    first = position_c[0] if position_c.shape[0] else 0
                    dx = add_rows(dx, part, first)
                if need["bias"]:
                    dbias_j = dbias_j + jnp.sum(grad, axis=0)
                return (dw_j, dx, dbias_j), None

            init = (
                jnp.zeros((depth, block), acc) if need["w"] else None,
                dx,
                jnp.zeros((block,), acc) if need["bias"] else None,
            )
            mask_rows = None if row_mask is None else take(row_mask, j, start)
            (dw_j, dx, dbias_j), _ = _over_chunks(
                over_tokens,
                vary_like(vary_like(init, p.x), p.w),
                (rows, mask_rows),
                static.block_tokens,
                static.strided,
            )
            if need["w"]:
                dw_j = _as_bits(dw_j.astype(p.w.dtype))
                dw_range = put(dw_range, dw_j, j, start, fresh, lo)
            if need["bias"]:
                dbias = put(dbias, dbias_j, j, start, fresh)
            return dw_range, dx, dbias

        dx, dbias = carry
        # Varying like the tokens and like w's class shards.
        state = vary_like(vary_like((dw_range, dx, dbias), p.x), p.w)
        dw_range, dx, dbias = lax.fori_loop(0, num_blocks, over_blocks, state)
        if need["w"]:
            dw_range = _from_bits(dw_range, p.w.dtype)
        return (dx, dbias), dw_range

    carry = (
        jnp.zeros((num_tokens, depth), acc) if need["x"] else None,
        jnp.zeros((vocab,), acc) if need["bias"] else None,
    )
    if ranges is None:
        ranges = _dw_column_ranges(vocab, static.dw_passes if need["w"] else 1)
    parts = []
    for lo, hi in ranges:
        carry, dw_range = block_pass(carry, lo, hi)
        parts.append(dw_range)
    dx, dbias = carry
    grads = {}
    if need["x"]:
        grads["x"] = shards.sum(dx).astype(p.x.dtype)
    if need["w"]:
        grads["w"] = parts[0] if len(parts) == 1 else tuple(parts)
    if need["bias"]:
        grads["bias"] = dbias.astype(p.bias.dtype)
    return grads


def _is_zero(tangent) -> bool:
    return tangent is None or isinstance(tangent, SymbolicZero)


def _needed(tangents: _Params) -> dict:
    return {
        name: not _is_zero(t) for name, t in zip(_Params._fields, tangents, strict=True)
    }


def _contract(grads: dict, tangents: _Params, static: _Static, dtype):
    """``Σ_i <g_i, t_i>``, the class-sliced terms summed over class shards.

    A gradient given as a tuple is the gradient of consecutive column ranges
    (see ``_loss_and_gradients``): each is contracted with its columns (one
    concatenated gradient would be upcast to float32 whole).
    """
    local, sliced = [], []
    for name, t in zip(_Params._fields, tangents, strict=True):
        if _is_zero(t):
            continue
        g = grads[name]
        if isinstance(g, tuple):
            ranges = _dw_column_ranges(t.shape[-1], len(g))
            term = sum(
                jnp.sum(part.astype(dtype) * t[..., lo:hi].astype(dtype))
                for part, (lo, hi) in zip(g, ranges, strict=True)
            )
        else:
            term = jnp.sum(g.astype(dtype) * t.astype(dtype))
        (sliced if name in _class_sliced(static) else local).append(term)
    total = jnp.zeros((), dtype)
    if sliced:
        total = total + static.shards.sum(functools.reduce(jnp.add, sliced))
    for term in local:
        total = total + term
    return total


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _summed_loss(static: _Static, p: _Params, data: _Data):
    """This device's ``Σ_n loss_n`` (accumulation dtype)."""
    loss, _ = _per_token_values(static, p, data)
    return jnp.sum(loss)


@functools.partial(_summed_loss.defjvp, symbolic_zeros=True)
def _summed_loss_jvp(static, primals, tangents):
    p, data = primals
    tp = _poisoned_tangents(tangents[0], data)
    need = _needed(tp)

    def value_and_tangent(gradients, static):
        loss, grads = _opaque(
            functools.partial(gradients, static, need=need), opaque_under_jvp=False
        )(p, data)
        total = jnp.sum(loss)
        return total, vary_like(_contract(grads, tp, static, total.dtype), total)

    token_outer = functools.partial(value_and_tangent, _loss_and_gradients, static)
    if not _vocab_outer_eligible(static, need) or static.vocab_outer is False:
        return token_outer()
    # dw's float32 accumulator is one block: no second pass for 16-bit w.
    blocked = static._replace(dw_passes=1)
    gradients = _vocab_outer_gradients
    if static.head is not None:
        gradients = _head_vocab_outer_gradients
    vocab_outer = functools.partial(value_and_tangent, gradients, blocked)
    return vocab_outer() if static.vocab_outer else on_cpu(token_outer, vocab_outer)


# --- per token ("none" or return_lse): tangents through recomputed chunks ------


@functools.partial(jax.custom_jvp, nondiff_argnums=(0,))
def _per_token_loss(static: _Static, p: _Params, data: _Data):
    """Per-token ``(loss, lse)`` (accumulation dtype; lse 0 unless an output)."""
    loss, lse = _per_token_values(static, p, data)
    return loss, _lse_output(lse, static)


def _lse_output(lse, static: _Static):
    """The per-token lse output: zeros unless it is returned (``per_token_lse``)."""
    if static.head is None and not static.per_token_lse:
        return jnp.zeros_like(lse)
    return lse


def _per_token_chunk_tangents(static: _Static, p: _Params, data: _Data, tp: _Params):
    """Per-token outputs and their tangents, token chunk by token chunk.

    Each chunk's tangents are the JVP of its tile math; reverse mode
    (their transpose) recomputes each chunk's logits and accumulates ``dw``
    over the chunks in float32 (a whole float32 ``dw``).
    """
    acc = _accumulation_dtype(p)
    class_mask = _class_mask(data, static)

    def upcast(t):
        # Tangents shared by all chunks, cast once to the accumulation dtype
        # and to the tokens' varying axes: the transposed loop then
        # accumulates their cotangents locally in float32 (summed once).
        return None if _is_zero(t) else vary_like(t.astype(acc), p.x)

    t_w, t_bias = upcast(tp.w), upcast(tp.bias)
    small = vary_like(_small(p), p.x)
    t_small = tuple(
        upcast(t) if not _is_zero(t) else None if v is None else jnp.zeros_like(v)
        for v, t in zip(small, _small(tp), strict=True)
    )
    t_x = None if _is_zero(tp.x) else tp.x
    t_probs = None if _is_zero(tp.probs) else tp.probs

    def tile(x_c, probs_c, target_c, mask_c, t_x_c, t_probs_c):
        logits = _unsaved_tile_logits(x_c, p.w, p.bias)
        t_logits = jnp.zeros_like(logits)
        if t_x_c is not None:
            t_logits = t_logits + _tile_logits(t_x_c, p.w, None)
        if t_w is not None:
            t_logits = t_logits + _tile_logits(x_c.astype(acc), t_w, None)
        if t_bias is not None:
            t_logits = t_logits + t_bias[None, :]
        if probs_c is not None and t_probs_c is None:
            t_probs_c = jnp.zeros_like(probs_c)
        # In the options' own dtypes (a 16-bit teacher's w), cast here: their
        # cotangents still accumulate over the chunks in float32.
        t_small_c = tuple(
            t if v is None else t.astype(v.dtype)
            for v, t in zip(small, t_small, strict=True)
        )
        return jax.jvp(
            lambda z, q, s: _tile_loss(z, q, target_c, mask_c, s, static),
            (logits, probs_c, small),
            (t_logits, t_probs_c, t_small_c),
        )

    # Reverse mode recomputes each chunk's logits instead of saving them.
    tile = jax.checkpoint(tile, prevent_cse=False)

    def body(carry, tokens):
        tokens = _padding_zeroed(tokens, static)
        x_c, probs_c, target_c, mask_c, t_x_c, t_probs_c = tokens
        mask_c = class_mask if mask_c is None else mask_c
        return carry, tile(x_c, probs_c, target_c, mask_c, t_x_c, t_probs_c)

    tokens = (*_token_inputs(p, data, static), t_x, t_probs)
    _, ((loss, lse), (t_loss, t_lse)) = _over_chunks(
        body, None, tokens, static.chunk_size, static.strided
    )
    return (loss, _lse_output(lse, static)), (t_loss, _lse_output(t_lse, static))


def _per_token_blocks_eligible(static: _Static, p: _Params, need: dict) -> bool:
    """Whether per-token tangents can go class block by class block.

    A head's tile math or the cross-entropy of integer targets, tangents of
    ``x``, ``w`` and ``bias`` only, whole classes on one device, tokens not
    split by XLA.
    """
    others = (name for name in _Params._fields if name not in ("x", "w", "bias"))
    return (
        (static.head is not None or not static.soft)
        and not static.shards.sharded
        and not static.strided
        and not any(need[name] for name in others)
    )


def _as_bits(a: jax.Array) -> jax.Array:
    """A 16-bit float array as its unsigned-integer bits (others unchanged).

    XLA's CPU backend updates a slice of a 16-bit float array in float32: it
    converts the whole array to float32 and back, a copy per update instead
    of a write in place. Writing 16-bit ``dw`` class block by class block
    that way took 5.5 s for 40 blocks of (2304, 3200) bfloat16 into (2304,
    128000), against 0.4 s into the integer bits, carried as such through
    the loop (a bitcast inside it is fused into a pass over the whole
    array too).
    """
    if jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits == 16:
        return lax.bitcast_convert_type(a, jnp.uint16)
    return a


def _from_bits(a: jax.Array, dtype) -> jax.Array:
    """The inverse of ``_as_bits`` for an array of ``dtype``."""
    return a if a.dtype == dtype else lax.bitcast_convert_type(a, dtype)


def _class_block(a: jax.Array, start: jax.Array, block: int) -> jax.Array:
    """``a[..., start:start + block]`` with a start that varies over a loop.

    XLA's CPU backend slices 16-bit floats in float32: it converts ``a`` (a
    student's or teacher's ``w``) to float32 and, that being the same on
    every trip, hoists the conversion out of the loop over blocks, a float32
    copy of the whole of ``a`` (512 of the 696 MiB of bfloat16
    ``linear_log_probs``' value_and_grad at (2048, 1024, 131072); of
    ``linear_distillation_loss``' with ``reduction="none"``, 808 MiB against
    296; of ``linear_argmax``, 540 against 28.5). Behind a barrier that
    depends on the start the conversion stays in the loop, fused into the
    slice. TPU and GPU programs are unchanged by it.
    """
    if jnp.issubdtype(a.dtype, jnp.floating) and jnp.finfo(a.dtype).bits == 16:
        a = lax.optimization_barrier((a, start))[0]
    return lax.dynamic_slice_in_dim(a, start, block, axis=a.ndim - 1)


# How a class block's tile gives dx: "tangent" (the chips'), for a head with
# one output through its primal matmul (_primal_dx_tangent), for two through
# the tangent's float32 dx w_j, whose transpose in reverse mode is one matmul
# of the block's summed cotangent; "rounded" (a CPU with fast 16-bit
# matmuls), the same with that dx w_j through rounded_transpose_dot, whose
# transpose rounds the summed cotangent to w's dtype: one matmul of 16-bit
# operands; "transposed" (a CPU with slow 16-bit matmuls), every head's
# through the float32 dx w_j, the tile's logits recomputed from float32
# copies of x_c and w_j.
_DxBy = Literal["tangent", "transposed", "rounded"]


@functools.cache
def _cpu_bfloat16_matmuls() -> Literal["amx", "avx512", "slow"]:
    """How fast XLA multiplies 16-bit operands on this host's CPU.

    Read from Linux's cpuinfo: ``"amx"`` with AMX (``amx_bf16``),
    ``"avx512"`` on an AMD CPU with ``avx512_bf16``, else ``"slow"``. With
    AMX, XLA runs a matmul of 16-bit operands with float32 results 2-4x
    faster than a float32 one; on a 2-core AMD EPYC 1.6-1.9x (270-330
    against 170-190 GFLOP/s at (1024, 512) x (512, 8192) and (1024, 1024) x
    (1024, 8192)). On an Intel Xeon with ``avx512_bf16`` alone they were
    slower (151 against 230 GFLOP/s at (1024, 512) x (512, 8192); bfloat16
    ``linear_log_probs`` took 1.26x its float32 time at (2048, 512,
    65536)). Only speed depends on it (unknown: ``"slow"``).
    """
    flags: list[str] = []
    vendor = ""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as cpuinfo:
            for line in cpuinfo:
                key, _, value = line.partition(":")
                if key.strip() == "flags":
                    flags = value.split()
                elif key.strip() == "vendor_id":
                    vendor = value.strip()
                if flags and vendor:
                    break
    except OSError:
        return "slow"
    if "amx_bf16" in flags:
        return "amx"
    if vendor == "AuthenticAMD" and "avx512_bf16" in flags:
        return "avx512"
    return "slow"


def _cpu_has_fast_bfloat16_matmuls() -> bool:
    """Whether 16-bit matmuls beat float32 copies of their operands here.

    Where they do not (``_cpu_bfloat16_matmuls``: ``"slow"``), a matmul of
    float32 copies of a block's operands beats XLA's 16-bit one, so the
    class blocks recompute their logits from those: 0.87x the time
    (bfloat16 ``linear_log_probs``, (2048, 512, 65536), alone or with the
    entropy, on the Xeon). On the EPYC the same copies cost time: bfloat16
    value_and_grad at (2048, 1024, 131072) with them and with the 16-bit
    matmuls took, against the naive program's, ``linear_cross_entropy``
    1.38 and 0.89, ``linear_log_probs`` 1.20 and 0.92,
    ``linear_distillation_loss`` 0.97 and 0.70 (1.29 and 0.85, 1.15 and
    0.91, 0.84 and 0.66 at (2048, 512, 65536)).
    """
    return _cpu_bfloat16_matmuls() != "slow"


def _cpu_dx_by() -> _DxBy:
    """How a 16-bit head's class blocks give dx on this host's CPU.

    With fast 16-bit matmuls (AMX, or an AMD CPU with ``avx512_bf16``),
    ``"rounded"``: one matmul of 16-bit operands per block however many
    outputs. At (2048, 512, 65536) bfloat16 on the EPYC, value_and_grad of
    ``linear_log_probs`` with the entropy took 0.885x the time of the
    chips' ``"tangent"`` (a float32 transposed matmul), 1.05x
    ``linear_log_probs`` alone (was 1.18x); alone unchanged (0.99x). With
    AMX it replaces two primal 16-bit matmuls of the same form (not
    measured: no such CPU here). With slow 16-bit matmuls, the transposed
    float32 one, one for every output: with the entropy 0.71x the time of
    two primal matmuls on the Xeon, alone 0.88x of one.
    """
    return {"amx": "rounded", "avx512": "rounded", "slow": "transposed"}[
        _cpu_bfloat16_matmuls()
    ]


def _primal_dx_tangent(shares, logits, cts, fresh, w_j, t_x_c, t_logits):
    """An output's tangent over a class block, ``dx`` through a primal matmul.

    With ``c = d out / d z`` over the block (the gradient of ``Σ_k <ct_k,
    share_k>``), the tangent is ``Σ_v c_v (dx · w_v) + Σ_v c_v dz_v`` (``dz``
    from ``dw`` and ``dbias`` only), and ``Σ_v c_v (dx · w_v) = dx · a`` with
    ``a = c w_j^T``: a function of the primals, not of the tangents. Its
    matmul is then ours to write, on ``c`` rounded to ``w``'s dtype as
    ``linear_cross_entropy`` does; reverse mode's ``dx`` is the per-token
    cotangent times ``a``, and for 16-bit ``w`` the matmul has 16-bit
    operands (1.6-4x faster than float32 on the CPUs that
    ``_cpu_has_fast_bfloat16_matmuls`` names) instead of the transpose of
    the tangent's float32 ``dx w_j``. A head with one output takes it (one
    matmul either way), except on a CPU with slow 16-bit matmuls
    (``_cpu_dx_by``).
    """

    def weighted(z):
        total = jnp.zeros((), z.dtype)
        for share, ct in zip(shares(z), cts, strict=True):
            if ct is not None:
                total = total + jnp.sum(share * ct.reshape(share.shape))
        return total

    return _gradient_dx_tangent(
        jax.grad(weighted)(logits), fresh, w_j, t_x_c, t_logits, logits.dtype
    )


def _gradient_dx_tangent(c, fresh, w_j, t_x_c, t_logits, dtype):
    """``_primal_dx_tangent`` given ``c = d out / d z`` over the block."""
    if fresh is not None:
        c = jnp.where(fresh, c, 0.0)
    a = _opaque(
        lambda c, w_j: lax.dot_general(
            c.astype(w_j.dtype),
            w_j,
            (((1,), (1,)), ((), ())),
            preferred_element_type=dtype,
        )
    )(c, w_j)
    tangent = jnp.sum(t_x_c * a, axis=1)
    return tangent if t_logits is None else tangent + jnp.sum(c * t_logits, axis=1)


def _per_token_block_tangents(
    static: _Static, p: _Params, data: _Data, tp: _Params, need: dict
):
    """A head's per-token outputs and tangents, in the vocabulary-outer order.

    One pass over whole rows (``_tapped_rows``) gives the outputs, the tile
    math's class-axis reductions and, per output ``o``, the cotangents
    ``ct_ok`` of those reductions. The tangent of output ``o`` at a token is
    then ``Σ_blocks Σ_k ct_ok · d share_k``, where ``share_k`` is a class
    block's share of reduction ``k`` (``_BlockShares``), its tangent taken
    through the block's recomputed logits with ``dz = dx w_j + x dw_j +
    dbias_j``. Written as a loop over blocks around a loop over token
    chunks, each tile rematerialised, its transpose (reverse mode) is the
    vocabulary-outer gradient: each block's ``dw`` accumulated over all
    tokens in float32 and written once (the transpose of slicing the block's
    tangent out of ``dw``'s, an update of the block in place, which XLA
    makes of adding it to zeros elsewhere), ``dx`` accumulated in float32
    over the blocks. No float32 array of ``dw``'s size, no tile wider than a
    block; four matmuls, as the token chunks' order takes. When the blocks
    do not divide V, the last one is shifted left to stay in bounds, its
    columns shared with the previous block without a tangent.
    """
    acc = _accumulation_dtype(p)
    num_tokens = p.x.shape[0]
    vocab = p.w.shape[1]
    block, num_blocks, block_start, fresh_columns = _column_blocks(
        vocab, static.block_classes
    )
    small = _small(p)
    sliced = _class_sliced(static)
    class_mask = _class_mask(data, static)
    # A block of the whole vocabulary takes at most the heads' token chunk
    # (sized for their tile math): no (N, V) tile at small shapes.
    chunk = static.block_tokens
    if block >= vocab:
        chunk = min(chunk, static.chunk_size)
    # A head whose second output is identically zero (log-probabilities
    # without the entropy, the divergences) differentiates its first only.
    outputs = 2 if getattr(static.head, "with_entropy", False) else 1
    # Whole rows of 32 MiB of float32 logits on the CPU (the user's chunk
    # when given): at (2048, 512, 65536) float32 its matmuls of 128 rows ran
    # at 237 GFLOP/s against 190 with the token chunk's 64, value_and_grad
    # of linear_log_probs in 0.95x the time (temporaries 104 -> 128 MiB).
    # Rows of all the tokens (small shapes) take the token chunk instead: no
    # (N, V) tile.
    cpu_rows = static.row_chunk
    if cpu_rows >= num_tokens:
        cpu_rows = min(cpu_rows, static.chunk_size)
    chip_rows = static.chip_row_chunk or cpu_rows

    cross_entropy = static.head is None
    if cross_entropy:
        # The lse when it is an output; the loss alone otherwise.
        outputs = 2 if static.per_token_lse else 1

    def tapped(rows: int):
        if not cross_entropy:
            return lambda: _tapped_rows(
                static._replace(row_chunk=rows), p, data, outputs
            )

        def rows_of_the_cross_entropy():
            """``out``, the rows of ``d_logits`` and each output's cotangents."""
            forward = static._replace(chunk_size=rows)
            # Never saved by a user's checkpoint policy (_opaque), as the
            # heads' whole rows.
            loss, lse = _per_token_values(forward, p, data, _unsaved_tile_logits)
            ce_rows, _ = _hard_target_block_d_logits(static, p, data, lse)
            ones, zeros = jnp.ones_like(lse), jnp.zeros_like(lse)
            # The lse's: d lse = 1, the statistics nll and s not in it.
            cts = (ce_rows[3], (ones, zeros, zeros))[:outputs]
            return (loss, _lse_output(lse, static)), ce_rows, cts

        return rows_of_the_cross_entropy

    if chip_rows == cpu_rows:
        out, values, cts = tapped(cpu_rows)()
    else:  # larger rows read w fewer times where memory allows
        out, values, cts = on_cpu(tapped(cpu_rows), tapped(chip_rows))

    # The tile takes every traced value it reads as an argument: closed over,
    # jax.checkpoint's caches would keep them alive past the trace
    # (jax.checking_leaks reported them).
    def tile(j, tokens, t_w_j, t_bias_j, p, small, class_mask, dx_by: _DxBy):
        if cross_entropy:
            ce_d_logits = _hard_target_d_logits(static, p)
        tokens = _padding_zeroed(tokens, static)
        x_c, probs_c, target_c, mask_c, values_c, cts_c, t_x_c = tokens
        start = block_start(j)

        def take(a):
            return _class_block(a, start, block)

        w_j = take(p.w)
        mask_j = class_mask if mask_c is None else mask_c
        mask_j = None if mask_j is None else take(mask_j)
        small_j = tuple(
            take(v) if v is not None and name in sliced else v
            for name, v in zip(_SMALL, small, strict=True)
        )
        bias_j = None if p.bias is None else take(p.bias)
        if dx_by == "transposed":  # a CPU with slow 16-bit matmuls
            logits = _unsaved_tile_logits(x_c.astype(acc), w_j.astype(acc), bias_j)
        else:
            logits = _unsaved_tile_logits(x_c, w_j, bias_j)
        # The last block is shifted left to stay in bounds: the columns it
        # shares with the previous block count there only.
        fresh = fresh_columns(j)

        def shares(z):
            kept = _BlockShares(values_c, _VocabBlock(start), vocab)
            _tile_loss(
                z, probs_c, target_c, mask_j, small_j, static._replace(shards=kept)
            )
            return kept.shares

        def logits_tangent(t_x_c):
            """``dz`` of the block (None when zero)."""
            terms = []
            if t_x_c is not None and dx_by == "rounded":
                terms.append(rounded_transpose_dot(t_x_c, w_j))
            elif t_x_c is not None:
                terms.append(_tile_logits(t_x_c, w_j.astype(acc), None))
            if t_w_j is not None:
                terms.append(_tile_logits(x_c.astype(acc), t_w_j, None))
            if t_bias_j is not None:
                terms.append(jnp.broadcast_to(t_bias_j[None, :], logits.shape))
            if not terms:
                return None
            t_logits = functools.reduce(jnp.add, terms)
            return t_logits if fresh is None else jnp.where(fresh, t_logits, 0.0)

        primal_dx = dx_by != "transposed" and len(cts_c) == 1
        if cross_entropy:
            block_info = _Block(take, _VocabBlock(start), fresh)

            def gradient(cts_o):
                """``d out / d z`` over the block (the rows' own only)."""
                rows_o = (*values_c[:3], cts_o, values_c[4])
                return ce_d_logits(logits, rows_o, mask_j, block_info)

            if t_x_c is not None and primal_dx:
                t_logits = logits_tangent(None)
                return tuple(
                    _gradient_dx_tangent(
                        gradient(cts_o), fresh, w_j, t_x_c, t_logits, acc
                    )
                    for cts_o in cts_c
                )
            t_logits = logits_tangent(t_x_c)
            if t_logits is None:
                return tuple(jnp.zeros((x_c.shape[0],), acc) for _ in cts_c)
            return tuple(jnp.sum(gradient(cts_o) * t_logits, axis=1) for cts_o in cts_c)
        if t_x_c is not None and primal_dx:
            t_logits = logits_tangent(None)
            return tuple(
                _primal_dx_tangent(shares, logits, cts_o, fresh, w_j, t_x_c, t_logits)
                for cts_o in cts_c
            )
        t_logits = logits_tangent(t_x_c)
        t_logits = jnp.zeros_like(logits) if t_logits is None else t_logits
        _, t_shares = jax.jvp(shares, (logits,), (t_logits,))

        def tangent_of(cts_o):
            total = jnp.zeros((x_c.shape[0],), acc)
            for t_share, ct in zip(t_shares, cts_o, strict=True):
                if ct is not None:
                    term = t_share * ct.reshape(t_share.shape)
                    rows = x_c.shape[0]  # may be 0 (an empty batch): no -1
                    term = term.reshape(rows, term.size // max(rows, 1))
                    total = total + jnp.sum(term, axis=1)
            return total

        return tuple(tangent_of(cts_o) for cts_o in cts_c)

    # Each tile's logits and tile math are recomputed in reverse mode.
    tile = jax.checkpoint(tile, prevent_cse=False, static_argnums=(7,))
    # dx accumulates over the blocks in float32.
    t_x = None if not need["x"] else vary_like(tp.x.astype(acc), p.x)
    row_mask = data.mask if static.row_mask else None
    tokens = (p.x, p.probs, data.target, row_mask, values, cts, t_x)

    def blocks_of(t, stacked: bool):
        """``t``'s class blocks stacked first (``stacked``), or None.

        Scanned over, reverse mode writes each block's cotangent once into a
        stacked array (the transpose of a scan's input) instead of adding it,
        padded, into the whole one (the transpose of a slice). XLA's CPU
        backend makes that add of 16-bit arrays a pass over the whole ``dw``
        per block, in float32 and not in place: at (2048, 1024, 131072),
        bfloat16 ``linear_log_probs``' value_and_grad took 0.6 of the time
        stacked. The stacked cotangent is a temporary of ``dw``'s size in its
        16-bit dtype; elsewhere (float32, TPU, GPU) the add is in place.
        """
        if t is None or not stacked:
            return None
        return jnp.moveaxis(t.reshape(*t.shape[:-1], num_blocks, block), -2, 0)

    def block_of(t, stacked, j):
        if t is None:
            return None
        if stacked is not None:
            t_j = stacked
        else:
            t_j = lax.dynamic_slice_in_dim(t, block_start(j), block, axis=t.ndim - 1)
        # A block's dw accumulates over the token chunks in float32.
        return vary_like(t_j.astype(acc), p.x)

    t_w = tp.w if need["w"] else None
    t_bias = tp.bias if need["bias"] else None

    def over_blocks(t_out, xs, dx_by: _DxBy):
        j, t_w_stacked, t_bias_stacked = xs
        t_w_j = block_of(t_w, t_w_stacked, j)
        t_bias_j = block_of(t_bias, t_bias_stacked, j)

        def over_tokens(carry, tokens_c):
            return carry, tile(
                j, tokens_c, t_w_j, t_bias_j, p, small, class_mask, dx_by
            )

        _, t_block = _over_chunks(over_tokens, None, tokens, chunk)
        return tuple(a + b for a, b in zip(t_out, t_block, strict=True)), None

    zeros = vary_like(jnp.zeros((num_tokens,), acc), p.x)

    def over_all_blocks(stacked: bool, dx_by: _DxBy):
        xs = (jnp.arange(num_blocks, dtype=jnp.int32),
              blocks_of(t_w, stacked), blocks_of(t_bias, stacked))  # fmt: skip
        body = functools.partial(over_blocks, dx_by=dx_by)
        return lax.scan(body, (zeros,) * outputs, xs)[0]

    if jnp.finfo(p.w.dtype).bits == 16:
        # On the CPU, stacked blocks, and dx as the host's 16-bit matmuls
        # prefer (_cpu_dx_by).
        stacked = not vocab % block and (need["w"] or need["bias"])
        cpu_dx = _cpu_dx_by()
        t_out = on_cpu(
            lambda: over_all_blocks(stacked, cpu_dx),
            lambda: over_all_blocks(False, "tangent"),
        )
    else:
        t_out = over_all_blocks(False, "tangent")
    return out, (*t_out, *(jnp.zeros_like(zeros),) * (2 - outputs))


@functools.partial(_per_token_loss.defjvp, symbolic_zeros=True)
def _per_token_loss_jvp(static, primals, tangents):
    p, data = primals
    tp = _poisoned_tangents(tangents[0], data)
    need = _needed(tp)
    token_outer = functools.partial(_per_token_chunk_tangents, static, p, data, tp)
    if static.vocab_outer is False or not _per_token_blocks_eligible(static, p, need):
        return token_outer()
    # On every platform: no float32 dw of the head's size, and on the CPU
    # faster too (0.66 against 0.83 of the naive program's time at (2048, 512,
    # 65536) with the entropy, float32; benchmarks/README.md).
    return _per_token_block_tangents(static, p, data, tp, need)


# --- public function ------------------------------------------------------------


def _denominator(p: _Params, data: _Data, static: _Static, dtype):
    """This device's share of the ``"mean"`` denominator."""
    if static.soft:
        return jnp.asarray(p.x.shape[0], dtype)
    num_classes = static.shards.num_classes(p.w.shape[1])
    terms = target_terms(
        data.target, p.weight, num_classes, static.ignore_index, dtype, static.shards
    )
    return jnp.sum(terms.target_weight)


@functools.partial(jax.jit, static_argnames=("static", "reduction", "return_lse"))
def _linear_cross_entropy(p: _Params, data: _Data, *, static, reduction, return_lse):
    batch_shape = p.x.shape[:-1]
    num_tokens = num_tokens_of(p.x)
    vocab = p.w.shape[1]
    p = p._replace(
        x=p.x.reshape(num_tokens, p.x.shape[-1]),
        probs=None if p.probs is None else p.probs.reshape(num_tokens, vocab),
    )
    data = _Data(
        target=None if data.target is None else data.target.reshape(num_tokens),
        mask=data.mask.reshape(num_tokens, vocab) if static.row_mask else data.mask,
    )
    out_dtype = p.x.dtype
    acc = compute_dtype(out_dtype)
    options = dict(batch_axes=static.batch_axes)
    if reduction != "none" and not return_lse:
        total = _summed_loss(static, p, data)
        denominator = _denominator(p, data, static, acc)
        return reduce_loss(total, reduction, denominator, out_dtype, **options)
    loss, lse = _per_token_loss(static, p, data)
    denominator = None if reduction == "none" else _denominator(p, data, static, acc)
    loss = reduce_loss(
        loss.reshape(batch_shape), reduction, denominator, out_dtype, **options
    )
    lse = lse.reshape(batch_shape)
    return (loss, lse) if return_lse else loss


def _positive_int_or_none(value, name: str, meaning: str):
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, numbers.Integral) or value <= 0:
        raise ValueError(
            f"`{name}` must be a positive int ({meaning}) or None (chosen from the "
            f"backend and a memory budget), got {value!r}."
        )
    return int(value)


def num_tokens_of(x) -> int:
    """Positions of hidden states ``x`` (..., D): the product of its batch dims."""
    return math.prod(x.shape[:-1])


def _power_of_two_at_most(n: int) -> int:
    return 1 << (max(n, 1).bit_length() - 1)


def _default_chunk_size(
    num_tokens: int,
    depth: int,
    vocab: int,
    smoothing: bool = False,
    where: bool = False,
) -> int:
    """Tokens per chunk: the most (a power of two) whose temporaries fit.

    The float32 logits tile may take ``(½·(dx + dw) + 16 MiB - 2 dw blocks) /
    1.25`` bytes (dx, dw in float32; the divisor grows by 1 with label
    smoothing, by 2 with ``where``), between 16 MiB and 512 MiB: the
    gradients plus the chunk's temporaries then stay within 1.5 x (dx + dw) +
    64 MiB. Larger tiles are faster on the CPU (fewer passes over dw, longer
    matmuls): at (N, D, V) = (2048, 1024, 131072) float32, value_and_grad took
    1.17, 0.96 and 0.84 x the unfused time with chunks of 128, 256 and 512
    tokens.
    """
    gradients = 4 * (num_tokens * depth + depth * vocab)
    dw_blocks = 2 * 4 * depth * _default_vocab_chunk_size(depth, vocab)
    tiles = _TEMPORARIES_PER_TILE
    tiles += _TILES_FOR_SMOOTHING if smoothing else 0.0
    tiles += _TILES_FOR_WHERE if where else 0.0
    tile = (gradients // 2 + _SLACK_BYTES - _RUNTIME_BYTES - dw_blocks) / tiles
    tile = min(_MAX_TILE_BYTES, max(_MIN_TILE_BYTES, int(tile)))
    rows = _power_of_two_at_most(tile // (4 * max(vocab, 1)))
    return max(1, min(rows, num_tokens))


def _even_block(vocab: int, most: int) -> int:
    """Classes per block: ``most``, or a divisor of ``vocab`` close to it.

    The largest multiple of 128 between ``most / 2`` and ``most`` that
    divides ``vocab``, if any: a shifted last block would recompute part of a
    block (0.8% more matmul flops at V = 256000).
    """
    if vocab % most == 0 or vocab <= most:
        return most
    for size in range(most - most % 128, most // 2 - 1, -128):
        if size and vocab % size == 0:
            return size
    return most


def _block_sizes(
    num_tokens: int,
    depth: int,
    vocab: int,
    chunk: int | None,
    vocab_chunk: int | None,
    per_token: bool = False,
    tile_bytes: int = _BLOCK_TILE_BYTES,
) -> tuple[int, int, int]:
    """(row_chunk, block_tokens, block_classes) of the vocabulary-outer order.

    The user's ``chunk_size`` and ``vocab_chunk_size`` when given; else the
    most (powers of two) whose float32 tiles and dw block fit their budgets
    (whole rows: ``_ROW_TILE_BYTES`` and a sixteenth of the tokens or
    ``_BLOCK_TILE_BYTES``, whichever is more; a class block's tile:
    ``tile_bytes``), with blocks of ``_PER_TOKEN_BLOCK_CLASSES`` and rows of
    ``_BLOCK_TILE_BYTES`` for the ``per_token`` heads.
    """
    # (validated positive ints, possibly NumPy's)
    chunk = None if chunk is None else int(chunk)
    vocab_chunk = None if vocab_chunk is None else int(vocab_chunk)
    if per_token:
        most = _PER_TOKEN_BLOCK_CLASSES
    else:
        most = _power_of_two_at_most(_BLOCK_DW_BYTES // (4 * max(depth, 1)))
    classes = vocab_chunk or _even_block(vocab, most)
    classes = max(1, min(classes, vocab))
    # The per-token heads' whole rows run on the CPU too, within its budget.
    rows = chunk or _row_chunk(num_tokens, vocab, per_token)
    tokens = chunk or _power_of_two_at_most(tile_bytes // (4 * classes))
    return max(1, min(rows, num_tokens)), max(1, min(tokens, num_tokens)), classes


def _row_chunk(num_tokens: int, vocab: int, cpu_sized: bool = False) -> int:
    """Tokens per whole-row chunk of the vocabulary-outer forward pass.

    At most ``_ROW_TILE_BYTES`` of float32 logits (``_BLOCK_TILE_BYTES`` when
    ``cpu_sized``) and a sixteenth of the tokens, but never under
    ``_BLOCK_TILE_BYTES``; a power of two.
    """
    row_bytes = _BLOCK_TILE_BYTES if cpu_sized else _ROW_TILE_BYTES
    share = max(num_tokens // _ROW_TILE_SHARE, _BLOCK_TILE_BYTES // (4 * vocab))
    rows = _power_of_two_at_most(min(row_bytes // (4 * vocab), share))
    return max(1, min(rows, num_tokens))


def _dw_passes(depth: int, vocab: int, dtype) -> int:
    """Passes over the chunks for dw: 2 for a large float32 dw of 16-bit ``w``."""
    sixteen_bit = jnp.finfo(dtype).bits == 16
    return 2 if sixteen_bit and 4 * depth * vocab >= _DW_SPLIT_BYTES else 1


def _default_vocab_chunk_size(depth: int, vocab: int) -> int:
    """Classes per block of the dw update: a float32 block of at most 16 MiB."""
    return max(1, min(vocab, _DW_BLOCK_BYTES // (4 * max(depth, 1))))


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
    if all(d == 1 for d in mask.shape[:-1]):  # one mask for every token
        return jnp.broadcast_to(mask.reshape(1, -1), (1, vocab)), False
    mask = mask.reshape((1,) * (len(shape) - mask.ndim) + mask.shape)
    return jnp.broadcast_to(mask, shape), True


def check_lm_head(
    x: ArrayLike, w: ArrayLike, bias: ArrayLike | None
) -> tuple[jax.Array, jax.Array, jax.Array | None]:
    """``(x, w, bias)`` of an LM head as floating arrays, shapes checked.

    ``x`` is ``(..., D)``, ``w`` ``(D, V)`` and ``bias`` ``(V,)``; ``x`` and
    ``w`` are cast to their common dtype.
    """
    x = as_float_array(x, "x")
    w = as_float_array(w, "w")
    if not known_sizes(*x.shape, *w.shape):
        raise ValueError(
            "`x` and `w` of an LM-head loss must have known shapes, got "
            f"x.shape={x.shape} and w.shape={w.shape}, with a symbolic dimension "
            "(jax.export's shape polymorphism): the numbers of token chunks and "
            "vocabulary blocks are fixed when the program is traced. Export one "
            "program per shape, or pass the logits `x @ w` to the logits version "
            "(cross_entropy, log_probs, distillation_loss), which takes symbolic "
            "shapes."
        )
    if x.ndim < 1:
        raise ValueError(f"`x` must have shape (..., D), got a scalar {x.shape}.")
    if w.ndim != 2 or w.shape[0] != x.shape[-1]:
        raise ValueError(
            f"`w` must have shape (D, V) with D = x.shape[-1] = {x.shape[-1]}, got "
            f"w.shape={w.shape} (x.shape={x.shape})."
        )
    if w.shape[1] == 0:
        raise ValueError(
            f"`w` must have shape (D, V) with V >= 1 classes, got w.shape={w.shape}."
        )
    dtype = promoted_dtype(x, "x", w, "w")
    if bias is not None:
        bias = as_float_array(bias, "bias")
        if bias.shape != (w.shape[1],):
            raise ValueError(
                f"`bias` must have shape (V,) = ({w.shape[1]},), got {bias.shape}."
            )
    return x.astype(dtype), w.astype(dtype), bias


class LMHeadLayout(NamedTuple):
    """How Explicit mesh axes split an LM head's inputs."""

    mesh: jax.sharding.Mesh
    batch: tuple  # PartitionSpec entries of x's token axes
    classes: tuple[str, ...]  # mesh axes splitting w's vocabulary


def explicit_lm_head_layout(x: jax.Array, w: jax.Array) -> LMHeadLayout | None:
    """For ``x`` or ``w`` sharded over Explicit mesh axes: the layout to run in.

    The tokens stay split as ``x``'s token axes are, the vocabulary as ``w``'s
    columns are; ``D`` is never split (``x`` or ``w`` split on it are
    resharded), nor are the tokens over an axis that splits the vocabulary.
    None for unsharded inputs and for Auto or Manual axes.
    """
    layouts = [explicit_layout(a, a.ndim - 1) for a in (x, w)]
    found = [layout for layout in layouts if layout is not None]
    if not found:
        return None
    mesh = found[0][0]
    w_spec = layouts[1][1] if layouts[1] is not None else (None, None)
    classes = axes_of([w_spec[1]])
    x_spec = layouts[0][1] if layouts[0] is not None else (None,) * x.ndim
    batch = []
    for entry in x_spec[:-1]:
        kept = tuple(name for name in axes_of([entry]) if name not in classes)
        batch.append(kept[0] if len(kept) == 1 else kept or None)
    return LMHeadLayout(mesh, tuple(batch), classes)


def run_explicit_lm_head(
    fn, layout: LMHeadLayout, x, w, per_token: dict, per_class: dict,
    scalars: dict, where, options: dict, outs: tuple[str, ...],
    token_classes: tuple[str, ...] = (),
):  # fmt: skip
    """``fn(x, w, ...)`` under ``jax.shard_map`` on Explicit-sharded inputs.

    ``fn`` is called with ``class_axis_name`` and ``batch_axis_name`` set from
    ``layout`` (each device then holds its tokens and its slice of the
    vocabulary; only O(N·D) and O(N) values cross devices). ``per_token``
    arrays (tokens first; the vocabulary last for those named in
    ``token_classes``), ``per_class`` arrays (the vocabulary last), ``where``
    and ``x``/``w`` are resharded to match. ``outs``
    names each output's layout: ``"tokens"`` (``x.shape[:-1]``) or
    ``"scalar"``. ``scalars`` (replicated options) are closed over when
    concrete, replicated arguments when traced.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh, batch, classes = layout
    check_class_split(w.shape[1], mesh, classes, "The vocabulary of `w`")
    class_entry = (classes[0] if len(classes) == 1 else classes) if classes else None
    batch_axes = axes_of(batch)

    def spec_of(a, token_dims: int, classes_last: bool):
        if a is None:
            return None
        a = jnp.asarray(a)
        if token_dims and a.ndim == token_dims:  # integer targets: tokens only
            return P(*batch)
        lead = batch[:token_dims]
        middle = (None,) * (a.ndim - len(lead) - 1)
        return P(*lead, *middle, class_entry if classes_last else None)

    def reshard(a, spec):
        return (
            None
            if a is None
            else jax.reshard(jnp.asarray(a), NamedSharding(mesh, spec))
        )

    x_spec = P(*batch, None)
    w_spec = P(None, class_entry)
    vocab = w.shape[1]
    token_specs = {
        k: spec_of(v, len(batch), k in token_classes) for k, v in per_token.items()
    }
    class_specs = {k: spec_of(v, 0, True) for k, v in per_class.items()}
    where_spec = None
    if where is not None:
        where = jnp.asarray(where)
        tokens = len(batch) if where.ndim == x.ndim else 0
        where_spec = spec_of(where, tokens, where.shape[-1] == vocab)
    # The scalar options: concrete ones by closure (they stay static), traced
    # ones replicated as arguments (shard_map cannot close over a value on
    # Explicit mesh axes).
    traced = {k: v for k, v in scalars.items() if v is not None and not is_concrete(v)}
    fixed = {k: v for k, v in scalars.items() if k not in traced}
    args = (
        reshard(x, x_spec), reshard(w, w_spec),
        {k: reshard(v, token_specs[k]) for k, v in per_token.items()},
        {k: reshard(v, class_specs[k]) for k, v in per_class.items()},
        reshard(where, where_spec),
        {k: reshard(v, P()) for k, v in traced.items()},
    )  # fmt: skip
    in_specs = (x_spec, w_spec, token_specs, class_specs, where_spec,
                {k: P() for k in traced})  # fmt: skip

    def local(x, w, per_token, per_class, where, traced):
        masks = {} if where is None else {"where": where}
        return fn(
            x, w, **per_token, **per_class, **fixed, **traced, **masks, **options,
            class_axis_name=classes or None, batch_axis_name=batch_axes or None,
        )  # fmt: skip

    out_specs = tuple(P(*batch) if kind == "tokens" else P() for kind in outs)
    out_specs = out_specs[0] if len(out_specs) == 1 else out_specs
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(
        *args
    )


def _check_target(target, x, vocab: int, ignore_index: int):
    """Returns ``(target, probs)``: integer indices or class probabilities."""
    target = as_target_array(target)
    if jnp.issubdtype(target.dtype, jnp.floating):
        expected = (*x.shape[:-1], vocab)
        if target.shape != expected:
            raise ValueError(
                "`target` of class probabilities (floating dtype) must have shape "
                f"x.shape[:-1] + (V,) = {expected} (x.shape={x.shape}, V={vocab}), "
                f"got {target.shape}. Pass integer class indices of shape "
                f"{x.shape[:-1]} for hard targets."
            )
        if ignore_index >= 0:
            raise ValueError(
                "`ignore_index` is not supported with class-probability targets "
                f"(floating `target`): got ignore_index={ignore_index}, allowed: "
                "a negative value (which has no effect)."
            )
        return None, target
    target = as_int_target(target)
    if target.shape != x.shape[:-1]:
        raise ValueError(
            f"`target` must have shape x.shape[:-1] = {x.shape[:-1]} (class "
            f"indices) or x.shape[:-1] + (V,) = {(*x.shape[:-1], vocab)} (class "
            f"probabilities), got {target.shape}."
        )
    return target, None


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
    vocab_chunk_size: int | None = None,
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
    vocab_chunk_size: int | None = None,
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
    vocab_chunk_size: int | None = None,
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
    vocab_chunk_size: int | None = None,
    return_lse: bool = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""``cross_entropy(x @ w + bias, target, ...)`` without the logits in memory.

    With logits ``z_n = x_n @ w + bias`` (float32 accumulation), the value is
    exactly [`jxent.cross_entropy`][] on ``z`` with the same options: for an
    integer target ``y``, ``ℓ_n = (1-ε)·w[y_n]·(lse_n - z[n, y_n]) +
    (ε/C)·Σ_c w_c·(lse_n - z[n, c]) + z_loss·lse_n²`` (0 where
    ``y_n == ignore_index``), ``"mean"`` dividing by ``Σ_n w[y_n]``; for class
    probabilities ``q``, ``ℓ_n = Σ_c w_c·q'[n, c]·(lse_n - z[n, c]) +
    z_loss·lse_n²`` with ``q' = (1-ε)·q + ε/C``, ``"mean"`` dividing by the
    number of tokens (torch's semantics).

    The ``(N, V)`` logits never exist: tokens are processed ``chunk_size`` at a
    time, each chunk's float32 logits reduced to per-token values and dropped.
    For ``"mean"`` and ``"sum"`` the gradients are computed in the same pass
    (three matmuls in all, as unfused); ``dw`` is accumulated in float32, in
    blocks of ``vocab_chunk_size`` classes. For 16-bit inputs whose float32
    ``dw`` takes 512 MiB or more, ``dw`` is accumulated in two column halves,
    a second pass over the chunks recomputing their logits (four matmuls), so
    that one float32 half at a time lives beside the 16-bit gradient; the
    numbers are the same. On TPUs and GPUs the ``"mean"``/``"sum"``
    gradients w.r.t. ``x``, ``w`` and ``bias`` are accumulated one block of
    classes at a time instead (each block's float32 ``dw`` summed over all
    tokens and written once; a fourth matmul recomputes the blocks' logits),
    so that no float32 array of ``dw``'s size exists. ``"none"`` and
    ``return_lse`` recompute each chunk in the backward pass. Every floating
    input gets its true gradient (``x``, ``w``, ``bias``, ``weight``,
    ``label_smoothing``, ``z_loss``, ``soft_cap`` and probability targets), in
    reverse and forward mode (``jax.jvp``, ``jax.jacfwd``, ``jax.hessian``
    work).

    Args:
      x: floating array ``(..., D)`` of hidden states.
      w: floating array ``(D, V)`` (pass ``embedding.T`` for tied embeddings;
        torch's ``linear_weight`` is ``(V, D)``).
      target: integer class indices of shape ``x.shape[:-1]``, or floating
        class probabilities of shape ``x.shape[:-1] + (V,)`` (read chunk by
        chunk; differentiable).
      weight: optional length-V class weights.
      bias: optional length-V bias.
      ignore_index: integer target value that is ignored (must be negative
        with probability targets).
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      label_smoothing: ``ε`` in ``[0, 1]`` (a traced value outside makes the
        loss and its gradients NaN).
      z_loss: coefficient ``>= 0`` of ``lse²`` added per non-ignored token.
      soft_cap: ``None`` or a finite cap ``> 0``: logits become ``cap·tanh(z/cap)`` (a
        traced cap that is not finite and > 0 makes the loss and its gradients NaN).
      where: optional boolean mask broadcastable to ``(..., V)``; excluded
        classes take no part in the softmax or the smoothing.
      chunk_size: tokens per chunk. Default (None): the largest power of two
        whose float32 logits tile fits ``(½·(dx + dw) + 16 MiB - 32 MiB) /
        1.25`` bytes (dx, dw in float32; 48 MiB of the budget's 64 are kept
        for the allocator, 32 MiB for two dw blocks; the divisor is 2.25 with
        label smoothing, 3.25 with ``where``, which keep more tiles alive),
        between 16 and 512 MiB, so that the extra memory stays within 1.5 x
        (dx + dw) + 64 MiB: e.g. 128 tokens at (N, D, V) = (2048, 512,
        65536), 256 at (2048, 1024, 131072), 512 at (1024, 2304, 256000). A
        ragged last chunk is its own smaller tile.
      vocab_chunk_size: classes per block of the ``dw`` update ``x_cᵀ dz``
        (each block of ``dw`` is read and written once per chunk). Default
        (None): a float32 ``(D, block)`` product of at most 16 MiB.
      return_lse: also return the per-token logsumexp (float32).
      class_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the vocabulary is split: ``w``, ``bias``, ``weight``, ``where``
        and probability targets are this device's contiguous slice of the
        classes, integer targets are global indices; ``dx`` is all-reduced
        (O(N·D)), nothing of logits size moves.
      batch_axis_name: inside ``jax.shard_map``, the mesh axis name(s) over
        which the tokens are split: ``"mean"``/``"sum"`` are global and the
        gradients of ``w``, ``bias`` and the options are summed over the
        token shards.

    Returns:
      The loss (scalar, or ``x.shape[:-1]`` for ``"none"``) in the dtype of
      ``x @ w``; with ``return_lse``, ``(loss, lse)``. A traced target
      outside ``[0, V)`` that is not ``ignore_index`` gives NaN, with NaN
      gradients (that token's for ``"none"``, all of them otherwise).

    Raises:
      TypeError: non-floating ``x``/``w``/``bias``, a target that is neither
        integer nor floating.
      ValueError: mismatched shapes of ``x``, ``w``, ``bias``, ``target`` or
        ``where``, a ``chunk_size`` or ``vocab_chunk_size`` that is not a
        positive int, ``soft_cap <= 0``, ``z_loss < 0``, and every error
        [`jxent.cross_entropy`][] raises.

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
      >>> q = jax.nn.softmax(x @ w / 4)  # probability targets
      >>> fused = jxent.linear_cross_entropy(x, w, q, vocab_chunk_size=32)
      >>> bool(jnp.allclose(fused, jxent.cross_entropy(x @ w, q), rtol=1e-5))
      True
    """
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    return_lse = check_bool(return_lse, "return_lse")
    x, w, bias = check_lm_head(x, w, bias)
    dtype, vocab = x.dtype, w.shape[1]
    target, probs = _check_target(target, x, vocab, ignore_index)
    layout = None
    if class_axis_name is None and batch_axis_name is None:
        layout = explicit_lm_head_layout(x, w)
    if layout is not None:
        options = dict(
            ignore_index=ignore_index, reduction=reduction, chunk_size=chunk_size,
            vocab_chunk_size=vocab_chunk_size, return_lse=return_lse,
        )  # fmt: skip
        per_token = {"target": target if probs is None else probs}
        per_class = {"weight": weight, "bias": bias}
        scalars = {"label_smoothing": label_smoothing, "z_loss": z_loss,
                   "soft_cap": soft_cap}  # fmt: skip
        out = ("tokens" if reduction == "none" else "scalar",)
        return run_explicit_lm_head(
            linear_cross_entropy, layout, x, w, per_token, per_class, scalars,
            where, options, out + (("tokens",) if return_lse else ()),
            token_classes=("target",),
        )  # fmt: skip
    batch_shape = x.shape[:-1]
    weight = check_weight(weight, vocab)
    label_smoothing = check_unit_interval(label_smoothing, "label_smoothing")
    z_loss = check_nonnegative(z_loss, "z_loss")
    soft_cap = check_soft_cap(soft_cap)
    mask, row_mask = _class_mask_for_tokens(where, batch_shape, vocab)
    num_tokens = max(1, num_tokens_of(x))
    chunk = _positive_int_or_none(chunk_size, "chunk_size", "tokens per chunk")
    if chunk is None:
        chunk = _default_chunk_size(
            num_tokens,
            x.shape[-1],
            vocab,
            smoothing=not _is_static_zero(label_smoothing),
            where=mask is not None,
        )
    vocab_chunk = _positive_int_or_none(
        vocab_chunk_size, "vocab_chunk_size", "classes per block"
    )
    if vocab_chunk is None:
        vocab_chunk = _default_vocab_chunk_size(x.shape[-1], vocab)
    shards = ClassShards(as_axis_names(class_axis_name, "class_axis_name"))
    batch_axes = as_axis_names(batch_axis_name, "batch_axis_name")
    check_split_like_the_classes(shards, w=w, bias=bias, weight=weight, target=probs)
    x, w, bias, weight, probs = refuse_untyped_derivatives(
        "linear_cross_entropy", shards, batch_axes, x, w, bias, weight, probs
    )
    if target is not None:
        check_concrete_target_range(target, shards.num_classes(vocab), ignore_index)
    row_chunk, block_tokens, block_classes = _block_sizes(
        num_tokens, x.shape[-1], vocab, chunk_size, vocab_chunk_size,
        tile_bytes=_LOSS_BLOCK_TILE_BYTES,
    )  # fmt: skip
    chip_row_chunk = 0
    if (reduction == "none" or return_lse) and probs is None:
        # Per-token outputs of integer targets go class block by class block
        # (_per_token_block_tangents), in the heads' blocks: whole rows sized
        # for the CPU there, the chips' rows elsewhere.
        chip_row_chunk = row_chunk
        row_chunk, block_tokens, block_classes = _block_sizes(
            num_tokens, x.shape[-1], vocab, chunk_size, vocab_chunk_size,
            per_token=True,
        )  # fmt: skip
    static = _Static(
        ignore_index=ignore_index,
        smoothing=not _is_static_zero(label_smoothing),
        with_z_loss=not _is_static_zero(z_loss),
        chunk_size=min(chunk, num_tokens),
        vocab_chunk_size=min(vocab_chunk, vocab),
        soft=probs is not None,
        row_mask=row_mask,
        shards=shards,
        batch_axes=batch_axes,
        dw_passes=_dw_passes(x.shape[-1], vocab, dtype),
        row_chunk=row_chunk,
        chip_row_chunk=chip_row_chunk,
        block_tokens=block_tokens,
        block_classes=block_classes,
        vocab_outer=_VOCAB_OUTER,
        strided=_partitioned_by_xla(x),
        per_token_lse=return_lse,
    )
    acc = compute_dtype(dtype)
    params = _Params(
        x=x,
        w=w,
        bias=bias,
        probs=probs,
        weight=None if weight is None else jnp.asarray(weight, acc),
        label_smoothing=jnp.asarray(label_smoothing, acc),
        z_loss=jnp.asarray(z_loss, acc),
        soft_cap=None if soft_cap is None else jnp.asarray(soft_cap, acc),
    )
    return _linear_cross_entropy(
        params, _Data(target, mask), static=static, reduction=reduction,
        return_lse=return_lse,
    )  # fmt: skip
