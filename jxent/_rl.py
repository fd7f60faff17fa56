"""Token log-probabilities, entropy and distillation divergences of logits.

The per-position math lives in ``softmax_parts``, ``target_log_prob``
and ``divergence``, written for any class axis and for classes split over
devices (``shards``), so that the fused LM-head versions (``_linear_heads``)
apply the same math to each tile of logits.

Nothing non-finite is ever formed and masked afterwards: excluded classes
(``where`` False or a ``-inf`` logit) and ignored positions have their logits
replaced by 0 before any arithmetic, and every sum skips them by mask. Bad
values seen only under ``jit`` (a target out of range, ``temperature <= 0``,
``beta`` outside [0, 1]) multiply the result by NaN (``poison``), which
reaches the gradients as well (a select would give them zeros); a NaN sum or
mean has NaN gradients w.r.t. every input (``poison_gradients``).
"""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.custom_derivatives import SymbolicZero
from jax.typing import ArrayLike

from jxent._kernels import _one_hot, compute_dtype, on_cpu, take_target
from jxent._reduction import reduce_loss
from jxent._safe_math import poison, poison_gradients
from jxent._sharding import (
    UNSHARDED,
    ClassShards,
    axes_of,
    check_class_split,
    explicit_layout,
)
from jxent._types import Reduction
from jxent._validation import (
    _check_scalar_option,
    as_float_array,
    as_int_target,
    check_bool,
    check_class_mask,
    check_concrete_target_range,
    check_has_classes,
    check_ignore_index,
    check_int_target_shape,
    check_reduction,
    check_unit_interval,
    is_concrete,
    normalize_axis,
)

# --- per-position math (shared with the fused heads) ----------------------------


def check_temperature(temperature: ArrayLike) -> ArrayLike:
    """``temperature`` is a scalar > 0 (checked when concrete)."""
    return _check_scalar_option(temperature, "temperature", lambda v: v > 0.0, "> 0")


def sanitised(value: jax.Array, bad: jax.Array, safe: float) -> jax.Array:
    """``value`` where not ``bad``, else ``safe``, with derivative 1 everywhere.

    The replacement is added behind ``stop_gradient``: the caller multiplies
    its result by NaN where ``bad``, and that NaN then reaches the gradient
    w.r.t. ``value`` too (a select would give it a zero gradient there).
    """
    return value + lax.stop_gradient(jnp.where(bad, safe - value, 0.0))


class SoftmaxParts(NamedTuple):
    """``log_softmax`` of ``z = logits / T`` over the included classes."""

    shifted: jax.Array  # z - max z (0 at excluded classes), classes kept
    exp: jax.Array  # exp(z - max z) (0 at excluded classes)
    total: jax.Array  # Σ exp(z - max z) (1 for a row without mass), kept dims

    @property
    def probs(self) -> jax.Array:
        """The softmax (0 at excluded classes)."""
        return self.exp / self.total

    @property
    def log_sum(self) -> jax.Array:
        """``log Σ exp(z - max z)``, class axis kept (size 1)."""
        return jnp.log(self.total)

    def log_probs(self) -> jax.Array:
        """``log p`` (finite; meaningless at excluded classes)."""
        return self.shifted - self.log_sum

    def entropy(self, axis: int, shards: ClassShards) -> jax.Array:
        """``-Σ p log p = log_sum - Σ exp(z - max z) (z - max z) / total``.

        Two terms >= 0; the row's sum divided once by the total, not each
        class's term (fewer logits-sized operations and derivatives).
        """
        spread = shards.sum(jnp.sum(self.exp * self.shifted, axis=axis))
        total = jnp.squeeze(self.total, axis)
        return jnp.squeeze(self.log_sum, axis) - spread / total


def softmax_parts(
    logits: jax.Array,
    excluded: jax.Array,
    temperature: jax.Array,
    axis: int,
    shards: ClassShards = UNSHARDED,
) -> SoftmaxParts:
    """The softmax of ``logits / temperature`` without its excluded classes.

    ``logits`` is in the accumulation dtype; ``excluded`` (broadcast against
    it) marks classes that take no part (their logits are replaced by 0
    before anything, so they get exactly zero derivatives). A row with no
    included class gives zeros. ``temperature`` must be > 0 (sanitised).
    """
    kept = jnp.where(excluded, 0.0, logits)
    # The lowest finite number, not -inf, where a class is excluded: a row
    # without any class (an ignored position) has a finite maximum.
    lowest = jnp.finfo(logits.dtype).min

    def row_max(source):
        source = jnp.where(excluded, lowest, lax.stop_gradient(source))
        return jnp.max(source, axis=axis, keepdims=True)

    # The same maximum either way; the array it reads changes only XLA's
    # fusions. The CPU reads the raw logits (reading `kept`, the gradient of
    # log_probs wrote a logits-sized temporary); elsewhere `kept` (reading the
    # raw logits, a TPU v5e read a matmul's logits twice more).
    top = on_cpu(lambda: row_max(logits), lambda: row_max(kept))
    top = shards.max(top)
    # 0 for a NaN or +inf logit, and for a row without any class (an ignored
    # position): shifting its zeros by the lowest number made `kept - top`
    # huge, whose derivative w.r.t. T (times a tangent > T) overflowed, and
    # the discarded infinity met a zero cotangent as NaN.
    top = jnp.where(jnp.isfinite(top) & (top > lowest), top, 0.0)
    # Shifted, then divided: the largest class's is exactly 0 at any
    # temperature. (z - max z with z = logits / T rounds z twice, the fused
    # max's copy and the difference's, which XLA may round apart: at T = 1e-10
    # one ulp of z was the whole log-probability, -inf or -500.)
    shifted = jnp.where(excluded, 0.0, (kept - top) / temperature)
    exp = jnp.where(excluded, 0.0, jnp.exp(shifted))
    total = shards.sum(jnp.sum(exp, axis=axis, keepdims=True))
    # A row without mass (every class excluded) sums to 0; a NaN logit's
    # NaN sum stays NaN (poisoning the row: `total > 0` made it 1).
    total = jnp.where(total == 0, 1.0, total)
    return SoftmaxParts(shifted, exp, total)


def target_log_prob(
    parts: SoftmaxParts,
    target: jax.Array,
    axis: int,
    shards: ClassShards = UNSHARDED,
) -> jax.Array:
    """``log p[target]`` per position (``target`` in range, global indices)."""
    local, here = shards.localise(target, parts.shifted.shape[axis])
    picked = shards.pick(take_target(parts.shifted, local, axis), here)
    return picked - jnp.squeeze(parts.log_sum, axis)


def pick_flag(
    flags: jax.Array, target: jax.Array, axis: int, shards: ClassShards = UNSHARDED
) -> jax.Array:
    """``flags[target]`` per position, for a boolean array with classes on axis."""
    local, here = shards.localise(target, flags.shape[axis])
    picked = take_target(flags, local, axis).astype(jnp.int32)
    return shards.pick(picked, here) > 0


# The divergence by beta: the endpoints are the two KL divergences (the
# generalised Jensen-Shannon divergence tends to 0 there). "any": beta is
# traced, all three are computed and one selected per value.
Mode = Literal["forward", "reverse", "jsd", "any"]


def divergence_mode(beta: ArrayLike) -> Mode:
    """The static mode for ``beta`` (``"any"`` when it is traced)."""
    if not is_concrete(beta):
        return "any"
    value = float(np.asarray(beta))
    if value == 0.0:
        return "forward"
    if value == 1.0:
        return "reverse"
    return "jsd"


def _kl_parts(a: SoftmaxParts, a_ex, b: SoftmaxParts, b_ex, axis, shards):
    """``(Σ a (log a - log b), missing)``, the sum finite.

    ``missing``: ``a`` has mass where ``b`` has none (the KL is +inf).
    """
    terms = a.probs * (a.log_probs() - b.log_probs())
    value = shards.sum(jnp.sum(terms, axis=axis))
    missing = shards.sum(jnp.sum(~a_ex & b_ex, axis=axis, dtype=jnp.int32)) > 0
    return value, missing


def _kl(a: SoftmaxParts, a_ex, b: SoftmaxParts, b_ex, axis, shards):
    """``KL(a ‖ b) = Σ a (log a - log b)``: +inf where ``a`` has mass ``b`` lacks."""
    value, missing = _kl_parts(a, a_ex, b, b_ex, axis, shards)
    return jnp.where(missing, jnp.inf, value)


def _log_mixture(lp, p_ex, lq, q_ex, beta):
    """``log m`` for ``m = β q + (1-β) p``, 0 < β < 1, from ``log p, log q``.

    Formed in the log domain (no underflow of small masses).
    """
    from_q = jnp.log(beta) + lq
    from_p = jnp.log1p(-beta) + lp
    both = jnp.logaddexp(from_q, from_p)
    return jnp.where(q_ex, from_p, jnp.where(p_ex, from_q, both))


def _jsd(p: SoftmaxParts, p_ex, q: SoftmaxParts, q_ex, beta, axis, shards):
    """``β KL(q ‖ m) + (1-β) KL(p ‖ m)``, ``m = β q + (1-β) p``, 0 < β < 1."""
    lp, lq = p.log_probs(), q.log_probs()
    log_m = _log_mixture(lp, p_ex, lq, q_ex, beta)
    terms = beta * q.probs * (lq - log_m) + (1.0 - beta) * p.probs * (lp - log_m)
    return shards.sum(jnp.sum(terms, axis=axis))


def divergence(
    p: SoftmaxParts,
    p_ex: jax.Array,
    q: SoftmaxParts,
    q_ex: jax.Array,
    beta: jax.Array,
    mode: Mode,
    axis: int,
    shards: ClassShards = UNSHARDED,
) -> jax.Array:
    """Student ``p``, teacher ``q``: the divergence per position for ``beta``.

    ``beta`` must be in [0, 1] (sanitised); ``p_ex``/``q_ex`` mark the classes
    without mass (of the parts' shape).
    """
    if mode == "forward":
        return _kl(q, q_ex, p, p_ex, axis, shards)
    if mode == "reverse":
        return _kl(p, p_ex, q, q_ex, axis, shards)
    if mode == "jsd":
        return _jsd(p, p_ex, q, q_ex, beta, axis, shards)
    at_zero, at_one = beta == 0.0, beta == 1.0
    inner = jnp.where(at_zero | at_one, 0.5, beta)  # no log 0 in the JSD
    forward = _kl(q, q_ex, p, p_ex, axis, shards)
    reverse = _kl(p, p_ex, q, q_ex, axis, shards)
    jsd = _jsd(p, p_ex, q, q_ex, inner, axis, shards)
    return jnp.where(at_zero, forward, jnp.where(at_one, reverse, jsd))


def _divergence_gradients(p: SoftmaxParts, p_ex, q: SoftmaxParts, q_ex, beta,
                          mode: Mode, axis: int):  # fmt: skip
    """``divergence``'s derivatives w.r.t. both ``z = logits / T`` and beta.

    Classes unsharded. With ``g = ∂D/∂p`` in probability space, the
    softmax's chain rule gives ``p (g - Σ p g)``:

    - forward ``KL(q ‖ p)``: ``p - q`` (student), ``q (log q - log p - D)``;
    - reverse ``KL(p ‖ q)``: ``p (log p - log q - D)``, ``q - p`` (teacher);
    - the JSD: ``g = (1-β)(log p - log m)`` (student), ``β (log q - log m)``
      (teacher), and ``∂D/∂β = KL(q ‖ m) - KL(p ‖ m)``.

    A row whose KL is +inf (mass where the other has none) has zero
    derivatives, as the selected +inf has; so does ``beta`` at 0 and 1,
    where the divergence is a KL that does not depend on it.
    """
    lp, lq = p.log_probs(), q.log_probs()
    probs_p, probs_q = p.probs, q.probs

    def total(a):
        return jnp.expand_dims(jnp.sum(a, axis=axis), axis)

    def kl_gradients(a, la, b, lb, a_ex, b_ex):
        value, missing = _kl_parts(a, a_ex, b, b_ex, axis, UNSHARDED)
        keep = ~jnp.expand_dims(missing, axis)
        g_a = jnp.where(keep, a.probs * (la - lb - jnp.expand_dims(value, axis)), 0.0)
        g_b = jnp.where(keep, b.probs - a.probs, 0.0)
        return g_a, g_b

    def jsd_gradients(beta):
        log_m = _log_mixture(lp, p_ex, lq, q_ex, beta)
        gap_p, gap_q = lp - log_m, lq - log_m
        from_p, from_q = probs_p * gap_p, probs_q * gap_q
        kl_p, kl_q = total(from_p), total(from_q)

        def shared_products():  # the CPU's: fewer logits-sized temporaries
            return from_p - probs_p * kl_p, from_q - probs_q * kl_q

        def shared_gaps():
            # Elsewhere: XLA then fuses each gradient with its own product
            # instead of keeping the product for it (bfloat16, w.r.t. the
            # student alone: 1 GiB -> 0 on a v5e, 2 -> 1 GiB on an H100 at
            # (8192, 32768); on the CPU float32 4 -> 6 GiB).
            return probs_p * (gap_p - kl_p), probs_q * (gap_q - kl_q)

        d_p, d_q = on_cpu(shared_products, shared_gaps)
        return (1.0 - beta) * d_p, beta * d_q, jnp.squeeze(kl_q - kl_p, axis)

    if mode in ("forward", "reverse"):
        if mode == "forward":
            g_q, g_p = kl_gradients(q, lq, p, lp, q_ex, p_ex)
        else:
            g_p, g_q = kl_gradients(p, lp, q, lq, p_ex, q_ex)
        return g_p, g_q, jnp.zeros_like(jnp.sum(g_p, axis=axis))
    if mode == "jsd":
        return jsd_gradients(beta)
    at_zero, at_one = beta == 0.0, beta == 1.0
    inner = jnp.where(at_zero | at_one, 0.5, beta)
    fq, fp = kl_gradients(q, lq, p, lp, q_ex, p_ex)
    rp, rq = kl_gradients(p, lp, q, lq, p_ex, q_ex)
    jp, jq, j_beta = jsd_gradients(inner)
    g_p = jnp.where(at_zero, fp, jnp.where(at_one, rp, jp))
    g_q = jnp.where(at_zero, fq, jnp.where(at_one, rq, jq))
    return g_p, g_q, jnp.where(at_zero | at_one, 0.0, j_beta)


# --- log_probs ------------------------------------------------------------------


def _expand(v: jax.Array, axis: int) -> jax.Array:
    return jnp.expand_dims(v, axis)


def safe_temperature(temperature: ArrayLike, dtype) -> tuple[jax.Array, jax.Array]:
    t = jnp.asarray(temperature, dtype)
    bad = ~(t > 0)
    return sanitised(t, bad, 1.0), bad


class _TokenSetup(NamedTuple):
    """What ``token_log_probs`` and its tangent map derive from the inputs."""

    temperature: jax.Array  # sanitised
    valid: jax.Array  # per position: target is not ignore_index
    target: jax.Array  # in range (0 where it was not)
    excluded: jax.Array  # per class: no part in the softmax
    impossible_target: jax.Array  # per position: the target's logit is -inf
    bad: jax.Array  # per position: a bad target or temperature


def _token_setup(x, target, temperature, where, axis, ignore_index, shards):
    num_classes = shards.num_classes(x.shape[axis])
    temperature, bad_t = safe_temperature(temperature, x.dtype)
    valid = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    safe_target = jnp.where(valid & in_range, target, 0).astype(jnp.int32)
    impossible = x == -jnp.inf
    excluded = impossible | ~_expand(valid, axis)
    bad = bad_t | (valid & ~in_range)
    if where is not None:
        excluded = excluded | ~where
        bad = bad | (valid & ~pick_flag(where, safe_target, axis, shards))
    impossible_target = pick_flag(impossible, safe_target, axis, shards)
    return _TokenSetup(
        temperature, valid, safe_target, excluded, impossible_target, bad
    )


def token_log_probs(
    x: jax.Array,
    target: jax.Array,
    temperature: ArrayLike,
    where: jax.Array | None,
    *,
    axis: int,
    ignore_index: int,
    with_entropy: bool,
    shards: ClassShards = UNSHARDED,
) -> tuple[jax.Array, jax.Array | None]:
    """Per position ``(log p[target], entropy or None)`` of ``softmax(x / T)``.

    ``x`` is in the accumulation dtype, classes on ``axis`` (with class
    shards, this device's slice; ``target`` holds global indices); ``where``
    has ``x``'s shape. Ignored positions give 0 with zero derivatives; a bad
    target (out of range, on an excluded class) or temperature gives NaN.
    """
    s = _token_setup(x, target, temperature, where, axis, ignore_index, shards)
    parts = softmax_parts(x, s.excluded, s.temperature, axis, shards)
    lp = target_log_prob(parts, s.target, axis, shards)
    # A target whose logit is -inf has log-probability -inf (not NaN).
    lp = jnp.where(s.valid & s.impossible_target, -jnp.inf, lp)
    lp = poison(jnp.where(s.valid, lp, 0.0), s.bad)
    if not with_entropy:
        return lp, None
    return lp, poison(jnp.where(s.valid, parts.entropy(axis, shards), 0.0), s.bad)


@functools.partial(jax.custom_jvp, nondiff_argnums=(4, 5, 6))
def _token_log_probs_rows(x, target, temperature, where, axis, ignore_index,
                          with_entropy):  # fmt: skip
    """``token_log_probs`` of materialised logits, hand-derived derivatives.

    Rematerialised (``_token_log_probs_tangent``): reverse mode recomputes the
    softmax in the pass that writes the gradient instead of keeping
    logits-sized pieces of it.
    """
    lp, ent = token_log_probs(
        x, target, temperature, where, axis=axis, ignore_index=ignore_index,
        with_entropy=with_entropy,
    )  # fmt: skip
    return (lp, ent) if with_entropy else (lp,)


@functools.partial(_token_log_probs_rows.defjvp, symbolic_zeros=True)
def _token_log_probs_rows_jvp(axis, ignore_index, with_entropy, primals, tangents):
    out = _token_log_probs_rows(*primals, axis, ignore_index, with_entropy)
    t_x, _, t_temperature, _ = (
        None if isinstance(t, SymbolicZero) else t for t in tangents
    )
    if t_x is None and t_temperature is None:
        return out, tuple(jnp.zeros_like(o) for o in out)
    tangent_map = jax.checkpoint(
        functools.partial(
            _token_log_probs_tangent, axis=axis, ignore_index=ignore_index,
            with_entropy=with_entropy,
        ),
        prevent_cse=False,
    )  # fmt: skip
    return out, tangent_map(*primals, t_x, t_temperature)


def _token_log_probs_tangent(x, target, temperature, where, t_x, t_temperature, *,
                             axis, ignore_index, with_entropy):  # fmt: skip
    """The tangent of ``_token_log_probs_rows``, linear in the tangents.

    With ``z = x / T`` and ``dz = (dx - z dT) / T``: ``d log p[t] =
    Σ_c ([c = t] - p_c) dz_c`` and ``dH = -Σ_c p_c (log p_c + H) dz_c``; 0
    at ignored positions and at a target whose logit is -inf, NaN where the
    value is poisoned.
    """
    s = _token_setup(x, target, temperature, where, axis, ignore_index, UNSHARDED)
    parts = softmax_parts(x, s.excluded, s.temperature, axis)
    dz = 0.0
    if t_x is not None:
        dz = jnp.where(s.excluded, 0.0, t_x)
    if t_temperature is not None:
        # z shifted by its row's maximum: the same tangent (Σ_c of either
        # factor below is 0), without z's cancellation at a tiny T.
        dz = dz - parts.shifted * t_temperature
    dz = dz / s.temperature
    p = parts.probs
    one_hot = _one_hot(s.target, x.shape, axis, x.dtype)
    d_lp = jnp.sum((one_hot - p) * dz, axis=axis)
    keep = s.valid & ~s.impossible_target
    d_lp = poison(jnp.where(keep, d_lp, 0.0), s.bad)
    if not with_entropy:
        return (d_lp,)
    entropy = jnp.expand_dims(parts.entropy(axis, UNSHARDED), axis)
    d_ent = -jnp.sum(p * (parts.log_probs() + entropy) * dz, axis=axis)
    return d_lp, poison(jnp.where(s.valid, d_ent, 0.0), s.bad)


@functools.partial(jax.jit, static_argnames=("axis", "ignore_index", "return_entropy"))
def _log_probs(logits, target, temperature, where, *, axis, ignore_index,
               return_entropy):  # fmt: skip
    # A bad temperature: NaN values and NaN derivatives, the ignored
    # positions' too.
    bad_t = safe_temperature(temperature, compute_dtype(logits.dtype))[1]
    logits = poison_gradients(logits, bad_t, True)
    temperature = poison_gradients(jnp.asarray(temperature), bad_t, True)
    out = _token_log_probs_rows(
        logits.astype(compute_dtype(logits.dtype)), target, temperature, where,
        axis, ignore_index, return_entropy,
    )  # fmt: skip
    return out if return_entropy else out[0]


def check_target_for(target, shape, axis, name, ignore_index):
    """An integer target of ``shape`` without ``axis``, concrete values in range."""
    target = as_int_target(target)
    check_int_target_shape(target.shape, shape, axis, name)
    check_concrete_target_range(target, shape[axis], ignore_index)
    return target


@overload
def log_probs(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: Literal[False] = False,
) -> jax.Array: ...


@overload
def log_probs(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: Literal[True],
) -> tuple[jax.Array, jax.Array]: ...


@overload
def log_probs(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def log_probs(
    logits: ArrayLike,
    target: ArrayLike,
    *,
    temperature: ArrayLike = 1.0,
    axis: int = -1,
    where: ArrayLike | None = None,
    ignore_index: int = -100,
    return_entropy: bool = False,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Log-probability of each target token (and the entropy), as for RL.

    With ``z = logits / T`` (``T = temperature``) and the classes that
    ``where`` excludes left out of the softmax, per position ``n``:

    ``log_probs_n = z[n, y_n] - log Σ_c exp(z[n, c])``

    and, with ``return_entropy=True``, also the entropy of the same
    distribution ``p = softmax(z)``:

    ``entropy_n = -Σ_c p_c log p_c = log Σ_c exp(z_c) - Σ_c p_c z_c``.

    This is what PPO and GRPO need per sampled token: the log-probability of
    the sampled token under the current policy at the sampling temperature,
    and an entropy bonus. Positions whose target is ``ignore_index`` give 0
    for both, with zero gradients (whatever their logits). Both are computed
    stably (maximum subtracted; the entropy as a sum of two terms >= 0), in
    float32 for 16-bit logits. A ``-inf`` logit is a class with zero
    probability (it adds 0 to the entropy; as the target its log-probability
    is ``-inf``). Differentiable w.r.t. ``logits`` and ``temperature``, in
    forward and reverse mode, to any order.

    Args:
      logits: floating array of unnormalised scores, classes on ``axis``.
      target: integer class indices (the sampled tokens), ``logits.shape``
        without ``axis``.
      temperature: ``T > 0`` (traced: changing it does not recompile).
      axis: the class axis.
      where: optional boolean class mask broadcastable to the logits (a 1-D
        mask of length C lies along ``axis``): False excludes a class from
        the softmax. A target on an excluded class gives NaN.
      ignore_index: target value whose positions give 0.
      return_entropy: also return the entropy.

    Returns:
      ``log_probs`` of the target's shape in the accumulation dtype (float32,
      float64 for float64 logits); with ``return_entropy``,
      ``(log_probs, entropy)``. Under ``jit`` a target outside ``[0, C)``
      (not ``ignore_index``) gives NaN at its position and ``temperature <=
      0`` NaN everywhere, values and gradients.

    Raises:
      TypeError: integer ``logits``, a non-integer ``target``, a non-boolean
        ``where``.
      ValueError: a target shape that does not match, a concrete target out of
        range, a concrete ``temperature <= 0``, a bad ``axis`` or ``where``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> logits = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
      >>> lp, ent = jxent.log_probs(logits, jnp.array([0, 2]), temperature=0.7,
      ...                           return_entropy=True)
      >>> lp
      Array([-0.2668..., -5.0621...], dtype=float32)
      >>> ent
      Array([0.6667..., 0.2480...], dtype=float32)
    """
    ignore_index = check_ignore_index(ignore_index)
    return_entropy = check_bool(return_entropy, "return_entropy")
    logits = as_float_array(logits, "logits")
    axis = normalize_axis(axis, logits.ndim, "logits")
    check_has_classes(logits.shape, axis)
    target = check_target_for(target, logits.shape, axis, "logits", ignore_index)
    temperature = check_temperature(temperature)
    where = check_class_mask(where, logits.shape, axis)
    layout = explicit_layout(logits, axis)
    if layout is not None:
        return _explicit_sharded_log_probs(
            logits, target, temperature, where, layout, axis=axis,
            ignore_index=ignore_index, return_entropy=return_entropy,
        )  # fmt: skip
    return _log_probs(
        logits, target, temperature, where, axis=axis, ignore_index=ignore_index,
        return_entropy=return_entropy,
    )  # fmt: skip


def _explicit_sharded_log_probs(
    logits, target, temperature, where, layout, *, axis, ignore_index,
    return_entropy,
):  # fmt: skip
    """``log_probs`` on logits sharded over Explicit mesh axes.

    Runs under ``jax.shard_map`` with the classes split as the logits are
    (the softmax's sums all-reduced: O(N) values cross devices); the target
    and ``where`` are resharded to match.
    """
    from jax.sharding import NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh, spec = layout
    class_axes = axes_of([spec[axis]])
    check_class_split(
        logits.shape[axis], mesh, class_axes, "The class axis of `logits`"
    )
    batch_spec = P(*(spec[:axis] + spec[axis + 1 :]))
    target = jax.reshard(target, NamedSharding(mesh, batch_spec))
    if where is not None:
        where = jax.reshard(jnp.asarray(where), NamedSharding(mesh, P(*spec)))

    def local(logits, target, where):
        lp, ent = token_log_probs(
            logits.astype(compute_dtype(logits.dtype)), target, temperature,
            where, axis=axis, ignore_index=ignore_index,
            with_entropy=return_entropy, shards=ClassShards(class_axes),
        )  # fmt: skip
        return (lp, ent) if return_entropy else lp

    outs = (batch_spec, batch_spec) if return_entropy else batch_spec
    in_specs = (P(*spec), batch_spec, None if where is None else P(*spec))
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=outs)(
        logits, target, where
    )


# --- distillation_loss ------------------------------------------------------------


def safe_beta(beta: ArrayLike, dtype) -> tuple[jax.Array, jax.Array]:
    """``(beta, bad)``: beta sanitised to 0.5 where it is outside [0, 1]."""
    b = jnp.asarray(beta, dtype)
    bad = ~((b >= 0) & (b <= 1))
    return sanitised(b, bad, 0.5), bad


def distillation_terms(
    student: jax.Array,
    teacher: jax.Array,
    valid: jax.Array,
    temperature: jax.Array,
    beta: jax.Array,
    *,
    mode: Mode,
    axis: int,
    shards: ClassShards = UNSHARDED,
) -> jax.Array:
    """Per-position divergence of two logits arrays (accumulation dtype).

    ``temperature`` and ``beta`` are sanitised; ``valid`` is False at ignored
    positions, which give 0 with zero derivatives.
    """
    row = ~_expand(valid, axis)
    s_ex = (student == -jnp.inf) | row
    t_ex = (teacher == -jnp.inf) | row
    p = softmax_parts(student, s_ex, temperature, axis, shards)
    q = softmax_parts(teacher, t_ex, temperature, axis, shards)
    value = divergence(p, s_ex, q, t_ex, beta, mode, axis, shards)
    return jnp.where(valid, value, 0.0)


@functools.partial(jax.custom_jvp, nondiff_argnums=(5, 6))
def _distillation_rows(student, teacher, valid, temperature, beta, mode, axis):
    """``distillation_terms`` of materialised logits, hand-derived derivatives.

    The derivatives are formed from the two softmaxes
    (``_divergence_gradients``) and rematerialised, not traced through the
    divergence's logarithms, so that fewer logits-sized pieces are kept
    between the passes: value_and_grad w.r.t. both logits at (8192, 32768)
    float32 on the CPU holds 3.0 GiB of temporaries instead of 4.0 (the JSD:
    4.0 instead of 9.0), and reads or writes the logits 45 times instead of
    57 (64 instead of 89); on an H100 the bfloat16 JSD 1.0 GiB instead of
    4.0, 18 passes instead of 34 (deviceless compilation).
    """
    return distillation_terms(
        student, teacher, valid, temperature, beta, mode=mode, axis=axis
    )


@functools.partial(_distillation_rows.defjvp, symbolic_zeros=True)
def _distillation_rows_jvp(mode, axis, primals, tangents):
    value = _distillation_rows(*primals, mode, axis)
    t_student, t_teacher, _, t_temperature, t_beta = (
        None if isinstance(t, SymbolicZero) else t for t in tangents
    )
    if all(t is None for t in (t_student, t_teacher, t_temperature, t_beta)):
        return value, jnp.zeros_like(value)
    # Rematerialised: reverse mode recomputes the softmaxes in the pass that
    # writes the gradient instead of keeping logits-sized pieces.
    tangent_map = jax.checkpoint(
        functools.partial(_distillation_tangent, mode=mode, axis=axis),
        prevent_cse=False,
    )
    return value, tangent_map(*primals, t_student, t_teacher, t_temperature, t_beta)


def _distillation_tangent(student, teacher, valid, temperature, beta, t_student,
                          t_teacher, t_temperature, t_beta, *, mode, axis):  # fmt: skip
    """The tangent of ``_distillation_rows``, linear in the tangents."""
    row = ~_expand(valid, axis)
    s_ex = (student == -jnp.inf) | row
    t_ex = (teacher == -jnp.inf) | row
    p = softmax_parts(student, s_ex, temperature, axis)
    q = softmax_parts(teacher, t_ex, temperature, axis)
    g_p, g_q, g_beta = _divergence_gradients(p, s_ex, q, t_ex, beta, mode, axis)

    def along(g, excluded, logits, t_logits):
        """``Σ_c g dz`` for ``z = logits / T``: ``dz = (dlogits - z dT) / T``."""
        if t_logits is None and t_temperature is None:
            return None
        dz = 0.0
        if t_logits is not None:
            dz = jnp.where(excluded, 0.0, t_logits)
        if t_temperature is not None:
            dz = dz - jnp.where(excluded, 0.0, logits) / temperature * t_temperature
        return jnp.sum(g * dz, axis=axis) / temperature

    parts = [along(g_p, s_ex, student, t_student), along(g_q, t_ex, teacher, t_teacher)]
    if t_beta is not None:
        parts.append(g_beta * t_beta)
    tangent = functools.reduce(jnp.add, [t for t in parts if t is not None])
    return jnp.where(valid, tangent, 0.0)


@functools.partial(
    jax.jit, static_argnames=("axis", "ignore_index", "reduction", "mode")
)
def _distillation_loss(student, teacher, target, temperature, beta, *, axis,
                       ignore_index, reduction, mode):  # fmt: skip
    dtype = compute_dtype(student.dtype, teacher.dtype)
    bad_t = safe_temperature(temperature, dtype)[1]
    bad_beta = safe_beta(beta, dtype)[1]
    batch_shape = student.shape[:axis] + student.shape[axis + 1 :]
    if target is None:
        valid = jnp.ones(batch_shape, bool)
        bad = jnp.zeros(batch_shape, bool)
    else:
        valid = target != ignore_index
        bad = valid & ~((target >= 0) & (target < student.shape[axis]))
    # A bad temperature or beta makes every value NaN, and every derivative
    # (also the ignored positions', and beta's); a NaN sum or mean over a bad
    # target too, as jxent's other losses.
    # Per position ("none"), a bad target still reaches the shared scalars:
    # beta's derivative at 0 or 1 had no path through the selected KL.
    flag = bad_t | bad_beta
    scalar_flag = flag | jnp.any(bad)
    if reduction != "none":
        flag = scalar_flag
    student, teacher = (
        poison_gradients(jnp.asarray(v), flag, True) for v in (student, teacher)
    )
    temperature, beta = (
        poison_gradients(jnp.asarray(v), scalar_flag, True) for v in (temperature, beta)
    )
    temperature = safe_temperature(temperature, dtype)[0]
    beta = safe_beta(beta, dtype)[0]
    loss = _distillation_rows(
        student.astype(dtype), teacher.astype(dtype), valid, temperature, beta,
        mode, axis,
    )  # fmt: skip
    loss = poison(loss, bad | bad_t | bad_beta)
    denominator = jnp.sum(valid.astype(dtype))
    return reduce_loss(loss, reduction, denominator, dtype)


def check_same_logits_shapes(
    student_shape, teacher_shape, student_name: str, teacher_name: str, inputs=""
) -> None:
    """Student and teacher need the same positions and vocabulary.

    ``inputs``: the shapes the logits come from, for the message.
    """
    if tuple(student_shape) != tuple(teacher_shape):
        raise ValueError(
            f"`{student_name}` and `{teacher_name}` must have the same shape (the "
            f"same positions and vocabulary): `{student_name}`.shape="
            f"{tuple(student_shape)}, `{teacher_name}`.shape={tuple(teacher_shape)}"
            f"{inputs}."
        )


def distillation_loss(
    logits: ArrayLike,
    teacher_logits: ArrayLike,
    target: ArrayLike | None = None,
    *,
    beta: ArrayLike = 0.0,
    temperature: ArrayLike = 1.0,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    axis: int = -1,
) -> jax.Array:
    r"""Distillation divergence between a student's and a teacher's logits.

    Per position, with the student's ``p = softmax(logits / T)`` and the
    teacher's ``q = softmax(teacher_logits / T)``:

    * ``beta = 0``: the forward KL, ``KL(q ‖ p) = Σ_c q_c (log q_c - log p_c)``
      (the usual distillation loss);
    * ``beta = 1``: the reverse KL, ``KL(p ‖ q)``;
    * ``0 < beta < 1``: the generalised Jensen-Shannon divergence
      ``beta · KL(q ‖ m) + (1 - beta) · KL(p ‖ m)`` with
      ``m = beta · q + (1 - beta) · p`` (``beta = 0.5``: the JSD).

    Classes with zero probability (``-inf`` logits) add 0; a class where the
    first distribution of a KL has mass and the second none gives ``+inf``.
    Positions whose ``target`` is ``ignore_index`` are excluded (0, zero
    gradients); ``target`` is used for nothing else. ``"mean"`` divides the sum
    by the number of included positions (0 when there are none), ``"sum"``
    sums, ``"none"`` keeps each position. There is no ``T²`` factor (Hinton
    et al. scale the loss by ``T²`` to keep gradient magnitudes across
    temperatures): multiply the result by ``temperature**2`` for that.

    Both logits are computed on in float32 for 16-bit inputs. Differentiable
    w.r.t. both logits, ``temperature`` and ``beta`` (between the endpoints),
    in forward and reverse mode, to any order.

    Args:
      logits: the student's floating logits, classes on ``axis``.
      teacher_logits: the teacher's logits, of the same shape (wrap them in
        ``jax.lax.stop_gradient`` to keep the teacher fixed).
      target: optional integer class indices, the logits' shape without
        ``axis``: positions equal to ``ignore_index`` are excluded.
      beta: in ``[0, 1]``, see above (traced; a concrete value selects the
        formula when tracing).
      temperature: ``T > 0`` (traced).
      ignore_index: the target value of excluded positions.
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      axis: the class axis.

    Returns:
      The loss in the accumulation dtype (float32, float64 for float64
      logits): a scalar, or the logits' shape without ``axis`` for
      ``"none"``. Under ``jit`` a target outside ``[0, C)`` (not
      ``ignore_index``) gives NaN at its position, and ``temperature <= 0`` or
      ``beta`` outside ``[0, 1]`` NaN everywhere, values and gradients; a NaN
      ``"mean"`` or ``"sum"`` has NaN gradients w.r.t. every input.

    Raises:
      TypeError: integer logits or a non-integer ``target``.
      ValueError: student and teacher shapes that differ, a bad target shape,
        a concrete target out of range, a concrete ``temperature <= 0`` or
        ``beta`` outside ``[0, 1]``, a bad ``reduction`` or ``axis``.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> student = jnp.array([[2.0, 1.0, 0.1], [0.5, 2.5, -1.0]])
      >>> teacher = jnp.array([[1.5, 1.5, 0.0], [0.0, 3.0, -2.0]])
      >>> jxent.distillation_loss(student, teacher)  # KL(teacher ‖ student)
      Array(0.0747..., dtype=float32)
      >>> jxent.distillation_loss(student, teacher, beta=0.5, temperature=2.0)
      Array(0.0075..., dtype=float32)
    """
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    logits = as_float_array(logits, "logits")
    teacher_logits = as_float_array(teacher_logits, "teacher_logits")
    check_same_logits_shapes(
        logits.shape, teacher_logits.shape, "logits", "teacher_logits"
    )
    axis = normalize_axis(axis, logits.ndim, "logits")
    check_has_classes(logits.shape, axis)
    if target is not None:
        target = check_target_for(target, logits.shape, axis, "logits", ignore_index)
    temperature = check_temperature(temperature)
    beta = check_unit_interval(beta, "beta")
    return _distillation_loss(
        logits, teacher_logits, target, temperature, beta, axis=axis,
        ignore_index=ignore_index, reduction=reduction, mode=divergence_mode(beta),
    )  # fmt: skip
