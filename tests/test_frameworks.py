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


def test_equinox_model_holding_a_loss_trains():
    eqx = pytest.importorskip("equinox")

    class Classifier(eqx.Module):
        linear: eqx.nn.Linear
        criterion: jxent.CrossEntropyLoss

        def __call__(self, x, y):
            return self.criterion(jax.vmap(self.linear)(x), y)

    model = Classifier(
        eqx.nn.Linear(6, 3, key=jax.random.key(0)),
        jxent.CrossEntropyLoss(CLASS_WEIGHT, label_smoothing=0.1),
    )
    params, static = eqx.partition(model, eqx.is_array)
    assert eqx.combine(params, static).criterion == model.criterion
    optimizer = optax.adam(0.1)
    state = optimizer.init(eqx.filter(model, eqx.is_array))

    @eqx.filter_jit
    def step(model, state):
        loss, grads = eqx.filter_value_and_grad(lambda m: m(X, Y))(model)
        # Class weights are arrays: they get a gradient like any parameter.
        assert grads.criterion.weight.shape == (3,)
        updates, state = optimizer.update(grads, state, eqx.filter(model, eqx.is_array))
        return eqx.apply_updates(model, updates), state, loss

    first = model(X, Y)
    frozen = eqx.filter_grad(lambda m: m(X, Y))(model)
    assert np.all(np.isfinite(frozen.criterion.weight))
    for _ in range(5):
        model, state, _ = step(model, state)
    assert model(X, Y) < first
    assert model.criterion.label_smoothing == 0.1


def test_flax_nnx_model_holding_a_loss_trains():
    nnx = pytest.importorskip("flax.nnx")

    class Classifier(nnx.Module):
        def __init__(self, rngs):
            self.linear = nnx.Linear(6, 3, rngs=rngs)
            # Arrays inside an attribute must be declared data for nnx.
            self.criterion = nnx.data(
                jxent.CrossEntropyLoss(CLASS_WEIGHT, label_smoothing=0.1)
            )

        def __call__(self, x, y):
            return self.criterion(self.linear(x), y)

    model = Classifier(nnx.Rngs(0))
    optimizer = nnx.Optimizer(model, optax.adam(0.1), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer):
        loss, grads = nnx.value_and_grad(lambda m: m(X, Y))(model)
        optimizer.update(model, grads)
        return loss

    first = model(X, Y)
    for _ in range(5):
        step(model, optimizer)
    assert model(X, Y) < first
    np.testing.assert_array_equal(model.criterion.weight, CLASS_WEIGHT)
