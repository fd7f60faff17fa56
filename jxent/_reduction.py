"""The one place where per-element losses become a reduced loss."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._sharding import batch_sum


def safe_divide(numerator: jax.Array, denominator: ArrayLike) -> jax.Array:
    """``numerator / denominator``, and 0 (with zero gradients) where it is 0.

    The divisor is sanitised before dividing, so no inf or NaN is ever formed
    and none can leak into gradients.
    """
    denominator = jnp.asarray(denominator, numerator.dtype)
    is_zero = denominator == 0
    return jnp.where(is_zero, 0.0, numerator / jnp.where(is_zero, 1.0, denominator))


def reduce_loss(
    loss: jax.Array,
    reduction: str,
    denominator: ArrayLike | None = None,
    out_dtype: jnp.dtype | None = None,
    *,
    batch_axes: tuple[str, ...] = (),
) -> jax.Array:
    """Applies ``reduction`` to per-element losses.

    Args:
      loss: per-element losses (any shape), already zero where ignored.
      reduction: ``"none"`` returns ``loss``; ``"sum"`` its sum; ``"mean"`` its
        sum divided by ``denominator`` (default: the number of elements).
        ``"batchmean"`` is accepted as ``"mean"`` with a caller-given
        denominator. A zero denominator gives 0.0, not NaN.
      denominator: the normaliser of ``"mean"``.
      out_dtype: dtype of the result (default: ``loss.dtype``).
      batch_axes: inside ``jax.shard_map``, mesh axes over which the batch is
        split: the sum and the denominator are all-reduced over them.

    Returns:
      The reduced loss, cast to ``out_dtype``.
    """
    out_dtype = loss.dtype if out_dtype is None else out_dtype
    if reduction == "none":
        return loss.astype(out_dtype)
    total = batch_sum(jnp.sum(loss), batch_axes)
    if reduction == "sum":
        return total.astype(out_dtype)
    if denominator is None:
        denominator = loss.size
    denominator = batch_sum(jnp.asarray(denominator, total.dtype), batch_axes)
    return safe_divide(total, denominator).astype(out_dtype)
