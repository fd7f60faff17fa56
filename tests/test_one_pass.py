"""The accelerators' one-pass forward, run on the CPU against the CPU path.

On GPU and TPU the forward statistics come from one variadic reduction that
carries the running maximum (``jxent._kernels._one_pass_stats``); the CPU uses
shifted sums with an overflow fallback. Both must give the same values and
gradients to float32 rounding for every option. The CPU path is the one the
torch oracle grid checks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent
import jxent._kernels as kernels

RNG = np.random.default_rng(7)
LOGITS = jnp.asarray(RNG.normal(scale=3.0, size=(6, 5)), jnp.float32)
TARGET = jnp.asarray([0, 4, -100, 2, 1, -100])
WEIGHT = jnp.asarray(RNG.uniform(0.2, 2.0, size=5), jnp.float32)
COTANGENT = jnp.asarray(RNG.uniform(0.5, 1.5, size=6), jnp.float32)
MASKED = LOGITS.at[0, 1].set(-jnp.inf).at[3, 4].set(-jnp.inf)
WHERE = jnp.ones((6, 5), bool).at[1, 0].set(False).at[4, 3].set(False)
EXTREME = jnp.asarray(
    [[1e30, -1e30, 0.0, 1e4, -1e4], [-1e4, 1e4, 3.0, -1e30, 1e30]] * 3, jnp.float32
)

CASES = {
    "plain": (LOGITS, {}),
    "weight+ignore": (LOGITS, {"weight": WEIGHT}),
    "smoothing": (LOGITS, {"label_smoothing": 0.1}),
    "weight+smoothing": (LOGITS, {"weight": WEIGHT, "label_smoothing": 0.2}),
    "masked -inf": (MASKED, {"weight": WEIGHT, "label_smoothing": 0.0}),
    "where": (LOGITS, {"where": WHERE, "label_smoothing": 0.1}),
    "soft_cap+z_loss": (LOGITS, {"soft_cap": 4.0, "z_loss": 1e-3}),
    "extreme": (EXTREME, {"weight": WEIGHT}),
}


def _losses_and_grads(logits, options):
    def loss(x, reduction):
        return jxent.cross_entropy(x, TARGET, reduction=reduction, **options)

    out = {}
    for reduction in ("none", "mean", "sum"):
        value, vjp = jax.vjp(lambda x, r=reduction: loss(x, r), logits)
        cotangent = COTANGENT if reduction == "none" else jnp.float32(1.0)
        out[reduction] = (value, vjp(cotangent)[0])
    return out


def _on_path(one_pass: bool, fn, *args):
    """``jax.jit(fn)(*args)`` traced on the one-pass path or the CPU path."""
    kernels._ONE_PASS = one_pass
    jax.clear_caches()  # the path is chosen at trace time
    try:
        return jax.jit(fn)(*args)
    finally:
        kernels._ONE_PASS = None
        jax.clear_caches()


def _with_path(one_pass: bool, logits, options):
    return _on_path(one_pass, lambda x: _losses_and_grads(x, options), logits)


@pytest.mark.parametrize("case", list(CASES))
def test_one_pass_equals_cpu_path(case):
    logits, options = CASES[case]
    want = _with_path(False, logits, options)
    got = _with_path(True, logits, options)
    for reduction, (value, grad) in want.items():
        g_value, g_grad = got[reduction]
        np.testing.assert_allclose(g_value, value, rtol=2e-6, atol=0)
        assert np.all(np.isfinite(g_grad) == np.isfinite(grad))
        scale = np.abs(np.asarray(grad)).max()
        np.testing.assert_allclose(g_grad, grad, rtol=2e-6, atol=2e-6 * scale)


def test_one_pass_smoothing_hits_impossible_class_with_inf():
    """ε > 0 puts target mass on a -inf class: +inf loss, finite gradients."""
    options = {"weight": WEIGHT, "label_smoothing": 0.1}
    got = _with_path(True, MASKED, options)
    assert got["mean"][0] == jnp.inf
    assert np.all(np.isfinite(got["mean"][1]))


def test_one_pass_with_classes_on_axis_one():
    """torch's (N, C, d1) layout: the reduction runs over a middle axis."""
    logits = jnp.asarray(RNG.normal(scale=2.0, size=(2, 5, 3)), jnp.float32)
    target = jnp.asarray([[0, 4, -100], [2, 1, 3]])

    def loss(x):
        return jxent.cross_entropy(
            x, target, WEIGHT, axis=1, label_smoothing=0.1, z_loss=1e-3
        )

    want, want_grad = _on_path(False, jax.value_and_grad(loss), logits)
    got, got_grad = _on_path(True, jax.value_and_grad(loss), logits)
    np.testing.assert_allclose(got, want, rtol=2e-6)
    np.testing.assert_allclose(got_grad, want_grad, rtol=2e-6, atol=1e-7)


# --- the CPU's kept exponentials ----------------------------------------------
# On the CPU, float32 and float64 logits without a soft cap keep the forward's
# exp(x - shift) for the gradient (``kernels._keeps_exps``); the recomputing
# path is the one other platforms compile. Both against each other here, and
# each against torch elsewhere (the oracle grid runs the default path).

NON_FINITE = jnp.asarray(
    [
        [1.0, jnp.nan, 0.0, 2.0, -1.0],  # NaN logit
        [jnp.inf, 1.0, 0.0, 2.0, -1.0],  # +inf logit
        [-jnp.inf] * 5,  # every class impossible
        [200.0, 0.0, 1.0, -3.0, 2.0],  # a logit 200 above the target's
        [1.0, 2.0, 3.0, 4.0, 5.0],
        [jnp.nan, 0.0, jnp.inf, 1.0, 2.0],  # ignored: dead row
    ],
    jnp.float32,
)
KEPT_CASES = {
    **{k: v for k, v in CASES.items() if "soft_cap" not in v[1]},
    "z_loss": (LOGITS, {"z_loss": 1e-3}),
    "non-finite": (NON_FINITE, {}),
    "non-finite+smoothing": (NON_FINITE, {"weight": WEIGHT, "label_smoothing": 0.1}),
}


def _kept(keep: bool, fn, *args):
    """``jax.jit(fn)(*args)`` traced with or without the kept exponentials."""
    kernels._KEEP_EXPS = keep
    jax.clear_caches()
    try:
        return jax.jit(fn)(*args)
    finally:
        kernels._KEEP_EXPS = None
        jax.clear_caches()


def _tangent_outputs(logits, options):
    rng = np.random.default_rng(3)
    tangent = jnp.asarray(rng.normal(size=logits.shape), logits.dtype)
    out = {}
    for reduction in ("none", "mean"):
        loss = lambda x, r=reduction: jxent.cross_entropy(
            x, TARGET, reduction=r, **options
        )
        out[reduction] = jax.jvp(loss, (logits,), (tangent,))[1]
    return out


@pytest.mark.parametrize("case", list(KEPT_CASES))
def test_kept_exponentials_equal_recomputed(case):
    logits, options = KEPT_CASES[case]
    for fn in (_losses_and_grads, _tangent_outputs):
        want = _kept(False, lambda x, f=fn: f(x, options), logits)
        got = _kept(True, lambda x, f=fn: f(x, options), logits)
        for got_leaf, want_leaf in zip(
            jax.tree.leaves(got), jax.tree.leaves(want), strict=True
        ):
            got_leaf, want_leaf = np.asarray(got_leaf), np.asarray(want_leaf)
            # A row with a +inf logit: NaN wherever the recomputation has one
            # (and possibly more).
            assert np.all(np.isnan(got_leaf)[np.isnan(want_leaf)]), case
            both = np.isfinite(want_leaf)
            assert np.all(np.isfinite(got_leaf)[both]), case
            scale = np.abs(want_leaf[both]).max(initial=1.0)
            np.testing.assert_allclose(
                got_leaf[both], want_leaf[both], rtol=2e-6, atol=2e-6 * scale
            )


def test_kept_exponentials_only_where_they_pay():
    """float32/float64 on the CPU without a soft cap, up to 256 MiB of them."""
    shards = kernels.UNSHARDED
    on_cpu = jax.default_backend() == "cpu"

    def keeps(shape, dtype, soft_cap=None):
        logits = jax.ShapeDtypeStruct(shape, dtype)
        return kernels._keeps_exps(logits, soft_cap, shards)

    assert keeps((2, 3), jnp.float32) == on_cpu
    assert keeps((2048, 32768), jnp.float32) == on_cpu  # 256 MiB
    assert not keeps((2048, 32768 + 1), jnp.float32)
    assert keeps((1024, 32768), jnp.float64) == on_cpu
    assert not keeps((2048, 32768), jnp.float64)
    assert not keeps((2, 3), jnp.float32, jnp.float32(5.0))
    assert not keeps((2, 3), jnp.bfloat16)
    assert not keeps((2, 3), jnp.float16)


def _chips_branch(cpu, other):
    """``kernels.on_cpu`` answering "not the CPU", as lowered for a chip."""
    return other()


PLACEHOLDER_CASES = {
    "plain": (LOGITS, {}),
    "weight+smoothing": (LOGITS, {"weight": WEIGHT, "label_smoothing": 0.2}),
    # Excluded classes' logits are not read, even +inf or NaN.
    "where+smoothing": (
        LOGITS.at[1, 0].set(jnp.inf).at[4, 3].set(jnp.nan),
        {"where": WHERE, "label_smoothing": 0.1},
    ),
}


@pytest.mark.parametrize("case", list(PLACEHOLDER_CASES))
def test_kept_exponentials_placeholder_off_the_cpu(case, monkeypatch):
    """Traced on a CPU host and lowered for a chip, the kept exponentials'
    place holds the logits, from which the chip's derivatives recompute.

    Values, gradients (logits and class weights) and both second-order
    products against the float64 reference's autodiff.
    """
    logits, options = PLACEHOLDER_CASES[case]
    weight = options.get("weight")
    rest = {k: v for k, v in options.items() if k != "weight"}
    tangent = jnp.asarray(np.random.default_rng(5).normal(size=LOGITS.shape))

    def quantities(loss, x, w, v):
        grads = jax.grad(loss, argnums=(0, 1))(x, w)
        fwd_rev = jax.jvp(lambda x: jax.grad(loss)(x, w), (x,), (v,))[1]
        rev_fwd = jax.grad(lambda x: jax.jvp(lambda x: loss(x, w), (x,), (v,))[1])(x)
        return loss(x, w), grads, fwd_rev, rev_fwd

    def ours(x, w, v):
        return quantities(
            lambda x, w: jxent.cross_entropy(x, TARGET, weight=w, **rest), x, w, v
        )

    w = jnp.ones(5, jnp.float32) if weight is None else weight
    kernels._KEEP_EXPS = True
    monkeypatch.setattr(kernels, "on_cpu", _chips_branch)
    jax.clear_caches()
    try:
        got = jax.jit(ours)(logits, w, tangent.astype(jnp.float32))
    finally:
        kernels._KEEP_EXPS = None
        jax.clear_caches()

    with jax.enable_x64(True):
        from oracles import reference_cross_entropy

        def reference(x, w):
            return reference_cross_entropy(x, TARGET, w, **rest)[0]

        want = quantities(
            reference,
            jnp.asarray(logits, jnp.float64),
            jnp.asarray(w, jnp.float64),
            jnp.asarray(tangent, jnp.float64),
        )
    leaves = zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True)
    for got_leaf, want_leaf in leaves:
        np.testing.assert_allclose(got_leaf, want_leaf, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("platform", ["cpu", "tpu", "cuda"])
def test_a_forward_compiled_apart_keeps_one_logits_sized_residual(platform):
    """``jax.vjp``'s forward as a program of its own, exported from this
    process: the CPU keeps its exponentials and a chip the logits, one array
    of the logits' size either way (the logits were a second one)."""
    from jax import export

    def forward(x, t):
        loss, vjp = jax.vjp(lambda x: jxent.cross_entropy(x, t), x)
        return loss, jax.tree.leaves(vjp)

    x = jax.ShapeDtypeStruct((64, 512), jnp.float32)
    t = jax.ShapeDtypeStruct((64,), jnp.int32)
    assert kernels._keeps_exps(x, None, kernels.UNSHARDED)
    exported = export.export(jax.jit(forward), platforms=(platform,))(x, t)
    sized = [a for a in exported.out_avals if a.shape == x.shape]
    assert len(sized) == 1, exported.out_avals
