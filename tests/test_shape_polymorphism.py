"""``jax.export`` with symbolic shapes (shape polymorphism).

A program exported once for a symbolic batch (and class) size runs at any
concrete size. jxent's size heuristics (how to split wide rows on the CPU,
one-pass or shifted sums on accelerators, a product for large binary sums)
compare dimensions with constants; with a symbolic dimension they take their
general choice instead of raising. The exported programs (for the CPU and a
TPU, run on the CPU) are checked against torch in float64 at sizes other than
the one traced. The LM-head losses fix their chunk counts when traced: a
symbolic shape gets a ``ValueError`` that says so and names the logits
versions.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import export
from oracles import torch_binary_cross_entropy, torch_cross_entropy

import jxent

PLATFORMS = ("cpu", "tpu")


def _export(fn, args, specs):
    """``fn`` exported for ``PLATFORMS`` with ``args``' shapes made symbolic."""
    return export.export(jax.jit(fn), platforms=PLATFORMS)(
        *export.symbolic_args_specs(args, specs)
    )


@pytest.mark.parametrize("smoothing", [0.0, 0.1])
@pytest.mark.parametrize("specs", [("b, 16", "b", "16"), ("b, c", "b", "c")])
def test_cross_entropy_exports_for_any_batch_and_class_count(specs, smoothing):
    rng = np.random.default_rng(0)

    def inputs(n, c):
        logits = rng.normal(scale=3.0, size=(n, c)).astype(np.float32)
        target = rng.integers(0, c, size=n).astype(np.int32)
        target[0] = -100
        return logits, target, rng.uniform(0.5, 2.0, size=c).astype(np.float32)

    def loss(logits, target, weight):
        return jax.value_and_grad(
            lambda z: jxent.cross_entropy(z, target, weight, label_smoothing=smoothing)
        )(logits)

    exported = _export(loss, inputs(4, 16), specs)
    sizes = [(300, 16), (2, 16)] if specs[1] == "b" else [(300, 40), (2, 5000)]
    for n, c in sizes:
        logits, target, weight = inputs(n, c)
        value, d_logits = exported.call(logits, target, weight)
        want, want_grad = torch_cross_entropy(
            logits, target, weight, label_smoothing=smoothing
        )
        np.testing.assert_allclose(value, want, rtol=2e-6)
        np.testing.assert_allclose(d_logits, want_grad, rtol=2e-5, atol=1e-9)


def test_probability_targets_export_in_torchs_layout():
    rng = np.random.default_rng(1)

    def inputs(n, d):
        logits = rng.normal(size=(n, 7, d)).astype(np.float32)
        probs = rng.dirichlet(np.ones(7), size=(n, d)).astype(np.float32)
        return logits, np.moveaxis(probs, -1, 1)

    def loss(logits, probs):
        return jax.value_and_grad(
            lambda z: jxent.cross_entropy(z, probs, axis=1, label_smoothing=0.2)
        )(logits)

    exported = _export(loss, inputs(2, 3), ("b, 7, d", "b, 7, d"))
    logits, probs = inputs(5, 11)
    value, grad = exported.call(logits, probs)
    want, want_grad = torch_cross_entropy(logits, probs, axis=1, label_smoothing=0.2)
    np.testing.assert_allclose(value, want, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-9)


def test_binary_cross_entropy_with_logits_exports_for_any_class_count():
    rng = np.random.default_rng(2)

    def inputs(n, c):
        return (
            rng.normal(scale=2.0, size=(n, c)).astype(np.float32),
            rng.uniform(size=(n, c)).astype(np.float32),
        )

    def loss(x, t):
        return jax.value_and_grad(jxent.binary_cross_entropy_with_logits)(x, t)

    exported = _export(loss, inputs(2, 3), ("b, c", "b, c"))
    x, t = inputs(9, 130)  # wide enough for the CPU's product sum
    value, grad = exported.call(x, t)
    want, want_grads = torch_binary_cross_entropy(x, t, logits=True)
    np.testing.assert_allclose(value, want, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grads["input"], rtol=2e-5, atol=1e-10)


@pytest.mark.parametrize("weights", ["weight", "pos_weight", "both"])
def test_binary_losses_with_weights_export_for_any_batch(weights):
    # The weights' broadcast to the input's shape was checked with NumPy's
    # broadcast_shapes, which refuses a symbolic dimension (a raw TypeError).
    rng = np.random.default_rng(3)
    c = 7
    w = rng.uniform(0.5, 2.0, size=c).astype(np.float32)
    pw = rng.uniform(0.5, 3.0, size=c).astype(np.float32)
    options = {
        "weight": {"weight": w},
        "pos_weight": {"pos_weight": pw},
        "both": {"weight": w, "pos_weight": pw},
    }[weights]

    def inputs(n):
        return (
            rng.normal(scale=2.0, size=(n, c)).astype(np.float32),
            rng.uniform(size=(n, c)).astype(np.float32),
        )

    def loss(x, t):
        module = jxent.BCEWithLogitsLoss(**options)
        return jax.value_and_grad(module)(x, t)

    exported = _export(loss, inputs(2), ("b, 7", "b, 7"))
    x, t = inputs(9)
    value, grad = exported.call(x, t)
    want, want_grads = torch_binary_cross_entropy(x, t, **options, logits=True)
    np.testing.assert_allclose(value, want, rtol=2e-6)
    np.testing.assert_allclose(grad, want_grads["input"], rtol=2e-5, atol=1e-10)
    if "pos_weight" not in options:  # BCELoss takes the weight alone
        p = 1 / (1 + np.exp(-x.astype(np.float64)))
        exported = _export(
            lambda p, t: jax.value_and_grad(jxent.BCELoss(w))(p, t),
            (p[:2].astype(np.float32), t[:2]),
            ("b, 7", "b, 7"),
        )
        value, grad = exported.call(p.astype(np.float32), t)
        want, want_grads = torch_binary_cross_entropy(p.astype(np.float32), t, w)
        np.testing.assert_allclose(value, want, rtol=2e-6)
        np.testing.assert_allclose(grad, want_grads["input"], rtol=2e-5)


@pytest.mark.parametrize("mask_spec", ["7", "b, 7"])
def test_a_class_mask_exports_for_any_batch(mask_spec):
    # `where` was broadcast-checked with NumPy too: a symbolic batch failed
    # with a raw TypeError. Against float64 formulas on the kept classes.
    rng = np.random.default_rng(4)
    c = 7

    def inputs(n):
        logits = rng.normal(scale=3.0, size=(n, c)).astype(np.float32)
        mask = rng.uniform(size=(n, c) if "b" in mask_spec else (c,)) < 0.7
        mask[..., 2] = True
        target = np.full(n, 2, np.int32)
        return logits, target, mask

    def losses(logits, target, mask):
        def ce(z):
            return jxent.cross_entropy(z, target, where=mask)

        value, grad = jax.value_and_grad(ce)(logits)
        return value, grad, jxent.log_softmax(logits, where=mask)

    exported = _export(losses, inputs(2), ("b, 7", "b", mask_spec))
    logits, target, mask = inputs(6)
    value, grad, log_probs = exported.call(logits, target, mask)
    z = np.where(mask, logits.astype(np.float64), -np.inf)
    shifted = z - z.max(-1, keepdims=True)
    ref_log_probs = shifted - np.log(np.exp(shifted).sum(-1, keepdims=True))
    ref_value = -ref_log_probs[:, 2].mean()
    ref_grad = np.where(mask, np.exp(ref_log_probs), 0.0)
    ref_grad[:, 2] -= 1.0
    ref_grad /= len(target)
    np.testing.assert_allclose(value, ref_value, rtol=2e-6)
    np.testing.assert_allclose(grad, ref_grad, rtol=2e-5, atol=1e-9)
    kept = np.broadcast_to(mask, logits.shape)
    # (z - lse: float32 cancellation near 0 gives ~1e-7 absolute.)
    np.testing.assert_allclose(
        log_probs[kept], ref_log_probs[kept], rtol=2e-6, atol=2e-7
    )


@pytest.mark.parametrize(
    "name", ["linear_cross_entropy", "linear_log_probs", "linear_argmax"]
)
@pytest.mark.parametrize("symbolic", ["tokens", "vocabulary"])
def test_lm_head_losses_name_the_symbolic_shape(name, symbolic):
    x = np.zeros((12, 4), np.float32)
    w = np.zeros((4, 16), np.float32)
    target = np.zeros(12, np.int32)
    fn = getattr(jxent, name)

    def loss(x, w, target):
        return fn(x, w) if name == "linear_argmax" else fn(x, w, target)

    specs = ("b, 4", "4, 16", "b") if symbolic == "tokens" else ("12, 4", "4, v", "12")
    with pytest.raises(ValueError, match=r"known shapes.*x\.shape=.*w\.shape="):
        _export(loss, (x, w, target), specs)


def test_lm_head_distillation_names_the_symbolic_shape():
    x = jnp.zeros((12, 4), jnp.float32)
    w = jnp.zeros((4, 16), jnp.float32)

    def loss(x, w):
        return jxent.linear_distillation_loss(x, w, x, w)

    with pytest.raises(ValueError, match="cross_entropy, log_probs, distillation_loss"):
        _export(loss, (x, w), ("b, 4", "4, 16"))
