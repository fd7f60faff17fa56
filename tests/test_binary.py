"""binary_cross_entropy[_with_logits] and sigmoid_focal_loss against torch float64.

Grid: rank (scalar, (N,), (N, C), (N, C, H, W)) x weight / pos_weight layout
(none, one per class on the last axis, full shape, scalar) x reduction, values
and gradients w.r.t. input, target, weight and pos_weight. Inputs are float32;
the oracle runs on the same values upcast to float64.
"""

from __future__ import annotations

import functools
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64
from jax.test_util import check_grads
from oracles import (
    record_deviation,
    torch,
    torch_binary_cross_entropy,
    torch_sigmoid_focal_loss,
)

import jxent

pytestmark = pytest.mark.skipif(torch is None, reason="torch oracle not installed")

REDUCTIONS = ("none", "mean", "sum")
SHAPES = {"scalar": (), "N": (7,), "NC": (6, 5), "NCHW": (2, 3, 2, 2)}
# (weight layout, pos_weight layout)
WEIGHTINGS = [
    (None, None),
    ("class", "class"),
    ("full", None),
    (None, "full"),
    ("scalar", "class"),
]
RTOL = 2e-6  # float32 against float64
GRAD_KEYS = ("input", "target", "weight", "pos_weight")


def _seed(*parts) -> int:
    return zlib.crc32(repr(parts).encode())


def _layout(kind, shape, rng, low=0.2, high=2.0):
    if kind is None:
        return None
    size = {"class": shape[-1:], "full": shape, "scalar": ()}[kind]
    return rng.uniform(low, high, size=size).astype(np.float32)


def _binary_inputs(shape, seed, logits=True):
    rng = np.random.default_rng(seed)
    if logits:
        x = rng.normal(scale=3.0, size=shape).astype(np.float32)
    else:
        x = rng.uniform(0.0, 1.0, size=shape).astype(np.float32)
        flat = x.reshape(-1)
        flat[: min(4, flat.size)] = np.array([0.0, 1.0, 1e-30, 1.0 - 2**-24])[
            : min(4, flat.size)
        ]
    t = rng.uniform(0.0, 1.0, size=shape)
    t = np.where(rng.random(shape) < 0.5, np.round(t), t).astype(np.float32)
    ct = rng.normal(size=shape).astype(np.float32)
    return x, t, ct, rng


def _loss_fn(logits):
    if logits:
        return lambda x, t, w, pw, r: jxent.binary_cross_entropy_with_logits(
            x, t, w, pos_weight=pw, reduction=r
        )
    return lambda x, t, w, pw, r: jxent.binary_cross_entropy(x, t, w, reduction=r)


@functools.partial(jax.jit, static_argnames=("logits",))
def _all_reductions(x, t, w, pw, ct, logits):
    """Values and VJPs w.r.t. every input, for the three reductions at once."""
    fn = _loss_fn(logits)
    out = {}
    for r in REDUCTIONS:
        loss, vjp = jax.vjp(lambda *a, r=r: fn(*a, r), x, t, w, pw)
        cot = ct if r == "none" else jnp.ones((), loss.dtype)
        out[r] = (loss, dict(zip(GRAD_KEYS, vjp(cot), strict=True)))
    return out


def _compare(kind, actual, expected, rtol=RTOL, atol=1e-6):
    actual = np.asarray(actual, np.float64)
    expected = np.asarray(expected, np.float64)
    assert actual.shape == expected.shape
    np.testing.assert_allclose(actual, expected, rtol=rtol, atol=atol)
    record_deviation(kind, actual, expected)


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
@pytest.mark.parametrize(("weight_kind", "pos_kind"), WEIGHTINGS)
@pytest.mark.parametrize("shape_name", list(SHAPES))
def test_against_torch(logits, weight_kind, pos_kind, shape_name):
    if not logits and pos_kind is not None:
        pos_kind = None  # binary_cross_entropy has no pos_weight
    shape = SHAPES[shape_name]
    x, t, ct, rng = _binary_inputs(
        shape, _seed(logits, weight_kind, pos_kind, shape_name), logits
    )
    w = _layout(weight_kind, shape, rng)
    pw = _layout(pos_kind, shape, rng, 0.5, 4.0)
    if shape == () and "class" in (weight_kind, pos_kind):
        w = None if w is None else w.reshape(())
        pw = None if pw is None else pw.reshape(())
    ours = _all_reductions(x, t, w, pw, ct, logits=logits)
    name = "bce_with_logits" if logits else "bce"
    for r in REDUCTIONS:
        loss, grads = torch_binary_cross_entropy(
            x, t, w, pos_weight=pw, reduction=r, logits=logits, cotangent=ct
        )
        our_loss, our_grads = ours[r]
        assert our_loss.dtype == jnp.float32
        _compare(f"{name} value", our_loss, loss)
        for key in GRAD_KEYS:
            if grads[key] is None:
                assert our_grads[key] is None
                continue
            # 1/max((1-p)p, 1e-12) reaches 1e12 at p = 0, 1: relative there.
            _compare(f"{name} grad {key}", our_grads[key], grads[key], atol=1e-5)


EXTREMES = np.array(
    [-np.inf, -1e30, -1e4, -100.0, -20.0, -1.0, 0.0, 1.0, 20.0, 100.0, 1e4, 1e30,
     np.inf],
    np.float32,
)  # fmt: skip


@pytest.mark.parametrize("pos_weight", [None, 2.5])
@pytest.mark.parametrize("target", [0.0, 1.0, 0.3])
def test_extreme_logits(target, pos_weight):
    x = EXTREMES
    t = np.full_like(x, target)
    pw = None if pos_weight is None else np.float32(pos_weight)
    loss, grads = torch_binary_cross_entropy(
        x, t, pos_weight=pw, reduction="none", logits=True
    )
    ours, our_grads = _all_reductions(x, t, None, pw, np.ones_like(x), True)["none"]
    ours = np.asarray(ours, np.float64)
    undifferentiated = jxent.binary_cross_entropy_with_logits(
        x, t, pos_weight=pw, reduction="none"
    )
    np.testing.assert_array_equal(undifferentiated, ours)
    finite = np.isfinite(loss)
    np.testing.assert_allclose(ours[finite], loss[finite], rtol=RTOL, atol=1e-37)
    # Where torch gives NaN (inf - inf at x = ±inf), jxent gives the limit.
    limit = np.where(x == -np.inf, np.inf if target > 0 else 0.0, np.inf)
    limit = np.where((x == np.inf) & (target == 1.0), 0.0, limit)
    nan = np.isnan(loss)
    np.testing.assert_array_equal(ours[nan], limit[nan])
    assert not np.isnan(ours).any()
    # Gradients: torch's are finite everywhere; ours equal them (up to float32
    # underflow: XLA flushes subnormals such as sigmoid(-100) = 3.7e-44 to 0).
    for key in ("input", "target"):
        np.testing.assert_allclose(our_grads[key], grads[key], rtol=RTOL, atol=1e-37)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16bit_accumulates_in_float32(dtype):
    rng = np.random.default_rng(5)
    x = jnp.asarray(rng.normal(scale=2.0, size=(300, 256)), dtype)
    t = jnp.asarray(rng.random((300, 256)) < 0.3)  # boolean labels
    p = jax.nn.sigmoid(x)
    pw = jnp.full((256,), 3.0, dtype)
    x32, p32, t64 = (
        np.asarray(x, np.float32),
        np.asarray(p, np.float32),
        np.asarray(t, np.float64),
    )
    for loss, expected in [
        (
            jxent.binary_cross_entropy_with_logits(x, t, pos_weight=pw),
            torch_binary_cross_entropy(
                x32, t64, pos_weight=np.asarray(pw, np.float32), logits=True
            )[0],
        ),
        (
            jxent.binary_cross_entropy(p, t),  # its inner sum exceeds 65504
            torch_binary_cross_entropy(p32, t64)[0],
        ),
        (
            jxent.sigmoid_focal_loss(x, t, reduction="sum"),
            torch_sigmoid_focal_loss(x32, t64, reduction="sum")[0],
        ),
    ]:
        assert loss.dtype == dtype
        assert np.isfinite(float(loss))
        # float32 accumulation: only the final rounding to the 16-bit dtype.
        np.testing.assert_allclose(float(loss), expected, rtol=1e-2)


def test_integer_and_boolean_targets_are_cast():
    x = jnp.array([[1.5, -2.0, 0.3], [0.0, 4.0, -1.0]])
    t_int = jnp.array([[1, 0, 1], [0, 1, 0]], jnp.int32)
    for t in (t_int, t_int.astype(bool), t_int.astype(jnp.uint8)):
        np.testing.assert_array_equal(
            jxent.binary_cross_entropy_with_logits(x, t, reduction="none"),
            jxent.binary_cross_entropy_with_logits(
                x, t_int.astype(jnp.float32), reduction="none"
            ),
        )
        np.testing.assert_array_equal(
            jxent.binary_cross_entropy(jax.nn.sigmoid(x), t),
            jxent.binary_cross_entropy(jax.nn.sigmoid(x), t_int.astype(jnp.float32)),
        )
        np.testing.assert_array_equal(
            jxent.sigmoid_focal_loss(x, t), jxent.sigmoid_focal_loss(x, 1.0 * t_int)
        )


# --- sigmoid_focal_loss -------------------------------------------------------

FOCAL_OPTIONS = [(0.25, 2.0), (-1.0, 2.0), (0.7, 0.5), (0.25, 0.0), (-1.0, 1.0)]


@functools.partial(jax.jit, static_argnames=("reduction",))
def _focal_and_grads(x, t, alpha, gamma, ct, reduction):
    loss, vjp = jax.vjp(
        lambda x, t: jxent.sigmoid_focal_loss(
            x, t, alpha=alpha, gamma=gamma, reduction=reduction
        ),
        x,
        t,
    )
    return loss, vjp(ct if reduction == "none" else jnp.ones((), loss.dtype))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize(("alpha", "gamma"), FOCAL_OPTIONS)
def test_focal_against_torchvision_formula(alpha, gamma, reduction):
    x, t, ct, _ = _binary_inputs((6, 3, 4), _seed("focal", alpha, gamma))
    loss, gx, gt = torch_sigmoid_focal_loss(
        x, t, alpha=alpha, gamma=gamma, reduction=reduction, cotangent=ct
    )
    # alpha and gamma are traced: one compilation per reduction.
    ours, (our_gx, our_gt) = _focal_and_grads(x, t, alpha, gamma, ct, reduction)
    _compare("focal value", ours, loss)
    _compare("focal grad input", our_gx, gx)
    _compare("focal grad target", our_gt, gt)


@pytest.mark.parametrize("gamma", [0.5, 2.0])
def test_focal_extreme_logits(gamma):
    x = EXTREMES
    grid_x = np.concatenate([x, x, x])
    grid_t = np.repeat(np.array([0.0, 1.0, 0.3], np.float32), x.size)
    loss, gx, gt = torch_sigmoid_focal_loss(grid_x, grid_t, gamma=gamma)
    ours, (our_gx, our_gt) = _focal_and_grads(
        grid_x, grid_t, 0.25, gamma, np.ones_like(grid_x), "none"
    )
    ours = np.asarray(ours, np.float64)
    moderate = np.abs(grid_x) <= 20
    np.testing.assert_allclose(ours[moderate], loss[moderate], rtol=1e-5)
    # Hard targets: the loss is finite and its gradient finite everywhere,
    # also for gamma < 1 where torchvision's derivative is NaN at p_t = 1.
    hard = grid_t != 0.3
    finite_loss = np.isfinite(ours)
    assert finite_loss[hard & np.isfinite(grid_x)].all()
    assert np.isfinite(np.asarray(our_gx)[hard & finite_loss]).all()
    easy = hard & (grid_x * (2 * grid_t - 1) >= 100)  # p_t -> 1: loss and grad -> 0
    np.testing.assert_array_equal(ours[easy], 0.0)
    np.testing.assert_array_equal(np.asarray(our_gx)[easy], 0.0)
    ok = np.isfinite(gx) & moderate
    np.testing.assert_allclose(np.asarray(our_gx)[ok], gx[ok], rtol=1e-5, atol=1e-7)
    ok = np.isfinite(gt) & moderate
    np.testing.assert_allclose(np.asarray(our_gt)[ok], gt[ok], rtol=1e-5, atol=1e-6)


def test_focal_gamma_zero_at_infinite_logits_and_a_nan_alpha():
    """gamma = 0 is BCE (times alpha_t): at x = ±inf the gradient was NaN
    (the modulation's zero derivative times the infinite BCE), where torch's
    is finite (its pow with exponent 0 has a zero derivative). A NaN alpha
    means no weighting (torchvision's ``alpha >= 0`` rule): the gradient was
    NaN (the unused weighted branch). Oracle: the formula in float64 torch."""
    x = np.array([np.inf, -np.inf, np.inf, -np.inf, 0.5], np.float32)
    t = np.array([0.0, 1.0, 1.0, 0.0, 1.0], np.float32)
    ones = np.ones_like(x)
    for alpha in (0.25, -1.0):
        _, gx, gt = torch_sigmoid_focal_loss(x, t, alpha=alpha, gamma=0.0)
        _, (our_gx, our_gt) = _focal_and_grads(x, t, alpha, 0.0, ones, "none")
        np.testing.assert_allclose(our_gx, gx, rtol=1e-6)
        # d/dt = -x·alpha_t + ... is ±inf at the hard targets' limits, where
        # torch's is NaN (inf - inf in its BCE).
        finite = np.isfinite(gt)
        np.testing.assert_allclose(np.asarray(our_gt)[finite], gt[finite], rtol=1e-6)
    # gamma > 0 there: torch's d/dx is NaN (inf · 0); jxent's is the limit,
    # alpha_t · (sigmoid(x) - t) (README's semantics table).
    x, t = np.array([np.inf, -np.inf], np.float32), np.array([0.0, 1.0], np.float32)
    _, (our_gx, _) = _focal_and_grads(x, t, 0.25, 2.0, np.ones_like(x), "none")
    np.testing.assert_allclose(our_gx, [0.75, -0.25], rtol=1e-6)
    x, t = np.array([0.3, 0.5], np.float32), np.array([0.0, 1.0], np.float32)
    loss, gx, gt = torch_sigmoid_focal_loss(x, t, alpha=float("nan"), gamma=2.0)
    ours, (our_gx, our_gt) = _focal_and_grads(
        x, t, float("nan"), 2.0, np.ones_like(x), "none"
    )
    np.testing.assert_allclose(ours, loss, rtol=1e-6)
    np.testing.assert_allclose(our_gx, gx, rtol=1e-6)
    np.testing.assert_allclose(our_gt, gt, rtol=1e-6)


# --- autodiff modes and transformations ---------------------------------------


def test_forward_and_reverse_mode_grads_x64():
    rng = np.random.default_rng(11)
    with x64():
        x = jnp.asarray(rng.normal(scale=2.0, size=(3, 4)))
        t = jnp.asarray(rng.uniform(0.05, 0.95, size=(3, 4)))
        w = jnp.asarray(rng.uniform(0.5, 2.0, size=(4,)))
        pw = jnp.asarray(rng.uniform(0.5, 3.0, size=(4,)))
        p = jnp.asarray(rng.uniform(0.05, 0.95, size=(3, 4)))

        def logits_loss(x, t, w, pw):
            return jxent.binary_cross_entropy_with_logits(x, t, w, pos_weight=pw)

        def probs_loss(p, t, w):
            return jxent.binary_cross_entropy(p, t, w, reduction="sum")

        def focal_loss(x, t, gamma):
            return jxent.sigmoid_focal_loss(x, t, gamma=gamma, reduction="mean")

        modes = ("fwd", "rev")
        check_grads(logits_loss, (x, t, w, pw), order=1, modes=modes)
        # Second order (the JVP rule is itself differentiable) w.r.t. the logits.
        check_grads(lambda x: logits_loss(x, t, w, pw), (x,), order=2, modes=modes)
        check_grads(probs_loss, (p, t, w), order=1, modes=modes)
        check_grads(focal_loss, (x, t, 0.7), order=1, modes=modes)
        check_grads(focal_loss, (x, t, 2.5), order=1, modes=modes)


def test_forward_mode_equals_reverse_mode():
    x, t, _, _ = _binary_inputs((4, 3), 2)
    pw = jnp.array([1.0, 2.0, 3.0])

    def f(x):
        return jxent.binary_cross_entropy_with_logits(
            x, t, pos_weight=pw, reduction="none"
        )

    np.testing.assert_allclose(jax.jacfwd(f)(x), jax.jacrev(f)(x), rtol=1e-6)
    g = lambda x: jxent.sigmoid_focal_loss(x, t, gamma=0.5)
    np.testing.assert_allclose(jax.jacfwd(g)(x), jax.jacrev(g)(x), rtol=1e-6)


def test_vmap_equals_loop():
    x, t, _, rng = _binary_inputs((3, 4, 5), 4)
    pw = rng.uniform(0.5, 2.0, size=5).astype(np.float32)

    def per_row(x, t):
        return jxent.binary_cross_entropy_with_logits(x, t, pos_weight=pw)

    batched = jax.vmap(per_row)(x, t)
    looped = jnp.stack([per_row(x[i], t[i]) for i in range(3)])
    np.testing.assert_allclose(batched, looped, rtol=1e-6)
    focal = jax.vmap(lambda x, t: jxent.sigmoid_focal_loss(x, t, reduction="sum"))
    np.testing.assert_allclose(
        focal(x, t),
        jnp.stack(
            [jxent.sigmoid_focal_loss(x[i], t[i], reduction="sum") for i in range(3)]
        ),
        rtol=1e-6,
    )


def test_traced_pos_weight_does_not_recompile():
    traces = []

    @jax.jit
    def f(pw):
        traces.append(None)
        return jxent.binary_cross_entropy_with_logits(
            jnp.ones((2, 3)), jnp.zeros((2, 3)), pos_weight=pw
        )

    f(jnp.ones(3))
    f(2 * jnp.ones(3))
    assert len(traces) == 1


@pytest.mark.parametrize("logits", [True, False], ids=["logits", "probs"])
def test_wide_rows_against_torch(logits):
    """Rows of >= 64 elements: the CPU sums them as a matrix-vector product."""
    x, t, ct, rng = _binary_inputs((16, 128), _seed("wide", logits), logits)
    w = _layout("class", (16, 128), rng)
    pw = _layout("full", (16, 128), rng, 0.5, 4.0) if logits else None
    ours = _all_reductions(x, t, w, pw, ct, logits=logits)
    for r in ("mean", "sum"):
        loss, grads = torch_binary_cross_entropy(
            x, t, w, pos_weight=pw, reduction=r, logits=logits
        )
        _compare("wide value", ours[r][0], loss)
        for key in GRAD_KEYS:
            if grads[key] is not None:
                _compare(f"wide grad {key}", ours[r][1][key], grads[key], atol=1e-5)


def test_vmap_and_forward_mode_of_the_wide_row_sum():
    x, t, _, rng = _binary_inputs((2, 4, 128), 8)
    pw = rng.uniform(0.5, 2.0, size=128).astype(np.float32)

    def loss(x, t):
        return jxent.binary_cross_entropy_with_logits(x, t, pos_weight=pw)

    batched = jax.vmap(loss)(x, t)
    np.testing.assert_allclose(batched, [loss(x[0], t[0]), loss(x[1], t[1])], rtol=1e-6)
    tangent = jnp.asarray(rng.normal(size=x[0].shape), jnp.float32)
    _, fwd = jax.jvp(lambda x: loss(x, t[0]), (x[0],), (tangent,))
    rev = jnp.vdot(jax.grad(loss)(x[0], t[0]), tangent)
    np.testing.assert_allclose(fwd, rev, rtol=1e-5)


def test_second_derivatives_where_a_coefficient_is_zero():
    """Hessians w.r.t. every floating input against the float64 formulas,
    at ``pos_weight = 1`` (the ``pw - 1`` factor of d/dt is 0), soft targets
    and ``gamma = 0``: the derivative rules' zero-safe products had a zero
    derivative w.r.t. a zero coefficient (H[t][pw] was 0, not the mixed
    partial, and H[gamma][gamma] at gamma = 0 was 0). Also at a zero logit
    (a zero-initialised head's), where softplus's pieces (|x|, max) have
    one-sided derivatives and 102 Hessian entries were wrong."""
    x = np.array([0.3, -1.2, 2.0, 0.0, 0.0])
    t = np.array([0.2, 0.5, 0.9, 0.3, 1.0])

    def bce_ref(x, t, pw):
        return jnp.sum((1 - t) * jax.nn.softplus(x) + pw * t * jax.nn.softplus(-x))

    def focal_ref(x, t, alpha, gamma):
        p = jax.nn.sigmoid(x)
        ce = (1 - t) * jax.nn.softplus(x) + t * jax.nn.softplus(-x)
        p_t = p * t + (1 - p) * (1 - t)
        a_t = alpha * t + (1 - alpha) * (1 - t)
        return jnp.sum(a_t * ce * (1 - p_t) ** gamma)

    def bce(x, t, pw):
        return jxent.binary_cross_entropy_with_logits(x, t, pos_weight=pw,
                                                      reduction="sum")  # fmt: skip

    def focal(x, t, alpha, gamma):
        return jxent.sigmoid_focal_loss(x, t, alpha=alpha, gamma=gamma,
                                        reduction="sum")  # fmt: skip

    cases = [
        (bce, bce_ref, (x, t, 1.0)),
        (bce, bce_ref, (x, t, 2.0)),
        (focal, focal_ref, (x, t, 0.25, 0.0)),
        (focal, focal_ref, (x[3:], t[3:], 0.25, 2.0)),
    ]
    hessians = (jax.hessian, lambda f, a: jax.jacfwd(jax.jacfwd(f, a), a))
    programs = {}  # one compiled Hessian per function, mode and arity

    def compiled(f, mode, argnums):
        key = (f, mode, argnums)
        if key not in programs:
            programs[key] = jax.jit(hessians[mode](f, argnums))
        return programs[key]

    for ours, ref, args in cases:
        argnums = tuple(range(len(args)))
        f32 = tuple(np.float32(a) for a in args)
        for mode in range(len(hessians)):
            got = compiled(ours, mode, argnums)(*f32)
            with x64():
                want = compiled(ref, mode, argnums)(*args)
            for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
                np.testing.assert_allclose(g, w, rtol=2e-5, atol=2e-6)
