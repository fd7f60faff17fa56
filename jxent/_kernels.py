"""Row statistics of logits with hand-written gradients.

Everything that touches an array of logits size lives here. The losses in
``_classification.py`` combine the O(N) results with ordinary JAX code, so
autodiff handles weights, smoothing, z-loss, masks and reductions, while the
passes over the logits stay few:

* forward on the CPU: one reduction for the sum of exponentials shifted by the
  target's logit (the row maximum only when that overflows), a matrix-vector
  product for the smoothing sum when it is needed, and a gather of one element
  per row;
* forward on accelerators, with smoothing or for small arrays: one variadic
  reduction that carries the running maximum, the rescaled sum of exponentials
  and the smoothing sum together (no data-dependent branch, which would make
  the device wait for the host); large plain arrays take the CPU's path;
* derivatives: a ``jax.custom_jvp`` whose tangent map is linear in the
  tangents of the logits, the class weights and the cap, and rematerialised,
  so that reverse mode (its transpose) is one fused elementwise pass that
  recomputes the softmax from the saved logsumexp (nothing of logits size is
  saved) with the one-hot target term as arithmetic in the same pass; forward
  mode and higher orders use the same rule. On the CPU, where an ``exp``
  costs more than a pass over memory, float32 and float64 logits without a
  soft cap keep the forward's exponentials instead, and the pass rescales
  them (``_keeps_exps``).
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import TypeVar

import jax
import jax.numpy as jnp
from jax import lax
from jax.custom_batching import custom_vmap
from jax.custom_derivatives import SymbolicZero

from jxent._safe_math import poison
from jxent._sharding import UNSHARDED, ClassShards

T = TypeVar("T")


def compute_dtype(*dtypes: jnp.dtype) -> jnp.dtype:
    """The accumulation dtype: float32, or float64 if any input is float64.

    The same under either ``jax_numpy_dtype_promotion``: ``jnp.promote_types``
    would raise under ``"strict"`` for bfloat16 and float16 inputs.
    """
    if any(jnp.dtype(d) == jnp.float64 for d in dtypes):
        return jnp.dtype(jnp.float64)
    return jnp.dtype(jnp.float32)


def along_axis(vector: jax.Array, ndim: int, axis: int) -> jax.Array:
    """Reshapes a length-C vector to rank ``ndim`` with its entries on ``axis``."""
    shape = [1] * ndim
    shape[axis] = vector.shape[0]
    return vector.reshape(shape)


def take_target(x: jax.Array, target: jax.Array, axis: int) -> jax.Array:
    """``x[..., target, ...]`` per position: each position's entry on ``axis``.

    ``target`` must be in range (sanitised). A batched gather
    (``take_along_axis``) rather than an index tuple: XLA's SPMD partitioner
    keeps it local to each batch shard instead of all-gathering the indices.
    """
    picked = jnp.take_along_axis(
        x, jnp.expand_dims(target, axis), axis=axis, mode="promise_in_bounds"
    )
    return jnp.squeeze(picked, axis)


def capped_logits(logits: jax.Array, soft_cap: jax.Array | None) -> jax.Array:
    """Logits in the accumulation dtype, soft-capped: ``c · tanh(x / c)``.

    A traced cap that is not finite and > 0 (refused when concrete; ``c · tanh(x / c)``
    is even in ``c``, so a negative one would pass as its absolute value)
    makes every capped logit NaN, with NaN derivatives w.r.t. the logits and
    the cap (``poison``).
    """
    x = logits.astype(compute_dtype(logits.dtype))
    if soft_cap is None:
        return x
    cap = jnp.asarray(soft_cap, x.dtype)
    return _soft_capped(x, poison(cap, invalid_soft_cap(cap)))


def invalid_soft_cap(soft_cap: jax.Array | float | None) -> jax.Array | bool:
    """Whether a traced ``soft_cap`` is not finite and > 0; None is valid."""
    if soft_cap is None:
        return False
    cap = jnp.asarray(soft_cap)
    return ~((cap > 0) & (cap < jnp.inf))


@jax.custom_jvp
def _soft_capped(x: jax.Array, cap: jax.Array) -> jax.Array:
    return cap * jnp.tanh(x / cap)


@functools.partial(_soft_capped.defjvp, symbolic_zeros=True)
def _soft_capped_jvp(primals, tangents):
    x, cap = primals
    t_x, t_cap = map(_nonzero, tangents)
    u, tanh = scaled_tanh(x, cap)
    out = cap * tanh
    slope = 1 - tanh**2
    tangent = jnp.zeros_like(out) if t_x is None else t_x * slope
    if t_cap is not None:
        tangent = tangent + t_cap * (tanh - u * slope)
    return out, tangent


def scaled_tanh(x: jax.Array, cap: jax.Array) -> tuple[jax.Array, jax.Array]:
    """``(u, tanh(u))`` with ``u = x / cap`` clipped to ``[-20, 20]``.

    The parts of ``cap · tanh(x / cap)`` and of its derivatives
    (``sech²(u) = 1 - tanh²``; ``d/dcap = tanh(u) - u · sech²(u)``). Past
    ``|u| = 20``, ``tanh`` is ``±1`` in float32 and float64 and ``u ·
    sech²(u)`` below 1e-15, so the clip changes no value, and an infinite
    logit (a masked vocabulary column) caps to ``±cap`` with the limits as
    derivatives of every order (0 w.r.t. ``x``, ``±1`` w.r.t. ``cap``)
    instead of ``inf · 0``. A clip, not a select: a ``custom_jvp`` rule with
    selects failed to lower under ``jit`` of ``grad`` of a ``vmap`` over a
    later axis (jax 0.10.2).
    """
    bound = 20.0 * cap  # x clipped before dividing: no inf / cap to differentiate
    u = jnp.clip(x, -bound, bound) / cap
    return u, jnp.tanh(u)


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


def _total_weight(class_weight, class_mask, x, axis, shards):
    """Σ_c w_c over included classes: a scalar, or per position with a mask.

    ``x`` only provides the shape and the dtype (an array or ShapeDtypeStruct).
    """
    if class_mask is None:
        if class_weight is None:
            return shards.num_classes(x.shape[axis])
        return shards.sum(jnp.sum(class_weight.astype(x.dtype)))
    w = _smoothing_weights(class_weight, class_mask, len(x.shape), axis, x.dtype)
    return shards.sum(jnp.sum(w, axis=axis))


# XLA's CPU reductions (the YNNPACK fusion) run several times faster with at
# least this many rows: short, wide batches are split into more, shorter rows.
_MIN_REDUCTION_ROWS = 2048


def known_sizes(*sizes) -> bool:
    """Whether every size is a known integer, for a heuristic to compare.

    Under ``jax.export``'s shape polymorphism a dimension can be symbolic
    (``"b"``), and comparing it with a constant raises; the size heuristics
    then take their general choice, which is right for any size.
    """
    return all(isinstance(s, int) for s in sizes)


def _row_split(num_rows: int, num_classes: int) -> int:
    """How many pieces to cut each row into (1: leave the rows alone)."""
    split = 1
    if not known_sizes(num_rows, num_classes):
        return split
    while (
        num_rows * split < _MIN_REDUCTION_ROWS
        and num_classes % (2 * split) == 0
        and num_classes // (2 * split) >= 1024
    ):
        split *= 2
    return split


def _partitioned_by_xla(x: jax.Array) -> bool:
    """Whether XLA's SPMD partitioner may split ``x`` across devices.

    True for arrays on a mesh with Auto or Explicit axes (inside ``jax.jit``
    with sharded inputs); False for one device and inside ``shard_map``,
    whose Manual axes leave each device a local array.
    """
    try:
        mesh = jax.typeof(x).sharding.mesh
        sizes, kinds = mesh.axis_sizes, mesh.axis_types
    except (AttributeError, TypeError):
        return False
    manual = jax.sharding.AxisType.Manual
    return any(
        size > 1 and kind != manual for size, kind in zip(sizes, kinds, strict=True)
    )


def on_cpu(cpu: Callable[[], T], other: Callable[[], T]) -> T:
    """``cpu()`` in a program compiled for the CPU, ``other()`` elsewhere.

    Chosen when the program is lowered for a platform (``lax.platform_dependent``),
    not by ``jax.default_backend()`` at trace time: a program traced on a CPU
    host and compiled for a TPU or GPU (ahead of time, ``jax.export``, or a
    process whose default backend is another) gets that platform's code. Only
    the chosen branch reaches the compiler. Both must return the same types;
    they read the caller's arrays by closure.
    """
    return lax.platform_dependent(cpu=cpu, default=other)


def _sum_exp_shifted(make_x, shift, axis, shape, partitioned, keep=False):
    """``Σ exp(x - shift)`` over ``axis`` (``shift`` has the kept axis).

    Short, wide rows are cut into more, shorter rows on the CPU, unless the
    logits may be ``partitioned`` across devices: merging a piece of a
    sharded class axis into the rows would make XLA all-gather the logits.

    ``make_x(rows)`` builds the transformed logits, reshaped to ``rows`` when
    given (the reshape happens on the raw logits, behind a barrier, so that
    XLA reduces a genuinely 2-D array: fused into the reduction, the split is
    lost again).

    With ``keep``, the pair ``(sum, exp(x - shift))``, the exponentials in
    the logits' shape.
    """
    split = _row_split(math.prod(shape) // max(shape[axis], 1), shape[axis])

    def whole_rows():
        e = jnp.exp(make_x() - shift)
        total = jnp.sum(e, axis=axis)
        return (total, e) if keep else total

    if axis != len(shape) - 1 or split == 1 or partitioned:
        return whole_rows()

    def split_rows():
        rows = make_x((-1, shape[-1] // split))
        row_shift = jnp.repeat(shift.reshape(-1), split).reshape(-1, 1)
        e = jnp.exp(rows - row_shift)
        partial_sums = jnp.sum(e, axis=-1)
        total = jnp.sum(partial_sums.reshape(*shape[:-1], split), axis=-1)
        return (total, e.reshape(shape)) if keep else total

    return on_cpu(split_rows, whole_rows)


@custom_vmap
def _unbatched_any(flag: jax.Array) -> jax.Array:
    """``flag``; under ``vmap``, whether any member's is True (unbatched)."""
    return flag


@_unbatched_any.def_vmap
def _unbatched_any_vmap(axis_size, in_batched, flag):
    del axis_size
    return (jnp.any(flag) if in_batched[0] else flag), False


def _redone_if(todo: jax.Array, value: jax.Array, redo: Callable[[], jax.Array]):
    """``redo()`` where the scalar ``todo`` is True, else ``value``.

    A while loop of at most one trip, not a ``lax.cond``: XLA copies a large
    operand that a conditional passes through unchanged, but updates a loop's
    carry in place. Under ``vmap`` the whole batch is redone if any member
    must be (redoing is always right), so the loop's predicate stays a
    scalar: ``checkify`` refuses a loop with a batched one ("Checkify does
    not support batched while-loops", with or without a check of its own).
    """
    todo = _unbatched_any(todo)
    # False, varying over the manual axes that ``todo`` varies over.
    done = jnp.logical_and(todo, False)
    return lax.while_loop(lambda c: c[1], lambda c: (redo(), done), (value, todo))[0]


def _scaled_log(weight_sum, log_sum):
    """``weight_sum · log_sum``, 0 where the weight sum is 0."""
    return jnp.where(weight_sum == 0, 0.0, weight_sum * log_sum)


def _row_max(x, axis, shards):
    """The row maximum over all classes (kept axis), non-finite ones as 0."""
    m = shards.max(jnp.max(x, axis=axis, keepdims=True))
    return jnp.where(jnp.isfinite(m), m, 0.0)


def _shift_and_log_sum(
    make_x, make_x_again, x_target, axis, shards, shape, partitioned, extra=None,
    keep=False,
):  # fmt: skip
    """A per-position shift ``s`` and ``log Σ_c exp(x_c - s)`` (sum: the lse).

    The shift is the target's logit, which saves the pass that finds the row
    maximum and makes ``nll = log Σ exp(x - x_t)`` exact. A logit more than
    ~88 above its target's overflows ``exp``; then (and for rows that are not
    finite at all) the whole batch is redone with the row maximum as the shift.
    ``make_x()`` and ``make_x_again()`` build the transformed logits for the
    first pass and the fallback, so that XLA fuses the transform into each
    reduction instead of storing it. With class shards the sums are all-reduced
    (so every device takes the same branch).

    ``extra``: optional ``(fast, fallback)``; ``fast(s, log_sum)`` returns a
    value and whether each position trusts it, ``fallback(s, log_sum)`` the
    value computed the slow way. One check (one all-reduce on a sharded batch)
    then decides both, and ``(s, log_sum, value)`` is returned.

    ``keep``: also return ``exp(x - s)`` (last), the first pass's
    exponentials, recomputed in place when the batch was redone.
    """
    shift = jnp.expand_dims(x_target, axis)
    sum_exp = _sum_exp_shifted(make_x, shift, axis, shape, partitioned, keep)
    if keep:
        sum_exp, exps = sum_exp
    log_sum = jnp.log(shards.sum(sum_exp))

    def with_row_max():
        m = _row_max(make_x_again(shield=True), axis, shards)
        sum_exp = _sum_exp_shifted(make_x_again, m, axis, shape, partitioned)
        log_sum = jnp.log(shards.sum(sum_exp))
        if extra is None:
            return jnp.squeeze(m, axis), log_sum
        # The smoothing sum gets the maximum (and the logits) through a barrier
        # of its own: shared with the exp-sum, XLA stored the maximum broadcast
        # to the logits' shape and the upcast logits. Not over class shards,
        # where the barrier would make the all-reduced maximum vary like the
        # logits' slice (shard_map's types).
        shift = jnp.squeeze(m, axis)
        tied = None if shards.sharded else m
        return shift, log_sum, extra[1](shift, log_sum, row_max=tied)

    # One sum instead of all(isfinite): it is finite iff every entry is (the
    # entries are at most ~88 + log C each).
    checked, fast = log_sum, (x_target, log_sum)
    if extra is not None:
        value, trusted = extra[0](x_target, log_sum)
        checked = jnp.where(trusted, log_sum, jnp.inf)
        fast = (*fast, value)
    stats = lax.cond(jnp.isfinite(jnp.sum(checked)), lambda: fast, with_row_max)
    if not keep:
        return stats
    s = jnp.expand_dims(stats[0], axis)
    # Rows whose shift is still the target's logit keep their exponentials
    # (NaN != NaN: a row of NaN logits is redone).
    exps = _redone_if(
        jnp.any(stats[0] != x_target),
        exps,
        lambda: jnp.exp(make_x_again(shield=True) - s),
    )
    return (*stats, exps)


def _fast_smoothing(
    class_dot, num_classes, shift, log_sum, class_weight, total_weight, shards
):
    """``(Σ_c w_c) · lse - x · w`` and whether each position trusts it.

    ``x · w = class_dot(w)`` is one matrix-vector product. Every term of the
    sum is >= 0, so the result is at least ``Σw · log C``; a position does
    not trust the fast form if it is not finite (0 · inf from a zero weight
    on a ``-inf`` logit) or ``|lse| · Σ|w|`` is over 4x it: the product's
    rounding error, of ``|x| · Σ|w|``, is amplified that much. XLA's CPU
    product accumulates its partial sums in float32; logits near a common
    value (343 ± 0.01 over 10^5 classes) gave it a relative error of ~1e-4,
    which 30x amplification (the bound was 64x) made 3e-3 of the loss, at
    label smoothing 1. Rows of LM logits (a mean logit below 3/4 of a
    positive lse) stay on the fast form.
    """
    lse = shift + log_sum
    if class_weight is None:
        w = jnp.ones((num_classes,), lse.dtype)
    else:
        w = class_weight.astype(lse.dtype)
    weighted_x = class_dot(w)
    weighted_x, abs_weight = shards.sum((weighted_x, jnp.sum(jnp.abs(w))))
    fast = total_weight * lse - weighted_x
    scale = jnp.abs(lse) * abs_weight
    return fast, jnp.isfinite(fast) & (scale <= 4.0 * jnp.abs(fast))


def _exact_smoothing(
    make_x_again, shift, log_sum, *, class_weight, class_mask, total_weight, axis,
    shards, row_max=None,
):  # fmt: skip
    """The smoothing sum term by term, from the row maximum (none negative).

    ``lse - max`` is formed as ``(shift - max) + log_sum``: the rounding of a
    large ``lse`` costs no digits either. ``row_max``: the maximum when the
    caller has it (kept axis), else found here.
    """
    if row_max is None:
        x = make_x_again()
        m = _row_max(make_x_again(shield=True), axis, shards)
    else:
        x, m = make_x_again(tie=row_max)
    w = _smoothing_weights(class_weight, class_mask, x.ndim, axis, x.dtype)
    gap = m - x
    if w is None:
        weighted_gap = shards.sum(jnp.sum(gap, axis=axis))
    else:
        # A zero weight on an impossible (-inf) class adds 0, not 0 * inf:
        # gaps are clamped to the largest finite value (a select here would
        # make XLA store the products), and a sum that large means +inf.
        big = jnp.finfo(x.dtype).max
        weighted_gap = jnp.sum(w * jnp.minimum(gap, big), axis=axis)
        weighted_gap = shards.sum(weighted_gap)
        weighted_gap = jnp.where(
            jnp.abs(weighted_gap) >= big / 16, jnp.inf, weighted_gap
        )
    lse_above_max = (shift - jnp.squeeze(m, axis)) + log_sum
    return weighted_gap + total_weight * lse_above_max


def _bfloat16_class_dot(logits: jax.Array, w: jax.Array, axis: int) -> jax.Array:
    """``logits · w`` over ``axis`` for bfloat16 logits and float32 ``w``.

    ``w`` is split into three bfloat16 parts whose sum is ``w`` exactly (8
    significant bits each), so that a bfloat16 matrix product with float32
    accumulation gives the float32 result: the products are exact in float32.
    XLA's CPU backend runs that product on the bfloat16 logits directly,
    ~3x faster than a float32 matrix-vector product, which would first store a
    float32 copy of the logits.
    """
    parts = []
    rest = w
    for _ in range(3):
        part = rest.astype(jnp.bfloat16)
        parts.append(part)
        rest = rest - part.astype(w.dtype)
    by_part = jnp.tensordot(
        logits,
        jnp.stack(parts, axis=1),
        axes=([axis], [0]),
        preferred_element_type=w.dtype,
    )
    return jnp.sum(by_part, axis=-1)


# None: chosen by the default backend and the size (``_keeps_exps``). Tests
# set it.
_KEEP_EXPS: bool | None = None
_KEEP_EXPS_MAX_BYTES = 1 << 28


def _keeps_exps(logits: jax.Array, soft_cap, shards: ClassShards) -> bool:
    """Whether the CPU's forward keeps ``exp(x - shift)`` for the derivatives.

    On the CPU an ``exp`` costs more than a pass over memory: the gradient
    then rescales the forward's exponentials instead of recomputing them,
    0.52-0.95x the float32 value_and_grad time of recomputing them
    (``benchmarks/ab_revisions.py --base 163b51e``). XLA writes the gradient
    over them; logits computed in the same program stay alive beside them
    until the overflow check, as optax's logsumexp holds its own. So only up
    to 256 MiB of them: at (2048, 131072) float32 logits computed from
    (2048, 1024) states, the program held 2 GiB instead of 1 and took 1.06x
    the time (at (2048, 65536), 0.93x).

    Only for float32 and float64 logits without a soft cap (16-bit logits
    would double their traffic with float32 exponentials), with every class
    on this device, and in a process whose default backend is the CPU: a
    program lowered from it for another platform keeps the logits in the
    exponentials' place (a placeholder), from which that platform's
    derivatives recompute, so that they read no other logits-sized residual
    (a forward compiled apart outputs one, as on the chip).
    """
    if _ONE_PASS or soft_cap is not None or shards.sharded:
        return False
    if logits.dtype not in (jnp.float32, jnp.float64) or _partitioned_by_xla(logits):
        return False
    if _KEEP_EXPS is not None:
        return _KEEP_EXPS
    size = logits.size * logits.dtype.itemsize
    return (
        known_sizes(size)
        and size <= _KEEP_EXPS_MAX_BYTES
        and jax.default_backend() == "cpu"
    )


# None: chosen by platform and size (below). Tests set it.
_ONE_PASS: bool | None = None
_ONE_PASS_MAX_ELEMENTS = 1 << 24


def _one_pass_off_cpu(num_elements: int, smoothing: bool) -> bool:
    """Whether the forward takes the one-pass reduction on accelerators.

    Never on the CPU, where XLA runs variadic reductions several times slower
    (``_forward`` picks per platform with ``on_cpu``). On accelerators
    (measured on an H200): with smoothing (one pass instead of two) and for
    small arrays, where the host round trip of the overflow branch costs more
    than the pass; large plain arrays (and those of a symbolic size) are
    faster with the shifted sums, which take one exp per element.
    """
    if smoothing:
        return True
    return known_sizes(num_elements) and num_elements <= _ONE_PASS_MAX_ELEMENTS


def _one_pass_stats(x, w, axis, shards, smoothing):
    """``(m, log Σ exp(x - m), Σ w (m - x), Σ w)`` in one variadic reduction.

    ``m`` is the row maximum, found on the way: each partial result carries
    its own maximum and sums relative to it, and two partial results combine
    by rescaling to the larger maximum (the sums of ``w (m - x)`` grow by
    ``(m' - m) Σ w``); with class shards the shards' results combine alike.
    Every term is >= 0, so nothing cancels. ``w`` is None (all ones) or
    broadcasts against ``x``; masked classes have ``x = -inf`` and ``w = 0``.
    Without ``smoothing`` the last two are zeros.
    """

    # Two partial results combine at the larger maximum: the other one's sum
    # is rescaled by exp(-|gap|) (one exp per combination) and its gap sum
    # grows by its weight sum times |gap|. Equal maxima (also both ±inf,
    # where the gap would be NaN) leave both as they are; an empty part (zero
    # sum or weight) adds 0.
    def combine(a, b):
        m = jnp.maximum(a[0], b[0])
        same = a[0] == b[0]
        gap = jnp.where(same, 0.0, jnp.abs(a[0] - b[0]))
        factor = jnp.exp(-gap)
        a_top = a[0] >= b[0]
        low_sum = jnp.where(a_top, b[1], a[1])
        low_sum = jnp.where(low_sum == 0, 0.0, low_sum * factor)
        out = (m, jnp.where(a_top, a[1], b[1]) + low_sum)
        if smoothing:
            low_weight = jnp.where(a_top, b[3], a[3])
            growth = jnp.where((low_weight == 0) | same, 0.0, low_weight * gap)
            out = (*out, a[2] + b[2] + growth, a[3] + b[3])
        return out

    zero = jnp.zeros((), x.dtype)
    weight = None
    if smoothing:
        weight = jnp.broadcast_to(1.0 if w is None else w, x.shape).astype(x.dtype)
    # JAX differentiates a variadic reduction (the second-order derivatives
    # that differentiate this forward: a Hessian-vector product through
    # reverse mode) only when no operand's tangent is symbolically zero, as
    # the indicator's and the zeros' are. So every operand adds a zero that
    # depends on every differentiable input (finite times zero: exactly 0).
    anchor = jnp.where(jnp.isfinite(x), x, 0) * 0
    if weight is not None:
        anchor = anchor + jnp.where(jnp.isfinite(weight), weight, 0) * 0
    operands = [x + anchor, (x > -jnp.inf).astype(x.dtype) + anchor]
    inits = [jnp.asarray(-jnp.inf, x.dtype), zero]
    if weight is not None:
        operands += [anchor, weight + anchor]
        inits += [zero, zero]
    parts = lax.reduce(operands, inits, combine, (axis,))
    if shards.sharded:
        # Each shard rescales its partial result to the global maximum (by
        # combining it with an empty one there); then the sums add up.
        m = shards.max(parts[0])
        at_max = combine((m, *(jnp.zeros_like(m) for _ in parts[1:])), parts)
        parts = (m, *shards.sum(at_max[1:]))
    m, sum_exp = parts[0], parts[1]
    if not smoothing:
        return m, jnp.log(sum_exp), jnp.zeros_like(m), jnp.zeros_like(m)
    return m, jnp.log(sum_exp), parts[2], parts[3]


def _shield(x: jax.Array, tag: int) -> jax.Array:
    """``x`` behind an optimization barrier that copies nothing.

    XLA's CPU backend fuses the float32 upcast of 16-bit logits into a
    reduction only when that reduction is the sole user of the logits (and
    identical upcasts are merged). Other readers go through distinct barriers
    (the tag keeps XLA from merging them) so that each reduction keeps its
    upcast fused instead of sharing a stored float32 copy.
    """
    return lax.optimization_barrier((x, jnp.asarray(tag, jnp.int32)))[0]


def _forward(
    logits, target, class_weight, class_mask, soft_cap, axis, smoothing, shards,
    keep=False,
):  # fmt: skip
    def transformed(source, rows=None):
        mask = class_mask
        if rows is not None:
            source = _shield(source.reshape(rows), 5)
            mask = None if mask is None else mask.reshape(rows)
        return _masked(capped_logits(source, soft_cap), mask)

    # XLA fuses the upcast of 16-bit logits into the exp-sum reduction only if
    # that reduction is the sole user of the logits: the gather of the target
    # logits and the fallback branch read them through an optimization barrier
    # (which copies nothing), and the gathered N values are transformed alone.
    shielded = _shield(logits, 1)
    local_target, here = shards.localise(target, logits.shape[axis])
    x_target = capped_logits(take_target(shielded, local_target, axis), soft_cap)
    if class_mask is not None:
        included = take_target(class_mask, local_target, axis)
        x_target = jnp.where(included, x_target, -jnp.inf)
    x_target = shards.pick(x_target, here)

    def again(rows=None, shield=False, tie=None):
        if tie is not None:  # the logits and ``tie`` through one barrier
            source, tie = lax.optimization_barrier((shielded, tie))
            return transformed(source, rows), tie
        return transformed(_shield(shielded, 2) if shield else shielded, rows)

    def one_pass():
        w = None
        if smoothing:
            w = _smoothing_weights(
                class_weight, class_mask, logits.ndim, axis, x_target.dtype
            )
        m, log_sum, gaps, total_weight = _one_pass_stats(
            transformed(logits), w, axis, shards, smoothing
        )
        lse = m + log_sum
        nll = (m - x_target) + log_sum
        # Σ w (lse - x) = Σ w (m - x) + Σ w · log Σ exp(x - m)
        smooth = gaps + _scaled_log(total_weight, log_sum) if smoothing else gaps
        return lse, nll, smooth, m, log_sum

    def shifted():
        return _shifted_stats(
            logits, class_weight, class_mask, soft_cap, axis, smoothing, shards,
            transformed, again, x_target,
        )  # fmt: skip

    def elsewhere():
        if _ONE_PASS is not None:
            return one_pass() if _ONE_PASS else shifted()
        if not _one_pass_off_cpu(logits.size, smoothing):
            return shifted()
        if _partitioned_by_xla(logits):
            # The TPU's partitioner splits a variadic reduction over a sharded
            # class axis with an all-gather per operand (four with smoothing):
            # there sharded logits take the shifted sums' all-reduces.
            return lax.platform_dependent(cpu=shifted, tpu=shifted, default=one_pass)
        return on_cpu(shifted, one_pass)

    if not keep:
        return elsewhere()

    def kept():
        return _shifted_stats(
            logits, class_weight, class_mask, soft_cap, axis, smoothing, shards,
            transformed, again, x_target, keep=True,
        )  # fmt: skip

    # Elsewhere the placeholder is the logits, which the derivatives read in
    # its place (``_tangent_map``): no second logits-sized residual.
    return on_cpu(kept, lambda: (*elsewhere(), logits))


def _shifted_stats(
    logits, class_weight, class_mask, soft_cap, axis, smoothing, shards,
    transformed, again, x_target, keep=False,
):  # fmt: skip
    """The forward's statistics from shifted sums (the CPU's path).

    With smoothing and no class mask, the overflow check and the fast
    smoothing sum's check are one (one all-reduce on a sharded batch): a
    batch that fails either is redone with the row maximum and the exact
    smoothing sum. ``keep``: ``exp(x - shift)`` is appended to the five
    statistics.
    """
    shape = jax.ShapeDtypeStruct(logits.shape, compute_dtype(logits.dtype))
    num_classes = logits.shape[axis]

    def class_dot(w):
        if soft_cap is None and logits.dtype == jnp.bfloat16:
            return _bfloat16_class_dot(_shield(logits, 3), w, axis)
        x = transformed(_shield(logits, 3))
        return jnp.tensordot(x, w, axes=([axis], [0]))

    extra = None
    if smoothing:
        total_weight = _total_weight(class_weight, class_mask, shape, axis, shards)
        exact = functools.partial(
            _exact_smoothing, again, class_weight=class_weight,
            class_mask=class_mask, total_weight=total_weight, axis=axis,
            shards=shards,
        )  # fmt: skip
        if class_mask is None:
            fast = functools.partial(
                _fast_smoothing, class_dot, num_classes,
                class_weight=class_weight, total_weight=total_weight, shards=shards,
            )  # fmt: skip
            extra = (fast, exact)
    shift, log_sum, *rest = _shift_and_log_sum(
        lambda rows=None: transformed(logits, rows),
        again,
        x_target,
        axis,
        shards,
        logits.shape,
        _partitioned_by_xla(logits),
        extra,
        keep,
    )
    exps = (rest.pop(),) if keep else ()
    lse = shift + log_sum
    # (s - x_t) + log Σ exp(x - s) keeps the digits that lse - x_t would lose
    # to rounding when the logits are large.
    nll = (shift - x_target) + log_sum
    if not smoothing:
        smooth = jnp.zeros_like(lse)
    elif class_mask is not None:
        smooth = exact(shift, log_sum)
    else:
        smooth = rest[0]
    return lse, nll, smooth, shift, log_sum, *exps


@functools.partial(jax.custom_jvp, nondiff_argnums=(7, 8, 9, 10))
def cross_entropy_stats(
    logits: jax.Array,
    target: jax.Array,
    live: jax.Array,
    class_weight: jax.Array | None,
    class_mask: jax.Array | None,
    soft_cap: jax.Array | None,
    unsmoothed: jax.Array | None,
    axis: int,
    smoothing: bool,
    shards: ClassShards = UNSHARDED,
    keep_exps: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array, jax.Array, jax.Array | None]:
    """Per-position statistics of the logits needed by cross-entropy.

    With ``x = soft_cap · tanh(logits / soft_cap)`` (or the logits) and
    excluded classes set to ``-inf``:

    Args:
      logits: array of any float dtype with the classes on ``axis``.
      target: int32 array, ``logits.shape`` without ``axis``, every entry a
        class index in range (callers sanitise ignored entries first).
      live: boolean array of the target's shape: False for ignored positions,
        whose statistics the loss discards. Their derivatives are computed
        from zeros when their logits are not finite, so that a zero cotangent
        gives an exactly zero gradient instead of ``0 · NaN``.
      class_weight: ``None`` (all ones) or a length-C vector, used only by the
        smoothing term.
      class_mask: ``None`` or a boolean array of ``logits.shape``: classes
        where it is False take no part in the softmax or the smoothing.
      soft_cap: ``None`` or a positive scalar.
      unsmoothed: ``None`` or a boolean scalar, True when the smoothing
        coefficient that will multiply ``s`` is 0: ``s``'s derivative w.r.t.
        a class weight whose gap is infinite (a ``-inf`` logit) is then 0,
        as the loss's own ``0 · s`` is 0, so that the zero cotangent does
        not meet ``+inf`` in the transpose.
      axis: the (non-negative) class axis.
      smoothing: whether to compute the smoothing term (else it is zeros).
      shards: how the class axis is split across devices (inside shard_map):
        ``logits``, ``class_weight`` and ``class_mask`` are then this device's
        slice, ``target`` holds global indices.
      keep_exps: whether the derivatives may reuse the forward's
        exponentials where that pays (``_keeps_exps``).

    Returns:
      ``(lse, nll, s, shift, log_sum, exps)`` in the accumulation dtype, the
      first five of the target's shape: ``lse = log Σ_c exp(x_c)``,
      ``nll = lse - x[target]``, ``s = Σ_c w_c (lse - x_c)`` over included
      classes, and the forward's own split of ``lse = shift + log_sum``
      (``shift`` the target's logit or the row maximum,
      ``log_sum = log Σ_c exp(x_c - shift)``), kept unrounded for the
      derivatives (tangents: 0 and ``dlse``; not for the loss). ``exps`` is
      None, or on the CPU (see ``_keeps_exps``) the logits-shaped
      ``exp(x - shift)`` (tangent ``exp(x - shift) dx``), for the
      derivatives only.

    Derivatives (any order, forward and reverse mode) come from a
    ``jax.custom_jvp`` whose tangent map is linear in the tangents of the
    logits, the class weights and the cap (``p = softmax(x)``):
    ``dlse = Σ_c p_c dx_c``, ``dnll = Σ_c (p_c - [c = y]) dx_c`` and
    ``ds = (Σ_c w_c) dlse - Σ_c w_c dx_c + Σ_c dw_c (lse - x_c)``. Reverse mode
    transposes it into one fused elementwise pass that writes the gradient;
    the map is rematerialised (``jax.checkpoint``), so nothing of logits size
    is saved between the passes but the CPU's ``exps``: only the logits and
    the O(N) statistics (``p`` is formed as ``exp((x - shift) - log_sum)``,
    or ``exps · exp(-log_sum)``, which keeps the digits that a rounded large
    ``lse`` or ``nll`` would lose: a row whose top classes tie far above its
    target still gets ``p = 1/k`` for them).
    """
    keep = keep_exps and _keeps_exps(logits, soft_cap, shards)
    stats = _forward(
        logits, target, class_weight, class_mask, soft_cap, axis, smoothing, shards,
        keep,
    )  # fmt: skip
    return (*stats, None) if not keep else stats


def _one_hot(target: jax.Array, shape: tuple[int, ...], axis: int, dtype) -> jax.Array:
    """``1.0`` where the index on ``axis`` equals ``target``, else ``0.0``.

    Written as ``max(1 - |c - t|, 0)`` rather than a comparison and a select:
    XLA's CPU backend vectorises the arithmetic into the surrounding fused
    pass for free, while a compare-and-select costs ~50% more for 16-bit
    outputs.
    """
    index = lax.broadcasted_iota(target.dtype, shape, axis)
    gap = index - jnp.expand_dims(target, axis)
    return jnp.maximum(1.0 - jnp.abs(gap.astype(dtype)), 0.0)


def _tangent_map(
    logits, target, live, class_weight, class_mask, soft_cap, lse,
    t_logits, t_weight, t_cap, *, axis, smoothing, shards, total_weight=None,
    reference=None, unsmoothed=None, exps=None,
):  # fmt: skip
    """The tangents ``(dlse, dnll, ds)`` (see ``cross_entropy_stats``).

    ``reference``: the forward's ``(shift, log_sum)``, from which ``p`` is
    formed; without it (a caller holding only ``lse``), from ``lse``.
    ``exps``: with ``reference``, the forward's ``exp(x - shift)`` (no soft
    cap), which the CPU's ``p`` rescales instead of recomputing.

    ``total_weight`` (``Σ_c w_c`` over included classes) is computed from
    the class weights and mask when not given (a caller holding only a block
    of the classes passes the whole sum).

    ``t_logits``, ``t_weight`` and ``t_cap`` are None where the tangent is a
    symbolic zero, so that no term is formed for an input that is not being
    differentiated (an infinite partial derivative there would otherwise give
    ``inf · 0 = NaN``).
    """
    dtype = compute_dtype(logits.dtype)

    def expand(v):
        return jnp.expand_dims(v, axis)

    # Ignored rows with non-finite logits are differentiated at zeros: the
    # loss discards them, and their zero cotangents then give exact zeros.
    dead = ~live & ~jnp.isfinite(lse)
    lse = jnp.where(dead, 0.0, lse)

    def zeroed(source):
        return jnp.where(expand(dead), jnp.zeros((), source.dtype), source)

    # A barrier keeps the forward's exp-sum the only direct user of the raw
    # logits, so that XLA fuses the upcast of 16-bit logits there (see
    # _forward) instead of sharing a stored float32 copy.
    logits = zeroed(_shield(logits, 4))
    # lse - x_c as (shift - x_c) + log_sum, the forward's own split: a large
    # lse (or nll) is rounded in float32 (to units at 1e8), log_sum keeps its
    # digits, and the difference of two logits is exact when they are close
    # (classes tied at 1e8, far above the target or not, share p). A caller
    # without the split (a block of the classes) uses lse.
    ref, rel = lse, jnp.zeros_like(lse)
    if reference is not None:
        shift, log_sum = reference
        usable = jnp.isfinite(shift) & jnp.isfinite(log_sum) & ~dead
        ref = jnp.where(usable, shift, lse)
        rel = jnp.where(usable, log_sum, 0.0)
    x = logits.astype(dtype)
    t_x = None if t_logits is None else t_logits.astype(dtype)
    if soft_cap is not None:
        cap = jnp.asarray(soft_cap, dtype)
        u, tanh = scaled_tanh(x, cap)
        slope = 1 - tanh**2  # d capped / d logits
        if t_cap is not None:
            # d capped / d cap = tanh(x/c) - (x/c) · (1 - tanh²(x/c))
            t_from_cap = (tanh - u * slope) * jnp.asarray(t_cap, dtype)
        x = cap * tanh
        if t_x is not None:
            t_x = t_x * slope
        if t_cap is not None:
            t_x = t_from_cap if t_x is None else t_x + t_from_cap
    x = _masked(x, class_mask)
    if t_x is not None and class_mask is not None:
        t_x = jnp.where(class_mask, t_x, 0.0)
    zeros = jnp.zeros_like(lse, dtype=dtype)  # keeps the varying mesh axes
    t_lse = t_nll = t_smooth = zeros
    if t_x is not None:

        def recomputed():
            return jnp.exp((x - expand(ref)) - expand(rel))

        def rescaled():
            # exp(x - shift) · exp((shift - ref) - rel): usable rows scale by
            # exp(-log_sum), live ones with non-finite statistics by
            # exp(shift - lse) (NaN where the recomputation has NaN), and
            # ignored non-finite rows take the recomputation's 1.
            factor = jnp.exp((reference[0] - ref) - rel)
            return jnp.where(expand(dead), 1.0, exps * expand(factor))

        def from_placeholder():
            # Off the CPU ``exps`` is the forward's placeholder, the logits
            # themselves (float32 or float64, no soft cap): read from it, the
            # derivatives need no other logits-sized residual, and a forward
            # compiled apart from them outputs one such array, as on the chip.
            x = _masked(zeroed(exps), class_mask)
            return jnp.exp((x - expand(ref)) - expand(rel))

        p = recomputed() if exps is None else on_cpu(rescaled, from_placeholder)
        local_target, here = shards.localise(target, logits.shape[axis])
        one_hot = _one_hot(local_target, x.shape, axis, dtype)
        if shards.sharded:
            one_hot = one_hot * expand(here.astype(dtype))
        t_lse = shards.sum(jnp.sum(p * t_x, axis=axis))
        t_nll = shards.sum(jnp.sum((p - one_hot) * t_x, axis=axis))
    if smoothing:
        w = _smoothing_weights(class_weight, class_mask, x.ndim, axis, dtype)
        if t_x is not None:
            if total_weight is None:
                total_weight = _total_weight(class_weight, class_mask, x, axis, shards)
            weighted = t_x if w is None else w * t_x
            t_smooth = total_weight * t_lse - shards.sum(jnp.sum(weighted, axis=axis))
        if t_weight is not None:
            gap = (expand(ref) - x) + expand(rel)  # lse - x
            # Excluded classes have no term; ignored positions' terms (+inf
            # for a -inf logit) are discarded before their zero cotangents
            # meet them in the transpose.
            kept = expand(live) if class_mask is None else class_mask & expand(live)
            gap = jnp.where(kept, gap, 0.0)
            if unsmoothed is not None:
                gap = jnp.where(unsmoothed & jnp.isinf(gap), 0.0, gap)
            t_w = along_axis(jnp.asarray(t_weight, dtype), x.ndim, axis)
            t_smooth = t_smooth + shards.sum(jnp.sum(t_w * gap, axis=axis))
    return t_lse, t_nll, t_smooth


def _nonzero(tangent):
    """``tangent``, or None for a symbolic zero (or a missing input)."""
    if tangent is None or isinstance(tangent, SymbolicZero):
        return None
    return tangent


@functools.partial(cross_entropy_stats.defjvp, symbolic_zeros=True)
def _cross_entropy_stats_jvp(axis, smoothing, shards, keep_exps, primals, tangents):
    out = cross_entropy_stats(*primals, axis, smoothing, shards, keep_exps)
    *primals, unsmoothed = primals
    exps = out[5]
    t_logits, _, _, t_weight, _, t_cap, _ = map(_nonzero, tangents)
    if not smoothing:
        t_weight = None
    no_tangents = tuple(None if o is None else jnp.zeros_like(o) for o in out)
    if t_logits is None and t_weight is None and t_cap is None:
        return out, no_tangents
    tangent_map = jax.checkpoint(
        functools.partial(_tangent_map, axis=axis, smoothing=smoothing, shards=shards),
        prevent_cse=False,
    )
    tangents = tangent_map(
        *primals, out[0], t_logits, t_weight, t_cap, reference=out[3:5],
        unsmoothed=unsmoothed, exps=exps,
    )  # fmt: skip
    # lse = shift + log_sum: the shift held fixed, log_sum moves with lse (so
    # the derivatives of the tangent map itself, higher orders, are right),
    # and exps = exp(x - shift) with x (there is no soft cap); off the CPU
    # exps is the logits (the placeholder) and moves with them.
    t_exps = no_tangents[5]
    if exps is not None and t_logits is not None:
        class_mask = primals[4]
        t_x = t_logits.astype(exps.dtype)

        def of_exps():
            masked = t_x if class_mask is None else jnp.where(class_mask, t_x, 0.0)
            return exps * masked

        t_exps = on_cpu(of_exps, lambda: t_x)
    return out, (*tangents, no_tangents[3], tangents[0], t_exps)
