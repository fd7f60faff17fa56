"""Entropy and KL divergence: the information-theory side of cross-entropy."""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.typing import ArrayLike

from jxent._kernels import compute_dtype
from jxent._reduction import reduce_loss
from jxent._safe_math import mass_times_gap, poison, xlogx
from jxent._types import KLReduction
from jxent._validation import (
    as_float_array,
    check_reduction,
    normalize_axis,
    promoted_dtype,
)

KL_REDUCTIONS = ("none", "batchmean", "sum", "mean")


@functools.partial(jax.jit, static_argnames=("axis",))
def _entropy(probs: jax.Array, axis: int) -> jax.Array:
    p = probs.astype(compute_dtype(probs.dtype))
    return (-jnp.sum(xlogx(p), axis=axis)).astype(probs.dtype)


def entropy(probs: ArrayLike, axis: int = -1) -> jax.Array:
    r"""Shannon entropy in nats: ``H(p) = -Σ_c p_c log p_c`` with ``0 log 0 = 0``.

    The cross-entropy of a distribution with itself; for any ``q``,
    ``H(p, q) = H(p) + KL(p ‖ q)``.

    Args:
      probs: floating array of probabilities, classes on ``axis``.
      axis: the class axis.

    Returns:
      ``probs.shape`` without ``axis``, in the dtype of ``probs``.

    Raises:
      TypeError: if ``probs`` is not floating.
      ValueError: if ``axis`` is out of range.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> jxent.entropy(jnp.array([0.5, 0.5, 0.0]))
      Array(0.6931..., dtype=float32)
    """
    probs = as_float_array(probs, "probs")
    return _entropy(probs, normalize_axis(axis, probs.ndim, "probs"))


@functools.partial(jax.jit, static_argnames=("reduction", "log_target"))
def _kl_div(input, target, *, reduction, log_target):
    dtype = compute_dtype(input.dtype, target.dtype)
    log_q = input.astype(dtype)
    t = target.astype(dtype)
    if log_target:
        # exp(t) · (t - log q), 0 where t = -inf (zero probability): sanitised
        # before the product, so that its gradients are 0 there too.
        impossible = t == -jnp.inf
        t = jnp.where(impossible, 0.0, t)
        pointwise = jnp.where(impossible, 0.0, jnp.exp(t) * (t - log_q))
        # A NaN input, or +inf (a log-probability above 0) where the target
        # has no mass, is NaN data, as in torch: the zero mass does not hide it.
        bad = jnp.isnan(log_q) | (impossible & (log_q == jnp.inf))
        pointwise = poison(pointwise, bad)
    else:
        # t · log t - t · log q, with 0 · log 0 = 0 and 0 · (-inf) = 0; a
        # negative t gives NaN (its log), as in torch.
        pointwise = xlogx(t) + mass_times_gap(t, jnp.ones((), dtype), -log_q)
        # NaN derivatives w.r.t. input too. A NaN input, or +inf (a
        # log-probability above 0) where the target is 0, is NaN data, as in
        # torch (0 · -inf): a zero target does not hide it.
        bad = (t < 0) | jnp.isnan(log_q) | ((t == 0) & (log_q == jnp.inf))
        pointwise = poison(pointwise, bad)
    batch = input.shape[0] if input.ndim > 0 else 1
    denominator = batch if reduction == "batchmean" else pointwise.size
    out_dtype = promoted_dtype(input, "input", target, "target")
    return reduce_loss(pointwise, reduction, denominator, out_dtype)


def kl_div(
    input: ArrayLike,
    target: ArrayLike,
    *,
    reduction: KLReduction = "mean",
    log_target: bool = False,
) -> jax.Array:
    r"""Kullback-Leibler divergence (``torch.nn.functional.kl_div``).

    ``input`` holds log-probabilities ``log q``; ``target`` holds
    probabilities ``p`` (or log-probabilities if ``log_target``). Pointwise:
    ``ℓ = p · (log p - log q)``, with ``ℓ = 0`` where ``p = 0``.

    Reductions as torch: ``"none"`` (pointwise), ``"sum"``, ``"batchmean"``
    (sum divided by ``input.shape[0]``: the true KL per example) and
    ``"mean"`` (sum divided by the number of elements, torch's default, which
    is not the KL divergence). An empty input gives 0.0 rather than NaN.

    Args:
      input: floating log-probabilities ``log q``.
      target: floating probabilities ``p`` of the same shape (log-probabilities
        if ``log_target``).
      reduction: ``"none"``, ``"batchmean"``, ``"sum"`` or ``"mean"``.
      log_target: whether ``target`` is given in log space.

    Returns:
      The divergence, of ``input``'s shape for ``"none"``, else a scalar.

    Raises:
      TypeError: non-floating inputs.
      ValueError: bad ``reduction`` or mismatched shapes.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> p = jnp.array([[0.5, 0.5]])
      >>> q = jnp.array([[0.25, 0.75]])
      >>> jxent.kl_div(jnp.log(q), p, reduction="batchmean")
      Array(0.1438..., dtype=float32)
    """
    check_reduction(reduction, KL_REDUCTIONS)
    if not isinstance(log_target, bool):
        raise TypeError(f"`log_target` must be a bool, got {log_target!r}.")
    input = as_float_array(input, "input")
    target = as_float_array(target, "target")
    if input.shape != target.shape:
        raise ValueError(
            "`input` and `target` must have the same shape, got "
            f"input.shape={input.shape} and target.shape={target.shape}."
        )
    return _kl_div(input, target, reduction=reduction, log_target=log_target)
