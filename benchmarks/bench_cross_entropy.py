"""Benchmark ``jxent.cross_entropy`` against optax, plain JAX, torch and memory floors.

One process, every contender once per round in a fresh random order, medians of
many rounds after warm-up; compilation is timed separately. torch's OpenMP
threads are told to sleep when idle (``OMP_WAIT_POLICY=PASSIVE``, unless set):
spinning, they take the cores from whichever contender runs next. Writes
``results.md``, ``results.json`` and ``time_vs_C.png`` to ``--out-dir``
(default ``benchmarks/results/<device-kind>``). See ``benchmarks/README.md``.

Usage::

    python benchmarks/bench_cross_entropy.py            # full run (~10 min, 2-core CPU)
    python benchmarks/bench_cross_entropy.py --quick    # tiny shapes, CI smoke test
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime
import gc
import json
import os
import platform
import re
import subprocess
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

# Before torch loads its OpenMP runtime (see the module docstring).
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import jax
import jax.numpy as jnp
import numpy as np
import optax

import jxent

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is optional: its columns are then left out.
    torch = None
    F = None

ROOT = Path(__file__).resolve().parents[1]
FULL_SHAPES = ((4096, 1024), (8192, 1024), (2048, 32768), (512, 131072))
QUICK_SHAPES = ((256, 512), (32, 8192))
DTYPES = ("float32", "bfloat16")
PASSES = ("fwd", "fwd+bwd")
LABEL_SMOOTHING = 0.1
IGNORE_FRACTION = 0.1
IGNORE_INDEX = -100
BIG_CASE_ELEMENTS = 1 << 24  # cases with at least this many logits are "big"
AUTO_REPEATS = {"big": 15, "small": 30, "quick": 3}

# Contender names, in the order they are reported.
JXENT, JXENT_W = "jxent", "jxent_weighted"
OPTAX, PLAIN = "optax", "plain_jax"
TORCH, TORCH_W = "torch", "torch_weighted"
FLOOR, FLOOR_IN_PLACE = "floor", "floor_in_place"
CONTENDERS = (JXENT, JXENT_W, OPTAX, PLAIN, TORCH, TORCH_W, FLOOR, FLOOR_IN_PLACE)


@dataclasses.dataclass(frozen=True)
class Config:
    """What to run: shapes, dtypes, repeat counts and whether torch takes part."""

    shapes: tuple[tuple[int, int], ...]
    dtypes: tuple[str, ...] = DTYPES
    repeats: int | None = None  # None: AUTO_REPEATS by case size
    warmup: int = 1
    use_torch: bool = True
    torch_threads: int | None = None  # None: torch's default
    seed: int = 0
    quick: bool = False
    calls_per_sample: int | None = None  # None: 1 on CPU, 20 on accelerators

    def calls(self) -> int:
        """Calls timed together per sample (amortises dispatch on accelerators)."""
        if self.calls_per_sample is not None:
            return self.calls_per_sample
        return 1 if jax.default_backend() == "cpu" else 20

    def repeats_for(self, n: int, c: int) -> int:
        """Timed repeats for an (n, c) case: the explicit count, else by size."""
        if self.repeats is not None:
            return self.repeats
        if self.quick:
            return AUTO_REPEATS["quick"]
        return AUTO_REPEATS["big" if n * c >= BIG_CASE_ELEMENTS else "small"]


@dataclasses.dataclass
class Contender:
    """One timed callable: ``call(k)`` runs it k times, then blocks on the last."""

    name: str
    call: Callable[[int], Any]
    reset: Callable[[], None] | None = None  # untimed, before every call
    compile_s: float | None = None
    memory: dict[str, int] | None = None
    note: str = ""


@dataclasses.dataclass
class Inputs:
    """Logits and targets of one case, as JAX arrays (and torch tensors)."""

    x: jax.Array
    target: jax.Array  # every entry a valid class
    target_ignored: jax.Array  # about IGNORE_FRACTION set to IGNORE_INDEX
    weight: jax.Array  # float32 class weights
    torch: dict[str, Any] = dataclasses.field(default_factory=dict)


# --------------------------------------------------------------------------- #
# Environment
# --------------------------------------------------------------------------- #


def cpu_model() -> str:
    """The CPU's model name from /proc/cpuinfo, else what ``platform`` knows."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_slug() -> str:
    """A directory-safe name for JAX's default device kind, e.g. ``cpu``."""
    kind = jax.devices()[0].device_kind.lower()
    return re.sub(r"[^a-z0-9]+", "-", kind).strip("-") or jax.default_backend()


def torch_device() -> str | None:
    """``"cuda"`` when torch sees a GPU, ``"cpu"`` otherwise, None without torch."""
    if torch is None:
        return None
    return "cuda" if torch.cuda.is_available() else "cpu"


def git_revision() -> str | None:
    """The checkout's commit, with ``-dirty`` when the tree has changes."""
    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def load_average() -> list[float] | None:
    """The 1, 5 and 15 minute load averages (other work skews CPU timings)."""
    try:
        return [round(v, 2) for v in os.getloadavg()]
    except (OSError, AttributeError):
        return None


def environment(config: Config) -> dict[str, Any]:
    """Device description, library versions and settings of this run."""
    import jaxlib

    dev = torch_device()
    torch_info = None
    if torch is not None and config.use_torch:
        torch_info = {
            "version": torch.__version__,
            "device": dev,
            "num_threads": torch.get_num_threads(),
            "cuda_device": torch.cuda.get_device_name() if dev == "cuda" else None,
        }
    return {
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "backend": jax.default_backend(),
        "devices": [str(d) for d in jax.devices()],
        "device_kind": jax.devices()[0].device_kind,
        "cpu_model": cpu_model(),
        "cpu_count": os.cpu_count(),
        "load_average_start": load_average(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "versions": {
            "jax": jax.__version__,
            "jaxlib": jaxlib.__version__,
            "optax": optax.__version__,
            "numpy": np.__version__,
            "jxent": getattr(jxent, "__version__", "?"),
            "torch": torch.__version__ if torch is not None else None,
        },
        "jxent_revision": git_revision(),
        "torch": torch_info,
        "quick": config.quick,
        "warmup": config.warmup,
        "calls_per_sample": config.calls(),
        "repeats": {f"{n}x{c}": config.repeats_for(n, c) for n, c in config.shapes},
        "label_smoothing": LABEL_SMOOTHING,
        "ignore_fraction": IGNORE_FRACTION,
    }


# --------------------------------------------------------------------------- #
# Inputs
# --------------------------------------------------------------------------- #


def make_inputs(n: int, c: int, dtype: str, seed: int) -> Inputs:
    """Random N(0, 1) logits in ``dtype``, targets, ignored targets and weights."""
    kx, kt, ki, kw = jax.random.split(jax.random.key(seed), 4)
    x = jax.random.normal(kx, (n, c), jnp.float32).astype(dtype)
    target = jax.random.randint(kt, (n,), 0, c, jnp.int32)
    ignored = jax.random.bernoulli(ki, IGNORE_FRACTION, (n,))
    target_ignored = jnp.where(ignored, IGNORE_INDEX, target)
    weight = jax.random.uniform(kw, (c,), jnp.float32, 0.5, 2.0)
    return Inputs(*jax.block_until_ready((x, target, target_ignored, weight)))


def to_torch(array: jax.Array, device: str) -> Any:
    """A torch copy of a JAX array on ``device``.

    DLPack (no host round trip) when JAX and torch share the device kind (CPU,
    or a CUDA GPU), else through host memory, e.g. from a TPU to torch's CPU.
    """
    platform = next(iter(array.devices())).platform
    if (platform, device) in {("cpu", "cpu"), ("gpu", "cuda"), ("cuda", "cuda")}:
        try:
            return torch.from_dlpack(array).to(device).clone()
        except (RuntimeError, TypeError, ValueError, BufferError):
            pass  # fall back to the host copy below
    bf16 = array.dtype == jnp.bfloat16
    host = np.array(array.astype(jnp.float32) if bf16 else array)  # writable
    tensor = torch.from_numpy(host)
    if bf16:
        tensor = tensor.to(torch.bfloat16)
    return tensor.to(device)


def attach_torch(inputs: Inputs, device: str) -> None:
    """Adds the torch copies (one more N×C array) to ``inputs.torch``."""
    x = to_torch(inputs.x, device)
    inputs.torch = {
        "x": x.requires_grad_(True),
        "target": to_torch(inputs.target, device).long(),
        "target_ignored": to_torch(inputs.target_ignored, device).long(),
        # torch requires the weight in the logits' dtype.
        "weight": to_torch(inputs.weight, device).to(x.dtype),
    }


def release(inputs: Inputs | None) -> None:
    """Drops the arrays of a finished case and returns torch's cached memory."""
    if inputs is not None:
        inputs.torch.clear()
    gc.collect()
    if torch is not None and torch.cuda.is_available():
        torch.cuda.empty_cache()


# --------------------------------------------------------------------------- #
# Contenders
# --------------------------------------------------------------------------- #


def jxent_loss(x: jax.Array, t: jax.Array) -> jax.Array:
    """The contender under test: default options."""
    return jxent.cross_entropy(x, t)


def jxent_weighted_loss(x: jax.Array, t: jax.Array, w: jax.Array) -> jax.Array:
    """Class weights, label smoothing and ignored targets together."""
    return jxent.cross_entropy(
        x, t, w, ignore_index=IGNORE_INDEX, label_smoothing=LABEL_SMOOTHING
    )


def optax_loss(x: jax.Array, t: jax.Array) -> jax.Array:
    """optax's integer-label cross-entropy, averaged."""
    return optax.softmax_cross_entropy_with_integer_labels(x, t).mean()


def plain_jax_loss(x: jax.Array, t: jax.Array) -> jax.Array:
    """The textbook version: log_softmax, gather, mean."""
    logp = jax.nn.log_softmax(x, -1)
    return -jnp.take_along_axis(logp, t[:, None], -1).mean()


def read_floor(x: jax.Array) -> jax.Array:
    """One read of the logits: the least any forward pass must do."""
    return jnp.max(x)


def copy_floor(x: jax.Array) -> jax.Array:
    """Read the logits and write a new buffer of their size, as dx must be."""
    return x + 1


def in_place_floor(x: jax.Array) -> Contender:
    """The copy floor written into a donated buffer that was touched before.

    The difference to the copy floor is what a fresh N×C output costs beyond
    the memory traffic: the operating system maps and zeroes its pages on first
    touch. Every contender's gradient is such a fresh buffer.
    """
    compiled = jax.jit(copy_floor, donate_argnums=0).lower(x).compile()
    buffers: list[jax.Array] = []

    def reset() -> None:
        buffers.append(jax.block_until_ready(jnp.copy(x)))

    def call(k: int) -> Any:
        out = buffers.pop()
        for _ in range(k):
            out = compiled(out)  # each call donates the previous result
        return jax.block_until_ready(out)

    return Contender(FLOOR_IN_PLACE, call=call, reset=reset)


def memory_of(compiled: Any) -> dict[str, int] | None:
    """``memory_analysis()`` of a compiled program as plain ints, if available."""
    try:
        stats = compiled.memory_analysis()
    except (NotImplementedError, RuntimeError, AttributeError):
        return None
    if stats is None:
        return None
    fields = ("temp", "argument", "output", "alias", "generated_code")
    return {f: int(getattr(stats, f"{f}_size_in_bytes", -1)) for f in fields}


def jax_contender(
    name: str, fn: Callable[..., Any], args: Sequence[jax.Array], grad: bool
) -> Contender:
    """Compiles ``fn`` (or its value_and_grad w.r.t. the logits) ahead of time."""
    program = jax.value_and_grad(fn) if grad else fn
    start = time.perf_counter()
    compiled = jax.jit(program).lower(*args).compile()
    compile_s = time.perf_counter() - start

    def call(k: int) -> Any:
        for _ in range(k):
            out = compiled(*args)
        return jax.block_until_ready(out)

    return Contender(
        name,
        call=call,
        compile_s=compile_s,
        memory=memory_of(compiled),
    )


def torch_loss_contender(name: str, tt: dict, loss_fn, grad: bool) -> Contender:
    """``loss_fn(x)``; with ``grad``, ``backward()`` into a fresh gradient."""
    x = tt["x"] if grad else tt["x"].detach()
    sync = torch.cuda.synchronize if x.is_cuda else (lambda: None)

    def call(k: int) -> Any:
        for _ in range(k):
            if grad:
                tt["x"].grad = None
            loss = loss_fn(x)
            if grad:
                loss.backward()
        sync()
        return loss

    def reset() -> None:
        tt["x"].grad = None

    note = "bf16 on CPU" if x.dtype == torch.bfloat16 and not x.is_cuda else ""
    return Contender(name, call=call, reset=reset if grad else None, note=note)


def torch_contender(name: str, inputs: Inputs, weighted: bool, grad: bool) -> Contender:
    """``F.cross_entropy``; with ``grad``, ``loss.backward()`` and a fresh grad."""
    tt = inputs.torch
    target = tt["target_ignored"] if weighted else tt["target"]
    kwargs = {}
    if weighted:
        kwargs = {
            "weight": tt["weight"],
            "ignore_index": IGNORE_INDEX,
            "label_smoothing": LABEL_SMOOTHING,
        }
    return torch_loss_contender(
        name, tt, lambda x: F.cross_entropy(x, target, **kwargs), grad
    )


def build_contenders(inputs: Inputs, grad: bool, use_torch: bool) -> list[Contender]:
    """All contenders of one case, in reporting order."""
    x, t, ti, w = inputs.x, inputs.target, inputs.target_ignored, inputs.weight
    contenders = [
        jax_contender(JXENT, jxent_loss, (x, t), grad),
        jax_contender(JXENT_W, jxent_weighted_loss, (x, ti, w), grad),
        jax_contender(OPTAX, optax_loss, (x, t), grad),
        jax_contender(PLAIN, plain_jax_loss, (x, t), grad),
    ]
    if use_torch:
        contenders += [
            torch_contender(TORCH, inputs, weighted=False, grad=grad),
            torch_contender(TORCH_W, inputs, weighted=True, grad=grad),
        ]
    floor = copy_floor if grad else read_floor
    contenders.append(jax_contender(FLOOR, floor, (x,), grad=False))
    if grad:
        contenders.append(in_place_floor(x))
    return contenders


# --------------------------------------------------------------------------- #
# Timing
# --------------------------------------------------------------------------- #


def timed_call(contender: Contender, calls: int = 1) -> float:
    """Seconds per call over ``calls`` back-to-back calls and one final wait.

    Resets and frees happen outside the clock.
    """
    if contender.reset is not None:
        contender.reset()
    start = time.perf_counter()
    out = contender.call(calls)
    elapsed = time.perf_counter() - start
    del out
    return elapsed / calls


def time_interleaved(
    contenders: Sequence[Contender], repeats: int, warmup: int, calls: int = 1
) -> tuple[dict[str, float], dict[str, list[float]]]:
    """First-call times, then ``repeats`` rounds after warm-up.

    Each round calls every contender once in a fresh random order (seeded), so
    slow drifts of the machine and whatever one contender leaves behind (busy
    threads, dirty caches) hit all contenders alike.
    """
    first = {c.name: timed_call(c) for c in contenders}
    for _ in range(warmup):
        for c in contenders:
            timed_call(c, calls)
    times: dict[str, list[float]] = {c.name: [] for c in contenders}
    gc.collect()
    gc.disable()
    try:
        order = np.random.default_rng(0)
        for _ in range(repeats):
            for i in order.permutation(len(contenders)):
                c = contenders[i]
                times[c.name].append(timed_call(c, calls))
    finally:
        gc.enable()
    return first, times


def summarize(samples: Sequence[float]) -> dict[str, float]:
    """Median, min, quartiles and relative interquartile spread, in ms."""
    ms = np.asarray(samples) * 1e3
    q1, med, q3 = np.percentile(ms, [25, 50, 75])
    return {
        "median_ms": float(med),
        "min_ms": float(ms.min()),
        "q1_ms": float(q1),
        "q3_ms": float(q3),
        "iqr_rel": float((q3 - q1) / med) if med > 0 else float("nan"),
    }


def ratio(stats: dict[str, dict[str, float]], a: str, b: str) -> float | None:
    """Median of ``a`` over median of ``b``, None when either is missing."""
    if a not in stats or b not in stats:
        return None
    return stats[a]["median_ms"] / stats[b]["median_ms"]


def first_touch_ms(stats: dict[str, dict[str, float]]) -> float | None:
    """Copy floor minus the in-place copy: the cost of a fresh N×C output."""
    if FLOOR_IN_PLACE not in stats:
        return None
    return stats[FLOOR]["median_ms"] - stats[FLOOR_IN_PLACE]["median_ms"]


def run_case(inputs: Inputs, grad: bool, config: Config) -> dict[str, Any]:
    """Times every contender on one shape × dtype × pass; returns the row."""
    n, c = inputs.x.shape
    itemsize = inputs.x.dtype.itemsize
    use_torch = config.use_torch and bool(inputs.torch)
    contenders = build_contenders(inputs, grad, use_torch)
    repeats = config.repeats_for(n, c)
    first, times = time_interleaved(contenders, repeats, config.warmup, config.calls())
    stats = {name: summarize(ts) for name, ts in times.items()}
    array_bytes = n * c * itemsize
    min_bytes = 2 * array_bytes if grad else array_bytes
    floor_s = stats[FLOOR]["median_ms"] / 1e3
    row = {
        "n": n,
        "c": c,
        "dtype": str(inputs.x.dtype),
        "pass": PASSES[int(grad)],
        "repeats": repeats,
        "array_bytes": array_bytes,
        "min_bytes": min_bytes,
        "floor_kind": "copy (x + 1)" if grad else "read (max x)",
        "floor_gbps": min_bytes / floor_s / 1e9,
        "first_touch_ms": first_touch_ms(stats),
        "jxent_gbps": min_bytes / (stats[JXENT]["median_ms"] / 1e3) / 1e9,
        "stats": stats,
        "ratios": {
            "jxent/optax": ratio(stats, JXENT, OPTAX),
            "jxent/plain_jax": ratio(stats, JXENT, PLAIN),
            "jxent/torch": ratio(stats, JXENT, TORCH),
            "jxent/floor": ratio(stats, JXENT, FLOOR),
            "weighted/plain": ratio(stats, JXENT_W, JXENT),
            "torch weighted/plain": ratio(stats, TORCH_W, TORCH),
            "jxent_w/torch_w": ratio(stats, JXENT_W, TORCH_W),
        },
        "first_call_ms": {k: v * 1e3 for k, v in first.items()},
        "compile_s": {k.name: k.compile_s for k in contenders if k.compile_s},
        "memory": {k.name: k.memory for k in contenders if k.memory is not None},
        "notes": {k.name: k.note for k in contenders if k.note},
        "raw_ms": {k: [v * 1e3 for v in ts] for k, ts in times.items()},
    }
    del contenders
    return row


def run_benchmark(config: Config, progress: bool = True) -> dict[str, Any]:
    """Runs every shape × dtype × pass; returns environment and rows."""
    from tqdm import tqdm  # plain tqdm on stderr, also inside notebooks

    device = torch_device() if config.use_torch else None
    if device is not None and config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    env = environment(config)
    cases = [(s, d) for s in config.shapes for d in config.dtypes]
    rows = []
    bar = tqdm(
        total=len(cases) * len(PASSES),
        desc="cases",
        file=sys.stderr,
        disable=not progress,
    )
    with bar:
        for (n, c), dtype in cases:
            inputs = make_inputs(n, c, dtype, config.seed)
            if device is not None:
                attach_torch(inputs, device)
            for grad in (False, True):
                bar.set_postfix_str(f"{n}x{c} {dtype} {PASSES[int(grad)]}")
                rows.append(run_case(inputs, grad, config))
                bar.update()
            release(inputs)
            del inputs
            release(None)
    return {"environment": env, "rows": rows}


# --------------------------------------------------------------------------- #
# Reporting
# --------------------------------------------------------------------------- #


def fmt(value: float | None, spec: str = ".3g") -> str:
    """A number for a table cell; an em dash when missing."""
    return "—" if value is None else format(value, spec)


def median_of(row: dict[str, Any], name: str) -> float | None:
    """The median time of a contender in a row, None when it did not run."""
    stat = row["stats"].get(name)
    return None if stat is None else stat["median_ms"]


def main_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per shape × dtype × pass: medians (ms) and ratios."""
    head = (
        "| N | C | dtype | pass | min MB | jxent | optax | plain_jax | torch "
        "| floor (GB/s) | jxent GB/s | jxent/optax | jxent/plain_jax | jxent/torch "
        "| jxent/floor | weighted/plain | torch w/plain |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        q = r["ratios"]
        cells = [
            str(r["n"]),
            str(r["c"]),
            r["dtype"],
            r["pass"],
            fmt(r["min_bytes"] / 1e6),
            *(fmt(median_of(r, k)) for k in (JXENT, OPTAX, PLAIN, TORCH)),
            f"{fmt(median_of(r, FLOOR))} ({r['floor_gbps']:.1f})",
            fmt(r["jxent_gbps"], ".1f"),
            *(
                fmt(q[k], ".2f")
                for k in (
                    "jxent/optax",
                    "jxent/plain_jax",
                    "jxent/torch",
                    "jxent/floor",
                    "weighted/plain",
                    "torch weighted/plain",
                )
            ),
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def first_touch_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """fwd+bwd rows: how much of each time is the fresh gradient's first touch."""
    lines = [
        "| N | C | dtype | copy floor | in-place copy | first touch | jxent "
        "| optax | torch | jxent/optax | same, first touch taken off both |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        touch = r.get("first_touch_ms")
        if touch is None:
            continue
        jx, ox = median_of(r, JXENT), median_of(r, OPTAX)
        beyond = None if ox is None or ox <= touch else (jx - touch) / (ox - touch)
        cells = [str(r["n"]), str(r["c"]), r["dtype"]]
        cells += [fmt(median_of(r, k)) for k in (FLOOR, FLOOR_IN_PLACE)]
        cells += [fmt(touch), fmt(jx), fmt(ox), fmt(median_of(r, TORCH))]
        cells += [fmt(r["ratios"]["jxent/optax"], ".2f"), fmt(beyond, ".2f")]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def spread_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """One line per case and contender: median, min, quartiles, compile time."""
    lines = [
        "| case | contender | median ms | min ms | q1–q3 ms | IQR/median "
        "| first call ms | compile s |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        case = f"{r['n']}x{r['c']} {r['dtype']} {r['pass']}"
        for name, s in r["stats"].items():
            note = f" ({r['notes'][name]})" if name in r["notes"] else ""
            lines.append(
                f"| {case} | {name}{note} | {s['median_ms']:.3g} | {s['min_ms']:.3g} "
                f"| {s['q1_ms']:.3g}–{s['q3_ms']:.3g} | {s['iqr_rel']:.0%} "
                f"| {r['first_call_ms'][name]:.3g} "
                f"| {fmt(r['compile_s'].get(name), '.2f')} |"
            )
    return lines


def memory_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    """XLA temp buffers of the compiled programs, in units of one N×C array."""
    names = (JXENT, JXENT_W, OPTAX, PLAIN)
    lines = [
        "| N | C | dtype | pass | N·C·itemsize MB | "
        + " | ".join(f"{k} temp (×N·C)" for k in names)
        + " |",
        "|---|---|---|---|---|" + "---|" * len(names),
    ]
    for r in rows:
        cells = [str(r["n"]), str(r["c"]), r["dtype"], r["pass"]]
        cells.append(fmt(r["array_bytes"] / 1e6, ".1f"))
        for k in names:
            mem = r["memory"].get(k)
            temp = None if mem is None else mem["temp"] / r["array_bytes"]
            cells.append(fmt(temp, ".2f"))
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    """The whole ``results.md``: environment, ratio table, spread and memory."""
    env = result["environment"]
    v = env["versions"]
    torch_line = "not run"
    if env["torch"]:
        t = env["torch"]
        torch_line = f"{t['version']} on {t['device']}, {t['num_threads']} threads"
    repeats = ", ".join(f"{k}: {v}" for k, v in env["repeats"].items())
    lines = [
        f"# cross_entropy benchmark — {env['device_kind']}",
        "",
        f"- date: {env['date']}; jxent revision {env['jxent_revision']}",
        f"- devices: {', '.join(env['devices'])}; CPU: {env['cpu_model']} "
        f"({env['cpu_count']} cores); {env['platform']}",
        f"- load average (1, 5, 15 min) at start {env['load_average_start']}, "
        f"at end {env.get('load_average_end')}; wall time "
        f"{fmt(env.get('wall_s'), '.0f')} s",
        f"- jax {v['jax']}, jaxlib {v['jaxlib']}, optax {v['optax']}, "
        f"numpy {v['numpy']}; torch {torch_line}",
        f"- repeats per case: {repeats} (each the mean of "
        f"{env.get('calls_per_sample', 1)} back-to-back calls); "
        f"warm-up {env['warmup']}; "
        "contenders interleaved in a random order per round; torch's "
        f"OMP_WAIT_POLICY={os.environ.get('OMP_WAIT_POLICY')}; "
        "times are medians in ms",
        "- floor: forward = one read of the logits (`max x`); fwd+bwd = read + "
        "write of an N×C buffer (`x + 1`). min MB = bytes any version must move.",
        f"- weighted = class weights + label_smoothing={LABEL_SMOOTHING} + "
        f"{IGNORE_FRACTION:.0%} targets = {IGNORE_INDEX}; weighted/plain is "
        "jxent's own ratio (target ≤ 1.2).",
        "",
        "## Medians and ratios (lower is better for jxent)",
        "",
        *main_table(result["rows"]),
        "",
        "## fwd+bwd: the fresh gradient buffer",
        "",
        "The gradient is a new N×C buffer on every call, for every contender. "
        "`in-place copy` is the copy floor written into a donated buffer touched "
        "before; `first touch` = copy floor − in-place copy is what mapping and "
        "zeroing the fresh pages costs (ms). The last column compares what is "
        "left once that shared cost is taken off jxent and optax.",
        "",
        *first_touch_table(result["rows"]),
        "",
        "## Spread",
        "",
        *spread_table(result["rows"]),
        "",
        "## XLA temporary buffers (`memory_analysis().temp_size_in_bytes`)",
        "",
        "In units of one N×C array of the logits' dtype; the gradient itself is an "
        "output, not a temp, so 0.00 means no extra N×C buffer.",
        "",
        *memory_table(result["rows"]),
        "",
    ]
    return "\n".join(lines)


def plot(result: dict[str, Any], path: Path) -> None:
    """``time_vs_C.png``: median time against C per contender and dtype."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.8), constrained_layout=True)
    styles = {"float32": "-", "bfloat16": "--", "float16": ":"}
    cycle = plt.rcParams["axes.prop_cycle"].by_key()["color"]
    colors = dict(zip(CONTENDERS, cycle, strict=False))
    for ax, pass_ in zip(axes, PASSES, strict=True):
        for name in CONTENDERS:
            for dtype in dict.fromkeys(r["dtype"] for r in rows):
                pts = sorted(
                    (r["c"], r["stats"][name]["median_ms"])
                    for r in rows
                    if r["pass"] == pass_ and r["dtype"] == dtype and name in r["stats"]
                )
                if pts:
                    cs, ms = zip(*pts, strict=True)
                    ax.plot(
                        cs,
                        ms,
                        styles.get(dtype, "-."),
                        marker="o",
                        color=colors.get(name),
                        label=f"{name} {dtype}",
                    )
        ax.set(xscale="log", yscale="log", xlabel="C (classes)", ylabel="median ms")
        ax.set_title(f"{pass_} — {result['environment']['device_kind']}")
        ax.grid(True, which="both", alpha=0.3)
    shapes = dict.fromkeys(f"{r['n']}x{r['c']}" for r in rows)
    fig.suptitle(f"cross_entropy, shapes (N x C): {', '.join(shapes)}")
    axes[1].legend(fontsize=7, ncol=2, loc="upper left")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(
    result: dict[str, Any],
    out_dir: Path,
    names: tuple[str, str, str],
    render: Callable[[dict[str, Any]], str],
    draw: Callable[[dict[str, Any], Path], None],
) -> dict[str, Path]:
    """Writes the markdown, JSON and PNG files ``names``; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    paths = dict(zip(("md", "json", "png"), (out_dir / n for n in names), strict=True))
    paths["md"].write_text(render(result))
    paths["json"].write_text(json.dumps(result, indent=1) + "\n")
    draw(result, paths["png"])
    return paths


def write_outputs(result: dict[str, Any], out_dir: Path) -> dict[str, Path]:
    """Writes results.md, results.json and time_vs_C.png; returns their paths."""
    names = ("results.md", "results.json", "time_vs_C.png")
    return write_report(result, out_dir, names, render_markdown, plot)


# --------------------------------------------------------------------------- #
# Command line
# --------------------------------------------------------------------------- #


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    """Command-line options."""
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes, 3 repeats")
    p.add_argument(
        "--repeats",
        type=int,
        help=f"timed repeats per case (default {AUTO_REPEATS['big']} for big, "
        f"{AUTO_REPEATS['small']} for small cases, {AUTO_REPEATS['quick']} quick)",
    )
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds (default 1)")
    p.add_argument("--out-dir", type=Path, help="default benchmarks/results/<device>")
    p.add_argument("--no-torch", action="store_true", help="leave torch out")
    p.add_argument(
        "--torch-threads",
        type=int,
        help="torch.set_num_threads for CPU torch (default: torch's own default)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument(
        "--calls-per-sample",
        type=int,
        help="back-to-back calls timed as one sample (default 1 on CPU, 20 on "
        "GPU/TPU, where a single call is mostly dispatch)",
    )
    return p.parse_args(argv)


def config_from_args(args: argparse.Namespace) -> Config:
    """The run's Config from parsed options."""
    return Config(
        shapes=QUICK_SHAPES if args.quick else FULL_SHAPES,
        repeats=args.repeats,
        warmup=args.warmup,
        use_torch=torch is not None and not args.no_torch,
        torch_threads=args.torch_threads,
        seed=args.seed,
        quick=args.quick,
        calls_per_sample=args.calls_per_sample,
    )


def main(argv: Sequence[str] | None = None) -> int:
    """Runs the benchmark and writes its three outputs."""
    args = parse_args(argv)
    config = config_from_args(args)
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / device_slug()
    start = time.perf_counter()
    result = run_benchmark(config)
    result["environment"]["wall_s"] = time.perf_counter() - start
    result["environment"]["load_average_end"] = load_average()
    paths = write_outputs(result, out_dir)
    print("\n".join(main_table(result["rows"])))
    print(f"\n{time.perf_counter() - start:.0f} s; wrote", *map(str, paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
