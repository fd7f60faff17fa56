"""Sharded = unsharded on 8 simulated CPU devices.

Run by tests/test_sharding.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8`` (the flag must be set
before jax starts, so this module is not collected by the main run).
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

if jax.device_count() < 8:  # pragma: no cover - guarded by test_sharding.py
    pytest.skip("needs 8 (simulated) devices", allow_module_level=True)

MESHES = [((8,), ("model",)), ((2, 4), ("data", "model")), ((4, 2), ("data", "model"))]
N, C = 16, 32
RNG = np.random.default_rng(0)
LOGITS = (RNG.normal(size=(N, C)) * 2).astype(np.float32)
TARGET = RNG.integers(0, C, size=N)
TARGET[[1, 6]] = -100
WEIGHT = RNG.uniform(0.3, 2.0, size=C).astype(np.float32)
PROBS = np.asarray(jax.nn.softmax(jnp.asarray(RNG.normal(size=(N, C)))), np.float32)
MASK = np.ones(C, bool)
MASK[[3, 17, 30]] = False
TARGET = np.where(np.isin(TARGET, [3, 17, 30]), 0, TARGET)

OPTIONS = {
    "plain": {},
    "weight+ignore": {"weight": WEIGHT},
    "smoothing": {"label_smoothing": 0.2},
    "all": {"weight": WEIGHT, "label_smoothing": 0.1, "z_loss": 1e-2,
            "soft_cap": 3.0, "where": MASK},
    "probabilities": {"target": PROBS, "label_smoothing": 0.1, "weight": WEIGHT},
}  # fmt: skip


def _mesh(shape, names, kind=AxisType.Auto):
    return jax.make_mesh(shape, names, axis_types=(kind,) * len(names))


def _unsharded(option, reduction):
    kw = dict(OPTIONS[option])
    target = kw.pop("target", TARGET)
    weight = kw.pop("weight", None)
    fn = lambda x: jxent.cross_entropy(x, target, weight, reduction=reduction, **kw)
    return _value_and_grad(fn, reduction)(LOGITS)


def _value_and_grad(fn, reduction):
    ct = np.arange(1.0, N + 1.0, dtype=np.float32)

    def total(x):
        loss = fn(x)
        return (jnp.sum(loss * ct) if reduction == "none" else loss), loss

    return jax.jit(jax.value_and_grad(total, has_aux=True))


def _close(got, want):
    (_, loss), grad = got
    (_, ref_loss), ref_grad = want
    np.testing.assert_allclose(np.asarray(loss), ref_loss, rtol=2e-6, atol=2e-6)
    np.testing.assert_allclose(np.asarray(grad), ref_grad, rtol=2e-6, atol=1e-7)


# Every option and reduction on the (2, 4) mesh (CI: each option once, the
# reductions in turn, and "all" with two); on the others, the richest option
# sets with each reduction once (CI time).
SHARD_MAP_CASES = [
    (mesh_def, option, reduction)
    for mesh_def in MESHES[1:2]
    for option in OPTIONS
    for reduction in ("none", "mean", "sum")
] + [
    (MESHES[0], "all", "sum"), (MESHES[0], "probabilities", "mean"),
    (MESHES[2], "all", "none"), (MESHES[2], "probabilities", "sum"),
]  # fmt: skip
SHARD_MAP_IN_CI = {
    ("plain", "none"), ("weight+ignore", "mean"), ("smoothing", "sum"),
    ("all", "none"), ("all", "mean"), ("probabilities", "sum"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("mesh_def", "option", "reduction"),
    [
        pytest.param(m, o, r, id="x".join(map(str, m[0])) + f"-{o}-{r}",
                     marks=() if m != MESHES[1] or (o, r) in SHARD_MAP_IN_CI
                     else pytest.mark.full)
        for m, o, r in SHARD_MAP_CASES
    ],
)  # fmt: skip
def test_shard_map_class_and_batch_axes(mesh_def, option, reduction):
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None
    kw = dict(OPTIONS[option])
    target = kw.pop("target", TARGET)
    weight = kw.pop("weight", None)
    where = kw.pop("where", None)
    soft = target.ndim == 2

    def local(x, t, w, m):
        return jxent.cross_entropy(
            x, t, w, where=m, reduction=reduction, class_axis_name="model",
            batch_axis_name=batch if reduction != "none" else None, **kw,
        )  # fmt: skip

    row = P(batch, "model")
    out = P(batch) if reduction == "none" else P()
    fn = jax.shard_map(
        local,
        mesh=mesh,
        in_specs=(row, row if soft else P(batch), None if weight is None else
                  P("model"), None if where is None else P("model")),
        out_specs=out,
    )  # fmt: skip
    got = _value_and_grad(lambda x: fn(x, target, weight, where), reduction)(LOGITS)
    _close(got, _unsharded(option, reduction))


# A row whose top logit is ~120 above its target's: the shifted exp-sum
# overflows and the batch is redone with the row maximum, combined across
# shards (pmax of the maxima, psum of the sums).
OVERFLOW_LOGITS = LOGITS.copy()
OVERFLOW_LOGITS[0, (TARGET[0] + 5) % C] = 120.0
OVERFLOW_LOGITS[2, (TARGET[2] + 20) % C] = -200.0


# Each (reduction, logits) pair once, the two meshes alternating (CI time).
@pytest.mark.parametrize(
    ("mesh_def", "reduction", "logits"),
    [pytest.param(MESHES[1], "none", "overflow", id="2x4-none-overflow"),
     pytest.param(MESHES[1], "mean", "normal", id="2x4-mean-normal"),
     pytest.param(MESHES[0], "none", "normal", id="8-none-normal",
                  marks=pytest.mark.full),
     pytest.param(MESHES[0], "mean", "overflow", id="8-mean-overflow",
                  marks=pytest.mark.full)],
)  # fmt: skip
def test_shard_map_gradients_of_every_input(mesh_def, reduction, logits):
    """Class weights, smoothing, z-loss and the cap keep their gradients."""
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None
    x = OVERFLOW_LOGITS if logits == "overflow" else LOGITS
    ct = np.arange(1.0, N + 1.0, dtype=np.float32)
    # The cap (300) keeps the 120-logit spread above the ~88 that overflows.
    scalars = (np.float32(0.1), np.float32(1e-2), np.float32(300.0))

    def loss(fn):
        def total(x, w, scalars):
            out = fn(x, w, scalars)
            return jnp.sum(out * ct) if reduction == "none" else out

        return jax.jit(jax.value_and_grad(total, argnums=(0, 1, 2)))

    def options(scalars):
        eps, z, cap = scalars
        return dict(label_smoothing=eps, z_loss=z, soft_cap=cap, reduction=reduction)

    def local(x, t, w, m, scalars):
        return jxent.cross_entropy(
            x, t, w, where=m, class_axis_name="model",
            batch_axis_name=batch if reduction != "none" else None, **options(scalars),
        )  # fmt: skip

    row = P(batch, "model")
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(row, P(batch), P("model"), P("model"), P()),
        out_specs=P(batch) if reduction == "none" else P(),
    )  # fmt: skip
    got = loss(lambda x, w, s: sharded(x, TARGET, w, MASK, s))(x, WEIGHT, scalars)
    want = loss(
        lambda x, w, s: jxent.cross_entropy(x, TARGET, w, where=MASK, **options(s))
    )(x, WEIGHT, scalars)
    assert np.isfinite(want[0])
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(jax.tree.leaves(got[1]), jax.tree.leaves(want[1]), strict=True):
        assert np.all(np.isfinite(r)) and np.any(r != 0)
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=1e-6 * np.abs(r).max())


def _float64_nll(logits, weight):
    """Per-row weighted NLL (0 where ignored) and the weights, float64."""
    z = np.asarray(logits, np.float64)
    lse = np.log(np.sum(np.exp(z - z.max(-1, keepdims=True)), -1)) + z.max(-1)
    kept = TARGET != -100
    y = np.where(kept, TARGET, 0)
    w = np.where(kept, weight[y], 0.0)
    return w * (lse - z[np.arange(N), y]), w


@pytest.mark.parametrize("reduction", ["mean", "sum"])
@pytest.mark.parametrize("logits", ["normal", "overflow"])
def test_batch_axis_alone_on_a_two_axis_mesh(reduction, logits):
    # Rows split over "data", "model" unused: the forward alone (no
    # derivative), whose overflow check is a loop whose flag varies over
    # "data" only, and value_and_grad; against the float64 formula.
    x = OVERFLOW_LOGITS if logits == "overflow" else LOGITS
    mesh = _mesh(*MESHES[1])
    sharded = jax.shard_map(
        lambda x, t, w: jxent.cross_entropy(
            x, t, w, reduction=reduction, batch_axis_name="data"
        ),
        mesh=mesh, in_specs=(P("data"), P("data"), P()), out_specs=P(),
    )  # fmt: skip
    nll, w = _float64_nll(x, WEIGHT.astype(np.float64))
    want = nll.sum() / (w.sum() if reduction == "mean" else 1.0)
    np.testing.assert_allclose(jax.jit(sharded)(x, TARGET, WEIGHT), want, rtol=2e-6)
    value, grad = jax.jit(jax.value_and_grad(sharded))(x, TARGET, WEIGHT)
    np.testing.assert_allclose(value, want, rtol=2e-6)
    z = np.asarray(x, np.float64)
    p = np.exp(z - z.max(-1, keepdims=True))
    p /= p.sum(-1, keepdims=True)
    onehot = np.eye(C)[np.where(TARGET != -100, TARGET, 0)]
    want_grad = w[:, None] * (p - onehot)
    want_grad /= w.sum() if reduction == "mean" else 1.0
    np.testing.assert_allclose(grad, want_grad, rtol=2e-5, atol=1e-7)


def test_explicit_rows_split_and_classes_whole():
    # The same split with Explicit shardings (logits on P("data", None)),
    # eager and under jit: the float64 weighted mean.
    mesh = _mesh(*MESHES[1], kind=AxisType.Explicit)
    x = jax.device_put(OVERFLOW_LOGITS, NamedSharding(mesh, P("data", None)))
    nll, w = _float64_nll(OVERFLOW_LOGITS, WEIGHT.astype(np.float64))
    with jax.set_mesh(mesh):
        eager = jxent.cross_entropy(x, TARGET, WEIGHT)
        jitted = jax.jit(lambda x: jxent.cross_entropy(x, TARGET, WEIGHT))(x)
    for got in (eager, jitted):
        np.testing.assert_allclose(got, nll.sum() / w.sum(), rtol=2e-6)


def _collectives(compiled_text):
    """(op, element count) of every collective in a compiled HLO module."""
    found = []
    for line in compiled_text.splitlines():
        m = re.search(
            r"= (\(?[^=]*?\)?) (all-reduce|all-gather|all-to-all|collective-permute|"
            r"reduce-scatter)(-start)?\(",
            line,
        )
        if m:
            sizes = [
                int(np.prod([int(d) for d in dims.split(",") if d] or [1]))
                for dims in re.findall(r"\w+\[([\d,]*)\]", m.group(1))
            ]
            found.append((m.group(2), max(sizes, default=0)))
    return found


# CI: each option, mesh and axis type, three cases; pytest --full all twelve.
NAMED_IN_CI = {
    ("plain", "2x4", "Explicit"), ("all", "4x2", "Auto"),
    ("probabilities", "2x4", "Auto"),
}  # fmt: skip


@pytest.mark.parametrize(
    ("option", "mesh_def", "kind"),
    [
        pytest.param(o, m, k, id=f"{o}-{'x'.join(map(str, m[0]))}-{k.name}",
                     marks=() if (o, "x".join(map(str, m[0])), k.name) in NAMED_IN_CI
                     else pytest.mark.full)
        for o in ("plain", "all", "probabilities")
        for m in MESHES[1:]
        for k in (AxisType.Auto, AxisType.Explicit)
    ],
)  # fmt: skip
def test_jit_with_named_shardings(kind, mesh_def, option):
    mesh = _mesh(*mesh_def, kind=kind)
    kw = dict(OPTIONS[option])
    target = kw.pop("target", TARGET)
    weight = kw.pop("weight", None)
    soft = target.ndim == 2
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x = put(LOGITS, P("data", "model"))
    t = put(target, P("data", "model") if soft else P("data"))
    w = None if weight is None else put(weight, P("model"))
    if "where" in kw:
        kw["where"] = put(kw["where"], P("model"))
    with jax.set_mesh(mesh):
        fn = _value_and_grad(lambda x: jxent.cross_entropy(x, t, w, **kw), "mean")
        got = fn(x)
        _close(got, _unsharded(option, "mean"))
        assert got[1].sharding.spec == P("data", "model")  # dx stays sharded
        text = fn.lower(x).compile().as_text()
    logits_per_device = N * C // 8
    for op, size in _collectives(text):
        assert size < logits_per_device, (op, size)


def test_explicit_sharded_logits_need_no_mesh_context():
    """``jax.jit(cross_entropy)`` on Explicit-sharded logits, no set_mesh."""
    mesh = _mesh((2, 4), ("data", "model"), kind=AxisType.Explicit)
    x = jax.device_put(LOGITS, NamedSharding(mesh, P("data", "model")))
    got = jax.jit(lambda x: jxent.cross_entropy(x, TARGET, WEIGHT))(x)
    want = jxent.cross_entropy(LOGITS, TARGET, WEIGHT)
    np.testing.assert_allclose(got, want, rtol=2e-6)


def _branch_computations(compiled_text):
    """Names of the computations that conditionals run as branches."""
    names = set()
    for found in re.findall(r"branch_computations=\{([^}]*)\}", compiled_text):
        names.update(n.strip().lstrip("%") for n in found.split(","))
    for found in re.findall(r"(?:true|false)_computation=%?([\w.\-]+)", compiled_text):
        names.add(found)
    return names


def _collectives_on_the_main_path(compiled_text):
    """Collectives outside conditional branches (the rarely taken fallbacks)."""
    skip = _branch_computations(compiled_text)
    kept, current = [], []
    for line in compiled_text.splitlines():
        header = re.match(r"^(?:ENTRY )?%?([\w.\-]+) .*\{\s*$", line)
        if header:
            name = header.group(1)
            current = [] if name in skip else kept
        current.append(line)
    return _collectives("\n".join(kept))


@pytest.mark.parametrize(
    ("mesh_def", "shape"),
    [pytest.param(MESHES[1], (32, 4096), id="2x4-short-wide"),
     pytest.param(MESHES[2], (2048, 4096), id="4x2-tall"),
     pytest.param(MESHES[1], (2048, 4096), id="2x4-tall", marks=pytest.mark.full),
     pytest.param(MESHES[2], (32, 4096), id="4x2-short-wide",
                  marks=pytest.mark.full)],
)  # fmt: skip
def test_auto_sharded_value_and_grad_moves_no_logits(mesh_def, shape):
    """Short-wide and tall batches: no collective of per-device logits size,
    and at most optax's count + 1 (+ 2 weighted and smoothed) on the path
    taken without overflow."""
    optax = pytest.importorskip("optax")
    mesh = _mesh(*mesh_def)
    n, c = shape
    x = jax.device_put(jnp.zeros(shape), NamedSharding(mesh, P("data", "model")))
    t = jax.device_put(jnp.zeros(n, jnp.int32), NamedSharding(mesh, P("data")))
    w = jnp.linspace(0.5, 2.0, c)
    optax_loss = optax.softmax_cross_entropy_with_integer_labels
    losses = {
        "optax": lambda x: optax_loss(x, t).mean(),
        "plain": lambda x: jxent.cross_entropy(x, t),
        "weighted+smoothed": lambda x: jxent.cross_entropy(
            x, t, w, label_smoothing=0.1
        ),
    }
    counts = {}
    for name, loss in losses.items():
        text = jax.jit(jax.value_and_grad(loss)).lower(x).compile().as_text()
        for op, size in _collectives(text):
            assert size < n * c // 8, (name, op, size)
        counts[name] = len(_collectives_on_the_main_path(text))
    assert counts["plain"] <= counts["optax"] + 1, counts
    assert counts["weighted+smoothed"] <= counts["optax"] + 2, counts


def test_class_sharded_forward_uses_at_most_three_all_reduces(capsys):
    mesh = _mesh((8,), ("model",))
    fn = jax.shard_map(
        lambda x, t: jxent.cross_entropy(x, t, class_axis_name="model"),
        mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P(),
    )  # fmt: skip
    text = jax.jit(fn).lower(LOGITS, TARGET).compile().as_text()
    # Collectives outside the rarely taken overflow branch (a separate
    # computation called by the conditional).
    entry = text[text.index("ENTRY") :]
    collectives = _collectives(entry)
    assert 1 <= len(collectives) <= 3
    assert all(op == "all-reduce" and size <= N for op, size in collectives)
    with capsys.disabled():
        sizes = [4 * size for _, size in collectives]
        print(f"\nclass-sharded forward: {len(collectives)} all-reduce(s) of {sizes} B")


X = RNG.normal(size=(N, 8)).astype(np.float32)
W = (RNG.normal(size=(8, C)) * 0.5).astype(np.float32)
B = RNG.normal(size=C).astype(np.float32)


@pytest.mark.parametrize(
    ("mesh_def", "reduction"),
    [pytest.param(MESHES[1], "none", id="2x4-none"),
     pytest.param(MESHES[0], "mean", id="8-mean", marks=pytest.mark.full),
     pytest.param(MESHES[2], "mean", id="4x2-mean", marks=pytest.mark.full)],
)  # fmt: skip
def test_linear_cross_entropy_shard_map(mesh_def, reduction):
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None
    kw = dict(label_smoothing=0.1, z_loss=1e-2, chunk_size=3)

    def local(x, w, b, t, weight):
        return jxent.linear_cross_entropy(
            x, w, t, weight, bias=b, reduction=reduction, class_axis_name="model",
            batch_axis_name=batch if reduction != "none" else None, **kw,
        )  # fmt: skip

    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(batch), P(None, "model"), P("model"), P(batch), P("model")),
        out_specs=P(batch) if reduction == "none" else P(),
    )  # fmt: skip

    def total(f):
        ct = np.arange(1.0, N + 1.0, dtype=np.float32)

        def g(x, w, b):
            loss = f(x, w, b)
            return jnp.sum(loss * ct) if reduction == "none" else loss

        return jax.jit(jax.value_and_grad(g, argnums=(0, 1, 2)))(X, W, B)

    got = total(lambda x, w, b: fn(x, w, b, TARGET, WEIGHT))
    want = total(
        lambda x, w, b: jxent.linear_cross_entropy(
            x, w, TARGET, WEIGHT, bias=b, reduction=reduction, **kw
        )
    )
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


@pytest.mark.parametrize("explicit", [False, True], ids=["shard_map", "explicit"])
def test_linear_cross_entropy_default_options_differentiate_with_class_shards(
    explicit,
):
    """No smoothing (the default) with w split over the vocabulary, "mean",
    in shard_map with class and batch axes and under jit with Explicit
    shardings: value and gradients against the float64 oracle. (The
    vocabulary-outer branch, traced on every platform, cast its cotangents
    like the logits, not like its outputs: tracing failed without smoothing.)"""
    from oracles import reference_cross_entropy

    kind = AxisType.Explicit if explicit else AxisType.Auto
    mesh = _mesh((2, 4), ("data", "model"), kind)
    if explicit:
        put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
        x, w, b = put(X, P("data")), put(W, P(None, "model")), put(B, P())

        def loss(x, w, b):
            return jxent.linear_cross_entropy(x, w, TARGET, bias=b, chunk_size=3)

    else:
        x, w, b = X, W, B
        loss = jax.shard_map(
            lambda x, w, b, t: jxent.linear_cross_entropy(
                x, w, t, bias=b, chunk_size=3, class_axis_name="model",
                batch_axis_name="data",
            ),
            mesh=mesh, in_specs=(P("data"), P(None, "model"), P("model"), P("data")),
            out_specs=P(),
        )  # fmt: skip
        loss = functools.partial(lambda f, x, w, b: f(x, w, b, TARGET), loss)
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, b)
    with jax.enable_x64(True):
        want = jax.value_and_grad(
            lambda x, w, b: reference_cross_entropy(x @ w + b[None, :], TARGET)[0],
            argnums=(0, 1, 2),
        )(*(np.asarray(a, np.float64) for a in (X, W, B)))
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


def test_traced_scalar_options_with_explicit_shardings():
    """A traced z_loss (linear_cross_entropy) or temperature
    (linear_log_probs) under jit with x and w on Explicit mesh axes, inside
    jax.set_mesh: shard_map refused to close over the replicated scalar.
    Value and d/d option against the float64 oracle."""
    from oracles import reference_cross_entropy

    mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x, w = put(X, P("data")), put(W, P(None, "model"))
    ce = jax.jit(jax.value_and_grad(
        lambda z: jxent.linear_cross_entropy(x, w, TARGET, z_loss=z)))  # fmt: skip
    lp = jax.jit(lambda t: jxent.linear_log_probs(x, w, TARGET, temperature=t))
    with jax.set_mesh(mesh):
        got = ce(jnp.float32(0.03))
        got_lp = lp(jnp.float32(0.7))
    with jax.enable_x64(True):
        logits = np.asarray(X, np.float64) @ np.asarray(W, np.float64)
        want = jax.value_and_grad(
            lambda z: reference_cross_entropy(logits, TARGET, z_loss=z)[0]
        )(0.03)
        scaled = logits / 0.7
        log_p = scaled - np.log(np.exp(scaled).sum(-1, keepdims=True))
    keep = TARGET != -100
    want_lp = np.where(keep, log_p[np.arange(N), np.where(keep, TARGET, 0)], 0.0)
    np.testing.assert_allclose(got, want, rtol=1e-5)
    np.testing.assert_allclose(got_lp, want_lp, rtol=1e-5, atol=1e-5)


def test_linear_cross_entropy_under_jit_with_named_shardings():
    mesh = _mesh((2, 4), ("data", "model"))
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x, w, t = put(X, P("data")), put(W, P(None, "model")), put(TARGET, P("data"))
    f = jax.jit(
        jax.value_and_grad(
            functools.partial(jxent.linear_cross_entropy, chunk_size=4), argnums=(0, 1)
        )
    )
    got = f(x, w, t)
    want = f(X, W, TARGET)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


def _nll_float64(logits, target):
    """The mean over the positions not ignored (-100)."""
    z = np.asarray(logits, np.float64)
    lse = np.log(np.exp(z - z.max(1, keepdims=True)).sum(1)) + z.max(1)
    valid = target != -100
    nll = lse - z[np.arange(len(target)), np.where(valid, target, 0)]
    return float(np.mean(nll[valid]))


def test_targets_captured_as_constants_are_global_indices():
    """A target the function closes over is concrete inside shard_map: its
    range is checked against every shard's classes (it was against this
    device's slice, refusing every index of another shard)."""
    mesh = _mesh((8,), ("model",))
    target = jnp.asarray(TARGET)  # indices up to C - 1 = 31, 4 per shard
    losses = {
        "cross_entropy": (
            lambda x, w, t: jxent.cross_entropy(x @ w, t, class_axis_name="model")
        ),
        "linear_cross_entropy": (
            lambda x, w, t: jxent.linear_cross_entropy(x, w, t, class_axis_name="model")
        ),
        "linear_log_probs": lambda x, w, t: (
            -jnp.sum(jxent.linear_log_probs(x, w, t, class_axis_name="model"))
            / jnp.sum(t != -100)
        ),
    }
    for name, loss in losses.items():
        for t, ok in ((target, True), (target.at[3].set(C), False)):
            f = jax.jit(jax.shard_map(
                lambda x, w, loss=loss, t=t: loss(x, w, t),
                mesh=mesh, in_specs=(P(), P(None, "model")), out_specs=P(),
            ))  # fmt: skip
            if ok:
                got = f(X, W)
                np.testing.assert_allclose(
                    got, _nll_float64(X @ W, TARGET), rtol=2e-6, err_msg=name
                )
            else:
                with pytest.raises(ValueError, match=f"class index {C}, outside"):
                    f(X, W)


def test_errors():
    mesh = _mesh((2, 4), ("data", "model"))
    bad_axis = jax.shard_map(
        lambda x, t: jxent.cross_entropy(x, t, class_axis_name="vocab"),
        mesh=mesh, in_specs=(P(None, "model"), P()), out_specs=P(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="'vocab' is not an axis"):
        bad_axis(LOGITS, TARGET)
    weight_replicated = jax.shard_map(
        lambda x, t, w: jxent.cross_entropy(x, t, w, class_axis_name="model"),
        mesh=mesh, in_specs=(P(None, "model"), P(), P()), out_specs=P(),
    )  # fmt: skip
    with pytest.raises(ValueError, match="`weight` must be a 1-D array of length C=8"):
        weight_replicated(LOGITS, TARGET, WEIGHT)
    # Split over another axis into slices of the classes' length: the shapes
    # agree, the loss would be wrong.
    cube = _mesh((2, 2, 2), ("a", "b", "c"))
    weight_elsewhere = jax.shard_map(
        lambda x, t, w: jxent.cross_entropy(x, t, w, class_axis_name="b")[None],
        mesh=cube, in_specs=(P(None, "b"), P(), P("c")), out_specs=P("c"),
    )  # fmt: skip
    with pytest.raises(ValueError, match=r"`weight` must be split over the class ax"):
        weight_elsewhere(LOGITS, TARGET, WEIGHT)
    for loss in (jxent.linear_cross_entropy, jxent.linear_log_probs):
        w_replicated = jax.shard_map(
            lambda x, w, t, loss=loss: loss(x, w, t, class_axis_name="b"),
            mesh=cube, in_specs=(P(), P(), P()), out_specs=P(),
        )  # fmt: skip
        with pytest.raises(ValueError, match=r"`w` must be split over the class ax"):
            w_replicated(X, W[:, :16], TARGET % 16)
    # A vocabulary that the class shards do not divide cannot even be laid out:
    # JAX refuses it with a clear ValueError. The remedy is padding + `where`.
    explicit = _mesh((2, 4), ("data", "model"), kind=AxisType.Explicit)
    with pytest.raises(ValueError, match="does not evenly divide"):
        jax.device_put(
            np.zeros((N, 30), np.float32), NamedSharding(explicit, P("data", "model"))
        )
    padded = np.concatenate([LOGITS[:, :30], np.zeros((N, 2), np.float32)], axis=1)
    keep = np.arange(C) < 30
    target = np.where(TARGET >= 30, 0, TARGET)
    with jax.set_mesh(explicit):
        sharded = jax.device_put(padded, NamedSharding(explicit, P("data", "model")))
        mask = jax.device_put(keep, NamedSharding(explicit, P("model")))
        got = jxent.cross_entropy(sharded, target, where=mask, label_smoothing=0.1)
    want = jxent.cross_entropy(LOGITS[:, :30], target, label_smoothing=0.1)
    np.testing.assert_allclose(got, want, rtol=2e-6)


PROBS_LINEAR = np.asarray(
    jax.nn.softmax(jnp.asarray(RNG.normal(size=(N, C)))), np.float32
)


@pytest.mark.parametrize(
    ("mesh_def", "reduction", "return_lse", "soft"),
    [(MESHES[2], "none", True, False), (MESHES[1], "sum", False, True),
     full_only(MESHES[1], "mean", False, False)],
)  # fmt: skip
def test_linear_cross_entropy_gradients_of_options_shard_map(
    mesh_def, reduction, return_lse, soft
):
    """Gradients w.r.t. x, w, bias, class weights, smoothing, z-loss (and the
    probability targets) with the vocabulary and the tokens split."""
    mesh = _mesh(*mesh_def)
    batch = None if reduction == "none" else "data"
    token_spec = P("data") if reduction == "none" else P(batch)
    ct = np.linspace(1.0, 2.0, N).astype(np.float32)

    def loss(x, w, b, weight, eps, zl, target, **kw):
        out = jxent.linear_cross_entropy(
            x, w, target, weight, bias=b, reduction=reduction, label_smoothing=eps,
            z_loss=zl, return_lse=return_lse, chunk_size=3, **kw,
        )  # fmt: skip
        loss_value, lse = out if return_lse else (out, None)
        return loss_value, lse

    target = PROBS_LINEAR if soft else TARGET
    target_spec = P("data", "model") if soft else P("data")

    def sharded(x, w, b, weight, eps, zl, target):
        fn = jax.shard_map(
            functools.partial(
                loss, class_axis_name="model", batch_axis_name=batch
            ),
            mesh=mesh,
            in_specs=(P("data"), P(None, "model"), P("model"), P("model"), P(), P(),
                      target_spec),
            out_specs=(P() if reduction != "none" else token_spec,
                       token_spec if return_lse else None),
        )  # fmt: skip
        return fn(x, w, b, weight, eps, zl, target)

    def total(f):
        def g(x, w, b, weight, eps, zl, target):
            value, lse = f(x, w, b, weight, eps, zl, target)
            out = jnp.sum(value * ct) if reduction == "none" else value
            return out + (0.0 if lse is None else jnp.sum(lse * ct[::-1]))

        argnums = (0, 1, 2, 3, 4, 5) + ((6,) if soft else ())
        return jax.jit(jax.value_and_grad(g, argnums=argnums))(
            X, W, B, WEIGHT, np.float32(0.1), np.float32(1e-2), target
        )

    got = total(sharded)
    want = total(loss)
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    names = ("x", "w", "bias", "weight", "label_smoothing", "z_loss", "target")
    for name, g, r in zip(names, got[1], want[1], strict=False):
        assert np.max(np.abs(r)) > 0, name
        # Scalars are sums over tokens with cancellation: float32 rounding.
        tol = 1e-4 if np.ndim(r) == 0 else 1e-5
        np.testing.assert_allclose(
            g, r, rtol=tol, atol=tol * np.abs(r).max(), err_msg=name
        )


@pytest.mark.parametrize(
    "mesh_def", MESHES[1:2], ids=lambda m: "x".join(map(str, m[0]))
)
@pytest.mark.parametrize("classes", [True, False], ids=["classes", "tokens"])
def test_linear_cross_entropy_two_dw_passes_shard_map(mesh_def, classes, monkeypatch):
    # 16-bit inputs with a large dw take two column ranges (forced here):
    # class- and batch-sharded (each range a pass over the chunks), or batch-
    # sharded only (the second range from its own logits and the kept
    # logsumexps, on each device's tokens), against naive float32 logits.
    monkeypatch.setattr(jxent._linear, "_DW_SPLIT_BYTES", 0)
    mesh = _mesh(*mesh_def)
    x16 = jnp.asarray(X, jnp.bfloat16)
    w16 = jnp.asarray(W, jnp.bfloat16)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, chunk_size=3)
    model = "model" if classes else None

    def local(x, w, t, weight):
        return jxent.linear_cross_entropy(
            x, w, t, weight, class_axis_name=model, batch_axis_name="data", **kw
        )

    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P("data"), P(None, model), P("data"), P(model)), out_specs=P(),
    )  # fmt: skip
    got = jax.jit(
        jax.value_and_grad(lambda x, w: fn(x, w, TARGET, WEIGHT), argnums=(0, 1))
    )(x16, w16)
    want = jax.value_and_grad(
        lambda x, w: jxent.cross_entropy(x @ w, TARGET, WEIGHT, **{
            k: v for k, v in kw.items() if k != "chunk_size"
        }),
        argnums=(0, 1),
    )(x16.astype(jnp.float32), w16.astype(jnp.float32))  # fmt: skip
    np.testing.assert_allclose(float(got[0]), float(want[0]), rtol=1e-2)
    for g, r in zip(got[1], want[1], strict=True):
        assert g.dtype == jnp.bfloat16
        g = np.asarray(g, np.float32)
        np.testing.assert_allclose(g, r, rtol=2e-2, atol=1e-2 * np.abs(r).max())


# A class axis split over two mesh axes: shard i of the (2, 4) mesh's 8 holds
# classes [i·C/8, (i+1)·C/8), i row-major over the axes in the order the spec
# (and class_axis_name) names them. Against torch float64 on the full logits.


def _torch_ce(logits, weight, label_smoothing, reduction, cotangent=None):
    import torch
    import torch.nn.functional as F

    x = torch.tensor(np.asarray(logits, np.float64), requires_grad=True)
    loss = F.cross_entropy(
        x, torch.tensor(TARGET), torch.tensor(np.asarray(weight, np.float64)),
        label_smoothing=label_smoothing, reduction=reduction,
    )  # fmt: skip
    ct = torch.ones(()) if cotangent is None else torch.tensor(cotangent)
    (loss * ct.to(torch.float64)).sum().backward()
    return loss.detach().numpy(), x


@pytest.mark.parametrize(
    ("order", "reduction"),
    [pytest.param(("b", "a"), "none", id="ba-none"),
     pytest.param(("a", "b"), "mean", id="ab-mean"),
     pytest.param(("a", "b"), "none", id="ab-none", marks=pytest.mark.full)],
)  # fmt: skip
def test_class_axis_split_over_two_mesh_axes(order, reduction):
    mesh = _mesh((2, 4), ("a", "b"))
    fn = jax.shard_map(
        lambda x, t, w: jxent.cross_entropy(
            x, t, w, reduction=reduction, label_smoothing=0.1, class_axis_name=order
        ),
        mesh=mesh, in_specs=(P(None, order), P(), P(order)),
        out_specs=P(),
    )  # fmt: skip
    ct = np.arange(1.0, N + 1.0) if reduction == "none" else np.ones(())

    def total(x):
        loss = fn(x, TARGET, WEIGHT)
        return jnp.sum(loss * ct.astype(np.float32)), loss

    (_, loss), grad = jax.jit(jax.value_and_grad(total, has_aux=True))(LOGITS)
    want, x = _torch_ce(LOGITS, WEIGHT, 0.1, reduction, ct)
    np.testing.assert_allclose(loss, want, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grad, x.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    "order",
    [pytest.param(("b", "a"), id="ba"),
     pytest.param(("a", "b"), id="ab", marks=pytest.mark.full)],
)  # fmt: skip
def test_linear_cross_entropy_class_axis_split_over_two_mesh_axes(order):
    import torch
    import torch.nn.functional as F

    mesh = _mesh((2, 4), ("a", "b"))
    fn = jax.shard_map(
        lambda x, w, t, weight: jxent.linear_cross_entropy(
            x, w, t, weight, label_smoothing=0.1, chunk_size=5, class_axis_name=order
        ),
        mesh=mesh, in_specs=(P(), P(None, order), P(), P(order)), out_specs=P(),
    )  # fmt: skip
    loss, (gx, gw) = jax.jit(
        jax.value_and_grad(lambda x, w: fn(x, w, TARGET, WEIGHT), argnums=(0, 1))
    )(X, W)
    xt = torch.tensor(X.astype(np.float64), requires_grad=True)
    wt = torch.tensor(W.astype(np.float64), requires_grad=True)
    want = F.cross_entropy(
        xt @ wt, torch.tensor(TARGET), torch.tensor(WEIGHT.astype(np.float64)),
        label_smoothing=0.1,
    )  # fmt: skip
    want.backward()
    np.testing.assert_allclose(loss, want.item(), rtol=1e-5)
    np.testing.assert_allclose(gx, xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(gw, wt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("loss", ["cross_entropy", "linear_cross_entropy"])
@pytest.mark.parametrize(
    "mesh_def", MESHES[1:2], ids=lambda m: "x".join(map(str, m[0]))
)
def test_bad_target_in_one_batch_shard_poisons_every_gradient(mesh_def, loss):
    # One out-of-range target on one batch shard: the mean is NaN on every
    # device and so is every gradient of every input, on every shard.
    mesh = _mesh(*mesh_def)
    bad = np.asarray(TARGET).copy()
    bad[2] = C + 5
    kw = dict(label_smoothing=0.1, reduction="mean", class_axis_name="model",
              batch_axis_name="data")  # fmt: skip
    if loss == "cross_entropy":
        local = lambda x, weight, t: jxent.cross_entropy(x, t, weight, **kw)
        args, specs = (LOGITS, WEIGHT), (P("data", "model"), P("model"))
    else:
        local = lambda x, w, weight, t: jxent.linear_cross_entropy(
            x, w, t, weight, chunk_size=3, **kw
        )
        args, specs = (X, W, WEIGHT), (P("data"), P(None, "model"), P("model"))
    fn = jax.shard_map(local, mesh=mesh, in_specs=(*specs, P("data")), out_specs=P())
    argnums = tuple(range(len(args)))
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=argnums))(*args, bad)
    assert np.isnan(value)
    for g in grads:
        assert np.isnan(np.asarray(g)).all()
    value, grads = jax.jit(jax.value_and_grad(fn, argnums=argnums))(*args, TARGET)
    assert np.isfinite(value)
    assert all(np.isfinite(np.asarray(g)).all() for g in grads)


@pytest.mark.parametrize(
    ("mesh_def", "reduction"),
    [pytest.param(MESHES[1], "mean", id="2x4-mean"),
     pytest.param(MESHES[0], "sum", id="8-sum", marks=pytest.mark.full),
     pytest.param(MESHES[2], "sum", id="4x2-sum", marks=pytest.mark.full)],
)  # fmt: skip
def test_linear_cross_entropy_vocab_outer_shard_map(mesh_def, reduction, monkeypatch):
    """The TPU/GPU gradients (class blocks, forced here) inside shard_map,
    vocabulary split over "model" and tokens over "data": float64 oracle."""
    from oracles import reference_cross_entropy

    import jxent._linear

    monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None
    mask = np.arange(C) % 5 != 2
    target = np.where(TARGET % 5 == 2, 0, TARGET)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, soft_cap=4.0)

    def local(x, w, b, t, weight, where):
        return jxent.linear_cross_entropy(
            x, w, t, weight, bias=b, reduction=reduction, class_axis_name="model",
            batch_axis_name=batch, where=where, chunk_size=3, vocab_chunk_size=3,
            **kw,
        )  # fmt: skip

    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(batch), P(None, "model"), P("model"), P(batch), P("model"),
                  P("model")),
        out_specs=P(),
    )  # fmt: skip
    got = jax.jit(
        jax.value_and_grad(
            lambda x, w, b: fn(x, w, b, target, WEIGHT, mask), argnums=(0, 1, 2)
        )
    )(X, W, B)
    with jax.enable_x64(True):
        args = tuple(np.asarray(a, np.float64) for a in (X, W, B))
        want = jax.value_and_grad(
            lambda x, w, b: reference_cross_entropy(
                x @ w + b[None, :], target, WEIGHT.astype(np.float64),
                reduction=reduction, where=mask, **kw,
            )[0],
            argnums=(0, 1, 2),
        )(*args)  # fmt: skip
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


# 72: a ragged last chunk of 8 rows; 64: even chunks.
@pytest.mark.parametrize(("vocab_outer", "n"), [(True, 64), full_only(False, 72)])
def test_linear_cross_entropy_data_parallel_jit_splits_the_work(
    vocab_outer, n, monkeypatch
):
    """Tokens split over 8 devices by jit, w replicated: every device works on
    its own tokens' share of every chunk (strided chunks), so the compiled
    program gathers nothing and each device does 1/8 of the matmul flops.
    Contiguous chunks made XLA all-gather each chunk and every device compute
    all tokens (8x the flops per device). Values against float64."""
    from oracles import reference_cross_entropy

    import jxent._linear

    monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", vocab_outer)
    mesh = _mesh((8,), ("data",))
    x_np = np.tile(X, (-(-n // N), 1))[:n]
    t_np = np.tile(TARGET, -(-n // N))[:n]
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x, w, t = put(x_np, P("data")), put(W, P()), put(t_np, P("data"))

    def loss(x, w, t):
        return jxent.linear_cross_entropy(
            x, w, t, bias=None, chunk_size=16, vocab_chunk_size=8
        )

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    if n % 16 == 0:
        assert "all-gather" not in f.lower(x, w, t).compile().as_text()
    value, (dx, dw) = f(x, w, t)
    with jax.enable_x64(True):
        want = jax.value_and_grad(
            lambda x, w: reference_cross_entropy(x @ w, t_np)[0], argnums=(0, 1)
        )(np.asarray(x_np, np.float64), np.asarray(W, np.float64))
    np.testing.assert_allclose(value, want[0], rtol=2e-6)
    np.testing.assert_allclose(dx, want[1][0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(dw, want[1][1], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("mesh_def", MESHES[2:], ids=lambda m: "x".join(map(str, m[0])))
def test_linear_cross_entropy_vocab_outer_jit_tensor_parallel(mesh_def, monkeypatch):
    """Tokens over "data", w's classes over "model", under jit (the TPU/GPU
    gradients forced): class blocks are strided (every k-th class), so no
    device gathers w or a chunk of tokens. Float64 oracle, weight, smoothing,
    z-loss and bias included."""
    from oracles import reference_cross_entropy

    import jxent._linear

    monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)
    mesh = _mesh(*mesh_def)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x = put(X, P("data"))
    w, b = put(W, P(None, "model")), put(B, P("model"))
    t = put(TARGET, P("data"))
    kw = dict(label_smoothing=0.1, z_loss=1e-2)

    def loss(x, w, b, t):
        return jxent.linear_cross_entropy(
            x, w, t, WEIGHT, bias=b, chunk_size=4, vocab_chunk_size=8, **kw
        )

    f = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))
    assert "all-gather" not in f.lower(x, w, b, t).compile().as_text()
    got = f(x, w, b, t)
    with jax.enable_x64(True):
        want = jax.value_and_grad(
            lambda x, w, b: reference_cross_entropy(
                x @ w + b[None, :], TARGET, WEIGHT.astype(np.float64), **kw
            )[0],
            argnums=(0, 1, 2),
        )(*(np.asarray(a, np.float64) for a in (X, W, B)))
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


@pytest.mark.parametrize(
    ("x_spec", "w_spec", "reduction"),
    [pytest.param(P("data"), P(None, "model"), "mean", id="tokens-vocab-mean"),
     pytest.param(P("data"), P(), "none", id="tokens-only-none",
                  marks=pytest.mark.full),
     pytest.param(P(None, "model"), P("data"), "none", id="d-split-none")],
)  # fmt: skip
def test_linear_cross_entropy_explicit_sharded_inputs(x_spec, w_spec, reduction):
    """x and w sharded over Explicit mesh axes, under jit, no axis names:
    run under shard_map as they are split (x or w split on D is resharded).
    Float64 oracle with weight, bias, class mask and smoothing; lse too."""
    from oracles import reference_cross_entropy

    mesh = _mesh((2, 4), ("data", "model"), AxisType.Explicit)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    mask = np.arange(C) % 5 != 2
    target = np.where(TARGET % 5 == 2, 0, TARGET)
    kw = dict(label_smoothing=0.1, where=mask)
    ct = np.arange(1.0, N + 1.0)

    def loss(x, w, b):
        value, lse = jxent.linear_cross_entropy(
            x, w, target, WEIGHT, bias=b, reduction=reduction, chunk_size=3,
            return_lse=True, **kw,
        )  # fmt: skip
        value = jnp.sum(value * ct) if reduction == "none" else value
        return value + 0.01 * jnp.sum(lse)

    x, w, b = put(X, x_spec), put(W, w_spec), put(B, P())
    got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(x, w, b)
    with jax.enable_x64(True):

        def ref(x, w, b):
            value, lse = reference_cross_entropy(
                x @ w + b[None, :], target, WEIGHT.astype(np.float64),
                reduction=reduction, **kw,
            )  # fmt: skip
            value = jnp.sum(value * ct) if reduction == "none" else value
            return value + 0.01 * jnp.sum(lse)

        want = jax.value_and_grad(ref, argnums=(0, 1, 2))(
            *(np.asarray(a, np.float64) for a in (X, W, B))
        )
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


# --- axis names inside jax.pmap and shard_map(check_vma=False) -----------------

UNTYPED_N, UNTYPED_D, UNTYPED_V = 16, 4, 32
UNTYPED_X = RNG.normal(size=(UNTYPED_N, UNTYPED_D)).astype(np.float32)
UNTYPED_W = RNG.normal(size=(UNTYPED_D, UNTYPED_V)).astype(np.float32)
UNTYPED_T = RNG.integers(0, UNTYPED_V, size=UNTYPED_N).astype(np.int32)
UNTYPED_T[3] = -100
UNTYPED_LOSSES = {
    "cross_entropy": lambda x, w, t, axes: jxent.cross_entropy(
        x @ w, t, label_smoothing=0.1, **axes
    ),
    "linear_cross_entropy": lambda x, w, t, axes: jxent.linear_cross_entropy(
        x, w, t, **axes
    ),
    "linear_log_probs": lambda x, w, t, axes: jxent.linear_log_probs(
        x, w, t, return_entropy=True, **axes
    )[1].sum(),
    "linear_distillation_loss": lambda x, w, t, axes: jxent.linear_distillation_loss(
        x, w, 0.5 * x, 0.5 * w, t, beta=0.5, **axes
    ),
}


def _untyped(context, axis, f):
    """``f(x, w, t)`` over 8 devices, the classes (``w``'s columns) or the
    batch split, inside ``jax.pmap`` or ``shard_map(check_vma=False)``."""
    split_w = axis == "class_axis_name"
    if context == "pmap":

        def run(x, w, t):
            if split_w:
                w = w.reshape(UNTYPED_D, 8, -1).transpose(1, 0, 2)
                return jax.pmap(f, "a", in_axes=(None, 0, None))(x, w, t)[0]
            x, t = x.reshape(8, -1, UNTYPED_D), t.reshape(8, -1)
            return jax.pmap(f, "a", in_axes=(0, None, 0))(x, w, t)[0]

        return run
    mesh = _mesh((8,), ("a",))
    specs = (P(), P(None, "a"), P()) if split_w else (P("a"), P(), P("a"))
    return jax.jit(
        jax.shard_map(f, mesh=mesh, in_specs=specs, out_specs=P(), check_vma=False)
    )


@pytest.mark.parametrize("context", ["pmap", "shard_map(check_vma=False)"])
@pytest.mark.parametrize("axis", ["class_axis_name", "batch_axis_name"])
@pytest.mark.parametrize("name", list(UNTYPED_LOSSES))
def test_untyped_axes_give_values_and_refuse_derivatives(name, axis, context):
    """Values equal the unsharded loss's; derivatives, which JAX would scale
    by the device count there (8x, 64x for dw), raise, in both modes."""
    loss = UNTYPED_LOSSES[name]
    args = (UNTYPED_X, UNTYPED_W, UNTYPED_T)

    def value(x, w, t):
        return loss(x, w, t, {axis: "a"})

    expected = loss(*args, {})
    if name == "linear_log_probs" and axis == "batch_axis_name":
        # Per-token outputs: the first device's tokens (no sum over devices).
        first = UNTYPED_N // 8
        expected = loss(UNTYPED_X[:first], UNTYPED_W, UNTYPED_T[:first], {})
    np.testing.assert_allclose(
        _untyped(context, axis, value)(*args), expected, rtol=2e-6
    )
    for derivative in (
        lambda x, w, t: jax.grad(value, argnums=(0, 1))(x, w, t)[0].sum(),
        lambda x, w, t: jax.jvp(lambda x: value(x, w, t), (x,), (x,))[1],
    ):
        with pytest.raises(ValueError) as info:
            _untyped(context, axis, derivative)(*args)
        for expected in (name, f"{axis}='a'", "check_vma=True", "jax.pmap"):
            assert expected in str(info.value), str(info.value)


@pytest.mark.parametrize("wrt", ["weight", "probabilities"])
@pytest.mark.parametrize("name", ["cross_entropy", "linear_cross_entropy"])
def test_untyped_axes_refuse_derivatives_of_weights_and_probabilities(name, wrt):
    """Derivatives w.r.t. the class weights or probability targets alone
    (the logits' tangent zero) are refused too."""
    probs = np.asarray(
        jax.nn.softmax(jnp.asarray(RNG.normal(size=(UNTYPED_N, UNTYPED_V)))),
        np.float32,
    )
    weight = RNG.uniform(0.5, 2.0, size=UNTYPED_V).astype(np.float32)

    def loss(x, w, t, c, p):
        target = p if wrt == "probabilities" else t
        if name == "cross_entropy":
            return jxent.cross_entropy(x @ w, target, c, batch_axis_name="a")
        return jxent.linear_cross_entropy(x, w, target, c, batch_axis_name="a")

    argnum = 3 if wrt == "weight" else 4
    mesh = _mesh((8,), ("a",))
    f = jax.jit(
        jax.shard_map(
            jax.grad(loss, argnums=argnum),
            mesh=mesh,
            in_specs=(P("a"), P(), P("a"), P(), P("a")),
            out_specs=P(),
            check_vma=False,
        )
    )
    with pytest.raises(ValueError, match=f"{name}: derivatives with batch_axis_name"):
        f(UNTYPED_X, UNTYPED_W, UNTYPED_T, weight, probs)
