"""What jxent's programs look like compiled for TPUs and GPUs, without the chips.

Deviceless ahead-of-time compilation: the value_and_grad programs of
``jxent.cross_entropy`` (against optax) and ``jxent.linear_cross_entropy``
(against the naive ``jxent.cross_entropy(x @ w, t)``) are lowered and compiled
for a TPU v5e, a TPU v6e and an H100 on this machine, and read back: the
temporaries XLA allocates (``memory_analysis()``), and from the optimized HLO
(``hlo_stats.py``) the HBM traffic of the big arrays on the path that runs,
the matmul flops with loop trip counts, the collectives, and a roofline time.

    pip install -e ".[aot,bench]"
    JAX_PLATFORMS=cpu python benchmarks/bench_compiled.py
    JAX_PLATFORMS=cpu python benchmarks/bench_compiled.py --targets tpu-v5e \\
        v5p:1x1x1 path/to/gpu_target_config.txtpb --quick

Nothing runs on a chip; see docs/on_tpu_and_gpu.md for what the figures mean.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import json
import os
import re
import sys
import time
from dataclasses import dataclass
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import hlo_stats

HERE = Path(__file__).resolve().parent
OUT = HERE / "results" / "compiled"
EXTRA = 'the "aot" extra: pip install -e ".[aot]"'
GiB = 2**30
TOPOLOGY = re.compile(r"^([a-zA-Z0-9_ ]+)[=_:]([0-9x]+)(_twisted|_untwisted)?$")

CROSS_ENTROPY_SHAPES = [(8192, 32768), (2048, 131072)]
LINEAR_HEADS = [(8192, 4096, 131072), (8192, 2304, 256000), (32768, 4096, 131072)]
MAX_BATCH_HEADS = [(4096, 131072), (2304, 256000)]
QUICK_CROSS_ENTROPY = [(512, 4096)]
QUICK_HEADS = [(1024, 256, 8192)]
# The LM-head heads (issue 18's memory target): compiled for the chips at
# these shapes (bfloat16), and for this CPU at CPU_HEADS (float32, bfloat16).
HEADS_SHAPES = [(8192, 4096, 131072), (8192, 2304, 256000)]
CPU_HEADS = [(2048, 1024, 131072)]
QUICK_HEADS_SHAPES = [(1024, 256, 8192)]


@dataclass(frozen=True)
class Target:
    """A chip to compile for, with its published peak figures."""

    name: str
    platform: str  # "tpu" or "cuda"
    spec: str  # a TPU topology name, or a GPU target description's path
    peak_flops: float | None = None  # dense bf16, FLOP/s
    hbm_bandwidth: float | None = None  # bytes/s
    hbm_bytes: float | None = None


# The published figures (docs/on_tpu_and_gpu.md cites them).
TARGETS = {
    "tpu-v5e": Target("tpu-v5e", "tpu", "v5e:1x1", 197e12, 819e9, 16 * GiB),
    "tpu-v6e": Target("tpu-v6e", "tpu", "v6e:1x1", 918e12, 1640e9, 32 * GiB),
    "h100": Target(
        "h100", "cuda", str(HERE / "targets" / "h100_sxm.txtpb"), 989e12, 3.35e12, 80e9
    ),
}


CPU = Target("cpu", "cpu", "this host")


class Unavailable(Exception):
    """A compiler package is missing, a target name is unknown, or there are
    no results to report."""


# ---------------------------------------------------------------- targets


def resolve_target(name: str) -> Target:
    """A known target, a TPU topology name (``v5p:1x1x1``) or a GPU file."""
    if name in TARGETS:
        return TARGETS[name]
    if name == "cpu":
        return CPU
    if Path(name).is_file():
        return Target(Path(name).stem, "cuda", name)
    if TOPOLOGY.match(name):
        return Target(name.replace(":", "-"), "tpu", name)
    raise Unavailable(
        f"unknown target {name!r}: use one of {', '.join(TARGETS)}, a TPU "
        f"topology name such as v5p:1x1x1, or a GPU target-config (.txtpb) path "
        f"(the compilers: {EXTRA})"
    )


def devices(target: Target, chips: str | None = None):
    """The target's devices (one chip, or the topology ``chips`` names)."""
    from jax.experimental import topologies

    if target.platform == "cpu":
        import jax

        return jax.devices("cpu")[:1]

    try:
        if target.platform == "tpu":
            import libtpu  # noqa: F401

            name = chips or target.spec
            bounds = (1, 1, 1) if chips is None else None
            kwargs = {"chips_per_host_bounds": bounds} if bounds else {}
            topo = topologies.get_topology_desc(
                topology_name=name, platform="tpu", **kwargs
            )
        else:
            import jax_plugins.xla_cuda12  # noqa: F401

            topo = topologies.get_topology_desc(
                platform="cuda",
                target_config=Path(target.spec).read_text(),
                topology=chips or "1x1x1",
            )
    except ImportError as error:
        message = f"{target.name}: {error.name} is missing; install {EXTRA}"
        raise Unavailable(message) from None
    except Exception as error:  # a message from the compiler's plugin
        first = str(error).strip().splitlines()[0][:200]
        message = f"{target.name}: no devices: {first} (the compilers: {EXTRA})"
        raise Unavailable(message) from None
    return topo.devices


# --------------------------------------------------------------- programs


def cross_entropy_programs(n, c, dtype):
    """(name, f, argument shapes/dtypes, logits bytes) for jxent and optax."""
    import jax
    import jax.numpy as jnp
    import optax

    import jxent

    def ours(x, t):
        return jxent.cross_entropy(x, t)

    def theirs(x, t):
        return optax.softmax_cross_entropy_with_integer_labels(x, t).mean()

    args = [((n, c), dtype), ((n,), jnp.int32)]
    logits = n * c * jnp.dtype(dtype).itemsize
    return [
        ("jxent", jax.value_and_grad(ours), args, logits),
        ("optax", jax.value_and_grad(theirs), args, logits),
    ]


def linear_programs(n, d, v, dtype, reduction="mean"):
    """(name, f, argument shapes/dtypes, logits bytes) for jxent and naive.

    ``reduction="none"``: the per-token losses, differentiated through the
    sum of their squares (a per-token cotangent, as a weighted loss has).
    """
    import jax
    import jax.numpy as jnp

    import jxent

    def reduced(loss):
        return loss if reduction != "none" else jnp.sum(jnp.square(loss))

    def ours(x, w, t):
        return reduced(jxent.linear_cross_entropy(x, w, t, reduction=reduction))

    def naive(x, w, t):
        return reduced(jxent.cross_entropy(x @ w, t, reduction=reduction))

    args = [((n, d), dtype), ((d, v), dtype), ((n,), jnp.int32)]
    logits = n * v * jnp.dtype(dtype).itemsize
    grad = {"argnums": (0, 1)}
    return [
        ("jxent", jax.value_and_grad(ours, **grad), args, logits),
        ("naive", jax.value_and_grad(naive, **grad), args, logits),
    ]


def head_programs(n, d, v, dtype):
    """(kind, name, f, argument shapes/dtypes, logits bytes): the LM heads.

    Each fused head (log-probabilities with and without the entropy; the
    forward KL and the JSD) against the same formulas on materialised logits, as
    ``value_and_grad`` w.r.t. the student's ``x`` and ``w`` (the teacher is
    an input, not differentiated); ``linear_argmax`` is forward only, against
    ``jnp.argmax(x @ w)``; ``linear_cross_entropy`` (whose budget the heads
    are held to) for reference.
    """
    import jax
    import jax.numpy as jnp

    import jxent

    def logits(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32)

    def log_probs(x, w, t):
        lp, ent = jxent.linear_log_probs(x, w, t, temperature=0.9, return_entropy=True)
        return jnp.sum(lp) + 0.01 * jnp.sum(ent)

    def log_probs_naive(x, w, t):
        lp, ent = jxent.log_probs(logits(x, w), t, temperature=0.9, return_entropy=True)
        return jnp.sum(lp) + 0.01 * jnp.sum(ent)

    def log_probs_alone(x, w, t):
        return jnp.sum(jxent.linear_log_probs(x, w, t, temperature=0.9))

    def log_probs_alone_naive(x, w, t):
        return jnp.sum(jxent.log_probs(logits(x, w), t, temperature=0.9))

    def jsd(x, w, tx, tw, t):
        return jxent.linear_distillation_loss(x, w, tx, tw, t, beta=0.5)

    def jsd_naive(x, w, tx, tw, t):
        return jxent.distillation_loss(logits(x, w), logits(tx, tw), t, beta=0.5)

    def distill(x, w, tx, tw, t):
        return jxent.linear_distillation_loss(x, w, tx, tw, t)

    def distill_naive(x, w, tx, tw, t):
        return jxent.distillation_loss(logits(x, w), logits(tx, tw), t)

    def argmax(x, w):
        return jxent.linear_argmax(x, w)

    def cross_entropy(x, w, t):
        return jxent.linear_cross_entropy(x, w, t)

    def cross_entropy_naive(x, w, t):
        return jxent.cross_entropy(logits(x, w), t)

    def argmax_naive(x, w):
        return jnp.argmax(logits(x, w), axis=-1).astype(jnp.int32)

    x, w, t = ((n, d), dtype), ((d, v), dtype), ((n,), jnp.int32)
    size = n * v * jnp.dtype(dtype).itemsize
    grad = {"argnums": (0, 1)}
    return [
        ("linear_log_probs", "jxent", jax.value_and_grad(log_probs, **grad),
         [x, w, t], size),
        ("linear_log_probs", "naive", jax.value_and_grad(log_probs_naive, **grad),
         [x, w, t], size),
        ("linear_distillation_loss", "jxent", jax.value_and_grad(distill, **grad),
         [x, w, x, w, t], size),
        ("linear_distillation_loss", "naive",
         jax.value_and_grad(distill_naive, **grad), [x, w, x, w, t], size),
        ("linear_log_probs (no entropy)", "jxent",
         jax.value_and_grad(log_probs_alone, **grad), [x, w, t], size),
        ("linear_log_probs (no entropy)", "naive",
         jax.value_and_grad(log_probs_alone_naive, **grad), [x, w, t], size),
        ("linear_distillation_loss (JSD, beta 0.5)", "jxent",
         jax.value_and_grad(jsd, **grad), [x, w, x, w, t], size),
        ("linear_distillation_loss (JSD, beta 0.5)", "naive",
         jax.value_and_grad(jsd_naive, **grad), [x, w, x, w, t], size),
        ("linear_argmax", "jxent", argmax, [x, w], size),
        ("linear_argmax", "naive", argmax_naive, [x, w], size),
        # The budget's owner, for reference.
        ("linear_cross_entropy", "jxent", jax.value_and_grad(cross_entropy, **grad),
         [x, w, t], size),
        ("linear_cross_entropy", "naive",
         jax.value_and_grad(cross_entropy_naive, **grad), [x, w, t], size),
    ]  # fmt: skip


SHARDED_SHAPE = (2048, 32768)
MESHES = [(2, 4), (4, 2)]
EIGHT_CHIPS = {"tpu-v5e": "v5e:2x4", "h100": "1x1x8"}


def sharded_programs(n, c):
    """cross_entropy plain, weighted + smoothed, and optax (logits, target[, w])."""
    import jax
    import jax.numpy as jnp
    import optax

    import jxent

    def plain(x, t):
        return jxent.cross_entropy(x, t)

    def weighted(x, t, w):
        return jxent.cross_entropy(x, t, w, label_smoothing=0.1)

    def theirs(x, t):
        return optax.softmax_cross_entropy_with_integer_labels(x, t).mean()

    two = [((n, c), jnp.float32), ((n,), jnp.int32)]
    logits = n * c * 4
    return [
        ("jxent", jax.value_and_grad(plain), two, logits),
        (
            "jxent_weighted",
            jax.value_and_grad(weighted),
            [*two, ((c,), jnp.float32)],
            logits,
        ),
        ("optax", jax.value_and_grad(theirs), two, logits),
    ]


def sharded_specs(devices_, mesh_shape, count):
    """Logits over (rows, classes), targets over rows, weights replicated."""
    import numpy as np
    from jax.sharding import Mesh, NamedSharding
    from jax.sharding import PartitionSpec as P

    mesh = Mesh(np.array(devices_).reshape(mesh_shape), ("rows", "classes"))
    specs = [P("rows", "classes"), P("rows"), P()]
    return [NamedSharding(mesh, spec) for spec in specs[:count]]


def run_sharded(target, devices_):
    """Collectives of auto-sharded cross_entropy on 8 chips, both meshes."""
    records = []
    for mesh_shape in MESHES:
        for name, f, args, logits in sharded_programs(*SHARDED_SHAPE):
            specs = sharded_specs(devices_, mesh_shape, len(args))
            record = {
                "kind": "cross_entropy (8 chips)",
                "shape": list(SHARDED_SHAPE),
                "dtype": "float32",
                "mesh": list(mesh_shape),
                "program": name,
                "target": target.name,
            }
            start = time.perf_counter()
            compiled = compile_program(f, args, devices_, specs)
            record.update(fits=True, **measure(compiled, logits / 8, target))
            record["compile_s"] = round(time.perf_counter() - start, 1)
            records.append(record)
            print(_progress(record), record["collectives"], flush=True)
    return records


def compile_program(f, args, devices_, specs=None):
    """``jax.jit(f).lower(...).compile()`` on ``devices_`` (a 1-D mesh)."""
    import jax
    import numpy as np
    from jax.sharding import Mesh, NamedSharding, PartitionSpec

    mesh = Mesh(np.array(devices_).reshape(-1), ("d",)) if specs is None else None
    structs = []
    for i, (shape, dtype) in enumerate(args):
        if specs is None:
            sharding = NamedSharding(mesh, PartitionSpec())
        else:
            sharding = specs[i]
        structs.append(jax.ShapeDtypeStruct(shape, dtype, sharding=sharding))
    return jax.jit(f).lower(*structs).compile()


# -------------------------------------------------------------- measuring


def threshold(logits_bytes: float) -> float:
    """The size from which an array's traffic counts (docs: 'Traffic')."""
    return min(logits_bytes / 8, 4 * 2**20)


def measure(compiled, logits_bytes: float, target: Target) -> dict:
    """Memory, traffic, flops, collectives and roofline of one program."""
    memory = compiled.memory_analysis()
    stats = hlo_stats.program_stats(compiled.as_text(), threshold(logits_bytes))
    record = {
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "alias_bytes": memory.alias_size_in_bytes,
        "logits_bytes": logits_bytes,
        **stats.to_dict(),
    }
    record["passes"] = stats.traffic / logits_bytes
    record["roofline_s"] = roofline(stats.flops, stats.traffic, target)
    return record


def roofline(flops: float, traffic: float, target: Target) -> float | None:
    """Matmuls at peak plus the big arrays' bytes at HBM bandwidth."""
    if not (target.peak_flops and target.hbm_bandwidth):
        return None
    return flops / target.peak_flops + traffic / target.hbm_bandwidth


def new_record(kind, shape, dtype, name, target) -> dict:
    """The fields that name one compiled program in the results."""
    import numpy as np

    return {
        "kind": kind,
        "shape": list(shape),
        "dtype": np.dtype(dtype).name,
        "program": name,
        "target": target.name,
    }


def run_one(kind, shape, dtype, name, f, args, logits, target, devices_):
    """Compile and measure one program; a program that does not fit says so."""

    start = time.perf_counter()
    record = new_record(kind, shape, dtype, name, target)
    try:
        compiled = compile_program(f, args, devices_)
    except Exception as error:  # XLA's RESOURCE_EXHAUSTED and the like
        message = str(error).strip().splitlines()[0][:300]
        if "PTX compilation provider" in message:  # no ptxas
            raise Unavailable(f"{target.name}: {message}; install {EXTRA}") from None
        record.update(fits=False, error=message)
    else:
        record.update(fits=True, **measure(compiled, logits, target))
        del compiled
    record["compile_s"] = round(time.perf_counter() - start, 1)
    return record


def max_batch(d, v, program, target, devices_, limit=2**20):
    """Largest power-of-two N whose program compiles (fits) on one chip."""
    import jax.numpy as jnp

    best, n = None, 1024
    while n <= limit:
        programs = {p[0]: p for p in linear_programs(n, d, v, jnp.bfloat16)}
        _, f, args, _ = programs[program]
        try:
            compile_program(f, args, devices_)
        except Exception as error:
            if "RESOURCE_EXHAUSTED" not in str(error):
                raise
            return best, n
        best, n = n, 2 * n
    return best, None


# -------------------------------------------------------------- reporting


def compare(records: list[dict]) -> list[dict]:
    """jxent's rows next to their baseline's, with the ratios."""
    rows = []
    for ours in (r for r in records if r["program"] == "jxent"):
        base = next(
            r
            for r in records
            if r["program"] != "jxent"
            and (r["kind"], r["shape"], r["dtype"], r["target"])
            == (ours["kind"], ours["shape"], ours["dtype"], ours["target"])
        )
        rows.append({"ours": ours, "base": base, **_ratios(ours, base)})
    return rows


def _ratios(ours, base):
    def ratio(key):
        if not (ours.get("fits") and base.get("fits")) or not base.get(key):
            return None
        if key == "temp_bytes" and max(ours[key], base[key]) < 16 * 2**20:
            return None  # a few KiB of scratch either way: no meaningful ratio
        return ours[key] / base[key]

    return {k: ratio(k) for k in ("temp_bytes", "traffic_bytes", "flops", "roofline_s")}


def _gib(record):
    if not record.get("fits"):
        return "does not fit"
    return f"{record['temp_bytes'] / GiB:.2f}"


def _num(value, fmt="{:.2f}"):
    return "–" if value is None else fmt.format(value)


def _collectives(record):
    if not record.get("fits"):
        return "–"
    return str(record["collective_count"])


def markdown(rows: list[dict], batches: list[dict], meta: dict) -> str:
    """The results table (docs/on_tpu_and_gpu.md includes it)."""
    lines = [
        f"Compiled deviceless with jax {meta['jax']}, libtpu {meta['libtpu']}, "
        f"jax-cuda12-plugin {meta['cuda_plugin']} on {meta['date']}. "
        "Temporaries in GiB; traffic in passes over the logits (bytes of the "
        "big arrays moved / bytes of the N×V logits); ratios jxent / baseline "
        "(optax for cross_entropy, naive `cross_entropy(x @ w)` for "
        "linear_cross_entropy).",
        "",
        "| program | shape | dtype | target | temporaries (base) | traffic, "
        "passes (base) | flops ratio | collectives (base) | roofline ms (base) "
        "| roofline ratio |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        ours, base = row["ours"], row["base"]
        lines.append(
            (
                "| {} " * 4 + "| {} ({}) " * 2 + "| {} " + "| {} ({}) " * 2 + "| {} |"
            ).format(
                ours["kind"],
                "×".join(map(str, ours["shape"])),
                ours["dtype"],
                ours["target"],
                _gib(ours),
                _gib(base),
                _num(ours.get("passes"), "{:.1f}"),
                _num(base.get("passes"), "{:.1f}"),
                _num(row["flops"]),
                _collectives(ours),
                _collectives(base),
                _num(_ms(ours.get("roofline_s")), "{:.1f}"),
                _num(_ms(base.get("roofline_s")), "{:.1f}"),
                _num(row["roofline_s"]),
            )
        )
    if batches:
        lines += [
            "",
            "Largest token batch N (a power of two) whose linear_cross_entropy "
            "value_and_grad program compiles on one chip:",
            "",
            "| (D, V) | target | jxent | naive | jxent / naive |",
            "|---|---|---|---|---|",
        ]
        for b in batches:
            lines.append(
                f"| ({b['d']}, {b['v']}) | {b['target']} | {_batch(b, 'jxent')} "
                f"| {_batch(b, 'naive')} | {_batch_ratio(b)} |"
            )
    return "\n".join(lines) + "\n"


def _batch(row, program):
    """N, or "≥ N" where the search stopped at its limit without a failure."""
    if row[program] is None:
        return "none"
    return f"{'≥ ' if row[f'{program}_fails_at'] is None else ''}{row[program]}"


def _batch_ratio(row):
    if not (row["jxent"] and row["naive"]):
        return "–"
    bound = "≥ " if row["jxent_fails_at"] is None else ""
    return f"{bound}{row['jxent'] // row['naive']}×"


def _ms(seconds):
    return None if seconds is None else 1e3 * seconds


def plot(rows: list[dict], path: Path) -> None:
    """jxent / baseline ratios of temporaries, traffic and roofline time."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = [
        ("traffic_bytes", "traffic"),
        ("temp_bytes", "temporaries"),
        ("roofline_s", "roofline time"),
    ]
    labels = [
        f"{r['ours']['kind'].replace('_cross_entropy', '')} "
        f"{'×'.join(map(str, r['ours']['shape']))} {r['ours']['dtype']}\n"
        f"{r['ours']['target']}"
        for r in rows
    ]
    fig, axes = plt.subplots(len(keys), 1, figsize=(max(8, 0.45 * len(rows)), 10))
    for ax, (key, title) in zip(axes, keys, strict=True):
        values = [r[key] if r[key] is not None else 0 for r in rows]
        colors = ["tab:green" if v and v <= 1 else "tab:red" for v in values]
        ax.bar(range(len(rows)), values, color=colors)
        ax.axhline(1.0, color="black", linewidth=0.8)
        ax.set_yscale("log")
        ax.set_ylabel(f"{title}\njxent / baseline")
        ax.set_xticks(range(len(rows)), [] if ax is not axes[-1] else labels)
    axes[-1].tick_params(axis="x", labelrotation=90, labelsize=6)
    fig.suptitle("Compiled value_and_grad programs: jxent / baseline (< 1 is leaner)")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def metadata() -> dict:
    from importlib import metadata as md

    import jax

    def version(name):
        try:
            return md.version(name)
        except md.PackageNotFoundError:
            return None

    return {
        "jax": jax.__version__,
        "libtpu": version("libtpu"),
        "cuda_plugin": version("jax-cuda12-plugin"),
        "optax": version("optax"),
        "date": time.strftime("%Y-%m-%d", time.gmtime()),
    }


# ------------------------------------------------------------------ heads


def head_budget(n, d, v) -> int:
    """``linear_cross_entropy``'s memory budget: 1.5 x (dx + dw in float32)
    + 64 MiB (benchmarks/bench_linear_cross_entropy.py, README "Performance")."""
    return int(1.5 * 4 * (n * d + d * v)) + 64 * 2**20


def measure_head(compiled, arguments, logits_bytes, n, v) -> dict:
    """``measure``'s memory and traffic, and the largest array in the program
    against N·V: of all, and of those not shaped as an argument (x, w)."""
    text = compiled.as_text()
    memory = compiled.memory_analysis()
    record = {
        "temp_bytes": memory.temp_size_in_bytes,
        "argument_bytes": memory.argument_size_in_bytes,
        "output_bytes": memory.output_size_in_bytes,
        "logits_bytes": logits_bytes,
    }
    try:
        stats = hlo_stats.program_stats(text, threshold(logits_bytes))
    except (ValueError, KeyError, StopIteration) as error:  # an unread loop
        record["stats_error"] = str(error)[:200]
    else:
        record.update(stats.to_dict(), passes=stats.traffic / logits_bytes)
    elements, type_ = hlo_stats.largest_array(text)
    shapes = [shape for shape, _ in arguments]
    other, other_type = hlo_stats.largest_array(text, exclude=shapes)
    record.update(
        largest_elements=elements,
        largest_type=type_,
        largest_over_nv=elements / (n * v),
        largest_other_type=other_type,
        largest_other_over_nv=other / (n * v),
    )
    return record


def run_heads_target(target, devices_, args, out_dir) -> list[dict]:
    """The heads' programs for one target, each written as soon as measured.

    The chips' programs are traced as on the chip (``traced_as_on``): the
    program a process there would compile.
    """
    import jax.numpy as jnp

    if target.platform == "cpu":
        shapes = QUICK_HEADS_SHAPES if args.quick else CPU_HEADS
        jobs = [(s, dt) for s in shapes for dt in (jnp.float32, jnp.bfloat16)]
        context = contextlib.nullcontext()
    else:
        shapes = QUICK_HEADS_SHAPES if args.quick else HEADS_SHAPES
        jobs = [(s, jnp.bfloat16) for s in shapes]
        context = traced_as_on(target)
    records = []
    with context:
        for shape, dtype in jobs:
            for kind, name, f, arguments, logits in head_programs(*shape, dtype):
                record = new_record(kind, shape, dtype, name, target)
                record["budget_bytes"] = head_budget(*shape)
                start = time.perf_counter()
                try:
                    compiled = compile_program(f, arguments, devices_)
                except Exception as error:  # RESOURCE_EXHAUSTED and the like
                    message = str(error).strip().splitlines()[0][:300]
                    record.update(fits=False, error=message)
                else:
                    n, _, v = shape
                    measured = measure_head(compiled, arguments, logits, n, v)
                    record.update(fits=True, **measured)
                    del compiled
                record["compile_s"] = round(time.perf_counter() - start, 1)
                records.append(record)
                write_heads(records, out_dir)
                print(_head_progress(record), flush=True)
    return records


def _head_progress(record):
    return _progress(record, heads=True)


def _head_key(record):
    return tuple(
        str(record[k]) for k in ("kind", "shape", "dtype", "program", "target")
    )


def write_heads(records, out_dir: Path) -> None:
    """Merge ``records`` into heads_results.json (replacing the same
    programs); rewrite heads_results.md from all of it."""
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / "heads_results.json"
    saved = json.loads(path.read_text())["records"] if path.exists() else []
    fresh = {_head_key(r) for r in records}
    merged = [r for r in saved if _head_key(r) not in fresh] + list(records)
    meta = metadata()
    path.write_text(json.dumps({"meta": meta, "records": merged}, indent=1) + "\n")
    (out_dir / "heads_results.md").write_text(heads_markdown(merged, meta))


NEEDED = re.compile(r"HLO temporaries \(([0-9.]+)([KMGT])\)")


def needed_temp_bytes(record) -> float | None:
    """Temporaries: measured, or those a program that did not fit needed
    (XLA's RESOURCE_EXHAUSTED message names them)."""
    if record is None:
        return None
    if record.get("fits"):
        return record["temp_bytes"]
    match = NEEDED.search(record.get("error", ""))
    if not match:
        return None
    return float(match.group(1)) * 1024 ** "KMGT".index(match.group(2)) * 1024


def head_rows(records) -> list[dict]:
    """Each jxent head next to its naive program, with the ratios (against
    what the naive program needed where it did not fit)."""
    rows = []
    for ours in (r for r in records if r["program"] == "jxent"):
        base = next(
            (
                r
                for r in records
                if r["program"] == "naive"
                and _head_key(r)[:3] + _head_key(r)[4:]
                == _head_key(ours)[:3] + _head_key(ours)[4:]
            ),
            None,
        )
        row = {"ours": ours, "base": base, "temp_ratio": None}
        base_temp = needed_temp_bytes(base)
        # A few KiB of scratch either way (the TPU fuses the naive argmax's
        # matmul into its reduction): no meaningful ratio.
        if (
            ours.get("fits")
            and base_temp
            and max(ours["temp_bytes"], base_temp) >= (16 * 2**20)
        ):
            row["temp_ratio"] = ours["temp_bytes"] / base_temp
        if ours.get("fits"):
            row["temp_over_budget"] = ours["temp_bytes"] / ours["budget_bytes"]
            extra = ours["temp_bytes"] + ours["output_bytes"]
            row["extra_over_budget"] = extra / ours["budget_bytes"]
        rows.append(row)
    order = {"cpu": 0, "tpu-v5e": 1, "h100": 2}
    kinds = [
        "linear_log_probs",
        "linear_log_probs (no entropy)",
        "linear_distillation_loss",
        "linear_distillation_loss (JSD, beta 0.5)",
        "linear_argmax",
        "linear_cross_entropy",
    ]
    rows.sort(
        key=lambda r: (
            order.get(r["ours"]["target"], 9),
            r["ours"]["shape"],
            r["ours"]["dtype"] != "float32",
            kinds.index(r["ours"]["kind"]) if r["ours"]["kind"] in kinds else 9,
        )
    )
    return rows


def _mib(record):
    if record is None:
        return "–"
    needed = needed_temp_bytes(record)
    if not record.get("fits"):
        return "does not fit" if needed is None else f"{needed / 2**20:,.0f} needed"
    return f"{needed / 2**20:,.0f}"


def _largest(record, other=False):
    if record is None or not record.get("fits"):
        return "–"
    key = "largest_other" if other else "largest"
    return f"{record[f'{key}_type']} ({record[f'{key}_over_nv']:.2f})"


def heads_markdown(records, meta) -> str:
    """The table of docs/rl_distillation.md's "Memory" section."""
    lines = [
        f"Compiled with jax {meta['jax']}, libtpu {meta['libtpu']}, "
        f"jax-cuda12-plugin {meta['cuda_plugin']} on {meta['date']} (nothing "
        "runs; the chips' programs traced as on the chip). value_and_grad "
        "w.r.t. the student's x and w (`linear_argmax`: forward only). "
        "Temporaries: XLA's `memory_analysis().temp_size_in_bytes`, MiB. "
        "Largest array: the largest array of any instruction in the optimized "
        "HLO, with its elements / N·V in parentheses (< 1: no (N, V) array); "
        "besides x, w: the largest not shaped as an argument (the logits tile). "
        "Budget: `linear_cross_entropy`'s, 1.5 × (dx + dw in float32) + 64 MiB; "
        "+ outputs: temporaries plus the program's outputs (the gradients). "
        '"needed": the program does not fit the chip; XLA\'s message names '
        "the temporaries it needed, and the ratio is against those. No ratio "
        "where both programs' temporaries are under 16 MiB.",
        "",
        "| head | (N, D, V) | dtype | target | temporaries (naive) | jxent / "
        "naive | / budget | + outputs / budget | largest array, jxent (naive) | "
        "largest besides x, w, jxent |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in head_rows(records):
        ours, base = row["ours"], row["base"]
        lines.append(
            f"| {ours['kind']} | ({', '.join(map(str, ours['shape']))}) "
            f"| {ours['dtype']} | {ours['target']} | {_mib(ours)} ({_mib(base)}) "
            f"| {_num(row['temp_ratio'], '{:.3f}')} "
            f"| {_num(row.get('temp_over_budget'))} "
            f"| {_num(row.get('extra_over_budget'))} "
            f"| {_largest(ours)} ({_largest(base)}) | {_largest(ours, other=True)} |"
        )
    return "\n".join(lines) + "\n"


def run_heads(args) -> None:
    """``--heads``: the LM heads on each target (``cpu`` for this host)."""
    for name in args.targets:
        target = resolve_target(name)
        run_heads_target(target, devices(target), args, args.out_dir)


# ------------------------------------------------------------------- main


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--targets",
        nargs="+",
        default=list(TARGETS),
        help="tpu-v5e, tpu-v6e, h100, a TPU topology name or a GPU .txtpb path",
    )
    parser.add_argument("--quick", action="store_true", help="tiny shapes only")
    parser.add_argument("--no-max-batch", action="store_true")
    parser.add_argument("--no-sharded", action="store_true")
    parser.add_argument(
        "--max-batch-native",
        action="store_true",
        help="also search the largest v5e batch traced as on the chip",
    )
    parser.add_argument(
        "--native-path",
        action="store_true",
        help="also trace with jax.default_backend() answering the target's platform",
    )
    parser.add_argument(
        "--only-extras",
        action="store_true",
        help="keep the existing single-chip results; rerun the other parts asked for",
    )
    parser.add_argument(
        "--report-only",
        action="store_true",
        help="rewrite the table and the plot from the JSON, compiling nothing",
    )
    parser.add_argument(
        "--heads",
        action="store_true",
        help="only the LM heads (linear_log_probs, linear_distillation_loss, "
        "linear_argmax) against the naive formulas; --targets may name cpu; "
        "results merged into heads_results.{json,md}",
    )
    parser.add_argument("--out-dir", type=Path, default=OUT)
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    os.environ.setdefault("JAX_PLATFORMS", "cpu")
    try:
        run(args)
    except Unavailable as error:
        print(f"bench_compiled: {error}", file=sys.stderr)
        return 2
    return 0


def run(args) -> None:
    """Compile and measure everything asked for; write the results."""
    if args.heads:
        if args.report_only:
            write_heads([], args.out_dir)
            return
        run_heads(args)
        return
    if args.report_only:
        path = args.out_dir / "compiled_results.json"
        if not path.exists():
            raise Unavailable(f"--report-only: no {path} to report (run without it)")
        saved = json.loads(path.read_text())
        sharded = saved.get("sharded", [])
        write(saved["records"], saved["max_batch"], args.out_dir, sharded)
        return
    targets = [resolve_target(name) for name in args.targets]
    chips = {t.name: devices(t) for t in targets}
    previous = {"records": [], "max_batch": [], "sharded": []}
    if args.only_extras:  # keep what is not rerun
        previous = json.loads((args.out_dir / "compiled_results.json").read_text())
        records = previous["records"]
        if args.native_path:
            records = [r for r in records if not r["target"].endswith(" native")]
    else:
        records = [r for t in targets for r in run_targets(t, chips[t.name], args)]
    batches = previous["max_batch"]
    sharded = previous.get("sharded", [])
    write(records, batches, args.out_dir, sharded)  # each part as it is done
    if args.native_path:
        records += [
            r for t in targets for r in run_targets(t, chips[t.name], args, native=True)
        ]
        write(records, batches, args.out_dir, sharded)
    searches = [] if args.no_max_batch else [False]
    searches += [True] if args.max_batch_native else []
    for native in searches if "tpu-v5e" in chips and not args.quick else []:
        rows = run_max_batch(chips["tpu-v5e"], native)
        labels = {r["target"] for r in rows}
        batches = [b for b in batches if b["target"] not in labels] + rows
        write(records, batches, args.out_dir, sharded)
    if not (args.no_sharded or args.quick):
        sharded = []
        for target in (t for t in targets if t.name in EIGHT_CHIPS):
            eight = devices(target, EIGHT_CHIPS[target.name])
            sharded += run_sharded(target, eight)
        write(records, batches, args.out_dir, sharded)


@contextlib.contextmanager
def traced_as_on(target: Target):
    """``jax.default_backend()`` answers the target's platform while tracing.

    jxent picks its code paths for the platform a program is lowered for
    (``lax.platform_dependent``), so a program traced on a CPU host and
    compiled for a TPU or GPU is already the chip's. Under this, the program
    is traced as a process running on the chip traces it: the "native" rows
    check that nothing depends on the backend at trace time (they equal the
    others). Before jxent chose with ``jax.default_backend()``, they differed.
    """
    import jax

    original = jax.default_backend
    # jxent's inner jitted functions are traced once per process and cached:
    # without clearing, they keep the path of the first trace.
    jax.clear_caches()
    jax.default_backend = lambda: "tpu" if target.platform == "tpu" else "gpu"
    try:
        yield
    finally:
        jax.default_backend = original
        jax.clear_caches()


def run_targets(target, devices_, args, native=False) -> list[dict]:
    """Every single-chip program for one target.

    ``native``: traced as on the chip (``traced_as_on``); the records' target
    is then named ``<target> native``.
    """
    import jax.numpy as jnp

    if native:
        with traced_as_on(target):
            named = dataclasses.replace(target, name=f"{target.name} native")
            return run_targets(named, devices_, args)

    ce_shapes = QUICK_CROSS_ENTROPY if args.quick else CROSS_ENTROPY_SHAPES
    heads = QUICK_HEADS if args.quick else LINEAR_HEADS
    jobs = [
        ("cross_entropy", shape, dtype, cross_entropy_programs(*shape, dtype))
        for shape in ce_shapes
        for dtype in (jnp.float32, jnp.bfloat16)
    ] + [
        ("linear_cross_entropy", h, jnp.bfloat16, linear_programs(*h, jnp.bfloat16))
        for h in heads
    ]
    records = []
    for kind, shape, dtype, programs in jobs:
        for name, f, arguments, logits in programs:
            record = run_one(
                kind, shape, dtype, name, f, arguments, logits, target, devices_
            )
            records.append(record)
            print(_progress(record), flush=True)
    return records


def run_max_batch(devices_, native=False) -> list[dict]:
    """The largest power-of-two token batch on one v5e, jxent and naive.

    ``native``: traced as on the chip (``traced_as_on``), target "tpu-v5e
    native".
    """
    if native:
        with traced_as_on(TARGETS["tpu-v5e"]):
            rows = run_max_batch(devices_)
        return [r | {"target": "tpu-v5e native"} for r in rows]
    rows = []
    for d, v in MAX_BATCH_HEADS:
        row = {"d": d, "v": v, "target": "tpu-v5e"}
        for program in ("jxent", "naive"):
            row[program], row[f"{program}_fails_at"] = max_batch(
                d, v, program, TARGETS["tpu-v5e"], devices_
            )
        rows.append(row)
        print(row, flush=True)
    return rows


def _progress_head(record):
    """``target kind shape dtype program: `` of a progress line."""
    return (
        f"{record['target']} {record['kind']} {record['shape']} {record['dtype']} "
        f"{record['program']}: "
    )


def _progress(record, heads=False):
    head = _progress_head(record)
    if not record["fits"]:
        return head + record["error"][:120]
    if heads:
        middle = (
            f"temp {record['temp_bytes'] / 2**20:.1f} MiB, largest "
            f"{record['largest_type']} ({record['largest_over_nv']:.3f} N·V)"
        )
    else:
        middle = (
            f"temp {record['temp_bytes'] / GiB:.2f} GiB, "
            f"{record['passes']:.2f} passes, {record['flops'] / 1e12:.2f} TFLOP"
        )
    return f"{head}{middle}, {record['compile_s']} s"


def write(records, batches, out_dir: Path, sharded=()) -> None:
    out_dir.mkdir(parents=True, exist_ok=True)
    meta = metadata()
    rows = compare(records)
    results = {
        "meta": meta,
        "records": records,
        "max_batch": batches,
        "sharded": list(sharded),
    }
    (out_dir / "compiled_results.json").write_text(json.dumps(results, indent=1) + "\n")
    text = markdown(rows, batches, meta) + sharded_markdown(sharded)
    (out_dir / "compiled_results.md").write_text(text)
    plot(rows, out_dir / "compiled_results.png")


def sharded_markdown(records) -> str:
    """Collectives on the path that runs, 8 chips, per mesh."""
    if not records:
        return ""
    lines = [
        "",
        f"Auto-sharded `cross_entropy` value_and_grad, {SHARDED_SHAPE[0]}×"
        f"{SHARDED_SHAPE[1]} float32 logits sharded over (rows, classes) of an "
        "8-chip mesh: collectives on the path that runs and the largest one's "
        f"size (the logits are {SHARDED_SHAPE[0] * SHARDED_SHAPE[1] * 4 // 2**20} "
        "MiB). `jxent_weighted`: class weights and "
        "`label_smoothing=0.1`.",
        "",
        "| target | mesh | program | collectives | kinds | largest (KiB) |",
        "|---|---|---|---|---|---|",
    ]
    for r in records:
        kinds = ", ".join(f"{k} {v}" for k, v in r["collectives"].items()) or "–"
        largest = r["max_collective_bytes"] / 1024
        lines.append(
            f"| {r['target']} | {r['mesh'][0]}×{r['mesh'][1]} | {r['program']} "
            f"| {r['collective_count']} | {kinds} | {largest:g} |"
        )
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    sys.exit(main())
