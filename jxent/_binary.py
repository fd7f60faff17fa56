"""Binary and multi-label losses with torch semantics.

``binary_cross_entropy`` (``F.binary_cross_entropy``),
``binary_cross_entropy_with_logits`` (``F.binary_cross_entropy_with_logits``)
and ``sigmoid_focal_loss`` (``torchvision.ops.sigmoid_focal_loss``). Every
element is independent: the per-element terms have ``custom_jvp`` rules with
torch's derivatives written in their stable form, so forward and reverse mode
both work and extreme logits never form ``inf - inf``.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jxent._kernels import compute_dtype
from jxent._reduction import reduce_loss
from jxent._safe_math import poison
from jxent._types import Reduction
from jxent._validation import (
    as_elementwise_target,
    as_float_array,
    check_broadcast_weight,
    check_concrete_probabilities,
    check_nonnegative,
    check_real_scalar,
    check_reduction,
)

# torch clamps each log term of binary_cross_entropy at -100 and divides its
# gradient by max((1 - p)·p, 1e-12).
LOG_CLAMP = -100.0
GRAD_EPS = 1e-12


@functools.partial(jax.custom_jvp)
def _scaled(coef: jax.Array, value: jax.Array) -> jax.Array:
    """``coef · value``, and 0 where ``coef`` is 0 even if ``value`` is inf.

    A NaN ``value`` (NaN data) stays NaN: a zero weight does not hide it.
    The derivatives are the product's, ``value`` w.r.t. ``coef`` also where
    ``coef`` is 0 (a select would give 0 there: wrong second derivatives of
    the losses whose derivative rules use this, at ``pos_weight = 1``,
    ``gamma = 0`` or a hard target), ``coef`` w.r.t. ``value``.
    """
    return jnp.where((coef == 0) & ~jnp.isnan(value), 0.0, coef * value)


@functools.partial(_scaled.defjvp, symbolic_zeros=True)
def _scaled_jvp(primals, tangents):
    coef, value = primals
    d_coef, d_value = tangents
    out = _scaled(coef, value)
    tangent = jnp.zeros_like(out)
    if not _is_zero(d_coef):
        tangent = tangent + d_coef * value
    if not _is_zero(d_value):
        tangent = tangent + jnp.where(coef == 0, 0.0, coef * d_value)
    return out, tangent


def _is_zero(tangent: object) -> bool:
    return isinstance(tangent, SymbolicZero)


def _tangent_sum(out: jax.Array, *terms: tuple[jax.Array, object]) -> jax.Array:
    """``Σ coef · tangent`` over the tangents that are not symbolic zeros."""
    total = jnp.zeros_like(out)
    for coef, tangent in terms:
        if not _is_zero(tangent):
            total = total + coef * tangent
    return total


class SigmoidTerms(NamedTuple):
    """``softplus(±x)`` and ``sigmoid(±x)``, from one ``exp(-|x|)``."""

    softplus_pos: jax.Array  # softplus(x) = -log sigmoid(-x)
    softplus_neg: jax.Array  # softplus(-x) = -log sigmoid(x)
    sigmoid_pos: jax.Array  # sigmoid(x)
    sigmoid_neg: jax.Array  # sigmoid(-x)


def sigmoid_terms(x: jax.Array) -> SigmoidTerms:
    """Stable ``softplus(±x)`` and ``sigmoid(±x)`` for any ``x``, ±inf included.

    With ``e = exp(-|x|) ∈ [0, 1]``: ``softplus(±x) = log1p(e) + max(±x, 0)``
    (torch's form) and ``sigmoid(|x|) = 1 / (1 + e)``,
    ``sigmoid(-|x|) = e / (1 + e)``; nothing overflows or cancels (XLA
    computes the one ``e`` that both pairs form).
    """
    softplus_pos, softplus_neg = _softplus_pair(x)
    sigmoid_pos, sigmoid_neg = _sigmoid_pair(x)
    return SigmoidTerms(softplus_pos, softplus_neg, sigmoid_pos, sigmoid_neg)


def _sigmoid_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(σ(x), σ(-x))`` from ``e = exp(-|x|)``."""
    e = jnp.exp(-jnp.abs(x))
    big = 1.0 / (1.0 + e)
    small = e * big
    positive = x >= 0
    return jnp.where(positive, big, small), jnp.where(positive, small, big)


@jax.custom_jvp
def _softplus_pair(x: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(softplus(x), softplus(-x))`` as ``log1p(e) + max(±x, 0)``.

    Its derivatives are ``±σ(±x)`` at every order. The pieces' own are not at
    ``x = 0``: there JAX takes ``|x|``'s as 1 and ``max``'s as 1/2, which
    would give 0 and -1 instead of ±1/2 (the second derivatives of the
    binary losses at a zero logit, a zero-initialised head's, were wrong).
    """
    log1p_e = jnp.log1p(jnp.exp(-jnp.abs(x)))
    return log1p_e + jnp.maximum(x, 0.0), log1p_e + jnp.maximum(-x, 0.0)


@_softplus_pair.defjvp
def _softplus_pair_jvp(primals, tangents):
    (x,), (dx,) = primals, tangents
    sigmoid_pos, sigmoid_neg = _sigmoid_pair(x)
    return _softplus_pair(x), (sigmoid_pos * dx, -sigmoid_neg * dx)


@functools.partial(jax.custom_jvp)
def bce_with_logits_terms(
    x: jax.Array, target: jax.Array, pos_weight: jax.Array | float
) -> jax.Array:
    """Unweighted per-element ``binary_cross_entropy_with_logits``.

    ``ℓ = (1 - t) · softplus(x) + pw · t · softplus(-x)``, which equals torch's
    ``(1 - t) · x + (1 + (pw - 1) · t) · softplus(-x)`` but never forms
    ``inf - inf``: at ``x = ±inf`` it is the limit (0 or inf) where torch gives
    NaN. A zero coefficient contributes 0 even against an infinite softplus.
    """
    return _bce_with_logits_value(sigmoid_terms(x), target, pos_weight)


def _bce_with_logits_value(s: SigmoidTerms, target, pos_weight) -> jax.Array:
    return _scaled(1.0 - target, s.softplus_pos) + _scaled(
        pos_weight * target, s.softplus_neg
    )


@functools.partial(bce_with_logits_terms.defjvp, symbolic_zeros=True)
def _bce_with_logits_jvp(primals, tangents):
    """PyTorch's derivatives, in a form without cancellation.

    ``∂ℓ/∂x = (1 - t) · σ(x) - pw · t · σ(-x)`` (= torch's
    ``σ(x) · (1 + (pw - 1) · t) - pw · t``), ``∂ℓ/∂t = -x + (pw - 1) ·
    softplus(-x)`` (torch's) and ``∂ℓ/∂pw = t · softplus(-x)``.
    """
    x, target, pos_weight = primals
    dx, dt, dpw = tangents
    s = sigmoid_terms(x)
    pw_t = pos_weight * target
    out = _bce_with_logits_value(s, target, pos_weight)
    d_x = (1.0 - target) * s.sigmoid_pos - pw_t * s.sigmoid_neg
    d_t = _scaled(pos_weight - 1.0, s.softplus_neg) - x
    d_pw = _scaled(target, s.softplus_neg)
    return out, _tangent_sum(out, (d_x, dx), (d_t, dt), (d_pw, dpw))


@jax.custom_jvp
def bce_terms(probs: jax.Array, target: jax.Array) -> jax.Array:
    """Unweighted per-element ``binary_cross_entropy``, torch's clamped form.

    ``ℓ = -(t · max(log p, -100) + (1 - t) · max(log(1 - p), -100))``; NaN where
    ``p`` or ``t`` is outside [0, 1] (or NaN), never a clamped number or a
    negative loss (torch refuses such targets).
    """
    log_p = jnp.maximum(jnp.log(probs), LOG_CLAMP)
    log_q = jnp.maximum(jnp.log1p(-probs), LOG_CLAMP)
    loss = (target - 1.0) * log_q - target * log_p
    return jnp.where(_valid_bce_inputs(probs, target), loss, jnp.nan)


def _valid_bce_inputs(probs: jax.Array, target: jax.Array) -> jax.Array:
    return (probs >= 0) & (probs <= 1) & (target >= 0) & (target <= 1)


@functools.partial(bce_terms.defjvp, symbolic_zeros=True)
def _bce_jvp(primals, tangents):
    """PyTorch's derivatives, finite at ``p`` = 0 and 1; NaN off [0, 1].

    ``∂ℓ/∂p = (p - t) / max((1 - p) · p, 1e-12)`` and
    ``∂ℓ/∂t = log(1 - p) - log(p)`` (torch's ``-logit(p)``, not clamped);
    both NaN where ``p`` or ``t`` is outside [0, 1].
    """
    probs, target = primals
    dp, dt = tangents
    out = bce_terms(probs, target)
    valid = _valid_bce_inputs(probs, target)
    denom = jnp.maximum((1.0 - probs) * probs, GRAD_EPS)
    d_p = jnp.where(valid, (probs - target) / denom, jnp.nan)
    safe = jnp.where(valid, probs, 0.5)
    d_t = jnp.where(valid, jnp.log1p(-safe) - jnp.log(safe), jnp.nan)
    return out, _tangent_sum(out, (d_p, dp), (d_t, dt))


def _log_one_minus_pt(s: SigmoidTerms, target: jax.Array) -> jax.Array:
    """``log(1 - p_t)`` with ``1 - p_t = σ(x) · (1 - t) + σ(-x) · t``.

    From log-sigmoids, so it is accurate (no ``1 - p`` cancellation) for every
    logit; exact branches for hard targets ``t`` = 0 and 1.
    """
    ls_pos, ls_neg = -s.softplus_neg, -s.softplus_pos  # log σ(x), log σ(-x)
    hard = (target == 0) | (target == 1)
    t = jnp.where(hard, 0.5, target)
    soft = jnp.logaddexp(ls_pos + jnp.log1p(-t), ls_neg + jnp.log(t))
    return jnp.where(target == 0, ls_pos, jnp.where(target == 1, ls_neg, soft))


@jax.custom_jvp
def focal_modulation(x: jax.Array, target: jax.Array, gamma: jax.Array) -> jax.Array:
    """``(1 - p_t)^γ`` with ``p = σ(x)``, ``p_t = p · t + (1 - p) · (1 - t)``.

    Computed as ``exp(γ · log(1 - p_t))`` (``0^0 = 1`` as in torch). Its
    derivatives are finite for every ``x``, also for ``γ`` in (0, 1) where the
    naive power's is infinite at ``p_t = 1``.
    """
    log_q = _log_one_minus_pt(sigmoid_terms(x), target)
    return jnp.exp(_scaled(gamma, log_q))


@functools.partial(focal_modulation.defjvp, symbolic_zeros=True)
def _focal_modulation_jvp(primals, tangents):
    m, partials = _modulation_partials(*primals)
    return m, _tangent_sum(m, *zip(partials, tangents, strict=True))


@jax.custom_jvp
def modulated_loss(
    ce: jax.Array, x: jax.Array, target: jax.Array, gamma: jax.Array
) -> jax.Array:
    """``ce · (1 - p_t)^γ``, the focal loss before ``alpha``.

    Where a derivative of the modulation is 0 (``γ = 0``; the limits at
    ``x = ±inf``), its product with ``ce`` is 0 even where ``ce`` is infinite:
    at ``γ = 0`` the loss is ``ce`` and its derivatives ``ce``'s (torch's
    ``pow`` with exponent 0 has a zero derivative too).
    """
    return ce * focal_modulation(x, target, gamma)


@functools.partial(modulated_loss.defjvp, symbolic_zeros=True)
def _modulated_loss_jvp(primals, tangents):
    ce, x, target, gamma = primals
    d_ce, *rest = tangents
    m, partials = _modulation_partials(x, target, gamma)
    out = ce * m
    terms = [(_scaled(p, ce), d) for p, d in zip(partials, rest, strict=True)]
    return out, _tangent_sum(out, (m, d_ce), *terms)


def _modulation_partials(x, target, gamma):
    """``m = q^γ`` (``q = 1 - p_t``) and its partials, finite for every logit.

    ``∂m/∂x = γ · m · (1 - 2t) · σ(x) σ(-x) / q`` (the ratio from log-sigmoids,
    at most 2 in size), ``∂m/∂t = γ · (σ(-x) - σ(x)) · q^(γ-1)`` and
    ``∂m/∂γ = m · log q`` (0 where ``m`` is 0).
    """
    s = sigmoid_terms(x)
    log_q = _log_one_minus_pt(s, target)
    m = jnp.exp(_scaled(gamma, log_q))
    ls_pos, ls_neg = -s.softplus_neg, -s.softplus_pos
    exponent = jnp.where(
        target == 0,
        ls_neg,
        jnp.where(target == 1, ls_pos, ls_pos + ls_neg - log_q),
    )
    d_x = _scaled(gamma, m * (1.0 - 2.0 * target) * jnp.exp(exponent))
    q_pow = jnp.exp(_scaled(gamma - 1.0, log_q))  # q^(γ-1)
    d_t = _scaled(gamma, (s.sigmoid_neg - s.sigmoid_pos) * q_pow)
    d_gamma = m * jnp.where(m == 0, 0.0, log_q)
    return m, (d_x, d_t, d_gamma)


def _weighted(loss: jax.Array, weight: jax.Array | None) -> jax.Array:
    return loss if weight is None else loss * weight.astype(loss.dtype)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _binary_cross_entropy(probs, target, weight, *, reduction):
    dtype = compute_dtype(probs.dtype)
    loss = bce_terms(probs.astype(dtype), target.astype(dtype))
    loss = _weighted(loss, weight)
    return reduce_loss(loss, reduction, out_dtype=probs.dtype, elementwise=True)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _binary_cross_entropy_with_logits(logits, target, weight, pos_weight, *, reduction):
    dtype = compute_dtype(logits.dtype)
    pos_weight = 1.0 if pos_weight is None else pos_weight.astype(dtype)
    loss = bce_with_logits_terms(logits.astype(dtype), target.astype(dtype), pos_weight)
    loss = _weighted(loss, weight)
    return reduce_loss(loss, reduction, out_dtype=logits.dtype, elementwise=True)


@functools.partial(jax.jit, static_argnames=("reduction",))
def _sigmoid_focal_loss(logits, target, alpha, gamma, *, reduction):
    dtype = compute_dtype(logits.dtype)
    x, t = logits.astype(dtype), target.astype(dtype)
    alpha = jnp.asarray(alpha, dtype)
    ce = bce_with_logits_terms(x, t, 1.0)
    gamma = jnp.asarray(gamma, dtype)
    # A traced gamma < 0 (refused when concrete): NaN values and derivatives.
    loss = poison(modulated_loss(ce, x, t, gamma), ~(gamma >= 0))
    # alpha < 0 (or NaN): no weighting (torchvision's rule); the unused
    # branch is sanitised first, so that it leaves the gradients alone.
    weighted = alpha >= 0
    alpha = jnp.where(weighted, alpha, 0.0)
    alpha_t = alpha * t + (1.0 - alpha) * (1.0 - t)
    loss = jnp.where(weighted, alpha_t * loss, loss)
    return reduce_loss(loss, reduction, out_dtype=logits.dtype, elementwise=True)


def binary_cross_entropy(
    probs: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    reduction: Reduction = "mean",
) -> jax.Array:
    r"""Binary cross-entropy of probabilities (``F.binary_cross_entropy``).

    For every element, with ``p = probs``, ``t = target`` and ``w = weight``
    (1 by default):

    ``ℓ = -w · (t · max(log p, -100) + (1 - t) · max(log(1 - p), -100))``

    torch's clamp at -100 makes ``p`` of exactly 0 or 1 give a finite loss;
    the gradient is torch's, ``w · (p - t) / max((1 - p) · p, 1e-12)``, also
    finite there. ``"mean"`` divides by the number of elements (the weights are
    not in the denominator). Prefer [`jxent.binary_cross_entropy_with_logits`][],
    which is exact for any logit.

    Args:
      probs: floating array of probabilities in [0, 1], any shape.
      target: array of ``probs``' shape: floating values in [0, 1], or integer
        (0 or 1) or boolean labels (cast to the accumulation dtype).
      weight: optional real array broadcastable to ``probs`` (NumPy's rule: a
        vector weights the last axis).
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Returns:
      The loss in ``probs``' dtype (bfloat16/float16 accumulate in float32):
      ``probs``' shape for ``"none"``, else a scalar. Elements whose ``probs``
      or ``target`` are outside [0, 1] or NaN give NaN under ``jit`` (value
      and gradient).

    Raises:
      TypeError: non-floating ``probs``, a complex target or weight.
      ValueError: a bad ``reduction``, a ``target`` of another shape, a
        ``weight`` that does not broadcast, or concrete ``probs`` or ``target``
        outside [0, 1].

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> jxent.binary_cross_entropy(jnp.array([0.9, 0.2, 0.0]),
      ...                            jnp.array([1.0, 0.0, 1.0]), reduction="none")
      Array([  0.1053...,   0.2231..., 100. ], dtype=float32)
    """
    check_reduction(reduction)
    probs = as_float_array(probs, "probs")
    target = as_elementwise_target(target, probs.shape, "probs")
    weight = check_broadcast_weight(weight, probs.shape, "weight", "probs")
    check_concrete_probabilities(probs, "probs")
    check_concrete_probabilities(
        target, "target", "Binary targets are labels or soft labels in [0, 1] "
        "(torch refuses others too): clip soft targets that may round past 1."
    )  # fmt: skip
    return _binary_cross_entropy(probs, target, weight, reduction=reduction)


def binary_cross_entropy_with_logits(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    pos_weight: ArrayLike | None = None,
    reduction: Reduction = "mean",
) -> jax.Array:
    r"""Binary cross-entropy of logits (``F.binary_cross_entropy_with_logits``).

    For every element, with ``x = logits``, ``t = target``, ``w = weight`` and
    ``pw = pos_weight`` (1 by default):

    ``ℓ = w · (pw · t · softplus(-x) + (1 - t) · softplus(x))``
    ``  = w · ((1 - t) · x + (1 + (pw - 1) · t) · log(1 + exp(-x)))``

    i.e. ``-w · (pw · t · log σ(x) + (1 - t) · log(1 - σ(x)))``, computed
    without overflow or cancellation for any logit (``±1e30``, ``±inf``); the
    gradients are torch's, ``w · ((1 - t) · σ(x) - pw · t · σ(-x))`` for the
    logits. ``"mean"`` divides by the number of elements.

    Args:
      logits: floating array of logits, any shape (e.g. ``(N, C)`` for
        multi-label classification with C labels).
      target: array of ``logits``' shape: soft targets in [0, 1] (floating), or
        integer or boolean labels (cast to the accumulation dtype).
      weight: optional real array broadcastable to ``logits`` (NumPy's rule).
      pos_weight: optional weight of the positive term, broadcastable to
        ``logits``: a length-C vector weights each class (the last axis,
        torch's rule), or give a full shape.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.

    Returns:
      The loss in ``logits``' dtype (bfloat16/float16 accumulate in float32):
      ``logits``' shape for ``"none"``, else a scalar. At ``x = ±inf`` it is the
      limit (0 or inf) where torch gives NaN.

    Raises:
      TypeError: non-floating ``logits``, a complex target or weight.
      ValueError: a bad ``reduction``, a ``target`` of another shape, or a
        ``weight``/``pos_weight`` that does not broadcast to ``logits``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> logits = jnp.array([[2.0, -1.0], [0.5, 1e4]])
      >>> target = jnp.array([[1, 0], [0, 1]])
      >>> jxent.binary_cross_entropy_with_logits(logits, target,
      ...                                        pos_weight=jnp.array([3.0, 1.0]))
      Array(0.4170..., dtype=float32)
    """
    check_reduction(reduction)
    logits = as_float_array(logits, "logits")
    target = as_elementwise_target(target, logits.shape, "logits")
    weight = check_broadcast_weight(weight, logits.shape, "weight")
    pos_weight = check_broadcast_weight(pos_weight, logits.shape, "pos_weight")
    return _binary_cross_entropy_with_logits(
        logits, target, weight, pos_weight, reduction=reduction
    )


def sigmoid_focal_loss(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    alpha: ArrayLike = 0.25,
    gamma: ArrayLike = 2.0,
    reduction: Reduction = "none",
) -> jax.Array:
    r"""Focal loss of logits (``torchvision.ops.sigmoid_focal_loss``).

    With ``p = σ(x)``, ``p_t = p · t + (1 - p) · (1 - t)`` and
    ``ce = binary_cross_entropy_with_logits(x, t, reduction="none")``:

    ``ℓ = α_t · ce · (1 - p_t)^γ``, ``α_t = α · t + (1 - α) · (1 - t)``

    and ``α_t = 1`` when ``α < 0`` (no weighting, torchvision's rule).
    ``(1 - p_t)^γ`` is computed as ``exp(γ · log(1 - p_t))`` from
    log-sigmoids: accurate at large logits, and its derivative is finite for
    ``γ`` in (0, 1) at ``p_t = 1`` (torchvision's is NaN there).

    Args:
      logits: floating array of logits, any shape.
      target: array of ``logits``' shape: values in [0, 1] (floating), or
        integer or boolean labels (cast to the accumulation dtype).
      alpha: weight of the positive class in [0, 1], or negative for none
        (traced: may change without recompiling).
      gamma: focusing exponent ``>= 0`` (traced; a traced negative value makes
        the loss and its gradients NaN).
      reduction: ``"none"`` (torchvision's default), ``"mean"`` or ``"sum"``.

    Returns:
      The loss in ``logits``' dtype (bfloat16/float16 accumulate in float32):
      ``logits``' shape for ``"none"``, else a scalar.

    Raises:
      TypeError: non-floating ``logits``, a complex target.
      ValueError: a bad ``reduction``, a ``target`` of another shape, a
        non-scalar ``alpha`` or ``gamma``, or a concrete ``gamma < 0``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> jxent.sigmoid_focal_loss(jnp.array([3.0, -1.0]), jnp.array([1.0, 1.0]))
      Array([2.7320...e-05, 1.7546...e-01], dtype=float32)
    """
    check_reduction(reduction)
    logits = as_float_array(logits, "logits")
    target = as_elementwise_target(target, logits.shape, "logits")
    alpha = check_real_scalar(alpha, "alpha")
    gamma = check_nonnegative(gamma, "gamma")
    return _sigmoid_focal_loss(logits, target, alpha, gamma, reduction=reduction)
