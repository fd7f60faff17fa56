"""The public API, transformations (jit, vmap, grad) and retracing."""

from __future__ import annotations

import inspect

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import maybe_jit

import jxent

EXPECTED_API = {
    "BCELoss",
    "BCEWithLogitsLoss",
    "CrossEntropyLoss",
    "KLDivLoss",
    "KLReduction",
    "NLLLoss",
    "Reduction",
    "binary_cross_entropy",
    "binary_cross_entropy_with_logits",
    "check_target",
    "cross_entropy",
    "distillation_loss",
    "entropy",
    "kl_div",
    "linear_argmax",
    "linear_cross_entropy",
    "linear_distillation_loss",
    "linear_log_probs",
    "log_probs",
    "log_softmax",
    "nll_loss",
    "sigmoid_focal_loss",
    "softmax",
}

TYPE_ALIASES = {"Reduction", "KLReduction"}  # documented in jxent/_types.py


def test_public_api():
    assert set(jxent.__all__) == EXPECTED_API
    for name in set(jxent.__all__) - TYPE_ALIASES:
        assert getattr(jxent, name).__doc__


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_options_keyword_only_except_weight(name):
    params = inspect.signature(getattr(jxent, name)).parameters
    assert params["weight"].kind is inspect.Parameter.POSITIONAL_OR_KEYWORD
    assert list(params)[2] == "weight"
    for option in ("ignore_index", "reduction", "axis"):
        assert params[option].kind is inspect.Parameter.KEYWORD_ONLY
    assert params["ignore_index"].default == -100
    assert params["reduction"].default == "mean"
    assert params["axis"].default == -1


def test_weight_may_be_third_positional_argument():
    x = jnp.array([[1.0, 2.0, 0.5], [0.1, -1.0, 2.0]])
    t = jnp.array([1, 2])
    w = jnp.array([1.0, 3.0, 0.5])
    assert jxent.cross_entropy(x, t, w) == jxent.cross_entropy(x, t, weight=w)
    lp = jxent.log_softmax(x)
    assert jxent.nll_loss(lp, t, w) == jxent.nll_loss(lp, t, weight=w)


# N=4 examples, D=3 positions each, C=5 classes.
X_LAST = jnp.asarray(np.random.default_rng(0).normal(size=(4, 3, 5)), jnp.float32)
X_AXIS1 = jnp.moveaxis(X_LAST, 2, 1)  # (N, C, D): torch's layout
T = jnp.array([[0, 1, -100], [4, 4, 0], [3, -100, 0], [1, 2, 4]])
W = jnp.array([1.0, 2.0, 0.5, 1.5, 0.25])


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_jit_equals_eager_and_layouts_agree(jit_mode, reduction):
    def total(x, w, eps, axis):
        loss = jxent.cross_entropy(
            x, T, w, reduction=reduction, label_smoothing=eps, axis=axis
        )
        return jnp.sum(loss * jnp.arange(1.0, loss.size + 1.0).reshape(loss.shape))

    value, grad = maybe_jit(
        jax.value_and_grad(lambda x, w, eps: total(x, w, eps, 1)), jit_mode
    )(X_AXIS1, W, 0.1)
    ref_value, ref_grad = jax.jit(
        jax.value_and_grad(lambda x, w, eps: total(x, w, eps, -1))
    )(X_LAST, W, 0.1)
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(jnp.moveaxis(grad, 1, 2), ref_grad, rtol=1e-6, atol=1e-7)


def test_vmap_over_batch_equals_direct_call():
    per_example = jax.vmap(
        lambda x, t: jxent.cross_entropy(
            x, t, W, label_smoothing=0.1, axis=0, reduction="none"
        )
    )
    direct = jxent.cross_entropy(
        X_AXIS1, T, W, label_smoothing=0.1, axis=1, reduction="none"
    )
    np.testing.assert_allclose(per_example(X_AXIS1, T), direct, rtol=1e-6)


def test_vmap_of_mean_is_per_example_mean():
    per_row = jax.vmap(lambda x, t: jxent.cross_entropy(x, t, W))(X_LAST, T)
    for i in range(4):
        np.testing.assert_allclose(
            per_row[i], jxent.cross_entropy(X_LAST[i], T[i], W), rtol=1e-6
        )


def test_grad_of_vmapped_loss():
    def loss(x):
        per = jax.vmap(lambda xi, ti: jxent.cross_entropy(xi, ti, reduction="sum"))
        return jnp.sum(per(x, T))

    np.testing.assert_allclose(
        jax.grad(loss)(X_LAST),
        jax.grad(lambda x: jxent.cross_entropy(x, T, reduction="sum"))(X_LAST),
        rtol=1e-6,
        atol=1e-7,
    )


def test_no_retrace_when_weight_or_smoothing_values_change():
    traces = []

    @jax.jit
    def step(x, w, eps):
        traces.append(1)
        return jxent.cross_entropy(x, T, w, label_smoothing=eps, axis=1)

    for w, eps in ((W, 0.1), (W * 2, 0.2), (W + 1, 0.0), (W, 0.3)):
        step(X_AXIS1, w, eps)
    assert len(traces) == 1


def test_public_functions_do_not_recompile_for_new_values():
    jxent.cross_entropy(X_LAST, T, W, label_smoothing=0.1)
    impl = jxent._classification._hard_cross_entropy
    before = impl._cache_size()
    jxent.cross_entropy(X_LAST, T, W * 3, label_smoothing=0.2)
    jxent.cross_entropy(X_LAST, T, W + 1, label_smoothing=0.7)
    assert impl._cache_size() == before
    # A concrete 0 leaves the term out (README): one more program, once.
    # (A shape of its own: no other test has compiled its programs.)
    x, t, w = jnp.ones((7, 13)), jnp.arange(7), jnp.ones(13)
    jxent.cross_entropy(x, t, w, label_smoothing=0.1)
    first = impl._cache_size()
    jxent.cross_entropy(x, t, w * 2, label_smoothing=0.3)
    jxent.cross_entropy(x, t, w, label_smoothing=0.0)
    jxent.cross_entropy(x, t, w * 2, label_smoothing=0)
    assert impl._cache_size() == first + 1


def test_grad_with_respect_to_weight_and_smoothing():
    def loss(w, eps):
        return jxent.cross_entropy(X_LAST, T, w, label_smoothing=eps)

    gw, geps = jax.grad(loss, argnums=(0, 1))(W, 0.1)
    delta = 1e-3
    for i in range(5):
        e = jnp.zeros(5).at[i].set(delta)
        fd = (loss(W + e, 0.1) - loss(W - e, 0.1)) / (2 * delta)
        np.testing.assert_allclose(gw[i], fd, rtol=2e-2, atol=1e-4)
    fd = (loss(W, 0.1 + delta) - loss(W, 0.1 - delta)) / (2 * delta)
    np.testing.assert_allclose(geps, fd, rtol=2e-2)


def test_check_grads_numerically():
    from jax.test_util import check_grads

    with jax.enable_x64(True):
        x = jnp.asarray(np.random.default_rng(1).normal(size=(3, 4)))
        t = jnp.array([0, 3, -100])
        w = jnp.array([1.0, 2.0, 0.5, 1.5])
        check_grads(
            lambda x: jxent.cross_entropy(x, t, w, label_smoothing=0.3),
            (x,),
            order=2,
            modes=["rev"],
        )
