"""CrossEntropyLoss / NLLLoss: functional equivalence, pytrees, hashing, jit."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from small_batch import LOG_PROBS, LOGITS, PROBS, TARGET, WEIGHT

import jxent

# PyTorch layout (N, C, d): classes on axis 1.
LOGITS_NCD = jnp.moveaxis(LOGITS.reshape(2, 2, 3), 2, 1)  # (2, 3, 2)
TARGET_ND = jnp.array([[0, 2], [-100, 1]], jnp.int32)

# (id, ctor/function kwargs without weight, weight, input, target)
CE_CASES = [
    ("default", {}, None, LOGITS, TARGET),
    ("weight", {}, WEIGHT, LOGITS, TARGET),
    ("sum", {"reduction": "sum"}, None, LOGITS, TARGET),
    ("none-ignore", {"reduction": "none", "ignore_index": 1}, None, LOGITS, TARGET),
    ("smoothing", {"label_smoothing": 0.2}, None, LOGITS, TARGET),
    (
        "all-options",
        {"reduction": "none", "ignore_index": 2, "label_smoothing": 0.1},
        WEIGHT,
        LOGITS,
        TARGET,
    ),
    ("weight-ignore-mean", {"ignore_index": 0}, WEIGHT, LOGITS, TARGET),
    ("axis1", {"axis": 1, "label_smoothing": 0.3}, WEIGHT, LOGITS_NCD, TARGET_ND),
    ("soft", {"label_smoothing": 0.25}, WEIGHT, LOGITS, PROBS),
    ("soft-none", {"reduction": "none"}, None, LOGITS, PROBS),
]

NLL_CASES = [
    ("default", {}, None, LOG_PROBS, TARGET),
    ("weight", {}, WEIGHT, LOG_PROBS, TARGET),
    ("sum-ignore", {"reduction": "sum", "ignore_index": 2}, WEIGHT, LOG_PROBS, TARGET),
    ("none", {"reduction": "none"}, None, LOG_PROBS, TARGET),
    (
        "axis1",
        {"axis": 1, "reduction": "none"},
        WEIGHT,
        jax.nn.log_softmax(LOGITS_NCD, axis=1),
        TARGET_ND,
    ),
]


def _params(cases):
    return [pytest.param(*case[1:], id=case[0]) for case in cases]


@pytest.mark.parametrize(("kwargs", "weight", "x", "target"), _params(CE_CASES))
def test_cross_entropy_loss_equals_functional(kwargs, weight, x, target):
    expected = jxent.cross_entropy(x, target, weight, **kwargs)
    if weight is None:
        module = jxent.CrossEntropyLoss(**kwargs)
    else:
        module = jxent.CrossEntropyLoss(weight, **kwargs)  # positional weight
        assert module.weight is weight
    np.testing.assert_array_equal(module(x, target), expected)
    # Keyword weight is the same object.
    assert jxent.CrossEntropyLoss(weight=weight, **kwargs) == module


@pytest.mark.parametrize(("kwargs", "weight", "x", "target"), _params(NLL_CASES))
def test_nll_loss_module_equals_functional(kwargs, weight, x, target):
    expected = jxent.nll_loss(x, target, weight, **kwargs)
    if weight is None:
        module = jxent.NLLLoss(**kwargs)
    else:
        module = jxent.NLLLoss(weight, **kwargs)
        assert module.weight is weight
    np.testing.assert_array_equal(module(x, target), expected)
    assert jxent.NLLLoss(weight=weight, **kwargs) == module


def test_defaults_match_torch():
    ce = jxent.CrossEntropyLoss()
    assert (ce.weight, ce.ignore_index, ce.reduction, ce.label_smoothing) == (
        None,
        -100,
        "mean",
        0.0,
    )
    assert ce.axis == -1
    nll = jxent.NLLLoss()
    assert (nll.weight, nll.ignore_index, nll.reduction, nll.axis) == (
        None,
        -100,
        "mean",
        -1,
    )


@pytest.mark.parametrize(
    "make",
    [
        lambda: jxent.CrossEntropyLoss(WEIGHT, -1),
        lambda: jxent.CrossEntropyLoss(None, -100, "mean"),
        lambda: jxent.CrossEntropyLoss(WEIGHT, -100, "sum", 0.1),
        lambda: jxent.NLLLoss(WEIGHT, 1),
        lambda: jxent.NLLLoss(None, -100, "none"),
    ],
    ids=["ce-ignore", "ce-reduction", "ce-smoothing", "nll-ignore", "nll-reduction"],
)
def test_options_after_weight_are_keyword_only(make):
    with pytest.raises(TypeError, match="positional"):
        make()


def test_frozen():
    module = jxent.CrossEntropyLoss(WEIGHT)
    with pytest.raises(AttributeError):
        module.reduction = "sum"


# --------------------------------------------------------------------------
# Pytrees.
# --------------------------------------------------------------------------


def test_concrete_buffers_are_not_leaves():
    # torch.nn registers weight/pos_weight as buffers: nothing trains them.
    modules = [
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=jnp.asarray(0.1)),
        jxent.CrossEntropyLoss(),
        jxent.NLLLoss(WEIGHT, ignore_index=3),
        jxent.BCELoss(WEIGHT),
        jxent.BCEWithLogitsLoss(WEIGHT, pos_weight=np.array([2.0, 1.0, 1.0])),
        jxent.KLDivLoss(),
    ]
    for module in modules:
        assert jax.tree_util.tree_leaves(module) == []


def test_buffers_are_in_the_treedef_by_value():
    structure = jax.tree_util.tree_structure
    base = structure(jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1))
    same = jxent.CrossEntropyLoss(
        np.array([1.0, 2.0, 0.5], np.float32), label_smoothing=0.1
    )
    assert base == structure(same)
    for other in (
        jxent.CrossEntropyLoss(2 * WEIGHT, label_smoothing=0.1),
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.5),
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1, reduction="sum"),
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1, ignore_index=0),
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1, axis=0),
    ):
        assert base != structure(other)


@pytest.mark.parametrize(
    "module",
    [
        jxent.CrossEntropyLoss(WEIGHT, ignore_index=1, label_smoothing=0.2, axis=1),
        jxent.CrossEntropyLoss(reduction="none"),
        jxent.NLLLoss(WEIGHT, reduction="sum", ignore_index=-1),
        jxent.NLLLoss(),
        jxent.BCEWithLogitsLoss(WEIGHT, pos_weight=2 * WEIGHT),
    ],
    ids=["ce-weight", "ce", "nll-weight", "nll", "bce-logits"],
)
def test_flatten_unflatten_round_trip(module):
    leaves, treedef = jax.tree_util.tree_flatten(module)
    rebuilt = jax.tree_util.tree_unflatten(treedef, leaves)
    assert type(rebuilt) is type(module)
    assert rebuilt == module
    mapped = jax.tree_util.tree_map(lambda v: v * 0.5, module)
    assert type(mapped) is type(module)
    for field in ("weight", "label_smoothing", "pos_weight", "reduction", "axis"):
        if hasattr(module, field):
            assert getattr(mapped, field) is getattr(module, field)


def _apply(loss_fn, x, target):
    return loss_fn(x, target)


def test_equal_buffers_reuse_the_compiled_program():
    traces = []

    @jax.jit
    def apply(loss_fn, x, target):
        traces.append(None)  # runs only while tracing
        return loss_fn(x, target)

    configs = [(WEIGHT, 0.1), (np.array([1.0, 2.0, 0.5], np.float32), 0.1)]
    configs += [(2.0 * WEIGHT, 0.3), (jnp.ones(3), 0.0), (WEIGHT, 1.0)]
    for weight, eps in configs:
        module = jxent.CrossEntropyLoss(weight, label_smoothing=eps)
        expected = jxent.cross_entropy(LOGITS, TARGET, weight, label_smoothing=eps)
        np.testing.assert_allclose(
            apply(module, LOGITS, TARGET), expected, rtol=1e-6, atol=1e-7
        )
    # Buffers are configuration: each new value compiles once, equal values
    # (whatever their array type) reuse the program.
    assert len(traces) == 4
    apply(jxent.CrossEntropyLoss(2.0 * WEIGHT, label_smoothing=0.3), LOGITS, TARGET)
    assert len(traces) == 4


@pytest.mark.parametrize("make", ["CrossEntropyLoss", "BCEWithLogitsLoss"])
def test_writing_into_the_callers_weight_array_changes_nothing(make):
    """The module keeps a read-only copy of a NumPy (or list) buffer: an
    in-place write into the caller's array afterwards changed the eager
    result while the compiled program (same hash) kept the old value."""
    weight = np.array([1.0, 2.0, 0.5], np.float32)
    module = getattr(jxent, make)(weight)
    listed = getattr(jxent, make)([1.0, 2.0, 0.5])
    x = LOGITS if make == "CrossEntropyLoss" else LOGITS - 1.0
    t = TARGET if make == "CrossEntropyLoss" else PROBS
    fn = (
        jxent.cross_entropy
        if make == "CrossEntropyLoss"
        else (jxent.binary_cross_entropy_with_logits)
    )
    want = fn(x, t, jnp.array([1.0, 2.0, 0.5]))
    compiled = jax.jit(lambda m: m(x, t))
    np.testing.assert_allclose(compiled(module), want, rtol=1e-6)
    weight[0] = 10.0
    for m in (module, listed):
        np.testing.assert_allclose(m(x, t), want, rtol=1e-6)
        np.testing.assert_allclose(compiled(m), want, rtol=1e-6)
        assert not m.weight.flags.writeable


def test_traced_zero_label_smoothing_equals_static_zero():
    module = jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.0, reduction="none")
    traced = jax.jit(_apply)(module, LOGITS, TARGET)
    np.testing.assert_allclose(
        traced, jxent.cross_entropy(LOGITS, TARGET, WEIGHT, reduction="none"), rtol=1e-6
    )


def test_grad_with_respect_to_the_module_has_no_buffers():
    module = jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.2)
    grads = jax.grad(lambda m, x: m(x, TARGET), argnums=(0, 1))(module, LOGITS)
    assert jax.tree_util.tree_leaves(grads[0]) == []
    expected = jax.grad(
        lambda x: jxent.cross_entropy(x, TARGET, WEIGHT, label_smoothing=0.2)
    )(LOGITS)
    np.testing.assert_allclose(grads[1], expected, rtol=1e-6)


def test_buffers_traced_at_construction_are_leaves():
    # Built inside a transform, a loss object keeps its traced values: vmap
    # over per-member settings and gradients w.r.t. them work.
    weights = jnp.stack([WEIGHT, jnp.ones(3)])
    eps = jnp.array([0.1, 0.0])

    def loss(w, e):
        module = jxent.CrossEntropyLoss(w, label_smoothing=e)
        assert len(jax.tree_util.tree_leaves(module)) == 2
        rebuilt = jax.tree_util.tree_map(lambda v: v, module)
        return rebuilt(LOGITS, TARGET)

    out = jax.vmap(loss)(weights, eps)
    gw, geps = jax.grad(loss, argnums=(0, 1))(WEIGHT, 0.2)
    for i in range(2):
        expected = jxent.cross_entropy(
            LOGITS, TARGET, weights[i], label_smoothing=float(eps[i])
        )
        np.testing.assert_allclose(out[i], expected, rtol=1e-6)
    # d/dw and d/deps by central differences in float64 (an independent oracle).
    w64 = np.asarray(WEIGHT, np.float64)
    x64 = np.asarray(LOGITS, np.float64)
    t = np.asarray(TARGET)

    def ce64(w, e):
        lp = x64 - np.log(np.exp(x64 - x64.max(1, keepdims=True)).sum(1, keepdims=True))
        lp = lp - x64.max(1, keepdims=True)
        keep = t != -100
        tt = np.where(keep, t, 0)
        nll = -lp[np.arange(len(t)), tt] * w[tt] * keep
        smooth = -(lp * w).sum(1) * keep / lp.shape[1]
        return ((1 - e) * nll + e * smooth).sum() / (w[tt] * keep).sum()

    h = 1e-6
    num_w = [
        (ce64(w64 + h * np.eye(3)[c], 0.2) - ce64(w64 - h * np.eye(3)[c], 0.2))
        / (2 * h)
        for c in range(3)
    ]
    np.testing.assert_allclose(gw, num_w, rtol=1e-4, atol=1e-6)
    np.testing.assert_allclose(
        geps, (ce64(w64, 0.2 + h) - ce64(w64, 0.2 - h)) / (2 * h), rtol=1e-4
    )


def test_a_loss_built_from_traced_buffers_keeps_its_tree_structure():
    """Buffers that were leaves stay leaves when JAX rebuilds the object with
    other leaves (bools, None, concrete results): equinox's filter_jit,
    partition and filter_vmap (an ensemble of losses) map two trees of the
    same structure. The structure changed with the leaves' values, so these
    raised. Per-member oracle: torch."""
    eqx = pytest.importorskip("equinox")
    torch = pytest.importorskip("torch")
    weights = jnp.stack([WEIGHT, jnp.ones(3)])

    def structures(w):
        module = jxent.CrossEntropyLoss(w, label_smoothing=0.1)
        spec = jax.tree.map(lambda _: True, module)
        assert jax.tree.structure(spec) == jax.tree.structure(module)
        return eqx.partition(module, eqx.is_array)[0]

    built = eqx.filter_jit(structures)(WEIGHT)
    np.testing.assert_array_equal(built.weight, WEIGHT)
    stacked = eqx.filter_vmap(lambda w: jxent.CrossEntropyLoss(w, label_smoothing=0.1))(
        weights
    )
    got = jax.vmap(lambda m: m(LOGITS, TARGET))(stacked)
    for i in range(2):
        want = torch.nn.functional.cross_entropy(
            torch.tensor(np.asarray(LOGITS, np.float64)),
            torch.tensor(np.asarray(TARGET, np.int64)),
            torch.tensor(np.asarray(weights[i], np.float64)),
            label_smoothing=0.1,
        )
        np.testing.assert_allclose(got[i], want.item(), rtol=1e-6)


@pytest.mark.parametrize("how", ["deepcopy", "pickle"])
def test_copied_buffers_stay_read_only(how):
    """A copy's NumPy buffer was writeable again, and a write then changed
    neither its compiled nor (deepcopy) its eager result."""
    import copy
    import pickle

    module = jxent.CrossEntropyLoss(np.array([1.0, 2.0, 0.5], np.float32))
    clone = (
        copy.deepcopy(module)
        if how == "deepcopy"
        else pickle.loads(pickle.dumps(module))
    )
    assert clone == module and hash(clone) == hash(module)
    assert not clone.weight.flags.writeable
    with pytest.raises(ValueError, match="read-only"):
        clone.weight[0] = 100.0


# --------------------------------------------------------------------------
# Hashing, equality, static arguments, closures.
# --------------------------------------------------------------------------


def test_equal_and_hash_by_configuration():
    a = jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1, ignore_index=2)
    b = jxent.CrossEntropyLoss(
        np.array([1.0, 2.0, 0.5], np.float32), label_smoothing=0.1, ignore_index=2
    )
    assert a is not b
    assert a == b
    assert hash(a) == hash(b)
    different = [
        jxent.CrossEntropyLoss(2 * WEIGHT, label_smoothing=0.1, ignore_index=2),
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.2, ignore_index=2),
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1, ignore_index=1),
        jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1, ignore_index=2, axis=0),
        jxent.CrossEntropyLoss(
            WEIGHT, label_smoothing=0.1, ignore_index=2, reduction="sum"
        ),
        jxent.CrossEntropyLoss(label_smoothing=0.1, ignore_index=2),
        jxent.NLLLoss(WEIGHT, ignore_index=2),
    ]
    for other in different:
        assert a != other
        assert other != a
    assert len({a, b, *different}) == 1 + len(different)
    assert jxent.NLLLoss() == jxent.NLLLoss()
    assert hash(jxent.NLLLoss()) == hash(jxent.NLLLoss())
    assert jxent.NLLLoss() != jxent.CrossEntropyLoss()
    assert {jxent.CrossEntropyLoss(): 1}[jxent.CrossEntropyLoss()] == 1


def test_usable_as_static_argnums():
    traces = []

    def apply(loss_fn, x, target):
        traces.append(None)
        return loss_fn(x, target)

    static_apply = jax.jit(apply, static_argnums=0)
    module = jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.1)
    expected = jxent.cross_entropy(LOGITS, TARGET, WEIGHT, label_smoothing=0.1)
    np.testing.assert_allclose(
        static_apply(module, LOGITS, TARGET), expected, rtol=1e-6
    )
    # An equal object (new arrays, same values) hits the cache.
    same = jxent.CrossEntropyLoss(jnp.array([1.0, 2.0, 0.5]), label_smoothing=0.1)
    np.testing.assert_allclose(static_apply(same, LOGITS, TARGET), expected, rtol=1e-6)
    assert len(traces) == 1
    # A different configuration is a different static argument.
    other = jxent.CrossEntropyLoss(2 * WEIGHT, label_smoothing=0.1)
    np.testing.assert_allclose(
        static_apply(other, LOGITS, TARGET),
        jxent.cross_entropy(LOGITS, TARGET, 2 * WEIGHT, label_smoothing=0.1),
        rtol=1e-6,
    )
    assert len(traces) == 2
    nll = jxent.NLLLoss(WEIGHT, reduction="sum")
    np.testing.assert_allclose(
        static_apply(nll, LOG_PROBS, TARGET),
        jxent.nll_loss(LOG_PROBS, TARGET, WEIGHT, reduction="sum"),
        rtol=1e-6,
    )


def test_closed_over_in_jit():
    module = jxent.CrossEntropyLoss(WEIGHT, label_smoothing=0.3, reduction="none")
    out = jax.jit(lambda x, t: module(x, t))(LOGITS, TARGET)
    np.testing.assert_allclose(
        out,
        jxent.cross_entropy(
            LOGITS, TARGET, WEIGHT, label_smoothing=0.3, reduction="none"
        ),
        rtol=1e-6,
    )
    nll = jxent.NLLLoss(WEIGHT, ignore_index=1)
    out = jax.jit(lambda lp, t: nll(lp, t))(LOG_PROBS, TARGET)
    np.testing.assert_allclose(
        out, jxent.nll_loss(LOG_PROBS, TARGET, WEIGHT, ignore_index=1), rtol=1e-6
    )


def test_module_built_from_traced_values_is_not_hashable():
    @jax.jit
    def f(weight):
        return hash(jxent.CrossEntropyLoss(weight))

    with pytest.raises(TypeError, match="hashable"):
        f(WEIGHT)
