"""log_probs and distillation_loss against float64 references and torch."""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only, x64
from jax.test_util import check_grads
from oracles import torch

import jxent

RNG = np.random.default_rng(18)
C = 7
# Finite stand-in for -inf in the float64 references: exp(-1e30 - m) is 0.
SENTINEL = -1e30


# --- float64 references of the formulas (JAX, plain, no tricks) ---------------


def ref_parts(logits, temperature, mask, axis):
    """(log p, p) in float64, excluded classes (mask False) with p = 0."""
    z = jnp.where(mask, logits / temperature, SENTINEL)
    lp = jax.nn.log_softmax(z, axis=axis)
    return lp, jnp.exp(lp)


def ref_log_probs(logits, target, temperature, mask, axis, ignore_index=-100):
    lp, p = ref_parts(logits, temperature, mask, axis)
    valid = target != ignore_index
    t = jnp.expand_dims(jnp.where(valid, target, 0), axis)
    picked = jnp.squeeze(jnp.take_along_axis(lp, t, axis=axis), axis)
    ent = -jnp.sum(jnp.where(mask, p * lp, 0.0), axis=axis)
    return jnp.where(valid, picked, 0.0), jnp.where(valid, ent, 0.0)


def ref_divergence(student, teacher, temperature, beta, axis, mask):
    lp, p = ref_parts(student, temperature, mask, axis)
    lq, q = ref_parts(teacher, temperature, mask, axis)

    def kl(a, la, lb):
        return jnp.sum(jnp.where(mask, a * (la - lb), 0.0), axis=axis)

    if not isinstance(beta, jax.Array):  # (a traced beta: 0 < beta < 1)
        if beta == 0:
            return kl(q, lq, lp)
        if beta == 1:
            return kl(p, lp, lq)
    # log(beta q + (1-beta) p), in the log domain (no 0 · log 0 from underflow)
    log_m = jnp.logaddexp(jnp.log(beta) + lq, jnp.log1p(-beta) + lp)
    log_m = jnp.where(mask, log_m, 0.0)
    return beta * kl(q, lq, log_m) + (1 - beta) * kl(p, lp, log_m)


def ref_distillation(student, teacher, target, temperature, beta, axis,
                     reduction, mask=True, ignore_index=-100):  # fmt: skip
    loss = ref_divergence(student, teacher, temperature, beta, axis, mask)
    valid = jnp.ones(loss.shape, bool) if target is None else target != ignore_index
    loss = jnp.where(valid, loss, 0.0)
    if reduction == "none":
        return loss
    if reduction == "sum":
        return jnp.sum(loss)
    count = jnp.sum(valid)
    return jnp.where(count > 0, jnp.sum(loss) / jnp.maximum(count, 1), 0.0)


def _case(shape, axis, seed=0):
    """Logits, teacher logits, targets (two ignored) and a class mask."""
    rng = np.random.default_rng(seed)
    logits = rng.normal(size=shape) * 2.0
    teacher = rng.normal(size=shape) * 2.0
    axis %= len(shape)
    batch = shape[:axis] + shape[axis + 1 :]
    target = rng.integers(0, C, size=batch)
    flat = target.reshape(-1)
    if flat.size > 1:
        flat[[1, -1]] = -100
    mask1d = np.ones(C, bool)
    mask1d[[2, 5]] = False
    flat[np.isin(flat, [2, 5])] = 0
    return logits, teacher, flat.reshape(batch), mask1d


LAYOUTS = [((6, C), -1), ((2, C, 3), 1), ((3, 2, C), -1), ((C,), 0)]


# --- log_probs -----------------------------------------------------------------


def _log_probs_vjp(fn, logits, target, temperature, mask, axis, cts):
    """Values and the vjp (w.r.t. logits and T) with and without the mask."""
    out = []
    for m in (None, mask):
        values, vjp = jax.vjp(
            lambda x, t, m=m: fn(x, target, t, m, axis), logits, temperature
        )
        out.append((values, vjp(cts)))
    return out


def _jxent_log_probs(x, target, t, mask, axis):
    return jxent.log_probs(x, target, temperature=t, axis=axis, where=mask,
                           return_entropy=True)  # fmt: skip


def _ref_log_probs(x, target, t, mask, axis):
    mask = jnp.ones(x.shape, bool) if mask is None else mask
    return ref_log_probs(x, target, t, mask, axis)


@pytest.mark.parametrize(("shape", "axis"), LAYOUTS)
def test_log_probs_matches_float64_reference(shape, axis):
    """float64, float32 and bfloat16 (against the reference on its rounded
    values), with and without a class mask: one program per dtype."""
    logits, _, target, mask1d = _case(shape, axis)
    norm = axis % len(shape)
    mask = mask1d.reshape([C if a == norm else 1 for a in range(len(shape))])
    mask = np.broadcast_to(mask, shape)
    cts = tuple(np.random.default_rng(1).normal(size=(2, *target.shape)))
    run = jax.jit(_log_probs_vjp, static_argnums=(0, 5))
    for dtype in ("float64", "float32", "bfloat16"):
        rounded = np.asarray(logits.astype(dtype).astype(np.float64))
        with x64():
            ref = run(_ref_log_probs, rounded, target, 0.8, mask, axis, cts)
            ref = jax.device_get(ref)
            if dtype == "float64":
                out = run(_jxent_log_probs, logits, target, 0.8, mask, axis, cts)
                tol = dict(rtol=1e-12, atol=1e-12)
        if dtype != "float64":
            args = (jnp.asarray(logits, dtype), target, np.float32(0.8), mask, axis,
                    tuple(c.astype(np.float32) for c in cts))  # fmt: skip
            out = run(_jxent_log_probs, *args)
            # bfloat16: values to float32 rounding; the logits' gradient is
            # rounded to bfloat16.
            tol = dict(rtol=2e-5, atol=2e-5)
        for (values, grads), (ref_values, ref_grads) in zip(out, ref, strict=True):
            for a, r in zip(values, ref_values, strict=True):
                assert a.dtype == (jnp.float64 if dtype == "float64" else jnp.float32)
                np.testing.assert_allclose(a, r, **tol)
            gtol = dict(rtol=1e-2, atol=1e-2) if dtype == "bfloat16" else tol
            np.testing.assert_allclose(np.float64(grads[0]), ref_grads[0], **gtol)
            np.testing.assert_allclose(grads[1], ref_grads[1], **tol)


def test_log_probs_ignored_positions_are_zero_with_zero_gradients():
    logits = RNG.normal(size=(4, C)).astype(np.float32)
    logits[1] = np.nan  # garbage at an ignored (padding) position
    logits[3, 2] = np.inf
    target = np.array([0, -100, 3, -1])

    def f(x, t):
        lp, ent = jxent.log_probs(x, target, temperature=t, ignore_index=-1,
                                  return_entropy=True)  # fmt: skip
        return jnp.sum(lp * jnp.arange(1.0, 5.0)) + jnp.sum(ent), (lp, ent)

    target = np.where(target == -100, -1, target)
    grads, (lp, ent) = jax.jit(jax.grad(f, argnums=(0, 1), has_aux=True))(logits, 1.3)
    assert lp[1] == 0 and ent[1] == 0 and lp[3] == 0 and ent[3] == 0
    assert np.all(grads[0][1] == 0) and np.all(grads[0][3] == 0)
    assert np.all(np.isfinite(grads[0])) and np.isfinite(grads[1])


def test_log_probs_extreme_and_impossible_logits():
    """Logits of ±1e4 in float32 and -inf classes: exact, finite gradients."""
    x = np.array([[1e4, -1e4, 1e4 - 1.0, 0.0], [3.0, -np.inf, 1.0, -np.inf],
                  [-1e4, -1e4 + 2.0, -np.inf, -1e4 + 0.5]])  # fmt: skip
    target = np.array([2, 0, 3])
    grads, (lp, ent) = jax.jit(
        jax.grad(
            lambda x: (lambda o: (jnp.sum(o[0]) + jnp.sum(o[1]), o))(
                jxent.log_probs(x, target, return_entropy=True)
            ),
            has_aux=True,
        )
    )(x.astype(np.float32))
    with x64():
        finite = np.isfinite(x)
        ref_lp, ref_ent = ref_log_probs(jnp.asarray(np.where(finite, x, 0.0)),
                                        target, 1.0, finite, -1)  # fmt: skip
        ref_grad = jax.grad(
            lambda y: sum(map(jnp.sum, ref_log_probs(y, target, 1.0, finite, -1)))
        )(jnp.asarray(np.where(finite, x, 0.0)))
    np.testing.assert_allclose(lp, ref_lp, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(ent, ref_ent, rtol=1e-6, atol=1e-6)
    assert np.all(np.isfinite(grads))
    np.testing.assert_allclose(grads, ref_grad, rtol=1e-6, atol=1e-6)
    assert np.all(grads[~finite] == 0)
    # The log-probability of an impossible token is -inf, not NaN.
    lp = jxent.log_probs(x.astype(np.float32), np.array([0, 1, 0]))
    assert lp[1] == -np.inf and np.isfinite(lp[0]) and np.isfinite(lp[2])
    # A constant: zero derivatives, in both modes.
    x32 = jnp.asarray(x, jnp.float32)

    def impossible(y):
        return jxent.log_probs(y, np.array([0, 1, 0]), temperature=0.5)[1]

    assert np.all(jax.jit(jax.grad(impossible))(x32) == 0)
    tangent = jnp.where(jnp.isfinite(x32), 1.0, 0.0)
    assert jax.jit(lambda y: jax.jvp(impossible, (y,), (tangent,))[1])(x32) == 0


@pytest.mark.parametrize("temperature", [1e-3, 1e-6, 1e-10, 1e-30])
def test_tiny_temperatures_log_probs_of_the_likeliest_token(temperature):
    """Near-greedy sampling: z = logits / T of 1e3..1e31 (in float32 range).

    The log-probability of the largest logit is 0 and its entropy 0. With the
    shift taken after dividing, XLA rounded the fused max's z and the
    difference's z apart: one ulp of z was the answer (-inf, -548.7 at T =
    1e-10), and the fused head's gradients were off by 15% at T = 1e-6.
    Against float64 on the float32 inputs; other targets' log-probabilities
    too (large negative numbers, relative precision).
    """
    rng = np.random.default_rng(7)
    x = rng.normal(size=(6, 4)).astype(np.float32)
    w = rng.normal(size=(4, 11)).astype(np.float32)
    target = np.argmax(x @ w, -1)
    target[0] = (target[0] + 1) % 11  # a less likely token: log p ~ -gap / T

    def heads(x, w, fused):
        if fused:
            lp, ent = jxent.linear_log_probs(
                x, w, target, temperature=temperature, return_entropy=True
            )
        else:
            lp, ent = jxent.log_probs(
                x @ w, target, temperature=temperature, return_entropy=True
            )
        return lp, ent

    def summed(x, w, fused, k):
        return jnp.sum(heads(x, w, fused)[k])

    with x64():
        x64_, w64_ = jnp.asarray(x, jnp.float64), jnp.asarray(w, jnp.float64)

        every = np.ones((6, 11), bool)

        def ref(x, w, k):
            lp, ent = ref_log_probs(x @ w, target, temperature, every, -1)
            return jnp.sum((lp, ent)[k])

        ref_lp, ref_ent = ref_log_probs(x64_ @ w64_, target, temperature, every, -1)
        ref_grads = [jax.grad(ref, (0, 1))(x64_, w64_, k) for k in (0, 1)]
    for fused in (False, True):
        lp, ent = jax.jit(heads, static_argnums=2)(x, w, fused)
        assert np.all(lp[1:] == 0) and np.all(ent[1:] == 0), (fused, lp, ent)
        np.testing.assert_allclose(lp, ref_lp, rtol=1e-5)
        np.testing.assert_allclose(ent, ref_ent, atol=1e-6)
        for k in (0, 1):
            grads = jax.jit(jax.grad(summed, (0, 1)), static_argnums=(2, 3))(
                x, w, fused, k
            )
            for g, r in zip(grads, ref_grads[k], strict=True):
                # log p's gradient is (w_t - w_argmax) / T: float32 rounding of
                # it; the entropy's is 0 (~1e-100 in float64).
                scale = np.abs(ref_grads[0][0]).max() if k else np.abs(r).max()
                np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * scale)


def test_log_probs_check_grads_order_2_both_modes():
    logits, _, target, mask1d = _case((3, 2, C), -1, seed=3)
    with x64():

        def f(x, t):
            return jxent.log_probs(x, target, temperature=t, where=mask1d,
                                   return_entropy=True)  # fmt: skip

        check_grads(jax.jit(f), (logits, 0.9), order=2, modes=("fwd", "rev"),
                    atol=1e-5, rtol=1e-5)  # fmt: skip


# --- distillation_loss ------------------------------------------------------------


BETAS = [0.0, 0.3, 0.5, 1.0]


def _distill_vjp(student, teacher, target, temperature, beta, axis, ct):
    """Per-position values and the vjp (w.r.t. both logits and T) for one beta."""

    def f(s, t, temp):
        return jxent.distillation_loss(s, t, target, beta=beta, temperature=temp,
                                       axis=axis, reduction="none")  # fmt: skip

    value, vjp = jax.vjp(f, student, teacher, temperature)
    return value, vjp(ct)


@functools.partial(jax.jit, static_argnums=(4, 5))
def _ref_distill_vjp(student, teacher, target, temperature, betas, axis, ct):
    out = []
    for beta in betas:
        value, vjp = jax.vjp(
            lambda s, t, temp, beta=beta: ref_distillation(
                s, t, target, temp, beta, axis, "none"
            ),
            student, teacher, temperature,
        )  # fmt: skip
        out.append((value, vjp(ct)))
    return jax.tree.map(lambda *a: jnp.stack(a), *out)


@pytest.mark.parametrize(
    ("shape", "axis", "chips"), [(*LAYOUTS[0], False), (*LAYOUTS[1], False),
                                 (*LAYOUTS[0], True)],
)  # fmt: skip
def test_distillation_matches_float64_reference(shape, axis, chips, monkeypatch):
    """Every beta (traced, one vmapped program), in float64 and float32.
    ``chips``: ``on_cpu`` answers "not the CPU", so that the JSD's gradients
    take the chips' form ``p (g - Σ p g)``."""
    if chips:
        import jxent._rl as rl

        chosen = []

        def on_chip(cpu, other):
            chosen.append(1)
            return other()

        monkeypatch.setattr(rl, "on_cpu", on_chip)
        jax.clear_caches()  # no program traced with the CPU's branch
    try:
        _check_distillation_against_reference(shape, axis)
    finally:
        if chips:
            jax.clear_caches()
    if chips:
        assert chosen, "the chips' form was not taken"


def _check_distillation_against_reference(shape, axis):
    student, teacher, target, _ = _case(shape, axis, seed=7)
    ct = np.random.default_rng(2).normal(size=target.shape)
    run = jax.jit(
        jax.vmap(_distill_vjp, in_axes=(None, None, None, None, 0, None, None)),
        static_argnums=(5,),
    )
    with x64():
        args = (student, teacher, target, 1.7)
        ref_values, ref_grads = jax.device_get(
            _ref_distill_vjp(*args, tuple(BETAS), axis, ct)
        )
        values, grads = run(*args, np.array(BETAS), axis, ct)
        assert values.dtype == jnp.float64
    np.testing.assert_allclose(values, ref_values, rtol=1e-12, atol=1e-13)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)
    f32 = (np.float32(student), np.float32(teacher), target, np.float32(1.7),
           np.float32(BETAS), axis, np.float32(ct))  # fmt: skip
    values, grads = run(*f32)
    assert values.dtype == jnp.float32
    np.testing.assert_allclose(values, ref_values, rtol=1e-5, atol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("beta", BETAS)
def test_distillation_static_beta_equals_traced(beta):
    student, teacher, target, _ = _case((5, C), -1, seed=4)
    static = jxent.distillation_loss(student, teacher, target, beta=beta,
                                     reduction="none")  # fmt: skip
    traced = jax.jit(lambda b: jxent.distillation_loss(
        student, teacher, target, beta=b, reduction="none"))(beta)  # fmt: skip
    np.testing.assert_allclose(static, traced, rtol=1e-6, atol=1e-7)


@pytest.mark.skipif(torch is None, reason="torch not installed")
@pytest.mark.parametrize("beta", [0.0, 1.0])
def test_distillation_matches_torch_kl_div(beta):
    """beta 0 and 1 at T = 1: torch.nn.functional.kl_div on log-softmaxes."""
    F = torch.nn.functional
    student, teacher, _, _ = _case((6, C), -1, seed=5)
    s = torch.tensor(student, requires_grad=True)
    t = torch.tensor(teacher, requires_grad=True)
    ls, lt = F.log_softmax(s, -1), F.log_softmax(t, -1)
    # kl_div(input, target) = Σ target · (log target - input): KL(target ‖ .)
    inp, tgt = (ls, lt) if beta == 0.0 else (lt, ls)
    loss = F.kl_div(inp, tgt, reduction="sum", log_target=True) / s.shape[0]
    loss.backward()
    expected = (loss.item(), s.grad.numpy(), t.grad.numpy())
    for dtype in ("float32", "float64"):
        with x64():
            args = (a.astype(dtype) for a in (student, teacher))
            out, grads = jax.value_and_grad(
                lambda a, b: jxent.distillation_loss(a, b, beta=beta), (0, 1)
            )(*args)
        tol = 1e-12 if dtype == "float64" else 2e-6
        np.testing.assert_allclose(out, expected[0], rtol=tol)
        np.testing.assert_allclose(grads[0], expected[1], rtol=tol * 10, atol=tol)
        np.testing.assert_allclose(grads[1], expected[2], rtol=tol * 10, atol=tol)


def test_distillation_check_grads_order_2_both_modes():
    """The forward KL, the reverse KL (static beta) and the JSD (traced beta,
    differentiated too) in one function."""
    student, teacher, target, _ = _case((2, C, 3), 1, seed=6)
    with x64():

        def f(s, t, temp, b):
            def loss(beta, reduction):
                return jxent.distillation_loss(s, t, target, beta=beta,
                                               temperature=temp, axis=1,
                                               reduction=reduction)  # fmt: skip

            per_token = loss(0.0, "none") + 2.0 * loss(1.0, "none")
            return jnp.sum(per_token * jnp.arange(1.0, 7.0).reshape(2, 3)) + loss(
                b, "mean"
            )

        check_grads(jax.jit(f), (student, teacher, 1.3, 0.35), order=2,
                    modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)  # fmt: skip


def test_distillation_masked_classes_and_extreme_logits():
    """-inf classes shared by both give 0 terms; ±1e4 logits stay exact."""
    s = np.array([[1e4, -1e4, 1e4 - 2.0, -np.inf], [0.5, -np.inf, 2.0, 1.0]])
    t = np.array([[1e4 - 1.0, 0.0, 1e4, -np.inf], [1.0, -np.inf, 0.0, 3.0]])
    finite = np.isfinite(s)
    for beta in (0.0, 0.5, 1.0):
        f = jax.jit(jax.value_and_grad(
            lambda a, b, beta=beta: jxent.distillation_loss(a, b, beta=beta),
            (0, 1)))  # fmt: skip
        out, grads = f(s.astype(np.float32), t.astype(np.float32))
        with x64():
            ref, ref_grads = jax.value_and_grad(
                lambda a, b, beta=beta: ref_distillation(
                    a, b, None, 1.0, beta, -1, "mean", mask=finite
                ),
                (0, 1),
            )(
                jnp.asarray(np.where(finite, s, 0.0)),
                jnp.asarray(np.where(finite, t, 0.0)),
            )
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-6)
        for g, r in zip(grads, ref_grads, strict=True):
            assert np.all(np.isfinite(g)) and np.all(g[~finite] == 0)
            np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def test_distillation_support_mismatch_is_inf():
    s = np.array([[0.0, 1.0, -np.inf]], np.float32)
    t = np.array([[0.0, 1.0, 2.0]], np.float32)
    assert jxent.distillation_loss(s, t, beta=0.0) == np.inf  # q has mass p lacks
    assert np.isfinite(jxent.distillation_loss(s, t, beta=1.0))
    assert jxent.distillation_loss(t, s, beta=1.0) == np.inf
    assert np.isfinite(jxent.distillation_loss(s, t, beta=0.5))


def test_distillation_mean_over_included_positions():
    student, teacher, _, _ = _case((4, C), -1, seed=8)
    target = np.array([1, -100, 2, -100])
    none = jxent.distillation_loss(student, teacher, target, reduction="none")
    assert none[1] == 0 and none[3] == 0
    mean = jxent.distillation_loss(student, teacher, target)
    np.testing.assert_allclose(mean, (none[0] + none[2]) / 2, rtol=1e-6)
    total = jxent.distillation_loss(student, teacher, target, reduction="sum")
    np.testing.assert_allclose(total, none[0] + none[2], rtol=1e-6)
    # Without a target every position counts.
    every = np.asarray(jxent.distillation_loss(student, teacher, reduction="none"))
    np.testing.assert_allclose(every[[0, 2]], np.asarray(none)[[0, 2]], rtol=1e-6)
    np.testing.assert_allclose(
        jxent.distillation_loss(student, teacher), every.mean(), rtol=1e-6
    )
    everything_ignored = np.full(4, -100)
    f = jax.value_and_grad(
        lambda s: jxent.distillation_loss(s, teacher, everything_ignored)
    )
    value, grad = f(student.astype(np.float32))
    assert value == 0 and np.all(grad == 0)


def test_identical_distributions_give_zero():
    x = RNG.normal(size=(3, C)).astype(np.float32)
    for beta in BETAS:
        np.testing.assert_allclose(
            jxent.distillation_loss(x, x + 5.0, beta=beta), 0.0, atol=1e-6
        )


# --- bad input ------------------------------------------------------------------


def test_bad_input_raises_when_concrete():
    x = np.zeros((2, C), np.float32)
    t = np.array([0, 1])
    with pytest.raises(TypeError, match="`logits`"):
        jxent.log_probs(np.zeros((2, C), np.int32), t)
    with pytest.raises(TypeError, match="`teacher_logits`"):
        jxent.distillation_loss(x, np.zeros((2, C), np.int32))
    with pytest.raises(ValueError, match="class index 7"):
        jxent.log_probs(x, np.array([0, 7]))
    with pytest.raises(ValueError, match="class index -3"):
        jxent.distillation_loss(x, x, np.array([0, -3]))
    for temperature in (0.0, -1.0):
        with pytest.raises(ValueError, match="`temperature` must be > 0"):
            jxent.log_probs(x, t, temperature=temperature)
        with pytest.raises(ValueError, match="`temperature` must be > 0"):
            jxent.distillation_loss(x, x, temperature=temperature)
    for beta in (-0.1, 1.5):
        with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]"):
            jxent.distillation_loss(x, x, beta=beta)
    message = re.escape("`logits`.shape=(2, 7), `teacher_logits`.shape=(3, 7)")
    with pytest.raises(ValueError, match=message):
        jxent.distillation_loss(x, np.zeros((3, C), np.float32))
    with pytest.raises(ValueError, match="`target` of integer class indices"):
        jxent.log_probs(x, np.array([0, 1, 2]))


def _nan_everywhere(tree):
    return all(np.all(np.isnan(leaf)) for leaf in jax.tree.leaves(tree))


def test_bad_values_under_jit_give_nan_values_and_gradients():
    x = RNG.normal(size=(3, C)).astype(np.float32)
    good_t = np.array([0, 1, 2])

    def lp_fn(x, t, temperature):
        lp, ent = jxent.log_probs(x, t, temperature=temperature,
                                  return_entropy=True)  # fmt: skip
        return jnp.sum(lp + ent)

    grad = jax.jit(jax.value_and_grad(lp_fn, argnums=(0, 2)))
    value, (gx, gt) = grad(x, np.array([0, 9, 2]), 1.0)  # target out of range
    assert np.isnan(value) and np.all(np.isnan(gx[1])) and np.isnan(gt)
    assert np.all(np.isfinite(np.asarray(gx)[[0, 2]]))
    for temperature in (0.0, -2.0):
        assert _nan_everywhere(grad(x, good_t, temperature))
    # Forward mode carries the NaN too.
    _, tangent = jax.jit(lambda t: jax.jvp(lambda s: lp_fn(x, good_t, s), (t,),
                                           (1.0,)))(0.0)  # fmt: skip
    assert np.isnan(tangent)

    def kd(s, teacher, target, temperature, beta):
        return jxent.distillation_loss(s, teacher, target, beta=beta,
                                       temperature=temperature)  # fmt: skip

    grad = jax.jit(jax.value_and_grad(kd, argnums=(0, 1, 3, 4)))
    for args in ((good_t, 1.0, 1.5), (good_t, 1.0, -0.5), (good_t, 0.0, 0.5),
                 (np.array([0, 1, 7]), 1.0, 0.0)):  # fmt: skip
        value, grads = grad(x, x[::-1], *args)
        assert np.isnan(value) and _nan_everywhere(grads)
    # Per position ("none", log-probabilities): a bad temperature or beta
    # makes every derivative NaN, the ignored position's and beta's too (they
    # were 0).
    padded = np.array([0, -100, 2])
    lp_grad = jax.jit(jax.grad(lp_fn, argnums=(0, 2)))
    assert _nan_everywhere(lp_grad(x, padded, 0.0))
    per_position = jax.jit(jax.grad(
        lambda s, t, temperature, beta: jnp.sum(jxent.distillation_loss(
            s, x[::-1], t, beta=beta, temperature=temperature, reduction="none")),
        argnums=(0, 2, 3)))  # fmt: skip
    for temperature, beta in ((0.0, 0.5), (1.0, -1.0), (-1.0, 0.0)):
        assert _nan_everywhere(per_position(x, padded, temperature, beta))
    # A target on a class excluded by `where` is NaN as well.
    mask = np.ones(C, bool)
    mask[3] = False
    lp = jax.jit(lambda t: jxent.log_probs(x, t, where=mask))(np.array([0, 3, 1]))
    assert np.isnan(lp[1]) and np.all(np.isfinite(np.asarray(lp)[[0, 2]]))


def test_nan_logits_poison_values_and_gradients():
    """A NaN logit (or a NaN column of w) makes its row's log-probability,
    entropy and divergence NaN, and their gradients; other rows stay finite.
    The row's sum of exponentials used to be replaced by 1 when NaN, which
    gave a finite log-probability (0.5 for the first row below)."""
    x = RNG.normal(size=(3, C)).astype(np.float32)
    x[0, 1] = np.nan
    t = np.array([0, 1, 2])

    def lp_fn(x):
        lp, ent = jxent.log_probs(x, t, return_entropy=True)
        return lp, ent

    lp, ent = jax.jit(lp_fn)(x)
    assert np.isnan(lp[0]) and np.isnan(ent[0])
    assert np.all(np.isfinite(np.asarray(lp)[1:])) and np.all(np.isfinite(ent[1:]))
    gx = jax.jit(jax.grad(lambda x: jnp.sum(sum(lp_fn(x)))))(x)
    assert np.all(np.isnan(gx[0])) and np.all(np.isfinite(gx[1:]))
    kd = jax.jit(
        lambda s: jxent.distillation_loss(s, jnp.zeros_like(s), reduction="none")
    )
    assert np.isnan(kd(x)[0]) and np.all(np.isfinite(np.asarray(kd(x))[1:]))
    d, v = 4, C
    h = RNG.normal(size=(3, d)).astype(np.float32)
    w = RNG.normal(size=(d, v)).astype(np.float32)
    w[2, 5] = np.nan  # every position's logit of class 5

    def fused(h, w):
        lp, ent = jxent.linear_log_probs(h, w, t, return_entropy=True)
        return jnp.sum(lp + ent), (lp, ent)

    (_, (lp, ent)), (gh, gw) = jax.jit(
        jax.value_and_grad(fused, argnums=(0, 1), has_aux=True)
    )(h, w)
    assert np.all(np.isnan(lp)) and np.all(np.isnan(ent))
    assert np.all(np.isnan(gh)) and np.isnan(np.asarray(gw)).any()


def test_vmap_and_16_bit_inputs():
    x = RNG.normal(size=(4, 3, C)).astype(np.float32)
    teacher = RNG.normal(size=(4, 3, C)).astype(np.float32)
    t = RNG.integers(0, C, size=(4, 3))
    per_row = jax.vmap(lambda a, b: jxent.log_probs(a, b))(x, t)
    np.testing.assert_allclose(per_row, jxent.log_probs(x, t), rtol=1e-6)
    kd = jax.vmap(lambda a, b: jxent.distillation_loss(a, b, reduction="sum"))
    np.testing.assert_allclose(
        kd(x, teacher),
        jxent.distillation_loss(x, teacher, reduction="none").sum(-1),
        rtol=1e-5,
    )
    for dtype in (jnp.float16, jnp.bfloat16):
        lp = jxent.log_probs(x.astype(dtype), t)
        d = jxent.distillation_loss(x.astype(dtype), teacher.astype(dtype))
        assert lp.dtype == jnp.float32 and d.dtype == jnp.float32


def test_gaps_past_the_float_range_are_nan_not_a_number():
    """README row: finite logits whose gap to the row's maximum overflows
    (±3e38 in float32) give a NaN entropy and divergence (0 · -inf), never a
    plausible number; the log-probability itself is right. Flooring the gap
    cost the materialised distillation's program a logits-sized copy."""
    big = np.array([[3e38, -3e38, 3e38]], np.float32)
    lp, ent = jxent.log_probs(big, np.array([0]), return_entropy=True)
    np.testing.assert_allclose(lp, [-np.log(2)], rtol=1e-6)
    assert np.isnan(ent[0])
    assert np.isnan(jxent.distillation_loss(big, big))


@pytest.mark.parametrize("beta", [0.0, 1.0, 0.5])
def test_per_position_bad_target_reaches_the_shared_scalars(beta):
    """``reduction="none"`` with a target out of range under jit: d/dbeta
    and d/dtemperature of the sum are NaN also at beta 0 and 1 (the selected
    KL does not depend on beta there: it was 0), fused or not."""
    x = RNG.normal(size=(4, 3)).astype(np.float32)
    w = RNG.normal(size=(3, C)).astype(np.float32)
    tx = RNG.normal(size=(4, 2)).astype(np.float32)
    tw = RNG.normal(size=(2, C)).astype(np.float32)
    target = np.array([C, 2, -100, 3])

    def fused(b, t):
        out = jxent.linear_distillation_loss(
            x, w, tx, tw, target, beta=b, temperature=t, reduction="none"
        )
        return jnp.sum(out)

    def logits(b, t):
        out = jxent.distillation_loss(
            x @ w, tx @ tw, target, beta=b, temperature=t, reduction="none"
        )
        return jnp.sum(out)

    for f in (fused, logits):
        value, grads = jax.jit(jax.value_and_grad(f, (0, 1)))(beta, 1.3)
        assert np.isnan(value) and _nan_everywhere(grads)


def test_no_classes_is_a_clear_error():
    for call in (
        lambda: jxent.log_probs(np.zeros((3, 0)), np.full(3, -100)),
        lambda: jxent.distillation_loss(np.zeros((3, 0)), np.zeros((3, 0))),
        lambda: jxent.cross_entropy(np.zeros((3, 0)), np.full(3, -100)),
        lambda: jxent.cross_entropy(np.zeros((2, 0, 4)), np.full((2, 4), -100), axis=1),
    ):
        with pytest.raises(ValueError, match="at least one class on axis"):
            call()
    with pytest.raises(ValueError, match="`log_probs` must have at least one class"):
        jxent.nll_loss(np.zeros((3, 0)), np.full(3, -100))
    with pytest.raises(ValueError, match="V >= 1"):
        jxent.linear_cross_entropy(np.ones((3, 4)), np.ones((4, 0)), np.full(3, -100))
    # An empty batch is not an error: 0.
    assert jxent.cross_entropy(np.zeros((0, 4)), np.zeros(0, np.int32)) == 0.0


def test_numpy_integer_chunk_sizes():
    """NumPy integers for chunk_size and vocab_chunk_size, as Python ints
    (they raised, or failed inside the block sizes)."""
    x, w = RNG.normal(size=(6, 4)), RNG.normal(size=(4, C))
    t = np.arange(6) % C
    want = jxent.linear_cross_entropy(x, w, t, chunk_size=2, vocab_chunk_size=3)
    got = jxent.linear_cross_entropy(
        x, w, t, chunk_size=np.int64(2), vocab_chunk_size=np.int32(3)
    )
    np.testing.assert_allclose(got, want, rtol=1e-6)
    lp = jxent.linear_log_probs(
        x, w, t, chunk_size=np.int64(4), vocab_chunk_size=np.int32(3)
    )
    np.testing.assert_allclose(lp, jxent.linear_log_probs(x, w, t), rtol=1e-6)
    with pytest.raises(ValueError, match="`chunk_size` must be a positive int"):
        jxent.linear_cross_entropy(x, w, t, chunk_size=np.int64(0))


def _sweep_cases(linear: bool):
    """(name, ours, reference, shared inputs, swept values) for the vmap test.

    ``ours(*shared, v)`` and ``reference(*shared, v)`` give a scalar (the
    outputs summed); ``v`` is one of the swept values (a target set, a
    temperature, beta, a class mask).
    """
    rng = np.random.default_rng(31)
    n, d, dt, v = 5, 3, 4, 6
    x = rng.normal(size=(n, d))
    w = rng.normal(size=(d, v))
    tx = rng.normal(size=(n, dt))
    tw = rng.normal(size=(dt, v))
    targets = rng.integers(0, v, size=(3, n))
    targets[0, 1] = targets[2, 4] = -100
    scalars = np.array([0.25, 0.5, 0.75])
    masks = np.ones((3, v), bool)
    masks[0, 5] = masks[1, 2] = False
    t0 = np.where(targets[0] < 0, 0, targets[0]) % 2  # never masked out
    all_in = np.ones(v, bool)

    def kd(z, tz, t, temperature, beta, reduction, ref):
        if ref:
            return ref_distillation(z, tz, t, temperature, beta, -1, reduction)
        return jxent.distillation_loss(
            z, tz, t, temperature=temperature, beta=beta, reduction=reduction
        )

    def lp(z, t, temperature, mask, ref):
        if ref:
            return ref_log_probs(z, t, temperature, mask, -1)
        return jxent.log_probs(
            z, t, temperature=temperature, where=mask, return_entropy=True
        )

    cases = []
    # Materialised logits, or the LM head's: z = x @ w (teacher tx @ tw).
    shared = (x, w, tx, tw) if linear else (x @ w, tx @ tw)
    for reduction, swept, values in (
        ("mean", "target", targets), ("none", "target", targets),
        ("sum", "beta", scalars), ("none", "temperature", scalars + 0.5),
    ):  # fmt: skip

        def run(*args, ref, reduction=reduction, swept=swept, linear=linear):
            *args, value = args
            t = value if swept == "target" else targets[0]
            temperature = value if swept == "temperature" else 1.0
            beta = value if swept == "beta" else 0.5
            if linear and not ref:
                x_, w_, tx_, tw_ = args
                return jxent.linear_distillation_loss(
                    x_, w_, tx_, tw_, t, temperature=temperature,
                    beta=beta, reduction=reduction,
                ).sum()  # fmt: skip
            z, tz = (args[0] @ args[1], args[2] @ args[3]) if linear else args
            return kd(z, tz, t, temperature, beta, reduction, ref).sum()

        name = f"{'linear_' * linear}distillation_loss {reduction} {swept}"
        cases.append((name, run, shared, values))
    for swept, values in (("target", targets), ("temperature", scalars + 0.5),
                          ("where", masks)):  # fmt: skip

        def run(*args, ref, swept=swept, linear=linear):
            *args, value = args
            t = value if swept == "target" else t0
            temperature = value if swept == "temperature" else 1.0
            mask = value if swept == "where" else all_in
            if linear and not ref:
                out = jxent.linear_log_probs(
                    args[0], args[1], t, temperature=temperature,
                    where=mask, return_entropy=True,
                )  # fmt: skip
            else:
                z = args[0] @ args[1] if linear else args[0]
                out = lp(z, t, temperature, mask, ref)
            return out[0].sum() + 0.5 * out[1].sum()

        name = f"{'linear_' * linear}log_probs {swept}"
        cases.append((name, run, shared[:2] if linear else shared[:1], values))
    return cases


@pytest.mark.parametrize(
    "linear", [pytest.param(False, id="materialised"), pytest.param(True, id="lm-head")]
)
def test_vmap_over_targets_and_options_with_shared_inputs(linear):
    """A vmap over the targets, ``beta``, ``temperature`` or ``where`` with
    the logits (or x and w) shared: a sweep of label sets or temperatures.
    ``jit(grad)`` and ``jvp`` raised for ``distillation_loss`` and the
    temperature/where sweeps of ``log_probs`` (the gradient-poisoning
    custom_jvp: its output unbatched, its tangent batched like the flag), and
    for the LM heads (their inputs' tangents poisoned before their custom_jvp
    rules: its primal inputs unbatched, its tangents batched); now equal to
    float64 references of the formulas, in both modes."""
    for name, run, shared, values in _sweep_cases(linear):

        def total(*args, ref, run=run, values=values):
            ours = functools.partial(run, ref=ref)
            return jnp.sum(jax.vmap(ours, (None,) * len(args) + (0,))(*args, values))

        f32 = tuple(jnp.asarray(a, jnp.float32) for a in shared)
        ours = functools.partial(total, ref=False)
        argnums = tuple(range(len(shared)))
        grads = jax.jit(jax.grad(ours, argnums))(*f32)
        tangent = jax.jit(lambda *a, ours=ours: jax.jvp(ours, a, a)[1])(*f32)
        with x64():
            ref = functools.partial(total, ref=True)
            want_grads = jax.grad(ref, argnums)(*shared)
            want_tangent = jax.jvp(ref, shared, shared)[1]
        for got, want in zip(grads, want_grads, strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)
        np.testing.assert_allclose(tangent, want_tangent, rtol=2e-5, err_msg=name)


@pytest.mark.parametrize(("beta", "most"), [(0.0, 3.1), (0.5, 4.1), (1.0, 3.1)])
def test_distillation_gradient_keeps_few_logits_sized_temporaries(beta, most):
    """``value_and_grad`` w.r.t. both logits on the CPU: hand-derived,
    rematerialised derivatives keep at most 3 (KL) or 4 (JSD) float32
    logits-sized temporaries; traced through the logarithms they kept 4 and 9.
    """
    n, c = 256, 4096
    z = jax.ShapeDtypeStruct((n, c), jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(s, teacher, target):
        return jxent.distillation_loss(s, teacher, target, beta=beta)

    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1))).lower(z, z, t)
    temp = program.compile().memory_analysis().temp_size_in_bytes
    assert temp <= most * n * c * 4, temp / (n * c * 4)


@pytest.mark.parametrize(("entropy", "most"), [(False, 0.05), (True, 1.1)])
def test_log_probs_gradient_keeps_few_logits_sized_temporaries(entropy, most):
    """``value_and_grad`` of ``log_probs`` on the CPU: none (with the entropy
    one) float32 logits-sized temporary; autodiffed, 1 and 2."""
    n, c = 256, 4096
    z = jax.ShapeDtypeStruct((n, c), jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)

    def loss(x, target):
        out = jxent.log_probs(x, target, temperature=0.9, return_entropy=entropy)
        return sum(map(jnp.sum, out)) if entropy else jnp.sum(out)

    program = jax.jit(jax.value_and_grad(loss)).lower(z, t)
    temp = program.compile().memory_analysis().temp_size_in_bytes
    assert temp <= most * n * c * 4, temp / (n * c * 4)


def test_gradient_of_a_vmap_over_a_later_axis_and_of_nested_vmaps():
    """``jit(grad)`` of a vmap over axis 1 of the logits (or of ``x``) and the
    targets, and of a vmap over ``beta`` around a vmap over the logits:
    against the float64 formulas slice by slice. (A first fix of the vmap
    over the targets, a custom_vmap returning the logits, moved their batch
    axis to the front and made these raise; ``cross_entropy``'s select by the
    flag put the flag's batch axis on the output and its tangent elsewhere.)"""
    rng = np.random.default_rng(41)
    z = rng.normal(size=(4, 3, C))
    tz = rng.normal(size=(4, 3, C))
    t = rng.integers(0, C, size=(4, 3))
    x = rng.normal(size=(4, 3, 5))
    w = rng.normal(size=(5, C))
    betas = np.array([0.3, 0.6])
    mask = np.ones(C, bool)

    def lp_sum(out):
        return jnp.sum(out[0]) + 0.5 * jnp.sum(out[1])

    def ours_lp(z):
        per = jax.vmap(lambda a, b: lp_sum(jxent.log_probs(a, b, temperature=0.7,
                                                           return_entropy=True)),
                       in_axes=1)(z, t)  # fmt: skip
        return jnp.sum(per)

    def ours_kd(z, tz):
        per = jax.vmap(lambda a, b, c: jxent.distillation_loss(a, b, c, beta=0.4),
                       in_axes=1)(z, tz, t)  # fmt: skip
        return jnp.sum(per)

    def ours_linear(x, w):
        per = jax.vmap(lambda a, b: lp_sum(jxent.linear_log_probs(a, w, b,
                                                                  return_entropy=True)),
                       in_axes=1)(x, t)  # fmt: skip
        return jnp.sum(per)

    def ours_nested(z, tz):
        def inner(beta):
            rows = jax.vmap(lambda a, b, c: jxent.distillation_loss(a, b, c, beta=beta),
                            in_axes=(0, 0, 0))(z, tz, t)  # fmt: skip
            return jnp.sum(rows)

        return jnp.sum(jax.vmap(inner)(betas))

    def ours_ce(z):
        per = jax.vmap(lambda a, b: jxent.cross_entropy(a, b, label_smoothing=0.1),
                       in_axes=1)(z, t)  # fmt: skip
        return jnp.sum(per)

    got = {
        "cross_entropy": jax.jit(jax.grad(ours_ce))(np.float32(z)),
        "log_probs": jax.jit(jax.grad(ours_lp))(np.float32(z)),
        "distillation_loss": jax.jit(jax.grad(ours_kd, (0, 1)))(np.float32(z),
                                                                np.float32(tz)),
        "linear_log_probs": jax.jit(jax.grad(ours_linear, (0, 1)))(np.float32(x),
                                                                   np.float32(w)),
        "nested": jax.jit(jax.grad(ours_nested, (0, 1)))(np.float32(z),
                                                         np.float32(tz)),
    }  # fmt: skip
    with x64():

        def ref_lp(z, temperature=0.7):
            return sum(lp_sum(ref_log_probs(z[:, j], t[:, j], temperature, mask, -1))
                       for j in range(3))  # fmt: skip

        def ref_kd(z, tz):
            return sum(ref_distillation(z[:, j], tz[:, j], t[:, j], 1.0, 0.4, -1,
                                        "mean") for j in range(3))  # fmt: skip

        def ref_nested(z, tz):
            return sum(ref_distillation(z[i], tz[i], t[i], 1.0, b, -1, "mean")
                       for b in betas for i in range(4))  # fmt: skip

        def ref_ce(z):
            lp = jax.nn.log_softmax(z, axis=-1)
            nll = -jnp.take_along_axis(lp, t[..., None], axis=-1)[..., 0]
            return jnp.sum(jnp.mean(0.9 * nll - 0.1 * jnp.mean(lp, axis=-1), axis=0))

        want = {
            "cross_entropy": jax.grad(ref_ce)(z),
            "log_probs": jax.grad(ref_lp)(z),
            "distillation_loss": jax.grad(ref_kd, (0, 1))(z, tz),
            "linear_log_probs": jax.grad(lambda x, w: ref_lp(x @ w, 1.0), (0, 1))(x, w),
            "nested": jax.grad(ref_nested, (0, 1))(z, tz),
        }
    for name in got:
        for g, r in zip(jax.tree.leaves(got[name]), jax.tree.leaves(want[name]),
                        strict=True):  # fmt: skip
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6, err_msg=name)


# --- inside a user's jax.checkpoint with a policy that saves matmuls ----------

CHECKPOINT_POLICIES = {
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ),
}


def _per_token_heads(target, teacher_x, teacher_w):
    """Scalar losses of each per-token output (fused, and on the logits).

    The teacher's hidden states depend on ``x`` (differentiated through the
    teacher's tile logits too).
    """

    def fused(x, w, bias):
        tiles = {"chunk_size": 16, "vocab_chunk_size": 256}
        lp, ent = jxent.linear_log_probs(
            x, w, target, bias=bias, temperature=0.9, return_entropy=True, **tiles
        )
        ce = jxent.linear_cross_entropy(
            x, w, target, bias=bias, reduction="none", **tiles
        )
        kd = jxent.linear_distillation_loss(
            x, w, teacher_x + 0.5 * x[:, :5], teacher_w, target, bias=bias, beta=0.5,
            temperature=0.9, reduction="none", **tiles,
        )  # fmt: skip
        return jnp.sum(jnp.exp(lp) + 0.1 * ent + ce**2 + kd**2)

    def materialised(x, w, bias):
        logits = x @ w + bias[None, :]
        lp, ent = ref_log_probs(logits, target, 0.9, True, -1)
        valid = target != -100
        picked = jnp.take_along_axis(logits, jnp.where(valid, target, 0)[:, None], 1)
        ce = jnp.where(valid, jax.nn.logsumexp(logits, axis=-1) - picked[:, 0], 0.0)
        kd = ref_distillation(
            logits,
            (teacher_x + 0.5 * x[:, :5]) @ teacher_w,
            target,
            0.9,
            0.5,
            -1,
            "none",
        )
        return jnp.sum(jnp.exp(lp) + 0.1 * ent + ce**2 + kd**2)

    return fused, materialised


# CI: dots_saveable (every matmul saved); pytest --full the batch-dims one too.
@pytest.mark.parametrize(
    "policy", ["dots_saveable", full_only("dots_with_no_batch_dims_saveable")]
)
def test_checkpoint_policies_that_save_matmuls_save_no_logits(policy):
    # A user's jax.checkpoint applies its policy to every matmul inside,
    # nested checkpoints included: the per-token heads' tile loops saved
    # their logits, stacked over the loops (2.5x the logits at (2048, 256,
    # 32768)). Nothing of the logits' size may be saved, and the derivatives
    # stay those of the formulas.
    n, d, v = 256, 8, 2048
    x = jnp.asarray(RNG.normal(size=(n, d)), jnp.float32)
    w = jnp.asarray(RNG.normal(size=(d, v)) * 0.5, jnp.float32)
    bias = jnp.asarray(RNG.normal(size=(v,)) * 0.1, jnp.float32)
    target = jnp.asarray(RNG.integers(0, v, n)).at[3].set(-100)
    teacher_x = jnp.asarray(RNG.normal(size=(n, 5)), jnp.float32)
    teacher_w = jnp.asarray(RNG.normal(size=(5, v)), jnp.float32)
    fused, _ = _per_token_heads(target, teacher_x, teacher_w)

    def step(policy):
        checkpointed = jax.checkpoint(fused, policy=policy)
        return jax.jit(jax.value_and_grad(checkpointed, argnums=(0, 1, 2)))

    def temporaries(policy):
        compiled = step(policy).lower(x, w, bias).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    saving = temporaries(CHECKPOINT_POLICIES[policy])
    recomputing = temporaries(jax.checkpoint_policies.nothing_saveable)
    assert saving < recomputing + n * v * 4 / 4, (saving, recomputing, n * v * 4)
    value, grads = step(CHECKPOINT_POLICIES[policy])(x, w, bias)
    with x64():
        as64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w, bias)]
        teacher64 = [
            jnp.asarray(np.asarray(a), jnp.float64) for a in (teacher_x, teacher_w)
        ]
        _, reference = _per_token_heads(target, *teacher64)
        ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1, 2))(*as64)
        ref_value, ref_grads = float(ref_value), [np.asarray(g) for g in ref_grads]
    np.testing.assert_allclose(value, ref_value, rtol=2e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-6 * np.abs(r).max())
