"""Hypothesis properties of cross_entropy against a float64 NumPy reference.

Each property runs under ``jax.jit`` and eagerly (``jax.disable_jit``). Every
new shape or static option compiles anew (under jit the whole function, eagerly
each primitive), so there are only two (N, C) shapes, most properties keep
``ignore_index`` at its default, and one module-level function computing all
reductions and gradients serves them all.
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

# When a property fails, hypothesis' pytest plugin imports libcst to suggest a
# patch, which triggers this DeprecationWarning; with filterwarnings=error it
# would turn a test failure into an INTERNALERROR that hides the report.
pytestmark = pytest.mark.filterwarnings(
    "ignore:mypy_extensions.TypedDict is deprecated:DeprecationWarning"
)

SETTINGS = settings(max_examples=20, deadline=None)
# For the costliest properties (eager gradients, eager vmap).
FEWER = settings(SETTINGS, max_examples=12)
JIT = pytest.mark.parametrize("jit", [True, False], ids=["jit", "eager"])

# --------------------------------------------------------------------------
# Strategies.
# --------------------------------------------------------------------------

MODERATE = st.floats(-10.0, 10.0, width=32)
EXTREME = st.sampled_from(
    [1e4, -1e4, 1e30, -1e30, 3e30, -3e30, 0.0, 1.0, -1.0]
) | st.floats(-10.0, 10.0, width=32)
# (N, C): the smallest (binary, one row) problem, and more rows than classes;
# (4, 3) is also the shape used by test_errors.py, which shares the warm-up.
SHAPES = ((1, 2), (4, 3))
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
    custom_ignore=False,
    static_eps=False,
):
    """A cross-entropy problem; ``custom_ignore`` also draws ignore_index=0 and
    ``static_eps`` passes a zero label_smoothing as a Python constant under jit
    (both are static under jit, so each doubles the compilations)."""
    n, c = shape if shape is not None else draw(st.sampled_from(SHAPES))
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
        ignore_index = -100
        if ignore and custom_ignore:
            ignore_index = draw(st.sampled_from([-100, 0]))
        classes = st.integers(0, c - 1)
        if ignore:
            classes = classes | st.just(ignore_index)
        target = draw(hnp.arrays(np.int32, (n,), elements=classes))
    weight = None
    if weights == "always" or (weights and draw(st.booleans())):
        weight = draw(hnp.arrays(np.float32, (c,), elements=WEIGHT_ELEMENTS))
    eps = 0.0
    if smoothing and draw(st.booleans()):
        eps = draw(st.floats(0.0, 1.0, width=32))
    static = static_eps and eps == 0.0 and draw(st.booleans())
    return Problem(logits, target, weight, ignore_index, float(eps), static)


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
    c = x.shape[1]
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
        # Row sums of the gradient: C terms of the size of the coefficient.
        "grad_mean": c * per_element / den if den else 0.0 * per_element,
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


def _evaluate(logits, target, weight, eps, *, ignore_index, grad=True):
    """Every reduction and, if ``grad``, the gradient of the mean w.r.t. the
    logits: one function, so under jit one compilation per shape and option
    set serves every property."""

    def loss(x, r):
        return jxent.cross_entropy(
            x,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=r,
            label_smoothing=eps,
        )

    out = {r: loss(logits, r) for r in ("none", "sum")}
    if grad:
        out["mean"], out["grad_mean"] = jax.value_and_grad(loss)(logits, "mean")
    else:
        out["mean"] = loss(logits, "mean")
    return out


_EVALUATE_JIT = {
    False: jax.jit(_evaluate, static_argnames=("ignore_index",)),
    True: jax.jit(_evaluate, static_argnames=("ignore_index", "eps")),
}


def run(p: Problem, jit: bool, logits=None, target=None, grad=True):
    """``_evaluate`` on problem ``p`` (optionally replacing logits/target).

    Op-by-op execution is slow, so eagerly the gradient is computed only if
    asked for; under jit it always is (one compilation serves all).
    """
    logits = jnp.asarray(p.logits if logits is None else logits)
    target = jnp.asarray(p.target if target is None else target)
    kwargs = p.kwargs()
    weight, eps = kwargs.pop("weight"), kwargs.pop("eps")
    if not jit:
        with jax.disable_jit():
            return _evaluate(logits, target, weight, eps, grad=grad, **kwargs)
    return _EVALUATE_JIT[p.static_eps](logits, target, weight, eps=eps, **kwargs)


# --------------------------------------------------------------------------
# Properties.
# --------------------------------------------------------------------------


@JIT
@SETTINGS
@given(p=problems(custom_ignore=True))
def test_matches_float64_reference(jit, p):
    out = run(p, jit, grad=False)
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
    out = run(p, jit, grad=False)
    for r in REDUCTIONS:
        value = np.asarray(out[r])
        assert np.all(np.isfinite(value)), (r, value)
        assert np.all(value >= 0), (r, value)


@JIT
@SETTINGS
@given(p=problems(soft=False, weights=False, smoothing=False))
def test_mean_gradient_rows_sum_to_zero_unweighted(jit, p):
    g = np.asarray(run(p, jit)["grad_mean"], np.float64)
    _assert_rows_sum_to_zero(g, error_budget(p)["grad_mean"])
    # Ignored rows get exactly zero gradient.
    ignored = p.target == p.ignore_index
    np.testing.assert_array_equal(g[ignored], 0.0)


@JIT
@FEWER
@given(p=problems())
def test_gradient_rows_sum_to_zero_all_options(jit, p):
    """Shift invariance implies zero row sums for every option combination."""
    g = np.asarray(run(p, jit)["grad_mean"], np.float64)
    _assert_rows_sum_to_zero(g, error_budget(p)["grad_mean"])


def _assert_rows_sum_to_zero(g, budget):
    assert np.all(np.isfinite(g))
    row_sum = np.abs(g.sum(-1))
    assert np.all(row_sum <= 1e-5 * np.abs(g).sum(-1) + budget + 1e-30), (row_sum, g)


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
    out = run(p, jit, grad=False)
    out_shifted = run(p, jit, logits=shifted, grad=False)
    budget = error_budget(p, shift=shift)
    for r in REDUCTIONS:
        # Twice the budget: both sides carry rounding errors.
        assert_close(out_shifted[r], out[r], 2 * budget[r])


@JIT
@SETTINGS
@given(p=problems(elements=EXTREME))
def test_extreme_finite_logits_give_finite_loss_and_gradients(jit, p):
    out = run(p, jit)
    for r in REDUCTIONS:
        value = np.asarray(out[r])
        assert np.all(np.isfinite(value)), (r, value)
        assert np.all(value >= 0), (r, value)
    assert np.all(np.isfinite(out["grad_mean"])), out["grad_mean"]


@JIT
@SETTINGS
@given(p=problems(elements=EXTREME, soft=False, weights=False, smoothing=False))
def test_extreme_logits_match_reference(jit, p):
    """Without options the float32 result is still accurate for huge logits."""
    out = run(p, jit, grad=False)
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
    hard = run(p, jit, grad=False)
    soft = run(p, jit, target=one_hot, grad=False)
    budget = error_budget(p)
    for r in ("none", "sum"):
        assert_close(hard[r], soft[r], 2 * budget[r])
    if p.weight is None:  # without weights both means divide by N
        assert_close(hard["mean"], soft["mean"], 2 * budget["mean"])


VMAP_BATCH = 3


def _loss(logits, target, weight, eps, ignore_index, reduction):
    return jxent.cross_entropy(
        logits,
        target,
        weight,
        ignore_index=ignore_index,
        reduction=reduction,
        label_smoothing=eps,
    )


@functools.partial(jax.jit, static_argnames=("ignore_index",))
def _vmapped(logits, target, weight, eps, *, ignore_index):
    """Per-element and mean losses of each problem in the batch, via vmap."""

    def one(x, t):
        return tuple(
            _loss(x, t, weight, eps, ignore_index, r) for r in ("none", "mean")
        )

    return jax.vmap(one)(logits, target)


# The direct call on the batched (B, N, C) logits.
_direct = jax.jit(_loss, static_argnames=("ignore_index", "reduction"))


@FEWER
@given(p=problems(shape=(4, 3), weights="always"), data=st.data())
def test_vmap_over_leading_batch_equals_direct_call(p, data):
    """A batch of VMAP_BATCH problems sharing the options, one shape and a
    class weight (possibly with zeros), to limit compilations.

    Under jit only: eager (op-by-op) vmap applies the same batching rules but
    would compile every primitive again for the batched shapes.
    """
    n, c = p.logits.shape
    more = data.draw(hnp.arrays(np.float32, (VMAP_BATCH - 1, n, c), elements=MODERATE))
    logits = np.concatenate([p.logits[None], more])
    if p.soft:
        elements = st.floats(0.0, 1.0, width=32)
        more_t = data.draw(
            hnp.arrays(np.float32, (VMAP_BATCH - 1, n, c), elements=elements)
        )
    else:
        elements = st.integers(0, c - 1) | st.just(p.ignore_index)
        more_t = data.draw(hnp.arrays(np.int32, (VMAP_BATCH - 1, n), elements=elements))
    target = np.concatenate([p.target[None], more_t])
    args = (
        jnp.asarray(logits),
        jnp.asarray(target),
        p.kwargs()["weight"],
        jnp.float32(p.eps),
    )
    vmapped, vmapped_mean = _vmapped(*args, ignore_index=p.ignore_index)
    direct = _direct(*args, ignore_index=p.ignore_index, reduction="none")
    assert vmapped.shape == direct.shape == (VMAP_BATCH, n)
    assert vmapped_mean.shape == (VMAP_BATCH,)
    for b in range(VMAP_BATCH):
        single = dataclasses.replace(p, logits=logits[b], target=target[b])
        budget = error_budget(single)
        assert_close(vmapped[b], direct[b], budget["none"], rtol=1e-6)
        ref = reference(single)
        assert_close(vmapped[b], ref["none"], budget["none"])
        assert_close(vmapped_mean[b], ref["mean"], budget["mean"])


@SETTINGS
@given(p=problems(custom_ignore=True, static_eps=True))
def test_jit_equals_eager(p):
    jitted = run(p, jit=True)
    eager = run(p, jit=False)
    budget = error_budget(p)
    for r in REDUCTIONS:
        assert_close(jitted[r], eager[r], budget[r], rtol=1e-6)
    np.testing.assert_allclose(
        jitted["grad_mean"], eager["grad_mean"], rtol=1e-5, atol=1e-6
    )
