"""jxent under users' global dtype settings: strict promotion and x64.

Strict promotion refuses implicit promotions between arrays of different
dtypes (bfloat16 and float32 included). A user who sets it must still get
every loss, its gradients and its forward-mode derivatives with bfloat16 and
float16 inputs, which jxent accumulates in float32 internally, with the same
numbers as under standard promotion. Only where the user's own arrays of
different dtypes would be combined (``x`` with ``w``, ``teacher_x`` with
``teacher_w``, ``kl_div``'s ``input`` with its ``target``) does strict mode
refuse, with a ``TypeError`` naming both arguments, as ``jnp`` would refuse
``x @ w``.

Under ``jax_enable_x64`` a float32 or bfloat16 loss must stay a float32
program: no float64 or int64 array of the logits' size (a select between
Python floats, or ``jnp.sum`` of booleans, would make one).
"""

from __future__ import annotations

import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only

import jxent

N, C, D, D_TEACHER = 6, 5, 4, 3
TARGET = np.array([0, 1, 2, 3, 4, -100], np.int32)
ARTICLE_LOGITS = [
    [2.8883, 0.1760, 1.0774],
    [1.1216, -0.0562, 0.0660],
    [-1.3939, -0.0967, 0.5853],
]


def _floats(dtype):
    """The floating inputs: 16-bit data, float32 class weights and options."""
    keys = jax.random.split(jax.random.PRNGKey(0), 6)
    logits = (2 * jax.random.normal(keys[0], (N, C))).astype(dtype)
    probs = jax.nn.softmax(jax.random.normal(keys[1], (N, C))).astype(dtype)
    x = jax.random.normal(keys[2], (N, D)).astype(dtype)
    w = jax.random.normal(keys[3], (D, C)).astype(dtype)
    teacher_x = jax.random.normal(keys[4], (N, D_TEACHER)).astype(dtype)
    teacher_w = jax.random.normal(keys[5], (D_TEACHER, C)).astype(dtype)
    return {
        "logits": logits, "probs": probs, "x": x, "w": w,
        "bias": jnp.linspace(-0.5, 0.5, C).astype(dtype),
        "teacher_x": teacher_x, "teacher_w": teacher_w,
        # Buffers and options kept in float32 whatever the data's dtype, as
        # training code keeps them.
        "weight": jnp.linspace(0.5, 2.0, C, dtype=jnp.float32),
        "teacher_logits": (logits.astype(jnp.float32) * 0.5),
        "temperature": jnp.float32(0.7),
        "label_smoothing": jnp.float32(0.1),
    }  # fmt: skip


def _losses(f, target):
    """Every public loss, each a float32 scalar."""
    logits, probs, weight = f["logits"], f["probs"], f["weight"]
    x, w, bias = f["x"], f["w"], f["bias"]
    log_q = jxent.log_softmax(logits)
    lp, ent = jxent.log_probs(
        logits, target, temperature=f["temperature"], return_entropy=True
    )
    llp, lent = jxent.linear_log_probs(
        x, w, target, bias=bias, temperature=f["temperature"], soft_cap=20.0,
        return_entropy=True,
    )  # fmt: skip
    out = {
        "cross_entropy": jxent.cross_entropy(
            logits,
            target,
            weight,
            label_smoothing=f["label_smoothing"],
            z_loss=1e-3,
            soft_cap=30.0,
        ),
        "cross_entropy_probs": jxent.cross_entropy(logits, probs),
        "nll_loss": jxent.nll_loss(log_q, target, weight),
        "softmax_entropy": jxent.entropy(jxent.softmax(logits)).sum(),
        "kl_div": jxent.kl_div(log_q, probs, reduction="batchmean"),
        "bce_with_logits": jxent.binary_cross_entropy_with_logits(
            logits, probs, pos_weight=weight
        ),
        "bce": jxent.binary_cross_entropy(jax.nn.sigmoid(logits), probs, weight),
        "focal": jxent.sigmoid_focal_loss(logits, probs, reduction="mean"),
        "log_probs": lp.sum() + ent.sum(),
        "distillation": jxent.distillation_loss(
            logits,
            f["teacher_logits"],
            target,
            beta=0.5,
            temperature=f["temperature"],
        ),
        "forward_kl": jxent.distillation_loss(logits, f["teacher_logits"], target),
        "linear_cross_entropy": jxent.linear_cross_entropy(
            x,
            w,
            target,
            weight,
            bias=bias,
            label_smoothing=f["label_smoothing"],
            z_loss=1e-3,
            soft_cap=30.0,
        ),
        "linear_log_probs": llp.sum() + lent.sum(),
        "linear_distillation": jxent.linear_distillation_loss(
            x,
            w,
            f["teacher_x"],
            f["teacher_w"],
            target,
            bias=bias,
            beta=0.5,
            temperature=f["temperature"],
        ),
        "linear_argmax": jnp.sum(jxent.linear_argmax(x, w, bias=bias), dtype=jnp.int32),
        "CrossEntropyLoss": jxent.CrossEntropyLoss(
            weight=np.linspace(0.5, 2.0, C, dtype=np.float32), label_smoothing=0.1
        )(logits, target),
        "NLLLoss": jxent.NLLLoss(reduction="sum")(log_q, target),
        "KLDivLoss": jxent.KLDivLoss(reduction="sum")(log_q, probs),
        "BCELoss": jxent.BCELoss()(jax.nn.sigmoid(logits), probs),
        "BCEWithLogitsLoss": jxent.BCEWithLogitsLoss(
            pos_weight=np.full(C, 2.0, np.float32)
        )(logits, probs),
    }
    return {k: v.astype(jnp.float32) for k, v in out.items()}


def _total(f, target):
    return sum(_losses(f, target).values())


def _values_and_derivatives(f, target):
    """Every loss, its gradients w.r.t. every floating input, and a
    forward-mode derivative of their sum."""
    tangents = jax.tree.map(jnp.ones_like, f)
    return (
        _losses(f, target),
        jax.grad(_total)(f, target),
        jax.jvp(lambda f: _total(f, target), (f,), (tangents,))[1],
    )


def _lowered(dtype, promotion):
    with jax.numpy_dtype_promotion(promotion):
        traced = jax.jit(_values_and_derivatives).trace(_floats(dtype), TARGET)
    return traced.lower()


# CI: bfloat16 (its programs trace as float16's do); both with pytest --full.
@pytest.mark.parametrize("dtype", ["bfloat16", full_only("float16")])
def test_every_loss_and_its_derivatives_run_under_strict_promotion(dtype):
    dtype = jnp.dtype(dtype)
    f = _floats(dtype)
    strict = _lowered(dtype, "strict")
    values, grads, tangent = strict.compile()(f, TARGET)
    assert set(values) == set(_losses(f, TARGET))
    for name, value in values.items():
        assert np.isfinite(value), name
    # Derivatives w.r.t. every floating input, in its own dtype, finite.
    for name, g in grads.items():
        assert g.dtype == f[name].dtype, name
        assert np.isfinite(np.asarray(g, np.float32)).all(), name
    assert np.isfinite(tangent)
    # The promotion mode changes nothing: the same program as under standard
    # promotion (whose numbers the other test modules check against oracles).
    assert strict.as_text() == _lowered(dtype, "standard").as_text()


@pytest.mark.parametrize("dtype", ["bfloat16", "float16"])
def test_the_article_vector_under_strict_promotion(dtype):
    """An independent anchor: the article's loss, 2.3185, from 16-bit logits."""
    logits = jnp.array(ARTICLE_LOGITS, dtype)
    target = jnp.array([1, 2, 0])
    with jax.numpy_dtype_promotion("strict"):
        loss = jxent.cross_entropy(logits, target)
        grad = jax.grad(lambda z: jxent.cross_entropy(z, target))(logits)
    assert loss.dtype == jnp.dtype(dtype)
    np.testing.assert_allclose(float(loss), 2.3185, atol=1e-2)
    # (softmax - onehot) / 3, from the float64 logits the 16-bit ones round to.
    z = np.asarray(logits, np.float64)
    p = np.exp(z - z.max(1, keepdims=True))
    p /= p.sum(1, keepdims=True)
    expected = (p - np.eye(3)[[1, 2, 0]]) / 3
    np.testing.assert_allclose(np.asarray(grad, np.float64), expected, atol=5e-3)


def test_class_shards_under_strict_promotion():
    """shard_map with ``class_axis_name`` on a one-device mesh: the combination
    across shards is traced under strict promotion with bfloat16 inputs."""
    f = _floats(jnp.bfloat16)
    mesh = jax.sharding.Mesh(jax.devices()[:1], ("model",))
    spec = jax.sharding.PartitionSpec

    def loss(x, w):
        return jxent.linear_cross_entropy(
            x, w, TARGET, label_smoothing=0.1, class_axis_name="model"
        ) + jxent.cross_entropy(x @ w, TARGET, class_axis_name="model")

    sharded = jax.shard_map(
        jax.value_and_grad(loss, argnums=(0, 1)), mesh=mesh,
        in_specs=(spec(), spec(None, "model")),
        out_specs=(spec(), (spec(), spec(None, "model"))),
    )  # fmt: skip
    with jax.numpy_dtype_promotion("strict"):
        value, (dx, dw) = jax.jit(sharded)(f["x"], f["w"])
    with jax.numpy_dtype_promotion("standard"):
        ref_value, (ref_dx, ref_dw) = jax.jit(sharded)(f["x"], f["w"])
    assert dx.dtype == dw.dtype == jnp.bfloat16
    np.testing.assert_array_equal(value, ref_value)
    np.testing.assert_array_equal(dx, ref_dx)
    np.testing.assert_array_equal(dw, ref_dw)


MIXED = {
    "x-w": (
        lambda a, b: jxent.linear_cross_entropy(a, b, TARGET), ("x", "w")
    ),
    "log_probs x-w": (
        lambda a, b: jxent.linear_log_probs(a, b, TARGET), ("x", "w")
    ),
    "teacher_x-teacher_w": (
        lambda a, b: jxent.linear_distillation_loss(
            a.astype(jnp.bfloat16), jnp.ones((D, C), jnp.bfloat16), a, b
        ),
        ("teacher_x", "teacher_w"),
    ),
    "kl_div": (
        lambda a, b: jxent.kl_div(a[:D], b[:, :D]), ("input", "target")
    ),
}  # fmt: skip


@pytest.mark.parametrize("case", list(MIXED))
def test_mixed_dtypes_that_would_be_combined_name_both_arguments(case):
    loss, (first, second) = MIXED[case]
    a = jnp.linspace(-1.0, 1.0, N * D, dtype=jnp.float32).reshape(N, D)
    b = jnp.linspace(0.1, 0.2, D * C, dtype=jnp.float32).reshape(D, C)
    b = b.astype(jnp.bfloat16)
    with jax.numpy_dtype_promotion("strict"):
        with pytest.raises(TypeError) as info:
            loss(a, b)
    message = str(info.value)
    for expected in (f"`{first}` (float32)", f"`{second}` (bfloat16)", "strict"):
        assert expected in message, message
    # Standard promotion computes them as jnp would (in float32).
    with jax.numpy_dtype_promotion("standard"):
        mixed = loss(a, b)
        same = loss(a, b.astype(jnp.float32))
    jax.tree.map(np.testing.assert_array_equal, mixed, same)


def test_student_and_teacher_in_different_dtypes_need_no_promotion():
    """The student's and the teacher's logits are never combined in one
    dtype (each accumulates in float32), so strict mode takes them."""
    f = _floats(jnp.bfloat16)
    teacher_x, teacher_w = f["teacher_x"], f["teacher_w"]
    args = (f["x"], f["w"], teacher_x.astype(jnp.float32),
            teacher_w.astype(jnp.float32))  # fmt: skip
    with jax.numpy_dtype_promotion("strict"):
        linear = jxent.linear_distillation_loss(*args, TARGET, beta=0.3)
        plain = jxent.distillation_loss(
            f["logits"], f["teacher_logits"], TARGET, beta=0.3
        )
    with jax.numpy_dtype_promotion("standard"):
        np.testing.assert_array_equal(
            linear, jxent.linear_distillation_loss(*args, TARGET, beta=0.3)
        )
        np.testing.assert_array_equal(
            plain,
            jxent.distillation_loss(f["logits"], f["teacher_logits"], TARGET, beta=0.3),
        )


@pytest.mark.parametrize("dtype", ["bfloat16", "float32"])
def test_x64_keeps_16_and_32_bit_programs_free_of_64_bit_arrays(dtype):
    """Every loss, its gradients and a jvp, compiled under x64 (int32
    targets): no float64 or int64 array with more than one element."""
    f = _floats(jnp.dtype(dtype))
    with jax.enable_x64(True):
        compiled = jax.jit(_values_and_derivatives).lower(f, TARGET).compile()
        values = compiled(f, TARGET)[0]
    wide = sorted(
        set(re.findall(r"[fsu]64\[[0-9,]*[0-9][0-9,]*\]", compiled.as_text()))
    )
    wide = [a for a in wide if a.split("[")[1] not in ("1]",)]
    assert not wide, wide
    for name, value in values.items():
        assert np.isfinite(value), name
