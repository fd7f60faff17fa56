"""Axis names inside ``jax.pmap`` and ``jax.shard_map(check_vma=False)``.

There JAX does not track which values are the same on every device, and it
transposes ``psum`` to ``psum``: the gradients of a loss summed over devices
count every device's copy (measured on 8 devices: 8x the true gradients, 64x
for the class-sharded ``w`` of ``linear_cross_entropy``). The values are
right. So values work and differentiating raises a ``ValueError`` over an
axis of several devices (``tests/multidevice/cases.py``, 8 devices). Here, on
one device: an axis of size 1 (whose ``psum`` is the identity) differentiates
exactly in every context; ``shard_map`` with ``check_vma=True`` (its default)
and a ``vmap`` with an axis name differentiated from outside are unaffected.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

import jxent

N, D, V = 8, 4, 6
_KEYS = jax.random.split(jax.random.PRNGKey(0), 3)
X = jax.random.normal(_KEYS[0], (N, D))
W = jax.random.normal(_KEYS[1], (D, V))
TEACHER_X = jax.random.normal(_KEYS[2], (N, D))
TARGET = jnp.array([0, 1, 2, 3, 4, 5, -100, 2])

LOSSES = {
    "cross_entropy": lambda x, w, axes: jxent.cross_entropy(
        x @ w, TARGET, label_smoothing=0.1, **axes
    ),
    "linear_cross_entropy": lambda x, w, axes: jxent.linear_cross_entropy(
        x, w, TARGET, **axes
    ),
    "linear_log_probs": lambda x, w, axes: jxent.linear_log_probs(
        x, w, TARGET, return_entropy=True, **axes
    )[1].sum(),
    "linear_distillation_loss": lambda x, w, axes: jxent.linear_distillation_loss(
        x, w, TEACHER_X, w * 0.5, TARGET, beta=0.5, **axes
    ),
}
AXES = ["class_axis_name", "batch_axis_name"]


def _in_untyped_context(context, f):
    """``f(x, w)`` on one device inside ``jax.pmap`` or an untyped shard_map."""
    if context == "pmap":
        return lambda x, w: jax.pmap(f, axis_name="a")(x[None], w[None])[0]
    mesh = Mesh(np.array(jax.devices()[:1]), ("a",))
    return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=(P(), P()), out_specs=P(), check_vma=False)
    )


@pytest.mark.parametrize("context", ["pmap", "shard_map(check_vma=False)"])
@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_axes_of_one_device_differentiate_in_any_context(name, axis, context):
    """Size 1: nothing is counted twice, so nothing is refused; the gradients
    equal the unsharded loss's (checked against torch and float64 elsewhere)."""
    loss = LOSSES[name]

    def grads(x, w):
        return jax.grad(lambda x, w: loss(x, w, {axis: "a"}), argnums=(0, 1))(x, w)

    if context == "pmap":
        got = jax.pmap(grads, axis_name="a")(X[None], W[None])
        got = [g[0] for g in got]
    else:
        mesh = Mesh(np.array(jax.devices()[:1]), ("a",))
        got = jax.jit(
            jax.shard_map(
                grads,
                mesh=mesh,
                in_specs=(P(), P()),
                out_specs=(P(), P()),
                check_vma=False,
            )
        )(X, W)
    expected = jax.grad(lambda x, w: loss(x, w, {}), argnums=(0, 1))(X, W)
    for g, want in zip(got, expected, strict=True):
        np.testing.assert_allclose(g, want, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("axis", AXES)
@pytest.mark.parametrize("name", list(LOSSES))
def test_typed_shard_map_differentiates(name, axis):
    """check_vma=True (the default): the gradients, against the unsharded
    loss's on one device (the 8-device cases check them against oracles)."""
    loss = LOSSES[name]
    mesh = Mesh(np.array(jax.devices()[:1]), ("a",))
    grads = jax.jit(
        jax.shard_map(
            jax.grad(lambda x, w: loss(x, w, {axis: "a"}), argnums=(0, 1)),
            mesh=mesh,
            in_specs=(P(), P()),
            out_specs=(P(), P()),
        )
    )(X, W)
    expected = jax.grad(lambda x, w: loss(x, w, {}), argnums=(0, 1))(X, W)
    for got, want in zip(grads, expected, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-7)


def test_vmap_axis_differentiated_from_outside_is_exact():
    """A ``vmap`` over 4 shards of the batch with ``batch_axis_name``,
    differentiated from outside: the float64 cross-entropy's gradient."""

    def total(logits):
        shards = logits.reshape(4, N // 4, V), TARGET.reshape(4, N // 4)
        per_shard = jax.vmap(
            lambda z, t: jxent.cross_entropy(z, t, batch_axis_name="b"),
            axis_name="b",
        )(*shards)
        return per_shard[0]

    logits = X @ W
    value, grad = jax.value_and_grad(total)(logits)
    z = np.asarray(logits, np.float64)
    t = np.asarray(TARGET)
    valid = t != -100
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    onehot = np.eye(V)[np.where(valid, t, 0)]
    expected = np.where(valid[:, None], p - onehot, 0.0) / valid.sum()
    nll = -np.log(p[np.arange(N), np.where(valid, t, 0)])
    np.testing.assert_allclose(value, nll[valid].mean(), rtol=1e-6)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)


def test_vmap_axis_over_class_shards_is_not_refused():
    """``class_axis_name`` naming a ``vmap`` axis over 3 slices of the
    classes, a class-weight slice each: JAX tracks no varying axes there, so
    nothing is refused as "not split like the classes"; the weighted
    cross-entropy and its gradient are the float64 formulas'."""
    weight = jnp.linspace(0.5, 2.0, V)

    def total(logits):
        shards = logits.reshape(N, 3, V // 3).transpose(1, 0, 2)
        per_shard = jax.vmap(
            lambda z, w: jxent.cross_entropy(z, TARGET, w, class_axis_name="c"),
            axis_name="c",
        )(shards, weight.reshape(3, V // 3))
        return per_shard[0]

    value, grad = jax.jit(jax.value_and_grad(total))(X @ W)
    z, t = np.asarray(X @ W, np.float64), np.asarray(TARGET)
    w = np.asarray(weight, np.float64)
    valid = t != -100
    safe = np.where(valid, t, 0)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    scale = np.where(valid, w[safe], 0.0) / np.where(valid, w[safe], 0.0).sum()
    nll = -np.log(p[np.arange(N), safe])
    expected = scale[:, None] * (p - np.eye(V)[safe])
    np.testing.assert_allclose(value, np.sum(scale * nll), rtol=1e-6)
    np.testing.assert_allclose(grad, expected, rtol=1e-5, atol=1e-7)
