"""``nll_loss`` and ``cross_entropy`` with torch.nn.functional semantics."""

from __future__ import annotations

import functools
from typing import Literal, NamedTuple, overload

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P
from jax.typing import ArrayLike

from jxent._kernels import (
    along_axis,
    capped_logits,
    compute_dtype,
    cross_entropy_stats,
    invalid_soft_cap,
    take_target,
)
from jxent._reduction import reduce_loss
from jxent._safe_math import (
    mass_times_gap,
    poison,
    poison_gradients,
    smoothed_target,
)
from jxent._sharding import (
    UNSHARDED,
    ClassShards,
    as_axis_names,
    axes_of,
    check_class_split,
    check_split_like_the_classes,
    explicit_layout,
    refuse_untyped_derivatives,
)
from jxent._types import Reduction
from jxent._validation import (
    as_float_array,
    as_int_target,
    as_target_array,
    check_bool,
    check_class_mask,
    check_concrete_target_range,
    check_has_classes,
    check_ignore_index,
    check_int_target_shape,
    check_nonnegative,
    check_reduction,
    check_soft_cap,
    check_unit_interval,
    check_weight,
    normalize_axis,
)


class TargetTerms(NamedTuple):
    """What an integer target contributes, after sanitising it."""

    valid: jax.Array  # target != ignore_index
    bad: jax.Array  # not ignored and outside [0, C) (or an excluded class)
    safe_target: jax.Array  # int32 index in [0, C), 0 where not valid
    target_weight: jax.Array  # weight[target] where valid, else 0


def target_terms(
    target: jax.Array,
    weight: jax.Array | None,
    num_classes: int,
    ignore_index: int,
    dtype: jnp.dtype,
    shards: ClassShards = UNSHARDED,
) -> TargetTerms:
    """Sanitises integer targets before anything is gathered with them.

    ``num_classes`` is the global count; with class shards ``weight`` is this
    device's slice and the target's weight comes from the shard that holds it.
    """
    valid = target != ignore_index
    in_range = (target >= 0) & (target < num_classes)
    safe_target = jnp.where(valid & in_range, target, 0).astype(jnp.int32)
    if weight is None:
        target_weight = valid.astype(dtype)
    else:
        local, here = shards.localise(safe_target, weight.shape[0])
        picked = shards.pick(weight.astype(dtype)[local], here)
        target_weight = jnp.where(valid, picked, 0.0)
    return TargetTerms(valid, valid & ~in_range, safe_target, target_weight)


def _scaled(coef: jax.Array, value: jax.Array) -> jax.Array:
    """``coef * value`` that is 0 where ``coef`` is 0, even if ``value`` is inf.

    An infinite ``value`` is replaced before the product (never ``0 · inf``
    masked afterwards), so the derivative w.r.t. ``coef`` is ``value``
    wherever that is finite, at ``coef = 0`` too: a label smoothing, z-loss
    or class weight of exactly 0 still gets its gradient. A NaN ``value``
    (NaN data) stays NaN, as in torch: a zero weight does not hide it.
    """
    kept = jnp.where((coef == 0) & jnp.isinf(value), 0.0, value)
    return coef * kept


def _any(flags: jax.Array) -> jax.Array:
    """``jnp.any(flags)`` as a count.

    On a sharded batch its all-reduce is then a sum, which XLA can combine
    with the loss's own (an ``or`` stays apart: one collective more).
    """
    return jnp.sum(flags, dtype=jnp.float32) > 0


def _poisoned_inputs(
    logits: jax.Array, weight: jax.Array | None, flag: jax.Array
) -> tuple[jax.Array, jax.Array | None]:
    """Logits and class weights whose derivatives are all NaN if ``flag``.

    For a sum or mean over bad data, where the NaN cotangent alone would
    leave zeros at what the loss reaches through a gather or not at all
    (ignored rows, classes no target names). The weights are multiplied by
    NaN then (the loss is NaN anyway): unlike a ``custom_jvp``, a product
    keeps unbatched weights unbatched under ``vmap`` and lets them vary over
    fewer ``shard_map`` axes than the flag.
    """
    logits = poison_gradients(logits, flag, True)
    if weight is not None:
        weight = poison(weight, flag)
    return logits, weight


def invalid_options(
    label_smoothing: jax.Array | float,
    z_loss: jax.Array | float,
    soft_cap: jax.Array | float | None = None,
    *,
    smoothing: bool,
    with_z_loss: bool,
) -> jax.Array | bool:
    """Whether a traced option is out of its range.

    ``label_smoothing`` outside [0, 1], ``z_loss < 0``, ``soft_cap`` (when
    given) not > 0. Concrete values are refused at trace time; traced ones
    make the loss and its gradients NaN (see ``jxent._safe_math.poison``).
    NaN counts as invalid.
    """
    invalid: jax.Array | bool = False
    if smoothing:
        eps = jnp.asarray(label_smoothing)
        invalid = invalid | ~((eps >= 0) & (eps <= 1))
    if with_z_loss:
        invalid = invalid | ~(jnp.asarray(z_loss) >= 0)
    return invalid | invalid_soft_cap(soft_cap)


def hard_target_loss(
    logits: jax.Array,
    target: jax.Array,
    weight: jax.Array | None,
    label_smoothing: jax.Array | float,
    z_loss: jax.Array | float,
    soft_cap: jax.Array | None,
    where: jax.Array | None,
    *,
    ignore_index: int,
    axis: int,
    smoothing: bool,
    with_z_loss: bool,
    shards: ClassShards = UNSHARDED,
    poison_inputs: bool = False,
    keep_exps: bool = False,
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Per-position cross-entropy for integer targets, before the reduction.

    Returns ``(loss, lse, target_weight)``: the loss (0 where ignored, NaN for
    a bad target, with NaN derivatives), the logsumexp and the per-position
    weight of the mean's denominator, all in the accumulation dtype. With
    ``poison_inputs`` (for a sum or mean over the positions), any bad target
    or option makes every derivative w.r.t. every floating input NaN.
    ``keep_exps``: let the CPU's derivatives reuse the forward's
    exponentials (see ``cross_entropy_stats``); not for a tile of a larger
    loop, which would hold them.
    """
    dtype = compute_dtype(logits.dtype)
    num_classes = shards.num_classes(logits.shape[axis])
    bad = _bad_rows(
        target, where, label_smoothing, z_loss, soft_cap, num_classes, ignore_index,
        axis, smoothing, with_z_loss, shards,
    )  # fmt: skip
    if poison_inputs:
        logits, weight = _poisoned_inputs(logits, weight, _any(bad))
    terms = target_terms(target, weight, num_classes, ignore_index, dtype, shards)
    weight = None if weight is None else weight.astype(dtype)
    unsmoothed = None
    if smoothing and weight is not None:
        unsmoothed = jnp.asarray(label_smoothing) == 0
    lse, nll, smooth, *_ = cross_entropy_stats(
        logits, terms.safe_target, terms.valid, weight, where, soft_cap, unsmoothed,
        axis, smoothing, shards, keep_exps,
    )  # fmt: skip
    loss = _loss_from_stats(
        lse, nll, smooth, terms, label_smoothing, z_loss,
        _num_included(where, num_classes, axis, dtype, shards) if smoothing else None,
        smoothing=smoothing, with_z_loss=with_z_loss,
    )  # fmt: skip
    return poison(loss, bad), lse, terms.target_weight


def _bad_rows(
    target, where, label_smoothing, z_loss, soft_cap, num_classes, ignore_index,
    axis, smoothing, with_z_loss, shards,
):  # fmt: skip
    """Positions whose loss is NaN (with NaN derivatives).

    A target out of range or on an excluded class; every position when an
    option is invalid.
    """
    checked = target_terms(target, None, num_classes, ignore_index, jnp.float32, shards)
    bad = checked.bad
    if where is not None:
        local, here = shards.localise(checked.safe_target, where.shape[axis])
        if where.ndim == 2 and where.shape[0] == 1 < local.shape[0]:
            included = where[0][local]  # one (1, C) class mask for every row
        else:
            included = take_target(where, local, axis)
        included = included.astype(jnp.int32)
        bad = bad | (checked.valid & (shards.pick(included, here) == 0))
    return bad | invalid_options(
        label_smoothing, z_loss, soft_cap, smoothing=smoothing, with_z_loss=with_z_loss
    )


def _num_included(where, num_classes: int, axis: int, dtype, shards):
    """Classes the smoothing spreads over: all, or per position with a mask."""
    if where is None:
        return num_classes
    count = shards.sum(jnp.sum(where, axis=axis))
    return jnp.maximum(count, 1).astype(dtype)


def _loss_from_stats(
    lse, nll, smooth, terms: TargetTerms, label_smoothing, z_loss, num_included,
    *, smoothing: bool, with_z_loss: bool,
):  # fmt: skip
    """Per-position loss from ``cross_entropy_stats``' ``(lse, nll, s)``.

    ``(1-ε)·w_y·nll + (ε/K)·s + z_loss·lse²``, 0 where ignored (before the
    bad positions are poisoned).
    """
    dtype = lse.dtype
    # Ignored positions' nll and smoothing sums (+inf for a -inf logit, NaN
    # for a NaN one) are discarded before use: in reverse mode their zero
    # cotangents would meet them in the gradients of ε and the class weights
    # (0 · inf). _scaled absorbs only infinities: NaN data elsewhere stays NaN.
    nll = jnp.where(terms.valid, nll, 0.0)
    if smoothing:
        eps = jnp.asarray(label_smoothing, dtype)
        smooth = jnp.where(terms.valid, smooth, 0.0)
        loss = _scaled((1.0 - eps) * terms.target_weight, nll) + _scaled(
            eps / num_included, smooth
        )
    else:
        loss = _scaled(terms.target_weight, nll)
    if with_z_loss:
        kept_lse = jnp.where(terms.valid, lse, 0.0)
        loss = loss + _scaled(jnp.asarray(z_loss, dtype), jnp.square(kept_lse))
    return jnp.where(terms.valid, loss, 0.0)


def hard_target_row_cotangents(
    lse: jax.Array,
    target: jax.Array,
    weight: jax.Array | None,
    label_smoothing: jax.Array | float,
    z_loss: jax.Array | float,
    soft_cap: jax.Array | None,
    where: jax.Array | None,
    *,
    num_classes: int,
    ignore_index: int,
    smoothing: bool,
    with_z_loss: bool,
    shards: ClassShards = UNSHARDED,
) -> tuple[TargetTerms, tuple[jax.Array, jax.Array, jax.Array]]:
    """The derivatives of ``hard_target_loss`` w.r.t. ``(lse, nll, s)``.

    Per position (classes last, ``where`` a (1, C) or (N, C) mask, ``weight``
    and ``where`` this device's slice of the classes): what the cotangents
    of the statistics are when the loss's own cotangent is 1 (NaN at bad
    positions, 0 where ignored). With them, ``cross_entropy_stats``' tangent
    map transposes into the gradient w.r.t. any block of a position's logits.
    Returns ``(terms, (d lse, d nll, d s))``.
    """
    dtype = lse.dtype
    bad = _bad_rows(
        target, where, label_smoothing, z_loss, soft_cap, num_classes, ignore_index,
        -1, smoothing, with_z_loss, shards,
    )  # fmt: skip
    terms = target_terms(target, weight, num_classes, ignore_index, dtype, shards)
    count = _num_included(where, num_classes, -1, dtype, shards) if smoothing else None

    def loss(lse, nll, smooth):
        value = _loss_from_stats(
            lse, nll, smooth, terms, label_smoothing, z_loss, count,
            smoothing=smoothing, with_z_loss=with_z_loss,
        )  # fmt: skip
        return poison(value, bad)

    # The loss is linear in nll and s: their value does not matter here.
    zeros = jnp.zeros_like(lse)
    _, vjp = jax.vjp(loss, lse, zeros, zeros)
    return terms, vjp(jnp.ones_like(lse))


def soft_target_loss(
    logits: jax.Array,
    target: jax.Array,
    weight: jax.Array | None,
    label_smoothing: jax.Array | float,
    z_loss: jax.Array | float,
    soft_cap: jax.Array | None,
    where: jax.Array | None,
    *,
    axis: int,
    smoothing: bool,
    with_z_loss: bool,
    shards: ClassShards = UNSHARDED,
) -> tuple[jax.Array, jax.Array]:
    """Per-position cross-entropy for class-probability targets: ``(loss, lse)``."""
    x = capped_logits(logits, soft_cap)
    dtype = x.dtype
    q = target.astype(dtype)
    if where is not None:
        x = jnp.where(where, x, -jnp.inf)
        q = jnp.where(where, q, 0.0)
    if smoothing:
        eps = jnp.asarray(label_smoothing, dtype)
        if where is None:
            uniform = 1.0 / shards.num_classes(x.shape[axis])
        else:
            count = shards.sum(jnp.sum(where, axis=axis, keepdims=True))
            uniform = jnp.where(where, 1.0 / jnp.maximum(count, 1).astype(dtype), 0.0)
        # d/dq and d/dε each one product with -log p (+inf at a -inf logit).
        q = smoothed_target(q, eps, uniform)
    w = jnp.ones((), dtype)
    if weight is not None:
        w = along_axis(weight.astype(dtype), x.ndim, axis)
    if shards.sharded:
        m = shards.max(jnp.max(lax.stop_gradient(x), axis=axis, keepdims=True))
        m = jnp.where(jnp.isfinite(m), m, 0.0)
        lse = jnp.log(shards.sum(jnp.sum(jnp.exp(x - m), axis=axis, keepdims=True)))
        lse = lse + m
    else:
        lse = jax.nn.logsumexp(x, axis=axis, keepdims=True)
    gap = lse - x  # -log p, +inf for a -inf logit
    if where is not None:
        gap = jnp.where(where, gap, 0.0)  # excluded classes: no term at all
    lse = jnp.squeeze(lse, axis)
    loss = shards.sum(jnp.sum(mass_times_gap(q, w, gap), axis=axis))
    if with_z_loss:
        loss = loss + _scaled(jnp.asarray(z_loss, dtype), jnp.square(lse))
    bad = invalid_options(
        label_smoothing, z_loss, soft_cap, smoothing=smoothing, with_z_loss=with_z_loss
    )
    return poison(loss, bad), lse


def _reduce_hard(loss, target_weight, reduction, out_dtype, batch_axes=()):
    return reduce_loss(
        loss, reduction, jnp.sum(target_weight), out_dtype, batch_axes=batch_axes
    )


@functools.partial(jax.jit, static_argnames=("ignore_index", "reduction", "axis"))
def _nll_loss(log_probs, target, weight, *, ignore_index, reduction, axis):
    dtype = compute_dtype(log_probs.dtype)
    if reduction != "none":  # a bad target: NaN derivatives everywhere
        checked = target_terms(target, None, log_probs.shape[axis], ignore_index, dtype)
        log_probs, weight = _poisoned_inputs(log_probs, weight, _any(checked.bad))
    terms = target_terms(target, weight, log_probs.shape[axis], ignore_index, dtype)
    picked = take_target(log_probs, terms.safe_target, axis).astype(dtype)
    loss = jnp.where(terms.valid, _scaled(terms.target_weight, -picked), 0.0)
    loss = poison(loss, terms.bad)
    return _reduce_hard(loss, terms.target_weight, reduction, log_probs.dtype)


_STATIC = (
    "reduction",
    "axis",
    "smoothing",
    "with_z_loss",
    "return_lse",
    "shards",
    "batch_axes",
)


@functools.partial(jax.jit, static_argnames=("ignore_index", *_STATIC))
def _hard_cross_entropy(
    logits, target, weight, label_smoothing, z_loss, soft_cap, where, *,
    ignore_index, reduction, axis, smoothing, with_z_loss, return_lse, shards,
    batch_axes,
):  # fmt: skip
    loss, lse, target_weight = hard_target_loss(
        logits, target, weight, label_smoothing, z_loss, soft_cap, where,
        ignore_index=ignore_index, axis=axis, smoothing=smoothing,
        with_z_loss=with_z_loss, shards=shards, poison_inputs=reduction != "none",
        keep_exps=True,
    )  # fmt: skip
    loss = _reduce_hard(loss, target_weight, reduction, logits.dtype, batch_axes)
    return (loss, lse) if return_lse else loss


@functools.partial(jax.jit, static_argnames=_STATIC)
def _soft_cross_entropy(
    logits, target, weight, label_smoothing, z_loss, soft_cap, where, *,
    reduction, axis, smoothing, with_z_loss, return_lse, shards, batch_axes,
):  # fmt: skip
    loss, lse = soft_target_loss(
        logits, target, weight, label_smoothing, z_loss, soft_cap, where,
        axis=axis, smoothing=smoothing, with_z_loss=with_z_loss, shards=shards,
    )  # fmt: skip
    loss = reduce_loss(loss, reduction, loss.size, logits.dtype, batch_axes=batch_axes)
    return (loss, lse) if return_lse else loss


def nll_loss(
    log_probs: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    axis: int = -1,
) -> jax.Array:
    r"""Negative log-likelihood loss (``torch.nn.functional.nll_loss``).

    For each position ``n`` with integer target ``y_n``:

    ``ℓ_n = -w[y_n] · log_probs[n, y_n]``, and ``ℓ_n = 0`` where
    ``y_n == ignore_index``. ``reduction="mean"`` returns
    ``Σ_n ℓ_n / Σ_n w[y_n]`` over non-ignored positions, and 0.0 when that
    denominator is zero (torch returns NaN).

    Like torch, the input is not checked to be log-probabilities.

    Args:
      log_probs: floating array of log-probabilities, classes on ``axis``.
      target: integer class indices, ``log_probs.shape`` without ``axis``.
      weight: optional length-C class weights.
      ignore_index: target value that is ignored (contributes nothing).
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      axis: the class axis (``1`` for PyTorch's ``(N, C, d1, ...)`` layout).

    Returns:
      The loss in the dtype of ``log_probs``: of the target's shape for
      ``"none"``, else a scalar. A target outside ``[0, C)`` that is not
      ``ignore_index`` gives NaN under ``jit`` (never a wrapped index), with
      NaN gradients (all of them for ``"mean"``/``"sum"``), and a
      ``ValueError`` when the target is concrete.

    Raises:
      TypeError: non-floating ``log_probs`` or non-integer ``target``.
      ValueError: bad ``reduction``, ``axis``, ``weight`` or target shape, or a
        concrete out-of-range target.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> logits = jnp.array([[2.8883, 0.1760, 1.0774],
      ...                     [1.1216, -0.0562, 0.0660],
      ...                     [-1.3939, -0.0967, 0.5853]])
      >>> jxent.nll_loss(jxent.log_softmax(logits), jnp.array([1, 2, 0]))
      Array(2.3185..., dtype=float32)
    """
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    log_probs = as_float_array(log_probs, "log_probs")
    axis = normalize_axis(axis, log_probs.ndim, "log_probs")
    check_has_classes(log_probs.shape, axis, "log_probs")
    target = as_int_target(target)
    check_int_target_shape(target.shape, log_probs.shape, axis, "log_probs")
    weight = check_weight(weight, log_probs.shape[axis])
    check_concrete_target_range(target, log_probs.shape[axis], ignore_index)
    return _nll_loss(
        log_probs,
        target,
        weight,
        ignore_index=ignore_index,
        reduction=reduction,
        axis=axis,
    )


def _is_static_zero(value: ArrayLike) -> bool:
    """Whether ``value`` is a concrete zero, so the smoothing term can be skipped."""
    return not isinstance(value, jax.core.Tracer) and float(value) == 0.0


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    axis: int = -1,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    return_lse: Literal[False] = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array: ...


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    axis: int = -1,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    return_lse: Literal[True],
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> tuple[jax.Array, jax.Array]: ...


@overload
def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    axis: int = -1,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    return_lse: bool = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]: ...


def cross_entropy(
    logits: ArrayLike,
    target: ArrayLike,
    weight: ArrayLike | None = None,
    *,
    ignore_index: int = -100,
    reduction: Reduction = "mean",
    label_smoothing: ArrayLike = 0.0,
    axis: int = -1,
    z_loss: ArrayLike = 0.0,
    soft_cap: ArrayLike | None = None,
    where: ArrayLike | None = None,
    return_lse: bool = False,
    class_axis_name: str | tuple[str, ...] | None = None,
    batch_axis_name: str | tuple[str, ...] | None = None,
) -> jax.Array | tuple[jax.Array, jax.Array]:
    r"""Cross-entropy between logits and a target (``F.cross_entropy``).

    ``log_softmax`` followed by ``nll_loss`` in one call, with torch's exact
    semantics. With ``lp = log_softmax(logits)``, ``C`` classes, class weights
    ``w`` (all ones by default) and ``ε = label_smoothing``:

    * integer ``target`` ``y`` (shape: logits without the class axis):
      ``ℓ_n = (1-ε) · w[y_n] · (-lp[n, y_n]) + (ε/C) · Σ_c w_c · (-lp[n, c])``
      and ``ℓ_n = 0`` where ``y_n == ignore_index``; ``"mean"`` divides
      ``Σ_n ℓ_n`` by ``Σ_n w[y_n]`` over non-ignored positions.
    * floating ``target`` ``q`` of class probabilities (shape of the logits):
      ``ℓ_n = -Σ_c w_c · q'[n, c] · lp[n, c]`` with
      ``q' = (1-ε) · q + ε/C``; ``"mean"`` divides by the number of positions
      (the weights are not in the denominator, as in torch).

    Options beyond torch (for large models): ``soft_cap`` replaces the logits
    by ``soft_cap · tanh(logits / soft_cap)`` before everything (Gemma 2);
    ``where`` excludes classes (False) from the softmax and the smoothing, so
    ``C`` above counts included classes only; ``z_loss`` adds
    ``z_loss · lse_n²`` to ``ℓ_n`` at every non-ignored position (PaLM), with
    ``lse_n = log Σ_c exp(x_nc)``; the returned loss includes it.

    Deviations from torch: a zero ``"mean"`` denominator (every target
    ignored, an empty batch, zero weights) gives 0.0 with zero gradients, not
    NaN; a class with zero probability contributes 0 even if its logit is
    ``-inf`` (torch: NaN); a negative ``label_smoothing`` is refused (torch
    treats it as 0); the class axis is ``axis`` (default last), not dim 1.

    bfloat16 and float16 logits are computed with float32 accumulation and the
    loss is returned in their dtype. For integer targets the softmax is never
    stored for the backward pass: only the per-position logsumexp is kept.
    Every floating input (logits, probability targets, ``weight``,
    ``label_smoothing``, ``z_loss``, ``soft_cap``) is differentiable in
    forward and reverse mode, to any order.

    Args:
      logits: floating array of unnormalised scores, classes on ``axis``.
      target: integer class indices (logits' shape without ``axis``) or
        floating class probabilities (logits' shape).
      weight: optional length-C class weights (traced: changing it does not
        recompile).
      ignore_index: integer target value that is ignored. Must be negative
        with probability targets (torch's rule: they have no ignored entries).
      reduction: ``"none"``, ``"mean"`` or ``"sum"``.
      label_smoothing: ``ε`` in ``[0, 1]`` (traced; a concrete value outside
        raises, a traced one makes the loss and its gradients NaN).
      axis: the class axis (``1`` for PyTorch's ``(N, C, d1, ...)`` layout).
      z_loss: coefficient ``>= 0`` of the auxiliary ``lse²`` term (traced; a
        traced negative value makes the loss and its gradients NaN).
      soft_cap: ``None`` or a finite cap ``> 0`` for ``cap · tanh(x / cap)`` (a traced
        cap that is not finite and > 0 makes the loss and its gradients NaN).
      where: optional boolean class mask broadcastable to the logits (a 1-D
        mask of length C lies along ``axis``). A target on an excluded class
        gives NaN.
      return_lse: also return the per-position logsumexp (after soft-capping
        and masking), in the accumulation dtype (float32 for 16-bit logits).
      class_axis_name: inside ``jax.shard_map``, the mesh axis name (or names)
        over which the class axis is split: ``logits``, ``weight`` and
        ``where`` are this device's contiguous slice of the classes, targets
        are global class indices. Only O(N) values are all-reduced; label
        smoothing and z-loss stay exact, and every input keeps its gradient.
        Several names split the class axis over those mesh axes in the order
        given, the first the slowest (as in the ``PartitionSpec`` entry
        ``(names...)``).
      batch_axis_name: inside ``jax.shard_map``, the mesh axis name (or names)
        over which the batch is split: ``"mean"`` and ``"sum"`` reduce over
        all batch shards (the mean divides by the global weight sum).

    Returns:
      The loss in the logits' dtype: of the logits' shape without ``axis``
      for ``"none"``, else a scalar; with ``return_lse``, ``(loss, lse)``. An
      integer target outside ``[0, C)`` that is not ``ignore_index`` gives NaN
      under ``jit`` (never a wrapped or clamped class), with NaN gradients
      (that position's for ``"none"``, all of them for ``"mean"``/``"sum"``),
      and a ``ValueError`` when the target is concrete; see
      [`jxent.check_target`][] for a check under ``jit``.

    Raises:
      TypeError: integer logits, a boolean/complex target, a non-boolean
        ``where``.
      ValueError: bad ``reduction``, ``axis``, ``weight``, ``label_smoothing``,
        ``z_loss``, ``soft_cap`` or ``where``, a target shape that does not
        match, ``ignore_index >= 0`` with probability targets, or a concrete
        out-of-range target.

    Examples:
      >>> import jax.numpy as jnp
      >>> import jxent
      >>> logits = jnp.array([[2.8883, 0.1760, 1.0774],
      ...                     [1.1216, -0.0562, 0.0660],
      ...                     [-1.3939, -0.0967, 0.5853]])
      >>> jxent.cross_entropy(logits, jnp.array([1, 2, 0]))
      Array(2.3185..., dtype=float32)
      >>> jxent.cross_entropy(logits, jnp.array([1, 2, -100]), reduction="none")
      Array([2.9192..., 1.5599..., 0. ], dtype=float32)
    """
    check_reduction(reduction)
    ignore_index = check_ignore_index(ignore_index)
    return_lse = check_bool(return_lse, "return_lse")
    logits = as_float_array(logits, "logits")
    axis = normalize_axis(axis, logits.ndim, "logits")
    check_has_classes(logits.shape, axis)
    num_classes = logits.shape[axis]
    weight = check_weight(weight, num_classes)
    label_smoothing = check_unit_interval(label_smoothing, "label_smoothing")
    z_loss = check_nonnegative(z_loss, "z_loss")
    soft_cap = check_soft_cap(soft_cap)
    where = check_class_mask(where, logits.shape, axis)
    shards = ClassShards(as_axis_names(class_axis_name, "class_axis_name"))
    batch_axes = as_axis_names(batch_axis_name, "batch_axis_name")
    target = as_target_array(target)
    soft = jnp.issubdtype(target.dtype, jnp.floating)
    check_split_like_the_classes(
        shards, logits=logits, weight=weight, target=target if soft else None
    )
    logits, weight, target = refuse_untyped_derivatives(
        "cross_entropy", shards, batch_axes, logits, weight, target
    )
    options = dict(
        reduction=reduction,
        axis=axis,
        smoothing=not _is_static_zero(label_smoothing),
        with_z_loss=not _is_static_zero(z_loss),
        return_lse=return_lse,
        shards=shards,
        batch_axes=batch_axes,
    )
    values = (weight, label_smoothing, z_loss, soft_cap, where)
    layout = None if shards.sharded or batch_axes else explicit_layout(logits, axis)
    if layout is not None:
        return _explicit_sharded_cross_entropy(
            logits, target, values, layout, ignore_index=ignore_index, **options
        )
    if jnp.issubdtype(target.dtype, jnp.floating):
        if target.shape != logits.shape:
            raise ValueError(
                "`target` of class probabilities (floating dtype) must have the "
                f"shape of `logits`: expected {logits.shape}, got {target.shape}. "
                "Pass integer class indices for a target without the class axis."
            )
        if ignore_index >= 0:
            raise ValueError(
                "`ignore_index` is not supported with class-probability targets "
                f"(floating `target`): got ignore_index={ignore_index}, allowed: "
                "a negative value (which has no effect)."
            )
        return _soft_cross_entropy(logits, target, *values, **options)
    target = as_int_target(target)
    check_int_target_shape(target.shape, logits.shape, axis, "logits")
    # Global indices: against every shard's classes.
    check_concrete_target_range(target, shards.num_classes(num_classes), ignore_index)
    return _hard_cross_entropy(
        logits, target, *values, ignore_index=ignore_index, **options
    )


def _explicit_sharded_cross_entropy(logits, target, values, layout, **options):
    """``cross_entropy`` on logits sharded over Explicit mesh axes.

    Runs the loss under ``jax.shard_map`` with the class axis split as the
    logits are (``class_axis_name``) and the batch reduction over the batch
    axes (``batch_axis_name``), so that only O(N) values cross devices. Targets,
    weights and masks are resharded to match the logits.
    """
    mesh, spec = layout
    axis = options["axis"]
    class_axes = axes_of([spec[axis]])
    batch_spec = spec[:axis] + spec[axis + 1 :]
    batch_axes = axes_of(batch_spec)
    check_class_split(
        logits.shape[axis], mesh, class_axes, "The class axis of `logits`"
    )
    weight, label_smoothing, z_loss, soft_cap, where = values
    target = jnp.asarray(target)
    soft = jnp.issubdtype(target.dtype, jnp.floating)
    target_spec = P(*spec) if soft else P(*batch_spec)
    class_spec = P(spec[axis])
    out_spec = P(*batch_spec) if options["reduction"] == "none" else P()

    def reshard(x, spec):
        # A NamedSharding (not a bare spec): no mesh context is needed.
        return None if x is None else jax.reshard(x, NamedSharding(mesh, spec))

    args = (
        reshard(target, target_spec),
        reshard(weight, class_spec),
        reshard(where, P(*spec)),
    )
    scalars = (label_smoothing, z_loss, soft_cap)
    static = dict(options)
    static.update(
        class_axis_name=class_axes or None,
        batch_axis_name=batch_axes or None,
    )
    for key in ("smoothing", "with_z_loss", "shards", "batch_axes"):
        static.pop(key)

    def local(logits, target, weight, where, scalars):
        label_smoothing, z_loss, soft_cap = scalars
        return cross_entropy(
            logits, target, weight, label_smoothing=label_smoothing, z_loss=z_loss,
            soft_cap=soft_cap, where=where, **static,
        )  # fmt: skip

    out_specs = (out_spec, P(*batch_spec)) if options["return_lse"] else out_spec
    in_specs = (P(*spec), target_spec, class_spec, P(*spec), P())
    in_specs = tuple(
        None if a is None else s
        for a, s in zip((logits, *args, scalars), in_specs, strict=True)
    )
    return jax.shard_map(local, mesh=mesh, in_specs=in_specs, out_specs=out_specs)(
        logits, *args, scalars
    )
