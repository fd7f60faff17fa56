"""Binary losses: bad input, modules as pytrees, optax, properties, OpInfo samples."""

from __future__ import annotations

import functools
import inspect
import re

import hypothesis.extra.numpy as hnp
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

import jxent

X = jnp.array([[1.5, -2.0, 0.3], [0.0, 4.0, -1.0]])
T = jnp.array([[1.0, 0.0, 0.5], [0.0, 1.0, 1.0]])
P = jax.nn.sigmoid(X)
W = jnp.array([0.5, 1.0, 2.0])


def test_signatures():
    for fn in (jxent.binary_cross_entropy, jxent.binary_cross_entropy_with_logits):
        params = inspect.signature(fn).parameters
        assert list(params)[2] == "weight"
        assert params["weight"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
        assert params["reduction"].kind is inspect.Parameter.KEYWORD_ONLY
        assert params["reduction"].default == "mean"
    params = inspect.signature(jxent.binary_cross_entropy_with_logits).parameters
    assert params["pos_weight"].kind is inspect.Parameter.KEYWORD_ONLY
    params = inspect.signature(jxent.sigmoid_focal_loss).parameters
    defaults = {k: params[k].default for k in ("alpha", "gamma", "reduction")}
    assert defaults == {"alpha": 0.25, "gamma": 2.0, "reduction": "none"}


# --- bad input ----------------------------------------------------------------


@pytest.mark.parametrize("bad", [1.5, -0.25, float("nan")])
def test_concrete_probs_outside_unit_interval_raise(bad):
    probs = P.at[1, 2].set(bad)
    with pytest.raises(
        ValueError, match=r"`probs` must hold probabilities in \[0, 1\]"
    ):
        jxent.binary_cross_entropy(probs, T)
    with pytest.raises(ValueError, match="probabilities"):
        jxent.BCELoss()(probs, T)


def test_concrete_probs_of_exactly_zero_and_one_are_accepted():
    # torch's clamp at -100: a finite loss (eagerly, through the concrete check).
    probs = jnp.array([0.0, 1.0, 0.0, 1.0])
    target = jnp.array([0.0, 1.0, 1.0, 0.0])
    loss = jxent.binary_cross_entropy(probs, target, reduction="none")
    np.testing.assert_array_equal(loss, [0.0, 0.0, 100.0, 100.0])
    np.testing.assert_array_equal(jxent.BCELoss(reduction="sum")(probs, target), 200.0)


def test_traced_probs_outside_unit_interval_give_nan():
    probs = P.at[1, 2].set(1.5).at[0, 0].set(-1e-3)
    f = jax.jit(functools.partial(jxent.binary_cross_entropy, reduction="none"))
    loss = np.asarray(f(probs, T))
    bad = np.zeros(loss.shape, bool)
    bad[1, 2] = bad[0, 0] = True
    assert np.isnan(loss[bad]).all()
    assert np.isfinite(loss[~bad]).all()
    assert np.isnan(jax.jit(jxent.binary_cross_entropy)(probs, T))
    # "mean": every derivative is NaN (a finite-check rejects the step);
    # "none": the bad elements' only.
    grad = jax.jit(jax.grad(lambda p: jxent.binary_cross_entropy(p, T)))(probs)
    assert np.isnan(np.asarray(grad)).all()
    grad = jax.jit(
        jax.grad(lambda p: jxent.binary_cross_entropy(p, T, reduction="none").sum())
    )(probs)
    assert np.isnan(np.asarray(grad)[bad]).all()
    assert np.isfinite(np.asarray(grad)[~bad]).all()


@pytest.mark.parametrize(
    "fn",
    [
        jxent.binary_cross_entropy,
        jxent.binary_cross_entropy_with_logits,
        jxent.sigmoid_focal_loss,
        jxent.BCELoss(),
        jxent.BCEWithLogitsLoss(),
    ],
    ids=["bce", "bce_logits", "focal", "BCELoss", "BCEWithLogitsLoss"],
)
def test_target_shape_mismatch_names_both_shapes(fn):
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3,\)"):
        fn(P, T[0])
    with pytest.raises(ValueError, match=r"\(2, 3\).*\(3, 2\)"):
        fn(P, T.T)
    with pytest.raises(TypeError, match="floating"):
        fn(jnp.array([[1, 0, 1]]), jnp.array([[1, 0, 1]]))
    with pytest.raises(TypeError, match="`target`"):
        fn(P, T.astype(jnp.complex64))


@pytest.mark.parametrize("name", ["weight", "pos_weight"])
@pytest.mark.parametrize("shape", [(2,), (4, 3), (2, 2, 3), (3, 2)])
def test_weights_that_do_not_broadcast_raise(name, shape):
    bad = jnp.ones(shape)
    kwargs = {name: bad}
    with pytest.raises(
        ValueError, match=rf"`{name}` of shape {re.escape(str(shape))}.*\(2, 3\)"
    ):
        jxent.binary_cross_entropy_with_logits(X, T, **kwargs)
    with pytest.raises(ValueError, match=rf"`{name}` of shape"):
        jxent.BCEWithLogitsLoss(**kwargs)(X, T)
    if name == "weight":
        with pytest.raises(ValueError, match=r"`weight` of shape"):
            jxent.binary_cross_entropy(P, T, bad)


def test_bad_options_raise():
    with pytest.raises(ValueError, match="`gamma` must be >= 0"):
        jxent.sigmoid_focal_loss(X, T, gamma=-0.5)
    with pytest.raises(ValueError, match="`gamma` must be a real scalar"):
        jxent.sigmoid_focal_loss(X, T, gamma=jnp.ones(2))
    with pytest.raises(ValueError, match="`alpha` must be a real scalar"):
        jxent.sigmoid_focal_loss(X, T, alpha=[0.25, 0.5])
    for fn in (
        jxent.binary_cross_entropy,
        jxent.binary_cross_entropy_with_logits,
        jxent.sigmoid_focal_loss,
    ):
        with pytest.raises(ValueError, match="`reduction` must be one of"):
            fn(P, T, reduction="batchmean")
    for cls in (jxent.BCELoss, jxent.BCEWithLogitsLoss):
        with pytest.raises(ValueError, match="`reduction` must be one of"):
            cls(reduction="avg")
    with pytest.raises(TypeError, match="`pos_weight` must be a real"):
        jxent.binary_cross_entropy_with_logits(X, T, pos_weight=W.astype(jnp.complex64))


# --- modules ------------------------------------------------------------------

MODULE_CASES = [
    (jxent.BCELoss, {}, jxent.binary_cross_entropy, P),
    (jxent.BCELoss, {"reduction": "none"}, jxent.binary_cross_entropy, P),
    (jxent.BCEWithLogitsLoss, {}, jxent.binary_cross_entropy_with_logits, X),
    (
        jxent.BCEWithLogitsLoss,
        {"reduction": "sum", "pos_weight": 2.0 * W},
        jxent.binary_cross_entropy_with_logits,
        X,
    ),
]


@pytest.mark.parametrize(("cls", "kwargs", "fn", "x"), MODULE_CASES)
def test_module_equals_functional(cls, kwargs, fn, x):
    for weight in (None, W):
        module = cls(weight, **kwargs)
        np.testing.assert_array_equal(module(x, T), fn(x, T, weight, **kwargs))
        assert cls(weight=weight, **kwargs) == module
        assert hash(cls(weight=weight, **kwargs)) == hash(module)


def test_modules_are_pytrees_with_buffers():
    eqx = pytest.importorskip("equinox")
    loss = jxent.BCEWithLogitsLoss(W, pos_weight=2.0 * W, reduction="sum")
    # Concrete weight and pos_weight are buffers: in the treedef, not leaves.
    leaves, treedef = jax.tree.flatten(loss)
    assert leaves == []
    assert jax.tree.unflatten(treedef, []) == loss
    params, static = eqx.partition(loss, eqx.is_array)
    assert eqx.combine(params, static) == loss
    bce = jxent.BCELoss(W)
    assert eqx.combine(*eqx.partition(bce, eqx.is_array)) == bce

    traces = []

    @jax.jit
    def apply(loss_fn, x):
        traces.append(None)
        return loss_fn(x, T)

    np.testing.assert_allclose(apply(loss, X), loss(X, T), rtol=1e-6)
    same = jxent.BCEWithLogitsLoss(np.asarray(W), pos_weight=2.0 * W, reduction="sum")
    np.testing.assert_allclose(apply(same, X), loss(X, T), rtol=1e-6)
    assert len(traces) == 1  # equal buffers reuse the program
    other = jxent.BCEWithLogitsLoss(2.0 * W, pos_weight=W, reduction="sum")
    np.testing.assert_allclose(apply(other, X), other(X, T), rtol=1e-6)
    assert len(traces) == 2

    # Built from traced values (inside a transform), they are leaves: tree.map
    # with any placeholder never validates, and gradients flow to them.
    def built(w, pw):
        module = jxent.BCEWithLogitsLoss(w, pos_weight=pw, reduction="sum")
        leaves, treedef = jax.tree.flatten(module)
        assert len(leaves) == 2
        flags = jax.tree.map(lambda x: x is not None, module)
        assert flags.weight is True and flags.pos_weight is True
        assert flags.reduction == "sum"
        assert jax.tree.unflatten(treedef, [object(), "x"]).pos_weight == "x"
        return module(X, T)

    grads = jax.grad(built, argnums=(0, 1))(W, 2.0 * W)
    expected = jax.grad(
        lambda w, pw: jxent.binary_cross_entropy_with_logits(
            X, T, w, pos_weight=pw, reduction="sum"
        ),
        argnums=(0, 1),
    )(W, 2.0 * W)
    np.testing.assert_allclose(grads[0], expected[0], rtol=1e-6)
    np.testing.assert_allclose(grads[1], expected[1], rtol=1e-6)


def test_module_is_a_static_argument_when_concrete():
    @functools.partial(jax.jit, static_argnums=0)
    def apply(loss_fn, x):
        return loss_fn(x, T)

    loss = jxent.BCEWithLogitsLoss(pos_weight=W)
    np.testing.assert_allclose(apply(loss, X), loss(X, T), rtol=1e-6)


# --- optax where it overlaps --------------------------------------------------


def _grad_of(fn):
    ct = jnp.arange(1.0, 7.0).reshape(2, 3)
    return jax.grad(lambda x: jnp.sum(fn(x) * ct))(X * 3.0)


def test_matches_optax_sigmoid_binary_cross_entropy():
    ours = lambda x: jxent.binary_cross_entropy_with_logits(x, T, reduction="none")
    theirs = lambda x: optax.sigmoid_binary_cross_entropy(x, T)
    np.testing.assert_allclose(ours(X * 3.0), theirs(X * 3.0), rtol=1e-6)
    np.testing.assert_allclose(_grad_of(ours), _grad_of(theirs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize(("alpha", "optax_alpha"), [(0.25, 0.25), (-1.0, None)])
@pytest.mark.parametrize("gamma", [0.0, 2.0, 3.0])
def test_matches_optax_sigmoid_focal_loss(alpha, optax_alpha, gamma):
    hard = jnp.round(T)  # optax's (1 - p_t) is not exact for soft targets

    def ours(x):
        return jxent.sigmoid_focal_loss(x, hard, alpha=alpha, gamma=gamma)

    def theirs(x):
        return optax.sigmoid_focal_loss(x, hard, alpha=optax_alpha, gamma=gamma)

    np.testing.assert_allclose(ours(X * 3.0), theirs(X * 3.0), rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(_grad_of(ours), _grad_of(theirs), rtol=1e-4, atol=1e-6)


# --- properties ---------------------------------------------------------------

SETTINGS = settings(max_examples=25, deadline=None)
LOGITS = st.sampled_from([1e4, -1e4, 1e30, -1e30, 30.0, -30.0]) | st.floats(
    -20.0, 20.0, width=32
)
SHAPE = (3, 4)


@jax.jit
def _symmetry_terms(x, t, pw):
    loss = functools.partial(jxent.binary_cross_entropy_with_logits, reduction="none")
    return (
        loss(x, t),
        loss(-x, 1.0 - t),
        loss(x, t, pos_weight=jnp.ones_like(pw)),
        loss(x, t, pos_weight=pw),
        jxent.sigmoid_focal_loss(x, t, alpha=-1.0, gamma=0.0),
        jax.grad(lambda x: jnp.sum(loss(x, t)))(x),
        jax.grad(lambda x: jnp.sum(loss(-x, 1.0 - t)))(x),
    )


# Multiples of 1/64, so that 1 - (1 - t) == t exactly in float32.
TARGETS = st.integers(0, 64).map(lambda k: k / 64)


@SETTINGS
@given(
    x=hnp.arrays(np.float32, SHAPE, elements=LOGITS),
    t=hnp.arrays(np.float32, SHAPE, elements=TARGETS),
    pw=hnp.arrays(np.float32, (4,), elements=st.floats(0.125, 5.0, width=32)),
)
def test_properties(x, t, pw):
    terms = [np.asarray(a) for a in _symmetry_terms(x, t, pw)]
    plain, mirrored, unit_pw, weighted, focal, grad, mirrored_grad = terms
    # BCE(x, t) = BCE(-x, 1 - t), gradients mirrored.
    np.testing.assert_allclose(plain, mirrored, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(grad, mirrored_grad, rtol=1e-6, atol=1e-7)
    # pos_weight = 1 is the plain loss; the focal loss with gamma 0, no alpha too.
    np.testing.assert_array_equal(unit_pw, plain)
    np.testing.assert_array_equal(focal, plain)
    # pos_weight scales the positive term only: between the two extremes.
    lo, hi = np.minimum(pw, 1.0), np.maximum(pw, 1.0)
    assert (weighted >= plain * lo * (1 - 1e-6)).all()
    assert (weighted <= plain * hi * (1 + 1e-6)).all()
    assert (plain >= 0).all()


@SETTINGS
@given(
    x=hnp.arrays(np.float32, SHAPE, elements=st.floats(-12.0, 12.0, width=32)),
    t=hnp.arrays(np.float32, SHAPE, elements=st.floats(0.0, 1.0, width=32)),
)
def test_probs_agree_with_logits(x, t):
    with jax.enable_x64(True):
        x64 = jnp.asarray(x, jnp.float64)
        from_probs = jxent.binary_cross_entropy(
            jax.nn.sigmoid(x64), t, reduction="none"
        )
        from_logits = jxent.binary_cross_entropy_with_logits(x64, t, reduction="none")
    np.testing.assert_allclose(from_probs, from_logits, rtol=1e-9, atol=1e-12)


def test_scan_checkpoint_and_equinox_model():
    eqx = pytest.importorskip("equinox")
    batches_x = jnp.stack([X, -X, 2.0 * X])
    batches_t = jnp.stack([T, 1.0 - T, T])
    loss_fn = jxent.BCEWithLogitsLoss(pos_weight=W)

    def total(scale):
        def step(carry, xt):
            x, t = xt
            return carry + jax.checkpoint(loss_fn)(scale * x, t), None

        return jax.lax.scan(step, 0.0, (batches_x, batches_t))[0]

    def direct(scale):
        return sum(
            loss_fn(scale * x, t) for x, t in zip(batches_x, batches_t, strict=True)
        )

    np.testing.assert_allclose(total(1.5), direct(1.5), rtol=1e-6)
    np.testing.assert_allclose(jax.grad(total)(1.5), jax.grad(direct)(1.5), rtol=1e-5)

    class Model(eqx.Module):
        scale: jax.Array
        loss: jxent.BCEWithLogitsLoss

        def __call__(self, x, t):
            return self.loss(self.scale * x, t)

    model = Model(jnp.array(1.5), loss_fn)
    grads = eqx.filter_jit(eqx.filter_grad(lambda m: m(X, T)))(model)
    expected = jax.grad(lambda s: loss_fn(s * X, T))(1.5)
    np.testing.assert_allclose(grads.scale, expected, rtol=1e-6)
    # pos_weight is a buffer: not a leaf, never differentiated or trained.
    assert jax.tree.leaves(grads.loss) == []
    assert grads.loss == loss_fn
