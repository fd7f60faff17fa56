"""JAX's debugging modes on valid data: jxent makes no NaN (nor a leak).

``jax_debug_nans`` reruns a jitted function whose output holds a NaN op by op
and reports the first operation that made one. A NaN that jxent makes on
valid data would take the blame for the user's: the constant it poisoned
bad data with (``where(bad, nan, 1)``, made whether or not any data was
bad), or a ``0 · inf`` masked afterwards. Here every public function, its
gradient and its ``jvp`` run op by op (``jax.disable_jit``) under
``jax_debug_nans`` on valid data with the options that take special paths:
ignored targets, zero probabilities, excluded classes, ragged LM-head chunks.
Then ``jax_debug_infs`` under ``jit`` for the per-token LM heads with ignored
positions (a row without classes had a maximum of -inf, and its ``jvp`` a
``0 · inf``), and ``jax.checking_leaks`` (the per-token heads' checkpointed
tile closed over traced inputs, which JAX's caches kept alive).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only

import jxent

RNG = np.random.default_rng(11)
N, D, V = 6, 4, 11
X = jnp.asarray(RNG.normal(size=(N, D)), jnp.float32)
W = jnp.asarray(RNG.normal(size=(D, V)), jnp.float32)
TX = jnp.asarray(RNG.normal(size=(N, 3)), jnp.float32)
TW = jnp.asarray(RNG.normal(size=(3, V)), jnp.float32)
LOGITS = X @ W
TARGET = jnp.asarray(RNG.integers(0, V, N)).at[1].set(-100).at[4].set(-100)
WEIGHT = jnp.asarray(RNG.uniform(0.5, 2.0, V), jnp.float32)
WHERE = jnp.ones(V, bool).at[3].set(False).at[7].set(False)
TARGET_KEPT = jnp.where((TARGET == 3) | (TARGET == 7), 0, TARGET)
PROBS = jax.nn.softmax(LOGITS, axis=-1).at[:, 5].set(0.0)
BINARY = jnp.asarray(RNG.uniform(size=(N, V)), jnp.float32).at[0].set(0.0).at[1].set(1)
TILES = {"chunk_size": 4, "vocab_chunk_size": 6}

# name -> (function of its floating inputs, those inputs)
CASES = {
    "cross_entropy": (
        lambda z, w: jxent.cross_entropy(z, TARGET, w, label_smoothing=0.1),
        (LOGITS, WEIGHT),
    ),
    "cross_entropy-probabilities": (
        lambda z, p: jxent.cross_entropy(z, p, label_smoothing=0.2),
        (LOGITS, PROBS),
    ),
    "cross_entropy-where-z-loss-cap": (
        lambda z: jxent.cross_entropy(
            z, TARGET_KEPT, where=WHERE, z_loss=1e-3, soft_cap=5.0
        ),
        (LOGITS,),
    ),
    "nll_loss": (
        lambda z, w: jxent.nll_loss(jax.nn.log_softmax(z), TARGET, w),
        (LOGITS, WEIGHT),
    ),
    "log_softmax-softmax-where": (
        lambda z: (
            jnp.sum(jnp.where(WHERE, jxent.log_softmax(z, where=WHERE), 0.0))
            + jnp.sum(jxent.softmax(z, where=WHERE))
        ),
        (LOGITS,),
    ),
    "entropy-kl_div": (  # (at p = 0 their derivatives are -inf: p > 0 here)
        lambda p, z: (
            jnp.sum(jxent.entropy(p))
            + jxent.kl_div(jax.nn.log_softmax(z), p, reduction="batchmean")
        ),
        (jax.nn.softmax(TX @ TW), LOGITS),
    ),
    "entropy-kl_div-of-zero-probabilities": (
        lambda z: (
            jnp.sum(jxent.entropy(PROBS))
            + jxent.kl_div(jax.nn.log_softmax(z), PROBS, reduction="batchmean")
        ),
        (LOGITS,),
    ),
    "binary_cross_entropy": (
        lambda p: jxent.binary_cross_entropy(jnp.clip(p, 0.01, 0.99), BINARY),
        (BINARY,),
    ),
    "binary_cross_entropy_with_logits": (
        lambda z, t, pw: jxent.binary_cross_entropy_with_logits(z, t, pos_weight=pw),
        (LOGITS, BINARY, WEIGHT),
    ),
    "sigmoid_focal_loss": (
        lambda z, t: jnp.sum(jxent.sigmoid_focal_loss(z, t)),
        (LOGITS, BINARY),
    ),
    "log_probs": (
        lambda z, t: sum(
            map(jnp.sum, jxent.log_probs(z, TARGET, temperature=t, return_entropy=True))
        ),
        (LOGITS, jnp.float32(0.7)),
    ),
    "distillation_loss": (
        lambda z, q: jxent.distillation_loss(z, q, TARGET, beta=0.4, temperature=2.0),
        (LOGITS, TX @ TW),
    ),
    "linear_cross_entropy": (
        lambda x, w: jxent.linear_cross_entropy(
            x, w, TARGET, label_smoothing=0.1, **TILES
        ),
        (X, W),
    ),
    "linear_cross_entropy-none-lse": (
        lambda x, w: sum(
            map(
                jnp.sum,
                jxent.linear_cross_entropy(
                    x, w, TARGET, reduction="none", return_lse=True, **TILES
                ),
            )
        ),
        (X, W),
    ),
    "linear_log_probs": (
        lambda x, w, t: sum(
            map(
                jnp.sum,
                jxent.linear_log_probs(
                    x, w, TARGET, temperature=t, return_entropy=True, **TILES
                ),
            )
        ),
        (X, W, jnp.float32(0.8)),
    ),
    "linear_log_probs-default-tiles": (
        lambda x, w: jnp.sum(jxent.linear_log_probs(x, w, TARGET)),
        (X, W),
    ),
    "linear_cross_entropy-none-default-tiles": (
        lambda x, w: jnp.sum(
            jxent.linear_cross_entropy(x, w, TARGET, reduction="none")
        ),
        (X, W),
    ),
    "linear_distillation_loss": (
        lambda x, w, tx, tw: jxent.linear_distillation_loss(
            x, w, tx, tw, TARGET, beta=0.5, **TILES
        ),
        (X, W, TX, TW),
    ),
    "CrossEntropyLoss": (
        lambda z: jxent.CrossEntropyLoss(np.asarray(WEIGHT), label_smoothing=0.1)(
            z, TARGET
        ),
        (LOGITS,),
    ),
}


# binary_cross_entropy (of probabilities) keeps its NaN constant for p
# outside [0, 1]: each NaN made of the data instead (0 / 0 where bad, or the
# logarithms' own NaN) cost XLA's CPU program of value_and_grad at (2048,
# 4096) 55% more bytes accessed (302 -> 470 MB) and 5% more time.
_KEEPS_A_NAN_CONSTANT = {"binary_cross_entropy"}


@pytest.mark.parametrize(
    "name",
    [
        pytest.param(
            name,
            marks=pytest.mark.xfail(
                strict=True, raises=FloatingPointError, reason="a NaN constant"
            ),
        )
        if name in _KEEPS_A_NAN_CONSTANT
        else name
        for name in CASES
    ],
)
def test_no_nan_made_op_by_op_on_valid_data(name):
    fn, args = CASES[name]
    argnums = tuple(range(len(args)))
    value, grads = jax.jit(jax.value_and_grad(fn, argnums))(*args)
    with jax.debug_nans(True), jax.disable_jit():
        eager_value, eager_grads = jax.value_and_grad(fn, argnums)(*args)
        tangents = tuple(jnp.ones_like(a) for a in args)
        _, eager_tangent = jax.jvp(fn, args, tangents)
    np.testing.assert_allclose(eager_value, value, rtol=1e-5)
    for eager, jitted in zip(eager_grads, grads, strict=True):
        np.testing.assert_allclose(eager, jitted, rtol=1e-4, atol=1e-6)
    expected = sum(jnp.sum(g * t) for g, t in zip(grads, tangents, strict=True))
    np.testing.assert_allclose(eager_tangent, expected, rtol=1e-4, atol=1e-5)


def test_linear_argmax_op_by_op():
    with jax.debug_nans(True), jax.disable_jit():
        got = jxent.linear_argmax(X, W, where=WHERE, **TILES)
    np.testing.assert_array_equal(
        got, jnp.argmax(jnp.where(WHERE, LOGITS, -jnp.inf), -1)
    )


PER_TOKEN_HEADS = [
    "linear_cross_entropy-none-lse",
    "linear_log_probs",
    "linear_log_probs-default-tiles",
    "linear_cross_entropy-none-default-tiles",
]


@pytest.mark.parametrize("name", PER_TOKEN_HEADS)
def test_per_token_heads_make_no_inf_with_ignored_positions(name):
    fn, args = CASES[name]
    # Not inside a jit of the user's: the checks then see the outputs of
    # jxent's own jitted functions, residuals included.
    with jax.debug_infs(True):
        for i in range(len(args)):  # each alone: the others' tangents are zeros
            jax.grad(fn, i)(*args)
        jax.jvp(fn, args, args)


# CI: the heads' two routes; pytest --full also return_lse (the cross-entropy's
# route with a second output: 37 s).
@pytest.mark.parametrize(
    "head", ["linear_log_probs", "linear_cross_entropy-none", full_only("return_lse")]
)
def test_per_token_heads_leak_no_tracer(head):
    # The user's function closes over its arrays, as a training step does
    # (a leak showed then: JAX's checkpoint cache kept the heads' tile, a
    # closure over the traced inputs). Default tiles: small ones leaked alike,
    # in four times the time.
    x, w, t = X, W, TARGET

    def loss(x, w):
        if head == "linear_log_probs":
            return jnp.sum(jxent.linear_log_probs(x, w, t))
        if head == "return_lse":
            out = jxent.linear_cross_entropy(x, w, t, return_lse=True)
            return jnp.sum(out[1])
        return jnp.sum(jxent.linear_cross_entropy(x, w, t, reduction="none"))

    with jax.checking_leaks():
        jax.grad(lambda w: loss(x, w))(w)
        jax.grad(lambda x: loss(x, w))(x)
        jax.jvp(lambda w: loss(x, w), (w,), (w,))
