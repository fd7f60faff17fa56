"""linear_argmax against jnp.argmax of the materialised float32 logits."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import jxent

RNG = np.random.default_rng(18)
N, D, V = 11, 6, 13  # ragged for the chunks used below
X = RNG.normal(size=(N, D)).astype(np.float32)
W = RNG.normal(size=(D, V)).astype(np.float32)
BIAS = RNG.normal(size=V).astype(np.float32)


def reference_argmax(x, w, bias=None, soft_cap=None, where=None):
    """jnp.argmax of the float32 logits (float64 for float64 inputs)."""
    acc = jnp.promote_types(jnp.result_type(x, w), jnp.float32)
    z = jnp.einsum("...d,dv->...v", x, w, preferred_element_type=acc)
    if bias is not None:
        z = z + jnp.asarray(bias).astype(acc).reshape((1,) * (z.ndim - 1) + (-1,))
    if soft_cap is not None:
        z = soft_cap * jnp.tanh(z / soft_cap)
    if where is not None:
        z = jnp.where(where, z, -jnp.inf)
    return jnp.argmax(z, axis=-1)


CHUNKS = [(None, None), (4, None), (4, 5), (1, 1), (11, 13), (3, 12)]


def _check_all_chunks(x, w, **kw):
    want = np.asarray(reference_argmax(x, w, **kw))
    for chunk, block in CHUNKS:
        got = jxent.linear_argmax(x, w, chunk_size=chunk, vocab_chunk_size=block, **kw)
        assert got.dtype == jnp.int32 and got.shape == x.shape[:-1]
        np.testing.assert_array_equal(got, want, err_msg=f"{chunk}, {block}")
    return want


def test_random_logits_with_bias_and_batch_shape():
    _check_all_chunks(X, W, bias=BIAS)
    _check_all_chunks(X[:10].reshape(2, 5, D), W)


def test_ties_go_to_the_first_index():
    """Small integers: every logit is exact, so many exact ties across tokens
    chunks and vocabulary blocks."""
    x = RNG.integers(-1, 2, size=(N, 3)).astype(np.float32)
    w = RNG.integers(-1, 2, size=(3, V)).astype(np.float32)
    w[:, 9] = w[:, 2]  # a duplicate column in a later block
    want = _check_all_chunks(x, w)
    z = x @ w
    assert (np.sum(z == z.max(-1, keepdims=True), -1) > 1).sum() >= 3  # ties seen
    np.testing.assert_array_equal(want, np.argmax(z, -1))  # numpy's rule too


def test_soft_cap_saturation_ties():
    w = W * 200.0  # logits of hundreds: tanh(z / 0.5) is exactly 1 in float32
    want = _check_all_chunks(X, w, soft_cap=0.5)
    assert (want != np.argmax(X @ w, -1)).any()  # the cap changes the answer


def test_masks_nan_and_fully_excluded_rows():
    mask = np.ones(V, bool)
    mask[[0, 7]] = False
    _check_all_chunks(X, W, where=mask)
    rows = np.ones((N, V), bool)
    rows[3] = False  # nothing included: 0, as jnp.argmax of all -inf
    rows[5, 2:] = False
    got = _check_all_chunks(X, W, bias=BIAS, where=rows)
    assert got[3] == 0
    x = X.copy()
    x[4, 0] = np.nan  # a row of NaN logits
    w = W.copy()
    w[1, 10] = np.nan  # a NaN column: the first NaN wins everywhere
    _check_all_chunks(x, W)
    _check_all_chunks(X, w)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_inputs_accumulate_in_float32(dtype):
    x, w, b = (jnp.asarray(a, dtype) for a in (X, W, BIAS))
    _check_all_chunks(x, w, bias=b)


def test_float64_and_vmap_and_jit():
    with jax.enable_x64(True):
        _check_all_chunks(X.astype(np.float64), W.astype(np.float64))
    batched = jax.vmap(lambda x: jxent.linear_argmax(x, W, chunk_size=2))(
        X[:10].reshape(2, 5, D)
    )
    np.testing.assert_array_equal(batched.reshape(-1), reference_argmax(X[:10], W))
    jitted = jax.jit(lambda x, w, c: jxent.linear_argmax(x, w, soft_cap=c))
    np.testing.assert_array_equal(jitted(X, W, 2.0), reference_argmax(X, W, None, 2.0))


def test_bad_input():
    with pytest.raises(TypeError, match="`x`"):
        jxent.linear_argmax(X.astype(np.int32), W)
    with pytest.raises(TypeError, match="`w`"):
        jxent.linear_argmax(X, W.astype(np.int32))
    with pytest.raises(ValueError, match=r"w.shape=\(5, 13\)"):
        jxent.linear_argmax(X, W[:5])
    with pytest.raises(ValueError, match="`bias` must have shape"):
        jxent.linear_argmax(X, W, bias=BIAS[:3])
    with pytest.raises(ValueError, match="`chunk_size`"):
        jxent.linear_argmax(X, W, chunk_size=0)
    with pytest.raises(ValueError, match="`vocab_chunk_size`"):
        jxent.linear_argmax(X, W, vocab_chunk_size=-2)
    with pytest.raises(ValueError, match="`soft_cap`"):
        jxent.linear_argmax(X, W, soft_cap=0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        jxent.linear_argmax(X, W, where=np.ones(5, bool))


CASES = Path(__file__).parent / "multidevice" / "heads_cases.py"


@pytest.mark.heavy
def test_heads_on_eight_devices():
    """shard_map with class and batch axes: tests/multidevice/heads_cases.py."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    root = CASES.parents[2]
    result = subprocess.run(
        [sys.executable, "-m", "pytest", str(CASES), "-q", "-p",
         "no:cacheprovider", "-c", str(root / "pyproject.toml")],
        cwd=root, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
