"""Benchmark time and peak memory of ``jxent.linear_cross_entropy`` and naive versions.

Forward+backward (``value_and_grad`` w.r.t. ``x`` and ``w``) of the LM-head loss
``cross_entropy(x @ w, target)``, x: (N, D), w: (D, V), on the CPU. Every
contender runs in its own process (this script with ``--worker``), so its peak
memory is measured without the others' arrays or allocator caches. Writes
``linear_results.md``, ``linear_results.json`` and ``linear_memory_vs_V.png`` to
``--out-dir`` (default ``benchmarks/results/cpu``). See ``benchmarks/README.md``.

Usage::

    python benchmarks/bench_linear_cross_entropy.py            # V sweep (~15 min)
    python benchmarks/bench_linear_cross_entropy.py --quick    # smoke test (< 60 s)
    python benchmarks/bench_linear_cross_entropy.py --gemma    # + (8192, 2304, 256000)
    python benchmarks/bench_linear_cross_entropy.py --llm      # LLM heads, f32 + bf16
    python benchmarks/bench_linear_cross_entropy.py --llm --interleaved 7

``--interleaved R`` adds, per case, one more process that holds both JAX
contenders and times them interleaved (R rounds, a random order per round,
after one warm-up call each): its ratio is the time check that load on the
machine cannot bias, since both contenders share it.
"""

from __future__ import annotations

import argparse
import ctypes
import dataclasses
import datetime
import gc
import json
import os
import platform
import random
import re
import subprocess
import sys
import threading
import time
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from bench_cross_entropy import (
    cpu_model,
    fmt,
    git_revision,
    load_average,
    memory_of,
    summarize,
    write_report,
)

import jxent

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is optional: its contenders are then skipped.
    torch = None
    F = None

# Peak memory is the process's resident set size: a host-memory measure, so
# everything runs on the CPU (also on a machine with an accelerator).
jax.config.update("jax_platforms", "cpu")

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = Path(__file__).resolve()
MiB = 2**20

JXENT, JAX_NAIVE = "jxent", "jax_naive"
TORCH_NAIVE, TORCH_CHUNKED = "torch_naive", "torch_chunked"
CONTENDERS = (JXENT, JAX_NAIVE, TORCH_NAIVE, TORCH_CHUNKED)
JAX_CONTENDERS = (JXENT, JAX_NAIVE)
DESCRIPTIONS = {
    JXENT: "jxent.linear_cross_entropy(x, w, t) (default chunk_size)",
    JAX_NAIVE: "jxent.cross_entropy(x @ w, t)",
    TORCH_NAIVE: "F.linear_cross_entropy(x, w.T, t, options=None) (reference path)",
    TORCH_CHUNKED: "F.linear_cross_entropy(x, w.T, t, "
    "options=LinearCrossEntropyOptions())",
}

MAIN_SHAPE = (2048, 512, 65536)
SWEEP_N, SWEEP_D = 2048, 512
SWEEP_V = (8192, 16384, 32768, 65536, 131072)
GEMMA_SHAPE = (8192, 2304, 256000)
# Issue 10's CPU sweep of realistic heads, float32 and bfloat16 (--llm).
LLM_SHAPES = ((2048, 512, 65536), (2048, 1024, 131072), (1024, 2304, 256000))
LLM_DTYPES = ("float32", "bfloat16")
QUICK_N, QUICK_D, QUICK_V = 1024, 256, (2048, 16384)  # jxent: 1 and 2 chunks

# Targets of the issue.
TIME_TARGET = 1.10  # jxent time / jax_naive time
BUDGET_FACTOR, BUDGET_SLACK = 1.5, 64 * MiB  # 1.5 x (dx + dw bytes) + 64 MiB

DEFAULT_REPEATS = {"sweep": 5, "gemma": 1, "quick": 3, "llm": 3}
MIN_REPEATS = 3  # timed calls per worker at least, whatever --time-budget says
DEFAULT_WARMUP = {"sweep": 1, "gemma": 0, "quick": 0, "llm": 0}


@dataclasses.dataclass(frozen=True)
class Case:
    """One shape and dtype; ``kind`` is "sweep", "gemma", "llm" or "quick"."""

    n: int
    d: int
    v: int
    dtype: str
    kind: str

    @property
    def itemsize(self) -> int:
        return np.dtype(jnp.dtype(self.dtype)).itemsize

    @property
    def grad_bytes(self) -> int:
        """Bytes of dx and dw in float32 (the issue's unit for the budget)."""
        return (self.n * self.d + self.d * self.v) * 4

    @property
    def budget(self) -> int:
        """The issue's memory budget for jxent: 1.5 x (dx + dw bytes) + 64 MiB."""
        return int(BUDGET_FACTOR * self.grad_bytes + BUDGET_SLACK)

    @property
    def label(self) -> str:
        return f"{self.n}x{self.d}x{self.v} {self.dtype}"


# --------------------------------------------------------------------------- #
# Memory
# --------------------------------------------------------------------------- #


def proc_status() -> dict[str, int]:
    """VmRSS, VmHWM (and the rest) of /proc/self/status, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("Vm"):
                key, value = line.split(":", 1)
                out[key] = int(value.split()[0]) * 1024
    return out


def rss() -> int:
    """The current resident set size in bytes."""
    return proc_status()["VmRSS"]


def mem_available() -> int | None:
    """MemAvailable of /proc/meminfo in bytes (None where unknown)."""
    try:
        text = Path("/proc/meminfo").read_text()
    except OSError:
        return None
    m = re.search(r"MemAvailable:\s+(\d+) kB", text)
    return int(m.group(1)) * 1024 if m else None


def mem_total() -> int | None:
    """MemTotal of /proc/meminfo in bytes (None where unknown)."""
    try:
        m = re.search(r"MemTotal:\s+(\d+) kB", Path("/proc/meminfo").read_text())
    except OSError:
        return None
    return int(m.group(1)) * 1024 if m else None


def trim_heap() -> None:
    """Collects garbage and hands glibc's free heap pages back to the kernel."""
    gc.collect()
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def reset_peak() -> bool:
    """Resets VmHWM to the current RSS (``echo 5 > /proc/self/clear_refs``)."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return False
    return True


def clear_refs_works() -> bool:
    """Whether resetting VmHWM works here: touch 64 MiB, free it, reset, compare."""
    block = np.ones(64 * MiB // 8)
    del block
    if not reset_peak():
        return False
    status = proc_status()
    return status["VmHWM"] - status["VmRSS"] < 16 * MiB


class PeakMeter:
    """Peak RSS over a ``with`` block, by clear_refs + VmHWM or by sampling.

    ``clear_refs``: the kernel's high-water mark is reset on entry and read on
    exit (exact, no overhead). ``sample``: a thread reads VmRSS every
    ``interval`` seconds (may miss spikes shorter than that; costs a little CPU).
    """

    def __init__(self, method: str, interval: float = 1e-3):
        self.method = method
        self.interval = interval
        self.peak = 0
        self.samples = 0
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    def _sample(self) -> None:
        while not self._stop.is_set():
            self.peak = max(self.peak, rss())
            self.samples += 1
            time.sleep(self.interval)

    def __enter__(self) -> PeakMeter:
        self.peak = rss()
        if self.method == "clear_refs":
            reset_peak()
        else:
            self._stop.clear()
            self._thread = threading.Thread(target=self._sample, daemon=True)
            self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self.method == "clear_refs":
            self.peak = max(self.peak, proc_status()["VmHWM"])
        else:
            self._stop.set()
            assert self._thread is not None
            self._thread.join()
            self.peak = max(self.peak, rss())


# --------------------------------------------------------------------------- #
# Memory estimates (to skip what cannot fit)
# --------------------------------------------------------------------------- #


def estimate_bytes(case: Case, name: str) -> int:
    """A rough upper estimate of a worker's peak memory: inputs + extra.

    Naive versions keep N x V logits and their gradient (and torch the saved
    log-softmax, an upcast for low precision in JAX); chunked versions keep
    the gradients, float32 accumulators and a few 32 MiB chunks. Plus about
    1 GiB for the interpreter, jax and torch.
    """
    n, d, v, isz = case.n, case.d, case.v, case.itemsize
    inputs = (n * d + d * v) * isz + 8 * n
    grads = (n * d + d * v) * isz
    acc = (n * d + d * v) * 4 if isz < 4 else 0  # float32 accumulators
    nv = n * v
    extra = {
        JXENT: grads + acc + 4 * 32 * MiB,
        TORCH_CHUNKED: grads + acc + 4 * 32 * MiB,
        JAX_NAIVE: grads + nv * (2 * isz + (4 if isz < 4 else 0)),
        TORCH_NAIVE: grads + nv * 4 * isz,
    }[name]
    return inputs + extra + 2**30


# --------------------------------------------------------------------------- #
# Worker: one contender, one case, in this process
# --------------------------------------------------------------------------- #


def make_numpy_inputs(case: Case, seed: int) -> tuple[np.ndarray, ...]:
    """Float32 x ~ N(0, 1), w ~ N(0, 1/D) (logits ~ N(0, 1)), int targets.

    Generated with numpy from ``seed`` so that every worker sees the same data.
    """
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((case.n, case.d), dtype=np.float32)
    w = rng.standard_normal((case.d, case.v), dtype=np.float32)
    w *= np.float32(case.d**-0.5)
    t = rng.integers(0, case.v, case.n, dtype=np.int64)
    return x, w, t


def jxent_loss(x: jax.Array, w: jax.Array, t: jax.Array) -> jax.Array:
    """The contender under test: default options (and default chunk)."""
    return jxent.linear_cross_entropy(x, w, t)


def jax_naive_loss(x: jax.Array, w: jax.Array, t: jax.Array) -> jax.Array:
    """The N x V logits materialised, then jxent's cross-entropy."""
    return jxent.cross_entropy(x @ w, t)


def jxent_chunk_size(case: Case) -> int | None:
    """jxent's default chunk for this case (None if the private helper moved)."""
    try:
        from jxent._linear import _default_chunk_size

        return int(_default_chunk_size(case.n, case.d, case.v))
    except (ImportError, AttributeError, TypeError):
        return None


@dataclasses.dataclass
class Prepared:
    """A contender ready to call: ``call`` blocks and returns its outputs."""

    call: Callable[[], Any]
    reset: Callable[[], None]
    values: Callable[[Any], dict[str, float]]  # loss and gradient norms
    info: dict[str, Any]


def prepare_jax(name: str, case: Case, seed: int, limit: int) -> Prepared | str:
    """Compiles (timed) before creating inputs; a string when it would not fit."""
    fn = jxent_loss if name == JXENT else jax_naive_loss
    dtype = jnp.dtype(case.dtype)
    specs = (
        jax.ShapeDtypeStruct((case.n, case.d), dtype),
        jax.ShapeDtypeStruct((case.d, case.v), dtype),
        jax.ShapeDtypeStruct((case.n,), jnp.int32),
    )
    program = jax.jit(jax.value_and_grad(fn, argnums=(0, 1)))
    start = time.perf_counter()
    compiled = program.lower(*specs).compile()
    info: dict[str, Any] = {"compile_s": time.perf_counter() - start}
    info["xla_memory"] = memory_of(compiled)
    if info["xla_memory"] is not None:
        m = info["xla_memory"]
        info["xla_temp_plus_output"] = m["temp"] + m["output"]
        need = m["temp"] + m["output"] + m["argument"] + 2**30
        if need > limit:
            return f"skipped (memory: XLA needs {need / 2**30:.1f} GiB)"
    if name == JXENT:
        info["chunk_size"] = jxent_chunk_size(case)
    trim_heap()
    x, w, t = make_numpy_inputs(case, seed)
    args = (
        jax.device_put(x.astype(dtype)),
        jax.device_put(w.astype(dtype)),
        jax.device_put(t.astype(np.int32)),
    )
    jax.block_until_ready(args)
    del x, w, t

    def values(out: Any) -> dict[str, float]:
        loss, (dx, dw) = out
        return {
            "loss": float(loss),
            "dx_norm": float(jnp.linalg.norm(dx.astype(jnp.float32))),
            "dw_norm": float(jnp.linalg.norm(dw.astype(jnp.float32))),
        }

    return Prepared(
        call=lambda: jax.block_until_ready(compiled(*args)),
        reset=lambda: None,
        values=values,
        info=info,
    )


def prepare_torch(name: str, case: Case, seed: int, threads: int | None) -> Prepared:
    """torch tensors (w as (V, D), torch's layout) and the loss.backward() call."""
    if threads is not None:
        torch.set_num_threads(threads)
    dtype = getattr(torch, case.dtype)
    x, w, t = make_numpy_inputs(case, seed)
    xt = torch.from_numpy(x).to(dtype).clone().requires_grad_(True)
    wt = torch.from_numpy(w).T.to(dtype).contiguous().requires_grad_(True)
    tt = torch.from_numpy(t)
    del x, w, t
    info: dict[str, Any] = {"torch_threads": torch.get_num_threads()}
    options = None
    if name == TORCH_CHUNKED:
        options = torch.nn.LinearCrossEntropyOptions()
        try:  # what "auto" resolves to (a private helper; informative only)
            resolved = options._adjust(
                num_batches=case.n,
                in_features=case.d,
                num_classes=case.v,
                dtype=dtype,
                device=xt.device,
            )
            info["torch_options"] = {
                k: str(v) for k, v in dataclasses.asdict(resolved).items()
            }
        except Exception as e:  # a private API: best effort only
            info["torch_options"] = f"unavailable ({type(e).__name__})"

    def call() -> Any:
        loss = F.linear_cross_entropy(xt, wt, tt, options=options)
        loss.backward()
        return loss

    def reset() -> None:
        xt.grad = None
        wt.grad = None

    def values(out: Any) -> dict[str, float]:
        return {
            "loss": float(out.detach()),
            "dx_norm": float(xt.grad.float().norm()),
            "dw_norm": float(wt.grad.float().norm()),
        }

    return Prepared(call=call, reset=reset, values=values, info=info)


def run_worker(spec: dict[str, Any]) -> dict[str, Any]:
    """Runs one contender on one case; returns its measurements."""
    case = Case(**spec["case"])
    name = spec["contender"]
    out: dict[str, Any] = {"contender": name, "case": dataclasses.asdict(case)}
    out["load_average_start"] = load_average()
    method = spec["memory_method"]
    if method == "auto":
        method = "clear_refs" if clear_refs_works() else "sample"
    elif method == "clear_refs" and not clear_refs_works():
        raise RuntimeError("/proc/self/clear_refs cannot reset VmHWM here")
    out["memory_method"] = method
    limit = spec["mem_limit"]
    available = mem_available()
    if available is not None:
        limit = min(limit, available - 2**30)

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if name in JAX_CONTENDERS:
            prepared = prepare_jax(name, case, spec["seed"], limit)
        else:
            prepared = prepare_torch(name, case, spec["seed"], spec["torch_threads"])
        if isinstance(prepared, str):
            out["status"] = prepared
            return out
        out.update(prepared.info)
        trim_heap()
        baseline = rss()
        out["rss_baseline"] = baseline

        # First call (timed separately; lazy initialisation lands here).
        prepared.reset()
        with PeakMeter(method) as meter:
            start = time.perf_counter()
            result = prepared.call()
            out["first_call_ms"] = (time.perf_counter() - start) * 1e3
        out["peak_first_call"] = meter.peak - baseline
        out["values"] = prepared.values(result)  # loss and norms, as a check
        del result
        prepared.reset()
        trim_heap()  # what computing the norms left behind
        # Slow contenders get fewer calls: about `time_budget_s` of timed
        # calls but at least MIN_REPEATS (at most the requested number), and
        # no warm-up once MIN_REPEATS calls exceed the budget.
        repeats, warmup = spec["repeats"], spec["warmup"]
        if spec.get("time_budget_s"):
            fit = spec["time_budget_s"] * 1e3 / max(out["first_call_ms"], 1e-3)
            repeats = min(repeats, max(MIN_REPEATS, int(fit)))
            warmup = min(warmup, int(fit / MIN_REPEATS))
        out["repeats"], out["warmup"] = repeats, warmup
        for _ in range(warmup):
            prepared.call()
            prepared.reset()
        times = []
        gc.collect()
        gc.disable()
        try:
            with PeakMeter(method) as meter:
                for _ in range(repeats):
                    prepared.reset()
                    start = time.perf_counter()
                    result = prepared.call()
                    times.append(time.perf_counter() - start)
                    del result
                prepared.reset()
        finally:
            gc.enable()
        out["peak_rss"] = meter.peak
        out["peak_extra"] = meter.peak - baseline
        out["rss_samples"] = meter.samples if method == "sample" else None
        out["rss_end_extra"] = rss() - baseline
    out["warnings"] = sorted({f"{w.category.__name__}: {w.message}" for w in caught})
    out["raw_ms"] = [s * 1e3 for s in times]
    out["stats"] = summarize(times)
    out["load_average_end"] = load_average()
    out["status"] = "ok"
    return out


INTERLEAVED = "interleaved"


def run_interleaved(spec: dict[str, Any]) -> dict[str, Any]:
    """Both JAX contenders in one process, timed in a random order per round."""
    case = Case(**spec["case"])
    rng = random.Random(spec["seed"])
    prepared = {}
    for name in JAX_CONTENDERS:
        p = prepare_jax(name, case, spec["seed"], spec["mem_limit"])
        if isinstance(p, str):
            return {"status": f"{name} {p}"}
        p.call()  # warm-up
        prepared[name] = p
    out: dict[str, Any] = {"load_average_start": load_average()}
    times: dict[str, list[float]] = {name: [] for name in prepared}
    for _ in range(spec["rounds"]):
        order = list(prepared)
        rng.shuffle(order)
        for name in order:
            start = time.perf_counter()
            prepared[name].call()
            times[name].append(time.perf_counter() - start)
    out["raw_ms"] = {k: [t * 1e3 for t in v] for k, v in times.items()}
    out["median_ms"] = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
    out["ratio"] = out["median_ms"][JXENT] / out["median_ms"][JAX_NAIVE]
    per_round = np.asarray(times[JXENT]) / np.asarray(times[JAX_NAIVE])
    out["ratio_range"] = [float(per_round.min()), float(per_round.max())]
    out["load_average_end"] = load_average()
    out["status"] = "ok"
    return out


def worker_main(spec_json: str) -> int:
    """``--worker``: one measurement; its JSON is the last line of stdout."""
    spec = json.loads(spec_json)
    try:
        if spec["contender"] == INTERLEAVED:
            out = run_interleaved(spec)
        else:
            out = run_worker(spec)
    except Exception as e:  # reported as a failed contender, not a crash
        out = {"status": f"failed ({type(e).__name__}: {e})"}
    print(json.dumps(out))
    return 0


# --------------------------------------------------------------------------- #
# Driver
# --------------------------------------------------------------------------- #


@dataclasses.dataclass(frozen=True)
class Config:
    """What the driver runs."""

    cases: tuple[Case, ...]
    contenders: tuple[str, ...]
    repeats: dict[str, int]
    warmup: dict[str, int]
    torch_threads: int | None
    seed: int
    mem_limit: int
    memory_method: str
    quick: bool
    rounds: int = 1
    time_budget_s: float | None = None
    interleaved: int = 0  # rounds of the one-process interleaved timing


def environment(config: Config) -> dict[str, Any]:
    """Device, versions and settings of this run."""
    import jaxlib

    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "mem_total": mem_total(),
        "mem_available_start": mem_available(),
        "load_average_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "numpy": np.__version__,
            "jxent": getattr(jxent, "__version__", "?"),
            "torch": None if torch is None else torch.__version__,
        },
        "jxent_revision": git_revision(),
        "torch_threads": config.torch_threads,
        "torch_default_threads": None if torch is None else torch.get_num_threads(),
        "quick": config.quick,
        "repeats": config.repeats,
        "warmup": config.warmup,
        "seed": config.seed,
        "mem_limit": config.mem_limit,
        "memory_method_requested": config.memory_method,
        "rounds": config.rounds,
        "time_budget_s": config.time_budget_s,
        "interleaved_rounds": config.interleaved,
        "malloc_env": {k: v for k, v in os.environ.items() if k.startswith("MALLOC_")},
        "contenders": {k: DESCRIPTIONS[k] for k in config.contenders},
    }


def skip_reason(case: Case, name: str, config: Config) -> str | None:
    """Why a contender is not run on a case (None: it runs)."""
    if name not in JAX_CONTENDERS and torch is None:
        return "skipped (torch not installed)"
    if name == TORCH_CHUNKED and not hasattr(torch.nn, "LinearCrossEntropyOptions"):
        return "skipped (torch has no LinearCrossEntropyOptions)"
    need = estimate_bytes(case, name)
    if need > config.mem_limit:
        return f"skipped (memory: ~{need / 2**30:.1f} GiB estimated)"
    available = mem_available()
    if available is not None and need > available - 2**30:
        free = available / 2**30
        return f"skipped (memory: ~{need / 2**30:.1f} GiB, {free:.1f} GiB free)"
    return None


def spawn(case: Case, name: str, config: Config) -> dict[str, Any]:
    """Runs one worker process; its stderr goes to ours."""
    spec = {
        "case": dataclasses.asdict(case),
        "contender": name,
        "repeats": config.repeats[case.kind],
        "warmup": config.warmup[case.kind],
        "time_budget_s": config.time_budget_s,
        "seed": config.seed,
        "torch_threads": config.torch_threads,
        "mem_limit": config.mem_limit,
        "memory_method": config.memory_method,
        "rounds": config.interleaved,
    }
    start = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(SCRIPT), "--worker", json.dumps(spec)],
        stdout=subprocess.PIPE,
        text=True,
        cwd=ROOT,
    )
    wall = time.perf_counter() - start
    lines = proc.stdout.strip().splitlines()
    try:
        out = json.loads(lines[-1])
    except (IndexError, json.JSONDecodeError):
        out = {"status": f"failed (exit code {proc.returncode}; killed for memory?)"}
    out.update(contender=name, case=dataclasses.asdict(case), process_wall_s=wall)
    return out


def run_benchmark(config: Config) -> dict[str, Any]:
    """Every case x contender, each in its own process; returns all results."""
    from tqdm import tqdm

    env = environment(config)
    jobs = []  # per case: round 0 in order, round 1 reversed, round 2 in order...
    for case in config.cases:
        for r in range(config.rounds):
            order = config.contenders[:: -1 if r % 2 else 1]
            jobs += [(case, name, r) for name in order]
        if config.interleaved and all(k in config.contenders for k in JAX_CONTENDERS):
            jobs.append((case, INTERLEAVED, 0))
    results = []
    with tqdm(total=len(jobs), desc="workers", file=sys.stderr) as bar:
        for case, name, r in jobs:
            bar.set_postfix_str(f"{case.label} {name} round {r + 1}")
            reason = None if name == INTERLEAVED else skip_reason(case, name, config)
            if reason is not None:
                out = {"contender": name, "case": dataclasses.asdict(case)}
                out["status"] = reason
            else:
                out = spawn(case, name, config)
            out["round"] = r
            results.append(out)
            status = out["status"]
            if status == "ok" and name == INTERLEAVED:
                status = f"jxent/jax_naive time {out['ratio']:.3f}"
            elif status == "ok":
                s = out["stats"]
                status = (
                    f"median {s['median_ms']:.0f} ms, peak extra "
                    f"{out['peak_extra'] / MiB:.0f} MiB"
                )
            bar.write(f"{case.label} {name}: {status}", file=sys.stderr)
            bar.update()
    env["load_average_end"] = load_average()
    return {"environment": env, "cases": summarize_cases(config.cases, results)}


def merge_rounds(runs: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """One contender's workers on one case (one per round) as one result.

    Timings are pooled (the median is over all rounds' calls); memory and the
    rest come from the round with the largest peak extra memory (each round's
    peak is kept in ``peak_extra_rounds``).
    """
    ok = [r for r in runs if r["status"] == "ok"]
    if not ok:
        return runs[0]
    out = dict(max(ok, key=lambda r: r["peak_extra"]))
    if len(runs) > 1:
        out["raw_ms"] = [t for r in ok for t in r["raw_ms"]]
        out["stats"] = summarize(np.asarray(out["raw_ms"]) / 1e3)
        out["peak_extra_rounds"] = [r["peak_extra"] for r in ok]
        out["median_ms_rounds"] = [r["stats"]["median_ms"] for r in ok]
        out["first_call_ms_rounds"] = [r["first_call_ms"] for r in ok]
        out["failed_rounds"] = [r["status"] for r in runs if r["status"] != "ok"]
        out["load_average_end"] = ok[-1].get("load_average_end")
        out["process_wall_s"] = sum(r["process_wall_s"] for r in ok)
    return out


def summarize_cases(
    cases: Sequence[Case], results: Sequence[dict[str, Any]]
) -> list[dict[str, Any]]:
    """Groups worker results by case and adds the issue's ratios."""
    rows = []
    for case in cases:
        key = dataclasses.asdict(case)
        interleaved = next(
            (r for r in results if r["case"] == key and r["contender"] == INTERLEAVED),
            None,
        )
        results_ = [r for r in results if r["contender"] != INTERLEAVED]
        by_name = {
            name: merge_rounds(
                [r for r in results_ if r["case"] == key and r["contender"] == name]
            )
            for name in dict.fromkeys(r["contender"] for r in results_)
            if any(r["case"] == key and r["contender"] == name for r in results_)
        }
        ok = {k: r for k, r in by_name.items() if r["status"] == "ok"}

        def t(k: str, ok: dict[str, Any] = ok) -> float | None:
            return ok[k]["stats"]["median_ms"] if k in ok else None

        def m(k: str, ok: dict[str, Any] = ok) -> float | None:
            return ok[k]["peak_extra"] if k in ok else None

        def div(a: float | None, b: float | None) -> float | None:
            return None if a is None or b is None or b <= 0 else a / b

        loss_ref = ok.get(JAX_NAIVE, ok.get(JXENT, {})).get("values", {}).get("loss")
        rows.append(
            {
                **key,
                "grad_bytes": case.grad_bytes,
                "logits_bytes": case.n * case.v * case.itemsize,
                "budget_bytes": case.budget,
                "ratios": {
                    "jxent/jax_naive time": div(t(JXENT), t(JAX_NAIVE)),
                    "jxent/torch_chunked time": div(t(JXENT), t(TORCH_CHUNKED)),
                    "jxent/torch_naive time": div(t(JXENT), t(TORCH_NAIVE)),
                    "jxent/torch_chunked memory": div(m(JXENT), m(TORCH_CHUNKED)),
                    "jxent/jax_naive memory": div(m(JXENT), m(JAX_NAIVE)),
                    "jxent memory/budget": div(m(JXENT), case.budget),
                    "jxent/jax_naive time interleaved": (
                        interleaved["ratio"]
                        if interleaved and interleaved["status"] == "ok"
                        else None
                    ),
                },
                "interleaved": interleaved,
                "loss_rel_diff": {
                    k: None
                    if loss_ref is None
                    else abs(r["values"]["loss"] - loss_ref) / abs(loss_ref)
                    for k, r in ok.items()
                },
                "results": by_name,
            }
        )
    return rows


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def mib(value: float | None) -> str:
    """Bytes as MiB for a table cell."""
    return "—" if value is None else f"{value / MiB:,.0f}"


def verdict(value: float | None, target: float) -> str:
    """The ratio and whether it meets its target (≤)."""
    if value is None:
        return "—"
    return f"{value:.2f} ({'ok' if value <= target else 'over'})"


def case_title(row: dict[str, Any]) -> str:
    return f"N={row['n']}, D={row['d']}, V={row['v']}, {row['dtype']}"


def contender_table(row: dict[str, Any]) -> list[str]:
    """One line per contender of a case: times, memory, check values."""
    lines = [
        "| contender | median ms | min ms | IQR/median | calls | first call ms "
        "| compile s "
        "| peak extra MiB | first call extra MiB | XLA temp+out MiB | loss "
        "| loss rel. diff |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in row["results"].items():
        if r["status"] != "ok":
            lines.append(f"| {name} | {r['status']} |" + " |" * 10)
            continue
        s = r["stats"]
        lines.append(
            f"| {name} | {s['median_ms']:,.0f} | {s['min_ms']:,.0f} "
            f"| {s['iqr_rel']:.0%} | {len(r['raw_ms'])} | {r['first_call_ms']:,.0f} "
            f"| {fmt(r.get('compile_s'), '.2f')} | {mib(r['peak_extra'])} "
            f"| {mib(r['peak_first_call'])} "
            f"| {mib(r.get('xla_temp_plus_output'))} "
            f"| {r['values']['loss']:.6g} "
            f"| {fmt(row['loss_rel_diff'].get(name), '.1e')} |"
        )
    return lines


def ratio_lines(row: dict[str, Any]) -> list[str]:
    """The issue's checks for one case, as a bullet list."""
    q = row["ratios"]
    inter = row.get("interleaved") or {}
    spread = inter.get("ratio_range")
    return [
        f"- jxent time / jax_naive time: "
        f"{verdict(q['jxent/jax_naive time'], TIME_TARGET)} — target ≤ {TIME_TARGET}",
        f"- the same, both in one process, interleaved: "
        f"{verdict(q.get('jxent/jax_naive time interleaved'), TIME_TARGET)}"
        + (
            f" (per round {spread[0]:.2f}–{spread[1]:.2f}, "
            f"{len(inter['raw_ms'][JXENT])} rounds)"
            if spread
            else ""
        ),
        f"- jxent peak extra memory / budget: "
        f"{verdict(q['jxent memory/budget'], 1.0)} — budget "
        f"1.5 × (dx + dw = {mib(row['grad_bytes'])} MiB) + 64 MiB = "
        f"{mib(row['budget_bytes'])} MiB",
        f"- jxent / torch_chunked: time {fmt(q['jxent/torch_chunked time'], '.2f')}, "
        f"memory {fmt(q['jxent/torch_chunked memory'], '.2f')}",
        f"- jxent / torch_naive time {fmt(q['jxent/torch_naive time'], '.2f')}; "
        f"jxent / jax_naive memory {fmt(q['jxent/jax_naive memory'], '.2f')}",
    ]


def sweep_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per V: medians, peak extra memory and ratios."""
    head = (
        "| N×D×V | logits MiB | budget MiB "
        + " ".join(f"| {k} ms" for k in CONTENDERS)
        + " "
        + " ".join(f"| {k} MiB" for k in CONTENDERS)
        + " | jxent/jax_naive time | interleaved | jxent/torch_chunked time "
        "| jxent/torch_chunked mem | jxent mem/budget |"
    )
    lines = [head, "|" + "---|" * (head.count("|") - 1)]
    for row in rows:
        res = row["results"]

        def med(k: str, res: dict[str, Any] = res) -> str:
            r = res.get(k)
            if r is None:
                return "—"
            if r["status"] != "ok":
                return "skipped" if r["status"].startswith("skipped") else "failed"
            return f"{r['stats']['median_ms']:,.0f}"

        def mem(k: str, res: dict[str, Any] = res) -> str:
            r = res.get(k)
            return mib(r["peak_extra"]) if r and r["status"] == "ok" else "—"

        q = row["ratios"]
        lines.append(
            f"| {row['n']}×{row['d']}×{row['v']} | {mib(row['logits_bytes'])} "
            f"| {mib(row['budget_bytes'])} "
            + " ".join(f"| {med(k)}" for k in CONTENDERS)
            + " "
            + " ".join(f"| {mem(k)}" for k in CONTENDERS)
            + f" | {fmt(q['jxent/jax_naive time'], '.2f')} "
            f"| {fmt(q.get('jxent/jax_naive time interleaved'), '.2f')} "
            f"| {fmt(q['jxent/torch_chunked time'], '.2f')} "
            f"| {fmt(q['jxent/torch_chunked memory'], '.2f')} "
            f"| {fmt(q['jxent memory/budget'], '.2f')} |"
        )
    return lines


def worker_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per worker: baseline RSS, memory method, load, notes."""
    lines = [
        "| case | contender | RSS after inputs MiB | peak RSS MiB | extra after MiB "
        "| memory method | load avg start → end | wall s | notes |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        for name, r in row["results"].items():
            if r["status"] != "ok":
                continue
            notes = []
            if r.get("chunk_size"):
                notes.append(f"chunk_size={r['chunk_size']}")
            if isinstance(r.get("torch_options"), dict):
                o = r["torch_options"]
                notes.append(
                    f"batch_chunk_size={o.get('batch_chunk_size')}, "
                    f"acc_policy={o.get('acc_policy')}"
                )
            if r.get("torch_threads"):
                notes.append(f"{r['torch_threads']} torch threads")
            if r.get("peak_extra_rounds"):
                peaks = "/".join(mib(b) for b in r["peak_extra_rounds"])
                meds = "/".join(f"{t:,.0f}" for t in r["median_ms_rounds"])
                notes.append(f"rounds: peak extra {peaks} MiB, median {meds} ms")
            notes += [w[:80] for w in r.get("warnings", [])]
            load0, load1 = r.get("load_average_start"), r.get("load_average_end")
            lines.append(
                f"| {case_title(row)} | {name} | {mib(r['rss_baseline'])} "
                f"| {mib(r['peak_rss'])} | {mib(r['rss_end_extra'])} "
                f"| {r['memory_method']} | {load0 and load0[0]} → {load1 and load1[0]} "
                f"| {r['process_wall_s']:.0f} | {'; '.join(notes)} |"
            )
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The whole ``linear_results.md``."""
    env = result["environment"]
    v = env["versions"]
    rows = result["cases"]
    main = [r for r in rows if (r["n"], r["d"], r["v"]) == MAIN_SHAPE]
    main = main or [r for r in rows if r["kind"] == "quick"][-1:]
    sweep = [r for r in rows if r["kind"] in ("sweep", "quick")]
    llm = [r for r in rows if r["kind"] == "llm"]
    gemma = [r for r in rows if r["kind"] == "gemma"]
    methods = sorted(
        {
            c["memory_method"]
            for r in rows
            for c in r["results"].values()
            if "memory_method" in c
        }
    )
    kinds = dict.fromkeys(r["kind"] for r in rows)
    repeats = ", ".join(
        f"{k} {env['repeats'][k]} after {env['warmup'][k]} warm-up" for k in kinds
    )
    lines = [
        f"# linear_cross_entropy benchmark — {env['cpu_model']}",
        "",
        f"- date: {env['date']}; jxent revision {env['jxent_revision']}",
        f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores), memory "
        f"{mib(env['mem_total'])} MiB; {env['platform']}; JAX devices "
        f"{', '.join(env['devices'])}",
        f"- load average (1, 5, 15 min) at start {env['load_average_start']}, at end "
        f"{env.get('load_average_end')}; wall time {fmt(env.get('wall_s'), '.0f')} s",
        f"- jax {v['jax']}, jaxlib {v['jaxlib']}, numpy {v['numpy']}, torch "
        f"{v['torch']} ({env['torch_threads'] or env['torch_default_threads']} "
        "threads)",
        f"- value_and_grad w.r.t. x and w; timed calls per worker: {repeats} "
        f"(fewer, at least {MIN_REPEATS}, beyond {env['time_budget_s']} s; the "
        "contender tables give each worker's count); "
        f"each contender in its own process, {env['rounds']} round(s) per case; "
        "times are medians in ms",
        f"- peak extra memory = peak RSS during the timed calls − RSS after the "
        f"inputs were created (and JAX programs compiled); method: "
        f"{', '.join(methods) or '—'}; malloc env: {env['malloc_env'] or 'default'}",
        "",
        "Contenders: "
        + "; ".join(f"`{k}` = `{d}`" for k, d in env["contenders"].items()),
        "",
    ]
    for title, group in (("Main shape", main), ("Gemma 2 2B shape", gemma)):
        for row in group:
            lines += [
                f"## {title}: {case_title(row)}",
                "",
                *ratio_lines(row),
                "",
                *contender_table(row),
                "",
            ]
    if sweep:
        r0 = sweep[0]
        lines += [
            f"## Sweep over V (N={r0['n']}, D={r0['d']}, {r0['dtype']})",
            "",
            "Median ms and peak extra memory (MiB) per contender; budget = "
            "1.5 × (dx + dw) + 64 MiB.",
            "",
            *sweep_table(sweep),
            "",
        ]
    for dtype in dict.fromkeys(r["dtype"] for r in llm):
        lines += [
            f"## LLM heads ({dtype})",
            "",
            "Median ms and peak extra memory (MiB) per contender; budget = "
            "1.5 × (dx + dw in float32) + 64 MiB.",
            "",
            *sweep_table([r for r in llm if r["dtype"] == dtype]),
            "",
        ]
    lines += ["## Workers", "", *worker_table(rows), ""]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """``linear_memory_vs_V.png``: peak extra memory and time against V."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = [r for r in result["cases"] if r["kind"] in ("sweep", "quick", "llm")]
    fig, (ax_m, ax_t) = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip(CONTENDERS, cycle, strict=False))
    dtypes = list(dict.fromkeys(r["dtype"] for r in rows))
    lines = dict(zip(dtypes, ("-", "--", ":"), strict=False))
    for dtype in dtypes:
        group = [r for r in rows if r["dtype"] == dtype]
        vs = [r["v"] for r in group]
        for name in CONTENDERS:
            ok = [(r, r["results"].get(name)) for r in group]
            ok = [(r, c) for r, c in ok if c and c["status"] == "ok"]
            if not ok:
                continue
            style = {"marker": "o", "color": colors[name], "ls": lines[dtype]}
            label = f"{name} {dtype}"
            ax_m.plot(
                [r["v"] for r, _ in ok], [c["peak_extra"] / MiB for _, c in ok],
                label=label, **style,
            )  # fmt: skip
            naive = [r["results"].get(JAX_NAIVE) for r, _ in ok]
            ratio = [
                (r["v"], c["stats"]["median_ms"] / b["stats"]["median_ms"])
                for (r, c), b in zip(ok, naive, strict=True)
                if b and b["status"] == "ok"
            ]
            if name == JXENT:
                inter = [
                    (r["v"], r["ratios"].get("jxent/jax_naive time interleaved"))
                    for r in group
                ]
                inter = [(v, q) for v, q in inter if q is not None]
                if inter:
                    ax_t.plot(
                        *zip(*inter, strict=True), label=f"jxent {dtype} interleaved",
                        marker="s", color=colors[name], ls=lines[dtype], alpha=0.5,
                    )  # fmt: skip
            if ratio:
                ax_t.plot(*zip(*ratio, strict=True), label=label, **style)
        if group:
            ax_m.plot(
                vs, [r["budget_bytes"] / MiB for r in group], "k", ls=lines[dtype],
                alpha=0.6, label=f"budget 1.5 (dx+dw f32) + 64 MiB ({dtype})",
            )  # fmt: skip
    if rows:
        ax_t.axhline(TIME_TARGET, color="k", alpha=0.6, label=f"target {TIME_TARGET}")
    ax_m.set(
        xscale="log", yscale="log", xlabel="V (vocabulary)", ylabel="peak extra MiB"
    )
    ax_t.set(xscale="log", xlabel="V (vocabulary)", ylabel="time / jax_naive time")
    if rows:
        shapes = ", ".join(dict.fromkeys(f"{r['n']}×{r['d']}×{r['v']}" for r in rows))
        ax_m.set_title(f"peak extra memory (RSS); N×D×V: {shapes}", fontsize=8)
        ax_t.set_title("value_and_grad time relative to naive JAX (same run)")
    for ax in (ax_m, ax_t):
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    fig.suptitle(f"linear_cross_entropy — {result['environment']['cpu_model']}")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Writes the table, the raw JSON and the plot; returns their paths."""
    names = ("linear_results.md", "linear_results.json", "linear_memory_vs_V.png")
    return write_report(result, out_dir, names, render_markdown, plot)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, smoke test")
    p.add_argument(
        "--vocab-sizes",
        type=lambda s: tuple(int(v) for v in s.split(",")),
        help=f"V of the sweep at N={SWEEP_N}, D={SWEEP_D} "
        f"(default {','.join(map(str, SWEEP_V))}; {MAIN_SHAPE[2]} is the main shape)",
    )
    p.add_argument(
        "--gemma",
        action="store_true",
        help=f"also {GEMMA_SHAPE} bfloat16 (contenders that would not fit are skipped)",
    )
    p.add_argument(
        "--llm",
        action="store_true",
        help=f"the LLM heads {LLM_SHAPES} in {' and '.join(LLM_DTYPES)} instead of "
        "the V sweep (--vocab-sizes selects among them)",
    )
    p.add_argument(
        "--dtypes",
        type=lambda s: tuple(s.split(",")),
        default=LLM_DTYPES,
        help=f"with --llm: comma-separated subset of {','.join(LLM_DTYPES)}",
    )
    p.add_argument(
        "--contenders",
        type=lambda s: tuple(s.split(",")),
        default=CONTENDERS,
        help=f"comma-separated subset of {','.join(CONTENDERS)}",
    )
    p.add_argument(
        "--repeats",
        type=int,
        help="timed calls per worker (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_REPEATS.items())
        + ")",
    )
    p.add_argument(
        "--warmup",
        type=int,
        help="untimed calls after the first (default: "
        + ", ".join(f"{k} {v}" for k, v in DEFAULT_WARMUP.items())
        + ")",
    )
    p.add_argument("--out-dir", type=Path, help="default benchmarks/results/cpu")
    p.add_argument("--torch-threads", type=int, help="torch.set_num_threads")
    p.add_argument(
        "--mem-limit-gib",
        type=float,
        default=18.0,
        help="skip contenders estimated to need more (GiB; default 18)",
    )
    p.add_argument(
        "--memory-method",
        choices=("auto", "clear_refs", "sample"),
        default="auto",
        help="peak RSS by resetting VmHWM (clear_refs) or sampling VmRSS every "
        "1 ms (sample); auto: clear_refs where the kernel allows it",
    )
    p.add_argument(
        "--time-budget",
        type=float,
        default=60.0,
        help="seconds of timed calls per worker: fewer repeats (at least "
        f"{MIN_REPEATS}, and no warm-up if {MIN_REPEATS} calls exceed it) for slow "
        "contenders, judged by the first call; 0: always --repeats (default 60)",
    )
    p.add_argument(
        "--rounds",
        type=int,
        default=1,
        help="run every contender's worker this many times per case, in "
        "alternating order (timings pooled, largest peak kept; default 1)",
    )
    p.add_argument(
        "--interleaved",
        type=int,
        default=0,
        metavar="R",
        help="per case, also time jxent and jax_naive in one process, "
        "interleaved, R rounds (default 0: off)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--worker", metavar="SPEC", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    unknown = set(args.contenders) - set(CONTENDERS)
    if unknown:
        p.error(f"unknown contenders {sorted(unknown)}; choose from {CONTENDERS}")
    return args


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's Config from parsed options."""
    if args.quick:
        vocab = args.vocab_sizes or QUICK_V
        cases = [Case(QUICK_N, QUICK_D, v, "float32", "quick") for v in vocab]
    else:
        vocab = args.vocab_sizes or SWEEP_V
        cases = [Case(SWEEP_N, SWEEP_D, v, "float32", "sweep") for v in vocab]
    if args.llm:
        cases = [
            Case(*shape, dtype, "llm")
            for dtype in LLM_DTYPES
            if dtype in args.dtypes
            for shape in LLM_SHAPES
            if args.vocab_sizes is None or shape[2] in args.vocab_sizes
        ]
    if args.gemma:
        cases.append(Case(*GEMMA_SHAPE, "bfloat16", "gemma"))
    kinds = DEFAULT_REPEATS.keys()
    return Config(
        cases=tuple(cases),
        contenders=tuple(k for k in CONTENDERS if k in args.contenders),
        repeats={
            k: DEFAULT_REPEATS[k] if args.repeats is None else args.repeats
            for k in kinds
        },
        warmup={
            k: DEFAULT_WARMUP[k] if args.warmup is None else args.warmup for k in kinds
        },
        torch_threads=args.torch_threads,
        seed=args.seed,
        mem_limit=int(args.mem_limit_gib * 2**30),
        memory_method=args.memory_method,
        quick=args.quick,
        rounds=max(1, args.rounds),
        time_budget_s=args.time_budget or None,
        interleaved=max(0, args.interleaved),
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark (or, with ``--worker``, one measurement)."""
    args = parse_args(argv)
    if args.worker is not None:
        return worker_main(args.worker)
    config = config_from_args(args)
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / "cpu"
    start = time.perf_counter()
    result = run_benchmark(config)
    result["environment"]["wall_s"] = time.perf_counter() - start
    paths = write_outputs(result, out_dir)
    print(render_markdown(result).split("## Workers")[0].rstrip())
    print(f"\n{time.perf_counter() - start:.0f} s; wrote", *map(str, paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
