"""The LM-head heads on 8 simulated CPU devices (sharded = unsharded).

Run by tests/test_linear_heads.py in a subprocess with
``XLA_FLAGS=--xla_force_host_platform_device_count=8``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding
from jax.sharding import PartitionSpec as P

import jxent

if jax.device_count() < 8:  # pragma: no cover - guarded by the runner
    pytest.skip("needs 8 (simulated) devices", allow_module_level=True)

MESHES = [((8,), ("model",)), ((2, 4), ("data", "model"))]
N, D, V = 16, 4, 32
RNG = np.random.default_rng(0)
X = RNG.integers(-1, 2, size=(N, D)).astype(np.float32)  # exact logits: ties
W = RNG.integers(-1, 2, size=(D, V)).astype(np.float32)
W[:, 29] = W[:, 3]  # tied columns on different shards
B = np.zeros(V, np.float32)
MASK = np.ones(V, bool)
MASK[[5, 20]] = False


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(AxisType.Auto,) * len(names))


@pytest.mark.parametrize(
    ("mesh_def", "masked"),
    [(MESHES[0], False), (MESHES[1], True)],
    ids=["8", "2x4-masked"],
)
def test_linear_argmax_shard_map(mesh_def, masked):
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None

    def local(x, w, b, m):
        return jxent.linear_argmax(
            x, w, bias=b, where=m if masked else None, chunk_size=3,
            vocab_chunk_size=3, class_axis_name="model", batch_axis_name=batch,
        )  # fmt: skip

    fn = jax.jit(
        jax.shard_map(
            local,
            mesh=mesh,
            in_specs=(P(batch), P(None, "model"), P("model"), P("model")),
            out_specs=P(batch),
        )
    )
    x = X.copy()
    x[2] = 0.0  # every logit 0: a tie across all shards, index 0
    got = fn(x, W, B, MASK)
    z = np.where(MASK, x @ W, -np.inf) if masked else x @ W
    np.testing.assert_array_equal(got, np.argmax(z, -1))
    assert (np.sum(z == z.max(-1, keepdims=True), -1) > 1).sum() >= 3


def test_linear_argmax_under_jit_with_named_shardings():
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Auto,) * 2)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    x, w = put(X, P("data")), put(W, P(None, "model"))
    got = jax.jit(lambda x, w: jxent.linear_argmax(x, w, chunk_size=4))(x, w)
    np.testing.assert_array_equal(got, np.argmax(X @ W, -1))


XF = RNG.normal(size=(N, D)).astype(np.float32)
WF = RNG.normal(size=(D, V)).astype(np.float32)
BF = RNG.normal(size=V).astype(np.float32)
TARGET = RNG.integers(0, V, size=N)
TARGET[[1, 6]] = -100
TARGET = np.where(np.isin(TARGET, [5, 20]), 0, TARGET)


@pytest.mark.parametrize(
    "mesh_def",
    [pytest.param(MESHES[1], id="2x4"),
     pytest.param(MESHES[0], id="8", marks=pytest.mark.full)],
)  # fmt: skip
def test_linear_log_probs_shard_map(mesh_def):
    """Values and gradients w.r.t. x, w, bias, temperature and soft_cap."""
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None
    ct = np.arange(1.0, N + 1.0, dtype=np.float32)
    kw = dict(where=MASK, return_entropy=True, chunk_size=3)

    def local(x, w, b, t, m, temperature, cap):
        return jxent.linear_log_probs(
            x, w, t, bias=b, temperature=temperature, soft_cap=cap,
            where=m, return_entropy=True, chunk_size=3,
            class_axis_name="model", batch_axis_name=batch,
        )  # fmt: skip

    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(batch), P(None, "model"), P("model"), P(batch), P("model"),
                  P(), P()),
        out_specs=(P(batch), P(batch)),
    )  # fmt: skip

    def total(f):
        def g(x, w, b, temperature, cap):
            lp, ent = f(x, w, b, temperature, cap)
            return jnp.sum(lp * ct) + jnp.sum(ent), (lp, ent)

        grads = jax.value_and_grad(g, argnums=(0, 1, 2, 3, 4), has_aux=True)
        return jax.jit(grads)(XF, WF, BF, 0.7, 3.0)

    (_, got), got_grads = total(
        lambda x, w, b, temp, cap: sharded(x, w, b, TARGET, MASK, temp, cap)
    )
    (_, want), want_grads = total(
        lambda x, w, b, temp, cap: jxent.linear_log_probs(
            x, w, TARGET, bias=b, temperature=temp, soft_cap=cap, **kw
        )
    )
    for a, b in zip(got, want, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-6, atol=2e-6)
    for a, b in zip(got_grads, want_grads, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


TX = RNG.normal(size=(N, 3)).astype(np.float32)  # the teacher's hidden size: 3
TW = RNG.normal(size=(3, V)).astype(np.float32)
TB = RNG.normal(size=V).astype(np.float32)


@pytest.mark.parametrize(
    ("mesh_def", "reduction"),
    [pytest.param(MESHES[1], "none", id="2x4-none"),
     pytest.param(MESHES[0], "mean", id="8-mean", marks=pytest.mark.full)],
)  # fmt: skip
def test_linear_distillation_loss_shard_map(mesh_def, reduction):
    """Values and gradients w.r.t. every floating input, beta traced."""
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None
    ct = np.arange(1.0, N + 1.0, dtype=np.float32) if reduction == "none" else 1.0

    def local(x, w, b, tx, tw, tb, t, temperature, beta):
        return jxent.linear_distillation_loss(
            x, w, tx, tw, t, bias=b, teacher_bias=tb, beta=beta,
            temperature=temperature, reduction=reduction, chunk_size=3,
            class_axis_name="model", batch_axis_name=batch,
        )  # fmt: skip

    vocab = P(None, "model")
    sharded = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(batch), vocab, P("model"), P(batch), vocab, P("model"),
                  P(batch), P(), P()),
        out_specs=P(batch) if reduction == "none" else P(),
    )  # fmt: skip

    def total(f):
        def g(*args):
            return jnp.sum(f(*args) * ct)

        grads = jax.value_and_grad(g, argnums=tuple(range(8)))
        return jax.jit(grads)(XF, WF, BF, TX, TW, TB, 1.3, 0.3)

    got = total(lambda *a: sharded(*a[:6], TARGET, *a[6:]))
    want = total(
        lambda x, w, b, tx, tw, tb, temperature, beta: jxent.linear_distillation_loss(
            x, w, tx, tw, TARGET, bias=b, teacher_bias=tb, beta=beta,
            temperature=temperature, reduction=reduction, chunk_size=3,
        )
    )  # fmt: skip
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for a, b in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-5)


def _explicit(x_spec, w_spec):
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    return lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))


@pytest.mark.parametrize(
    ("x_spec", "w_spec"),
    [(P("data"), P(None, "model")), (P(None, "model"), P())],
    ids=["tokens-vocab", "d-split"],
)
def test_heads_with_explicit_sharded_inputs(x_spec, w_spec):
    """x and w over Explicit mesh axes under jit, no axis names: the three
    heads run under shard_map as the inputs are split. Against the
    materialised heads in float64 (and numpy's argmax)."""
    put = _explicit(x_spec, w_spec)
    x, w, b = put(XF, x_spec), put(WF, w_spec), put(BF, P())
    tx, tw = put(TX, P("data")), put(TW, P(None, "model"))

    def heads(x, w, b, tx, tw):
        lp, ent = jxent.linear_log_probs(
            x, w, TARGET, bias=b, temperature=1.3, return_entropy=True, chunk_size=3
        )
        kl = jxent.linear_distillation_loss(
            x, w, tx, tw, TARGET, bias=b, beta=0.3, temperature=1.3, chunk_size=3
        )
        return jnp.sum(lp * np.arange(1.0, N + 1.0)) + jnp.sum(ent) + kl

    got = jax.jit(jax.value_and_grad(heads, argnums=(0, 1, 2, 3, 4)))(x, w, b, tx, tw)
    with jax.enable_x64(True):

        def reference(x, w, b, tx, tw):
            logits = x @ w + b[None, :]
            lp, ent = jxent.log_probs(
                logits, TARGET, temperature=1.3, return_entropy=True
            )
            kl = jxent.distillation_loss(
                logits, tx @ tw, TARGET, beta=0.3, temperature=1.3
            )
            return jnp.sum(lp * np.arange(1.0, N + 1.0)) + jnp.sum(ent) + kl

        want = jax.value_and_grad(reference, argnums=(0, 1, 2, 3, 4))(
            *(np.asarray(a, np.float64) for a in (XF, WF, BF, TX, TW))
        )
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for a, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
    greedy = jax.jit(lambda x, w: jxent.linear_argmax(x, w, chunk_size=3))(
        put(X, x_spec), put(W, w_spec)
    )
    np.testing.assert_array_equal(greedy, np.argmax(X @ W, -1))


@pytest.mark.parametrize(
    ("mesh_def", "beta"),
    [pytest.param(MESHES[0], 0.3, id="8-0.3"),
     pytest.param(MESHES[1], 0.0, id="2x4-0.0", marks=pytest.mark.full)],
)  # fmt: skip
def test_distillation_vocab_outer_shard_map(mesh_def, beta, monkeypatch):
    """The TPU/GPU gradients of linear_distillation_loss (class blocks,
    forced) inside shard_map, vocabulary over "model", tokens over "data":
    against the materialised loss in float64."""
    import jxent._linear

    monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)
    mesh = _mesh(*mesh_def)
    batch = "data" if "data" in mesh_def[1] else None

    def local(x, w, b, tx, tw, tb, t):
        return jxent.linear_distillation_loss(
            x, w, tx, tw, t, bias=b, teacher_bias=tb, beta=beta, temperature=1.3,
            chunk_size=3, vocab_chunk_size=3, class_axis_name="model",
            batch_axis_name=batch,
        )  # fmt: skip

    vocab = P(None, "model")
    fn = jax.shard_map(
        local, mesh=mesh,
        in_specs=(P(batch), vocab, P("model"), P(batch), vocab, P("model"),
                  P(batch)),
        out_specs=P(),
    )  # fmt: skip
    got = jax.jit(
        jax.value_and_grad(
            lambda x, w, b: fn(x, w, b, TX, TW, TB, TARGET), argnums=(0, 1, 2)
        )
    )(XF, WF, BF)
    with jax.enable_x64(True):
        want = jax.value_and_grad(
            lambda x, w, b: jxent.distillation_loss(
                x @ w + b[None, :], TX @ TW + TB[None, :], TARGET, beta=beta,
                temperature=1.3,
            ),
            argnums=(0, 1, 2),
        )(*(np.asarray(a, np.float64) for a in (XF, WF, BF)))  # fmt: skip
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for a, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())


def test_materialised_heads_with_explicit_sharded_logits():
    """log_probs (entropy, temperature, ignored positions) and
    distillation_loss on logits split over Explicit axes (rows and classes),
    under jit: against the same functions on float64 numpy inputs."""
    mesh = jax.make_mesh((2, 4), ("data", "model"), axis_types=(AxisType.Explicit,) * 2)
    put = lambda a, spec: jax.device_put(a, NamedSharding(mesh, spec))
    z_np = XF @ WF
    q_np = TX @ TW
    z, q = put(z_np, P("data", "model")), put(q_np, P("data", "model"))
    t = put(TARGET, P("data"))

    def heads(z, temperature, target, q):
        lp, ent = jxent.log_probs(
            z, target, temperature=temperature, return_entropy=True
        )
        kl = jxent.distillation_loss(z, q, target, beta=0.3, temperature=1.3)
        return jnp.sum(lp * np.arange(1.0, N + 1.0)) + jnp.sum(ent) + kl

    got = jax.jit(jax.value_and_grad(heads, argnums=(0, 1)))(z, 1.3, t, q)
    with jax.enable_x64(True):
        want = jax.value_and_grad(heads, argnums=(0, 1))(
            np.asarray(z_np, np.float64), 1.3, TARGET, np.asarray(q_np, np.float64)
        )
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for a, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5 * np.abs(r).max())
