"""GRPO on a tiny character-level policy with ``jxent.linear_log_probs``.

A small autoregressive character model (previous character and position ->
a hidden state -> an LM head over 27 characters) is trained with a few
GRPO-style steps to spell a target word: for each step a group of
completions is sampled at a temperature, each completion is rewarded with the
fraction of its characters that match the target, the rewards are normalised
within the group (the advantages), and the policy minimises the clipped-ratio
surrogate with an entropy bonus:

    ratio = exp(log p(token) - log p_old(token))
    loss  = -mean(min(ratio · A, clip(ratio, 1 - ε, 1 + ε) · A)) - c · entropy

Token log-probabilities and entropies come from the hidden states through
``jxent.linear_log_probs(h, w, tokens, temperature=T, return_entropy=True)``,
which never holds the (tokens, vocabulary) logits. The mean reward is printed
as it rises. Runs in well under a minute on a laptop CPU.

Run from the repository root::

    python examples/grpo_char_lm.py
    python examples/grpo_char_lm.py --steps 40
"""

from __future__ import annotations

import argparse

import jax
import jax.numpy as jnp
import optax

import jxent

ALPHABET = "abcdefghijklmnopqrstuvwxyz "
TARGET = "hello jax"
V, L, D = len(ALPHABET), len(TARGET), 32
BOS = V  # the start token has its own embedding row
TEMPERATURE = 1.0
CLIP, ENTROPY_COEF = 0.2, 0.01


def init(key):
    """The policy's parameters: token and position embeddings, the LM head."""
    k = jax.random.split(key, 3)
    return {
        "embed": 0.5 * jax.random.normal(k[0], (V + 1, D)),
        "pos": 0.5 * jax.random.normal(k[1], (L, D)),
        "w": 0.1 * jax.random.normal(k[2], (D, V)),
    }


def hidden_states(params, tokens):
    """(G, L) sampled tokens -> (G, L, D) states predicting each of them."""
    previous = jnp.concatenate(
        [jnp.full((tokens.shape[0], 1), BOS), tokens[:, :-1]], axis=1
    )
    return jnp.tanh(params["embed"][previous] + params["pos"][None])


def sample(params, key, group):
    """``group`` completions of length L at the sampling temperature."""

    def step(carry, position):
        previous, key = carry
        key, sub = jax.random.split(key)
        h = jnp.tanh(params["embed"][previous] + params["pos"][position])
        # Sampling needs the logits of the current position only: (G, V).
        token = jax.random.categorical(sub, (h @ params["w"]) / TEMPERATURE)
        return (token, key), token

    start = jnp.full((group,), BOS)
    _, tokens = jax.lax.scan(step, (start, key), jnp.arange(L))
    return tokens.T


def reward(tokens):
    """The fraction of each completion's characters that match the target."""
    target = jnp.array([ALPHABET.index(c) for c in TARGET])
    return jnp.mean(tokens == target[None], axis=1)


def grpo_loss(params, tokens, old_log_probs, advantages):
    """The clipped-ratio surrogate with an entropy bonus (to minimise)."""
    h = hidden_states(params, tokens)
    log_probs, entropy = jxent.linear_log_probs(
        h, params["w"], tokens, temperature=TEMPERATURE, return_entropy=True
    )
    ratio = jnp.exp(log_probs - old_log_probs)
    a = advantages[:, None]
    surrogate = jnp.minimum(ratio * a, jnp.clip(ratio, 1 - CLIP, 1 + CLIP) * a)
    return -jnp.mean(surrogate) - ENTROPY_COEF * jnp.mean(entropy)


def make_step(optimizer, group, inner):
    """One jitted GRPO step: sample a group, reward it, ``inner`` updates."""

    @jax.jit
    def step(params, opt_state, key):
        tokens = sample(params, key, group)
        r = reward(tokens)
        advantages = (r - r.mean()) / (r.std() + 1e-6)
        old = jxent.linear_log_probs(
            hidden_states(params, tokens), params["w"], tokens,
            temperature=TEMPERATURE,
        )  # fmt: skip
        for _ in range(inner):  # a few updates on the same samples
            grads = jax.grad(grpo_loss)(params, tokens, old, advantages)
            updates, opt_state = optimizer.update(grads, opt_state, params)
            params = optax.apply_updates(params, updates)
        return params, opt_state, r.mean()

    return step


def decode(tokens):
    """Characters of a token sequence."""
    return "".join(ALPHABET[int(t)] for t in tokens)


def main() -> None:
    """Trains the policy and prints the mean reward."""
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=40, help="GRPO steps")
    parser.add_argument("--group", type=int, default=64, help="samples per step")
    args = parser.parse_args()
    key = jax.random.key(0)
    params = init(key)
    optimizer = optax.adam(1e-2)
    opt_state = optimizer.init(params)
    step = make_step(optimizer, args.group, inner=2)
    first = None
    for i in range(args.steps):
        key, sub = jax.random.split(key)
        params, opt_state, mean_reward = step(params, opt_state, sub)
        first = float(mean_reward) if first is None else first
        if i % max(1, args.steps // 10) == 0 or i == args.steps - 1:
            print(f"step {i:4d}  mean reward {float(mean_reward):.3f}")
    greedy = jxent.linear_argmax(
        hidden_states(params, sample(params, key, 1)), params["w"]
    )
    print(f"mean reward: first step {first:.3f}, last step {float(mean_reward):.3f}")
    print(f"a sample: {decode(sample(params, key, 1)[0])!r} (target {TARGET!r})")
    print(f"greedy next characters: {decode(greedy[0])!r}")


if __name__ == "__main__":
    main()
