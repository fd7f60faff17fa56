"""Bad data poisons the loss *and* its gradients, in both modes.

Under ``jit`` a bad value cannot raise, so the loss is NaN; its gradients
must be NaN too, or ``optax.apply_if_finite`` and every finite-check on
gradients would let the step through with the bad row silently dropped:
the gradients w.r.t. every floating input are NaN for ``"mean"`` and
``"sum"``, and the bad position's for ``"none"``, in reverse and forward mode.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent

RNG = np.random.default_rng(16)
N, C, D = 6, 5, 4
LOGITS = jnp.asarray(RNG.normal(size=(N, C)), jnp.float32)
X = jnp.asarray(RNG.normal(size=(N, D)), jnp.float32)
W = jnp.asarray(RNG.normal(size=(D, C)), jnp.float32)
TARGET = jnp.array([0, 1, 2, 3, 4, 1])
BAD_ROW = 3
CLASS_WEIGHT = jnp.asarray([1.0, 2.0, 0.5, 1.5, 1.0])
REDUCTIONS = ("mean", "sum", "none")


def _bad_target(value=7):
    return TARGET.at[BAD_ROW].set(value)


def _assert_poisoned(reduction, values, grads, tangent, rows, dense_rows):
    """NaN loss; NaN gradients (all of them, or the bad rows'); NaN tangent."""
    values = np.asarray(values)
    if reduction == "none":
        for row in rows:  # an element-wise loss: NaN at the bad element
            assert np.isnan(values[row]).any(), values
        good = np.setdiff1d(np.arange(values.shape[0]), rows)
        assert np.isfinite(values[good]).all(), values
    else:
        assert np.isnan(values), values
    for g in grads:
        g = np.asarray(g)
        if reduction == "none" and g.ndim and g.shape[0] == N:
            # Each bad row's gradient is NaN where its loss reaches (an
            # element-wise loss's bad element; not a class excluded by where).
            for row in rows:
                assert np.isnan(g[row]).any(), g
            if dense_rows:
                assert np.isnan(g[list(rows)]).all(), g
        elif reduction == "none":
            assert np.isnan(g).any(), g  # shared parameters reached by the row
        else:
            assert np.isnan(g).all(), g
    tangent = np.asarray(tangent)
    if reduction == "none":
        for row in rows:
            assert np.isnan(tangent[row]).any(), tangent
    else:
        assert np.isnan(tangent), tangent


def _check(fn, args, reduction, rows=(BAD_ROW,), data=(), dense_rows=False):
    """Values, reverse-mode gradients of the sum w.r.t. every arg, a JVP.

    ``args`` are the floating inputs (differentiated), ``data`` the integer
    ones; all are traced, so nothing can be checked at trace time.
    """
    value_fn, grad_fn, jvp_fn = _programs(fn, len(args))
    values = value_fn(*args, *data)
    grads = grad_fn(*args, *data)
    _, tangent = jvp_fn(args, data)
    _assert_poisoned(reduction, values, grads, tangent, rows, dense_rows)


@functools.lru_cache
def _programs(fn, num_args):
    """The jitted values, gradients of the sum, and JVP (all-ones tangents)
    of ``fn``: compiled once for every bad value a test feeds the same ``fn``."""
    total = lambda *a: jnp.sum(fn(*a))

    def jvp(args, data):
        tangents = tuple(jnp.ones_like(a) for a in args)
        return jax.jvp(lambda *a: fn(*a, *data), args, tangents)

    grad = jax.grad(total, argnums=tuple(range(num_args)))
    return jax.jit(fn), jax.jit(grad), jax.jit(jvp)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_out_of_range_target(reduction):
    fn = lambda x, w, t: jxent.cross_entropy(x, t, w, reduction=reduction)
    for bad in (7, 5, -1, -7):  # one program for every bad target
        _check(
            fn, (LOGITS, CLASS_WEIGHT), reduction, data=(_bad_target(bad),),
            dense_rows=True,
        )  # fmt: skip


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_target_on_an_excluded_class(reduction):
    where = jnp.array([True, True, True, False, True])  # only row 3 targets 3
    fn = lambda x, e, t: jxent.cross_entropy(
        x, t, where=where, label_smoothing=e, reduction=reduction
    )
    _check(fn, (LOGITS, jnp.float32(0.1)), reduction, data=(TARGET,))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("soft", [False, True], ids=["int", "probs"])
def test_cross_entropy_traced_label_smoothing_outside_unit_interval(reduction, soft):
    target = jax.nn.softmax(LOGITS[::-1]) if soft else TARGET
    fn = lambda x, e: jxent.cross_entropy(
        x, target, label_smoothing=e, reduction=reduction
    )
    for eps in (1.5, -0.25, float("nan")):
        _check(fn, (LOGITS, jnp.float32(eps)), reduction, rows=tuple(range(N)))
    # Inside [0, 1] the same programs are finite (1 is allowed, as in torch).
    value_fn, grad_fn, _ = _programs(fn, 2)
    for good in (0.0, 1.0, 0.5):
        assert np.isfinite(value_fn(LOGITS, jnp.float32(good))).all()
        grads = grad_fn(LOGITS, jnp.float32(good))
        assert all(np.isfinite(g).all() for g in grads)


def test_issue_example_traced_label_smoothing():
    # The issue's report: 2.28 for ε = 1.5; now NaN with NaN gradients.
    fn = jax.jit(lambda e: jxent.cross_entropy(LOGITS, TARGET, label_smoothing=e))
    assert np.isnan(fn(1.5))
    assert np.isnan(jax.grad(fn)(1.5))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_cross_entropy_traced_negative_z_loss(reduction):
    fn = lambda x, z: jxent.cross_entropy(x, TARGET, z_loss=z, reduction=reduction)
    _check(fn, (LOGITS, jnp.float32(-1e-3)), reduction, rows=tuple(range(N)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_nll_loss_out_of_range_target(reduction):
    fn = lambda lp, w, t: jxent.nll_loss(lp, t, w, reduction=reduction)
    log_probs = jax.nn.log_softmax(LOGITS)
    _check(fn, (log_probs, CLASS_WEIGHT), reduction, data=(_bad_target(9),))


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_out_of_range_target(reduction):
    fn = lambda x, w, b, t: jxent.linear_cross_entropy(
        x, w, t, bias=b, reduction=reduction, chunk_size=2
    )
    _check(fn, (X, W, jnp.zeros(C)), reduction, data=(_bad_target(7),), dense_rows=True)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_linear_cross_entropy_traced_label_smoothing(reduction):
    fn = lambda x, w, e: jxent.linear_cross_entropy(
        x, w, TARGET, label_smoothing=e, reduction=reduction, chunk_size=4
    )
    _check(fn, (X, W, jnp.float32(1.5)), reduction, rows=tuple(range(N)))


@pytest.mark.parametrize("reduction", REDUCTIONS)
@pytest.mark.parametrize("linear", [False, True], ids=["logits", "linear"])
@pytest.mark.parametrize("soft", [False, True], ids=["int", "probs"])
def test_traced_soft_cap_not_positive(reduction, linear, soft):
    # cap · tanh(z / cap) is even in cap: a traced -2 passed as 2 (a finite,
    # plausible loss) and 0 as a constant 0 loss with zero gradients; an
    # infinite cap is refused when concrete (inf · tanh(z / inf) is NaN).
    def make(target):
        if linear:
            return lambda x, w, c: jxent.linear_cross_entropy(
                x, w, target, soft_cap=c, reduction=reduction, chunk_size=4
            )
        return lambda x, c: jxent.cross_entropy(
            x, target, soft_cap=c, reduction=reduction
        )

    args = (X, W) if linear else (LOGITS,)
    fn = make(jax.nn.softmax(LOGITS[::-1]) if soft else TARGET)
    for cap in (-2.0, 0.0, float("nan"), float("inf"), -float("inf")):
        _check(fn, (*args, jnp.float32(cap)), reduction, rows=tuple(range(N)))
    value_fn, grad_fn, _ = _programs(fn, len(args) + 1)
    assert np.isfinite(value_fn(*args, jnp.float32(2.0))).all()
    assert all(np.isfinite(g).all() for g in grad_fn(*args, jnp.float32(2.0)))
    if not soft:  # an ignored position's loss is NaN too, as for a bad smoothing
        ignored = jax.jit(make(TARGET.at[1].set(-100)))(*args, jnp.float32(-2.0))
        assert np.isnan(ignored).all(), ignored


def test_linear_heads_traced_soft_cap_not_positive():
    target = TARGET.at[1].set(-100)  # an ignored position is NaN too
    fn = lambda x, w, c: jnp.stack(
        jxent.linear_log_probs(x, w, target, soft_cap=c, return_entropy=True)
    )
    for cap in (-2.0, 0.0, float("inf")):
        values = jax.jit(fn)(X, W, jnp.float32(cap))
        assert np.isnan(values).all(), values
        grads = jax.jit(jax.grad(lambda *a: jnp.sum(fn(*a)), (0, 1, 2)))(
            X, W, jnp.float32(cap)
        )
        assert all(np.isnan(g).all() for g in grads), grads
        # The index of a NaN logit, as jnp.argmax of NaN logits: never the
        # argmax of |cap| · tanh(z / |cap|).
        greedy = jax.jit(lambda c: jxent.linear_argmax(X, W, soft_cap=c))(cap)
        assert (np.asarray(greedy) == 0).all(), greedy
    assert np.isfinite(jax.jit(fn)(X, W, jnp.float32(2.0))).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_loss_traced_negative_gamma(reduction):
    # Refused when concrete; traced, -1 gave a finite, plausible loss.
    target = (LOGITS > 0).astype(jnp.float32)
    fn = lambda x, a, g: jxent.sigmoid_focal_loss(
        x, target, alpha=a, gamma=g, reduction=reduction
    )
    for gamma in (-1.0, -1e-3):
        _check(fn, (LOGITS, jnp.float32(0.25), jnp.float32(gamma)), reduction,
               rows=tuple(range(N)), dense_rows=True)  # fmt: skip
    value_fn, grad_fn, _ = _programs(fn, 3)
    assert np.isfinite(value_fn(LOGITS, jnp.float32(0.25), jnp.float32(0.0))).all()
    grads = grad_fn(LOGITS, jnp.float32(0.25), jnp.float32(2.0))
    assert all(np.isfinite(g).all() for g in grads)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_sigmoid_focal_loss_target_outside_unit_interval(reduction):
    # torchvision extends its formula (a finite number); jxent's 1 - p_t may
    # be negative there: NaN (README), also for a target rounded past 1.
    fn = lambda x, t: jxent.sigmoid_focal_loss(x, t, reduction=reduction)
    soft = jax.nn.sigmoid(LOGITS[::-1])
    for bad in (1.0000001, 2.0, -0.5):
        _check(fn, (LOGITS, soft.at[BAD_ROW, 2].set(bad)), reduction)
    assert np.isfinite(_programs(fn, 2)[1](LOGITS, soft)[0]).all()


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_probability_outside_unit_interval(reduction):
    probs = jax.nn.sigmoid(LOGITS).at[BAD_ROW, 2].set(1.25)
    target = (LOGITS > 0).astype(jnp.float32)
    fn = lambda p, t: jxent.binary_cross_entropy(p, t, reduction=reduction)
    with pytest.raises(ValueError, match="probs"):
        fn(probs, target)  # concrete: refused
    _check(fn, (probs, target), reduction)


@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_binary_cross_entropy_target_outside_unit_interval(reduction):
    # torch raises; the formula would give a plausible number (a negative
    # loss at t = 1.5, p = 0.5 would even lower the mean).
    probs = jax.nn.sigmoid(LOGITS)
    fn = lambda p, t: jxent.binary_cross_entropy(p, t, reduction=reduction)
    for bad in (1.5, -0.5):
        target = (LOGITS > 0).astype(jnp.float32).at[BAD_ROW, 2].set(bad)
        with pytest.raises(ValueError, match=r"`target` must hold .*clip soft"):
            fn(probs, target)  # concrete: refused
        _check(fn, (probs, target), reduction)


@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum", "mean"])
def test_kl_div_negative_target(reduction):
    target = jax.nn.softmax(LOGITS[::-1]).at[BAD_ROW, 1].set(-0.1)
    fn = lambda lp, t: jxent.kl_div(lp, t, reduction=reduction)
    _check(fn, (jax.nn.log_softmax(LOGITS), target), reduction)


def test_entropy_negative_probability():
    probs = jax.nn.softmax(LOGITS).at[BAD_ROW, 1].set(-0.1)
    _check(jxent.entropy, (probs,), "none")


def test_module_built_with_a_traced_bad_label_smoothing():
    def fn(x, e):
        return jxent.CrossEntropyLoss(CLASS_WEIGHT, label_smoothing=e)(x, TARGET)

    _check(fn, (LOGITS, jnp.float32(2.0)), "mean", rows=tuple(range(N)))


@functools.cache
def _guarded_step():
    optimizer = optax.apply_if_finite(optax.sgd(0.1), max_consecutive_errors=5)

    def loss(params, target):
        return jxent.linear_cross_entropy(X, params["w"], target, chunk_size=2)

    @jax.jit
    def step(params, state, target):
        grads = jax.grad(loss)(params, target)
        updates, state = optimizer.update(grads, state, params)
        return optax.apply_updates(params, updates), state

    return optimizer, step


def test_apply_if_finite_skips_a_step_with_a_bad_target():
    optimizer, step = _guarded_step()
    params = {"w": W}
    state = optimizer.init(params)
    skipped, state = step(params, state, _bad_target(7))
    np.testing.assert_array_equal(skipped["w"], W)
    assert int(state.notfinite_count) == 1
    taken, _ = step(params, state, TARGET)
    assert not np.array_equal(taken["w"], W)


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss", "linear"])
def test_bad_target_with_a_zero_mean_denominator_is_still_nan(name):
    # All-zero class weights make the mean's denominator 0 (a good batch gives
    # 0.0 with zero gradients); a bad target must not vanish into that 0.
    if name == "linear":
        loss = lambda x, w, t: jxent.linear_cross_entropy(X, x, t, w, chunk_size=4)
        first = W
    else:
        fn = jxent.cross_entropy if name == "cross_entropy" else jxent.nll_loss
        loss = lambda x, w, t: fn(x, t, w)
        first = LOGITS
    zeros = jnp.zeros(C)
    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        first, zeros, TARGET
    )
    assert value == 0.0
    assert all(np.all(np.asarray(g) == 0.0) for g in grads[:1])
    _check(loss, (first, zeros), "mean", data=(_bad_target(7),))


def _nan_under_zero_coefficient(loss, reduction):
    """``(fn, args, data)``: NaN data where a zero coefficient multiplies it."""
    row, cls = BAD_ROW, int(TARGET[BAD_ROW])
    zero_at_target = CLASS_WEIGHT.at[cls].set(0.0)
    if loss == "cross_entropy":  # a NaN logit, the target class weighted 0
        x = LOGITS.at[row, (cls + 1) % C].set(jnp.nan)
        fn = lambda x, w, t: jxent.cross_entropy(x, t, w, reduction=reduction)
        return fn, (x, zero_at_target), (TARGET,)
    if loss == "nll_loss":  # a NaN log-probability at a target weighted 0
        lp = jax.nn.log_softmax(LOGITS).at[row, cls].set(jnp.nan)
        fn = lambda lp, w, t: jxent.nll_loss(lp, t, w, reduction=reduction)
        return fn, (lp, zero_at_target), (TARGET,)
    if loss.startswith("kl_div"):  # NaN or +inf log q where p = 0
        p = jax.nn.softmax(LOGITS).at[row, 0].set(0.0)
        bad = jnp.nan if loss == "kl_div_nan" else jnp.inf
        log_q = jax.nn.log_softmax(LOGITS.T).T.at[row, 0].set(bad)
        return (lambda q, p: jxent.kl_div(q, p, reduction=reduction)), (log_q, p), ()
    # BCE with logits: a NaN logit, target 1, pos_weight 0 there
    t = jnp.zeros((N, C)).at[row, 1].set(1.0)
    x = LOGITS.at[row, 1].set(jnp.nan)
    pw = jnp.ones(C).at[1].set(0.0)

    def fn(x, pw, t):
        return jxent.binary_cross_entropy_with_logits(
            x, t, pos_weight=pw, reduction=reduction
        )

    return fn, (x, pw), (t,)


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize(
    "loss", ["cross_entropy", "nll_loss", "kl_div_nan", "kl_div_inf", "bce"]
)
def test_nan_data_under_a_zero_coefficient_poisons(loss, reduction):
    """NaN data times a zero class weight, target probability or pos_weight:
    torch's value is NaN (0 · NaN); jxent dropped the term (a finite loss,
    and for nll_loss and kl_div finite gradients too), since a zero
    coefficient absorbed any non-finite value, not only an infinite one."""
    fn, args, data = _nan_under_zero_coefficient(loss, reduction)
    value_fn, grad_fn, jvp_fn = _programs(fn, len(args))
    values = np.asarray(value_fn(*args, *data))
    # NaN where torch's is; the bad row's gradient w.r.t. the data is NaN
    # (NaN data: the other rows' stay as torch's, finite); a NaN tangent.
    assert np.isnan(values[BAD_ROW] if reduction == "none" else values).any()
    if reduction == "none":
        good = np.delete(values, BAD_ROW, axis=0)
        assert np.isfinite(good).all(), values
    if loss == "nll_loss":
        return  # its gradient, -w at the target, does not read the input: torch's
    grads = grad_fn(*args, *data)
    assert np.isnan(np.asarray(grads[0])[BAD_ROW]).any(), grads[0]
    assert np.isnan(np.asarray(jvp_fn(args, data)[1])).any()


@pytest.mark.parametrize("reduction", ["sum", "mean"])
def test_nll_loss_ignored_rows_with_nan_or_minus_inf_leave_weight_gradients(
    reduction,
):
    """Ignored rows holding NaN or -inf log-probabilities add nothing: the
    gradient w.r.t. the class weights is the float64 formula's on the other
    rows (their picks met a zero cotangent as 0 · NaN). Reverse and forward."""
    lp = np.asarray(jax.nn.log_softmax(LOGITS), np.float64)
    t = np.asarray(TARGET).copy()
    t[[1, 4]] = -100
    bad = lp.copy()
    bad[1, t[0]], bad[4, :] = np.nan, -np.inf
    w = np.asarray(CLASS_WEIGHT, np.float64)
    keep = t != -100
    picked = lp[np.arange(N), np.where(keep, t, 0)] * keep
    count = np.array([np.sum(keep & (t == c)) for c in range(C)])
    d_sum = np.array([-np.sum(picked * (t == c)) for c in range(C)])
    if reduction == "sum":
        want = d_sum
    else:
        total, denominator = -np.sum(picked * w[np.where(keep, t, 0)]), w @ count
        want = (d_sum * denominator - total * count) / denominator**2
    fn = lambda w: jxent.nll_loss(bad.astype(np.float32), t, w, reduction=reduction)
    got = jax.jit(jax.grad(fn))(jnp.asarray(w, jnp.float32))
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    _, tangent = jax.jit(lambda w: jax.jvp(fn, (w,), (jnp.ones_like(w),)))(
        jnp.asarray(w, jnp.float32)
    )
    np.testing.assert_allclose(tangent, np.sum(want), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("bad", [np.nan, -0.25], ids=["nan", "negative"])
def test_entropy_of_a_bad_probability_is_nan_with_nan_gradients(bad):
    # xlogx's NaN for p outside [0, ∞) is made of the data (0 · (0 / 0) where
    # bad): a flag that missed NaN p gave entropy log 2 for [0.5, NaN, 0.5].
    probs = jnp.array([[0.5, bad, 0.5], [0.2, 0.3, 0.5]], jnp.float32)
    value = jax.jit(jxent.entropy)(probs)
    grad = jax.jit(jax.grad(lambda p: jnp.sum(jxent.entropy(p))))(probs)
    assert np.isnan(value[0]) and np.isfinite(value[1])
    assert np.all(np.isnan(grad[0, 1]))
    _, tangent = jax.jvp(jxent.entropy, (probs,), (jnp.ones_like(probs),))
    assert np.isnan(tangent[0])
