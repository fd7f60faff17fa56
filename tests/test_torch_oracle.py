"""jxent against torch in float64 over the full option grid, values and gradients.

Grid: target kind (integer, probabilities) x weight (none, per class) x
ignore_index (unused, padding -100, a real class) x label smoothing (0, 0.1)
x reduction (none, mean, sum) x layout (classes last, torch's axis 1) x rank
(unbatched (C,), (N, C), (N, C, d1, d2)). Inputs are float32; the oracle runs on
the same values upcast to float64.
"""

from __future__ import annotations

import functools
import itertools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from oracles import record_deviation, torch, torch_cross_entropy, torch_nll_loss

import jxent

pytestmark = pytest.mark.skipif(torch is None, reason="torch oracle not installed")

C = 5
REDUCTIONS = ("none", "mean", "sum")
# (name, jxent-layout logits shape, class axis); torch layout has classes at dim 1.
LAYOUTS = [
    ("unbatched", (C,), -1),
    ("NC-last", (6, C), -1),
    ("NC-axis1", (6, C), 1),
    ("NCd1d2-last", (3, 2, 2, C), -1),
    ("NCd1d2-axis1", (3, C, 2, 2), 1),
]
IGNORE = ("unused", "padding", "real-class")
RTOL = 2e-6  # float32 against float64


def _seed(*parts) -> int:
    """A seed that is stable across runs (str hashes are salted per process)."""
    return zlib.crc32(repr(parts).encode())


def _inputs(shape, axis, seed):
    rng = np.random.default_rng(seed)
    logits = rng.normal(scale=2.0, size=shape).astype(np.float32)
    cls_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    target = rng.integers(0, C, size=cls_shape)
    if target.ndim:
        target.flat[0] = 1  # the "real-class" ignore variant always has a hit
    weight = rng.uniform(0.2, 2.0, size=C).astype(np.float32)
    probs = rng.dirichlet(np.ones(C), size=cls_shape).astype(np.float32)
    probs = np.moveaxis(probs, -1, axis % len(shape)) if probs.ndim > 1 else probs
    return logits, target, weight, probs


def _ignore_setup(target, variant, seed):
    target = target.copy()
    if variant == "unused":
        return target, -100
    if variant == "padding":
        rng = np.random.default_rng(seed + 1)
        mask = rng.random(target.shape) < 0.3
        if target.ndim:
            mask.flat[-1] = True
            mask.flat[0] = False
        else:
            mask = np.array(True)
        return np.where(mask, -100, target), -100
    return target, 1


@functools.partial(jax.jit, static_argnames=("loss_fn", "options"))
def _all_reductions(logits, target, weight, cotangent, options, loss_fn=None):
    """Values and vector-Jacobian products for the three reductions at once."""
    loss_fn = jxent.cross_entropy if loss_fn is None else loss_fn
    opts = dict(options)
    out = {}
    for reduction in REDUCTIONS:
        loss, vjp = jax.vjp(
            lambda x, r=reduction: loss_fn(x, target, weight, reduction=r, **opts),
            logits,
        )
        ct = cotangent if reduction == "none" else jnp.ones((), loss.dtype)
        out[reduction] = (loss, vjp(ct)[0])
    return out


def _expected(logits, target, weight, cotangent, reduction, **kw):
    loss, grad = torch_cross_entropy(
        logits,
        target,
        weight,
        reduction=reduction,
        cotangent=cotangent if reduction == "none" else None,
        **kw,
    )
    if reduction == "mean" and np.isnan(loss):
        # Documented deviation: a zero denominator gives 0 and zero gradients.
        loss, grad = np.float64(0.0), np.zeros_like(grad)
    return loss, grad


def _check(kind, actual, expected):
    actual_loss, actual_grad = (np.asarray(a, np.float64) for a in actual)
    loss, grad = expected
    assert actual_loss.shape == np.shape(loss)
    np.testing.assert_allclose(actual_loss, loss, rtol=RTOL, atol=1e-6)
    np.testing.assert_allclose(actual_grad, grad, rtol=RTOL, atol=1e-6)
    record_deviation(f"{kind} value", actual_loss, loss)
    record_deviation(f"{kind} grad", actual_grad, grad)


HARD_GRID = list(itertools.product(LAYOUTS, (False, True), IGNORE, (0.0, 0.1)))


@pytest.mark.parametrize(
    ("layout", "weighted", "ignore", "smoothing"),
    HARD_GRID,
    ids=[f"{lay[0]}-w{int(w)}-{ig}-eps{eps}" for lay, w, ig, eps in HARD_GRID],
)
def test_integer_targets_match_torch(layout, weighted, ignore, smoothing):
    name, shape, axis = layout
    seed = _seed((name, weighted, ignore, smoothing))
    logits, target, weight, _ = _inputs(shape, axis, seed)
    target, ignore_index = _ignore_setup(target, ignore, seed)
    weight = weight if weighted else None
    cotangent = np.random.default_rng(seed).normal(size=target.shape)
    options = (
        ("ignore_index", ignore_index),
        ("label_smoothing", smoothing),
        ("axis", axis),
    )
    got = _all_reductions(logits, target, weight, cotangent.astype(np.float32), options)
    for reduction in REDUCTIONS:
        want = _expected(
            logits,
            target,
            weight,
            cotangent,
            reduction,
            ignore_index=ignore_index,
            label_smoothing=smoothing,
            axis=axis,
        )
        _check("cross_entropy integer", got[reduction], want)


SOFT_GRID = list(itertools.product(LAYOUTS, (False, True), (0.0, 0.1)))


@pytest.mark.parametrize(
    ("layout", "weighted", "smoothing"),
    SOFT_GRID,
    ids=[f"{lay[0]}-w{int(w)}-eps{eps}" for lay, w, eps in SOFT_GRID],
)
def test_probability_targets_match_torch(layout, weighted, smoothing):
    name, shape, axis = layout
    seed = _seed((name, weighted, smoothing, "soft"))
    logits, _, weight, probs = _inputs(shape, axis, seed)
    weight = weight if weighted else None
    cls_shape = shape[: axis % len(shape)] + shape[axis % len(shape) + 1 :]
    cotangent = np.random.default_rng(seed).normal(size=cls_shape)
    options = (("label_smoothing", smoothing), ("axis", axis))
    got = _all_reductions(logits, probs, weight, cotangent.astype(np.float32), options)
    for reduction in REDUCTIONS:
        want = _expected(
            logits,
            probs,
            weight,
            cotangent,
            reduction,
            label_smoothing=smoothing,
            axis=axis,
        )
        _check("cross_entropy probabilities", got[reduction], want)


NLL_GRID = list(itertools.product(LAYOUTS, (False, True), IGNORE))


@pytest.mark.parametrize(
    ("layout", "weighted", "ignore"),
    NLL_GRID,
    ids=[f"{lay[0]}-w{int(w)}-{ig}" for lay, w, ig in NLL_GRID],
)
def test_nll_loss_matches_torch(layout, weighted, ignore):
    name, shape, axis = layout
    seed = _seed((name, weighted, ignore, "nll"))
    logits, target, weight, _ = _inputs(shape, axis, seed)
    log_probs = np.asarray(jxent.log_softmax(logits, axis=axis))
    target, ignore_index = _ignore_setup(target, ignore, seed)
    weight = weight if weighted else None
    cotangent = np.random.default_rng(seed).normal(size=target.shape)
    options = (("ignore_index", ignore_index), ("axis", axis))
    got = _all_reductions(
        log_probs,
        target,
        weight,
        cotangent.astype(np.float32),
        options,
        loss_fn=jxent.nll_loss,
    )
    for reduction in REDUCTIONS:
        loss, grad = torch_nll_loss(
            log_probs,
            target,
            weight,
            ignore_index=ignore_index,
            reduction=reduction,
            axis=axis,
            cotangent=cotangent if reduction == "none" else None,
        )
        if reduction == "mean" and np.isnan(loss):
            loss, grad = np.float64(0.0), np.zeros_like(grad)
        _check("nll_loss", got[reduction], (loss, grad))


@pytest.mark.parametrize("axis", [-1, 0, 1])
def test_log_softmax_and_softmax_match_torch(axis):
    x = np.random.default_rng(0).normal(scale=3, size=(4, 5, 6)).astype(np.float32)
    xt = torch.tensor(x.astype(np.float64))
    np.testing.assert_allclose(
        jxent.log_softmax(x, axis=axis),
        torch.log_softmax(xt, axis),
        rtol=1e-6,
        atol=1e-6,
    )
    np.testing.assert_allclose(
        jxent.softmax(x, axis=axis), torch.softmax(xt, axis), rtol=1e-6, atol=1e-7
    )


def test_float64_matches_torch_to_1e12():
    """With x64 enabled, jxent agrees with torch to float64 rounding."""
    with jax.enable_x64(True):
        logits, target, weight, probs = _inputs((6, C), -1, 7)
        target, _ = _ignore_setup(target, "padding", 7)
        logits = logits.astype(np.float64) * 1.37
        for tgt, kw in ((target, {}), (probs.astype(np.float64), {})):
            for eps in (0.0, 0.25):
                got, vjp = jax.vjp(
                    lambda x, t=tgt, e=eps, k=kw: jxent.cross_entropy(
                        x, t, weight.astype(np.float64), label_smoothing=e, **k
                    ),
                    jnp.asarray(logits),
                )
                assert got.dtype == jnp.float64
                want, grad = torch_cross_entropy(
                    logits, tgt, weight, label_smoothing=eps
                )
                np.testing.assert_allclose(got, want, rtol=1e-12)
                np.testing.assert_allclose(vjp(1.0)[0], grad, rtol=1e-11, atol=1e-14)
