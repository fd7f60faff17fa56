"""Temporaries of the fused losses' value_and_grad along users' paths.

Compiles (nothing runs) ``value_and_grad`` w.r.t. ``x`` and ``w`` of
``linear_cross_entropy`` and ``linear_log_probs`` (with the entropy) on this
host's backend, and prints XLA's temporaries for each way a training loop
may call them, against one plain call on the whole batch:

* ``w.T``: ``w`` given as the transpose of a ``(V, D)`` matrix;
* ``vmap``: a loss per sequence, vmapped with ``w`` shared;
* ``scan``: microbatches summed by a ``lax.scan`` that is differentiated;
* ``checkpoint:<policy>``: inside ``jax.checkpoint`` with that policy.

The figures in docs/language_models.md and docs/rl_distillation.md:

    JAX_PLATFORMS=cpu python benchmarks/user_paths_memory.py
    JAX_PLATFORMS=cpu python benchmarks/user_paths_memory.py --shape 8 256 256 32768
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp

import jxent

MiB = 2**20
POLICIES = {
    "nothing_saveable": jax.checkpoint_policies.nothing_saveable,
    "dots_saveable": jax.checkpoint_policies.dots_saveable,
    "dots_with_no_batch_dims_saveable": (
        jax.checkpoint_policies.dots_with_no_batch_dims_saveable
    ),
}


def losses():
    """name -> loss(x, w, target) of one batch, a scalar."""

    def cross_entropy(x, w, t):
        return jxent.linear_cross_entropy(x, w, t)

    def log_probs(x, w, t):
        lp, ent = jxent.linear_log_probs(x, w, t, return_entropy=True)
        return jnp.mean(lp) + 0.01 * jnp.mean(ent)

    return {"linear_cross_entropy": cross_entropy, "linear_log_probs": log_probs}


def paths(loss, batches: int):
    """name -> (f(x, w, t), transposed w?) for each way of calling ``loss``."""

    def plain(x, w, t):
        return loss(x, w, t)

    def transposed(x, embedding, t):
        return loss(x, embedding.T, t)

    def vmapped(x, w, t):
        return jnp.mean(jax.vmap(lambda h, s: loss(h, w, s))(x, t))

    def scanned(x, w, t):
        total, _ = jax.lax.scan(
            lambda c, xs: (c + loss(xs[0], w, xs[1]), None), 0.0, (x, t)
        )
        return total / batches

    out = {"plain": (plain, False), "w.T": (transposed, True)}
    out.update({"vmap": (vmapped, False), "scan": (scanned, False)})
    for name, policy in POLICIES.items():
        out[f"checkpoint:{name}"] = (jax.checkpoint(plain, policy=policy), False)
    return out


def temporaries(f, b, s, d, v, dtype, transposed: bool) -> float:
    x = jax.ShapeDtypeStruct((b, s, d), dtype)
    w = jax.ShapeDtypeStruct((v, d) if transposed else (d, v), dtype)
    t = jax.ShapeDtypeStruct((b, s), jnp.int32)
    program = jax.jit(jax.value_and_grad(f, argnums=(0, 1)))
    return program.lower(x, w, t).compile().memory_analysis().temp_size_in_bytes / MiB


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument(
        "--shape", type=int, nargs=4, default=(8, 256, 1024, 131072),
        metavar=("B", "S", "D", "V"), help="sequences, tokens each, D, V",
    )  # fmt: skip
    parser.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"])
    args = parser.parse_args()
    b, s, d, v = args.shape
    dtype = jnp.dtype(args.dtype)
    logits = b * s * v * 4 / MiB
    print(f"(B, S, D, V) = {args.shape}, {dtype.name}, {jax.default_backend()}; "
          f"float32 logits {logits:.0f} MiB")  # fmt: skip
    print("| loss | path | temporaries MiB | / plain | / logits |")
    print("|---|---|---|---|---|")
    for loss_name, loss in losses().items():
        plain = None
        for path, (f, transposed) in paths(loss, b).items():
            mib = temporaries(f, b, s, d, v, dtype, transposed)
            plain = mib if plain is None else plain
            print(f"| {loss_name} | {path} | {mib:.0f} | {mib / plain:.2f} | "
                  f"{mib / logits:.2f} |", flush=True)  # fmt: skip


if __name__ == "__main__":
    main()
