"""Loss objects inside equinox and flax nnx models, trained with optax.

A model that holds a ``jxent.CrossEntropyLoss`` (with array class weights)
must survive what the frameworks do to it: ``jax.tree.map`` with arbitrary
leaves, ``equinox.partition``/``combine``/``filter``, ``filter_grad`` and
``filter_value_and_grad``, optax states initialised from the filtered model,
and nnx's graph/state split. Each test trains a tiny classifier a few steps
and checks that the loss goes down and that the loss object came through
unchanged.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import jxent

RNG = np.random.default_rng(5)
X = jnp.asarray(RNG.normal(size=(32, 6)), jnp.float32)
Y = jnp.asarray(RNG.integers(0, 3, size=32))
CLASS_WEIGHT = jnp.asarray([1.0, 2.0, 0.5])


@pytest.mark.parametrize(
    "loss",
    [
        jxent.CrossEntropyLoss(CLASS_WEIGHT, label_smoothing=0.1),
        jxent.NLLLoss(CLASS_WEIGHT, ignore_index=2),
        jxent.KLDivLoss(reduction="batchmean", log_target=True),
        jxent.BCELoss(CLASS_WEIGHT),
        jxent.BCEWithLogitsLoss(CLASS_WEIGHT, pos_weight=CLASS_WEIGHT),
    ],
    ids=["CrossEntropyLoss", "NLLLoss", "KLDivLoss", "BCELoss", "BCEWithLogitsLoss"],
)
@pytest.mark.parametrize(
    "placeholder",
    [None, True, "x", object(), jax.ShapeDtypeStruct((3,), jnp.float32)],
    ids=["None", "bool", "str", "object", "ShapeDtypeStruct"],
)
def test_tree_map_with_any_leaves_round_trips(loss, placeholder):
    replaced = jax.tree.map(lambda _: placeholder, loss)
    assert all(leaf is placeholder for leaf in jax.tree.leaves(replaced))
    assert type(replaced) is type(loss)
    leaves, treedef = jax.tree.flatten(loss)
    assert jax.tree.unflatten(treedef, leaves) == loss


def test_bad_options_still_raise_at_construction():
    with pytest.raises(ValueError, match="label_smoothing"):
        jxent.CrossEntropyLoss(label_smoothing=1.5)
    with pytest.raises(ValueError, match="reduction"):
        jxent.NLLLoss(reduction="avg")
    with pytest.raises(ValueError, match="reduction"):
        jxent.KLDivLoss(reduction="average")
    with pytest.raises(TypeError, match="log_target"):
        jxent.KLDivLoss(log_target="yes")


def _losses_with_buffers():
    """Every loss object with array buffers, and how a 3-output model feeds it."""
    multi_label = jnp.asarray(RNG.integers(0, 2, size=(32, 3)), jnp.float32)
    return [
        (
            jxent.CrossEntropyLoss(CLASS_WEIGHT, label_smoothing=jnp.asarray(0.1)),
            lambda z: z,
            Y,
        ),
        (jxent.NLLLoss(CLASS_WEIGHT), lambda z: jax.nn.log_softmax(z), Y),
        (jxent.BCELoss(CLASS_WEIGHT), jax.nn.sigmoid, multi_label),
        (
            jxent.BCEWithLogitsLoss(
                CLASS_WEIGHT, pos_weight=jnp.asarray([3.0, 1.0, 2.0])
            ),
            lambda z: z,
            multi_label,
        ),
    ]


LOSS_IDS = ["CrossEntropyLoss", "NLLLoss", "BCELoss", "BCEWithLogitsLoss"]


def _buffers(loss):
    names = ("weight", "label_smoothing", "pos_weight")
    return {n: np.array(getattr(loss, n)) for n in names if hasattr(loss, n)}


def _assert_bit_identical(before, after):
    assert before.keys() == after.keys()
    for name in before:
        assert before[name].dtype == after[name].dtype, name
        assert before[name].tobytes() == after[name].tobytes(), name


def _train_with_equinox(model, optimizer, target, steps):
    """``steps`` optax steps on ``model(X, target)``: (first loss, model)."""
    eqx = pytest.importorskip("equinox")
    state = optimizer.init(eqx.filter(model, eqx.is_inexact_array))

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(lambda m: m(X, target))(model)
        params = eqx.filter(model, eqx.is_inexact_array)
        updates, state = optimizer.update(grads, state, params)
        return eqx.apply_updates(model, updates), state, loss

    first = model(X, target)
    for _ in range(steps):
        model, state, _ = step(model, state)
    return first, model


def _train_with_nnx(model, target, steps):
    """``steps`` adamw steps (nnx.Optimizer over nnx.Param): the first loss."""
    nnx = pytest.importorskip("flax.nnx")
    optimizer = nnx.Optimizer(model, optax.adamw(0.1, weight_decay=0.5), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(X, target))(model)
        optimizer.update(model, grads)
        return loss

    first = model(X, target)
    for _ in range(steps):
        step(model, optimizer)
    return first


@pytest.mark.parametrize("case", range(4), ids=LOSS_IDS)
@pytest.mark.parametrize(
    "optimizer",
    [optax.sgd(1.0), optax.adamw(0.1, weight_decay=0.5)],
    ids=["sgd", "adamw"],
)
def test_equinox_standard_loop_never_trains_loss_buffers(case, optimizer):
    eqx = pytest.importorskip("equinox")
    criterion, head, target = _losses_with_buffers()[case]

    class Classifier(eqx.Module):
        linear: eqx.nn.Linear
        criterion: eqx.Module

        def __call__(self, x, y):
            return self.criterion(head(jax.vmap(self.linear)(x)), y)

    model = Classifier(eqx.nn.Linear(6, 3, key=jax.random.key(0)), criterion)
    before = _buffers(model.criterion)
    params, static = eqx.partition(model, eqx.is_array)
    assert eqx.combine(params, static).criterion == model.criterion
    first, model = _train_with_equinox(model, optimizer, target, 10)
    assert model(X, target) < first
    _assert_bit_identical(before, _buffers(model.criterion))
    # The loss is the functional loss with the untouched settings.
    np.testing.assert_allclose(
        model(X, target), criterion(head(jax.vmap(model.linear)(X)), target), rtol=1e-6
    )


@pytest.mark.parametrize("case", range(4), ids=LOSS_IDS)
@pytest.mark.parametrize("wrap", ["plain", "nnx.data"])
def test_flax_nnx_optimizer_never_trains_loss_buffers(case, wrap):
    nnx = pytest.importorskip("flax.nnx")
    criterion, head, target = _losses_with_buffers()[case]

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 3, rngs=rngs)
            # A plain attribute needs no nnx.data; the wrapper still works.
            self.criterion = criterion if wrap == "plain" else nnx.data(criterion)

        def __call__(self, x, y):
            return self.criterion(head(self.linear(x)), y)

    model = Classifier(nnx.Rngs(0))
    before = _buffers(model.criterion)
    first = _train_with_nnx(model, target, 10)
    assert model(X, target) < first
    _assert_bit_identical(before, _buffers(model.criterion))


def _weights_made_inside(kind):
    """Class weights and label smoothing as a jitted constructor writes them."""
    values = ([1.0, 2.0, 0.5], 0.1)
    if kind == "numpy":
        return np.asarray(values[0], np.float32), values[1]
    if kind == "list":
        return values
    return jnp.asarray(values[0]), jnp.asarray(values[1])  # traced under jit


@pytest.mark.parametrize("kind", ["numpy", "list", "jnp"])
def test_equinox_model_built_under_filter_jit(kind):
    # README, "Loss objects in equinox and flax": under a jitted constructor a
    # jnp array is traced, so the loss holds it as a leaf, which gradients and
    # weight decay reach; NumPy arrays, lists and Python numbers stay concrete
    # (static, never trained).
    eqx = pytest.importorskip("equinox")

    class Classifier(eqx.Module):
        linear: eqx.nn.Linear
        criterion: jxent.CrossEntropyLoss

        def __init__(self, key):
            self.linear = eqx.nn.Linear(6, 3, key=key)
            weight, smoothing = _weights_made_inside(kind)
            self.criterion = jxent.CrossEntropyLoss(weight, label_smoothing=smoothing)

        def __call__(self, x, y):
            return self.criterion(jax.vmap(self.linear)(x), y)

    model = eqx.filter_jit(Classifier)(jax.random.key(0))
    leaves = jax.tree.leaves(model.criterion)
    if kind == "jnp":
        assert len(leaves) == 2  # the documented pitfall
        return
    assert leaves == []
    before = _buffers(model.criterion)
    optimizer = optax.adamw(0.1, weight_decay=0.5)
    first, model = _train_with_equinox(model, optimizer, Y, 5)
    assert model(X, Y) < first
    _assert_bit_identical(before, _buffers(model.criterion))
    expected = jxent.cross_entropy(
        jax.vmap(model.linear)(X), Y, jnp.asarray([1.0, 2.0, 0.5]), label_smoothing=0.1
    )
    np.testing.assert_allclose(model(X, Y), expected, rtol=1e-6)


def test_flax_nnx_model_built_under_nnx_jit_with_numpy_buffers():
    # The README's advice for nnx's jitted init: NumPy buffers (a jnp array
    # made there would be a tracer kept on a plain attribute, and escape).
    nnx = pytest.importorskip("flax.nnx")

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 3, rngs=rngs)
            weight, smoothing = _weights_made_inside("numpy")
            self.criterion = jxent.CrossEntropyLoss(weight, label_smoothing=smoothing)

        def __call__(self, x, y):
            return self.criterion(self.linear(x), y)

    model = nnx.jit(lambda: Classifier(nnx.Rngs(0)))()
    before = _buffers(model.criterion)
    first = _train_with_nnx(model, Y, 5)
    assert model(X, Y) < first
    _assert_bit_identical(before, _buffers(model.criterion))
