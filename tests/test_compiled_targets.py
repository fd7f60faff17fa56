"""jxent's programs compiled for a TPU v5e and an H100, without the chips.

``benchmarks/bench_compiled.py`` (docs/on_tpu_and_gpu.md) compiles the
``value_and_grad`` programs deviceless for TPUs and GPUs and reads them back;
here the same functions, at shapes that compile in seconds, hold the figures
that page reports to bounds, in ratio form:

* ``cross_entropy`` moves at most 0.8x the logits bytes of optax's
  ``softmax_cross_entropy_with_integer_labels`` (3 passes over the logits
  against 4) and keeps at most 16 MiB of temporaries, float32 and bfloat16;
* ``linear_cross_entropy``'s bfloat16 temporaries are at most 0.25x the naive
  ``cross_entropy(x @ w, t)``'s, for at most 1.34x its matmul flops. At
  (2048, 4096, 131072) the vocabulary-outer gradient of the chips measures
  0.06x (v5e) and 0.19x (H100); the token-outer program that the CPU compiles
  would measure 5.3x and 2.3x there (``_linear._VOCAB_OUTER = False``);
* auto-sharded ``cross_entropy`` on 8 chips (a v5e 2x4 slice, 8 H100s; logits
  split over rows and classes) has no collective larger than a 64th of a
  chip's logits shard: per-row and per-class vectors only, never a logits
  tile.

Each compile runs on the CPU (``JAX_PLATFORMS=cpu`` or not); the module skips
a target whose compiler is not installed (the ``aot`` extra: libtpu, the CUDA
12 plugin, ptxas). Only one process at a time may load libtpu normally, so
the module's tests take a file lock (two runs of the module compile one after
the other) and libtpu is loaded with ``ALLOW_MULTIPLE_LIBTPU_LOAD`` set, so
that a suite still running in another process does not keep it from loading.
"""

from __future__ import annotations

import contextlib
import fcntl
import functools
import importlib.util
import os
import sys
import tempfile
import time
from pathlib import Path

import jax.numpy as jnp
import pytest

BENCHMARKS = Path(__file__).resolve().parents[1] / "benchmarks"
MiB = 2**20

CROSS_ENTROPY_SHAPE = (2048, 32768)  # 256 MiB of float32 logits
# Big enough that the naive program's temporaries (512 MiB on both chips)
# dwarf the vocabulary-outer program's fixed tiles (33 and 96 MiB).
LINEAR_SHAPE = (2048, 4096, 131072)
SHARDED_SHAPE = (2048, 32768)
MESHES = [(2, 4), (4, 2)]

COMPILERS = {
    "tpu-v5e": ("libtpu", "libtpu"),
    "h100": ("jax_plugins.xla_cuda12", "the CUDA 12 plugin"),
}
TARGETS = list(COMPILERS)


def _load_bench():
    spec = importlib.util.spec_from_file_location(
        "bench_compiled", BENCHMARKS / "bench_compiled.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules.setdefault("bench_compiled", module)
    spec.loader.exec_module(module)
    return module


bench = _load_bench()


@pytest.fixture(scope="module", autouse=True)
def _one_run_at_a_time():
    """Two runs of this module (two pytest processes) compile in turn."""
    path = Path(tempfile.gettempdir()) / "jxent-test_compiled_targets.lock"
    with open(path, "w") as lock:
        deadline = time.monotonic() + 600
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    pytest.fail(f"{path} held by another run for 10 minutes")
                time.sleep(1)
        try:
            yield
        finally:
            fcntl.flock(lock, fcntl.LOCK_UN)


def _require(target_name: str) -> None:
    module, what = COMPILERS[target_name]
    try:
        found = importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        found = False
    if not found:
        pytest.skip(f"{what} is not installed: the aot extra (pip install -e '.[aot]')")


@contextlib.contextmanager
def _multiple_libtpu_loads():
    """libtpu, loaded in here, does not take its one-process lock file."""
    key = "ALLOW_MULTIPLE_LIBTPU_LOAD"
    saved = os.environ.get(key)
    os.environ[key] = "1"
    try:
        yield
    finally:
        if saved is None:
            del os.environ[key]
        else:
            os.environ[key] = saved


@functools.cache
def _devices(target_name: str, chips: str | None = None):
    with _multiple_libtpu_loads():
        return bench.devices(bench.TARGETS[target_name], chips)


@functools.cache
def _measured(target_name: str, kind: str, shape: tuple, dtype: str) -> dict:
    """{program: measure()'s record} of bench_compiled's programs."""
    target = bench.TARGETS[target_name]
    programs = getattr(bench, f"{kind}_programs")(*shape, jnp.dtype(dtype))
    records = {}
    for name, f, args, logits in programs:
        compiled = bench.compile_program(f, args, _devices(target_name))
        records[name] = bench.measure(compiled, logits, target)
    return records


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("target", TARGETS)
def test_cross_entropy_moves_less_than_optax(target, dtype):
    _require(target)
    records = _measured(target, "cross_entropy", CROSS_ENTROPY_SHAPE, dtype)
    ours, optax = records["jxent"], records["optax"]
    assert ours["traffic_bytes"] <= 0.8 * optax["traffic_bytes"], (
        ours["passes"],
        optax["passes"],
    )
    assert ours["temp_bytes"] <= 16 * MiB, ours["temp_bytes"]


@pytest.mark.parametrize("target", TARGETS)
def test_linear_cross_entropy_holds_a_quarter_of_the_naive_memory(target):
    _require(target)
    records = _measured(target, "linear", LINEAR_SHAPE, "bfloat16")
    ours, naive = records["jxent"], records["naive"]
    # The ratio means something: the naive program holds the logits.
    n, _, v = LINEAR_SHAPE
    assert naive["temp_bytes"] >= n * v * 2, naive["temp_bytes"]
    temp_ratio = ours["temp_bytes"] / naive["temp_bytes"]
    assert temp_ratio <= 0.25, (ours["temp_bytes"] / MiB, naive["temp_bytes"] / MiB)
    flops_ratio = ours["flops"] / naive["flops"]
    assert flops_ratio <= 1.34, flops_ratio


@pytest.mark.parametrize("mesh", MESHES, ids=lambda m: f"{m[0]}x{m[1]}")
@pytest.mark.parametrize("program", ["jxent", "jxent_weighted"])
@pytest.mark.parametrize("target", TARGETS)
def test_sharded_cross_entropy_has_no_logits_sized_collective(target, program, mesh):
    _require(target)
    eight = _devices(target, bench.EIGHT_CHIPS[target])
    (f, args, logits), *_ = (
        (f, args, logits)
        for name, f, args, logits in bench.sharded_programs(*SHARDED_SHAPE)
        if name == program
    )
    specs = bench.sharded_specs(eight, mesh, len(args))
    compiled = bench.compile_program(f, args, eight, specs)
    record = bench.measure(compiled, logits / 8, bench.TARGETS[target])
    # Sharded over the classes, the row statistics are reduced across chips.
    assert record["collective_count"] > 0, record["collectives"]
    shard = logits / 8
    assert record["max_collective_bytes"] <= shard / 64, (
        record["max_collective_bytes"],
        record["collectives"],
    )
