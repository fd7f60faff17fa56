"""``rounded_transpose_dot``: ``t @ w`` whose transpose w.r.t. ``t`` rounds the
cotangent to ``w``'s dtype, against float64 NumPy, under every transform."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64
from jax import lax
from jax.test_util import check_grads

from jxent._rounded_dot import rounded_transpose_dot

RNG = np.random.default_rng(0)
T = RNG.normal(size=(5, 6)).astype(np.float32)
W = RNG.normal(size=(6, 7)).astype(jnp.bfloat16)
CT = RNG.normal(size=(5, 7)).astype(np.float32)


def _f64(a):
    return np.asarray(a, np.float64)


def test_value_is_the_exact_product():
    for f in (rounded_transpose_dot, jax.jit(rounded_transpose_dot)):
        out = f(T, W)
        assert out.dtype == jnp.float32 and out.shape == (5, 7)
        np.testing.assert_allclose(out, _f64(T) @ _f64(W), rtol=1e-6, atol=1e-6)


def test_reverse_mode_rounds_the_cotangent_to_w_dtype():
    """``dt = round(ct) @ w^T``; without the rounding the error is 1e-3."""

    def f(t):
        return jnp.sum(rounded_transpose_dot(t, W) * CT)

    dt = jax.jit(jax.grad(f))(T)
    assert dt.dtype == jnp.float32
    rounded = _f64(CT.astype(jnp.bfloat16)) @ _f64(W).T
    np.testing.assert_allclose(dt, rounded, rtol=1e-6, atol=1e-6)
    exact = _f64(CT) @ _f64(W).T
    assert np.max(np.abs(dt - exact)) > 1e-3


def test_reverse_mode_in_w_is_exact():
    w = _f64(W).astype(np.float32)

    def f(t, w):
        return jnp.sum(rounded_transpose_dot(t, w) * CT)

    dt, dw = jax.grad(f, argnums=(0, 1))(T, w)
    np.testing.assert_allclose(dw, _f64(T).T @ _f64(CT), rtol=1e-6, atol=1e-5)
    np.testing.assert_allclose(dt, _f64(CT) @ _f64(w).T, rtol=1e-6, atol=1e-5)


def test_forward_mode_is_exact():
    dt = RNG.normal(size=T.shape).astype(np.float32)
    _, tangent = jax.jvp(lambda t: rounded_transpose_dot(t, W), (T,), (dt,))
    np.testing.assert_allclose(tangent, _f64(dt) @ _f64(W), rtol=1e-6, atol=1e-6)


def test_check_grads_order_2_both_modes_float64():
    """Rounding to float64 is the identity: the derivatives are exact."""
    with x64():
        t, w = _f64(T), _f64(W)

        def f(t, w):
            return jnp.sin(rounded_transpose_dot(t, w))

        check_grads(f, (t, w), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("axes", [(0, 0), (0, None), (None, 0), (1, 2)])
def test_vmap_of_values_and_gradients(axes):
    """Every batching of the operands, against a loop over the batch; the
    gradient rounds per element as unbatched."""
    t = np.stack([T, 2 * T, -T])
    w = np.stack([W, (2 * _f64(W)).astype(jnp.bfloat16), W])
    t_in = T if axes[0] is None else np.moveaxis(t, 0, axes[0])
    w_in = W if axes[1] is None else np.moveaxis(w, 0, axes[1])

    def loss(t, w):
        return jnp.sum(rounded_transpose_dot(t, w) * CT)

    out = jax.vmap(rounded_transpose_dot, axes)(t_in, w_in)
    grads = jax.vmap(jax.grad(loss), axes)(t_in, w_in)
    for i in range(3):
        t_i = T if axes[0] is None else t[i]
        w_i = W if axes[1] is None else w[i]
        np.testing.assert_allclose(out[i], _f64(t_i) @ _f64(w_i), rtol=1e-6, atol=1e-5)
        rounded = _f64(CT.astype(jnp.bfloat16)) @ _f64(w_i).T
        np.testing.assert_allclose(grads[i], rounded, rtol=1e-6, atol=1e-5)


def test_scan_checkpoint_and_shard_map():
    """Inside a scan, under a checkpoint, and in shard_map (varying manual
    axes of the operands propagate to the product)."""

    def loss(t):
        def body(carry, t_c):
            z = jax.checkpoint(rounded_transpose_dot)(t_c, W)
            return carry + jnp.sum(z * CT), None

        return lax.scan(body, 0.0, jnp.stack([t, t]))[0]

    rounded = _f64(CT.astype(jnp.bfloat16)) @ _f64(W).T
    np.testing.assert_allclose(jax.jit(jax.grad(loss))(T), 2 * rounded, rtol=1e-6)

    mesh = jax.make_mesh((1,), ("i",))
    spec = jax.sharding.PartitionSpec("i")

    def local(t):
        return jax.grad(lambda t: jnp.sum(rounded_transpose_dot(t, W) * CT))(t)

    sharded = jax.jit(jax.shard_map(local, mesh=mesh, in_specs=spec, out_specs=spec))
    t = jax.device_put(T, jax.sharding.NamedSharding(mesh, spec))
    np.testing.assert_allclose(sharded(t), rounded, rtol=1e-6, atol=1e-6)
    # An Explicit-sharded operand outside shard_map: the product's sharding.
    with jax.set_mesh(mesh):
        out = jax.jit(rounded_transpose_dot)(t, W)
        assert out.sharding.spec == jax.sharding.PartitionSpec("i", None)
        np.testing.assert_allclose(jax.jit(local)(t), rounded, rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize(
    ("t_shape", "w_shape", "match"),
    [
        ((5, 6), (7, 6), "last dimension"),
        ((2, 5, 6), (6, 7), "leading dimensions"),
        ((6,), (6, 7), "rank"),
    ],
)
def test_bad_shapes_raise(t_shape, w_shape, match):
    with pytest.raises(ValueError, match=match):
        rounded_transpose_dot(jnp.zeros(t_shape), jnp.zeros(w_shape, jnp.bfloat16))
