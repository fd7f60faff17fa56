"""Times the three float32 matmuls of an LM head's value_and_grad, whole.

The logits ``x @ w``, ``dx = dz @ wᵀ`` and ``dw = xᵀ @ dz`` at (N, D, V),
each the median of 3 calls after a warm-up: the matmul floor of a program
that holds the logits (three) and of one that recomputes them in the
backward pass (four). See benchmarks/results/cpu/heads_no_amx/README.md.

    python benchmarks/matmul_floor.py 2048 512 65536
"""

from __future__ import annotations

import statistics
import sys
import time

import jax


def median_ms(f, *args, repeats: int = 3) -> float:
    jax.block_until_ready(f(*args))
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        jax.block_until_ready(f(*args))
        times.append(time.perf_counter() - start)
    return statistics.median(times) * 1e3


def main(argv: list[str]) -> str:
    n, d, v = map(int, argv)
    keys = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(keys[0], (n, d))
    w = jax.random.normal(keys[1], (d, v)) * 0.03
    dz = jax.random.normal(keys[2], (n, v))
    logits = median_ms(jax.jit(lambda x, w: x @ w), x, w)
    dx = median_ms(jax.jit(lambda dz, w: dz @ w.T), dz, w)
    dw = median_ms(jax.jit(lambda x, dz: x.T @ dz), x, dz)
    return (
        f"(N, D, V) = ({n}, {d}, {v}) float32 matmuls, ms: logits {logits:.0f}, "
        f"dx {dx:.0f}, dw {dw:.0f}; three {logits + dx + dw:.0f}, "
        f"four (the logits twice) {2 * logits + dx + dw:.0f}"
    )


if __name__ == "__main__":
    print(main(sys.argv[1:] or ["2048", "512", "65536"]))
