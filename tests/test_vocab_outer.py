"""linear_cross_entropy's vocabulary-outer gradients (its TPU and GPU program).

Off the CPU, "mean"/"sum" gradients w.r.t. x, w and bias accumulate dw one
class block at a time. Here that order is forced on the CPU
(``jxent._linear._VOCAB_OUTER = True``) and checked against float64 oracles
(torch on the materialised logits, and a one-hot float64 definition for the
options torch lacks), with ragged token chunks and ragged class blocks.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only, x64
from jax.test_util import check_grads
from oracles import reference_cross_entropy, torch, torch_cross_entropy

import jxent
import jxent._linear

RNG = np.random.default_rng(17)
N, D, V = 11, 6, 13  # 11 tokens in chunks of 4; 13 classes in blocks of 4 or 5
X = RNG.normal(size=(N, D))
W = RNG.normal(size=(D, V)) * 0.7
BIAS = RNG.normal(size=V)
TARGET = RNG.integers(0, V, size=N)
TARGET[[2, 7]] = -100
WEIGHT = RNG.uniform(0.3, 2.0, size=V)
CLASS_MASK = np.ones(V, bool)
CLASS_MASK[[4, 9]] = False
TARGET = np.where(np.isin(TARGET, [4, 9]), 0, TARGET)
ROW_MASK = np.ones((N, V), bool)
ROW_MASK[3, [1, 2]] = False
ROW_MASK[5, 11] = False
TARGET[3], TARGET[5] = 0, 3

OPTIONS = [
    {},
    {"weight": WEIGHT, "label_smoothing": 0.1},
    {"z_loss": 1e-2, "soft_cap": 2.0},
    {"where": CLASS_MASK, "label_smoothing": 0.2, "weight": WEIGHT},
    {"where": ROW_MASK, "z_loss": 1e-3, "label_smoothing": 0.1},
    {"weight": WEIGHT, "label_smoothing": 0.3, "z_loss": 1e-2, "soft_cap": 3.0,
     "where": CLASS_MASK},
]  # fmt: skip


@pytest.fixture(autouse=True)
def vocab_outer(monkeypatch):
    monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)


def _float64_reference(kw, reduction, with_bias):
    """Value and (dx, dw, dbias) of the one-hot float64 definition."""
    with x64():

        def loss(x, w, b):
            logits = x @ w + (b[None, :] if with_bias else 0.0)
            return reference_cross_entropy(logits, TARGET, reduction=reduction, **kw)[0]

        args = (X, W, BIAS)
        return jax.value_and_grad(loss, argnums=(0, 1, 2))(*args)


def _fused(kw, reduction, with_bias, chunks):
    """Value and gradients of the fused loss for every (chunk, block) pair."""

    @jax.jit
    def run(x, w, b):
        out = []
        for chunk, block in chunks:

            def loss(x, w, b, chunk=chunk, block=block):
                return jxent.linear_cross_entropy(
                    x, w, TARGET, bias=b if with_bias else None, reduction=reduction,
                    chunk_size=chunk, vocab_chunk_size=block, **kw,
                )  # fmt: skip

            out.append(jax.value_and_grad(loss, argnums=(0, 1, 2))(x, w, b))
        return out

    return run(*(jnp.asarray(a, jnp.float32) for a in (X, W, BIAS)))


# Ragged chunks and blocks (4 tokens, 5 classes: the last block shifted), a
# block dividing nothing, whole rows, and the defaults.
CHUNKS = ((4, 5), (3, 4), (11, 13), (None, None))


# CI: each option set once, the reductions alternating; pytest --full both.
@pytest.mark.parametrize(
    ("option", "reduction"),
    [
        (o, r) if (o + (r == "sum")) % 2 == 0 else full_only(o, r)
        for o in range(len(OPTIONS))
        for r in ("mean", "sum")
    ],
)
def test_matches_float64_definition(option, reduction):
    kw = OPTIONS[option]
    with_bias = option % 2 == 0
    kw32 = {k: np.float32(v) if isinstance(v, float) else v for k, v in kw.items()}
    if "weight" in kw32:
        kw32["weight"] = kw32["weight"].astype(np.float32)
    ref_value, ref_grads = _float64_reference(kw, reduction, with_bias)
    for (chunk, block), (value, grads) in zip(
        CHUNKS, _fused(kw32, reduction, with_bias, CHUNKS), strict=True
    ):
        msg = f"chunk {chunk}, block {block}"
        np.testing.assert_allclose(value, ref_value, rtol=2e-6, err_msg=msg)
        for name, g, r in zip(("dx", "dw", "dbias"), grads, ref_grads, strict=True):
            if name == "dbias" and not with_bias:
                continue
            scale = np.max(np.abs(r))
            np.testing.assert_allclose(
                g, r, rtol=1e-5, atol=1e-6 * scale, err_msg=f"{name}, {msg}"
            )


@pytest.mark.skipif(torch is None, reason="torch oracle not installed")
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_matches_torch(dtype, reduction):
    """torch F.cross_entropy on the float64 logits of the rounded inputs;
    dx = g wᵀ and dw = xᵀ g from torch's logits gradient g."""
    x = jnp.asarray(X, dtype)
    w = jnp.asarray(W, dtype)
    kw = {"weight": WEIGHT.astype(np.float32), "label_smoothing": 0.1}

    def loss(x, w):
        return jxent.linear_cross_entropy(
            x, w, TARGET, reduction=reduction, chunk_size=4, vocab_chunk_size=5,
            **kw,
        )  # fmt: skip

    value, (dx, dw) = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(x, w)
    assert dx.dtype == dtype and dw.dtype == dtype
    x64_, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    ref, g = torch_cross_entropy(
        x64_ @ w64, TARGET, WEIGHT.astype(np.float32).astype(np.float64),
        reduction=reduction, label_smoothing=0.1,
    )  # fmt: skip
    rtol = 1e-5 if dtype == jnp.float32 else 1e-2
    np.testing.assert_allclose(float(value), ref, rtol=rtol)
    for got, want in ((dx, g @ w64.T), (dw, x64_.T @ g)):
        got = np.asarray(got, np.float64)
        np.testing.assert_allclose(got, want, rtol=rtol, atol=rtol * np.abs(want).max())


def test_bfloat16_dw_is_accumulated_in_float32():
    """Each block's dw is summed over all 64 token chunks in float32 and
    rounded once: within one bfloat16 ulp of the float64 gradient. Coherent
    sums (positive x, targets among four classes) keep every entry far from
    0; a bfloat16 running sum is off by about 5 ulp here."""
    rng = np.random.default_rng(1024)
    n, d, v = 1024, 16, 32
    x = jnp.asarray(np.abs(rng.normal(size=(n, d))), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.bfloat16)
    t = rng.integers(0, 4, size=n)

    def loss(w):
        return jxent.linear_cross_entropy(x, w, t, chunk_size=16, vocab_chunk_size=8)

    dw = jax.jit(jax.grad(loss))(w)
    assert dw.dtype == jnp.bfloat16
    x64_, w64 = np.asarray(x, np.float64), np.asarray(w, np.float64)
    _, g = torch_cross_entropy(x64_ @ w64, t)
    want = x64_.T @ g
    ulp = 2.0 ** (np.floor(np.log2(np.abs(want))) - 7)  # bfloat16's at |want|
    assert (np.abs(np.asarray(dw, np.float64) - want) / ulp).max() <= 1.0


@pytest.mark.parametrize("reduction", ["mean"])  # "sum": order 1 elsewhere
def test_check_grads_forward_and_reverse_order_2(reduction):
    with x64():
        kw = {"weight": WEIGHT, "label_smoothing": 0.2, "z_loss": 1e-2,
              "soft_cap": 3.0, "where": CLASS_MASK}  # fmt: skip

        def loss(x, w, b):
            return jxent.linear_cross_entropy(
                x, w, TARGET, bias=b, reduction=reduction, chunk_size=4,
                vocab_chunk_size=5, **kw,
            )  # fmt: skip

        check_grads(
            jax.jit(loss), (X, W, BIAS), order=2, modes=("fwd", "rev"),
            atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def test_batched_tokens_and_vmap():
    x = jnp.asarray(X[:10].reshape(2, 5, D), jnp.float32)
    w = jnp.asarray(W, jnp.float32)
    t = TARGET[:10].reshape(2, 5)

    def fused(x, w, t):
        return jxent.linear_cross_entropy(x, w, t, chunk_size=3, vocab_chunk_size=4)

    per_example = jax.jit(jax.vmap(jax.grad(fused, argnums=(0, 1)), (0, None, 0)))
    dx, dw = per_example(x, w, t)
    with x64():
        for i in range(2):
            ref = jax.grad(
                lambda x, w, i=i: reference_cross_entropy(x @ w, t[i])[0],
                argnums=(0, 1),
            )(np.asarray(x[i], np.float64), np.asarray(w, np.float64))
            np.testing.assert_allclose(dx[i], ref[0], rtol=1e-5, atol=1e-7)
            np.testing.assert_allclose(dw[i], ref[1], rtol=1e-5, atol=1e-7)
    whole = jax.jit(jax.grad(fused, argnums=(0, 1)))(x, w, t)
    with x64():
        ref = jax.grad(
            lambda x, w: reference_cross_entropy(x @ w, t.reshape(-1))[0],
            argnums=(0, 1),
        )(np.asarray(x, np.float64).reshape(-1, D), np.asarray(w, np.float64))
    np.testing.assert_allclose(whole[0].reshape(-1, D), ref[0], rtol=1e-5, atol=1e-7)
    np.testing.assert_allclose(whole[1], ref[1], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("bad", [V, -1])
@pytest.mark.parametrize("reduction", ["mean", "sum"])
def test_bad_target_poisons_loss_and_every_gradient(bad, reduction):
    t = jnp.asarray(TARGET).at[4].set(bad)

    def loss(x, w, b, t):
        return jxent.linear_cross_entropy(
            x, w, t, bias=b, reduction=reduction, chunk_size=4, vocab_chunk_size=5
        )

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2)))(
        *(jnp.asarray(a, jnp.float32) for a in (X, W, BIAS)), t
    )
    assert np.isnan(value)
    for g in grads:
        assert np.all(np.isnan(g))


def test_gradients_of_the_options_take_the_token_outer_order():
    """d/d label_smoothing (or weight, z_loss, soft_cap) is not a block-wise
    sum: those gradients come from the other order, and are still exact."""
    with x64():

        def loss(eps, x, w):
            return jxent.linear_cross_entropy(
                x, w, TARGET, label_smoothing=eps, chunk_size=4, vocab_chunk_size=5
            )

        def ref(eps, x, w):
            return reference_cross_entropy(x @ w, TARGET, label_smoothing=eps)[0]

        got = jax.grad(loss, argnums=(0, 1, 2))(0.2, X, W)
        want = jax.grad(ref, argnums=(0, 1, 2))(0.2, X, W)
        for g, r in zip(got, want, strict=True):
            np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12)


def test_block_sizes():
    sizes = jxent._linear._block_sizes
    # (row chunk, block tokens, block classes): whole-row float32 tiles of at
    # most 256 MiB and a sixteenth of the tokens (at least 32 MiB), 32 MiB
    # block tiles (linear_cross_entropy's: 128 MiB), a 64 MiB float32 dw
    # block, a block that divides V when a multiple of 128 does.
    assert sizes(8192, 4096, 131072, None, None) == (512, 2048, 4096)
    assert sizes(8192, 2304, 256000, None, None) == (256, 2048, 3200)
    assert sizes(8192, 8192, 131072, None, None) == (512, 4096, 2048)
    assert sizes(2048, 4096, 131072, None, None) == (128, 2048, 4096)
    assert sizes(1024, 4096, 131072, None, None) == (64, 1024, 4096)
    assert sizes(32768, 4096, 131072, None, None) == (512, 2048, 4096)
    loss_tiles = {"tile_bytes": jxent._linear._LOSS_BLOCK_TILE_BYTES}
    assert sizes(8192, 4096, 131072, None, None, **loss_tiles) == (512, 8192, 4096)
    assert sizes(32768, 2304, 256000, None, None, **loss_tiles)[1] == 8192
    per_token = {"per_token": True}  # the heads' per-token blocks: 32 MiB rows
    assert sizes(8192, 4096, 131072, None, None, **per_token) == (64, 1024, 8192)
    assert sizes(8192, 4096, 50257, None, None)[2] == 4096  # shifted last block
    # linear_cross_entropy asks for its own block tiles.
    asked = []

    def spy(*args, **kwargs):
        asked.append(kwargs.get("tile_bytes"))
        return sizes(*args, **kwargs)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(jxent._linear, "_block_sizes", spy)
        x = jax.ShapeDtypeStruct((8, 4), jnp.float32)
        w = jax.ShapeDtypeStruct((4, 16), jnp.float32)
        t = jax.ShapeDtypeStruct((8,), jnp.int32)
        jax.eval_shape(jxent.linear_cross_entropy, x, w, t)
    assert asked == [jxent._linear._LOSS_BLOCK_TILE_BYTES]
    assert sizes(100, 64, 1000, None, None) == (100, 100, 1000)
    assert sizes(8192, 4096, 131072, 512, 1000) == (512, 512, 1000)


# linear_distillation_loss: the heads' tile math, class blocks by its
# reductions' cotangents (jxent._linear._head_vocab_outer_gradients).
TX = RNG.normal(size=(N, 5))  # the teacher's own hidden size
TW = RNG.normal(size=(5, V))
TB = RNG.normal(size=V)


def _distillation(beta, reduction, x, w, b, fused=True):
    if fused:
        return jxent.linear_distillation_loss(
            x, w, TX, TW, TARGET, bias=b, teacher_bias=TB, beta=beta,
            temperature=1.7, reduction=reduction, chunk_size=4, vocab_chunk_size=5,
        )  # fmt: skip
    return jxent.distillation_loss(
        x @ w + b[None, :], TX @ TW + TB[None, :], TARGET, beta=beta,
        temperature=1.7, reduction=reduction,
    )  # fmt: skip


@pytest.mark.parametrize(
    ("beta", "reduction"),
    [(0.0, "mean"), (1.0, "sum"), (0.4, "mean"), full_only(0.0, "sum"),
     full_only(1.0, "mean"), full_only(0.4, "sum")],
)  # fmt: skip
def test_distillation_matches_float64_materialised(beta, reduction):
    """Against distillation_loss on float64 logits (itself checked against
    torch's kl_div and a float64 definition in tests/test_rl.py)."""
    with x64():
        want = jax.value_and_grad(
            lambda x, w, b: _distillation(beta, reduction, x, w, b, fused=False),
            argnums=(0, 1, 2),
        )(X, W, BIAS)
    got = jax.jit(
        jax.value_and_grad(
            lambda x, w, b: _distillation(beta, reduction, x, w, b), argnums=(0, 1, 2)
        )
    )(*(jnp.asarray(a, jnp.float32) for a in (X, W, BIAS)))
    np.testing.assert_allclose(got[0], want[0], rtol=2e-6)
    for g, r in zip(got[1], want[1], strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())


@pytest.mark.full  # order 2 of the class blocks: the CE's and log-probs' in CI
def test_distillation_check_grads_order_2():
    with x64():
        check_grads(
            jax.jit(lambda x, w, b: _distillation(0.4, "mean", x, w, b)),
            (X, W, BIAS), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5,
        )  # fmt: skip


def test_distillation_bad_target_poisons_every_gradient():
    t = jnp.asarray(TARGET).at[3].set(V)  # traced: NaN, not an error

    def loss(x, w, t):
        return jxent.linear_distillation_loss(
            x, w, TX, TW, t, chunk_size=4, vocab_chunk_size=5
        )

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        jnp.asarray(X, jnp.float32), jnp.asarray(W, jnp.float32), t
    )
    assert np.isnan(value)
    for g in grads:
        assert np.all(np.isnan(g))


# Per-token heads (linear_log_probs, linear_distillation_loss "none"): the
# tangents go class block by class block, so that reverse mode is the
# vocabulary-outer gradient (jxent._linear._per_token_block_tangents): 12
# classes in blocks of 4 (or 5, the last one shifted), 11 tokens in chunks of 4.
VP = 12
WP = RNG.normal(size=(D, VP)) * 0.8
BIAS_P = RNG.normal(size=VP)
TARGET_P = RNG.integers(0, VP, size=N)
TARGET_P[[1, 8]] = -100
CLASS_MASK_P = np.ones(VP, bool)
CLASS_MASK_P[[2, 10]] = False
ROW_MASK_P = np.ones((N, VP), bool)
ROW_MASK_P[4, [0, 5, 6]] = False
TARGET_P = np.where(np.isin(TARGET_P, [2, 10]), 1, TARGET_P)
TARGET_P[4] = 3
COTANGENT_LP = RNG.normal(size=N)  # per-token weights (advantages)
COTANGENT_ENT = RNG.normal(size=N)

LOG_PROB_OPTIONS = [
    {},
    {"temperature": 0.7, "soft_cap": 2.5},
    {"where": CLASS_MASK_P, "temperature": 1.3},
    {"where": ROW_MASK_P, "soft_cap": 3.0},
]


def _log_probs_reference(x, w, b, temperature=1.0, soft_cap=None, where=None):
    """float64 ``log_softmax(z)[target]`` and the entropy, 0 where ignored."""
    z = x @ w + b[None, :]
    if soft_cap is not None:
        z = soft_cap * jnp.tanh(z / soft_cap)
    z = z / temperature
    if where is not None:
        z = jnp.where(jnp.broadcast_to(where, z.shape), z, -jnp.inf)
    log_p = jax.nn.log_softmax(z, axis=-1)
    safe = jnp.where(jnp.isfinite(log_p), log_p, 0.0)
    entropy = -jnp.sum(jnp.exp(log_p) * safe, axis=-1)
    valid = TARGET_P != -100
    picked = jnp.take_along_axis(safe, np.maximum(TARGET_P, 0)[:, None], axis=-1)
    return jnp.where(valid, picked[:, 0], 0.0), jnp.where(valid, entropy, 0.0)


def _weighted(pair):
    if not isinstance(pair, tuple):  # the log-probabilities alone
        return jnp.sum(pair * COTANGENT_LP)
    lp, ent = pair
    return jnp.sum(lp * COTANGENT_LP) + jnp.sum(ent * COTANGENT_ENT)


def _fused_log_probs(x, w, b, kw, block=4, entropy=True):
    return jxent.linear_log_probs(
        x, w, TARGET_P, bias=b, return_entropy=entropy, chunk_size=4,
        vocab_chunk_size=block, **kw,
    )  # fmt: skip


def _reference_log_probs(x, w, b, entropy=True, **kw):
    pair = _log_probs_reference(x, w, b, **kw)
    return pair if entropy else pair[0]


# The log-probabilities alone form their dx through a primal matmul
# (jxent._linear._primal_dx_tangent); with the entropy, in float32, through
# the tangents' transpose (bfloat16 on the CPU: the primal matmuls again).
# CI: each option set with the entropy (blocks of 4 and 5 alternating) and
# two without; pytest --full every combination.
@pytest.mark.parametrize(
    ("option", "block", "entropy"),
    [
        (o, b, True) if b == 4 + o % 2 else full_only(o, b, True)
        for o in range(len(LOG_PROB_OPTIONS))
        for b in (4, 5)
    ]
    + [
        (o, 5, False) if o in (0, 3) else full_only(o, 5, False)
        for o in range(len(LOG_PROB_OPTIONS))
    ],
)
def test_log_probs_per_token_blocks_match_float64(option, block, entropy):
    """Values, and the gradients of a per-token weighted sum (what RL losses
    take) w.r.t. x, w and bias, against the float64 definition."""
    kw = LOG_PROB_OPTIONS[option]
    with x64():
        want_values = _log_probs_reference(X, WP, BIAS_P, **kw)
        want = jax.grad(
            lambda x, w, b: _weighted(_reference_log_probs(x, w, b, entropy, **kw)),
            argnums=(0, 1, 2),
        )(X, WP, BIAS_P)
    args = tuple(jnp.asarray(a, jnp.float32) for a in (X, WP, BIAS_P))
    values = jax.jit(lambda x, w, b: _fused_log_probs(x, w, b, kw, block))(*args)
    got = jax.jit(
        jax.grad(
            lambda x, w, b: _weighted(_fused_log_probs(x, w, b, kw, block, entropy)),
            (0, 1, 2),
        )
    )(*args)
    for v, r in zip(values, want_values, strict=True):
        np.testing.assert_allclose(v, r, rtol=2e-6, atol=2e-6)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())


# CI: the log-probabilities alone (their own dx tangent); with the entropy,
# order 2 on the CPU's path is in tests/test_linear_heads.py, here with
# pytest --full.
@pytest.mark.parametrize("entropy", [False, full_only(True)])
def test_log_probs_per_token_blocks_check_grads_order_2(entropy):
    """Forward and reverse mode to order 2 through the block tangents."""
    kw = {"temperature": 0.8, "soft_cap": 3.0}
    with x64():
        check_grads(
            jax.jit(
                lambda x, w, b: _weighted(_fused_log_probs(x, w, b, kw, 4, entropy))
            ),
            (X, WP, BIAS_P), order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5,
        )  # fmt: skip


@pytest.mark.parametrize("entropy", [True, False])
def test_log_probs_per_token_blocks_bfloat16_against_float64(monkeypatch, entropy):
    """Unforced, the per-token tangents go by class blocks on every platform
    (a float32 dw of the head's size would be twice a 16-bit w): bfloat16
    gradients within bfloat16 rounding of the float64 definition."""
    monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", None)

    def token_outer(*args):
        raise AssertionError("16-bit per-token tangents took the token chunks")

    monkeypatch.setattr(jxent._linear, "_per_token_chunk_tangents", token_outer)
    args = rounded = tuple(jnp.asarray(a, jnp.bfloat16) for a in (X, WP, BIAS_P))
    with x64():
        want = jax.grad(
            lambda x, w, b: _weighted(_reference_log_probs(x, w, b, entropy)),
            argnums=(0, 1, 2),
        )(*(np.asarray(a, np.float64) for a in rounded))
    got = jax.jit(
        jax.grad(
            lambda x, w, b: _weighted(_fused_log_probs(x, w, b, {}, 4, entropy)),
            (0, 1, 2),
        )
    )(*args)
    for g, r in zip(got, want, strict=True):
        assert g.dtype == jnp.bfloat16
        np.testing.assert_allclose(
            np.asarray(g, np.float64), r, rtol=2e-2, atol=1e-2 * np.abs(r).max()
        )
    # Forward mode, every input's tangent at once (on the CPU the blocks of a
    # 16-bit w's tangent are scanned over, stacked).
    tangents = tuple(
        jnp.asarray(RNG.normal(size=a.shape), jnp.bfloat16) for a in rounded
    )
    with x64():
        _, want_t = jax.jvp(
            lambda x, w, b: _weighted(_reference_log_probs(x, w, b, entropy)),
            tuple(np.asarray(a, np.float64) for a in rounded),
            tuple(np.asarray(t, np.float64) for t in tangents),
        )
    _, got_t = jax.jit(
        lambda a, t: jax.jvp(
            lambda x, w, b: _weighted(_fused_log_probs(x, w, b, {}, 4, entropy)), a, t
        )
    )(args, tangents)
    np.testing.assert_allclose(float(got_t), float(want_t), rtol=2e-2)


def test_distillation_per_token_blocks_match_float64():
    """reduction="none" (per-token divergences) with per-token cotangents."""

    def per_token(x, w, b, fused):
        if fused:
            return jxent.linear_distillation_loss(
                x, w, TX, TW[:, :VP], TARGET_P, bias=b, teacher_bias=TB[:VP],
                beta=0.4, temperature=1.3, reduction="none", chunk_size=4,
                vocab_chunk_size=4,
            )  # fmt: skip
        return jxent.distillation_loss(
            x @ w + b[None, :], TX @ TW[:, :VP] + TB[None, :VP], TARGET_P,
            beta=0.4, temperature=1.3, reduction="none",
        )  # fmt: skip

    with x64():
        want = jax.grad(
            lambda x, w, b: jnp.sum(per_token(x, w, b, False) * COTANGENT_LP),
            argnums=(0, 1, 2),
        )(X, WP, BIAS_P)
    args = tuple(jnp.asarray(a, jnp.float32) for a in (X, WP, BIAS_P))
    got = jax.jit(
        jax.grad(
            lambda x, w, b: jnp.sum(per_token(x, w, b, True) * COTANGENT_LP),
            argnums=(0, 1, 2),
        )
    )(*args)
    for g, r in zip(got, want, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())


@pytest.mark.parametrize("entropy", [True, False])
def test_log_probs_bad_target_poisons_every_gradient_per_token(entropy):
    t = jnp.asarray(TARGET_P).at[6].set(VP)  # traced: NaN, not an error

    def loss(x, w, t):
        out = jxent.linear_log_probs(
            x, w, t, return_entropy=entropy, chunk_size=4, vocab_chunk_size=4
        )
        lp, ent = out if entropy else (out, 0.0)
        return jnp.sum(lp * COTANGENT_LP) + jnp.sum(ent)

    value, grads = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))(
        jnp.asarray(X, jnp.float32), jnp.asarray(WP, jnp.float32), t
    )
    assert np.isnan(value)
    for g in grads:
        assert np.any(np.isnan(g))
