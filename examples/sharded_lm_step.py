"""A small language-model training step on 8 simulated devices.

Data parallelism over the ``data`` mesh axis (tokens) and tensor parallelism
over the ``model`` axis (the vocabulary of the output projection), with the
loss computed by :func:`jxent.linear_cross_entropy` inside ``jax.shard_map``:
no device ever holds logits for the whole vocabulary, and only O(N) and
O(N·D) values cross devices. The same step runs unsharded for comparison.

Run: ``python examples/sharded_lm_step.py`` (sets up 8 CPU devices itself).
"""

from __future__ import annotations

import os

os.environ.setdefault("XLA_FLAGS", "--xla_force_host_platform_device_count=8")

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

VOCAB, DIM, HIDDEN, BATCH, SEQ = 4096, 128, 256, 16, 64


def init_params(key: jax.Array) -> dict[str, jax.Array]:
    """Embedding (D, V), a two-layer MLP, and an untied output bias.

    The embedding, tied to the output projection, is kept as ``(D, V)``, the
    layout ``linear_cross_entropy`` takes: passed as the transpose of a
    ``(V, D)`` array, ``w`` would be copied whole (docs/language_models.md,
    "Tied embeddings").
    """
    k1, k2, k3 = jax.random.split(key, 3)
    return {
        "embed": jax.random.normal(k1, (DIM, VOCAB)) * 0.02,
        "w1": jax.random.normal(k2, (DIM, HIDDEN)) / np.sqrt(DIM),
        "w2": jax.random.normal(k3, (HIDDEN, DIM)) / np.sqrt(HIDDEN),
        "bias": jnp.zeros((VOCAB,)),
    }


def hidden_states(params: dict[str, jax.Array], tokens: jax.Array) -> jax.Array:
    """A bag-of-previous-token model: embed, MLP, residual."""
    h = jnp.moveaxis(jnp.take(params["embed"], tokens, axis=1), 0, -1)
    return h + jax.nn.gelu(h @ params["w1"]) @ params["w2"]


def loss_unsharded(params, tokens, targets):
    """The reference: the same loss on one device (tied output embedding)."""
    return jxent.linear_cross_entropy(
        hidden_states(params, tokens), params["embed"], targets,
        bias=params["bias"], label_smoothing=0.1, z_loss=1e-4,
    )  # fmt: skip


def make_sharded_loss(mesh: jax.sharding.Mesh):
    """The loss under shard_map: tokens split on `data`, vocabulary on `model`."""

    def local(h, embed, bias, targets):
        return jxent.linear_cross_entropy(
            h, embed, targets, bias=bias, label_smoothing=0.1, z_loss=1e-4,
            class_axis_name="model", batch_axis_name="data",
        )  # fmt: skip

    head = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P("data"), P(None, "model"), P("model"), P("data")),
        out_specs=P(),
    )  # fmt: skip

    def loss(params, tokens, targets):
        return head(
            hidden_states(params, tokens), params["embed"], params["bias"], targets
        )

    return loss


def train_step(loss_fn, optimizer):
    """One jitted step: loss, gradients, optimizer update."""

    @jax.jit
    def step(params, opt_state, tokens, targets):
        loss, grads = jax.value_and_grad(loss_fn)(params, tokens, targets)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return step


def per_device_bytes(tree) -> int:
    """Bytes of the arrays in ``tree`` that live on the first device."""
    device = jax.devices()[0]
    return sum(
        shard.data.nbytes
        for leaf in jax.tree.leaves(tree)
        for shard in leaf.addressable_shards
        if shard.device == device
    )


def main() -> None:
    """Runs the sharded and the unsharded step and compares them."""
    print(f"devices: {jax.device_count()} x {jax.devices()[0].platform}")
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    key = jax.random.key(0)
    params = init_params(key)
    tokens = jax.random.randint(jax.random.key(1), (BATCH, SEQ), 0, VOCAB)
    targets = jnp.roll(tokens, -1, axis=1).at[:, -1].set(-100)  # next token
    optimizer = optax.adam(1e-3)

    specs = {"embed": P(None, "model"), "w1": P(), "w2": P(), "bias": P("model")}
    sharded_params = {
        k: jax.device_put(v, NamedSharding(mesh, specs[k])) for k, v in params.items()
    }
    data = NamedSharding(mesh, P("data"))
    sharded_tokens = jax.device_put(tokens, data)
    sharded_targets = jax.device_put(targets, data)

    step = train_step(make_sharded_loss(mesh), optimizer)
    reference = train_step(loss_unsharded, optimizer)
    state, ref_state = optimizer.init(sharded_params), optimizer.init(params)
    for i in range(3):
        sharded_params, state, loss = step(
            sharded_params, state, sharded_tokens, sharded_targets
        )
        params, ref_state, ref_loss = reference(params, ref_state, tokens, targets)
        print(
            f"step {i}: sharded loss {float(loss):.6f}  unsharded {float(ref_loss):.6f}"
            f"  |diff| {abs(float(loss) - float(ref_loss)):.2e}"
        )
    drift = max(float(jnp.max(jnp.abs(sharded_params[k] - params[k]))) for k in params)
    print(f"max parameter difference after 3 steps: {drift:.2e}")

    compiled = step.lower(
        sharded_params, state, sharded_tokens, sharded_targets
    ).compile()
    ref_compiled = reference.lower(params, ref_state, tokens, targets).compile()
    mib = 2**20
    stats, ref_stats = compiled.memory_analysis(), ref_compiled.memory_analysis()
    logits = BATCH * SEQ * VOCAB * 4
    print(f"full logits would be {logits / mib:.1f} MiB")
    print(
        f"per device: parameters {per_device_bytes(sharded_params) / mib:.2f} MiB, "
        f"step temporaries {stats.temp_size_in_bytes / mib:.2f} MiB"
    )
    print(
        f"unsharded: parameters {per_device_bytes(params) / mib:.2f} MiB, "
        f"step temporaries {ref_stats.temp_size_in_bytes / mib:.2f} MiB"
    )


if __name__ == "__main__":
    main()
