"""Row statistics of logits with hand-written gradients.

Everything that touches an array of logits size lives here. The losses in
``_classification.py`` combine the O(N) results with ordinary JAX code, so
autodiff handles weights, smoothing, z-loss, masks and reductions, while the
passes over the logits stay few:

* forward: one reduction for the row maximum and one for the sum of
  exponentials (which also carries the smoothing sum when it is needed), plus a
  gather of one element per row;
* backward: one fused elementwise pass that recomputes the softmax from the
  saved logsumexp (nothing of logits size is saved), and an in-place scatter of
  one element per row for the target term.
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


def target_index(target: jax.Array, axis: int) -> tuple[jax.Array, ...]:
    """Index that picks ``x[..., target, ...]`` (class axis ``axis``) per position."""
    positions = list(jnp.indices(target.shape, sparse=True))
    return (*positions[:axis], target, *positions[axis:])


def capped_logits(logits: jax.Array, soft_cap: jax.Array | None) -> jax.Array:
    """Logits in the accumulation dtype, soft-capped: ``c · tanh(x / c)``."""
    x = logits.astype(compute_dtype(logits.dtype))
    if soft_cap is None:
        return x
    cap = jnp.asarray(soft_cap, x.dtype)
    return cap * jnp.tanh(x / cap)


def _masked(x: jax.Array, class_mask: jax.Array | None) -> jax.Array:
    return x if class_mask is None else jnp.where(class_mask, x, -jnp.inf)


def _smoothing_weights(
    class_weight: jax.Array | None,
    class_mask: jax.Array | None,
    ndim: int,
    axis: int,
    dtype: jnp.dtype,
) -> jax.Array | None:
    """Per-class weights of the smoothing term (None: all ones)."""
    w = None
    if class_weight is not None:
        w = along_axis(class_weight.astype(dtype), ndim, axis)
    if class_mask is not None:
        w = class_mask.astype(dtype) if w is None else jnp.where(class_mask, w, 0.0)
    return w


def _total_weight(class_weight, class_mask, x, axis):
    """Σ_c w_c over included classes: a scalar, or per position with a mask."""
    if class_mask is None:
        if class_weight is None:
            return x.shape[axis]
        return jnp.sum(class_weight.astype(x.dtype))
    w = _smoothing_weights(class_weight, class_mask, x.ndim, axis, x.dtype)
    return jnp.sum(w, axis=axis)


def _log_sum_exp_shifted(x, shift, axis):
    """``log Σ exp(x - shift)`` over ``axis`` (``shift`` has the kept axis)."""
    return jnp.log(jnp.sum(jnp.exp(x - shift), axis=axis))


def _shift_and_log_sum(x, x_target, axis):
    """A per-position shift ``s`` and ``log Σ_c exp(x_c - s)`` (sum: the lse).

    The shift is the target's logit, which saves the pass that finds the row
    maximum and makes ``nll = log Σ exp(x - x_t)`` exact. A logit more than
    ~88 above its target's overflows ``exp``; then (and for rows that are not
    finite at all) the whole batch is redone with the row maximum as the shift.
    """
    log_sum = _log_sum_exp_shifted(x, jnp.expand_dims(x_target, axis), axis)

    def with_row_max():
        m = jnp.max(x, axis=axis, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        return jnp.squeeze(m, axis), _log_sum_exp_shifted(x, m, axis)

    return lax.cond(
        jnp.all(jnp.isfinite(log_sum)), lambda: (x_target, log_sum), with_row_max
    )


def _smoothing_sum(x, lse, class_weight, class_mask, total_weight, axis):
    """``Σ_c w_c (lse - x_c)`` over included classes.

    Fast: ``(Σ_c w_c) · lse - x · w``, one matrix-vector product. Every term is
    >= 0, so the result is at least ``Σw · log C``; the fast form is used unless
    it is not finite (0 · inf from a zero weight on a ``-inf`` logit) or
    ``|lse| · Σ|w|`` is so large against the result that cancellation could
    cost digits. Otherwise the terms are summed one by one, from the row
    maximum so that none is negative.
    """

    def exact():
        w = _smoothing_weights(class_weight, class_mask, x.ndim, axis, x.dtype)
        m = jnp.max(x, axis=axis, keepdims=True)
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        gap = m - x
        if w is None:
            weighted_gap = jnp.sum(gap, axis=axis)
        else:
            # A zero weight on an impossible (-inf) class adds 0, not 0 * inf.
            weighted_gap = jnp.sum(jnp.where(w == 0, 0.0, w * gap), axis=axis)
        return weighted_gap + total_weight * (lse - jnp.squeeze(m, axis))

    if class_mask is not None:
        return exact()
    num_classes = x.shape[axis]
    if class_weight is None:
        w = jnp.ones((num_classes,), x.dtype)
    else:
        w = class_weight.astype(x.dtype)
    fast = total_weight * lse - jnp.tensordot(x, w, axes=([axis], [0]))
    scale = jnp.abs(lse) * jnp.sum(jnp.abs(w))
    trusted = jnp.all(jnp.isfinite(fast) & (scale <= 64.0 * jnp.abs(fast)))
    return lax.cond(trusted, lambda: fast, exact)


def _forward(logits, target, class_weight, class_mask, soft_cap, axis, smoothing):
    x = _masked(capped_logits(logits, soft_cap), class_mask)
    x_target = x[target_index(target, axis)]
    shift, log_sum = _shift_and_log_sum(x, x_target, axis)
    lse = shift + log_sum
    # (s - x_t) + log Σ exp(x - s) keeps the digits that lse - x_t would lose
    # to rounding when the logits are large.
    nll = (shift - x_target) + log_sum
    if not smoothing:
        return lse, nll, jnp.zeros_like(lse)
    total_weight = _total_weight(class_weight, class_mask, x, axis)
    smooth = _smoothing_sum(x, lse, class_weight, class_mask, total_weight, axis)
    return lse, nll, smooth


@functools.partial(jax.custom_vjp, nondiff_argnums=(5, 6))
def cross_entropy_stats(
    logits: jax.Array,
    target: jax.Array,
    class_weight: jax.Array | None,
    class_mask: jax.Array | None,
    soft_cap: jax.Array | None,
    axis: int,
    smoothing: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-position statistics of the logits needed by cross-entropy.

    With ``x = soft_cap · tanh(logits / soft_cap)`` (or the logits) and
    excluded classes set to ``-inf``:

    Args:
      logits: array of any float dtype with the classes on ``axis``.
      target: int32 array, ``logits.shape`` without ``axis``, every entry a
        class index in range (callers sanitise ignored entries first).
      class_weight: ``None`` (all ones) or a length-C vector, used only by the
        smoothing term.
      class_mask: ``None`` or a boolean array of ``logits.shape``: classes
        where it is False take no part in the softmax or the smoothing.
      soft_cap: ``None`` or a positive scalar.
      axis: the (non-negative) class axis.
      smoothing: whether to compute the smoothing term (else it is zeros).

    Returns:
      ``(lse, nll, s)`` in the accumulation dtype, each of the target's shape:
      ``lse = log Σ_c exp(x_c)``, ``nll = lse - x[target]`` and
      ``s = Σ_c w_c (lse - x_c)`` over included classes.
    """
    return _forward(logits, target, class_weight, class_mask, soft_cap, axis, smoothing)


def _fwd(logits, target, class_weight, class_mask, soft_cap, axis, smoothing):
    out = _forward(logits, target, class_weight, class_mask, soft_cap, axis, smoothing)
    return out, (logits, target, class_weight, class_mask, soft_cap, out[0])


def _bwd(axis, smoothing, residuals, cotangents):
    logits, target, class_weight, class_mask, soft_cap, lse = residuals
    g_lse, g_nll, g_smooth = cotangents
    capped = capped_logits(logits, soft_cap)
    x = _masked(capped, class_mask)
    dtype = x.dtype

    def expand(v):
        return jnp.expand_dims(v, axis)

    w = None
    # d lse/dx = p, d nll/dx = p - onehot, d s/dx = (Σ_c w_c) p - w.
    coef_p = g_lse + g_nll
    if smoothing:
        w = _smoothing_weights(class_weight, class_mask, x.ndim, axis, dtype)
        total_weight = _total_weight(class_weight, class_mask, x, axis)
        coef_p = coef_p + g_smooth * total_weight
    p = jnp.exp(x - expand(lse))
    # Rows with a zero cotangent (e.g. ignored rows) get exactly zero, even when
    # their logits are NaN or all -inf.
    dx = jnp.where(expand(coef_p) == 0, 0.0, expand(coef_p) * p)
    if smoothing:
        dx = dx - (expand(g_smooth) if w is None else expand(g_smooth) * w)
    # The one-hot term touches one entry per row: an in-place scatter is much
    # cheaper than comparing an iota with the target at every element.
    dx = dx.at[target_index(target, axis)].add(
        -g_nll, mode="promise_in_bounds", unique_indices=True
    )
    d_cap = None
    if soft_cap is not None:
        cap = jnp.asarray(soft_cap, dtype)
        tanh = capped / cap
        d_cap = jnp.sum(dx * (tanh - (logits.astype(dtype) / cap) * (1 - tanh**2)))
        d_cap = d_cap.astype(jnp.result_type(soft_cap))
        dx = dx * (1 - tanh**2)
    d_weight = None
    if class_weight is not None:
        d_weight = jnp.zeros_like(class_weight)
        if smoothing:
            included = True if class_mask is None else class_mask
            contribution = jnp.where(
                included & (expand(g_smooth) != 0),
                expand(g_smooth) * (expand(lse) - x),
                0.0,
            )
            other_axes = tuple(a for a in range(x.ndim) if a != axis)
            d_weight = jnp.sum(contribution, axis=other_axes).astype(class_weight.dtype)
    return dx.astype(logits.dtype), None, d_weight, None, d_cap


cross_entropy_stats.defvjp(_fwd, _bwd)
