"""Times the LM-head heads' value_and_grad against the naive formulas.

For ``linear_log_probs`` (without and with the entropy) and
``linear_distillation_loss`` (forward KL), the fused function's
``value_and_grad`` w.r.t. the hidden states and the weight(s) is timed
against the same formulas on materialised logits (``x @ w`` then
``jxent.log_probs`` / ``jxent.distillation_loss``), with XLA's temporary
memory of each program. One process; every round calls all contenders of a
case once, in a fresh random order; medians of ``--repeats`` rounds after one
warm-up call each, and the paired ratio (the median over rounds of a round's
fused/naive ratio, steadier under a varying load). Writes
``heads_results.md``, ``heads_results.json`` and ``heads_time.png`` to
``--out-dir`` (default ``benchmarks/results/<device-kind>``).

    python benchmarks/bench_linear_heads.py                      # the issue's shapes
    python benchmarks/bench_linear_heads.py --shape 2048 512 65536 --dtype float32
    python benchmarks/bench_linear_heads.py --quick              # tiny, a smoke test
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import statistics
import time
from collections.abc import Callable
from pathlib import Path

import jax
import jax.numpy as jnp
from bench_cross_entropy import cpu_model, device_slug

import jxent

ROOT = Path(__file__).resolve().parents[1]
FULL_SHAPES = ((2048, 512, 65536), (2048, 1024, 131072))
QUICK_SHAPES = ((64, 32, 512),)
DTYPES = ("float32", "bfloat16")
TEMPERATURE = 0.9
ENTROPY_COEF = 0.01
HEADS = ("linear_log_probs", "linear_log_probs + entropy", "linear_distillation_loss")


def _logits(x, w):
    return jnp.dot(x, w, preferred_element_type=jnp.float32)


def _with_entropy(fn):
    def loss(*args):
        lp, ent = fn(*args)
        return jnp.sum(lp) + ENTROPY_COEF * jnp.sum(ent)

    return loss


def programs(t: jax.Array) -> dict[str, tuple[Callable, Callable, int]]:
    """Per head: (fused loss, naive loss, number of array arguments)."""
    lp = {"temperature": TEMPERATURE}
    return {
        "linear_log_probs": (
            lambda x, w: jnp.sum(jxent.linear_log_probs(x, w, t, **lp)),
            lambda x, w: jnp.sum(jxent.log_probs(_logits(x, w), t, **lp)),
            2,
        ),
        "linear_log_probs + entropy": (
            _with_entropy(
                lambda x, w: jxent.linear_log_probs(x, w, t, return_entropy=True, **lp)
            ),
            _with_entropy(
                lambda x, w: jxent.log_probs(
                    _logits(x, w), t, return_entropy=True, **lp
                )
            ),
            2,
        ),
        "linear_distillation_loss": (
            lambda x, w, tx, tw: jxent.linear_distillation_loss(x, w, tx, tw, t),
            lambda x, w, tx, tw: jxent.distillation_loss(
                _logits(x, w), _logits(tx, tw), t
            ),
            4,
        ),
    }


def run_case(n, d, v, dtype, repeats, seed=0) -> list[dict]:
    """Times and temporaries of every head's fused and naive programs."""
    keys = jax.random.split(jax.random.key(seed), 5)
    x = jax.random.normal(keys[0], (n, d), dtype)
    w = (jax.random.normal(keys[1], (d, v)) / d**0.5).astype(dtype)
    tx = jax.random.normal(keys[2], (n, d), dtype)
    tw = (jax.random.normal(keys[3], (d, v)) / d**0.5).astype(dtype)
    t = jax.random.randint(keys[4], (n,), 0, v)
    arrays = (x, w, tx, tw)
    contenders = {}
    memory = {}
    for head, (fused, naive, arity) in programs(t).items():
        args = arrays[:arity]
        for kind, loss in (("fused", fused), ("naive", naive)):
            grads = jax.value_and_grad(loss, argnums=(0, 1))
            compiled = jax.jit(grads).lower(*args).compile()
            memory[head, kind] = compiled.memory_analysis().temp_size_in_bytes
            jax.block_until_ready(compiled(*args))  # warm-up
            contenders[head, kind] = (compiled, args)
    times: dict = {key: [] for key in contenders}
    order = list(contenders)
    for _ in range(repeats):
        random.shuffle(order)
        for key in order:
            compiled, args = contenders[key]
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times[key].append(time.perf_counter() - start)
    rows = []
    for head in HEADS:
        fused_t = statistics.median(times[head, "fused"])
        naive_t = statistics.median(times[head, "naive"])
        rows.append({
            "paired_ratio": _paired(times[head, "fused"], times[head, "naive"]),
            "shape": [n, d, v],
            "dtype": jnp.dtype(dtype).name,
            "head": head,
            "fused_ms": fused_t * 1e3,
            "naive_ms": naive_t * 1e3,
            "time_ratio": fused_t / naive_t,
            "fused_spread": _spread(times[head, "fused"]),
            "naive_spread": _spread(times[head, "naive"]),
            "fused_temp_mib": memory[head, "fused"] / 2**20,
            "naive_temp_mib": memory[head, "naive"] / 2**20,
            "memory_ratio": memory[head, "fused"] / max(memory[head, "naive"], 1),
        })  # fmt: skip
    alone, both = rows[0], rows[1]
    both["entropy_over_alone"] = both["fused_ms"] / alone["fused_ms"]
    both["entropy_over_alone_paired"] = _paired(
        times[HEADS[1], "fused"], times[HEADS[0], "fused"]
    )
    return rows


def _paired(times: list[float], base: list[float]) -> float:
    """The median over rounds of one round's ratio: the two calls of a round
    share that moment's load on the machine, so this is steadier than the
    ratio of the medians."""
    return statistics.median(t / b for t, b in zip(times, base, strict=True))


def _spread(samples: list[float]) -> float:
    """(max - min) / median of the timed calls: how far to trust a ratio."""
    return (max(samples) - min(samples)) / statistics.median(samples)


def write_results(rows: list[dict], out_dir: Path, meta: dict) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "heads_results.json").write_text(
        json.dumps({"meta": meta, "rows": rows}, indent=2) + "\n"
    )
    lines = [
        f"# LM-head heads, value_and_grad — {meta['device']}",
        "",
        f"- {meta.get('cpu', 'CPU not recorded')}; date {meta['date']}; jax "
        f"{meta['jax']}; load average at start "
        f"{meta['load_start']}, at end {meta['load_end']}",
        f"- median of {meta['repeats']} rounds, contenders interleaved in a "
        "random order per round, after one warm-up call each; spread = "
        "(max - min) / median; temporaries from `memory_analysis()`",
        "",
        "| (N, D, V) | dtype | head | fused ms | naive ms | fused/naive time "
        "| paired | spread fused, naive | fused MiB | naive MiB "
        "| fused/naive memory |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {tuple(r['shape'])} | {r['dtype']} | {r['head']} | "
            f"{_figure(r['fused_ms'])} | {_figure(r['naive_ms'])} | "
            f"{r['time_ratio']:.2f} | {r['paired_ratio']:.2f} | "
            f"{r['fused_spread']:.2f}, {r['naive_spread']:.2f} | "
            f"{_figure(r['fused_temp_mib'])} | {_figure(r['naive_temp_mib'])} | "
            f"{r['memory_ratio']:.2f} |"
        )
    lines += [
        "",
        "paired: the median over rounds of each round's fused/naive ratio.",
        "",
        "Entropy with the log-probabilities, against them alone (fused), ratio of "
        "the medians and paired:",
        "",
    ]
    for r in rows:
        if "entropy_over_alone" in r:
            lines.append(
                f"- {tuple(r['shape'])} {r['dtype']}: {r['entropy_over_alone']:.2f}x, "
                f"paired {r['entropy_over_alone_paired']:.2f}x"
            )
    (out_dir / "heads_results.md").write_text("\n".join(lines) + "\n")
    _plot(rows, out_dir / "heads_time.png")


def _figure(value: float) -> str:
    """Whole units from 100 up, three significant digits below."""
    return f"{value:.0f}" if value >= 100 else f"{value:.3g}"


def _plot(rows: list[dict], path: Path) -> None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:  # the bench extra brings it
        return
    cases = sorted({(tuple(r["shape"]), r["dtype"]) for r in rows})
    fig, ax = plt.subplots(figsize=(8, 4))
    width = 0.8 / len(HEADS)
    for i, head in enumerate(HEADS):
        ratios = [
            next(
                r["time_ratio"]
                for r in rows
                if (tuple(r["shape"]), r["dtype"]) == case and r["head"] == head
            )
            for case in cases
        ]
        ax.bar([k + i * width for k in range(len(cases))], ratios, width, label=head)
    ax.axhline(1.0, color="black", linewidth=0.8)
    ax.axhline(1.1, color="gray", linewidth=0.8, linestyle="--")
    ax.set_xticks([k + width for k in range(len(cases))])
    ax.set_xticklabels([f"{s}\n{dt}" for s, dt in cases], fontsize=7)
    ax.set_ylabel("fused / naive time (value_and_grad)")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> list[dict]:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, action="append")
    parser.add_argument("--dtype", action="append", choices=DTYPES)
    parser.add_argument("--repeats", type=int, default=7)
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--out-dir", type=Path)
    args = parser.parse_args(argv)
    shapes = args.shape or (QUICK_SHAPES if args.quick else FULL_SHAPES)
    dtypes = args.dtype or DTYPES
    repeats = 2 if args.quick else args.repeats
    out_dir = args.out_dir or ROOT / "benchmarks" / "results" / device_slug()
    meta = {
        "device": f"{jax.devices()[0].device_kind} ({jax.default_backend()})",
        "cpu": cpu_model(),
        "date": datetime.datetime.now(datetime.UTC).isoformat(),
        "jax": jax.__version__,
        "repeats": repeats,
        "load_start": round(os.getloadavg()[0], 2),
    }
    rows = []
    for n, d, v in shapes:
        for dtype in dtypes:
            for r in run_case(n, d, v, jnp.dtype(dtype), repeats):
                rows.append(r)
                print(
                    f"{tuple(r['shape'])} {r['dtype']:8s} {r['head']:28s} "
                    f"{r['time_ratio']:.2f}x time, {r['memory_ratio']:.2f}x memory",
                    flush=True,
                )
            # Written after every case: a long run stopped early keeps its rows.
            meta["load_end"] = round(os.getloadavg()[0], 2)
            write_results(rows, out_dir, meta)
    print(f"wrote {out_dir}")
    return rows


if __name__ == "__main__":
    main()
