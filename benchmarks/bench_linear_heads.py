"""Times the LM-head heads' value_and_grad against the naive formulas.

For ``linear_log_probs`` (without and with the entropy) and
``linear_distillation_loss`` (forward KL), the fused function's
``value_and_grad`` w.r.t. the hidden states and the weight(s) is timed
against the same formulas on materialised logits (``x @ w`` then
``jxent.log_probs`` / ``jxent.distillation_loss``), and XLA's temporary
memory of both programs is printed. Median of ``--repeats`` calls after one
warm-up call.

    python benchmarks/bench_linear_heads.py --shape 2048 512 65536
    python benchmarks/bench_linear_heads.py --shape 2048 1024 131072 --dtype bfloat16
"""

from __future__ import annotations

import argparse
import os
import statistics
import time

import jax
import jax.numpy as jnp

import jxent


def _case(name, fused, naive, args, repeats):
    row = [name]
    for fn in (fused, naive):
        compiled = jax.jit(fn).lower(*args).compile()
        temp = compiled.memory_analysis().temp_size_in_bytes / 2**20
        jax.block_until_ready(compiled(*args))
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            jax.block_until_ready(compiled(*args))
            times.append(time.perf_counter() - start)
        row += [statistics.median(times), temp]
    fused_t, fused_m, naive_t, naive_m = row[1:]
    print(
        f"{name:34s} fused {fused_t * 1e3:8.1f} ms {fused_m:7.0f} MiB | naive "
        f"{naive_t * 1e3:8.1f} ms {naive_m:7.0f} MiB | time {fused_t / naive_t:.2f}x"
        f" memory {fused_m / naive_m:.2f}x"
    )
    return fused_t


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shape", type=int, nargs=3, default=(2048, 512, 65536))
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--repeats", type=int, default=5)
    args = parser.parse_args()
    n, d, v = args.shape
    dtype = jnp.dtype(args.dtype)
    keys = jax.random.split(jax.random.key(0), 5)
    x = jax.random.normal(keys[0], (n, d), dtype)
    w = (jax.random.normal(keys[1], (d, v)) / d**0.5).astype(dtype)
    tx = jax.random.normal(keys[2], (n, d), dtype)
    tw = (jax.random.normal(keys[3], (d, v)) / d**0.5).astype(dtype)
    t = jax.random.randint(keys[4], (n,), 0, v)
    print(
        f"(N, D, V) = ({n}, {d}, {v}) {dtype.name}, {jax.default_backend()}, "
        f"load average {os.getloadavg()[0]:.1f}"
    )

    def grads(loss):
        return jax.value_and_grad(loss, argnums=(0, 1))

    def logits(x, w):
        return jnp.dot(x, w, preferred_element_type=jnp.float32)

    alone = _case(
        "linear_log_probs",
        grads(lambda x, w: jnp.sum(jxent.linear_log_probs(x, w, t, temperature=0.9))),
        grads(lambda x, w: jnp.sum(jxent.log_probs(logits(x, w), t, temperature=0.9))),
        (x, w),
        args.repeats,
    )

    def with_entropy(fn):
        def loss(x, w):
            lp, ent = fn(x, w)
            return jnp.sum(lp) + 0.01 * jnp.sum(ent)

        return grads(loss)

    both = _case(
        "linear_log_probs + entropy",
        with_entropy(lambda x, w: jxent.linear_log_probs(
            x, w, t, temperature=0.9, return_entropy=True)),
        with_entropy(lambda x, w: jxent.log_probs(
            logits(x, w), t, temperature=0.9, return_entropy=True)),
        (x, w),
        args.repeats,
    )  # fmt: skip
    print(f"entropy costs {both / alone:.2f}x linear_log_probs alone")
    _case(
        "linear_distillation_loss (KL)",
        grads(lambda x, w, tx, tw: jxent.linear_distillation_loss(x, w, tx, tw, t)),
        grads(
            lambda x, w, tx, tw: jxent.distillation_loss(
                logits(x, w), logits(tx, tw), t
            )
        ),
        (x, w, tx, tw),
        args.repeats,
    )


if __name__ == "__main__":
    main()
