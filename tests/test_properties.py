"""Hypothesis properties of cross_entropy against a float64 NumPy reference.

Shapes are kept tiny and few (N in 1..4, C in 2..5) because every new shape or
static option compiles anew under jit. Each property runs under ``jax.jit``
and eagerly (``jax.disable_jit``); the jitted functions are module-level so
compilations are shared across examples and tests.
"""

from __future__ import annotations

import dataclasses
import functools

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent

REDUCTIONS = ("none", "mean", "sum")
ULP32 = float(np.finfo(np.float32).eps)

SETTINGS = settings(max_examples=30, deadline=None)
JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])

# --------------------------------------------------------------------------
# Strategies.
# --------------------------------------------------------------------------

MODERATE = st.floats(-10.0, 10.0, width=32)
EXTREME = st.sampled_from(
    [1e4, -1e4, 1e30, -1e30, 3e30, -3e30, 0.0, 1.0, -1.0]
) | st.floats(-10.0, 10.0, width=32)
# Either exactly zero or bounded away from it, so float32 denominators cannot
# underflow or overflow where the float64 reference does not.
WEIGHT_ELEMENTS = st.just(0.0) | st.floats(1 / 64, 3.0, width=32)


@dataclasses.dataclass(frozen=True)
class Problem:
    logits: np.ndarray  # (N, C) float32
    target: np.ndarray  # (N,) int32 or (N, C) float32
    weight: np.ndarray | None  # (C,) float32
    ignore_index: int
    eps: float  # a float32-representable value in [0, 1]
    static_eps: bool  # pass eps=0.0 as a Python constant under jit

    @property
    def soft(self) -> bool:
        return np.issubdtype(self.target.dtype, np.floating)

    def kwargs(self) -> dict:
        return {
            "weight": None if self.weight is None else jnp.asarray(self.weight),
            "ignore_index": self.ignore_index,
            "eps": 0.0 if self.static_eps else jnp.float32(self.eps),
        }


@st.composite
def problems(
    draw,
    *,
    soft=None,
    ignore=True,
    weights=True,
    smoothing=True,
    elements=MODERATE,
    shape=None,
):
    n, c = (
        shape
        if shape is not None
        else (draw(st.integers(1, 4)), draw(st.integers(2, 5)))
    )
    logits = draw(hnp.arrays(np.float32, (n, c), elements=elements))
    is_soft = draw(st.booleans()) if soft is None else soft
    if is_soft:
        ignore_index = -100
        target = draw(
            hnp.arrays(np.float32, (n, c), elements=st.floats(0.0, 1.0, width=32))
        )
        if draw(st.booleans()):  # normalised rows, as probabilities usually are
            total = target.sum(-1, keepdims=True)
            target = np.where(total > 0, target / np.where(total > 0, total, 1), 0)
            target = target.astype(np.float32)
    else:
        ignore_index = draw(st.sampled_from([-100, 0])) if ignore else -100
        classes = st.integers(0, c - 1)
        if ignore:
            classes = classes | st.just(ignore_index)
        target = draw(hnp.arrays(np.int32, (n,), elements=classes))
    weight = None
    if weights and draw(st.booleans()):
        weight = draw(hnp.arrays(np.float32, (c,), elements=WEIGHT_ELEMENTS))
    eps = 0.0
    if smoothing and draw(st.booleans()):
        eps = draw(st.floats(0.0, 1.0, width=32))
    static_eps = eps == 0.0 and draw(st.booleans())
    return Problem(logits, target, weight, ignore_index, float(eps), static_eps)


# --------------------------------------------------------------------------
# Float64 NumPy reference (torch's formulas; zero mean denominator gives 0).
# --------------------------------------------------------------------------


def _log_softmax64(x: np.ndarray) -> np.ndarray:
    m = x.max(-1, keepdims=True)
    return x - (m + np.log(np.exp(x - m).sum(-1, keepdims=True)))


def reference(p: Problem) -> dict[str, np.ndarray]:
    x = p.logits.astype(np.float64)
    n, c = x.shape
    lp = _log_softmax64(x)
    w = np.ones(c) if p.weight is None else p.weight.astype(np.float64)
    eps = p.eps
    if p.soft:
        q = (1.0 - eps) * p.target.astype(np.float64) + eps / c
        loss = -(w * q * lp).sum(-1)
        denominator = float(n)
    else:
        valid = p.target != p.ignore_index
        safe = np.where(valid, p.target, 0)
        w_y = np.where(valid, w[safe], 0.0)
        nll = -lp[np.arange(n), safe]
        smooth = -(w * lp).sum(-1)
        loss = np.where(valid, (1.0 - eps) * w_y * nll + eps / c * smooth, 0.0)
        denominator = float(w_y.sum())
    total = loss.sum()
    mean = total / denominator if denominator != 0 else 0.0
    return {"none": loss, "mean": np.float64(mean), "sum": total, "den": denominator}


def error_budget(p: Problem, shift: np.ndarray | None = None) -> dict[str, np.ndarray]:
    """Absolute float32 error allowed per reduction.

    Each element is a linear combination of terms ``lse - x_c`` whose float32
    error is a few ulps of the largest logit magnitude in the row; the budget
    is that magnitude times the sum of the combination's coefficients.
    """
    x = p.logits.astype(np.float64)
    if shift is not None:
        x = x + np.abs(shift)[:, None]
    n, c = x.shape
    magnitude = np.abs(x).max(-1) + np.log(c) + 1.0
    w = np.ones(c) if p.weight is None else p.weight.astype(np.float64)
    if p.soft:
        q = (1.0 - p.eps) * p.target.astype(np.float64) + p.eps / c
        coef = (w * q).sum(-1)
    else:
        valid = p.target != p.ignore_index
        w_y = np.where(valid, w[np.where(valid, p.target, 0)], 0.0)
        coef = np.where(valid, (1.0 - p.eps) * w_y + p.eps / c * w.sum(), 0.0)
    per_element = 16 * ULP32 * coef * magnitude
    den = reference(p)["den"]
    return {
        "none": per_element,
        "sum": per_element.sum(),
        "mean": per_element.sum() / den if den else 0.0,
    }


def assert_close(actual, expected, budget, rtol=1e-5):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert np.all(np.isfinite(actual)), actual
    np.testing.assert_array_less(
        np.abs(actual - expected), rtol * np.abs(expected) + budget + 1e-30
    )


# --------------------------------------------------------------------------
# Functions under test, jitted once at module level.
# --------------------------------------------------------------------------


def _all_reductions(logits, target, weight, eps, *, ignore_index):
    return {
        r: jxent.cross_entropy(
            logits,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=r,
            label_smoothing=eps,
        )
        for r in REDUCTIONS
    }


def _grads(logits, target, weight, eps, *, ignore_index):
    """Gradients of the mean and the sum w.r.t. the logits."""

    def loss(x, r):
        return jxent.cross_entropy(
            x,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=r,
            label_smoothing=eps,
        )

    return {r: jax.grad(loss)(logits, r) for r in ("mean", "sum")}


_JITTED = {
    (fn, static): jax.jit(
        fn, static_argnames=("ignore_index", "eps") if static else ("ignore_index",)
    )
    for fn in (_all_reductions, _grads)
    for static in (False, True)
}


def run(fn, p: Problem, jit: bool, logits=None, target=None):
    """``fn`` on problem ``p`` (optionally replacing logits/target)."""
    logits = jnp.asarray(p.logits if logits is None else logits)
    target = jnp.asarray(p.target if target is None else target)
    kwargs = p.kwargs()
    weight, eps = kwargs.pop("weight"), kwargs.pop("eps")
    if not jit:
        with jax.disable_jit():
            return fn(logits, target, weight, eps, **kwargs)
    if p.static_eps:
        return _JITTED[fn, True](logits, target, weight, eps=eps, **kwargs)
    return _JITTED[fn, False](logits, target, weight, eps, **kwargs)


# --------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------


@JIT
@SETTINGS
@given(p=problems())
def test_matches_float64_reference(jit, p):
    out = run(_all_reductions, p, jit)
    ref = reference(p)
    budget = error_budget(p)
    for r in REDUCTIONS:
        assert out[r].dtype == jnp.float32
        assert_close(out[r], ref[r], budget[r])
    assert out["none"].shape == (p.logits.shape[0],)


@JIT
@SETTINGS
@given(p=problems())
def test_loss_is_nonnegative(jit, p):
    out = run(_all_reductions, p, jit)
    for r in REDUCTIONS:
        value = np.asarray(out[r])
        assert np.all(np.isfinite(value)), (r, value)
        assert np.all(value >= 0), (r, value)


@JIT
@SETTINGS
@given(p=problems(soft=False, weights=False, smoothing=False))
def test_mean_gradient_rows_sum_to_zero_unweighted(jit, p):
    g = np.asarray(run(_grads, p, jit)["mean"], np.float64)
    _assert_rows_sum_to_zero(g)
    # Ignored rows get exactly zero gradient.
    ignored = p.target == p.ignore_index
    np.testing.assert_array_equal(g[ignored], 0.0)


@JIT
@SETTINGS
@given(p=problems())
def test_gradient_rows_sum_to_zero_all_options(jit, p):
    """Shift invariance implies zero row sums for every option combination."""
    grads = run(_grads, p, jit)
    for r in ("mean", "sum"):
        _assert_rows_sum_to_zero(np.asarray(grads[r], np.float64))


def _assert_rows_sum_to_zero(g):
    assert np.all(np.isfinite(g))
    row_sum = np.abs(g.sum(-1))
    assert np.all(row_sum <= 1e-5 * np.abs(g).sum(-1) + 1e-30), (row_sum, g)


@JIT
@SETTINGS
@given(p=problems(), data=st.data())
def test_invariant_to_adding_a_constant_to_a_row(jit, p, data):
    n = p.logits.shape[0]
    shift = data.draw(
        hnp.arrays(np.float32, (n,), elements=st.floats(-100, 100, width=32))
    )
    shifted = (p.logits.astype(np.float64) + shift[:, None].astype(np.float64)).astype(
        np.float32
    )
    out = run(_all_reductions, p, jit)
    out_shifted = run(_all_reductions, p, jit, logits=shifted)
    budget = error_budget(p, shift=shift)
    for r in REDUCTIONS:
        # Twice the budget: both sides carry rounding errors.
        assert_close(out_shifted[r], out[r], 2 * budget[r])


@JIT
@SETTINGS
@given(p=problems(elements=EXTREME))
def test_extreme_finite_logits_give_finite_loss_and_gradients(jit, p):
    out = run(_all_reductions, p, jit)
    for r in REDUCTIONS:
        value = np.asarray(out[r])
        assert np.all(np.isfinite(value)), (r, value)
        assert np.all(value >= 0), (r, value)
    grads = run(_grads, p, jit)
    for r in ("mean", "sum"):
        assert np.all(np.isfinite(grads[r])), (r, grads[r])


@JIT
@SETTINGS
@given(p=problems(elements=EXTREME, soft=False, weights=False, smoothing=False))
def test_extreme_logits_match_reference(jit, p):
    """Without options the float32 result is still accurate for huge logits."""
    out = run(_all_reductions, p, jit)
    ref = reference(p)
    budget = error_budget(p)
    for r in REDUCTIONS:
        assert_close(out[r], ref[r], budget[r])


@JIT
@SETTINGS
@given(p=problems(soft=False, ignore=False))
def test_hard_target_equals_one_hot_soft_target(jit, p):
    c = p.logits.shape[1]
    one_hot = np.eye(c, dtype=np.float32)[p.target]
    hard = run(_all_reductions, p, jit)
    soft = run(_all_reductions, p, jit, target=one_hot)
    budget = error_budget(p)
    for r in ("none", "sum"):
        assert_close(hard[r], soft[r], 2 * budget[r])
    if p.weight is None:  # without weights both means divide by N
        assert_close(hard["mean"], soft["mean"], 2 * budget["mean"])


@functools.partial(jax.jit, static_argnames=("ignore_index", "reduction"))
def _vmapped(logits, target, weight, eps, *, ignore_index, reduction):
    def one(x, t):
        return jxent.cross_entropy(
            x,
            t,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            label_smoothing=eps,
        )

    return jax.vmap(one)(logits, target)


@JIT
@SETTINGS
@given(data=st.data(), batch=st.integers(1, 3))
def test_vmap_over_leading_batch_equals_direct_call(jit, data, batch):
    base = data.draw(problems())
    n, c = base.logits.shape
    # Stack `batch` problems of the same shape and options.
    extra = [
        data.draw(
            problems(
                soft=base.soft,
                shape=(n, c),
                weights=False,
                smoothing=False,
            )
        )
        for _ in range(batch - 1)
    ]
    logits = np.stack([base.logits] + [e.logits for e in extra])
    if base.soft:
        targets = [base.target] + [e.target for e in extra]
    else:  # reuse the base ignore_index
        targets = [base.target] + [
            np.where(e.target == e.ignore_index, base.ignore_index, e.target)
            for e in extra
        ]
    target = np.stack(targets)
    kwargs = base.kwargs()
    weight, eps = kwargs.pop("weight"), kwargs.pop("eps")
    with jax.disable_jit(not jit):
        vmapped = _vmapped(
            jnp.asarray(logits),
            jnp.asarray(target),
            weight,
            eps,
            reduction="none",
            **kwargs,
        )
        direct = jxent.cross_entropy(
            jnp.asarray(logits),
            jnp.asarray(target),
            weight,
            reduction="none",
            label_smoothing=eps,
            **kwargs,
        )
        vmapped_mean = _vmapped(
            jnp.asarray(logits),
            jnp.asarray(target),
            weight,
            eps,
            reduction="mean",
            **kwargs,
        )
    assert vmapped.shape == direct.shape == (batch, n)
    np.testing.assert_allclose(vmapped, direct, rtol=1e-6, atol=1e-6)
    assert vmapped_mean.shape == (batch,)
    for b in range(batch):
        single = dataclasses.replace(base, logits=logits[b], target=target[b])
        ref = reference(single)
        assert_close(vmapped_mean[b], ref["mean"], error_budget(single)["mean"])


@SETTINGS
@given(p=problems())
def test_jit_equals_eager(p):
    jitted = run(_all_reductions, p, jit=True)
    eager = run(_all_reductions, p, jit=False)
    budget = error_budget(p)
    for r in REDUCTIONS:
        assert_close(jitted[r], eager[r], budget[r], rtol=1e-6)
    jitted_grads = run(_grads, p, jit=True)
    eager_grads = run(_grads, p, jit=False)
    for r in ("mean", "sum"):
        np.testing.assert_allclose(
            jitted_grads[r], eager_grads[r], rtol=1e-5, atol=1e-6
        )
