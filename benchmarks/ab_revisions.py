"""A/B: ``jxent.cross_entropy`` of this tree against another git revision.

Both versions run in one process, interleaved in a random order per round, so
that load on the machine falls on both alike; prints the median time of each
and their ratio for ``value_and_grad`` (or the forward with ``--forward``).
``--heads`` compares ``linear_log_probs`` instead (alone and with the entropy,
temperature 0.9, ``value_and_grad`` w.r.t. ``x`` and ``w``) at ``N,D,V``;
``--linear`` ``linear_cross_entropy`` (``value_and_grad`` w.r.t. ``x`` and
``w``) at ``N,D,V``. ``--dtypes`` picks among float32 and bfloat16.

    python benchmarks/ab_revisions.py --base ac2f279 --shape 512,131072
    python benchmarks/ab_revisions.py --base b919a5e --heads --shape 2048,512,65536
    python benchmarks/ab_revisions.py --base 21f2ebb --linear --dtypes bfloat16 \
        --shape 2048,1024,131072 --repeats 5
"""

from __future__ import annotations

import argparse
import importlib
import random
import re
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

ROOT = Path(__file__).resolve().parents[1]


def import_revision(rev: str, where: Path):
    """``jxent`` as of ``rev``, importable as ``jxent_base``."""
    archive = subprocess.run(
        ["git", "-C", str(ROOT), "archive", rev, "jxent"],
        check=True,
        capture_output=True,
    ).stdout
    subprocess.run(["tar", "-x", "-C", str(where)], input=archive, check=True)
    package = where / "jxent_base"
    (where / "jxent").rename(package)
    for path in package.glob("*.py"):
        text = re.sub(r"\bjxent\.", "jxent_base.", path.read_text())
        path.write_text(text)
    sys.path.insert(0, str(where))
    return importlib.import_module("jxent_base")


def time_interleaved(fns: dict, args: tuple, repeats: int) -> dict:
    """Median ms of each function over ``repeats`` rounds in a random order."""
    times = {k: [] for k in fns}
    for fn in fns.values():
        jax.block_until_ready(fn(*args))
    for _ in range(repeats):
        for k in random.sample(list(fns), len(fns)):
            start = time.perf_counter()
            jax.block_until_ready(fns[k](*args))
            times[k].append(time.perf_counter() - start)
    return {k: float(np.median(v)) * 1e3 for k, v in times.items()}


def report(label: str, med: dict) -> None:
    print(
        f"{label:42s} new/base {med['new'] / med['base']:.3f}  "
        f"(new {med['new']:.1f} ms, base {med['base']:.1f} ms)"
    )


def cross_entropy_cases(jxent, base, shape, repeats, forward, dtypes):
    n, c = shape
    for dtype in dtypes:
        for name, kw in (
            ("plain", {}),
            (
                "weighted+smoothed+ignore",
                dict(
                    weight=jnp.linspace(0.5, 2.0, c),
                    label_smoothing=0.1,
                    ignore_index=3,
                ),
            ),
        ):
            x = jax.random.normal(jax.random.key(0), (n, c), dtype)
            t = jax.random.randint(jax.random.key(1), (n,), 0, c)

            def program(module, kw=kw, t=t):
                loss = lambda logits: module.cross_entropy(logits, t, **kw)
                return jax.jit(loss if forward else jax.value_and_grad(loss))

            fns = {"new": program(jxent), "base": program(base)}
            med = time_interleaved(fns, (x,), repeats)
            report(f"{jnp.dtype(dtype).name:9s} {name}", med)


def lm_head_inputs(shape, dtype):
    """``x`` (N, D), ``w`` (D, V) in ``dtype`` and int32 targets (N,)."""
    n, d, v = shape
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, d)).astype(dtype)
    w = (jax.random.normal(keys[1], (d, v)) * d**-0.5).astype(dtype)
    return x, w, jax.random.randint(keys[2], (n,), 0, v)


def linear_cases(jxent, base, shape, repeats, dtypes):
    for dtype in dtypes:
        x, w, t = lm_head_inputs(shape, dtype)

        def program(module, t=t):
            loss = lambda hidden, weight: module.linear_cross_entropy(hidden, weight, t)
            return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

        fns = {"new": program(jxent), "base": program(base)}
        med = time_interleaved(fns, (x, w), repeats)
        report(f"{jnp.dtype(dtype).name:9s} linear_cross_entropy", med)


def heads_cases(jxent, base, shape, repeats, dtypes):
    for dtype in dtypes:
        x, w, t = lm_head_inputs(shape, dtype)
        for entropy in (False, True):

            def program(module, entropy=entropy, t=t):
                def loss(hidden, weight):
                    out = module.linear_log_probs(
                        hidden, weight, t, temperature=0.9, return_entropy=entropy
                    )
                    return (out[0] + 0.01 * out[1]).sum() if entropy else out.sum()

                return jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))

            fns = {"new": program(jxent), "base": program(base)}
            med = time_interleaved(fns, (x, w), repeats)
            name = "with the entropy" if entropy else "alone"
            report(f"{jnp.dtype(dtype).name:9s} linear_log_probs {name}", med)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare")
    parser.add_argument("--shape", default=None, help="N,C (N,D,V with --heads)")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--forward", action="store_true", help="loss only")
    parser.add_argument("--heads", action="store_true", help="linear_log_probs")
    parser.add_argument("--linear", action="store_true", help="linear_cross_entropy")
    parser.add_argument("--dtypes", default="float32,bfloat16")
    args = parser.parse_args()
    dtypes = [jnp.dtype(name) for name in args.dtypes.split(",")]
    lm_head = args.heads or args.linear
    sys.path.insert(0, str(ROOT))
    import jxent

    default = "2048,512,65536" if lm_head else "2048,32768"
    shape = tuple(map(int, (args.shape or default).split(",")))
    if len(shape) != (3 if lm_head else 2):
        parser.error(f"--shape {args.shape!r}: N,D,V with --heads, else N,C")
    with tempfile.TemporaryDirectory() as tmp:
        base = import_revision(args.base, Path(tmp))
        print(f"this tree vs {args.base}, {shape}, median of {args.repeats}")
        if args.heads:
            heads_cases(jxent, base, shape, args.repeats, dtypes)
        elif args.linear:
            linear_cases(jxent, base, shape, args.repeats, dtypes)
        else:
            cross_entropy_cases(jxent, base, shape, args.repeats, args.forward, dtypes)


if __name__ == "__main__":
    main()
