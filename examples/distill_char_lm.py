"""Distil a small character model from a larger one with ``linear_distillation_loss``.

The teacher is a fixed character-level model (previous character -> a
128-wide hidden state -> an LM head); the student is smaller (32 wide). The
student is trained to match the teacher's next-character distributions at a
temperature with ``jxent.linear_distillation_loss`` (the forward KL by
default, ``--beta`` for the reverse KL or the generalised JSD), computed from
both models' hidden states without either's (tokens, vocabulary) logits. The
loss falls as the student learns. Then both the fused loss and the naive one
(the same formulas on materialised logits) are compiled at an LM-sized shape
and XLA's temporary memory of their ``value_and_grad`` is printed.

Run from the repository root::

    python examples/distill_char_lm.py
    python examples/distill_char_lm.py --steps 100 --beta 0.5
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jxent

V = 27  # characters
TEACHER_D, STUDENT_D = 128, 32
TEMPERATURE = 2.0


def model(key, width, scale):
    """A character model's parameters: embeddings of width ``width``, a head."""
    k = jax.random.split(key, 2)
    return {
        "embed": jax.random.normal(k[0], (V, width)),
        "w": scale * jax.random.normal(k[1], (width, V)),
    }


def hidden(params, tokens):
    """The hidden states that predict the character after each token."""
    return jnp.tanh(params["embed"][tokens])


def make_step(optimizer, teacher, beta):
    """One jitted distillation step on a fresh batch of 256 characters."""

    def loss_fn(student, tokens):
        return jxent.linear_distillation_loss(
            hidden(student, tokens), student["w"],
            hidden(teacher, tokens), teacher["w"],
            beta=beta, temperature=TEMPERATURE,
        )  # fmt: skip

    @jax.jit
    def step(student, opt_state, key):
        tokens = jax.random.randint(key, (256,), 0, V)
        loss, grads = jax.value_and_grad(loss_fn)(student, tokens)
        updates, opt_state = optimizer.update(grads, opt_state, student)
        return optax.apply_updates(student, updates), opt_state, loss

    return step


def temp_bytes(fn, *shapes):
    """XLA's temporary bytes of ``value_and_grad(fn)`` (w.r.t. the first two)."""
    args = [jax.ShapeDtypeStruct(s, jnp.float32) for s in shapes]
    compiled = jax.jit(jax.value_and_grad(fn, argnums=(0, 1))).lower(*args).compile()
    return compiled.memory_analysis().temp_size_in_bytes


def memory_comparison(n, d, v):
    """XLA's temporaries of value_and_grad, fused vs. naive, at (n, d, v)."""

    def fused(x, w, tx, tw):
        return jxent.linear_distillation_loss(x, w, tx, tw, temperature=TEMPERATURE)

    def naive(x, w, tx, tw):
        p = jax.nn.log_softmax((x @ w) / TEMPERATURE)
        q = jax.nn.log_softmax((tx @ tw) / TEMPERATURE)
        return jnp.mean(jnp.sum(jnp.exp(q) * (q - p), axis=-1))

    shapes = ((n, d), (d, v), (n, d), (d, v))
    return temp_bytes(fused, *shapes), temp_bytes(naive, *shapes)


def main() -> None:
    """Distils the student, then compares the memory of fused and naive."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--beta", type=float, default=0.0)
    parser.add_argument(
        "--memory-shape", type=int, nargs=3, default=(2048, 256, 32768),
        metavar=("N", "D", "V"), help="tokens, hidden size, vocabulary",
    )  # fmt: skip
    args = parser.parse_args()
    key_t, key_s, key = jax.random.split(jax.random.key(0), 3)
    teacher = model(key_t, TEACHER_D, 0.5)
    student = model(key_s, STUDENT_D, 0.1)
    optimizer = optax.adam(3e-2)
    opt_state = optimizer.init(student)
    step = make_step(optimizer, teacher, args.beta)
    first = None
    for i in range(args.steps):
        key, sub = jax.random.split(key)
        student, opt_state, loss = step(student, opt_state, sub)
        first = float(loss) if first is None else first
        if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  distillation loss {float(loss):.4f}")
    print(f"distillation loss: first step {first:.4f}, last step {float(loss):.4f}")
    n, d, v = args.memory_shape
    fused, naive = memory_comparison(n, d, v)
    print(
        f"value_and_grad temporaries at (N, D, V) = ({n}, {d}, {v}): "
        f"fused {fused / 2**20:.0f} MiB, naive {naive / 2**20:.0f} MiB "
        f"({fused / naive:.2f}x)"
    )


if __name__ == "__main__":
    main()
