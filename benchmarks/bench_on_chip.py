"""jxent's programs run on the chip, beside what compiling them predicted.

``bench_compiled.py`` compiles the ``value_and_grad`` programs of
``jxent.cross_entropy`` (against optax) and ``jxent.linear_cross_entropy``
(against the naive ``cross_entropy(x @ w, t)``) for chips it does not have,
and predicts a roofline time from their traffic and matmul flops. This script
runs the same programs on the chip this process has (a GPU or a TPU) and puts
the measured times beside three predictions:

* the deviceless compile's figures (``results/compiled/*.json``: the H100
  programs for a GPU, the v5e or v6e programs for a TPU) at this chip's
  published peak flops and HBM bandwidth;
* the same figures read from the program compiled here, on the chip (the
  GPU compiler autotunes only with a device);
* the latter at the ceilings measured here (a bf16 matmul, a copy).

It also times PyTorch on CUDA where torch sees a GPU: ``F.cross_entropy``
for the logits; for the LM heads the naive ``F.cross_entropy((x @ w).float(),
t)``, and Liger-Kernel's fused linear cross-entropy and Cut Cross-Entropy
when they are installed. Contenders are interleaved (a random order each
round); a time is the median of ``--repeats`` samples after warm-up, each
sample the mean of back-to-back calls lasting about 10 ms.

    python benchmarks/bench_on_chip.py            # cross_entropy, linear_cross_entropy
    python benchmarks/bench_on_chip.py --parts heads --heads-shape 8192 4096 131072
    python benchmarks/bench_on_chip.py --quick    # tiny shapes, any backend

Writes ``on_chip.{json,md,png}`` to ``benchmarks/results/<device-kind>/``.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

# JAX and torch share the chip: leave torch room for the naive programs.
os.environ.setdefault("XLA_PYTHON_CLIENT_MEM_FRACTION", "0.5")

sys.path.insert(0, str(Path(__file__).resolve().parent))
import bench_compiled as bc
import bench_cross_entropy as bce

HERE = Path(__file__).resolve().parent
GiB = 2**30

# device_kind -> (dense bf16 FLOP/s, HBM bytes/s, the deviceless target whose
# programs this chip runs), from the vendors' datasheets.
CHIPS = {
    "NVIDIA H200": (989e12, 4.8e12, "h100"),
    "NVIDIA H100 80GB HBM3": (989e12, 3.35e12, "h100"),
    "TPU v5 lite": (197e12, 819e9, "tpu-v5e"),
    "TPU v6 lite": (918e12, 1640e9, "tpu-v6e"),
}


def chip():
    """(device, Target with this chip's published figures, deviceless name)."""
    import jax

    device = jax.devices()[0]
    kind = device.device_kind
    peak, bandwidth, deviceless = CHIPS.get(kind, (None, None, None))
    target = bc.Target(kind, device.platform, "this process", peak, bandwidth)
    return device, target, deviceless


# ---------------------------------------------------------------- timing


def calls_per_sample(call, budget_s=0.01, most=50) -> int:
    """Back-to-back calls that take about ``budget_s`` (one call after warm-up)."""
    start = time.perf_counter()
    call(1)
    once = time.perf_counter() - start
    return max(1, min(most, round(budget_s / max(once, 1e-6))))


def time_round_robin(calls: dict, repeats: int, warmup: int = 2) -> dict:
    """Median seconds per call of each contender, interleaved in random order
    (``bench_cross_entropy.time_interleaved``), each sample ``k`` back-to-back
    calls lasting about 10 ms.

    ``calls[name](k)`` runs ``k`` calls back to back and waits for the last;
    each has run once before (compiled, autotuned).
    """
    counts = {name: calls_per_sample(call) for name, call in calls.items()}
    contenders = [
        bce.Contender(name, lambda k, c=call, m=counts[name]: c(k * m))
        for name, call in calls.items()
    ]
    _, times = bce.time_interleaved(contenders, repeats, warmup)
    out = {}
    for name, samples in times.items():
        stats = bce.summarize([t / counts[name] for t in samples])
        out[name] = {
            "median_s": stats["median_ms"] / 1e3,
            "min_s": stats["min_ms"] / 1e3,
            "iqr_over_median": stats["iqr_rel"],
            "calls_per_sample": counts[name],
        }
    return out


def jax_call(compiled, args):
    import jax

    def call(k):
        out = None
        for _ in range(k):
            out = compiled(*args)
        jax.block_until_ready(out)
        return out

    return call


def ceilings(device) -> dict:
    """A bf16 8192^3 matmul's FLOP/s and a 4 GiB copy's bytes/s, measured."""
    import jax
    import jax.numpy as jnp

    if device.platform == "cpu":
        return {}
    a = jax.random.normal(jax.random.key(0), (8192, 8192), jnp.bfloat16)
    big = jnp.ones((GiB,), jnp.float32)
    matmul = jax.jit(lambda a: a @ a).lower(a).compile()
    copy = jax.jit(lambda x: x + 1).lower(big).compile()
    times = time_round_robin(
        {"matmul": jax_call(matmul, (a,)), "copy": jax_call(copy, (big,))}, 10
    )
    return {
        "matmul_flops": 2 * 8192**3 / times["matmul"]["median_s"],
        "copy_bytes_per_s": 2 * big.nbytes / times["copy"]["median_s"],
    }


# -------------------------------------------------------------- programs


def real_arguments(specs, v, seed=0):
    """Arrays for ``(shape, dtype)`` specs: unit-scale logits, targets < v.

    Floating arguments are N(0, 1), except a (D, V) weight after the first
    argument, N(0, 1/D), so that ``x @ w`` has unit scale too.
    """
    import jax
    import jax.numpy as jnp

    keys = jax.random.split(jax.random.key(seed), len(specs))
    out = []
    for i, (key, (shape, dtype)) in enumerate(zip(keys, specs, strict=True)):
        if jnp.issubdtype(dtype, jnp.integer):
            out.append(jax.random.randint(key, shape, 0, v, dtype))
            continue
        weight = i > 0 and len(shape) == 2 and shape[-1] == v
        scale = shape[0] ** -0.5 if weight else 1.0
        out.append((scale * jax.random.normal(key, shape)).astype(dtype))
    return out


def torch_contenders(kind, args, v):
    """PyTorch on CUDA for the same problem: {name: call(k)}; {} without CUDA."""
    try:
        import torch
        import torch.nn.functional as F
    except ImportError:
        return {}
    if not torch.cuda.is_available():
        return {}
    import numpy as np

    def tensor(a, grad):
        if np.issubdtype(a.dtype, np.integer):
            return torch.from_numpy(np.array(a)).cuda().long()
        t = torch.from_numpy(np.asarray(a, np.float32)).cuda()
        t = t.to(torch.bfloat16 if a.dtype.name == "bfloat16" else t.dtype)
        return t.requires_grad_(grad)

    def timed(fn, inputs):
        def call(k):
            for _ in range(k):
                loss = fn()
                torch.autograd.grad(loss, inputs)
            torch.cuda.synchronize()

        return call

    if kind == "cross_entropy":
        logits, target = tensor(args[0], True), tensor(args[1], False)
        return {"torch": timed(lambda: F.cross_entropy(logits, target), [logits])}
    x, w, target = tensor(args[0], True), tensor(args[1], False), tensor(args[2], False)
    w_t = w.t().contiguous().requires_grad_(True)  # (V, D), as torch heads keep it
    del w
    out = {
        "torch_naive": timed(
            lambda: F.cross_entropy((x @ w_t.t()).float(), target), [x, w_t]
        )
    }
    try:
        from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

        liger = LigerFusedLinearCrossEntropyLoss()
        out["liger"] = timed(lambda: liger(w_t, x, target), [x, w_t])
    except ImportError:
        pass
    try:
        from cut_cross_entropy import linear_cross_entropy as cce

        out["cce"] = timed(lambda: cce(x, w_t, target), [x, w_t])
    except ImportError:
        pass
    return out


def _free_torch_memory() -> None:
    import gc

    import torch

    gc.collect()
    torch.cuda.empty_cache()


def torch_peak_bytes(call) -> float | None:
    """Peak CUDA memory above the starting allocation during one call."""
    import torch

    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    start = torch.cuda.memory_allocated()
    call(1)
    return torch.cuda.max_memory_allocated() - start


# ---------------------------------------------------------------- running


def jobs(args):
    """(kind, shape, dtype, [(program, f, specs, logits bytes)]) to run."""
    import jax.numpy as jnp

    ce_shapes = bc.QUICK_CROSS_ENTROPY if args.quick else bc.CROSS_ENTROPY_SHAPES
    heads = bc.QUICK_HEADS if args.quick else bc.LINEAR_HEADS
    out = []
    if "cross_entropy" in args.parts:
        out += [
            ("cross_entropy", s, dt, bc.cross_entropy_programs(*s, dt))
            for s in ce_shapes
            for dt in (jnp.float32, jnp.bfloat16)
        ]
    if "linear" in args.parts:
        bf16 = jnp.bfloat16
        out += [
            ("linear_cross_entropy", h, bf16, bc.linear_programs(*h, bf16))
            for h in heads
        ]
    if "heads" in args.parts:
        shapes = bc.QUICK_HEADS_SHAPES if args.quick else bc.HEADS_SHAPES
        for shape in args.heads_shape or shapes:
            grouped: dict[str, list] = {}
            for kind, name, f, specs, size in bc.head_programs(*shape, jnp.bfloat16):
                if kind != "linear_cross_entropy":  # measured above
                    grouped.setdefault(kind, []).append((name, f, specs, size))
            out += [(k, shape, jnp.bfloat16, p) for k, p in grouped.items()]
    return out


def predictions(deviceless: str | None) -> dict:
    """The deviceless records of ``deviceless`` by (kind, shape, dtype, program)."""
    found: dict[tuple, dict] = {}
    # The heads' file has a linear_cross_entropy too, whose naive program
    # keeps float32 logits: the first file's records win.
    for name in ("compiled_results.json", "heads_results.json"):
        path = HERE / "results" / "compiled" / name
        if deviceless and path.exists():
            for r in json.loads(path.read_text())["records"]:
                if r["target"] == deviceless and r.get("fits"):
                    key = (r["kind"], tuple(r["shape"]), r["dtype"], r["program"])
                    found.setdefault(key, r)
    return found


def agreement(out, base) -> dict:
    """Relative differences of the value and of the gradients from the base's."""
    import jax
    import numpy as np

    def flat(tree):
        return [np.asarray(a, np.float64).ravel() for a in jax.tree.leaves(tree)]

    ours, theirs = flat(out), flat(base)
    value = abs(ours[0][0] - theirs[0][0]) / max(abs(theirs[0][0]), 1e-30)
    grads = [
        float(np.linalg.norm(a - b) / max(np.linalg.norm(b), 1e-30))
        for a, b in zip(ours[1:], theirs[1:], strict=True)
    ]
    return {"value_rel_diff": float(value), "grad_rel_diffs": grads}


def run_job(kind, shape, dtype, programs, target, known, measured, args):
    import jax
    import numpy as np

    v = shape[-1]
    specs = programs[0][2]
    arrays = real_arguments(specs, v, args.seed)
    records, calls, outputs = [], {}, {}
    for name, f, _, logits in programs:
        record = bc.new_record(kind, shape, dtype, name, target)
        start = time.perf_counter()
        try:
            compiled = jax.jit(f).lower(*arrays).compile()
        except Exception as error:  # does not fit
            record.update(fits=False, error=str(error).strip().splitlines()[0][:300])
            records.append(record)
            continue
        record["compile_s"] = round(time.perf_counter() - start, 1)
        if args.save_hlo:
            args.save_hlo.mkdir(parents=True, exist_ok=True)
            (args.save_hlo / hlo_name(record)).write_text(compiled.as_text())
        try:
            record.update(fits=True, **bc.measure(compiled, logits, target))
        except Exception as error:  # an HLO the reader does not know
            record.update(fits=True, stats_error=str(error)[:200])
        if measured and record.get("traffic_bytes") is not None:
            record["roofline_measured_s"] = (
                record["flops"] / measured["matmul_flops"]
                + record["traffic_bytes"] / measured["copy_bytes_per_s"]
            )
        before = known.get((kind, tuple(shape), np.dtype(dtype).name, name))
        if before is not None:
            record["deviceless_target"] = before["target"]
            record["deviceless_temp_bytes"] = before["temp_bytes"]
            record["deviceless_passes"] = before.get("passes")
            if "traffic_bytes" in before:
                record["deviceless_roofline_s"] = bc.roofline(
                    before["flops"], before["traffic_bytes"], target
                )
        records.append(record)
        call = jax_call(compiled, arrays)
        try:
            outputs[name] = call(1)
        except Exception as error:  # out of memory at run time
            record["error"] = f"{type(error).__name__}: {error}"[:300]
            continue
        calls[name] = call
    if not args.no_torch and kind in ("cross_entropy", "linear_cross_entropy"):
        for name, call in torch_contenders(kind, arrays, v).items():
            try:
                call(1)
            except Exception as error:  # torch.OutOfMemoryError, a Triton error
                record = bc.new_record(kind, shape, dtype, name, target)
                record["error"] = f"{type(error).__name__}: {error}"[:300]
                records.append(record)
                _free_torch_memory()
                continue
            calls[name] = call
    times = time_round_robin(calls, args.repeats) if calls else {}
    base = next((n for n in outputs if n != "jxent"), None)
    for record in records:
        record.update(times.get(record["program"], {}))
        if record["program"] == "jxent" and base and "jxent" in outputs:
            record.update(agreement(outputs["jxent"], outputs[base]))
    for name in [n for n in calls if n not in outputs]:  # torch's
        record = bc.new_record(kind, shape, dtype, name, target)
        record.update(times[name], fits=True, peak_bytes=torch_peak_bytes(calls[name]))
        records.append(record)
    return records


def hlo_name(record) -> str:
    """The file a program's optimized HLO is saved in (``--save-hlo``)."""
    shape = "x".join(map(str, record["shape"]))
    words = (record["kind"], shape, record["dtype"], record["program"])
    return "".join(c if c.isalnum() else "_" for c in "-".join(words)) + ".txt"


def restat(records, meta, hlo_dir: Path) -> None:
    """Traffic, flops and rooflines read again from saved HLO (``--restat``)."""
    target = bc.Target(meta["device"], meta["platform"], "", **_peaks(meta))
    measured = meta["measured"]
    for record in records:
        path = hlo_dir / hlo_name(record)
        if "logits_bytes" not in record or not path.exists():
            continue
        logits = record["logits_bytes"]
        stats = bc.hlo_stats.program_stats(path.read_text(), bc.threshold(logits))
        record.update(stats.to_dict(), passes=stats.traffic / logits)
        record["roofline_s"] = bc.roofline(stats.flops, stats.traffic, target)
        if measured:
            record["roofline_measured_s"] = (
                stats.flops / measured["matmul_flops"]
                + stats.traffic / measured["copy_bytes_per_s"]
            )


def _peaks(meta) -> dict:
    published = meta["published"]
    return {"peak_flops": published["flops"], "hbm_bandwidth": published["bandwidth"]}


def run(args) -> list[dict]:
    import jax

    device, target, deviceless = chip()
    measured = ceilings(device)
    known = predictions(deviceless)
    out_dir = args.out_dir or HERE / "results" / bce.device_slug()
    out_dir.mkdir(parents=True, exist_ok=True)
    name = "on_chip_heads" if list(args.parts) == ["heads"] else "on_chip"
    meta = {
        **bc.metadata(),
        "device": target.name,
        "platform": device.platform,
        "published": {"flops": target.peak_flops, "bandwidth": target.hbm_bandwidth},
        "measured": measured,
        "deviceless_target": deviceless,
        "repeats": args.repeats,
        "jax_backend": jax.default_backend(),
    }
    meta.update(_torch_meta(), jxent_revision=bce.git_revision())
    print(json.dumps(meta), flush=True)
    records = []
    for kind, shape, dtype, programs in jobs(args):
        try:
            rows = run_job(kind, shape, dtype, programs, target, known, measured, args)
        except Exception as error:  # keep the rest of the run
            row = bc.new_record(kind, shape, dtype, "error", target)
            rows = [{**row, "error": f"{type(error).__name__}: {error}"[:500]}]
        for row in rows:
            print(_progress(row), flush=True)
        records += rows
        write(records, meta, out_dir, name)
    return records


def _torch_meta() -> dict:
    try:
        import torch
    except ImportError:
        return {}
    from importlib import metadata as md

    peers = {}
    for name in ("liger-kernel", "cut-cross-entropy", "triton"):
        try:
            peers[name] = md.version(name)
        except md.PackageNotFoundError:
            peers[name] = None
    cuda = torch.cuda.is_available()
    return {"torch": torch.__version__, "torch_cuda": cuda, "peers": peers}


# -------------------------------------------------------------- reporting


def _ms(seconds):
    return "–" if seconds is None else f"{1e3 * seconds:.3g}"


def _ratio(a, b, fmt="{:.2f}"):
    return "–" if a is None or not b else fmt.format(a / b)


def _progress(r) -> str:
    shape = "x".join(map(str, r["shape"]))
    return (
        f"{r['kind']:<40} {shape:<20} {r['dtype']:<9} {r['program']:<12} "
        f"{_ms(r.get('median_s'))} ms  roofline {_ms(r.get('roofline_s'))} ms  "
        f"deviceless {_ms(r.get('deviceless_roofline_s'))} ms  "
        f"{r.get('error', '')}"
    )


def markdown(records, meta) -> str:
    published = meta["published"]
    measured = meta["measured"]
    lines = [
        f"# On the chip: {meta['device']}",
        "",
        f"jxent {meta.get('jxent_revision')}, jax {meta['jax']}, optax "
        f"{meta['optax']}, torch {meta.get('torch')}{_peers(meta)} on "
        f"{meta['date']}; {meta['repeats']} repeats, contenders interleaved, "
        "times are medians in ms of the value-and-gradient call (the LM heads': "
        "w.r.t. x and w). torch contenders' memory is their peak allocation "
        "during one call (\"(peak)\"); JAX programs' is XLA's temporaries.",
        "",
        "Ceilings: published "
        + (
            f"{published['flops'] / 1e12:.0f} TFLOP/s dense bf16, "
            f"{published['bandwidth'] / 1e12:.2f} TB/s"
            if published["flops"]
            else "unknown"
        )
        + (
            f"; measured here {measured['matmul_flops'] / 1e12:.0f} TFLOP/s "
            f"(bf16 8192³ matmul), {measured['copy_bytes_per_s'] / 1e12:.2f} TB/s "
            "(x + 1 on 4 GiB, read + write)."
            if measured
            else "."
        ),
        "",
        "Predictions are roofline times (matmul flops at the peak + traffic of "
        "the big arrays at the bandwidth, docs/on_tpu_and_gpu.md): *deviceless* "
        f"from the {meta['deviceless_target']} programs compiled without the chip "
        "(benchmarks/results/compiled) at this chip's published figures; "
        "*on chip* from the program compiled here, at the published and at the "
        "measured ceilings. measured/roofline > 1: slower than the model.",
        "",
        "| program | shape | dtype | contender | measured ms | IQR | deviceless "
        "ms | on chip ms (published) | on chip ms (measured ceilings) | measured "
        "/ deviceless | measured / on chip (measured ceilings) | temporaries GiB "
        "(deviceless) | traffic passes (deviceless) |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in records:
        if "median_s" not in r:
            lines.append(
                f"| {r['kind']} | {_shape(r)} | {r['dtype']} | {r['program']} | "
                f"{r.get('error', 'not run')[:80]} |" + " |" * 8
            )
            continue
        temp = r.get("temp_bytes", r.get("peak_bytes"))
        temp_text = "–" if temp is None else f"{temp / GiB:.2f}"
        if r.get("peak_bytes") is not None:
            temp_text += " (peak)"
        elif r.get("deviceless_temp_bytes") is not None:
            temp_text += f" ({r['deviceless_temp_bytes'] / GiB:.2f})"
        passes = r.get("passes")
        passes_text = "–" if passes is None else f"{passes:.1f}"
        if r.get("deviceless_passes") is not None:
            passes_text += f" ({r['deviceless_passes']:.1f})"
        lines.append(
            f"| {r['kind']} | {_shape(r)} | {r['dtype']} | {r['program']} | "
            f"{_ms(r['median_s'])} | {100 * r['iqr_over_median']:.0f}% | "
            f"{_ms(r.get('deviceless_roofline_s'))} | {_ms(r.get('roofline_s'))} | "
            f"{_ms(r.get('roofline_measured_s'))} | "
            f"{_ratio(r['median_s'], r.get('deviceless_roofline_s'))} | "
            f"{_ratio(r['median_s'], r.get('roofline_measured_s'))} | "
            f"{temp_text} | {passes_text} |"
        )
    lines += ["", *ratio_table(records)]
    return "\n".join(lines) + "\n"


def _peers(meta) -> str:
    peers = [f"{k} {v}" for k, v in meta.get("peers", {}).items() if v]
    return "".join(f", {p}" for p in peers)


def _shape(r):
    return "×".join(map(str, r["shape"]))


def ratio_table(records) -> list[str]:
    """jxent against each other contender: measured and predicted ratios."""
    lines = [
        "jxent / contender: measured time, and the roofline ratio predicted "
        "deviceless and on the chip; agreement of jxent's value and gradients "
        "with the JAX baseline's (relative, gradients as norms of the difference).",
        "",
        "| program | shape | dtype | against | measured | predicted deviceless | "
        "predicted on chip | value rel. diff | gradient rel. diffs |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    groups: dict[tuple, dict] = {}
    for r in records:
        key = (r["kind"], tuple(r["shape"]), r["dtype"])
        groups.setdefault(key, {})[r["program"]] = r
    for (kind, shape, dtype), group in groups.items():
        ours = group.get("jxent")
        if not ours or "median_s" not in ours:
            continue
        for name, other in group.items():
            if name == "jxent" or "median_s" not in other:
                continue
            jax_base = "roofline_s" in other
            diffs = ours.get("grad_rel_diffs") or []
            lines.append(
                f"| {kind} | {'×'.join(map(str, shape))} | {dtype} | {name} | "
                f"{_ratio(ours['median_s'], other['median_s'])} | "
                + (
                    f"{_ratio(ours.get('deviceless_roofline_s'), other.get('deviceless_roofline_s'))} | "  # noqa: E501
                    f"{_ratio(ours.get('roofline_s'), other.get('roofline_s'))} | "
                    f"{ours.get('value_rel_diff', 0):.1e} | "
                    + ", ".join(f"{d:.1e}" for d in diffs)
                    + " |"
                    if jax_base
                    else "– | – | – | – |"
                )
            )
    return lines


def plot(records, path: Path) -> None:
    """Measured against predicted (on chip, measured ceilings), log-log."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(6.5, 5))
    colours = {"jxent": "C0", "optax": "C1", "naive": "C2"}
    for r in records:
        predicted = r.get("roofline_measured_s") or r.get("roofline_s")
        if "median_s" not in r or not predicted:
            continue
        colour = colours.get(r["program"], "C3")
        marker = "o" if r["kind"] == "cross_entropy" else "s"
        ax.scatter(1e3 * predicted, 1e3 * r["median_s"], c=colour, marker=marker)
    limits = [min(ax.get_xlim()[0], ax.get_ylim()[0]), max(ax.get_xlim()[1], 1)]
    ax.plot(limits, limits, "k:", lw=1, label="measured = roofline")
    ax.set(xscale="log", yscale="log", xlabel="roofline ms (compiled on chip)")
    ax.set(ylabel="measured ms", title="measured vs roofline (o logits, s LM heads)")
    for name, colour in colours.items():
        ax.scatter([], [], c=colour, label=name)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def write(records, meta, out_dir: Path, name: str = "on_chip") -> None:
    (out_dir / f"{name}.json").write_text(
        json.dumps({"meta": meta, "records": records}, indent=1, default=str)
    )
    (out_dir / f"{name}.md").write_text(markdown(records, meta))
    plot(records, out_dir / f"{name}.png")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="tiny shapes")
    p.add_argument(
        "--parts",
        nargs="+",
        choices=("cross_entropy", "linear", "heads"),
        default=("cross_entropy", "linear"),
        help="heads: the RL / distillation heads of bench_compiled.py --heads",
    )
    p.add_argument(
        "--heads-shape", type=int, nargs=3, action="append", metavar=("N", "D", "V")
    )
    p.add_argument("--repeats", type=int, default=15)
    p.add_argument("--no-torch", action="store_true")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", type=Path)
    p.add_argument("--save-hlo", type=Path, metavar="DIR", help="keep each program")
    p.add_argument(
        "--restat",
        type=Path,
        nargs=2,
        metavar=("RESULTS", "HLO"),
        help="recompute RESULTS/on_chip*.json's figures from the HLO saved in HLO",
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.restat:  # recompute the figures of a written result from its HLO
        for path in sorted(args.restat[0].glob("on_chip*.json")):
            saved = json.loads(path.read_text())
            restat(saved["records"], saved["meta"], args.restat[1])
            write(saved["records"], saved["meta"], path.parent, path.stem)
        return 0
    run(args)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
