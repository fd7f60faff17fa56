"""The platform a program is lowered for picks jxent's code paths.

jxent takes different paths on the CPU (short rows split from wide ones in
the sums, two-pass shifted sums) and on accelerators (one variadic reduction
for the row statistics). The choice is made when the program is lowered
(``lax.platform_dependent``), not by ``jax.default_backend()`` at trace time,
so that a program traced on a CPU host and compiled for a TPU or GPU (ahead
of time, ``jax.export``) gets the accelerator's program.

At (512, 8192) float32 the CPU path cuts each row into 4 (a (2048, 2048)
array) and the accelerators' path is one variadic reduction (the logits
have at most 2**24 elements). The StableHLO tests need no accelerator
compiler; the compiled ones need the ``aot`` extra (libtpu, the CUDA plugin).
"""

from __future__ import annotations

import importlib.util
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_modules import load_benchmark

import jxent

SHAPE = (512, 8192)
SPLIT = "2048x2048"  # the CPU path's rows, in StableHLO
VARIADIC_REDUCE = re.compile(r"stablehlo\.reduce\([^()]*\), \(")


def _value_and_grad(x, t):
    return jax.value_and_grad(lambda x: jxent.cross_entropy(x, t))(x)


def _args():
    return (
        jax.ShapeDtypeStruct(SHAPE, jnp.float32),
        jax.ShapeDtypeStruct(SHAPE[:1], jnp.int32),
    )


def _stablehlo(platform: str) -> str:
    traced = jax.jit(_value_and_grad).trace(*_args())
    return traced.lower(lowering_platforms=(platform,)).as_text()


def test_cpu_lowering_takes_the_cpu_path():
    text = _stablehlo("cpu")
    assert SPLIT in text
    assert not VARIADIC_REDUCE.search(text)


@pytest.mark.parametrize("platform", ["tpu", "cuda", "rocm"])
def test_accelerator_lowering_from_a_cpu_takes_the_accelerator_path(platform):
    text = _stablehlo(platform)
    assert SPLIT not in text
    assert VARIADIC_REDUCE.search(text)


def test_binary_sum_is_a_product_on_the_cpu_only():
    def loss(x, t):
        return jxent.binary_cross_entropy_with_logits(x, t)

    args = (jax.ShapeDtypeStruct((256, 1024), jnp.float32),) * 2
    traced = jax.jit(jax.value_and_grad(loss)).trace(*args)
    for platform, dots in (("cpu", True), ("tpu", False), ("cuda", False)):
        text = traced.lower(lowering_platforms=(platform,)).as_text()
        assert ("stablehlo.dot_general" in text) == dots, platform


def test_multi_platform_export_runs_the_cpu_path_on_the_cpu():
    exported = jax.export.export(jax.jit(_value_and_grad), platforms=["tpu", "cpu"])(
        *_args()
    )
    assert exported.platforms == ("tpu", "cpu")
    text = exported.mlir_module()
    # Both platforms' programs, the choice resolved when compiled.
    assert SPLIT in text
    assert VARIADIC_REDUCE.search(text)
    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=SHAPE), jnp.float32)
    t = jnp.asarray(rng.integers(0, SHAPE[1], size=SHAPE[0]), jnp.int32)
    value, grad = exported.call(x, t)
    want_value, want_grad = jax.jit(_value_and_grad)(x, t)
    np.testing.assert_allclose(value, want_value, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-12)


# ------------------------------------------- compiled for a TPU and a GPU


def _compiled_hlo(target_name: str | None) -> str:
    """The optimized HLO of the value_and_grad program for a target."""
    if target_name is None:
        return jax.jit(_value_and_grad).lower(*_args()).compile().as_text()
    bench = load_benchmark("bench_compiled")
    target = bench.TARGETS[target_name]
    devices = bench.devices(target)
    args = [(SHAPE, jnp.float32), (SHAPE[:1], jnp.int32)]
    return bench.compile_program(_value_and_grad, args, devices).as_text()


# A reduction with two results: the one-pass statistics (maximum, sum).
ONE_PASS = re.compile(r"= \(f32\[512\]\S*, f32\[512\]\S*\) reduce\(")


def _requires(module: str, what: str) -> None:
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        pytest.skip(f"{what} is not installed: the aot extra (pip install -e '.[aot]')")


def test_compiled_for_the_cpu_takes_the_cpu_path():
    text = _compiled_hlo(None)
    assert "[2048,2048]" in text
    assert not ONE_PASS.search(text)


@pytest.mark.parametrize(
    ("target", "module", "what"),
    [
        ("tpu-v5e", "libtpu", "libtpu"),
        ("h100", "jax_plugins.xla_cuda12", "the CUDA 12 PJRT plugin"),
    ],
)
def test_compiled_for_an_accelerator_from_a_cpu_takes_its_path(target, module, what):
    _requires(module, what)
    text = _compiled_hlo(target)
    assert "[2048,2048]" not in text
    assert ONE_PASS.search(text)
