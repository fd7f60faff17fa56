"""Row statistics of logits with hand-written gradients.

Everything that touches an array of logits size lives here. The losses in
``_classification.py`` combine the O(N) results with ordinary JAX code, so
autodiff handles weights, smoothing, masks and reductions, while the passes over
the logits stay few: two reductions forward (max, then the sum of exponentials
together with the smoothing sum) and one fused elementwise pass backward, which
recomputes the softmax from the saved logsumexp instead of storing it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax


def compute_dtype(dtype: jnp.dtype) -> jnp.dtype:
    """The accumulation dtype: float32, or float64 for float64 inputs."""
    return jnp.promote_types(dtype, jnp.float32)


def along_axis(vector: jax.Array, ndim: int, axis: int) -> jax.Array:
    """Reshapes a length-C vector to rank ``ndim`` with its entries on ``axis``."""
    shape = [1] * ndim
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)


def _safe_max(x: jax.Array, axis: int) -> jax.Array:
    """The maximum over ``axis`` (kept), with non-finite maxima replaced by 0."""
    m = jnp.max(x, axis=axis, keepdims=True)
    return lax.stop_gradient(jnp.where(jnp.isfinite(m), m, 0.0))


def _forward(logits, target, class_weight, axis, smoothing):
    x = logits.astype(compute_dtype(logits.dtype))
    m = _safe_max(x, axis)
    log_sum = jnp.log(jnp.sum(jnp.exp(x - m), axis=axis))
    lse = log_sum + jnp.squeeze(m, axis)
    idx = jnp.expand_dims(target, axis)
    target_gap = jnp.squeeze(
        m - jnp.take_along_axis(x, idx, axis=axis, mode="promise_in_bounds"), axis
    )
    # (m - x_t) + log Σ exp(x - m) keeps the digits that lse - x_t would lose
    # to rounding when the logits are large.
    nll = target_gap + log_sum
    if not smoothing:
        return (lse, nll, jnp.zeros_like(lse)), (logits, target, lse)
    num_classes = x.shape[axis]
    gap = m - x  # >= 0: summing it cannot cancel, unlike C*lse - sum(x).
    if class_weight is None:
        total_weight = num_classes
        weighted_gap = jnp.sum(gap, axis=axis)
    else:
        w = along_axis(class_weight.astype(x.dtype), x.ndim, axis)
        total_weight = jnp.sum(class_weight.astype(x.dtype))
        # A zero weight on an impossible (-inf) class contributes 0, not 0*inf.
        weighted_gap = jnp.sum(jnp.where(w == 0, 0.0, w * gap), axis=axis)
    smooth = weighted_gap + total_weight * (lse - jnp.squeeze(m, axis))
    return (lse, nll, smooth), (logits, target, lse)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3, 4))
def cross_entropy_stats(
    logits: jax.Array,
    target: jax.Array,
    class_weight: jax.Array | None,
    axis: int,
    smoothing: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-position statistics of the logits needed by cross-entropy.

    Args:
      logits: array of any float dtype with the classes on ``axis``.
      target: integer array, ``logits.shape`` without ``axis``, every entry a
        valid class index (callers sanitise ignored entries first).
      class_weight: ``None`` (all ones) or a length-C vector, used only by the
        smoothing term.
      axis: the (non-negative) class axis.
      smoothing: whether to compute the smoothing term (else it is zeros).

    Returns:
      ``(lse, nll, s)`` in the accumulation dtype, each of the target's shape:
      ``lse = log Σ_c exp(x_c)``, ``nll = lse - x[target]`` and
      ``s = Σ_c w_c (lse - x_c)``.
    """
    return _forward(logits, target, class_weight, axis, smoothing)[0]


def _fwd(logits, target, class_weight, axis, smoothing):
    out, (logits, target, lse) = _forward(logits, target, class_weight, axis, smoothing)
    return out, (logits, target, class_weight, lse)


def _bwd(axis, smoothing, residuals, cotangents):
    logits, target, class_weight, lse = residuals
    g_lse, g_nll, g_smooth = cotangents
    x = logits.astype(lse.dtype)
    num_classes = x.shape[axis]

    def expand(v):
        return jnp.expand_dims(v, axis)

    # d lse / dx = p, d nll / dx = p - onehot, d s / dx = (Σw) p - w.
    coef_p = g_lse + g_nll
    if smoothing:
        total_weight = num_classes if class_weight is None else jnp.sum(class_weight)
        coef_p = coef_p + g_smooth * total_weight
    p = jnp.exp(x - expand(lse))
    # Rows with a zero cotangent (e.g. ignored rows) get exactly zero, even when
    # their logits are NaN or all -inf.
    dx = jnp.where(expand(coef_p) == 0, 0.0, expand(coef_p) * p)
    iota = lax.broadcasted_iota(target.dtype, x.shape, axis)
    dx = dx - jnp.where(iota == expand(target), expand(g_nll), 0.0)
    d_weight = None
    if smoothing:
        if class_weight is None:
            dx = dx - expand(g_smooth)
        else:
            w = along_axis(class_weight.astype(x.dtype), x.ndim, axis)
            dx = dx - expand(g_smooth) * w
            gap = expand(lse) - x
            other_axes = tuple(a for a in range(x.ndim) if a != axis)
            d_weight = jnp.sum(
                jnp.where(expand(g_smooth) == 0, 0.0, expand(g_smooth) * gap),
                axis=other_axes,
            ).astype(class_weight.dtype)
    elif class_weight is not None:
        d_weight = jnp.zeros_like(class_weight)
    return dx.astype(logits.dtype), None, d_weight


cross_entropy_stats.defvjp(_fwd, _bwd)
