"""Low precision, masked (-inf) classes, extreme and NaN logits."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import torch, torch_cross_entropy

import jxent


def _f64_reference(logits, target, **kw):
    return torch_cross_entropy(np.asarray(logits, np.float64), target, **kw)[0]


@pytest.mark.skipif(torch is None, reason="torch oracle not installed")
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_low_precision_mean_over_32k_classes(dtype, smoothing):
    rng = np.random.default_rng(0)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(8, 32768)), dtype)
    target = rng.integers(0, 32768, size=8)
    loss = jxent.cross_entropy(logits, target, label_smoothing=smoothing)
    assert loss.dtype == dtype
    want = _f64_reference(
        np.asarray(logits.astype(jnp.float32)), target, label_smoothing=smoothing
    )
    assert abs(float(loss) - want) / want < 1e-2


@pytest.mark.skipif(torch is None, reason="torch oracle not installed")
def test_float16_label_smoothing_does_not_overflow():
    """torch's fp16 smoothing term sums to > 65504 before scaling and gives inf."""
    rng = np.random.default_rng(0)
    logits16 = (rng.normal(size=(64, 1000)) * 3).astype(np.float16)
    target = rng.integers(0, 1000, size=64)
    for reduction in ("mean", "sum"):
        loss = jxent.cross_entropy(
            logits16, target, label_smoothing=0.1, reduction=reduction
        )
        assert loss.dtype == jnp.float16 and np.isfinite(float(loss))
        want = _f64_reference(
            logits16, target, label_smoothing=0.1, reduction=reduction
        )
        assert abs(float(loss) - want) / want < 2e-3
    torch_fp16 = torch.nn.functional.cross_entropy(
        torch.tensor(logits16),
        torch.tensor(target),
        label_smoothing=0.1,
        reduction="sum",
    )
    assert torch.isinf(torch_fp16)  # the torch behaviour we improve on


@pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the split product is the CPU path's"
)
@pytest.mark.parametrize("axis", [-1, 0])
def test_bfloat16_class_dot_keeps_float32_weights(axis):
    """The split-weight bfloat16 product equals the float32 one to ~1e-7."""
    from jxent._kernels import _bfloat16_class_dot

    rng = np.random.default_rng(1)
    logits = jnp.asarray(rng.normal(scale=4.0, size=(16, 2048)), jnp.bfloat16)
    weight = jnp.asarray(rng.uniform(0.01, 10.0, size=2048), jnp.float32)
    if axis == 0:
        logits = logits.T
    got = jax.jit(_bfloat16_class_dot, static_argnums=2)(logits, weight, axis)
    x, w = np.asarray(logits, np.float64), np.asarray(weight, np.float64)
    exact = np.tensordot(x, w, ([axis], [0]))
    scale = np.tensordot(np.abs(x), w, ([axis], [0]))
    assert got.dtype == jnp.float32
    np.testing.assert_array_less(np.abs(np.asarray(got) - exact), 1e-6 * scale)


@pytest.mark.parametrize("options", [{}, {"label_smoothing": 0.1, "weight": True}])
def test_bfloat16_gradient_is_float32_gradient_rounded(options):
    """16-bit gradients are computed in float32 and rounded once at the end."""
    rng = np.random.default_rng(2)
    logits = jnp.asarray(rng.normal(scale=3.0, size=(32, 512)), jnp.bfloat16)
    target = jnp.asarray(rng.integers(0, 512, size=32))
    kw = dict(options)
    if kw.pop("weight", False):
        kw["weight"] = jnp.asarray(rng.uniform(0.5, 2.0, size=512), jnp.float32)

    def grad(x):
        loss = lambda x: jxent.cross_entropy(x, target, reduction="sum", **kw)
        return jax.jit(jax.grad(lambda x: loss(x).astype(jnp.float32)))(x)

    got = np.asarray(grad(logits), np.float32)
    want = np.asarray(grad(logits.astype(jnp.float32)))
    # Within one bfloat16 rounding of the float32 gradient, target entries
    # (p_t - 1, the largest) included.
    np.testing.assert_array_less(np.abs(got - want), 2.0**-8 * np.abs(want) + 1e-30)
    rows = np.arange(32)
    assert np.all(got[rows, np.asarray(target)] < 0)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16, jnp.float32])
def test_output_dtype_is_input_dtype(dtype):
    logits = jnp.zeros((2, 3), dtype)
    target = jnp.array([0, 2])
    for fn in (
        lambda x: jxent.cross_entropy(x, target),
        lambda x: jxent.cross_entropy(x, target, reduction="none"),
        lambda x: jxent.cross_entropy(x, jxent.softmax(x)),
        lambda x: jxent.log_softmax(x),
        lambda x: jxent.softmax(x),
        lambda x: jxent.nll_loss(x, target),
        lambda x: jxent.entropy(jxent.softmax(x)),
    ):
        assert fn(logits).dtype == dtype
    assert (
        jax.grad(lambda x: jxent.cross_entropy(x, target).astype(jnp.float32))(
            logits
        ).dtype
        == dtype
    )


def test_float64_when_x64_enabled():
    with jax.enable_x64(True):
        loss = jxent.cross_entropy(jnp.zeros((2, 3), jnp.float64), jnp.array([0, 1]))
        assert loss.dtype == jnp.float64
        np.testing.assert_allclose(loss, np.log(3), rtol=1e-15)


NEG_INF = -jnp.inf
MASKED = jnp.array([[0.0, NEG_INF, 1.0], [2.0, 0.5, NEG_INF], [NEG_INF, NEG_INF, 3.0]])
MASKED_TARGET = jnp.array([2, 0, 2])
WEIGHT = jnp.array([1.0, 3.0, 0.5])


def _value_and_grad(fn, *args):
    return jax.jit(jax.value_and_grad(fn))(*args)


@pytest.mark.parametrize("weight", [None, WEIGHT])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_masked_classes_give_finite_loss_and_grads(weight, reduction):
    def loss(x, eps):
        return jxent.cross_entropy(
            x, MASKED_TARGET, weight, label_smoothing=eps, reduction=reduction
        )

    # Static ε = 0 (smoothing term skipped) and traced ε = 0 (term computed and
    # must not produce 0 * inf).
    static_value, static_grad = _value_and_grad(lambda x: loss(x, 0.0), MASKED)
    traced_value, traced_grad = _value_and_grad(loss, MASKED, jnp.float32(0.0))
    for value, grad in ((static_value, static_grad), (traced_value, traced_grad)):
        assert np.isfinite(value)
        assert np.all(np.isfinite(grad))
    np.testing.assert_allclose(static_value, traced_value, rtol=1e-6)
    np.testing.assert_allclose(static_grad, traced_grad, rtol=1e-6, atol=1e-7)
    # The masked classes get exactly zero gradient.
    assert np.all(np.asarray(static_grad)[np.isinf(MASKED)] == 0)
    # Same as dropping the masked classes (row 0: classes 0, 2).
    row0 = jxent.cross_entropy(jnp.array([0.0, 1.0]), jnp.array(1), reduction="sum")
    none = jxent.cross_entropy(MASKED, MASKED_TARGET, reduction="none")
    np.testing.assert_allclose(none[0], row0, rtol=1e-6)
    # With ε > 0 the smoothed target puts mass on an impossible class: +inf as
    # in torch, while gradients stay finite.
    value, grad = _value_and_grad(loss, MASKED, jnp.float32(0.1))
    assert value == jnp.inf
    assert np.all(np.isfinite(grad))


def test_masked_classes_none_reduction_traced_zero_smoothing():
    def loss(x, eps):
        return jxent.cross_entropy(
            x, MASKED_TARGET, WEIGHT, label_smoothing=eps, reduction="none"
        )

    values = jax.jit(loss)(MASKED, 0.0)
    assert np.all(np.isfinite(values))
    jac = jax.jit(jax.jacrev(loss))(MASKED, 0.0)
    assert np.all(np.isfinite(jac))


def test_zero_weight_on_masked_class_keeps_smoothing_finite():
    """w_c = 0 on a -inf class: its smoothing contribution is 0, not 0 * inf."""
    weight = jnp.array([1.0, 0.0, 1.0])
    x = jnp.array([[0.0, NEG_INF, 1.0]])
    value, grad = jax.value_and_grad(
        lambda x: jxent.cross_entropy(x, jnp.array([2]), weight, label_smoothing=0.2)
    )(x)
    assert np.isfinite(value) and np.all(np.isfinite(grad))
    lp0, lp2 = -np.log1p(np.e), 1.0 - np.log1p(np.e)
    want = 0.8 * -lp2 + 0.2 / 3 * (-lp0 - lp2)
    np.testing.assert_allclose(value, want, rtol=1e-6)
    if torch is not None:  # the README's row: torch gives NaN (0 · -inf)
        theirs = torch.nn.functional.cross_entropy(
            torch.tensor(np.asarray(x)), torch.tensor([2]),
            torch.tensor(np.asarray(weight)), label_smoothing=0.2,
        )  # fmt: skip
        assert torch.isnan(theirs)


def test_probability_target_with_zero_mass_on_masked_class():
    x = jnp.array([[0.0, NEG_INF, 1.0]])
    q = jnp.array([[0.25, 0.0, 0.75]])
    value, (gx, gq) = jax.value_and_grad(jxent.cross_entropy, argnums=(0, 1))(x, q)
    assert np.isfinite(value)  # torch: NaN (0 * -inf)
    assert np.all(np.isfinite(gx))
    # d loss / d q = -log p: +inf on the impossible class (the true derivative,
    # as torch), finite elsewhere.
    assert gq[0, 1] == np.inf and np.all(np.isfinite(gq[0, [0, 2]]))
    np.testing.assert_allclose(
        value,
        jxent.cross_entropy(jnp.array([[0.0, 1.0]]), jnp.array([[0.25, 0.75]])),
        rtol=1e-6,
    )


def test_target_on_masked_class_is_inf():
    loss = jxent.cross_entropy(jnp.array([[0.0, NEG_INF, 1.0]]), jnp.array([1]))
    assert loss == jnp.inf


@pytest.mark.parametrize("scale", [1e4, 1e30])
@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_extreme_logits_stay_finite(scale, smoothing):
    x = jnp.array([[1.0, -1.0, 0.0, 0.5], [-1.0, 1.0, 1.0, -0.25]]) * scale
    for target in (jnp.array([0, 3]), jnp.array([1, 0])):
        value, grad = jax.value_and_grad(
            lambda x, t=target: jxent.cross_entropy(x, t, label_smoothing=smoothing)
        )(x)
        assert np.isfinite(value), (scale, smoothing, target)
        assert np.all(np.isfinite(grad))
    # Easy examples cost ~0; the gradient is the softmax minus the target.
    value = jxent.cross_entropy(x, jnp.array([0, 1]), reduction="none")
    np.testing.assert_allclose(value, [0.0, np.log(2)], atol=1e-6)


def test_smoothing_sum_has_no_cancellation_at_large_offsets():
    """Σ_c (lse - x_c) computed as C·lse - Σx would lose all digits here."""
    rng = np.random.default_rng(1)
    base = rng.normal(size=(4, 1000)).astype(np.float32)
    target = jnp.array([1, 2, 3, 4])
    a = jxent.cross_entropy(base, target, label_smoothing=0.5, reduction="none")
    b = jxent.cross_entropy(base + 1e4, target, label_smoothing=0.5, reduction="none")
    np.testing.assert_allclose(a, b, rtol=2e-3)


def test_nan_logits_in_ignored_row_do_not_leak():
    x = jnp.array([[1.0, 2.0, 0.5], [jnp.nan, 0.0, jnp.inf], [0.3, 0.1, 0.2]])
    clean = x.at[1].set(0.0)
    target = jnp.array([1, -100, 0])
    for kw in ({}, {"weight": WEIGHT}, {"label_smoothing": 0.1}):
        value, grad = jax.value_and_grad(
            lambda x, kw=kw: jxent.cross_entropy(x, target, **kw)
        )(x)
        clean_value, clean_grad = jax.value_and_grad(
            lambda x, kw=kw: jxent.cross_entropy(x, target, **kw)
        )(clean)
        np.testing.assert_allclose(value, clean_value, rtol=1e-6)
        np.testing.assert_allclose(grad, clean_grad, rtol=1e-6)
        assert np.all(np.asarray(grad)[1] == 0)  # torch: NaN gradient here


def test_all_masked_row_is_nan_like_torch():
    loss = jxent.cross_entropy(jnp.full((1, 3), NEG_INF), jnp.array([0]))
    assert np.isnan(loss)


# --- tests that kill the mutation audit's survivors ----------------------------


def _bfloat16_ulp(x):
    """One unit in the last place of bfloat16 at |x| (8 significant bits)."""
    x = np.abs(np.asarray(x, np.float64))
    return 2.0 ** (np.floor(np.log2(np.maximum(x, 1e-30))) - 7)


@pytest.mark.parametrize("margin", [5.0, 10.0])
def test_bfloat16_target_gradient_at_a_large_margin(margin):
    """p_t - 1 is tiny when the target wins by ``margin``: it must be formed in
    float32 and rounded once (a 16-bit one-hot subtraction loses it: 37% off at
    a 10-logit margin)."""
    c = 64
    logits = np.zeros((4, c), np.float32)
    target = np.array([3, 10, 20, 63])
    logits[np.arange(4), target] = margin
    x = jnp.asarray(logits, jnp.bfloat16)
    grad = jax.grad(lambda x: jxent.cross_entropy(x, target, reduction="sum"))(x)
    exact = np.exp(logits) / np.exp(logits).sum(-1, keepdims=True)
    exact[np.arange(4), target] -= 1.0
    got = np.asarray(grad, np.float64)
    np.testing.assert_array_less(np.abs(got - exact), _bfloat16_ulp(exact) + 1e-30)


@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_bfloat16_softmax_is_float32_math_rounded_once(fn):
    """Within one bfloat16 ulp of the exact result (bfloat16 arithmetic: up to
    0.125 off on a fifth of the entries)."""
    rng = np.random.default_rng(3)
    x = jnp.asarray(rng.normal(scale=3.0, size=(8, 1024)), jnp.bfloat16)
    got = np.asarray(getattr(jxent, fn)(x), np.float64)
    xf = np.asarray(x, np.float64)
    lse = np.log(np.exp(xf - xf.max(-1, keepdims=True)).sum(-1, keepdims=True))
    exact = xf - xf.max(-1, keepdims=True) - lse
    exact = exact if fn == "log_softmax" else np.exp(exact)
    np.testing.assert_array_less(np.abs(got - exact), _bfloat16_ulp(exact) + 1e-30)


def _masked_log_softmax64(x, mask, axis):
    """float64 reference: excluded classes leave the sum and give -inf."""
    x = np.moveaxis(np.asarray(x, np.float64), axis, -1)
    mask = np.moveaxis(mask, axis, -1)
    top = np.where(mask, x, -np.inf).max(-1, keepdims=True)
    top = np.where(np.isfinite(top), top, 0.0)
    total = np.where(mask, np.exp(x - top), 0.0).sum(-1, keepdims=True)
    with np.errstate(divide="ignore"):
        out = np.where(mask, x - top - np.log(total), -np.inf)
    return np.moveaxis(out, -1, axis)


@pytest.mark.parametrize("kind", ["per element", "per class"])
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("axis", [-1, 1, (1,)])
def test_softmax_where_excludes_classes(axis, dtype, kind):
    """``where`` as in ``jax.nn``: a per-element mask, or a length-C one laid
    along ``axis``, an int or a 1-tuple (a 1-tuple's was laid along the last
    axis); a row with every class excluded gives -inf and 0, not NaN.
    Values and gradients (both modes) against float64 formulas."""
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(scale=3.0, size=(4, 6, 5)), dtype)
    ax = (axis[0] if isinstance(axis, tuple) else axis) % 3
    if kind == "per element":
        mask = rng.random(x.shape) < 0.6
        mask[0] = False  # every class of these rows excluded
        expanded = mask
    else:
        mask = np.array([True, False, True, True, False, True][: x.shape[ax]])
        shape = [1, 1, 1]
        shape[ax] = mask.size
        expanded = np.broadcast_to(mask.reshape(shape), x.shape)
    want = _masked_log_softmax64(x, expanded, ax)
    tol = 1e-6 if dtype == "float32" else 1e-2
    got = jxent.log_softmax(x, axis=axis, where=mask)
    assert got.dtype == x.dtype
    np.testing.assert_allclose(np.asarray(got, np.float64), want, rtol=tol, atol=tol)
    probs = np.asarray(jxent.softmax(x, axis=axis, where=mask), np.float64)
    np.testing.assert_allclose(probs, np.exp(want), rtol=tol, atol=tol)
    if dtype != "float32":
        return
    # d/dx of sum(c * softmax): p * (c - sum(p * c)) on included classes.
    c = rng.normal(size=x.shape)
    p = np.exp(want)
    expected = p * (c - (p * c).sum(ax, keepdims=True))

    def weighted(x):
        return jnp.sum(c * jxent.softmax(x, axis=axis, where=mask))

    np.testing.assert_allclose(jax.grad(weighted)(x), expected, rtol=1e-5, atol=1e-6)
    tangent = jax.jvp(
        lambda x: jxent.softmax(x, axis=axis, where=mask),
        (x,),
        (jnp.asarray(c, x.dtype),),
    )[1]
    np.testing.assert_allclose(tangent, expected, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("axis", [(0, 2), (-1, 1), [2, 0], None])
def test_softmax_over_several_axes(axis, dtype):
    """A tuple of axes (or None: all), as ``jax.nn.log_softmax`` and
    ``jax.nn.softmax`` take them (jxent's raised a TypeError): one
    distribution over those axes together, with a per-element ``where``.
    Values and gradients (both modes) against float64 formulas; bfloat16
    within an ulp-scale tolerance of them (float32 accumulation)."""
    rng = np.random.default_rng(6)
    x = jnp.asarray(rng.normal(scale=3.0, size=(3, 4, 5)), dtype)
    axes = tuple(range(3)) if axis is None else tuple(a % 3 for a in axis)
    mask = rng.random(x.shape) < 0.7
    kept = [a for a in range(3) if a not in axes]
    # The axes moved last and flattened: one class axis.
    flat = lambda a: np.transpose(a, kept + list(axes)).reshape(
        *(a.shape[k] for k in kept), -1
    )
    unflat = lambda a: np.transpose(
        a.reshape(*(x.shape[k] for k in kept), *(x.shape[k] for k in axes)),
        np.argsort(kept + list(axes)),
    )
    tol = 1e-6 if dtype == "float32" else 1e-2
    for where in (None, mask):
        full = np.ones(x.shape, bool) if where is None else where
        want = unflat(_masked_log_softmax64(flat(np.asarray(x)), flat(full), -1))
        got = jxent.log_softmax(x, axis=axis, where=where)
        assert got.dtype == x.dtype
        np.testing.assert_allclose(
            np.asarray(got, np.float64), want, rtol=tol, atol=tol
        )
        probs = jxent.softmax(x, axis=axis, where=where)
        np.testing.assert_allclose(np.asarray(probs, np.float64), np.exp(want),
                                   rtol=tol, atol=tol)  # fmt: skip
    if dtype != "float32":
        return
    c = rng.normal(size=x.shape)
    p = np.exp(want)
    expected = p * (c - (p * c).sum(axes, keepdims=True))
    soft = lambda x: jxent.softmax(x, axis=axis, where=mask)
    np.testing.assert_allclose(
        jax.grad(lambda x: jnp.sum(c * soft(x)))(x), expected, rtol=1e-5, atol=1e-6
    )
    tangent = jax.jvp(soft, (x,), (jnp.asarray(c, x.dtype),))[1]
    np.testing.assert_allclose(tangent, expected, rtol=1e-5, atol=1e-6)


def test_softmax_axes_must_be_distinct_and_in_range():
    x = jnp.zeros((2, 3))
    for axis, error in (((0, 0), ValueError), ((), ValueError), ((0, 2), ValueError),
                        ((0, 1.0), TypeError), ("0", TypeError)):  # fmt: skip
        for fn in (jxent.log_softmax, jxent.softmax):
            with pytest.raises(error, match="`axis`"):
                fn(x, axis=axis)


def test_softmax_where_must_be_boolean_and_broadcast():
    x = jnp.zeros((2, 3))
    with pytest.raises(TypeError, match="`where` must be a boolean"):
        jxent.log_softmax(x, where=jnp.ones((2, 3)))
    with pytest.raises(ValueError, match="does not broadcast"):
        jxent.softmax(x, where=jnp.ones((2, 4), bool))


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
def test_bfloat16_loss_accumulates_in_float32(smoothing):
    """The loss over 32k bfloat16 logits is the exact loss of those values,
    rounded once to bfloat16 (bfloat16 sums of 32k terms are far off)."""
    rng = np.random.default_rng(4)
    logits = jnp.asarray(rng.normal(scale=2.0, size=(4, 32768)), jnp.bfloat16)
    target = rng.integers(0, 32768, size=4)
    got = jxent.cross_entropy(
        logits, target, label_smoothing=smoothing, reduction="none"
    )
    xf = np.asarray(logits, np.float64)
    m = xf.max(-1, keepdims=True)
    lse = (m + np.log(np.exp(xf - m).sum(-1, keepdims=True)))[:, 0]
    nll = lse - xf[np.arange(4), target]
    exact = (1 - smoothing) * nll + smoothing * (lse - xf.mean(-1))
    np.testing.assert_array_less(
        np.abs(np.asarray(got, np.float64) - exact), _bfloat16_ulp(exact)
    )


def test_overflow_fallback_runs_only_when_a_row_overflows(monkeypatch):
    """The row-maximum pass is taken only for a logit ~88 above its target's."""
    import jxent._kernels as kernels

    calls = []
    row_max = kernels._row_max
    monkeypatch.setattr(kernels, "_row_max", lambda *a: calls.append(1) or row_max(*a))
    target = jnp.array([0, 1])
    with jax.disable_jit():  # lax.cond runs only the branch it takes
        jxent.cross_entropy(jnp.array([[1.0, 50.0, -3.0], [0.0, 2.0, 1.0]]), target)
        assert calls == []
        loss = jxent.cross_entropy(
            jnp.array([[1.0, 100.0, -3.0], [0.0, 2.0, 1.0]]), target
        )
        assert calls
    x = np.array([[1.0, 100.0, -3.0], [0.0, 2.0, 1.0]])
    lse = x.max(-1) + np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1))
    np.testing.assert_allclose(loss, np.mean(lse - x[[0, 1], [0, 1]]), rtol=1e-6)


def test_smoothing_sum_keeps_its_digits_at_a_large_exact_offset():
    """Logits shifted by 2**16 (exactly representable, so the true loss is
    unchanged): ``Σw · lse - x · w`` alone would cancel ~C · 2**16 to a few
    units; the guard recomputes it from the row maximum."""
    rng = np.random.default_rng(5)
    base = (rng.integers(-32, 32, size=(4, 1000)) / 8).astype(np.float32)
    target = np.array([1, 2, 3, 4])
    weight = jnp.asarray(rng.uniform(0.5, 2.0, size=1000), jnp.float32)
    for kw in ({}, {"weight": weight}):
        a = jxent.cross_entropy(
            base, target, label_smoothing=0.5, reduction="none", **kw
        )
        b = jxent.cross_entropy(
            base + np.float32(2.0**16), target, label_smoothing=0.5,
            reduction="none", **kw,
        )  # fmt: skip
        np.testing.assert_allclose(b, a, rtol=2e-6)


@pytest.mark.skipif(torch is None, reason="torch oracle not installed")
@pytest.mark.parametrize("big", [1e4, 1e8, 1e30])
def test_tied_large_logits_gradient_matches_torch(big):
    """lse of huge logits is rounded in float32; the softmax must not be."""
    logits = np.array([[big, big, 0.0], [big, big - 1.0 if big < 1e7 else big, 0.0]])
    target = np.array([0, 1])
    for options in ({}, {"label_smoothing": 0.1, "weight": WEIGHT}):
        weight = options.get("weight")
        eps = options.get("label_smoothing", 0.0)
        x = jnp.asarray(logits, jnp.float32)

        def loss(x, weight=weight, eps=eps):
            return jxent.cross_entropy(x, target, weight, label_smoothing=eps)

        grad, fwd = jax.grad(loss)(x), jax.jacfwd(loss)(x)
        _, want = torch_cross_entropy(
            np.asarray(x, np.float64), target, weight, label_smoothing=eps
        )
        np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fwd, want, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch is None, reason="torch oracle not installed")
@pytest.mark.parametrize("one_pass", [None, True], ids=["cpu-path", "one-pass"])
@pytest.mark.parametrize("big", [1e4, 1e7, 1e30])
def test_ties_far_above_the_target_gradient_matches_torch(big, one_pass, monkeypatch):
    """The top classes tie far above the target: the loss (~big) is rounded
    in float32, their softmax (1/2, 1/3) must not be (it was 0.37 at 1e7
    and 1 each, summing to 2, at 1e30)."""
    monkeypatch.setattr(jxent._kernels, "_ONE_PASS", one_pass)
    logits = np.array(
        [[big, big, 0.0, 1.0], [big, 0.0, big, big], [big, big - 1.0, 0.0, 5.0]],
        np.float32,
    )
    target = np.array([2, 1, 3])
    for eps in (0.0, 0.1):

        def loss(x, eps=eps):
            return jxent.cross_entropy(x, target, label_smoothing=eps)

        grad, fwd = jax.grad(loss)(logits), jax.jacfwd(loss)(logits)
        _, want = torch_cross_entropy(
            logits.astype(np.float64), target, label_smoothing=eps
        )
        np.testing.assert_allclose(grad, want, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(fwd, want, rtol=1e-6, atol=1e-7)


def test_traced_zero_smoothing_with_a_minus_inf_logit_weight_gradient():
    """README semantics row: with ε traced (the smoothing term is in the
    program) and equal to 0, d loss / d weight of a class whose logit is
    -inf is 0, as with a concrete ε = 0 (the smoothing sum's derivative
    there, +inf, never meets the zero coefficient), in both modes and
    under vmap over ε; the other gradients equal the float64 formula."""
    logits = jnp.array([[2.0, 0.5, -jnp.inf], [1.0, -0.5, -jnp.inf]])
    target = jnp.array([1, 0])
    weight = jnp.array([1.0, 2.0, 0.5])

    def loss(z, w, eps):
        return jxent.cross_entropy(z, target, w, label_smoothing=eps)

    # float64: L = Σ_n w_{y_n} nll_n / Σ_n w_{y_n}
    z = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(z), axis=1))
    nll = lse - z[[0, 1], target]
    w_y = np.asarray(weight, np.float64)[target]
    value = np.sum(w_y * nll) / np.sum(w_y)
    want_w = np.zeros(3)
    np.add.at(want_w, np.asarray(target), (nll - value) / np.sum(w_y))
    p = np.exp(z - lse[:, None])
    want_z = (w_y / np.sum(w_y))[:, None] * (p - np.eye(3)[target])

    grad = jax.jit(jax.grad(loss, (0, 1)))(logits, weight, 0.0)
    fwd = jax.jit(jax.jacfwd(loss, 1))(logits, weight, 0.0)
    assert grad[1][2] == 0.0 and fwd[2] == 0.0
    np.testing.assert_allclose(grad[1], want_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(fwd, want_w, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(grad[0], want_z, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(jax.jit(loss)(logits, weight, 0.0), value, rtol=1e-6)
    # Only the zero member of a batch of ε: a positive ε keeps the true +inf
    # (its loss is +inf too).
    batched = jax.jit(jax.vmap(jax.grad(loss, 1), (None, None, 0)))
    both = batched(logits, weight, jnp.array([0.0, 0.1]))
    np.testing.assert_allclose(both[0], want_w, rtol=1e-6, atol=1e-7)
    assert both[1][2] == np.inf


def test_traced_zero_smoothing_probability_target_minus_inf_logit():
    """Probability targets, ε traced and 0, a -inf logit where q is 0: the
    loss and the gradients w.r.t. logits and weight are finite (the float64
    formula), d/dε is the true one-sided +inf (Σ_c (1/C - q_c) d/dq_c, with
    d/dq_c = +inf there, as the gradient w.r.t. q), not 0 · inf = NaN."""
    logits = jnp.array([[2.0, 0.5, -jnp.inf], [1.0, -0.5, -jnp.inf]])
    q = jnp.array([[0.3, 0.7, 0.0], [1.0, 0.0, 0.0]])
    weight = jnp.array([1.0, 2.0, 0.5])

    def loss(z, w, eps):
        return jxent.cross_entropy(z, q, w, label_smoothing=eps)

    z = np.asarray(logits, np.float64)[:, :2]
    lse = np.log(np.sum(np.exp(z), axis=1, keepdims=True))
    qq, ww = np.asarray(q, np.float64)[:, :2], np.asarray(weight, np.float64)[:2]
    want = np.sum(ww * qq * (lse - z)) / 2
    want_w = np.sum(qq * (lse - z), axis=0) / 2
    g_z, g_w, g_eps = jax.jit(jax.grad(loss, (0, 1, 2)))(logits, weight, 0.0)
    np.testing.assert_allclose(jax.jit(loss)(logits, weight, 0.0), want, rtol=1e-6)
    np.testing.assert_allclose(g_w[:2], want_w, rtol=1e-6)
    assert g_w[2] == 0.0 and np.all(np.isfinite(g_z)) and g_eps == np.inf


@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_probability_target_gradient_at_a_minus_inf_logit_with_smoothing(reduction):
    """d loss / d q with ε > 0 where a logit is -inf: torch's +inf there (the
    smoothed target's derivative 1 - ε times -log p = +inf) and its finite
    values elsewhere; reverse mode was ∞ - ∞ = NaN (autodiff of q + ε (u - q)
    formed ct - ε ct). Forward mode gives +inf along that entry; along a
    direction that leaves it 0 it gives inf · 0 = NaN, as torch's."""
    logits = jnp.array([[-jnp.inf, 1.0, 2.0], [0.0, 1.0, 2.0]])
    q = jnp.array([[0.0, 0.5, 0.5], [0.2, 0.3, 0.5]])
    weight = jnp.array([1.0, 2.0, 0.5])

    def loss(q, eps):
        return jxent.cross_entropy(
            logits, q, weight, label_smoothing=eps, reduction=reduction
        )

    tq = torch.tensor(np.asarray(q, np.float64), requires_grad=True)
    torch.nn.functional.cross_entropy(
        torch.tensor(np.asarray(logits, np.float64)), tq,
        torch.tensor(np.asarray(weight, np.float64)), label_smoothing=0.1,
        reduction=reduction,
    ).backward()  # fmt: skip
    want = tq.grad.numpy()
    assert want[0, 0] == np.inf
    got = jax.jit(jax.grad(loss))(q, 0.1)
    assert got[0, 0] == np.inf
    np.testing.assert_allclose(got[:, 1:], want[:, 1:], rtol=1e-6)
    np.testing.assert_allclose(got[1, 0], want[1, 0], rtol=1e-6)
    along = jnp.zeros_like(q).at[0, 0].set(1.0)
    assert (
        jax.jit(jax.jvp, static_argnums=0)(lambda q: loss(q, 0.1), (q,), (along,))[1]
        == np.inf
    )
    # d/dε: Σ (u - q) · w · (-log p), +inf through the -inf logit (u > q = 0).
    assert jax.jit(jax.grad(loss, 1))(q, 0.1) == np.inf


@pytest.mark.parametrize("num_classes", [100_000, 131_072])
def test_smoothing_sum_of_logits_near_a_common_value(num_classes):
    """Logits 343 ± 0.01: the one-product smoothing sum ``Σw · lse - x · w``
    cancels 30x, and XLA's float32 product was 1e-4 off, the loss 3e-3 off
    (label smoothing 1; 2.8e-4 at 0.1) before such rows took the exact sum
    (``_fast_smoothing``'s 4x bound)."""
    rng = np.random.default_rng(0)
    x = (343.06 + 0.01 * rng.normal(size=(2, num_classes))).astype(np.float32)
    target = np.array([1, 2])
    eps = jnp.array([0.1, 1.0])
    got = jax.jit(
        jax.vmap(lambda e: jxent.cross_entropy(x, target, label_smoothing=e))
    )(eps)
    for g, e in zip(np.asarray(got), (0.1, 1.0), strict=True):
        want, _ = torch_cross_entropy(x.astype(np.float64), target, label_smoothing=e)
        np.testing.assert_allclose(g, want, rtol=2e-6)


def test_zero_weight_on_the_targets_minus_inf_logit():
    """README semantics row: torch gives NaN (0 · inf); the weight excludes
    the position, as ignore_index would: the loss and gradients are those of
    the other rows (float64 formula), the excluded row's gradient 0."""
    logits = jnp.array([[0.0, -jnp.inf, 2.0, 3.0], [0.0, 1.0, 2.0, 3.0]])
    target = jnp.array([1, 2])
    weight = jnp.array([1.0, 0.0, 1.0, 1.0])
    want = np.log(np.sum(np.exp([0.0, 1.0, 2.0, 3.0]))) - 2.0
    for reduction in ("mean", "sum"):  # (row 0 weighs 0: both are row 1's)
        value, grad = jax.jit(
            jax.value_and_grad(
                lambda z, r=reduction: jxent.cross_entropy(
                    z, target, weight, reduction=r
                )
            )
        )(logits)
        np.testing.assert_allclose(value, want, rtol=1e-6)
        assert np.all(grad[0] == 0.0) and np.all(np.isfinite(grad[1]))
    torch_value, _ = torch_cross_entropy(np.asarray(logits, np.float64), target, weight)
    assert np.isnan(torch_value)  # the deviation


@pytest.mark.parametrize("reduction", ["none", "mean"])
def test_plus_inf_logit_is_not_finite(reduction):
    """README semantics row: a +inf logit makes the loss +inf or NaN and that
    row's gradient NaN somewhere, never all finite (torch: NaN everywhere)."""
    inf = jnp.inf
    target = jnp.array([1, 2])
    for row, eps in ((jnp.array([inf, 1.0, 2.0, 3.0]), 0.0),
                     (jnp.array([inf, 1.0, 2.0, 3.0]), 0.1),
                     (jnp.array([0.0, inf, 2.0, 3.0]), 0.0)):  # fmt: skip
        logits = jnp.stack([row, jnp.array([0.0, 1.0, 2.0, 3.0])])

        def loss(z, eps=eps):
            out = jxent.cross_entropy(
                z, target, label_smoothing=eps, reduction=reduction
            )
            return jnp.sum(out), out

        grad, out = jax.jit(jax.grad(loss, has_aux=True))(logits)
        assert not np.isfinite(np.asarray(out).ravel()[0])
        assert np.isnan(grad[0]).any()
