"""A small (4, 3) batch shared by the API-level tests."""

import jax
import jax.numpy as jnp

LOGITS = jnp.array(
    [[2.0, -1.0, 0.5], [0.1, 0.2, 0.3], [-3.0, 1.5, 0.0], [1.0, 1.0, -2.0]],
    jnp.float32,
)
TARGET = jnp.array([0, 2, 1, 1], jnp.int32)
PROBS = jnp.array(
    [[0.7, 0.2, 0.1], [0.0, 1.0, 0.0], [0.25, 0.25, 0.5], [1 / 3, 1 / 3, 1 / 3]],
    jnp.float32,
)
LOG_PROBS = jax.nn.log_softmax(LOGITS, axis=-1)
WEIGHT = jnp.array([1.0, 2.0, 0.5], jnp.float32)
