"""z_loss, soft_cap, where and return_lse against a float64 reference."""

from __future__ import annotations

import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import reference_cross_entropy

import jxent

RNG = np.random.default_rng(11)
N, C = 6, 7
LOGITS = (RNG.normal(size=(N, C)) * 3).astype(np.float32)
TARGET = np.array([0, 2, -100, 5, 6, 1])
WEIGHT = RNG.uniform(0.3, 2.0, size=C).astype(np.float32)
CLASS_MASK = np.array([True, True, True, False, True, True, True])  # excludes 3
ROW_MASK = np.ones((N, C), bool)
ROW_MASK[1, [0, 4]] = False
ROW_MASK[4, 1] = False

# weight x label_smoothing x z_loss as a half fraction (every pair of values
# appears), crossed with every soft_cap x where combination. CI runs half of
# that product, in which every value of each option meets every value of
# every other (each soft_cap x where pair twice); pytest --full the rest.
CASES = [
    (weight, eps, z, cap, mask)
    for (weight, eps, z) in (
        (None, 0.0, 0.0),
        (WEIGHT, 0.2, 0.0),
        (None, 0.2, 1e-2),
        (WEIGHT, 0.0, 1e-2),
    )
    for cap, mask in itertools.product((None, 2.5), (None, "class", "row"))
]
IN_CI = {(i, j) for i in range(4) for j in range(6) if (j + i // 2) % 2 == i % 2}


def _case_id(case):
    w, e, z, c, m = case
    return f"w{w is not None:d}-eps{e}-z{z}-cap{c}-{m}"


@pytest.mark.parametrize(
    ("weight", "eps", "z", "cap", "mask"),
    [
        pytest.param(*case, id=_case_id(case))
        if (k // 6, k % 6) in IN_CI
        else pytest.param(*case, id=_case_id(case), marks=pytest.mark.full)
        for k, case in enumerate(CASES)
    ],
)
def test_options_match_float64_reference(weight, eps, z, cap, mask):
    where = {None: None, "class": CLASS_MASK, "row": ROW_MASK}[mask]
    for reduction in ("none", "mean", "sum"):
        kw = dict(
            reduction=reduction,
            label_smoothing=eps,
            z_loss=z,
            soft_cap=cap,
            where=where,
        )
        ct = jnp.arange(1.0, N + 1.0) if reduction == "none" else 1.0

        def ours(x, kw=kw, ct=ct):
            loss, lse = jxent.cross_entropy(x, TARGET, weight, return_lse=True, **kw)
            return jnp.sum(loss * ct), (loss, lse)

        (_, (loss, lse)), grad = jax.jit(jax.value_and_grad(ours, has_aux=True))(LOGITS)
        with jax.enable_x64(True):
            w64 = None if weight is None else weight.astype(np.float64)

            def ref(x, kw=kw, ct=ct, w64=w64):
                loss, lse = reference_cross_entropy(x, TARGET, w64, **kw)
                return jnp.sum(loss * ct), (loss, lse)

            (_, (ref_loss, ref_lse)), ref_grad = jax.value_and_grad(ref, has_aux=True)(
                LOGITS.astype(np.float64)
            )
            ref_loss, ref_lse, ref_grad = map(np.asarray, (ref_loss, ref_lse, ref_grad))
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-6, atol=1e-6)
        np.testing.assert_allclose(lse, ref_lse, rtol=2e-6, atol=1e-6)
        assert lse.dtype == jnp.float32 and lse.shape == (N,)
        np.testing.assert_allclose(grad, ref_grad, rtol=2e-6, atol=1e-6)


def test_class_mask_equals_slicing_the_vocabulary():
    keep = np.flatnonzero(CLASS_MASK)
    remap = {c: i for i, c in enumerate(keep)}
    target = np.array([0, 2, -100, 5, 6, 1])
    sliced_target = np.array([remap.get(t, t) for t in target])
    for eps in (0.0, 0.3):
        masked = jxent.cross_entropy(
            LOGITS, target, where=CLASS_MASK, label_smoothing=eps, reduction="none"
        )
        sliced = jxent.cross_entropy(
            LOGITS[:, keep], sliced_target, label_smoothing=eps, reduction="none"
        )
        np.testing.assert_allclose(masked, sliced, rtol=1e-6)


def test_class_mask_along_axis_one():
    x = np.moveaxis(LOGITS.reshape(2, 3, C), 2, 1)  # (2, C, 3)
    t = TARGET.reshape(2, 3)
    t = np.where(t == 3, 0, t)
    got = jxent.cross_entropy(x, t, axis=1, where=CLASS_MASK, reduction="none")
    want = jxent.cross_entropy(
        LOGITS.reshape(2, 3, C), t, where=CLASS_MASK, reduction="none"
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)


def test_target_on_excluded_class_is_nan():
    target = np.array([3, 0, 1, 2, 4, 5])  # class 3 is excluded
    loss = jax.jit(
        lambda x, t: jxent.cross_entropy(x, t, where=CLASS_MASK, reduction="none")
    )(LOGITS, target)
    assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))


def test_excluded_classes_get_zero_gradient():
    grad = jax.grad(
        lambda x: jxent.cross_entropy(
            x,
            np.where(TARGET == 3, 0, TARGET),
            where=CLASS_MASK,
            label_smoothing=0.1,
        )
    )(LOGITS)
    assert np.all(np.asarray(grad)[:, 3] == 0)
    assert np.all(np.isfinite(grad))


def test_soft_cap_is_applied_before_everything():
    cap = 1.5
    capped = cap * np.tanh(LOGITS / cap)
    np.testing.assert_allclose(
        jxent.cross_entropy(LOGITS, TARGET, soft_cap=cap, label_smoothing=0.1),
        jxent.cross_entropy(capped, TARGET, label_smoothing=0.1),
        rtol=1e-6,
    )


def test_soft_cap_gradient_with_respect_to_cap():
    with jax.enable_x64(True):
        x = LOGITS.astype(np.float64)

        def f(cap):
            return jxent.cross_entropy(x, TARGET, soft_cap=cap)

        def g(cap):
            return reference_cross_entropy(x, TARGET, soft_cap=cap)[0]

        np.testing.assert_allclose(jax.grad(f)(2.0), jax.grad(g)(2.0), rtol=1e-10)


def test_z_loss_is_added_per_non_ignored_position():
    plain = jxent.cross_entropy(LOGITS, TARGET, reduction="none")
    with_z, lse = jxent.cross_entropy(
        LOGITS, TARGET, reduction="none", z_loss=1e-3, return_lse=True
    )
    valid = TARGET != -100
    np.testing.assert_allclose(
        with_z, np.where(valid, plain + 1e-3 * lse**2, 0.0), rtol=1e-6
    )
    np.testing.assert_allclose(
        lse, jax.scipy.special.logsumexp(LOGITS, axis=-1), rtol=1e-6
    )


def test_probability_targets_accept_the_options():
    q = jax.nn.softmax(jnp.asarray(RNG.normal(size=(N, C)), jnp.float32))
    q = jnp.where(CLASS_MASK, q, 0.0)
    loss, lse = jxent.cross_entropy(
        LOGITS,
        q,
        soft_cap=3.0,
        z_loss=1e-2,
        where=CLASS_MASK,
        return_lse=True,
        label_smoothing=0.1,
        reduction="none",
    )
    x = 3.0 * np.tanh(LOGITS / 3.0)
    keep = np.flatnonzero(CLASS_MASK)
    sliced = jxent.cross_entropy(
        x[:, keep], q[:, keep], label_smoothing=0.1, reduction="none"
    )
    ref_lse = jax.scipy.special.logsumexp(x[:, keep], axis=-1)
    np.testing.assert_allclose(lse, ref_lse, rtol=1e-6)
    np.testing.assert_allclose(loss, sliced + 1e-2 * ref_lse**2, rtol=1e-6)


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        ({"z_loss": -0.1}, ValueError, "`z_loss` must be >= 0, got -0.1"),
        (
            {"soft_cap": 0.0},
            ValueError,
            r"`soft_cap` must be None \(no capping\) or a "
            "finite number > 0, got 0.0",
        ),
        ({"soft_cap": -2}, ValueError, "`soft_cap` must be None .* > 0"),
        ({"soft_cap": np.inf}, ValueError, "`soft_cap` must be None .*finite.*inf"),
        ({"where": np.ones((3, C), bool)}, ValueError, r"`where` of shape \(3, 7\)"),
        ({"where": np.ones(C)}, TypeError, "`where` must be a boolean array"),
        ({"return_lse": 1}, TypeError, "`return_lse` must be a bool"),
    ],
)
def test_option_errors(kwargs, error, match):
    with pytest.raises(error, match=match):
        jxent.cross_entropy(LOGITS, TARGET, **kwargs)
    with pytest.raises(error, match=match):
        jax.jit(lambda x: jxent.cross_entropy(x, TARGET, **kwargs))(LOGITS)
