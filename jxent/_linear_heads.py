"""LM-head heads beside the cross-entropy: greedy tokens from hidden states.

Each head is per-tile math run over the token chunks of ``_linear``'s loop
(``_over_chunks`` over ``chunk_size`` tokens, a ragged last chunk its own
tile, each tile's logits formed by ``_tile_logits`` with float32
accumulation); the ``(N, V)`` logits never exist.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jax.typing import ArrayLike

from jxent._kernels import capped_logits
from jxent._linear import (
    _class_mask_for_tokens,
    _default_chunk_size,
    _over_chunks,
    _positive_int_or_none,
    _tile_logits,
)
from jxent._sharding import UNSHARDED, ClassShards, as_axis_names
from jxent._validation import as_float_array, check_soft_cap


class _HeadStatic(NamedTuple):
    """Options that change the program (static under jit)."""

    chunk_size: int
    vocab_chunk_size: int
    row_mask: bool  # `where` varies per token (else one (1, V) class mask)
    shards: ClassShards = UNSHARDED


def check_head_inputs(x: ArrayLike, w: ArrayLike, bias: ArrayLike | None):
    """``(x, w, bias)`` as arrays of one floating dtype, shapes checked."""
    x = as_float_array(x, "x")
    w = as_float_array(w, "w")
    if x.ndim < 1:
        raise ValueError(f"`x` must have shape (..., D), got a scalar {x.shape}.")
    if w.ndim != 2 or w.shape[0] != x.shape[-1] or w.shape[1] == 0:
        raise ValueError(
            f"`w` must have shape (D, V) with D = x.shape[-1] = {x.shape[-1]} and "
            f"V >= 1, got w.shape={w.shape} (x.shape={x.shape})."
        )
    dtype = jnp.result_type(x.dtype, w.dtype)
    if bias is not None:
        bias = as_float_array(bias, "bias")
        if bias.shape != (w.shape[1],):
            raise ValueError(
                f"`bias` must have shape (V,) = ({w.shape[1]},), got {bias.shape}."
            )
    return x.astype(dtype), w.astype(dtype), bias


def head_chunks(x, vocab, chunk_size, vocab_chunk_size, *, where: bool):
    """``(chunk, vocab_chunk)``: the token chunk and the vocabulary block.

    The token chunk defaults to ``linear_cross_entropy``'s; the block to the
    whole (local) vocabulary.
    """
    num_tokens = max(1, x[..., 0].size)
    chunk = _positive_int_or_none(chunk_size, "chunk_size", "tokens per chunk")
    if chunk is None:
        chunk = _default_chunk_size(num_tokens, x.shape[-1], vocab, where=where)
    block = _positive_int_or_none(
        vocab_chunk_size, "vocab_chunk_size", "classes per block"
    )
    return min(chunk, num_tokens), min(block or vocab, vocab)


# --- argmax ---------------------------------------------------------------------


def _first_max(logits: jax.Array, offset) -> tuple[jax.Array, jax.Array]:
    """Per row: the largest value and its first index (+ offset), NaN largest."""
    index = jnp.argmax(logits, axis=1).astype(jnp.int32)
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
        w_b = lax.dynamic_slice_in_dim(w, start, block, axis=1)
        b_b = None if bias is None else lax.dynamic_slice_in_dim(bias, start, block)
        logits = capped_logits(_tile_logits(x_c, w_b, b_b), soft_cap)
        if mask_c is not None:
            m_b = lax.dynamic_slice_in_dim(mask_c, start, block, axis=1)
            logits = jnp.where(m_b, logits, -jnp.inf)
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
    tokens_x = x.reshape(-1, x.shape[-1])
    row_mask = mask.reshape(-1, w.shape[1]) if static.row_mask else None
    offset = static.shards.index() * w.shape[1] if static.shards.sharded else 0

    def body(carry, tokens):
        x_c, mask_c = tokens
        mask_c = mask if mask_c is None else mask_c
        value, index = _tile_argmax(
            x_c, w, bias, mask_c, soft_cap, static.vocab_chunk_size
        )
        return carry, (value, index + offset)

    _, (value, index) = _over_chunks(
        body, None, (tokens_x, row_mask), static.chunk_size
    )
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
    differentiable (the result is an integer).

    Args:
      x: floating array ``(..., D)`` of hidden states.
      w: floating array ``(D, V)``.
      bias: optional length-V bias.
      soft_cap: ``None`` or a cap ``> 0`` (a traced cap is not checked).
        ``tanh`` saturates, so capped logits can tie where the raw ones do
        not: the result is the argmax of the capped logits, as used.
      where: optional boolean mask broadcastable to ``(..., V)``: False
        excludes a class.
      chunk_size: tokens per chunk; default (None) that of
        :func:`jxent.linear_cross_entropy`.
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
    x, w, bias = check_head_inputs(x, w, bias)
    soft_cap = check_soft_cap(soft_cap)
    vocab = w.shape[1]
    mask, row_mask = _class_mask_for_tokens(where, x.shape[:-1], vocab)
    chunk, block = head_chunks(
        x, vocab, chunk_size, vocab_chunk_size, where=mask is not None
    )
    shards = ClassShards(as_axis_names(class_axis_name, "class_axis_name"))
    as_axis_names(batch_axis_name, "batch_axis_name")
    static = _HeadStatic(chunk, block, row_mask, shards)
    return _linear_argmax(x, w, bias, soft_cap, mask, static=static)
