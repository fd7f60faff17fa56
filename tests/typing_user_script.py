"""A user's training script: CI checks it with ``mypy --strict`` (0 errors).

It is written the way the README and the guides use jxent (``jax.jit``,
``jax.grad``, ``return_lse``, the loss modules, ``linear_cross_entropy``, a
configuration typed with ``jxent.Reduction``), with
the annotations a strictly typed project would write and no casts or
``type: ignore``. tests/test_typing.py also runs it, so it stays a working script.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp

import jxent

Params = dict[str, jax.Array]


def init(key: jax.Array, features: int, classes: int) -> Params:
    """A linear classifier's parameters."""
    return {
        "w": 0.1 * jax.random.normal(key, (features, classes)),
        "b": jnp.zeros(classes),
    }


def loss_fn(params: Params, x: jax.Array, y: jax.Array) -> jax.Array:
    """Mean smoothed cross-entropy of the classifier."""
    logits = x @ params["w"] + params["b"][None, :]
    return jxent.cross_entropy(logits, y, label_smoothing=0.1, reduction="mean")


@jax.jit
def train_step(params: Params, x: jax.Array, y: jax.Array) -> tuple[Params, jax.Array]:
    """One step of gradient descent; returns the new parameters and the loss."""
    loss, grads = jax.value_and_grad(loss_fn)(params, x, y)
    new_params = jax.tree.map(lambda p, g: p - 0.1 * g, params, grads)
    return new_params, loss


def logit_gradient(logits: jax.Array, y: jax.Array) -> jax.Array:
    """The gradient of the summed loss with respect to the logits."""
    grad: jax.Array = jax.grad(lambda z: jxent.cross_entropy(z, y, reduction="sum"))(
        logits
    )
    return grad


def loss_and_z_loss(logits: jax.Array, y: jax.Array) -> tuple[float, float]:
    """The loss and the PaLM z-loss term, from one call with ``return_lse``."""
    loss, lse = jxent.cross_entropy(logits, y, return_lse=True)
    return float(loss), float(jnp.mean(lse**2))


def per_example(logits: jax.Array, y: jax.Array) -> jax.Array:
    """Per-example losses, averaged by the caller."""
    losses = jxent.cross_entropy(logits, y, reduction="none")
    return losses.mean()


@dataclasses.dataclass(frozen=True)
class LossConfig:
    """A typed training configuration: its reductions are the public aliases."""

    reduction: jxent.Reduction = "sum"
    kl_reduction: jxent.KLReduction = "batchmean"
    label_smoothing: float = 0.1


def configured_losses(
    config: LossConfig, logits: jax.Array, y: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """Losses whose ``reduction`` comes from a typed configuration object."""
    ce = jxent.cross_entropy(
        logits,
        y,
        reduction=config.reduction,
        label_smoothing=config.label_smoothing,
    )
    module = jxent.CrossEntropyLoss(reduction=config.reduction)
    log_q = jax.nn.log_softmax(logits)
    kl = jxent.kl_div(log_q, jax.nn.softmax(logits), reduction=config.kl_reduction)
    return ce, module(logits, y), kl


def module_losses(logits: jax.Array, y: jax.Array) -> tuple[jax.Array, jax.Array]:
    """The torch-style modules: a weighted cross-entropy and an NLL."""
    weight = jnp.linspace(0.5, 1.5, logits.shape[-1])
    ce = jxent.CrossEntropyLoss(weight, ignore_index=-1, label_smoothing=0.05)
    nll = jxent.NLLLoss(reduction="sum")
    return ce(logits, y), nll(jax.nn.log_softmax(logits), y)


def lm_head_loss(
    hidden: jax.Array, embedding: jax.Array, tokens: jax.Array
) -> tuple[float, jax.Array]:
    """A language model's loss on a tied embedding, with z-loss and a soft cap."""
    loss = jxent.linear_cross_entropy(
        hidden, embedding.T, tokens, z_loss=1e-4, soft_cap=30.0
    )
    per_token, lse = jxent.linear_cross_entropy(
        hidden, embedding.T, tokens, reduction="none", return_lse=True
    )
    grad_hidden = jax.grad(
        lambda h: jxent.linear_cross_entropy(h, embedding.T, tokens)
    )(hidden)
    return float(loss), per_token.mean() + lse.mean() + grad_hidden.sum()


def main() -> None:
    """Trains for a few steps on random data and calls every helper once."""
    kx, ky, kp = jax.random.split(jax.random.key(0), 3)
    x = jax.random.normal(kx, (16, 8))
    y = jax.random.randint(ky, (16,), 0, 5)
    params = init(kp, 8, 5)
    losses = []
    for _ in range(5):
        params, loss = train_step(params, x, y)
        losses.append(float(loss))
    assert losses[-1] < losses[0], losses
    logits = x @ params["w"]
    assert logit_gradient(logits, y).shape == logits.shape
    loss, z = loss_and_z_loss(logits, y)
    ce, nll = module_losses(logits, y)
    first, rest = lm_head_loss(x, params["w"].T, y)
    configured = configured_losses(LossConfig(), logits, y)
    values = [loss, z, float(per_example(logits, y)), float(ce), float(nll)]
    values += [first, float(rest), *(float(v) for v in configured)]
    assert all(jnp.isfinite(jnp.asarray(values))), values
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")


if __name__ == "__main__":
    main()
