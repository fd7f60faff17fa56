"""Benchmark ``jxent.binary_cross_entropy_with_logits`` against optax, torch and floors.

Multi-label logits (N, C) with 0/1 targets of the logits' dtype, the mean loss;
forward (loss only) and forward+backward (loss and gradient w.r.t. the logits).
The timing machinery is ``bench_cross_entropy``'s: one process, every contender
once per round in a fresh random order, medians after warm-up. Writes
``binary_results.md``, ``binary_results.json`` and ``binary_time.png`` to
``--out-dir`` (default ``benchmarks/results/<device-kind>``).

Usage::

    python benchmarks/bench_binary.py            # (8192, 1024), (512, 131072)
    python benchmarks/bench_binary.py --quick    # tiny shapes, smoke test
"""

from __future__ import annotations

import dataclasses
import os
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")  # see bench_cross_entropy

import jax
import jax.numpy as jnp
import optax
from bench_cross_entropy import (
    FLOOR,
    OPTAX,
    PASSES,
    QUICK_SHAPES,
    ROOT,
    TORCH,
    Config,
    Contender,
    config_from_args,
    device_slug,
    environment,
    fmt,
    jax_contender,
    load_average,
    median_of,
    parse_args,
    ratio,
    summarize,
    time_interleaved,
    to_torch,
    torch_device,
    torch_loss_contender,
    write_report,
)

import jxent

try:
    import torch
    import torch.nn.functional as F
except ImportError:  # torch is optional: its column is then left out.
    torch = None
    F = None

FULL_SHAPES = ((8192, 1024), (512, 131072))
JXENT, JXENT_PW = "jxent", "jxent_pos_weight"
CONTENDERS = (JXENT, JXENT_PW, OPTAX, TORCH, FLOOR)


@dataclasses.dataclass
class BinaryInputs:
    """Logits, 0/1 targets (the logits' dtype) and a per-class pos_weight."""

    x: jax.Array
    target: jax.Array
    pos_weight: jax.Array
    torch: dict[str, Any] = dataclasses.field(default_factory=dict)


def make_binary_inputs(n: int, c: int, dtype: str, seed: int) -> BinaryInputs:
    kx, kt, kw = jax.random.split(jax.random.key(seed), 3)
    x = jax.random.normal(kx, (n, c), jnp.float32).astype(dtype)
    target = jax.random.bernoulli(kt, 0.2, (n, c)).astype(dtype)
    pos_weight = jax.random.uniform(kw, (c,), jnp.float32, 0.5, 4.0)
    return BinaryInputs(*jax.block_until_ready((x, target, pos_weight)))


def jxent_loss(x: jax.Array, t: jax.Array) -> jax.Array:
    return jxent.binary_cross_entropy_with_logits(x, t)


def jxent_pos_weight_loss(x: jax.Array, t: jax.Array, pw: jax.Array) -> jax.Array:
    return jxent.binary_cross_entropy_with_logits(x, t, pos_weight=pw)


def optax_loss(x: jax.Array, t: jax.Array) -> jax.Array:
    return optax.sigmoid_binary_cross_entropy(x, t).mean()


def read_floor(x: jax.Array, t: jax.Array) -> jax.Array:
    """One read of the logits and the targets: the least a forward must do."""
    return jnp.max(x) + jnp.max(t)


def copy_floor(x: jax.Array, t: jax.Array) -> jax.Array:
    """Read logits and targets, write one N×C buffer (as the gradient must be)."""
    return x + t


def torch_contender(inputs: BinaryInputs, grad: bool) -> Contender:
    """``F.binary_cross_entropy_with_logits``, as bench_cross_entropy times torch."""
    target = inputs.torch["target"]
    return torch_loss_contender(
        TORCH,
        inputs.torch,
        lambda x: F.binary_cross_entropy_with_logits(x, target),
        grad,
    )


def build_contenders(inputs: BinaryInputs, grad: bool) -> list[Contender]:
    x, t, pw = inputs.x, inputs.target, inputs.pos_weight
    contenders = [
        jax_contender(JXENT, jxent_loss, (x, t), grad),
        jax_contender(JXENT_PW, jxent_pos_weight_loss, (x, t, pw), grad),
        jax_contender(OPTAX, optax_loss, (x, t), grad),
    ]
    if inputs.torch:
        contenders.append(torch_contender(inputs, grad))
    floor = copy_floor if grad else read_floor
    contenders.append(jax_contender(FLOOR, floor, (x, t), grad=False))
    return contenders


def run_case(inputs: BinaryInputs, grad: bool, config: Config) -> dict[str, Any]:
    n, c = inputs.x.shape
    contenders = build_contenders(inputs, grad)
    repeats = config.repeats_for(n, c)
    _, times = time_interleaved(contenders, repeats, config.warmup, config.calls())
    stats = {name: summarize(ts) for name, ts in times.items()}
    del contenders
    return {
        "n": n,
        "c": c,
        "dtype": str(inputs.x.dtype),
        "pass": PASSES[int(grad)],
        "repeats": repeats,
        "floor_kind": "copy (x + t)" if grad else "read (max x + max t)",
        "stats": stats,
        "ratios": {
            "jxent/optax": ratio(stats, JXENT, OPTAX),
            "jxent/torch": ratio(stats, JXENT, TORCH),
            "jxent/floor": ratio(stats, JXENT, FLOOR),
            "pos_weight/plain": ratio(stats, JXENT_PW, JXENT),
        },
        "raw_ms": {k: [v * 1e3 for v in ts] for k, ts in times.items()},
    }


def run_benchmark(config: Config) -> dict[str, Any]:
    device = torch_device() if config.use_torch else None
    if device is not None and config.torch_threads is not None:
        torch.set_num_threads(config.torch_threads)
    env = environment(config)
    rows = []
    for n, c in config.shapes:
        for dtype in config.dtypes:
            inputs = make_binary_inputs(n, c, dtype, config.seed)
            if device is not None:
                x = to_torch(inputs.x, device).requires_grad_(True)
                inputs.torch = {"x": x, "target": to_torch(inputs.target, device)}
            for grad in (False, True):
                print(f"{n}x{c} {dtype} {PASSES[int(grad)]}", file=sys.stderr)
                rows.append(run_case(inputs, grad, config))
            inputs.torch.clear()
            del inputs
    return {"environment": env, "rows": rows}


def main_table(rows: Sequence[dict[str, Any]]) -> list[str]:
    head = (
        "| N | C | dtype | pass | jxent | jxent pos_weight | optax | torch | floor "
        "| jxent/optax | jxent/torch | jxent/floor | pos_weight/plain |"
    )
    lines = [head, "|" + "---|" * head.count(" | ") + "---|"]
    for r in rows:
        q = r["ratios"]
        cells = [str(r["n"]), str(r["c"]), r["dtype"], r["pass"]]
        cells += [fmt(median_of(r, k)) for k in CONTENDERS]
        cells += [
            fmt(q[k], ".2f")
            for k in ("jxent/optax", "jxent/torch", "jxent/floor", "pos_weight/plain")
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return lines


def render_markdown(result: dict[str, Any]) -> str:
    env = result["environment"]
    v = env["versions"]
    spread = [
        f"| {r['n']}x{r['c']} {r['dtype']} {r['pass']} | {name} | "
        f"{s['median_ms']:.3g} | {s['q1_ms']:.3g}–{s['q3_ms']:.3g} | "
        f"{s['iqr_rel']:.0%} |"
        for r in result["rows"]
        for name, s in r["stats"].items()
    ]
    return "\n".join(
        [
            f"# binary_cross_entropy_with_logits benchmark — {env['device_kind']}",
            "",
            f"- date: {env['date']}; jxent revision {env['jxent_revision']}",
            f"- CPU: {env['cpu_model']} ({env['cpu_count']} cores); load average "
            f"at start {env['load_average_start']}, at end "
            f"{env.get('load_average_end')}",
            f"- jax {v['jax']}, optax {v['optax']}, torch {v['torch']}",
            f"- repeats per case: {env['repeats']}; warm-up {env['warmup']}; "
            "contenders interleaved; medians in ms",
            "- targets: 0/1 of the logits' dtype; loss: the mean. floor: forward "
            "= one read of logits and targets; fwd+bwd = those reads plus one N×C "
            "write (`x + t`), the least the gradient needs.",
            "",
            *main_table(result["rows"]),
            "",
            "| case | contender | median ms | q1–q3 ms | IQR/median |",
            "|---|---|---|---|---|",
            *spread,
            "",
        ]
    )


def plot(result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result["rows"]
    cases = [f"{r['n']}x{r['c']}\n{r['dtype']} {r['pass']}" for r in rows]
    fig, ax = plt.subplots(figsize=(12, 4.8), constrained_layout=True)
    width = 0.8 / len(CONTENDERS)
    for i, name in enumerate(CONTENDERS):
        ms = [median_of(r, name) or 0.0 for r in rows]
        ax.bar([j + i * width for j in range(len(rows))], ms, width, label=name)
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(rows))], cases, fontsize=7)
    ax.set(yscale="log", ylabel="median ms")
    ax.set_title(
        f"binary_cross_entropy_with_logits — {result['environment']['device_kind']}"
    )
    ax.legend(fontsize=8)
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    config = dataclasses.replace(
        config_from_args(args), shapes=QUICK_SHAPES if args.quick else FULL_SHAPES
    )
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / device_slug()
    start = time.perf_counter()
    result = run_benchmark(config)
    result["environment"]["wall_s"] = time.perf_counter() - start
    result["environment"]["load_average_end"] = load_average()
    names = ("binary_results.md", "binary_results.json", "binary_time.png")
    paths = write_report(result, out_dir, names, render_markdown, plot)
    print("\n".join(main_table(result["rows"])))
    print(f"\n{time.perf_counter() - start:.0f} s; wrote", *map(str, paths.values()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
