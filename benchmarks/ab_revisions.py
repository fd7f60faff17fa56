"""A/B: ``jxent.cross_entropy`` of this tree against another git revision.

Both versions run in one process, interleaved in a random order per round, so
that load on the machine falls on both alike; prints the median time of each
and their ratio for ``value_and_grad`` (or the forward with ``--forward``).

    python benchmarks/ab_revisions.py --base ac2f279 --shape 512,131072
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base", required=True, help="git revision to compare")
    parser.add_argument("--shape", default="2048,32768", help="N,C")
    parser.add_argument("--repeats", type=int, default=15)
    parser.add_argument("--forward", action="store_true", help="loss only")
    args = parser.parse_args()
    sys.path.insert(0, str(ROOT))
    import jxent

    n, c = map(int, args.shape.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        base = import_revision(args.base, Path(tmp))
        print(f"this tree vs {args.base}, ({n}, {c}), median of {args.repeats}")
        for dtype in (jnp.float32, jnp.bfloat16):
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
                    return jax.jit(loss if args.forward else jax.value_and_grad(loss))

                fns = {"new": program(jxent), "base": program(base)}
                times = {k: [] for k in fns}
                for fn in fns.values():
                    jax.block_until_ready(fn(x))
                for _ in range(args.repeats):
                    for k in random.sample(list(fns), len(fns)):
                        start = time.perf_counter()
                        jax.block_until_ready(fns[k](x))
                        times[k].append(time.perf_counter() - start)
                med = {k: float(np.median(v)) * 1e3 for k, v in times.items()}
                print(
                    f"{jnp.dtype(dtype).name:9s} {name:25s} new/base "
                    f"{med['new'] / med['base']:.3f}  (new {med['new']:.1f} ms, "
                    f"base {med['base']:.1f} ms)"
                )


if __name__ == "__main__":
    main()
