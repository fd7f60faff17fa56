"""optax as a second oracle, for the features it has."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent

RNG = np.random.default_rng(3)
LOGITS = jnp.asarray(RNG.normal(scale=2.0, size=(7, 6)), jnp.float32)
LABELS = jnp.asarray(RNG.integers(0, 6, size=7))
PROBS = jax.nn.softmax(jnp.asarray(RNG.normal(size=(7, 6)), jnp.float32))


def _grads(fn):
    return jax.grad(lambda x: jnp.sum(fn(x) * jnp.arange(1.0, 8.0)))(LOGITS)


def test_integer_labels_none_reduction():
    ours = lambda x: jxent.cross_entropy(x, LABELS, reduction="none")
    theirs = lambda x: optax.softmax_cross_entropy_with_integer_labels(x, LABELS)
    np.testing.assert_allclose(ours(LOGITS), theirs(LOGITS), rtol=1e-6)
    np.testing.assert_allclose(_grads(ours), _grads(theirs), rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("eps", [0.1, 0.5, 1.0])
def test_label_smoothing_matches_smooth_labels(eps):
    smoothed = optax.smooth_labels(jax.nn.one_hot(LABELS, 6), eps)
    ours = lambda x: jxent.cross_entropy(
        x, LABELS, reduction="none", label_smoothing=eps
    )
    theirs = lambda x: optax.softmax_cross_entropy(x, smoothed)
    np.testing.assert_allclose(ours(LOGITS), theirs(LOGITS), rtol=1e-6)
    np.testing.assert_allclose(_grads(ours), _grads(theirs), rtol=1e-5, atol=1e-6)


def test_probability_targets():
    ours = lambda x: jxent.cross_entropy(x, PROBS, reduction="none")
    theirs = lambda x: optax.softmax_cross_entropy(x, PROBS)
    np.testing.assert_allclose(ours(LOGITS), theirs(LOGITS), rtol=1e-6)
    np.testing.assert_allclose(_grads(ours), _grads(theirs), rtol=1e-5, atol=1e-7)


def test_probability_targets_with_smoothing():
    ours = jxent.cross_entropy(LOGITS, PROBS, reduction="none", label_smoothing=0.2)
    theirs = optax.softmax_cross_entropy(LOGITS, optax.smooth_labels(PROBS, 0.2))
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)


def test_mean_equals_optax_mean_without_weights():
    np.testing.assert_allclose(
        jxent.cross_entropy(LOGITS, LABELS),
        optax.softmax_cross_entropy_with_integer_labels(LOGITS, LABELS).mean(),
        rtol=1e-6,
    )


def test_class_axis_one_matches_optax_axis():
    x = jnp.moveaxis(LOGITS.reshape(7, 1, 6), -1, 1)  # (N, C, d1)
    labels = LABELS.reshape(7, 1)
    np.testing.assert_allclose(
        jxent.cross_entropy(x, labels, reduction="none", axis=1),
        optax.softmax_cross_entropy_with_integer_labels(x, labels, axis=1),
        rtol=1e-6,
    )


def test_negative_label_is_not_wrapped_unlike_optax():
    """optax maps label -1 to class C-1; jxent gives NaN under jit."""
    labels = LABELS.at[0].set(-1)
    theirs = optax.softmax_cross_entropy_with_integer_labels(LOGITS, labels)
    ours = jax.jit(lambda x, t: jxent.cross_entropy(x, t, reduction="none"))(
        LOGITS, labels
    )
    assert np.isfinite(theirs[0])
    assert np.isnan(ours[0])
    np.testing.assert_allclose(ours[1:], theirs[1:], rtol=1e-6)
