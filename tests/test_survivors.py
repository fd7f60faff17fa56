"""Tests that kill the planted bugs an audit found surviving (issue 16, item 8).

Each test compares jxent with an independent oracle: torch in float64,
torchvision's formula written out in float64, or a float64 numpy reference.
The planted bug each one kills is named in its docstring; the multi-device
survivor (a class axis split over two mesh axes) is in
tests/multidevice/cases.py (``test_class_axis_split_over_two_mesh_axes``).
"""

from __future__ import annotations

import functools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torch.nn.functional as F
from oracles import torch_sigmoid_focal_loss

import jxent

RNG = np.random.default_rng(16_8)


def _f64(a):
    """An exact float64 copy (16-bit values upcast exactly)."""
    return np.asarray(jnp.asarray(a, jnp.float32), np.float64)


def _normwise(actual, expected) -> float:
    a, e = _f64(actual), np.asarray(expected, np.float64)
    return float(np.max(np.abs(a - e)) / np.max(np.abs(e)))


# --- soft_cap and label smoothing together (bfloat16 logits) --------------------


def _torch_capped_smoothed_ce(logits, target, eps, cap, reduction, cotangent=None):
    """torch's smoothed cross-entropy of ``cap·tanh(x/cap)``, float64.

    Returns (loss, gradient of <loss, cotangent> w.r.t. the uncapped logits).
    """
    x = torch.tensor(_f64(logits), requires_grad=True)
    capped = cap * torch.tanh(x / cap)
    loss = F.cross_entropy(
        capped, torch.tensor(np.asarray(target, np.int64)),
        label_smoothing=eps, reduction=reduction,
    )  # fmt: skip
    ct = torch.ones(()) if cotangent is None else torch.tensor(cotangent)
    (loss * ct.to(torch.float64)).sum().backward()
    return loss.detach().numpy(), x.grad.numpy()


@functools.partial(jax.jit, static_argnames=("reduction",))
def _ce_value_and_grad(logits, target, eps, cap, cotangent, *, reduction):
    def total(x):
        loss = jxent.cross_entropy(
            x, target, label_smoothing=eps, soft_cap=cap, reduction=reduction
        )
        return jnp.sum(loss.astype(jnp.float32) * cotangent), loss

    (_, loss), grad = jax.value_and_grad(total, has_aux=True)(logits)
    return loss, grad


def test_soft_cap_with_label_smoothing_bfloat16_audit_example():
    """Planted bug: the smoothing sum of bfloat16 logits read the uncapped
    logits (-0.875 instead of 1.383 for this row)."""
    logits = jnp.asarray([[8.0, 7.0, 6.0, 5.0]], jnp.bfloat16)
    want, want_grad = _torch_capped_smoothed_ce(logits, [0], 0.5, 2.0, "mean")
    np.testing.assert_allclose(want, 1.3818, atol=1e-4)
    loss, grad = _ce_value_and_grad(
        logits, jnp.asarray([0]), 0.5, 2.0, jnp.ones(()), reduction="mean"
    )
    assert loss.dtype == grad.dtype == jnp.bfloat16
    np.testing.assert_allclose(_f64(loss), want, rtol=1e-2)
    np.testing.assert_allclose(_f64(grad), want_grad, rtol=2e-2, atol=2e-3)


@pytest.mark.parametrize("reduction", ["none", "mean"])
@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float32])
def test_soft_cap_with_label_smoothing_against_torch(dtype, reduction):
    """The same bug on a batch (float32 takes the other smoothing-sum path)."""
    n, c = 12, 40
    logits = jnp.asarray(RNG.normal(size=(n, c)) * 4 + 3, dtype)
    target = RNG.integers(0, c, size=n)
    ct = np.linspace(0.5, 2.0, n) if reduction == "none" else np.ones(())
    want, want_grad = _torch_capped_smoothed_ce(logits, target, 0.3, 2.5, reduction, ct)
    loss, grad = _ce_value_and_grad(
        logits, jnp.asarray(target), 0.3, 2.5, jnp.asarray(ct, jnp.float32),
        reduction=reduction,
    )  # fmt: skip
    tol = 1e-2 if dtype == jnp.bfloat16 else 2e-6
    np.testing.assert_allclose(_f64(loss), want, rtol=tol, atol=tol)
    assert _normwise(grad, want_grad) < 2 * tol


def test_linear_cross_entropy_soft_cap_with_label_smoothing_bfloat16():
    """linear_cross_entropy, bfloat16 x and w, soft_cap + label smoothing:
    values and gradients against torch float64 on the exact upcast inputs."""
    n, d, v = 24, 16, 48
    x = jnp.asarray(RNG.normal(size=(n, d)), jnp.bfloat16)
    w = jnp.asarray(RNG.normal(size=(d, v)) * 0.8, jnp.bfloat16)
    # Logits around +3: capping changes them much (as in the audit's example).
    bias = jnp.full((v,), 3.0, jnp.bfloat16)
    target = RNG.integers(0, v, size=n)
    eps, cap = 0.4, 3.0

    def ours(x, w):
        return jxent.linear_cross_entropy(
            x, w, jnp.asarray(target), bias=bias, label_smoothing=eps,
            soft_cap=cap, chunk_size=5,
        )  # fmt: skip

    loss, (gx, gw) = jax.jit(jax.value_and_grad(ours, argnums=(0, 1)))(x, w)
    xt = torch.tensor(_f64(x), requires_grad=True)
    wt = torch.tensor(_f64(w), requires_grad=True)
    z = xt @ wt + 3.0
    want = F.cross_entropy(
        cap * torch.tanh(z / cap), torch.tensor(target), label_smoothing=eps
    )
    want.backward()
    # The audit example's gap (-0.875 vs 1.383) is far outside 1e-2.
    np.testing.assert_allclose(_f64(loss), want.item(), rtol=1e-2)
    assert gx.dtype == gw.dtype == jnp.bfloat16
    assert _normwise(gx, xt.grad.numpy()) < 2e-2
    assert _normwise(gw, wt.grad.numpy()) < 2e-2


# --- sigmoid_focal_loss with alpha = 0 and alpha = 1 ----------------------------


@functools.partial(jax.jit, static_argnames=("reduction",))
def _focal_value_and_grads(x, t, alpha, ct, *, reduction):
    def total(x, t):
        loss = jxent.sigmoid_focal_loss(x, t, alpha=alpha, reduction=reduction)
        return jnp.sum(loss * ct), loss

    (_, loss), grads = jax.value_and_grad(total, argnums=(0, 1), has_aux=True)(x, t)
    return loss, grads


@pytest.mark.parametrize("reduction", ["none", "sum"])
@pytest.mark.parametrize("alpha", [0.0, 1.0])
def test_sigmoid_focal_loss_alpha_zero_and_one(alpha, reduction):
    """Planted bug: αₜ applied only for α > 0 (torchvision: for every α >= 0,
    so α = 0 gives positives weight 0)."""
    x = np.float32(RNG.normal(size=(5, 6)) * 3)
    t = np.float32(RNG.uniform(size=(5, 6)))
    t[0], t[1] = 1.0, 0.0  # hard labels too
    ct = np.float32(RNG.uniform(0.5, 2.0, size=x.shape) if reduction == "none" else 1)
    want, want_gx, want_gt = torch_sigmoid_focal_loss(
        x, t, alpha=alpha, gamma=2.0, reduction=reduction, cotangent=ct
    )
    if alpha == 0.0 and reduction == "none":
        assert np.all(want[0] == 0)  # positives weigh 0
    # alpha traced (one compilation for both values) and concrete.
    loss, (gx, gt) = _focal_value_and_grads(
        x, t, jnp.float32(alpha), ct, reduction=reduction
    )
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(gx, want_gx, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gt, want_gt, rtol=1e-5, atol=1e-6)
    loss = jxent.sigmoid_focal_loss(x, t, alpha=alpha, reduction=reduction)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-7)


# --- KLDivLoss(log_target=True) -------------------------------------------------


@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum", "mean"])
def test_kl_div_loss_module_log_target(reduction):
    """Planted bug: the module ignores ``log_target`` (NaN for the audit's
    ``log [[.25, .75]]`` vs ``log [[.5, .5]]``)."""
    q = np.asarray([[0.25, 0.75], [0.6, 0.4], [0.1, 0.9]])
    p = np.asarray([[0.5, 0.5], [0.3, 0.7], [0.8, 0.2]])
    log_q, log_p = np.log(q), np.log(p)
    torch_module = torch.nn.KLDivLoss(reduction=reduction, log_target=True)
    module = jxent.KLDivLoss(reduction=reduction, log_target=True)
    for rows in (slice(0, 1), slice(None)):
        with warnings.catch_warnings():  # torch's note on "mean"
            warnings.simplefilter("ignore", UserWarning)
            want = torch_module(torch.tensor(log_q[rows]), torch.tensor(log_p[rows]))
        got = module(np.float32(log_q[rows]), np.float32(log_p[rows]))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)
        got = jax.jit(module)(np.float32(log_q[rows]), np.float32(log_p[rows]))
        np.testing.assert_allclose(got, want.numpy(), rtol=1e-6, atol=1e-7)


# --- kl_div at a -inf input where the target is 0 ----------------------------------


def test_kl_div_minus_inf_input_at_a_zero_target_contributes_nothing():
    """README's row: torch and optax give NaN (``0·-inf``); jxent gives 0
    there (no mass on either side), d/d input 0 and d/d target NaN (``log t
    - input`` is ``-inf + inf``). The other entries: torch float64."""
    log_q = np.array([[-np.inf, np.log(0.9), np.log(0.1)]])
    p = np.array([[0.0, 0.7, 0.3]])
    qt = torch.tensor(log_q, requires_grad=True)
    pt = torch.tensor(p, requires_grad=True)
    torch_loss = F.kl_div(qt, pt, reduction="none")
    assert np.isnan(torch_loss.detach().numpy()[0, 0])
    assert np.isnan(optax.kl_divergence(jnp.asarray(log_q), jnp.asarray(p))).all()
    torch_loss[0, 1:].sum().backward()
    loss, (g_in, g_t) = jax.value_and_grad(
        lambda q, t: jnp.sum(jxent.kl_div(q, t, reduction="none")), argnums=(0, 1)
    )(jnp.asarray(log_q, jnp.float32), jnp.asarray(p, jnp.float32))
    np.testing.assert_allclose(
        loss, torch_loss.detach().numpy()[0, 1:].sum(), rtol=1e-6
    )
    assert g_in[0, 0] == 0 and np.isnan(g_t[0, 0])
    np.testing.assert_allclose(g_in[0, 1:], qt.grad.numpy()[0, 1:], rtol=1e-6)
    np.testing.assert_allclose(g_t[0, 1:], pt.grad.numpy()[0, 1:], rtol=1e-6)


# --- kl_div(log_target=True) at a -inf target -------------------------------------


def test_kl_div_log_target_minus_inf_target_has_zero_gradient():
    """Planted bug: the -inf target is not replaced before ``exp(t)·(t -
    log q)``, so the loss is masked to 0 but its gradients are NaN.

    torch (2.13) gives NaN at a ``-inf`` log-target: the loss ``exp(t)·(t -
    log q)`` is ``0·(-inf)`` there, and so is its gradient w.r.t. the target
    (its gradient w.r.t. ``input``, ``-exp(t)``, is 0). jxent gives the limit
    as ``t → -inf`` (probability 0 contributes nothing): loss 0, both
    gradients 0, which is torch's value for ``log_target=False`` with
    ``p = 0``. The oracle: torch float64 on the finite entries, the limits
    (0) at the ``-inf`` ones.
    """
    log_q = np.log(np.asarray([[0.25, 0.75], [0.5, 0.5], [0.1, 0.9]]))
    with np.errstate(divide="ignore"):
        log_p = np.log(np.asarray([[0.0, 1.0], [0.5, 0.5], [0.3, 0.7]]))
    impossible = np.isneginf(log_p)
    # torch documents its behaviour on the same inputs (NaN at p = 0).
    qt = torch.tensor(log_q, requires_grad=True)
    pt = torch.tensor(log_p, requires_grad=True)
    torch_loss = F.kl_div(qt, pt, reduction="none", log_target=True)
    torch_loss.sum().backward()
    assert np.isnan(torch_loss.detach().numpy()[impossible]).all()
    assert np.isnan(pt.grad.numpy()[impossible]).all()
    assert (qt.grad.numpy()[impossible] == 0).all()
    # Float64 reference: the pointwise loss, d/d input = -exp(t) and
    # d/d target = exp(t)·(t - log q + 1), with their limits 0 at t = -inf.
    p = np.exp(log_p)  # exactly 0 at -inf
    safe_log_p = np.where(impossible, 0.0, log_p)
    want = np.where(impossible, 0.0, p * (safe_log_p - log_q))
    want_g_in = -p
    want_g_t = np.where(impossible, 0.0, p * (safe_log_p - log_q + 1))
    np.testing.assert_allclose(want[~impossible], torch_loss.detach()[~impossible])
    np.testing.assert_allclose(want_g_t[~impossible], pt.grad[~impossible])
    np.testing.assert_allclose(want_g_in, qt.grad.numpy())

    f32 = np.float32
    for reduction, scale in (("sum", 1.0), ("batchmean", 1 / 3), ("mean", 1 / 6)):
        fn = functools.partial(jxent.kl_div, reduction=reduction, log_target=True)
        value, (g_in, g_t) = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))(
            f32(log_q), f32(log_p)
        )
        np.testing.assert_allclose(value, want.sum() * scale, rtol=1e-6)
        np.testing.assert_allclose(g_in, want_g_in * scale, rtol=1e-6, atol=1e-7)
        np.testing.assert_allclose(g_t, want_g_t * scale, rtol=1e-6, atol=1e-7)
        assert (g_t[impossible] == 0).all()
    pointwise = jxent.kl_div(f32(log_q), f32(log_p), reduction="none", log_target=True)
    np.testing.assert_allclose(pointwise, want, rtol=1e-6, atol=1e-7)
    # Forward mode: a target tangent at the -inf entry moves nothing.
    fn = functools.partial(jxent.kl_div, reduction="none", log_target=True)
    ones = np.ones_like(log_p, np.float32)
    _, tangent = jax.jvp(lambda t: fn(f32(log_q), t), (f32(log_p),), (ones,))
    np.testing.assert_allclose(tangent, want_g_t, rtol=1e-6, atol=1e-7)


# --- linear_cross_entropy: dw of 16-bit inputs accumulated in float32 ------------


def _float64_dw(x, w, target):
    """The float64 gradient w.r.t. ``w`` of the mean cross-entropy of ``x @ w``
    (the 16-bit inputs upcast exactly)."""
    x64, w64 = _f64(x), _f64(w)
    z = x64 @ w64
    p = np.exp(z - z.max(axis=1, keepdims=True))
    p /= p.sum(axis=1, keepdims=True)
    p[np.arange(len(target)), target] -= 1.0
    return x64.T @ p / len(target)


@pytest.mark.parametrize("passes", [1, 2])
def test_linear_cross_entropy_bfloat16_dw_accumulates_in_float32(passes, monkeypatch):
    """Planted bug: a bfloat16 ``dw`` accumulator (the bfloat16 tolerance
    elsewhere, 2e-2, lets it pass).

    1024 tokens in 64 chunks: every chunk adds to each entry of ``dw``; the
    data make the sums coherent (positive ``x``, targets among four classes),
    so that every entry is far from 0 and a 16-bit accumulator rounds at the
    running sum's scale 64 times. A float32 accumulator rounds once, to the
    bfloat16 result: within half an ulp of the float64 gradient (measured
    0.51 ulp; the bfloat16 ``dz`` adds a little), while a bfloat16
    accumulator is off by 5.1 ulp (in one pass or two). Two passes (forced;
    the 16-bit heads whose float32 ``dw`` takes 512 MiB or more take them)
    accumulate each column half in float32 alike, here in blocks of 8
    classes.
    """
    if passes == 2:
        monkeypatch.setattr(jxent._linear, "_DW_SPLIT_BYTES", 0)
    assert jxent._linear._dw_passes(16, 32, jnp.bfloat16) == passes
    rng = np.random.default_rng(1024)
    n, d, v = 1024, 16, 32
    x = jnp.asarray(np.abs(rng.normal(size=(n, d))), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.bfloat16)
    target = rng.integers(0, 4, size=n)
    vocab_chunk = None if passes == 1 else 8
    dw = jax.jit(
        jax.grad(
            lambda w: jxent.linear_cross_entropy(
                x, w, jnp.asarray(target), chunk_size=16, vocab_chunk_size=vocab_chunk
            )
        )
    )(w)
    assert dw.dtype == jnp.bfloat16
    want = _float64_dw(x, w, target)
    ulp = 2.0 ** (np.floor(np.log2(np.abs(want))) - 7)  # bfloat16's at |want|
    error_in_ulps = np.abs(_f64(dw) - want) / ulp
    assert error_in_ulps.max() <= 1.0, error_in_ulps.max()
