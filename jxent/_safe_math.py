"""Products with ``0 · inf = 0`` whose derivatives are still the true ones.

Information-theoretic sums have terms ``q · log p`` where a zero ``q`` meets a
``-inf`` ``log p``. The convention ``0 · log 0 = 0`` fixes the value; a plain
``where(q == 0, 0, q * log p)`` would also zero the derivative w.r.t. ``q``,
which is ``log p`` (finite wherever ``p > 0``). These functions keep it.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax.custom_derivatives import SymbolicZero

from jxent._sharding import varying


def _zero_safe_product(a: jax.Array, b: jax.Array) -> jax.Array:
    """``a · b``, 0 where ``a`` is 0 (even if ``b`` is infinite)."""
    return jnp.where(a == 0, 0.0, a * b)


@jax.custom_jvp
def mass_times_gap(q: jax.Array, w: jax.Array, gap: jax.Array) -> jax.Array:
    """``q · w · gap`` with ``0 · inf = 0`` (``gap`` may be ``±inf``).

    The terms of ``Σ_c w_c q_c (-log p_c)`` with ``gap = -log p``. The
    derivatives are the true ones: ``w · gap`` w.r.t. ``q`` (infinite at an
    impossible class with ``w ≠ 0``), ``q · gap`` w.r.t. ``w`` and ``q · w``
    w.r.t. ``gap``; each is 0 where the factor multiplying it is 0 (the term
    does not depend on that input there).
    """
    return _zero_safe_product(q * w, gap)


@functools.partial(mass_times_gap.defjvp, symbolic_zeros=True)
def _mass_times_gap_jvp(primals, tangents):
    q, w, gap = primals
    t_q, t_w, t_gap = tangents
    out = mass_times_gap(q, w, gap)
    # Terms only for inputs being differentiated: an infinite partial
    # derivative times a zero tangent would be NaN.
    t_out = jnp.zeros_like(out)
    if not isinstance(t_q, SymbolicZero):
        t_out = t_out + _zero_safe_product(w, gap) * t_q
    if not isinstance(t_w, SymbolicZero):
        t_out = t_out + _zero_safe_product(q, gap) * t_w
    if not isinstance(t_gap, SymbolicZero):
        t_out = t_out + q * w * t_gap
    return out, t_out


@jax.custom_jvp
def smoothed_target(q: jax.Array, eps: jax.Array, uniform) -> jax.Array:
    """``(1 - ε) q + ε u``: a target smoothed towards ``uniform``.

    Its partial derivatives, ``1 - ε`` w.r.t. ``q`` and ``u - q`` w.r.t.
    ``ε``, each multiply the loss's cotangent once. Autodiff of either
    written form would form ``ct - ε ct`` (for ``q + ε (u - q)``) or ``u ct -
    q ct`` (for ``(1 - ε) q + ε u``): ``inf - inf``, NaN, where the
    cotangent is the infinite ``-log p`` of a ``-inf`` logit, whose true
    derivatives (torch's) are ``+inf`` w.r.t. ``q`` and ``(u - q) · inf``
    w.r.t. ``ε``.
    """
    return q + eps * (uniform - q)


@functools.partial(smoothed_target.defjvp, symbolic_zeros=True)
def _smoothed_target_jvp(primals, tangents):
    q, eps, uniform = primals
    t_q, t_eps, _ = tangents  # uniform: a constant of the class mask
    out = smoothed_target(q, eps, uniform)
    t_out = jnp.zeros_like(out)
    if not isinstance(t_q, SymbolicZero):
        t_out = t_out + (1.0 - eps) * t_q
    if not isinstance(t_eps, SymbolicZero):
        t_out = t_out + (uniform - q) * t_eps
    return out, t_out


def _full(value: float, dtype) -> jax.Array:
    """``value`` as a scalar of ``dtype``.

    A select between two Python floats would be float64 under
    ``jax_enable_x64``, as large as its condition.
    """
    return jnp.asarray(value, dtype)


@jax.custom_jvp
def xlogx(p: jax.Array) -> jax.Array:
    """``p · log p`` with ``0 · log 0 = 0`` and NaN for ``p < 0``.

    The derivative is ``1 + log p``: ``-inf`` at ``p = 0`` (the true one-sided
    derivative), never a silent 0.
    """
    positive = p > 0
    value = p * jnp.log(jnp.where(positive, p, 1.0))
    zero_or_nan = poison(jnp.zeros_like(p), ~(p >= 0))  # NaN for p < 0 or NaN
    return jnp.where(positive, value, zero_or_nan)


@xlogx.defjvp
def _xlogx_jvp(primals, tangents):
    (p,), (t_p,) = primals, tangents
    return xlogx(p), (1.0 + jnp.log(p)) * t_p


def poison(value: jax.Array, bad: jax.Array) -> jax.Array:
    """``value``, and NaN where ``bad`` with NaN derivatives there too.

    Bad data (an out-of-range target, an option outside its range) must make
    the gradients as unusable as the loss, so that finite-checks on gradients
    (``optax.apply_if_finite``) reject the step: ``value · NaN`` carries NaN
    into every tangent and cotangent of ``value``, where ``where(bad, NaN,
    value)`` would give finite derivatives from the other branch.
    """
    # (0 / 0 where bad, 1 / 1 elsewhere: no NaN exists unless the data is
    # bad, so jax_debug_nans, eager too, points at the data, never here.)
    factor = jnp.where(bad, _full(0.0, value.dtype), _full(1.0, value.dtype))
    return value * (factor / factor)


def _zero_batched_like(flag: jax.Array, dtype) -> jax.Array:
    """A scalar 0 (``select(flag, 0, 0)``: XLA folds it, and ``x + 0``)."""
    # float32 zeros, then cast: XLA folds ``x + convert(select(flag, 0, 0))``
    # for 16-bit ``x``, not a 16-bit select (a logits-sized temporary).
    zero = _full(0.0, jnp.float32)
    return jnp.where(flag, zero, zero).astype(dtype)


@functools.partial(jax.custom_jvp, nondiff_argnums=(2,))
def poison_gradients(
    x: jax.Array, flag: jax.Array, batched_like_flag: bool = False
) -> jax.Array:
    """``x`` itself, whose derivatives are NaN when ``flag`` is set.

    For ``"mean"``/``"sum"`` over bad data (``flag``: any bad position or
    option), every entry of the gradient w.r.t. ``x`` is NaN, also where the
    loss reaches ``x`` through a gather or not at all (ignored positions),
    where a NaN cotangent would leave zeros. Costs nothing in the forward
    pass. For per-position inputs (logits), whose batch axes include the
    flag's; elsewhere (a flag that varies over more shard_map axes than
    ``x``) it leaves ``x``'s derivatives to the NaN cotangent.

    ``batched_like_flag``: the output is ``x + select(flag, 0, 0)``, so that
    under ``vmap`` with ``x`` shared and the flag batched (a vmap over the
    targets or an option) it is batched like its NaN-carrying tangent
    (otherwise ``jit`` of the gradient fails to lower), and the tangent is
    ``(dx + select(flag, 0, 0)) · factor``, so that the two share one batch
    axis also when ``x`` and the flag are batched on different axes. XLA
    folds both into ``x`` and ``dx · factor`` for the materialised losses'
    logits (their compiled programs unchanged on the CPU, v5e and H100). The
    LM heads poison their tangents inside their own rules instead
    (``poisoned_tangent``): a select on ``w`` kept a copy of it.
    """
    if batched_like_flag and varying(flag) <= varying(x):
        return x + _zero_batched_like(flag, x.dtype)
    return x


@functools.partial(poison_gradients.defjvp, symbolic_zeros=True)
def _poison_gradients_jvp(batched_like_flag, primals, tangents):
    x, flag = primals
    t_x, _ = tangents
    poisoned = poisoned_tangent(t_x, flag)
    if not batched_like_flag or poisoned is t_x:
        return x, poisoned
    # The output and its tangent, like the function's own output, are sums
    # with a zero batched like the flag: one batch axis under vmap.
    zero = _zero_batched_like(flag, t_x.dtype)
    return x + zero, poison(t_x + zero, flag)


def poisoned_tangent(t, flag: jax.Array):
    """``t · (NaN if flag else 1)``: the tangent of ``poison_gradients``.

    ``t`` None or a symbolic zero is returned as it is, as is a ``t`` that
    varies over fewer shard_map axes than the flag (its derivatives left to
    the NaN cotangent). For a custom_jvp rule that takes the flag as a
    primal input, the tangents poisoned inside it: under ``vmap`` with the
    flag batched (a vmap over the targets or an option) and the input
    shared, the rule's primal and tangent inputs are then batched alike.
    """
    if t is None or isinstance(t, SymbolicZero) or not varying(flag) <= varying(t):
        return t
    return poison(t, flag)
