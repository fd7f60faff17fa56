"""linear_cross_entropy against cross_entropy on materialised logits and torch."""

from __future__ import annotations

import functools
import itertools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from benchmark_modules import load_benchmark
from conftest import full_only, x64
from jax.test_util import check_grads
from oracles import record_deviation, torch

import jxent
import jxent._linear

RNG = np.random.default_rng(5)
N, D, V = 11, 6, 13  # N and V not multiples of the chunks used below
X = RNG.normal(size=(N, D)).astype(np.float32)
W = (RNG.normal(size=(D, V)) * 0.7).astype(np.float32)
BIAS = RNG.normal(size=V).astype(np.float32)
TARGET = RNG.integers(0, V, size=N)
TARGET[[2, 7]] = -100
WEIGHT = RNG.uniform(0.3, 2.0, size=V).astype(np.float32)
CLASS_MASK = np.ones(V, bool)
CLASS_MASK[[4, 9]] = False
TARGET = np.where(np.isin(TARGET, [4, 9]), 0, TARGET)
ROW_MASK = np.ones((N, V), bool)
ROW_MASK[3, [1, 2]] = False
ROW_MASK[5, 11] = False
TARGET[3] = 0
TARGET[5] = 3


def _variants(kw, with_bias, chunk_size, reduction, target):
    """(fused with lse, fused without lse, materialised) summed-loss functions."""
    ct = (
        jnp.arange(1.0, target.size + 1.0).reshape(target.shape)
        if reduction == "none"
        else 1.0
    )

    def fused(x, w, b):
        loss, lse = jxent.linear_cross_entropy(
            x, w, target, bias=b if with_bias else None, reduction=reduction,
            chunk_size=chunk_size, return_lse=True, **kw,
        )  # fmt: skip
        return jnp.sum(loss * ct), (loss, lse)

    def fused_no_lse(x, w, b):
        loss = jxent.linear_cross_entropy(
            x, w, target, bias=b if with_bias else None, reduction=reduction,
            chunk_size=chunk_size, **kw,
        )  # fmt: skip
        return jnp.sum(loss * ct), (loss, loss)

    def reference(x, w, b):
        logits = jnp.einsum("...d,dv->...v", x, w)
        if with_bias:
            logits = logits + b.reshape((1,) * (logits.ndim - 1) + b.shape)
        loss, lse = jxent.cross_entropy(
            logits, target, reduction=reduction, return_lse=True, **kw
        )
        return jnp.sum(loss * ct), (loss, lse)

    return fused, fused_no_lse, reference


def _all_values_and_grads(kw, with_bias, chunk_size, x, w, bias, target):
    """Every variant and reduction, compiled as one program."""

    @jax.jit
    def run(x, w, b):
        out = {}
        for reduction in ("none", "mean", "sum"):
            fns = _variants(kw, with_bias, chunk_size, reduction, target)
            out[reduction] = [
                jax.value_and_grad(f, argnums=(0, 1, 2), has_aux=True)(x, w, b)
                for f in fns
            ]
        return out

    return run(x, w, bias)


OPTIONS = [
    {},
    {"weight": WEIGHT, "label_smoothing": 0.1},
    {"z_loss": 1e-2, "soft_cap": 2.0},
    {"where": CLASS_MASK, "label_smoothing": 0.2, "weight": WEIGHT},
    {"where": ROW_MASK, "z_loss": 1e-3, "label_smoothing": 0.1},
    {"weight": WEIGHT, "label_smoothing": 0.3, "z_loss": 1e-2, "soft_cap": 3.0,
     "where": CLASS_MASK},
]  # fmt: skip
# Every option set, with and without bias, chunks of 4 tokens (ragged: N = 11);
# two sets also with the default chunk (one chunk). Sets 1 and 2 are parts of
# set 5: pytest --full only.
GRID = [
    (i, i % 2 == 1, 4) if i not in (1, 2) else full_only(i, i % 2 == 1, 4)
    for i in range(len(OPTIONS))
] + [(0, True, None), (5, False, None)]


@pytest.mark.parametrize(("option", "with_bias", "chunk"), GRID)
def test_matches_materialised_cross_entropy(option, with_bias, chunk):
    out = _all_values_and_grads(OPTIONS[option], with_bias, chunk, X, W, BIAS, TARGET)
    for reduction, results in out.items():
        (_, (loss, lse)), grads = results[0]
        (value2, (loss2, _)), grads2 = results[1]
        (ref_value, (ref_loss, ref_lse)), ref_grads = results[2]
        np.testing.assert_allclose(loss, ref_loss, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(loss2, ref_loss, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(value2, ref_value, rtol=2e-6, atol=2e-6)
        np.testing.assert_allclose(lse, ref_lse, rtol=2e-6, atol=2e-6)
        names = ("dx", "dw", "dbias")
        for name, g, g2, ref in zip(names, grads, grads2, ref_grads, strict=True):
            if name == "dbias" and not with_bias:
                continue
            msg = f"{name} {reduction}"
            np.testing.assert_allclose(g, ref, rtol=1e-5, atol=1e-6, err_msg=msg)
            np.testing.assert_allclose(g2, ref, rtol=1e-5, atol=1e-6, err_msg=msg)


def test_float64_equals_materialised_to_rounding():
    with jax.enable_x64(True):
        x, w, b = (a.astype(np.float64) for a in (X, W, BIAS))
        kw = {"weight": WEIGHT.astype(np.float64), "label_smoothing": 0.1,
              "z_loss": 1e-2, "soft_cap": 2.0}  # fmt: skip
        fused, _, ref = _all_values_and_grads(kw, True, 3, x, w, b, TARGET)["mean"]
        np.testing.assert_allclose(fused[0][0], ref[0][0], rtol=1e-13)
        for g, r in zip(fused[1], ref[1], strict=True):
            assert g.dtype == jnp.float64
            np.testing.assert_allclose(g, r, rtol=1e-12, atol=1e-15)


def test_batched_input_and_blocked_dw(monkeypatch):
    """(B, T, D) input; tiny dw blocks exercise the ragged last block."""
    monkeypatch.setattr(jxent._linear, "_DW_BLOCK_BYTES", 4 * D * 5)  # 5 columns
    x = X[:10].reshape(2, 5, D)
    t = TARGET[:10].reshape(2, 5)
    (value, _), grads = jax.value_and_grad(
        lambda x, w: (jxent.linear_cross_entropy(x, w, t, chunk_size=3), 0),
        argnums=(0, 1), has_aux=True,
    )(x, W)  # fmt: skip
    ref_value, ref_grads = jax.value_and_grad(
        lambda x, w: jxent.cross_entropy(jnp.einsum("btd,dv->btv", x, w), t),
        argnums=(0, 1),
    )(x, W)
    np.testing.assert_allclose(value, ref_value, rtol=2e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-7)


def test_bfloat16_inputs_accumulate_in_float32():
    x16, w16 = jnp.asarray(X, jnp.bfloat16), jnp.asarray(W, jnp.bfloat16)
    value, grads = jax.value_and_grad(
        lambda x, w: jxent.linear_cross_entropy(x, w, TARGET, chunk_size=4),
        argnums=(0, 1),
    )(x16, w16)
    assert value.dtype == jnp.bfloat16
    assert grads[0].dtype == jnp.bfloat16 and grads[1].dtype == jnp.bfloat16
    x32, w32 = x16.astype(jnp.float32), w16.astype(jnp.float32)
    ref_value, ref_grads = jax.value_and_grad(
        lambda x, w: jxent.cross_entropy(x @ w, TARGET), argnums=(0, 1)
    )(x32, w32)
    np.testing.assert_allclose(float(value), float(ref_value), rtol=1e-2)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(
            np.asarray(g, np.float32), r, rtol=2e-2, atol=2e-2 * float(jnp.abs(r).max())
        )


def test_compiled_program_holds_no_logits_sized_buffer():
    n, d, v = 1024, 32, 4096  # logits: 16 MiB in float32
    x = jnp.zeros((n, d))
    w = jnp.zeros((d, v))
    t = jnp.zeros((n,), jnp.int32)
    logits_bytes = n * v * 4
    for reduction in ("mean", "none"):
        fn = jax.jit(
            jax.value_and_grad(
                lambda x, w, r=reduction: jnp.sum(
                    jxent.linear_cross_entropy(x, w, t, reduction=r, chunk_size=64)
                ),
                argnums=(0, 1),
            )
        )
        temp = fn.lower(x, w).compile().memory_analysis().temp_size_in_bytes
        assert temp < logits_bytes / 4, (reduction, temp)
    naive = jax.jit(
        jax.value_and_grad(lambda x, w: jxent.cross_entropy(x @ w, t), argnums=(0, 1))
    )
    assert naive.lower(x, w).compile().memory_analysis().temp_size_in_bytes >= (
        logits_bytes
    )


def _temporaries(fn, *args) -> int:
    return jax.jit(fn).lower(*args).compile().memory_analysis().temp_size_in_bytes


def _tied_head_losses(n=256, d=64, v=8192):
    """The loss of a tied (D, V) matrix, given as it is and as a transpose."""
    t = jnp.asarray(np.random.default_rng(0).integers(0, v, n))
    tiles = {"chunk_size": 64, "vocab_chunk_size": 1024}

    def given(x, w):
        return jxent.linear_cross_entropy(x, w, t, **tiles)

    def transposed(x, embedding):  # embedding: (V, D), the PyTorch layout
        return jxent.linear_cross_entropy(x, embedding.T, t, **tiles)

    return given, transposed, (n, d, v)


@pytest.mark.xfail(
    strict=True,
    reason="w given as a transpose (embedding.T): XLA copies the whole of w "
    "before the loops slice it (docs/language_models.md, 'Tied embeddings')",
)
def test_w_given_as_a_transpose_holds_no_copy_of_w():
    given, transposed, (n, d, v) = _tied_head_losses()
    x = jnp.zeros((n, d))
    plain = _temporaries(
        jax.value_and_grad(given, argnums=(0, 1)), x, jnp.zeros((d, v))
    )
    as_transpose = _temporaries(
        jax.value_and_grad(transposed, argnums=(0, 1)), x, jnp.zeros((v, d))
    )
    assert as_transpose < plain + d * v * 4 / 4, (plain, as_transpose)


def test_tied_embedding_kept_as_d_by_v_holds_no_copy_of_w():
    # The docs' advice for tied embeddings: the matrix as a (D, V) parameter,
    # tokens embedded by gathering its columns. Same loss and gradient as the
    # (V, D) embedding, computed here from the materialised logits, and no
    # copy of w in the program.
    _, _, (n, d, v) = _tied_head_losses()
    rng = np.random.default_rng(1)
    tokens = jnp.asarray(rng.integers(0, v, n))
    target = jnp.roll(tokens, -1)
    w = jnp.asarray(0.1 * rng.normal(size=(d, v)), jnp.float32)
    tiles = {"chunk_size": 64, "vocab_chunk_size": 1024}

    def fused(w):
        hidden = jnp.tanh(jnp.moveaxis(jnp.take(w, tokens, axis=1), 0, -1))
        return jxent.linear_cross_entropy(hidden, w, target, **tiles)

    def materialised(embedding):  # (V, D), float64
        hidden = jnp.tanh(embedding[tokens])
        logits = hidden @ embedding.T
        lse = jax.nn.logsumexp(logits, axis=-1)
        return jnp.mean(lse - jnp.take_along_axis(logits, target[:, None], 1)[:, 0])

    value, grad = jax.value_and_grad(fused)(w)
    with x64():
        ref_value, ref_grad = jax.value_and_grad(materialised)(
            jnp.asarray(np.asarray(w).T, jnp.float64)
        )
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    np.testing.assert_allclose(grad, np.asarray(ref_grad).T, rtol=1e-5, atol=1e-7)
    given, _, _ = _tied_head_losses()
    plain = _temporaries(
        jax.value_and_grad(given, argnums=(0, 1)), jnp.zeros((n, d)), w
    )
    assert _temporaries(jax.value_and_grad(fused), w) < plain + d * v * 4 / 4


def _sequence_batch(b=8, s=64, d=16, v=4096):
    rng = np.random.default_rng(2)
    x = jnp.asarray(rng.normal(size=(b, s, d)), jnp.float32)
    w = jnp.asarray(rng.normal(size=(d, v)) * 0.3, jnp.float32)
    t = jnp.asarray(rng.integers(0, v, (b, s))).at[1, :5].set(-100).at[2].set(-100)
    return x, w, t, {"chunk_size": 32, "vocab_chunk_size": 512}


def test_per_sequence_means_from_per_token_losses():
    # The docs' way to a loss per sequence: reduction="none" over the whole
    # batch, then each sequence's mean over its counted tokens (a sequence
    # with none counts 0). Against float64 formulas on the logits; no
    # logits-sized temporary.
    x, w, t, tiles = _sequence_batch()

    def per_sequence(x, w):
        per_token = jxent.linear_cross_entropy(x, w, t, reduction="none", **tiles)
        counted = jnp.sum(t != -100, axis=-1)
        return jnp.sum(per_token, axis=-1) / jnp.maximum(counted, 1)

    def reference(x, w):
        logits = x @ w
        valid = t != -100
        picked = jnp.take_along_axis(logits, jnp.where(valid, t, 0)[..., None], -1)
        nll = jnp.where(valid, jax.nn.logsumexp(logits, -1) - picked[..., 0], 0.0)
        return jnp.sum(nll, -1) / jnp.maximum(jnp.sum(valid, -1), 1)

    weights = jnp.linspace(0.5, 1.5, x.shape[0])
    value, grads = jax.value_and_grad(
        lambda x, w: jnp.sum(weights * per_sequence(x, w)), argnums=(0, 1)
    )(x, w)
    with x64():
        as64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w)]
        ref_value, ref_grads = jax.value_and_grad(
            lambda x, w: jnp.sum(weights.astype(jnp.float64) * reference(x, w)),
            argnums=(0, 1),
        )(*as64)
        ref_value, ref_grads = float(ref_value), [np.asarray(g) for g in ref_grads]
    assert per_sequence(x, w)[2] == 0.0
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())
    program = jax.value_and_grad(
        lambda x, w: jnp.mean(per_sequence(x, w)), argnums=(0, 1)
    )
    assert _temporaries(program, x, w) < x[..., 0].size * w.shape[1] * 4 / 4


def _scanned_microbatches(x, w, t, tiles, remat: bool):
    """The mean loss over microbatches (x's first axis), summed by a scan."""

    def step(xs):
        return jxent.linear_cross_entropy(xs[0], w, xs[1], **tiles)

    step = jax.checkpoint(step) if remat else step
    total, _ = jax.lax.scan(lambda c, xs: (c + step(xs), None), 0.0, (x, t))
    return total / x.shape[0]


def _one_call_program(t, tiles):
    """value_and_grad of the loss of the whole batch in one call."""
    return jax.value_and_grad(
        lambda x, w: jxent.linear_cross_entropy(x, w, t, **tiles), argnums=(0, 1)
    )


@pytest.mark.xfail(
    strict=True,
    reason="a loss per sequence under vmap, or per microbatch under a "
    "differentiated scan, forms each one's dw with its loss and keeps them all "
    "(docs/language_models.md, 'A batch of sequences')",
)
@pytest.mark.parametrize("batched", ["vmap", "scan"])
def test_batches_of_sequences_hold_no_dw_per_sequence(batched):
    x, w, t, tiles = _sequence_batch()

    def vmapped(x, w):
        loss = jax.vmap(lambda h, s: jxent.linear_cross_entropy(h, w, s, **tiles))
        return jnp.mean(loss(x, t))

    def scanned(x, w):
        return _scanned_microbatches(x, w, t, tiles, remat=False)

    per_sequence = {"vmap": vmapped, "scan": scanned}[batched]
    plain = _temporaries(_one_call_program(t, tiles), x, w)
    batches = _temporaries(jax.value_and_grad(per_sequence, argnums=(0, 1)), x, w)
    assert batches < plain + 2 * w.size * 4, (plain, batches)


def test_checkpointed_microbatch_steps_hold_one_dw():
    # The docs' way: jax.checkpoint around each microbatch's step keeps only
    # its inputs. Against the float64 mean of the microbatches' means.
    x, w, t, tiles = _sequence_batch()
    t = t.at[2].set(0)  # (a microbatch with no counted token would be 0)

    def scanned(x, w):
        return _scanned_microbatches(x, w, t, tiles, remat=True)

    def reference(x, w):
        logits = x @ w
        picked = jnp.take_along_axis(logits, jnp.where(t >= 0, t, 0)[..., None], -1)
        nll = jnp.where(t >= 0, jax.nn.logsumexp(logits, -1) - picked[..., 0], 0.0)
        per_batch = jnp.sum(nll, -1) / jnp.sum(t >= 0, -1)
        return jnp.mean(per_batch)

    program = jax.value_and_grad(scanned, argnums=(0, 1))
    value, grads = program(x, w)
    with x64():
        as64 = [jnp.asarray(np.asarray(a), jnp.float64) for a in (x, w)]
        ref_value, ref_grads = jax.value_and_grad(reference, argnums=(0, 1))(*as64)
        ref_value, ref_grads = float(ref_value), [np.asarray(g) for g in ref_grads]
    np.testing.assert_allclose(value, ref_value, rtol=1e-6)
    for g, r in zip(grads, ref_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6 * np.abs(r).max())
    plain = _temporaries(_one_call_program(t, tiles), x, w)
    assert _temporaries(program, x, w) < plain + 2 * w.size * 4


# These hold the CPU's token-outer program to its memory: on a GPU or a TPU
# the vocabulary-outer program runs instead (tests/test_compiled_targets.py
# holds it to its own bounds, compiled for a v5e and an H100).
cpu_program = pytest.mark.skipif(
    jax.default_backend() != "cpu", reason="the CPU's token-outer program"
)


@cpu_program
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_gradient_pass_keeps_about_one_logits_tile(dtype):
    # value_and_grad of the mean holds one float32 logits tile, the dw blocks
    # in flight and, for 16-bit inputs, the float32 dw and a 16-bit dz tile:
    # no loop-invariant tile (an iota, a broadcast zero) hoisted out of the
    # chunk loop by JAX's partial evaluation (that added 2 tiles), no (D, V)
    # product per chunk. Label smoothing keeps the logits alive next to dz
    # (_TILES_FOR_SMOOTHING), which the default chunk_size allows for.
    n, d, v, chunk, block = 512, 64, 8192, 128, 1024
    x = jnp.zeros((n, d), dtype)
    w = jnp.zeros((d, v), dtype)
    t = jnp.zeros((n,), jnp.int32)
    tile, dw32 = chunk * v * 4, d * v * 4
    wide = dtype == jnp.bfloat16
    for options, tiles in (
        ({}, 1.25),
        ({"weight": jnp.ones(v), "z_loss": 1e-4, "soft_cap": 30.0}, 1.25),
        ({"label_smoothing": 0.1}, 2.25),
    ):
        fn = jax.jit(
            jax.value_and_grad(
                lambda x, w, o=options: jxent.linear_cross_entropy(
                    x, w, t, chunk_size=chunk, vocab_chunk_size=block, **o
                ),
                argnums=(0, 1),
            )
        )
        temp = fn.lower(x, w).compile().memory_analysis().temp_size_in_bytes
        allowed = (tiles + 0.5 * wide) * tile + 2 * d * block * 4 + wide * dw32
        if wide and not jxent._linear._cpu_has_fast_bfloat16_matmuls():
            # float32 copies of a block of w, of dz and of the chunk's x,
            # and dz's 16-bit block
            allowed += (d * block + chunk * block + chunk * d) * 4 + chunk * block * 2
        assert temp <= allowed, (list(options), temp / tile, allowed / tile)


@pytest.mark.skipif(torch is None, reason="torch oracle not installed")
@pytest.mark.parametrize("chunked", [False, True])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_matches_torch_linear_cross_entropy(chunked, reduction):
    xt = torch.tensor(X.astype(np.float64), requires_grad=True)
    wt = torch.tensor(W.T.astype(np.float64), requires_grad=True)  # torch: (V, D)
    bt = torch.tensor(BIAS.astype(np.float64), requires_grad=True)
    options = (
        torch.nn.LinearCrossEntropyOptions(batch_chunk_size=4) if chunked else None
    )
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_t = torch.nn.functional.linear_cross_entropy(
            xt, wt, torch.tensor(TARGET), linear_bias=bt,
            weight=torch.tensor(WEIGHT.astype(np.float64)), reduction=reduction,
            ignore_index=-100, label_smoothing=0.1, options=options,
        )  # fmt: skip
        loss_t.sum().backward()
    value, grads = jax.value_and_grad(
        lambda x, w, b: jnp.sum(
            jxent.linear_cross_entropy(
                x, w, TARGET, WEIGHT, bias=b, reduction=reduction,
                label_smoothing=0.1, chunk_size=4,
            )
        ),
        argnums=(0, 1, 2),
    )(X, W, BIAS)  # fmt: skip
    np.testing.assert_allclose(value, loss_t.sum().item(), rtol=2e-6)
    np.testing.assert_allclose(grads[0], xt.grad.numpy(), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[1], wt.grad.numpy().T, rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(grads[2], bt.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("args", "kwargs", "error", "match"),
    [
        ((X, W[:-1], TARGET), {}, ValueError, r"`w` must have shape \(D, V\)"),
        ((X, W, TARGET[:-1]), {}, ValueError, r"`target` must have shape"),
        ((X, W, TARGET), {"bias": BIAS[:-1]}, ValueError, r"`bias` must have shape"),
        ((X, W, TARGET), {"chunk_size": 0}, ValueError, "`chunk_size` must be a pos"),
        ((X, W, TARGET), {"chunk_size": 2.5}, ValueError, "`chunk_size` must be"),
        ((X, W, TARGET), {"soft_cap": -1.0}, ValueError, "`soft_cap` must be"),
        ((X, W, TARGET), {"z_loss": -1.0}, ValueError, "`z_loss` must be >= 0"),
        ((X, W, TARGET), {"where": np.ones((3, V), bool)}, ValueError, "`where`"),
        ((X, W, TARGET), {"reduction": "avg"}, ValueError, "`reduction` must be"),
        ((X, W, TARGET), {"label_smoothing": 2.0}, ValueError, "label_smoothing"),
        (
            (X, W, TARGET.astype(np.float32)),
            {},
            ValueError,
            r"probabilities.*x.shape\[:-1\] \+ \(V,\) = \(11, 13\).* got \(11,\)",
        ),
        ((X, W, np.ones((N, V + 1))), {}, ValueError, r"= \(11, 13\).*got \(11, 14\)"),
        ((X, W, np.ones((N, V))), {"ignore_index": 0}, ValueError, "ignore_index"),
        (
            (X, W, TARGET),
            {"vocab_chunk_size": 0},
            ValueError,
            "`vocab_chunk_size` must be a positive int",
        ),
        ((X, W, TARGET), {"vocab_chunk_size": 4.0}, ValueError, "`vocab_chunk_size`"),
        ((X, W, TARGET), {"vocab_chunk_size": True}, ValueError, "`vocab_chunk_size`"),
        ((X.astype(np.int32), W, TARGET), {}, TypeError, "`x` must have a floating"),
        ((X, W, np.full(N, V)), {}, ValueError, f"class index {V}"),
    ],
)
def test_errors(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        jxent.linear_cross_entropy(*args, **kwargs)


def test_out_of_range_target_under_jit_is_nan():
    t = TARGET.copy()
    t[0] = V
    loss = jax.jit(
        lambda x, w, t: jxent.linear_cross_entropy(x, w, t, reduction="none")
    )(X, W, t)
    assert np.isnan(loss[0]) and np.all(np.isfinite(loss[1:]))


# --- gradients of every floating input, both modes (issue 9) ------------------

NAMES = ("x", "w", "bias", "weight", "label_smoothing", "z_loss", "soft_cap", "probs")
PROBS = RNG.dirichlet(np.ones(V), size=N)
PROBS[0, [1, 5]] = 0.0  # exact zeros: the target's gradient is still lse - z there
PROBS[0] /= PROBS[0].sum()
X64_ARGS = (X, W, BIAS, WEIGHT, 0.2, 1e-2, 3.0, PROBS)


def _loss_fn(reduction, return_lse, soft, fused, **kw):
    """Scalar function of every floating input; per-token outputs (and the lse)
    are contracted with distinct cotangents so that no term can hide."""

    def f(x, w, b, weight, eps, z_loss, cap, probs):
        target = probs if soft else TARGET
        common = dict(
            reduction=reduction, label_smoothing=eps, z_loss=z_loss, soft_cap=cap,
            return_lse=return_lse, **kw,
        )  # fmt: skip
        if fused:
            out = jxent.linear_cross_entropy(
                x, w, target, weight, bias=b, chunk_size=4, vocab_chunk_size=5,
                **common,
            )  # fmt: skip
        else:
            out = jxent.cross_entropy(x @ w + b[None, :], target, weight, **common)
        loss, lse = out if return_lse else (out, None)
        total = jnp.sum(loss * jnp.linspace(1.0, 2.0, loss.size).reshape(loss.shape))
        if return_lse:
            total = total + jnp.sum(lse * jnp.linspace(-1.0, 3.0, N))
        return total

    return f


# (reduction, return_lse, probability targets, extra options)
MODES = [
    ("mean", False, False, {}),
    ("sum", False, True, {}),
    ("none", True, False, {"where": ROW_MASK}),
    ("mean", True, True, {"where": CLASS_MASK}),
    ("none", False, True, {}),
    ("sum", True, False, {"where": CLASS_MASK}),
]


@pytest.fixture(scope="module")
def float64_gradients():
    """Gradients w.r.t. all 8 inputs, fused and materialised, every mode: one jit."""
    with x64():
        args = tuple(np.asarray(a, np.float64) for a in X64_ARGS)

        @jax.jit
        def run(*args):
            out = []
            for reduction, lse, soft, kw in MODES:
                pair = []
                for fused in (True, False):
                    f = _loss_fn(reduction, lse, soft, fused, **kw)
                    pair.append(jax.value_and_grad(f, argnums=tuple(range(8)))(*args))
                out.append(pair)
            return out

        return jax.device_get(run(*args))


@pytest.mark.parametrize("mode", range(len(MODES)))
def test_every_gradient_equals_materialised_float64(float64_gradients, mode):
    (value, grads), (ref_value, ref_grads) = float64_gradients[mode]
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    soft = MODES[mode][2]
    for name, g, r in zip(NAMES, grads, ref_grads, strict=True):
        if name == "probs" and not soft:
            continue
        assert np.all(np.isfinite(g)), name
        # never a silent zero: every input moves this loss
        assert np.max(np.abs(r)) > 1e-6, name
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12, err_msg=name)


# CI: "mean" (its divisor reaches both passes); "sum" with pytest --full.
@pytest.mark.parametrize("reduction", ["mean", full_only("sum")])
def test_two_dw_passes_every_gradient_equals_materialised_float64(
    reduction, monkeypatch
):
    """dw in two column ranges (the large 16-bit heads' order, forced here in
    float64), integer targets with every option and a class (or per-token)
    mask: the second range's dw comes from its own logits, block by block,
    and the first pass's logsumexps; every input's gradient and a
    forward-mode tangent against the materialised float64 loss."""
    monkeypatch.setattr(jxent._linear, "_dw_passes", lambda *_: 2)
    kw = {"where": CLASS_MASK if reduction == "mean" else ROW_MASK}
    with x64():
        args = tuple(np.asarray(a, np.float64) for a in X64_ARGS)
        results = []
        for fused in (True, False):
            f = _loss_fn(reduction, False, False, fused, **kw)
            grads = jax.jit(jax.value_and_grad(f, argnums=tuple(range(7))))(*args)
            results.append((grads, jax.jvp(f, args, _cosine_tangents(args))[1]))
    _assert_fused_is_materialised(*results)


def _cosine_tangents(args):
    return tuple(np.cos(np.arange(np.size(a))).reshape(np.shape(a)) for a in args)


def _assert_fused_is_materialised(fused, materialised):
    """``((value, grads), tangent)`` of the fused and the materialised loss
    agree to float64 rounding, every gradient non-zero."""
    ((value, grads), tangent), ((ref_value, ref_grads), ref_tangent) = (
        fused, materialised,
    )  # fmt: skip
    np.testing.assert_allclose(value, ref_value, rtol=1e-12)
    np.testing.assert_allclose(tangent, ref_tangent, rtol=1e-10)
    for name, g, r in zip(NAMES, grads, ref_grads, strict=False):
        assert np.max(np.abs(r)) > 1e-6, name
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12, err_msg=name)


@pytest.mark.parametrize(
    ("return_lse", "kw"), [(False, {"where": ROW_MASK}), (True, {})]
)
def test_per_token_block_gradients_equal_materialised_float64(return_lse, kw):
    """reduction="none" differentiated w.r.t. x, w and bias only goes class
    block by class block (13 classes in blocks of 5, the last one shifted
    left over columns of the one before), every option on: gradients and a
    forward-mode tangent against the materialised float64 loss. The loss
    alone takes dx from each block's own matmul, with the lse the transpose
    of the tangent's."""
    with x64():
        args = tuple(np.asarray(a, np.float64) for a in X64_ARGS)
        results = []
        for fused in (True, False):
            f = _loss_fn("none", return_lse, False, fused, **kw)

            def g(x, w, b, f=f):
                return f(x, w, b, *args[3:])

            grads = jax.jit(jax.value_and_grad(g, argnums=(0, 1, 2)))(*args[:3])
            tangents = _cosine_tangents(args[:3])
            results.append((grads, jax.jvp(g, args[:3], tangents)[1]))
    _assert_fused_is_materialised(*results)


# CI: with the lse (two outputs); pytest --full the loss alone too.
@pytest.mark.parametrize("return_lse", [full_only(False), True])
def test_per_token_block_check_grads_order_2(return_lse):
    """Numerical derivatives of order 2, both modes, of the per-token losses
    class block by class block (tangents of x, w and bias; the options'
    values on, not differentiated): with the lse, two outputs."""
    with x64():
        args = tuple(np.asarray(a, np.float64) for a in X64_ARGS)
        f = _loss_fn("none", return_lse, False, True)

        def g(x, w, b):
            return f(x, w, b, *args[3:])

        check_grads(g, args[:3], order=2, modes=("fwd", "rev"), atol=1e-6, rtol=1e-6)


# ~45 s of compilation each: CI checks the richest mode (the lse output,
# probability targets, a class mask), pytest --full the plainest too.
CHECK_GRADS_MODES = [MODES[3], full_only(MODES[0])]


@pytest.mark.parametrize(
    "mode", CHECK_GRADS_MODES, ids=lambda m: f"{m[0]}-{m[1]}-{m[2]}"
)
def test_check_grads_forward_and_reverse_order_2(mode):
    """Numerical derivatives of order 2 in both modes, ragged token and
    vocabulary chunks (N = 11 tokens in chunks of 4, V = 13 in blocks of 5)."""
    reduction, lse, soft, kw = mode
    with x64():
        args = tuple(np.asarray(a, np.float64) for a in X64_ARGS)
        f = jax.jit(_loss_fn(reduction, lse, soft, True, **kw))
        check_grads(f, args, order=2, modes=("fwd", "rev"), atol=1e-5, rtol=1e-5)


def test_forward_mode_transforms_match_materialised():
    """jvp, linearize, jacfwd, hessian, jacrev∘jacfwd and jacfwd∘jacrev."""
    with x64():
        x, w = X[:6].astype(np.float64), W[:, :7].astype(np.float64)
        t = np.array([0, 3, -100, 6, 2, 1])
        kw = dict(weight=WEIGHT[:7].astype(np.float64), label_smoothing=0.1,
                  z_loss=1e-2, soft_cap=3.0)  # fmt: skip

        def fused(x):
            return jxent.linear_cross_entropy(x, w, t, chunk_size=4, **kw)

        def ref(x):
            return jxent.cross_entropy(x @ w, t, **kw)

        @jax.jit
        def run(x):
            ones = jnp.ones_like(x)
            out = {}
            for name, f in (("fused", fused), ("ref", ref)):
                lin_value, lin = jax.linearize(f, x)
                out[name] = (
                    jax.jvp(f, (x,), (ones,)),
                    (lin_value, lin(ones)),
                    jax.jacfwd(f)(x),
                    jax.hessian(f)(x),
                    jax.jacrev(jax.jacfwd(f))(x),
                    jax.jacfwd(jax.jacrev(f))(x),
                )
            return out

        out = run(x)
    for got, want in zip(
        jax.tree.leaves(out["fused"]), jax.tree.leaves(out["ref"]), strict=True
    ):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# The accelerators' one-pass forward (forced here) runs its variadic
# reduction under the second differentiation.
# CI: the one-pass path (its differentiated reduction runs); the CPU's path,
# which raised too, with pytest --full.
@pytest.mark.parametrize(
    ("reduction", "one_pass"), [("none", True), full_only("none", None)]
)
def test_hessian_vector_products_of_every_input(reduction, one_pass, monkeypatch):
    """Forward over reverse (``jvp`` of ``grad``, the usual Hessian-vector
    product) and reverse over forward, w.r.t. x, w and the bias, against the
    float64 reference on materialised logits. Forward over reverse with
    ``reduction="none"`` raised a TypeError (JAX's JVP of a variadic
    reduction with a symbolically zero tangent)."""
    from oracles import reference_cross_entropy

    import jxent._kernels

    monkeypatch.setattr(jxent._kernels, "_ONE_PASS", one_pass)
    rng = np.random.default_rng(23)
    kw = dict(label_smoothing=0.1, z_loss=1e-2, soft_cap=3.0)
    ct = np.arange(1.0, N + 1.0) if reduction == "none" else 1.0
    weight = WEIGHT.astype(np.float64)

    def fused(x, w, b):
        loss = jxent.linear_cross_entropy(
            x, w, TARGET, weight, bias=b, reduction=reduction, chunk_size=4,
            **kw,
        )  # fmt: skip
        return jnp.sum(loss * ct)

    def ref(x, w, b):
        logits = x @ w + b[None, :]
        return jnp.sum(
            reference_cross_entropy(
                logits, TARGET, weight, reduction=reduction, **kw
            )[0] * ct
        )  # fmt: skip

    def products(f, primals, tangents):
        over_rev = jax.jvp(jax.grad(f, argnums=(0, 1, 2)), primals, tangents)[1]
        over_fwd = jax.grad(lambda *p: jax.jvp(f, p, tangents)[1], argnums=(0, 1, 2))(
            *primals
        )
        return over_rev, over_fwd

    with x64():
        primals = tuple(np.asarray(a, np.float64) for a in (X, W, BIAS))
        tangents = tuple(rng.normal(size=np.shape(a)) for a in primals)
        got = jax.jit(functools.partial(products, fused))(primals, tangents)
        want = products(ref, primals, tangents)
    for g, r in zip(jax.tree.leaves(got), jax.tree.leaves(want), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-9, atol=1e-10 * np.abs(r).max())


def test_lse_cotangent_reaches_every_input():
    """Gradient of Σ lse alone (reduction "none", return_lse): the lse
    cotangent of the per-token rule must not be dropped."""

    def lse_sum(fused):
        def f(x, w, b):
            if fused:
                _, lse = jxent.linear_cross_entropy(
                    x, w, TARGET, bias=b, reduction="none", return_lse=True,
                    chunk_size=4,
                )  # fmt: skip
            else:
                lse = jax.nn.logsumexp(x @ w + b[None, :], axis=-1)
            return jnp.sum(lse)

        return jax.grad(f, argnums=(0, 1, 2))(X, W, BIAS)

    for g, r in zip(lse_sum(True), lse_sum(False), strict=True):
        np.testing.assert_allclose(g, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("return_lse", [False, True])
def test_zero_mean_denominator_gives_zero_and_finite_gradients(return_lse):
    """All class weights 0 with smoothing: "mean" is 0/0, guarded to 0."""

    def f(x, w, weight):
        out = jxent.linear_cross_entropy(
            x, w, TARGET, weight, label_smoothing=0.1, chunk_size=4,
            return_lse=return_lse,
        )  # fmt: skip
        return out[0] if return_lse else out

    zero_weights = np.zeros(V, np.float32)
    value, grads = jax.value_and_grad(f, argnums=(0, 1, 2))(X, W, zero_weights)
    assert value == 0.0
    for g in grads:
        assert np.all(np.isfinite(g))
        np.testing.assert_array_equal(g, 0.0)


@pytest.mark.skipif(torch is None, reason="torch oracle not installed")
@pytest.mark.parametrize("smoothing", [0.0, 0.2])
@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
def test_probability_targets_match_torch(reduction, smoothing):
    """Values and gradients w.r.t. x, w, bias, class weights and the target."""
    import warnings

    x64_inputs = [a.astype(np.float64) for a in (X, W.T, BIAS, WEIGHT, PROBS)]
    leaves = [torch.tensor(a, requires_grad=True) for a in x64_inputs]
    xt, wt, bt, weight_t, probs_t = leaves
    ct = np.linspace(1.0, 2.0, N) if reduction == "none" else np.ones(())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_t = torch.nn.functional.linear_cross_entropy(
            xt, wt, probs_t, linear_bias=bt, weight=weight_t, reduction=reduction,
            label_smoothing=smoothing,
        )  # fmt: skip
        (loss_t * torch.tensor(ct)).sum().backward()
    with x64():
        value, grads = jax.value_and_grad(
            lambda x, w, b, weight, q: jnp.sum(
                ct * jxent.linear_cross_entropy(
                    x, w, q, weight, bias=b, reduction=reduction,
                    label_smoothing=smoothing, chunk_size=4, vocab_chunk_size=6,
                )
            ),
            argnums=tuple(range(5)),
        )(x64_inputs[0], x64_inputs[1].T, *x64_inputs[2:])  # fmt: skip
    np.testing.assert_allclose(value, (loss_t.detach().numpy() * ct).sum(), rtol=1e-12)
    want = [t.grad.numpy() for t in leaves]
    want[1] = want[1].T
    names = ("x", "w", "bias", "weight", "target")
    for name, g, r in zip(names, grads, want, strict=True):
        record_deviation("linear_cross_entropy probabilities", g, r)
        np.testing.assert_allclose(g, r, rtol=1e-10, atol=1e-12, err_msg=name)


def test_default_chunk_size_fits_the_memory_budget_at_the_llm_heads():
    # The CPU sweep: the default chunk keeps XLA's temporaries plus the
    # float32 gradients within 1.5 x (dx + dw) + 64 MiB less the 48 MiB kept
    # for the allocator (the measured RSS in benchmarks/results/cpu).
    from jxent._linear import _default_chunk_size, _default_vocab_chunk_size

    for n, d, v in ((2048, 512, 65536), (2048, 1024, 131072), (1024, 2304, 256000)):
        chunk = _default_chunk_size(n, d, v)
        grads = 4 * (n * d + d * v)
        temps = 1.25 * 4 * chunk * v + 2 * 4 * d * _default_vocab_chunk_size(d, v)
        assert grads + temps <= 1.5 * grads + 16 * 2**20, (n, d, v, chunk)
        assert chunk >= 128, (n, d, v, chunk)  # fast enough (benchmarks/README.md)
    assert _default_chunk_size(2048, 1024, 131072, smoothing=True) == 128
    assert _default_chunk_size(2048, 1024, 131072, where=True) == 128


def test_default_chunk_size_follows_the_options():
    # Label smoothing and `where` keep more logits tiles alive, so the default
    # chunk is smaller with them (read off the scan length, nothing runs).
    n, d, v = 2048, 1024, 131072
    x = jax.ShapeDtypeStruct((n, d), jnp.float32)
    w = jax.ShapeDtypeStruct((d, v), jnp.float32)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)

    def scan_length(**options):
        jaxpr = jax.make_jaxpr(
            lambda x, w, t: jxent.linear_cross_entropy(x, w, t, **options)
        )(x, w, t)
        lengths = re.findall(r"length=(\d+)", str(jaxpr))
        assert lengths, "no chunk loop"
        return int(lengths[0])

    assert scan_length() == n // 256
    assert scan_length(label_smoothing=0.1) == n // 128
    assert scan_length(where=jnp.arange(v) < v - 1) == n // 128


@cpu_program
@pytest.mark.parametrize("dtype", [jnp.bfloat16, full_only(jnp.float16)])
def test_two_dw_passes_give_the_same_numbers_in_less_memory(dtype, monkeypatch):
    # 16-bit inputs with a large dw accumulate it in two column halves, with
    # one float32 half instead of the whole float32 dw beside the result: the
    # first pass over the chunks (whole rows) gives the loss, dx, dbias and
    # dw's first half from the same per-chunk float32 sums (bit-identical);
    # the second half is summed class block by class block from that half's
    # logits alone (another order of the float32 sums: within one ulp of the
    # dtype), and so is the tangent. Each class block of the second half is
    # written into it in place: big-array traffic no more than one pass's
    # (XLA's CPU backend updated a 16-bit array through a float32 copy of
    # the whole: 7.6 dw more here, 5.5 of 17 s at (1024, 2304, 256000)).
    n, d, v = 128, 256, 8192  # dw (8 MiB in float32) outweighs a chunk's tile
    k = jax.random.split(jax.random.key(3), 4)
    x = jax.random.normal(k[0], (n, d)).astype(dtype)
    w = (jax.random.normal(k[1], (d, v)) / 8).astype(dtype)
    b = jax.random.normal(k[2], (v,)).astype(dtype)
    t = jax.random.randint(k[3], (n,), 0, v)
    options = dict(
        weight=jnp.linspace(0.5, 2.0, v), label_smoothing=0.1, z_loss=1e-3,
        chunk_size=32, vocab_chunk_size=1000,
    )  # fmt: skip

    def loss(x, w, b):
        return jxent.linear_cross_entropy(x, w, t, bias=b, **options)

    def measure():
        program = jax.jit(jax.value_and_grad(lambda *a: loss(*a), argnums=(0, 1, 2)))
        compiled = program.lower(x, w, b).compile()
        # Matmuls giving a chunk's whole rows of logits (float32 (32, V)).
        whole_rows = compiled.as_text().count(f"f32[32,{v}]{{1,0}} dot(")
        value, (dx, dw, db) = program(x, w, b)
        tangent = jax.jvp(loss, (x, w, b), (x, w, b))
        exact = (value, dx, dw[:, : v // 2], db, tangent[0])
        close = (dw[:, v // 2 :], tangent[1])
        temp = compiled.memory_analysis().temp_size_in_bytes
        # Arrays of half of the 16-bit dw at least.
        hlo_stats = load_benchmark("hlo_stats")
        traffic = hlo_stats.program_stats(compiled.as_text(), d * v).traffic
        arrays = [np.asarray(a, np.float32) for a in exact]
        return temp, whole_rows, arrays, close, traffic / (d * v * 2)

    # The 16-bit matmuls (a CPU with fast ones): whole rows' dots.
    monkeypatch.setattr(jxent._linear, "_cpu_has_fast_bfloat16_matmuls", lambda: True)
    jax.clear_caches()
    temp_one, rows_one, exact_one, close_one, dw_moved_one = measure()
    monkeypatch.setattr(jxent._linear, "_DW_SPLIT_BYTES", 0)
    temp_two, rows_two, exact_two, close_two, dw_moved_two = measure()
    assert dw_moved_two <= dw_moved_one + 2, (dw_moved_one, dw_moved_two)
    assert rows_one == rows_two == 1, (rows_one, rows_two)  # whole rows once
    for a, c in zip(exact_one, exact_two, strict=True):
        np.testing.assert_array_equal(a, c)
    ulp = float(jnp.finfo(dtype).eps)
    for a, c in zip(close_one, close_two, strict=True):
        a, c = np.asarray(a, np.float32), np.asarray(c, np.float32)
        np.testing.assert_allclose(c, a, rtol=ulp, atol=ulp * np.abs(a).max() / 64)
        assert not np.isnan(c).any()
    assert temp_two <= temp_one - 0.4 * 4 * d * v, (temp_one, temp_two)
    jax.clear_caches()


@cpu_program
@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_per_token_losses_hold_no_more_than_their_sum(dtype):
    # reduction="none" (per-token losses, differentiated through any
    # per-token cotangent) goes class block by class block as the heads do:
    # at the (2048, 1024, 131072) head its value_and_grad's temporaries are
    # within the "mean" program's (364 and 409 MiB bfloat16, 144 and 154
    # float32). Token chunk by token chunk it held a float32 dw and its
    # cotangent: 1673 and 649 MiB, the bfloat16 one 0.82x the naive
    # program's (and 1.06x on a TPU v5e, test_compiled_targets.py).
    n, d, v = 2048, 1024, 131072
    shapes = (
        jax.ShapeDtypeStruct((n, d), dtype),
        jax.ShapeDtypeStruct((d, v), dtype),
        jax.ShapeDtypeStruct((n,), jnp.int32),
    )

    def temporaries(reduction):
        def loss(x, w, t):
            out = jxent.linear_cross_entropy(x, w, t, reduction=reduction)
            return jnp.sum(jnp.square(out))

        program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
        return program.lower(*shapes).compile().memory_analysis().temp_size_in_bytes

    per_token, summed = temporaries("none"), temporaries("mean")
    assert per_token <= summed, (per_token / 2**20, summed / 2**20)


def test_two_dw_passes_at_the_16_bit_heads_whose_dw_would_not_fit():
    # One pass keeps the float32 dw and the 16-bit dw together (1.5 x the
    # float32 dw): measured 1.06 and 1.08 x the budget at the two larger
    # bfloat16 heads (benchmarks/results/cpu/llm_sweep), 0.96 at the smallest.
    from jxent._linear import _dw_passes

    assert _dw_passes(512, 65536, jnp.bfloat16) == 1
    assert _dw_passes(1024, 131072, jnp.bfloat16) == 2
    assert _dw_passes(2304, 256000, jnp.float16) == 2
    assert _dw_passes(2304, 256000, jnp.float32) == 1


@pytest.mark.parametrize(("vocab", "passes"), [(1, 2), (2, 2), (3, 2), (7, 3), (2, 5)])
def test_dw_column_ranges_cover_the_vocabulary_none_empty(vocab, passes):
    """A pass per range, never an empty one (an empty range divided by its
    size: ZeroDivisionError with V = 1 and two passes)."""
    from jxent._linear import _dw_column_ranges

    ranges = _dw_column_ranges(vocab, passes)
    assert len(ranges) == min(vocab, passes)
    assert ranges[0][0] == 0 and ranges[-1][1] == vocab
    assert all(lo < hi for lo, hi in ranges)
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ranges))  # contiguous


@pytest.mark.parametrize("fast", [False, True], ids=["slow-16-bit", "fast-16-bit"])
def test_bfloat16_logits_and_dx_from_float32_blocks(fast, monkeypatch):
    """16-bit ``w`` on a CPU with slow 16-bit matmuls: the token chunks'
    logits and dx come from float32 copies of w's column blocks (13 classes
    in blocks of 4, the last shifted left over 3 shared columns); with fast
    ones, from 16-bit matmuls. Values and gradients (x, w, bias; "sum" and a
    second column range of dw) against the float32 loss of the same rounded
    inputs, to bfloat16 rounding."""
    monkeypatch.setattr(jxent._linear, "_cpu_has_fast_bfloat16_matmuls", lambda: fast)
    # The 16-bit w's dw in two column ranges (the second recomputed).
    monkeypatch.setattr(jxent._linear, "_DW_SPLIT_BYTES", 0)
    rng = np.random.default_rng(13)
    x = jnp.asarray(rng.normal(size=(10, 6)), jnp.bfloat16)
    w = jnp.asarray(rng.normal(size=(6, 13)), jnp.bfloat16)
    b = jnp.asarray(rng.normal(size=(13,)), jnp.bfloat16)
    t = jnp.asarray(rng.integers(0, 13, size=10)).at[3].set(-100)

    def ours(x, w, b, reduction):
        return jxent.linear_cross_entropy(
            x, w, t, bias=b, reduction=reduction, chunk_size=4, vocab_chunk_size=4
        )

    def reference(x, w, b, reduction):
        return jxent.cross_entropy(x @ w + b[None, :], t, reduction=reduction)

    f32 = tuple(a.astype(jnp.float32) for a in (x, w, b))
    jax.clear_caches()  # no program traced with the other matmuls
    try:
        for reduction in ("mean", "sum"):
            value, grads = jax.value_and_grad(ours, (0, 1, 2))(x, w, b, reduction)
            want, want_grads = jax.value_and_grad(reference, (0, 1, 2))(*f32, reduction)
            np.testing.assert_allclose(value.astype(np.float32), want, rtol=4e-3)
            for got, ref in zip(grads, want_grads, strict=True):
                assert got.dtype == jnp.bfloat16
                # dz is rounded to bfloat16 for the matmuls, as in torch.
                scale = float(jnp.max(jnp.abs(ref)))
                np.testing.assert_allclose(
                    got.astype(np.float32), ref, rtol=8e-3, atol=1e-2 * scale
                )
    finally:
        jax.clear_caches()
