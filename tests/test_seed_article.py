"""The article that started jxent: softmax -> log -> NLLLoss on a 3x3 example.

Its printed numbers (4 decimals) are a fixed test vector. The printed logits are
themselves rounded to 4 decimals, so outputs can differ from the print by the
input rounding (5e-5, amplified at most 2x by log-softmax) plus the output
rounding (5e-5): hence ATOL.
"""

import jax.numpy as jnp
import numpy as np

import jxent

ATOL = 1.6e-4

LOGITS = jnp.array(
    [[2.8883, 0.1760, 1.0774], [1.1216, -0.0562, 0.0660], [-1.3939, -0.0967, 0.5853]]
)
TARGET = jnp.array([1, 2, 0])
SOFTMAX = [[0.8131, 0.0540, 0.1329], [0.6039, 0.1860, 0.2102], [0.0841, 0.3076, 0.6083]]
LOG = [
    [-0.2069, -2.9192, -2.0178],
    [-0.5044, -1.6822, -1.5599],
    [-2.4762, -1.1790, -0.4970],
]


def test_softmax_matches_article():
    np.testing.assert_allclose(jxent.softmax(LOGITS, axis=1), SOFTMAX, atol=ATOL)


def test_log_of_softmax_matches_article():
    np.testing.assert_allclose(jnp.log(jxent.softmax(LOGITS, axis=1)), LOG, atol=ATOL)


def test_log_softmax_matches_article():
    np.testing.assert_allclose(jxent.log_softmax(LOGITS, axis=1), LOG, atol=ATOL)


def test_nll_loss_of_log_softmax_is_2_3185():
    loss = jxent.nll_loss(jxent.log_softmax(LOGITS, axis=1), TARGET, axis=1)
    assert round(float(loss), 4) == 2.3185


def test_cross_entropy_is_2_3185():
    assert round(float(jxent.cross_entropy(LOGITS, TARGET, axis=1)), 4) == 2.3185
    assert round(float(jxent.CrossEntropyLoss(axis=1)(LOGITS, TARGET)), 4) == 2.3185
    assert round(float(jxent.NLLLoss()(jxent.log_softmax(LOGITS), TARGET)), 4) == 2.3185


def test_cross_entropy_equals_log_softmax_then_nll():
    direct = jxent.cross_entropy(LOGITS, TARGET, reduction="none")
    composed = jxent.nll_loss(jxent.log_softmax(LOGITS), TARGET, reduction="none")
    np.testing.assert_allclose(direct, composed, rtol=1e-6)
    np.testing.assert_allclose(direct, [2.9192, 1.5599, 2.4762], atol=ATOL)
