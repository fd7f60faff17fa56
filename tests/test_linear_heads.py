"""linear_argmax and linear_log_probs against the materialised logits."""

from __future__ import annotations

import functools
import sys
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only, run_on_eight_devices, x64
from jax.test_util import check_grads
from test_rl import ref_distillation, ref_log_probs

import jxent

RNG = np.random.default_rng(18)
N, D, V = 11, 6, 13  # ragged for the chunks used below
X = RNG.normal(size=(N, D)).astype(np.float32)
W = RNG.normal(size=(D, V)).astype(np.float32)
BIAS = RNG.normal(size=V).astype(np.float32)


def reference_argmax(x, w, bias=None, soft_cap=None, where=None):
    """jnp.argmax of the float32 logits (float64 for float64 inputs)."""
    acc = jnp.promote_types(jnp.result_type(x, w), jnp.float32)
    z = jnp.einsum("...d,dv->...v", x, w, preferred_element_type=acc)
    if bias is not None:
        z = z + jnp.asarray(bias).astype(acc).reshape((1,) * (z.ndim - 1) + (-1,))
    if soft_cap is not None:
        z = soft_cap * jnp.tanh(z / soft_cap)
    if where is not None:
        z = jnp.where(where, z, -jnp.inf)
    return jnp.argmax(z, axis=-1)


CHUNKS = [(None, None), (4, None), (4, 5), (1, 1), (11, 13), (3, 12)]


def _check_all_chunks(x, w, **kw):
    want = np.asarray(reference_argmax(x, w, **kw))
    for chunk, block in CHUNKS:
        got = jxent.linear_argmax(x, w, chunk_size=chunk, vocab_chunk_size=block, **kw)
        assert got.dtype == jnp.int32 and got.shape == x.shape[:-1]
        np.testing.assert_array_equal(got, want, err_msg=f"{chunk}, {block}")
    return want


def test_random_logits_with_bias_and_batch_shape():
    _check_all_chunks(X, W, bias=BIAS)
    _check_all_chunks(X[:10].reshape(2, 5, D), W)


def _answer_not_the_cpu(monkeypatch, module) -> list:
    """``module.on_cpu`` takes the chips' branch; the list records its calls."""
    chosen = []

    def on_chip(cpu, other):
        chosen.append(1)
        return other()

    monkeypatch.setattr(module, "on_cpu", on_chip)
    return chosen


def test_chip_blocks_of_argmax(monkeypatch):
    """Off the CPU linear_argmax takes linear_cross_entropy's class blocks;
    here ``on_cpu`` answers "not the CPU" and the blocks are shrunk to 4 of
    the 13 classes (the last one shifted): against jnp.argmax of the float32
    logits, with a bias, a soft cap, a row mask, a NaN and exact ties."""
    import jxent._linear as linear
    import jxent._linear_heads as heads

    chosen = _answer_not_the_cpu(monkeypatch, heads)
    monkeypatch.setattr(linear, "_BLOCK_DW_BYTES", 4 * D * 4)
    assert linear._block_sizes(N, D, V, None, None)[2] == 4
    x = RNG.integers(-1, 2, size=(N, D)).astype(np.float32)
    w = RNG.integers(-1, 2, size=(D, V)).astype(np.float32)
    w_nan = w.copy()
    w_nan[0, 9] = np.nan
    for kw in ({"bias": BIAS}, {"soft_cap": 2.0}, {"where": ROW_MASK}, {}):
        want = np.asarray(reference_argmax(x, w, **kw))
        got = jxent.linear_argmax(x, w, **kw)
        np.testing.assert_array_equal(got, want, err_msg=str(list(kw)))
    np.testing.assert_array_equal(
        jxent.linear_argmax(x, w_nan), reference_argmax(x, w_nan)
    )
    assert chosen, "the chips' blocks were not chosen"


def test_ties_go_to_the_first_index():
    """Small integers: every logit is exact, so many exact ties across tokens
    chunks and vocabulary blocks."""
    x = RNG.integers(-1, 2, size=(N, 3)).astype(np.float32)
    w = RNG.integers(-1, 2, size=(3, V)).astype(np.float32)
    w[:, 9] = w[:, 2]  # a duplicate column in a later block
    want = _check_all_chunks(x, w)
    z = x @ w
    assert (np.sum(z == z.max(-1, keepdims=True), -1) > 1).sum() >= 3  # ties seen
    np.testing.assert_array_equal(want, np.argmax(z, -1))  # numpy's rule too


def test_soft_cap_saturation_ties():
    w = W * 200.0  # logits of hundreds: tanh(z / 0.5) is exactly 1 in float32
    want = _check_all_chunks(X, w, soft_cap=0.5)
    assert (want != np.argmax(X @ w, -1)).any()  # the cap changes the answer


def test_masks_nan_and_fully_excluded_rows():
    mask = np.ones(V, bool)
    mask[[0, 7]] = False
    _check_all_chunks(X, W, where=mask)
    rows = np.ones((N, V), bool)
    rows[3] = False  # nothing included: 0, as jnp.argmax of all -inf
    rows[5, 2:] = False
    got = _check_all_chunks(X, W, bias=BIAS, where=rows)
    assert got[3] == 0
    x = X.copy()
    x[4, 0] = np.nan  # a row of NaN logits
    w = W.copy()
    w[1, 10] = np.nan  # a NaN column: the first NaN wins everywhere
    _check_all_chunks(x, W)
    _check_all_chunks(X, w)


@pytest.mark.parametrize("dtype", [jnp.bfloat16, jnp.float16])
def test_16_bit_inputs_accumulate_in_float32(dtype):
    x, w, b = (jnp.asarray(a, dtype) for a in (X, W, BIAS))
    _check_all_chunks(x, w, bias=b)


def test_float64_and_vmap_and_jit():
    with jax.enable_x64(True):
        _check_all_chunks(X.astype(np.float64), W.astype(np.float64))
    batched = jax.vmap(lambda x: jxent.linear_argmax(x, W, chunk_size=2))(
        X[:10].reshape(2, 5, D)
    )
    np.testing.assert_array_equal(batched.reshape(-1), reference_argmax(X[:10], W))
    jitted = jax.jit(lambda x, w, c: jxent.linear_argmax(x, w, soft_cap=c))
    np.testing.assert_array_equal(jitted(X, W, 2.0), reference_argmax(X, W, None, 2.0))


@pytest.mark.parametrize("dtype", [jnp.float32, jnp.bfloat16])
def test_holds_no_float32_copy_of_w(dtype):
    """Compiled for the CPU (not run) at (N, D, V) = (1024, 512, 65536): the
    temporaries are a tile's, not a float32 copy of w (128 MiB). Measured
    (at (2048, 1024, 131072)): 21 and 28.5 MiB; for bfloat16 540 MiB before
    w's blocks were sliced behind a barrier (XLA's CPU backend had hoisted the
    float32 conversion of the whole w out of the loop over blocks)."""
    n, d, v = 1024, 512, 65536
    x = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((d, v), dtype)
    program = jax.jit(jxent.linear_argmax).lower(x, w).compile()
    temporaries = program.memory_analysis().temp_size_in_bytes
    assert temporaries <= 0.25 * 4 * d * v, temporaries / 2**20


def test_bad_input():
    with pytest.raises(TypeError, match="`x`"):
        jxent.linear_argmax(X.astype(np.int32), W)
    with pytest.raises(TypeError, match="`w`"):
        jxent.linear_argmax(X, W.astype(np.int32))
    with pytest.raises(ValueError, match=r"w.shape=\(5, 13\)"):
        jxent.linear_argmax(X, W[:5])
    with pytest.raises(ValueError, match="`bias` must have shape"):
        jxent.linear_argmax(X, W, bias=BIAS[:3])
    with pytest.raises(ValueError, match="`chunk_size`"):
        jxent.linear_argmax(X, W, chunk_size=0)
    with pytest.raises(ValueError, match="`vocab_chunk_size`"):
        jxent.linear_argmax(X, W, vocab_chunk_size=-2)
    with pytest.raises(ValueError, match="`soft_cap`"):
        jxent.linear_argmax(X, W, soft_cap=0.0)
    with pytest.raises(ValueError, match="does not broadcast"):
        jxent.linear_argmax(X, W, where=np.ones(5, bool))


# --- linear_log_probs ---------------------------------------------------------------

TARGET = RNG.integers(0, V, size=N)
TARGET[[2, 7]] = -100
CLASS_MASK = np.ones(V, bool)
CLASS_MASK[[4, 9]] = False
TARGET = np.where(np.isin(TARGET, [4, 9]), 0, TARGET)
ROW_MASK = np.ones((N, V), bool)
ROW_MASK[3, [1, 2]] = False
ROW_MASK[5, 11] = False
TARGET[3], TARGET[5] = 0, 3
HEAD_OPTIONS = {
    "plain": {},
    "bias+cap": {"bias": True, "soft_cap": 2.5},
    "class mask": {"where": CLASS_MASK, "bias": True},
    "row mask+cap": {"where": ROW_MASK, "soft_cap": 4.0},
}


def _head_inputs(dtype=np.float32):
    return tuple(np.asarray(a, dtype) for a in (X, W, BIAS))


def _log_probs_loss(
    fused, option, chunk, ct, argnums=(0, 1, 2, 3, 4), vocab_chunk=None, target=None
):
    """Σ ct·log p + Σ entropy, fused or from materialised logits (reference)."""
    kw = HEAD_OPTIONS[option]
    target = TARGET if target is None else target
    where = kw.get("where")

    def loss(x, w, b, temperature, cap):
        bias = b if kw.get("bias") else None
        cap = cap if "soft_cap" in kw else None
        if fused:
            lp, ent = jxent.linear_log_probs(
                x, w, target, bias=bias, temperature=temperature, soft_cap=cap,
                where=where, return_entropy=True, chunk_size=chunk,
                vocab_chunk_size=vocab_chunk,
            )  # fmt: skip
        else:
            z = x @ w + (0.0 if bias is None else bias[None, :])
            if cap is not None:
                z = cap * jnp.tanh(z / cap)
            mask = np.ones((N, V), bool) if where is None else where
            lp, ent = ref_log_probs(z, target, temperature, mask, -1)
        return jnp.sum(lp * ct) + jnp.sum(ent), (lp, ent)

    return jax.value_and_grad(loss, argnums=argnums, has_aux=True)


@pytest.mark.parametrize("option", list(HEAD_OPTIONS))
def test_linear_log_probs_matches_float64_reference(option):
    """Values and gradients w.r.t. x, w, bias, temperature and soft_cap
    (ragged chunks of 4 and one chunk) against the float64 formulas."""
    ct = np.arange(1.0, N + 1.0)
    with x64():
        args = (
            *_head_inputs(np.float64),
            0.7,
            2.5 if option != "row mask+cap" else 4.0,
        )
        (_, ref_values), ref_grads = jax.jit(_log_probs_loss(False, option, None, ct))(
            *args
        )
    for chunk in (4, None):
        f = jax.jit(_log_probs_loss(True, option, chunk, np.float32(ct)))
        (_, values), grads = f(
            *_head_inputs(), np.float32(args[3]), np.float32(args[4])
        )
        for a, r in zip(values, ref_values, strict=True):
            assert a.dtype == jnp.float32
            np.testing.assert_allclose(a, r, rtol=2e-6, atol=2e-6)
        names = ("dx", "dw", "dbias", "dtemperature", "dsoft_cap")
        for name, g, r in zip(names, grads, ref_grads, strict=True):
            np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=name)
    assert np.all(np.asarray(values[0])[[2, 7]] == 0)
    assert np.all(np.asarray(grads[0])[[2, 7]] == 0)


@pytest.fixture(params=["rounded", "tangent", "transposed"])
def cpu_dx(request, monkeypatch):
    """Each way a 16-bit head's class blocks give dx on the CPU, forced
    (``_cpu_dx_by``: the host's 16-bit matmuls decide), with its calls at
    trace time.
    Caches are cleared: the mode is not a static argument of the programs."""
    calls = []

    def forced():
        calls.append(request.param)
        return request.param

    monkeypatch.setattr(jxent._linear, "_cpu_dx_by", forced)
    jax.clear_caches()
    yield calls
    jax.clear_caches()


@pytest.mark.parametrize("option", list(HEAD_OPTIONS))
def test_linear_log_probs_bfloat16_gradients(option, cpu_dx):
    """bfloat16 x, w and bias with the entropy, in class blocks of 4 (the
    last shifted left: 4 does not divide V), each of the CPU's ways to dx
    (one transposed matmul of the cotangent rounded to bfloat16, one
    transposed float32 matmul with float32 copies of the operands, or the
    chips' choice: the transposed float32 one with 16-bit logits). Values,
    and gradients w.r.t. x, w and bias (the class blocks' inputs), within
    bfloat16 rounding of the float64 formulas on the rounded inputs
    (normwise)."""
    ct = np.arange(1.0, N + 1.0)
    rounded = tuple(a.astype(jnp.bfloat16) for a in _head_inputs())  # NumPy's cast
    cap = 2.5 if option != "row mask+cap" else 4.0
    blocks = (0, 1, 2)
    target = TARGET.astype(np.int32)  # int64 under x64 met a stale int32 trace
    f = jax.jit(_log_probs_loss(True, option, 4, np.float32(ct), blocks, 4, target))
    (_, values), grads = f(*rounded, np.float32(0.7), np.float32(cap))
    assert cpu_dx, "the CPU's dx mode was not asked for"
    with x64():
        args = (*(a.astype(np.float64) for a in rounded), 0.7, cap)
        ref = jax.jit(_log_probs_loss(False, option, None, ct, blocks, None, target))
        (_, ref_values), ref_grads = jax.tree.map(np.asarray, ref(*args))
    for a, r in zip(values, ref_values, strict=True):
        np.testing.assert_allclose(a, r, rtol=1e-5, atol=1e-5)
    names = ("dx", "dw", "dbias")
    for name, g, r in zip(names, grads, ref_grads, strict=True):
        g = np.asarray(g, np.float64)
        error = np.linalg.norm(g - r) / max(np.linalg.norm(r), 1e-30)
        assert error <= 4e-3, (name, error)
    assert np.all(np.asarray(grads[0], np.float32)[[2, 7]] == 0)


def test_linear_log_probs_check_grads_order_2_both_modes():
    """x, w, bias, temperature and soft_cap; ragged chunks; a class mask."""
    with x64():
        x, w, b = (
            X[:5].astype(np.float64),
            W.astype(np.float64),
            BIAS.astype(np.float64),
        )

        def f(x, w, b, temperature, cap):
            lp, ent = jxent.linear_log_probs(
                x, w, TARGET[:5], bias=b, temperature=temperature, soft_cap=cap,
                where=CLASS_MASK, return_entropy=True, chunk_size=2,
            )  # fmt: skip
            return lp + 0.5 * ent

        check_grads(jax.jit(f), (x, w, b, 0.8, 3.0), order=2, modes=("fwd", "rev"),
                    atol=1e-5, rtol=1e-5)  # fmt: skip


def test_second_derivative_in_temperature_with_an_ignored_position():
    """Reverse over forward mode along a temperature tangent larger than T,
    a position ignored: finite and equal to the float64 reference's.

    An ignored position's row has no class; its softmax was shifted by the
    lowest float, whose derivative w.r.t. T times the tangent overflowed,
    and the discarded infinity met a zero cotangent as NaN (2 and -3 here;
    tangents of at most T were right).
    """
    target = np.array([1, -100, 4])
    with x64():
        x, w = X[:3].astype(np.float64), W.astype(np.float64)
        tx, tw = 0.5 * x, np.flip(W, 1).astype(np.float64)
        everything = np.ones(V, bool)

        def fused(temperature):
            lp, ent = jxent.linear_log_probs(
                x, w, target, temperature=temperature, return_entropy=True
            )
            kl = jxent.linear_distillation_loss(
                x, w, tx, tw, target, beta=0.5, temperature=temperature
            )
            return jnp.sum(lp) + jnp.sum(ent) + kl

        def reference(temperature):
            lp, ent = ref_log_probs(x @ w, target, temperature, everything, -1)
            kl = ref_distillation(x @ w, tx @ tw, target, temperature, 0.5, -1, "mean")
            return jnp.sum(lp) + jnp.sum(ent) + kl

        def second(f, tangent):
            return jax.grad(lambda t: jax.jvp(f, (t,), (tangent,))[1])(1.2)

        for tangent in (2.0, -3.0):  # constants of the program, as users write
            got = jax.jit(lambda f=fused, t=tangent: second(f, t))()
            np.testing.assert_allclose(got, second(reference, tangent), rtol=1e-9)


def test_linear_log_probs_16_bit_and_batch_shape():
    x, w = X[:10].reshape(2, 5, D), W
    t = TARGET[:10].reshape(2, 5)
    lp = jxent.linear_log_probs(x, w, t, chunk_size=3)
    np.testing.assert_allclose(
        lp.reshape(-1), jxent.log_probs(X[:10] @ W, TARGET[:10]), rtol=1e-5, atol=1e-6
    )
    for dtype in (jnp.bfloat16, jnp.float16):
        xs, ws = jnp.asarray(x, dtype), jnp.asarray(w, dtype)
        lp, ent = jxent.linear_log_probs(xs, ws, t, return_entropy=True)
        assert lp.dtype == jnp.float32 and ent.dtype == jnp.float32
        z = jnp.einsum("...d,dv->...v", xs, ws, preferred_element_type=jnp.float32)
        ref = jxent.log_probs(z, t, return_entropy=True)
        np.testing.assert_allclose(lp, ref[0], rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ent, ref[1], rtol=1e-5, atol=1e-5)
    without = jxent.linear_log_probs(x, w, t)
    np.testing.assert_allclose(
        without, jxent.linear_log_probs(x, w, t, return_entropy=True)[0]
    )


def test_linear_log_probs_bad_input():
    with pytest.raises(TypeError, match="`x`"):
        jxent.linear_log_probs(X.astype(np.int32), W, TARGET)
    with pytest.raises(ValueError, match="class index 13"):
        jxent.linear_log_probs(X, W, np.where(TARGET == 0, 13, TARGET))
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        jxent.linear_log_probs(X, W, TARGET, temperature=0.0)
    with pytest.raises(ValueError, match=r"`target` must have shape"):
        jxent.linear_log_probs(X, W, TARGET[:4])

    def total(x, t, temperature):
        lp, ent = jxent.linear_log_probs(x, W, t, temperature=temperature,
                                         return_entropy=True, chunk_size=4)  # fmt: skip
        return jnp.sum(lp + ent)

    grad = jax.jit(jax.value_and_grad(total, argnums=(0, 2)))
    bad_t = TARGET.copy()
    bad_t[0] = 99
    value, (gx, gt) = grad(X, bad_t, 1.0)
    assert np.isnan(value) and np.all(np.isnan(gx[0])) and np.isnan(gt)
    assert np.all(np.isfinite(np.asarray(gx)[1:]))
    value, (gx, gt) = grad(X, TARGET, -1.0)
    assert np.isnan(value) and np.isnan(gt)
    # Every position's gradient, the ignored ones' too (they were 0).
    assert np.all(np.isnan(np.asarray(gx)))


def test_linear_log_probs_edges_of_where_and_soft_cap():
    """A 0-d ``where`` broadcasts like any mask (it raised IndexError); with
    ``soft_cap``, an ignored position whose hidden state is NaN or inf (the
    cap's slope there is NaN) has zero gradients, as without a cap. Oracle:
    float64 log-softmax of the capped logits."""
    x = X.copy()
    x[2] = np.nan  # TARGET[2] is ignored
    x[7, 0] = np.inf  # so is TARGET[7]

    def total(x, cap):
        lp, ent = jxent.linear_log_probs(
            x, W, TARGET, soft_cap=cap, return_entropy=True, where=np.bool_(True)
        )
        return jnp.sum(lp) + jnp.sum(ent)

    value, (gx, gcap) = jax.jit(jax.value_and_grad(total, argnums=(0, 1)))(x, 3.0)
    _, tangent = jax.jit(lambda x: jax.jvp(total, (x, 3.0), (jnp.ones_like(x), 1.0)))(x)
    assert np.all(np.asarray(gx)[[2, 7]] == 0.0)
    assert np.all(np.isfinite(gx)) and np.isfinite(gcap) and np.isfinite(tangent)
    with x64():
        z = 3.0 * np.tanh(X.astype(np.float64) @ W.astype(np.float64) / 3.0)
        log_p = z - np.log(np.exp(z).sum(-1, keepdims=True))
        keep = TARGET != -100
        lp = log_p[np.arange(N), np.where(keep, TARGET, 0)] * keep
        ent = -(np.exp(log_p) * log_p).sum(-1) * keep
    np.testing.assert_allclose(value, lp.sum() + ent.sum(), rtol=1e-5)
    np.testing.assert_array_equal(
        jxent.linear_argmax(X, W, where=jnp.array(True)), np.argmax(X @ W, axis=-1)
    )


# --- linear_distillation_loss -----------------------------------------------------

DT = 5  # the teacher's own hidden size
TX = RNG.normal(size=(N, DT)).astype(np.float32)
TW = RNG.normal(size=(DT, V)).astype(np.float32)
TB = RNG.normal(size=V).astype(np.float32)
DISTILL_ARGS = (X, W, BIAS, TX, TW, TB)


def _distill_loss(fused, reduction, chunk, ct, static_beta=None, argnums=None):
    """Σ ct·loss as a function of every floating input (beta traced, or for
    the reference static and not differentiated)."""

    def loss(x, w, b, tx, tw, tb, temperature, beta):
        beta = beta if static_beta is None else static_beta
        if fused:
            out = jxent.linear_distillation_loss(
                x, w, tx, tw, TARGET, bias=b, teacher_bias=tb, beta=beta,
                temperature=temperature, reduction=reduction, chunk_size=chunk,
            )  # fmt: skip
        else:
            out = ref_distillation(
                x @ w + b[None, :], tx @ tw + tb[None, :], TARGET, temperature,
                beta, -1, reduction,
            )  # fmt: skip
        return jnp.sum(out * ct)

    if argnums is None:
        argnums = tuple(range(8 if fused else 7))
    return jax.value_and_grad(loss, argnums=argnums)


@pytest.mark.parametrize("reduction", ["mean", "none", "mean-two-passes"])
def test_linear_distillation_matches_float64_reference(reduction, monkeypatch):
    """Every beta regime and every input's gradient, chunks of 4 (ragged)
    and one chunk, against the float64 formulas on materialised logits.
    ``"mean"`` also with dw in two column ranges (the large 16-bit heads'
    order, here in float32): the second range's gradient from its own
    recomputed logits and the first pass's kept reductions."""
    if reduction == "mean-two-passes":
        monkeypatch.setattr(jxent._linear_heads, "_dw_passes", lambda *_: 2)
        reduction = "mean"
    ct = np.arange(1.0, N + 1.0) if reduction == "none" else 1.0
    fused = jax.jit(_distill_loss(True, reduction, 4, np.float32(ct)))
    whole = jax.jit(_distill_loss(True, reduction, None, np.float32(ct)))
    for beta in (0.0, 0.3, 1.0):
        with x64():
            ref_fn = _distill_loss(False, reduction, None, ct, beta)
            args64 = (*(a.astype(np.float64) for a in DISTILL_ARGS), 1.4, beta)
            ref_value, ref_grads = jax.jit(ref_fn)(*args64)
        args = (*DISTILL_ARGS, np.float32(1.4), np.float32(beta))
        for f in (fused, whole):
            value, grads = f(*args)
            assert value.dtype == jnp.float32
            np.testing.assert_allclose(value, ref_value, rtol=2e-6, atol=2e-6)
            for i, (g, r) in enumerate(zip(grads, ref_grads, strict=False)):
                np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=str(i))


@pytest.fixture
def chip_rows(monkeypatch):
    """The TPU/GPU programs on the CPU, with rows that differ from the CPU's.

    Off the CPU the per-token heads' forward pass takes larger whole-row
    chunks than on it (``chip_row_chunk``). Here ``on_cpu`` answers "not the
    CPU" and the tiles are shrunk so that the two sizes differ at N = 11:
    2 rows sized for the CPU, 4 for the chips. The sizes are static
    arguments of the jitted programs: no earlier trace is reused.
    """
    import jxent._linear as linear

    chosen = _answer_not_the_cpu(monkeypatch, linear)
    monkeypatch.setattr(linear, "_BLOCK_TILE_BYTES", 4 * V * 2)
    monkeypatch.setattr(linear, "_ROW_TILE_SHARE", 2)
    assert linear._row_chunk(N, V, cpu_sized=True) == 2
    assert linear._row_chunk(N, V) == 4
    yield chosen


@pytest.mark.parametrize("option", ["plain", "row mask+cap"])
def test_chip_rows_of_the_per_token_heads(chip_rows, option, monkeypatch):
    """linear_log_probs with the entropy and the per-position distillation,
    values and gradients w.r.t. x, w and bias (the class-block order's
    inputs), against the float64 formulas."""
    ct = np.arange(1.0, N + 1.0)
    xwb = (0, 1, 2)
    # int32 targets in both programs: jax 0.10.2's cached jnp.where lowering
    # mixes up the float64 program's int64 targets and the float32 one's.
    monkeypatch.setattr(sys.modules[__name__], "TARGET", TARGET.astype(np.int32))
    f = jax.jit(_log_probs_loss(True, option, None, np.float32(ct), xwb))
    (_, values), grads = f(*_head_inputs(), np.float32(0.7), np.float32(4.0))
    with x64():
        args = (*_head_inputs(np.float64), 0.7, 4.0)
        ref = _log_probs_loss(False, option, None, ct, xwb)
        (_, ref_values), ref_grads = jax.jit(ref)(*args)
    for a, r in zip(values, ref_values, strict=True):
        np.testing.assert_allclose(a, r, rtol=2e-6, atol=2e-6)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=True)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=str(i))
    assert chip_rows, "the chips' rows were not chosen"
    if option != "plain":
        return
    fused = jax.jit(_distill_loss(True, "none", None, np.float32(ct), argnums=xwb))
    value, grads = fused(*DISTILL_ARGS, np.float32(1.4), np.float32(0.3))
    with x64():
        ref_fn = _distill_loss(False, "none", None, ct, 0.3, argnums=xwb)
        args64 = (*(a.astype(np.float64) for a in DISTILL_ARGS), 1.4, 0.3)
        ref_value, ref_grads = jax.jit(ref_fn)(*args64)
    np.testing.assert_allclose(value, ref_value, rtol=2e-6, atol=2e-6)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=False)):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5, err_msg=str(i))


@pytest.mark.parametrize("ignore_index", [-100, 0])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_linear_distillation_without_target_counts_every_position(
    reduction, ignore_index
):
    """``target=None``: no position is ignored, whatever ``ignore_index``."""
    x, w, b, tx, tw, tb = DISTILL_ARGS
    value = jxent.linear_distillation_loss(
        x, w, tx, tw, bias=b, teacher_bias=tb, beta=0.3, reduction=reduction,
        ignore_index=ignore_index, chunk_size=4,
    )  # fmt: skip
    with x64():
        want = ref_distillation(
            *(np.asarray(a, np.float64) for a in (x @ w + b, tx @ tw + tb)),
            None, 1.0, 0.3, -1, reduction,
        )  # fmt: skip
    assert np.all(np.asarray(want) != 0)
    np.testing.assert_allclose(value, want, rtol=2e-6, atol=2e-6)


@pytest.mark.parametrize("reduction", ["none", "mean-two-passes"])
def test_linear_distillation_bfloat16_gradients_of_every_input(reduction, monkeypatch):
    """bfloat16 student and teacher, every input differentiated (the per-token
    path then takes the token chunks with the teacher's w as an option):
    gradients in bfloat16 within its rounding of the float64 formulas on the
    rounded inputs. ``reduction="none"`` raised a dtype mismatch between the
    teacher's bfloat16 w and its float32 tangent. ``"mean"`` with dw in two
    column ranges, as at the large 16-bit heads: the second range's gradient
    from its own recomputed logits and the first pass's kept reductions."""
    if reduction == "mean-two-passes":
        monkeypatch.setattr(jxent._linear, "_DW_SPLIT_BYTES", 0)
        reduction = "mean"
    ct = np.arange(1.0, N + 1.0) if reduction == "none" else 1.0
    rounded = tuple(np.asarray(jnp.asarray(a, jnp.bfloat16)) for a in DISTILL_ARGS)
    with x64():
        ref_fn = _distill_loss(False, reduction, None, ct, 0.3)
        args64 = (*(a.astype(np.float64) for a in rounded), 1.4, 0.3)
        ref_value, ref_grads = jax.jit(ref_fn)(*args64)
    fused = jax.jit(_distill_loss(True, reduction, 4, np.float32(ct)))
    value, grads = fused(*rounded, np.float32(1.4), np.float32(0.3))
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    for i, (g, r) in enumerate(zip(grads, ref_grads, strict=False)):
        if i < 6:
            assert g.dtype == jnp.bfloat16, i
        scale = np.abs(r).max()
        np.testing.assert_allclose(
            np.asarray(g, np.float64), r, rtol=2e-2, atol=1e-2 * scale, err_msg=str(i)
        )


def test_linear_distillation_bfloat16_student_gradients(cpu_dx):
    """Per position, the bfloat16 student's x, w and bias differentiated:
    the class blocks' path, each of the CPU's ways to dx (``cpu_dx``);
    gradients within bfloat16 rounding
    of the float64 formulas on the rounded inputs (normwise)."""
    ct = np.arange(1.0, N + 1.0)
    rounded = tuple(a.astype(jnp.bfloat16) for a in DISTILL_ARGS)  # NumPy's cast
    with x64():
        ref_fn = _distill_loss(False, "none", None, ct, 0.3, argnums=(0, 1, 2))
        args64 = (*(a.astype(np.float64) for a in rounded), 1.4, 0.3)
        ref_value, ref_grads = jax.tree.map(np.asarray, jax.jit(ref_fn)(*args64))
    fused = jax.jit(_distill_loss(True, "none", 4, np.float32(ct), argnums=(0, 1, 2)))
    value, grads = fused(*rounded, np.float32(1.4), np.float32(0.3))
    assert cpu_dx, "the CPU's dx mode was not asked for"
    np.testing.assert_allclose(value, ref_value, rtol=1e-5, atol=1e-5)
    for name, g, r in zip(("dx", "dw", "dbias"), grads, ref_grads, strict=True):
        assert g.dtype == jnp.bfloat16, name
        g = np.asarray(g, np.float64)
        error = np.linalg.norm(g - r) / np.linalg.norm(r)
        assert error <= 4e-3, (name, error)


def test_linear_distillation_check_grads_both_modes():
    """Every floating input, first order (the issue's requirement; order 2
    passes as well but takes a minute on 2 cores); the "mean" path, whose
    gradients are formed with the loss (the per-token path is
    linear_log_probs's, checked to order 2)."""
    with x64():
        args = tuple(a[:3] if a.shape[0] == N else a[..., :6] for a in DISTILL_ARGS)
        args = tuple(a.astype(np.float64) for a in args)

        def f(x, w, b, tx, tw, tb, temperature, beta):
            return jxent.linear_distillation_loss(
                x, w, tx, tw, TARGET[:3], bias=b, teacher_bias=tb, beta=beta,
                temperature=temperature, chunk_size=2,
            )  # fmt: skip

        check_grads(jax.jit(f), (*args, 1.2, 0.4), order=1, modes=("fwd", "rev"),
                    atol=1e-6, rtol=1e-6)  # fmt: skip


def test_linear_distillation_bad_input():
    with pytest.raises(TypeError, match="`teacher_x`"):
        jxent.linear_distillation_loss(X, W, TX.astype(np.int32), TW)
    message = r"`x @ w`.shape=\(11, 13\), `teacher_x @ teacher_w`.shape=\(10, 13\)"
    with pytest.raises(ValueError, match=message) as raised:
        jxent.linear_distillation_loss(X, W, TX[:10], TW)
    inputs = f"x.shape={X.shape}, w.shape={W.shape}, teacher_x.shape={TX[:10].shape}"
    assert inputs in str(raised.value)  # the inputs' shapes too
    message = r"`x @ w`.shape=\(11, 13\), `teacher_x @ teacher_w`.shape=\(11, 12\)"
    with pytest.raises(ValueError, match=message):
        jxent.linear_distillation_loss(X, W, TX, TW[:, :12])
    with pytest.raises(ValueError, match=r"`beta` must be in \[0, 1\]"):
        jxent.linear_distillation_loss(X, W, TX, TW, beta=2.0)
    with pytest.raises(ValueError, match="`temperature` must be > 0"):
        jxent.linear_distillation_loss(X, W, TX, TW, temperature=0.0)
    with pytest.raises(ValueError, match="class index 13"):
        jxent.linear_distillation_loss(X, W, TX, TW, np.full(N, 13))
    grad = jax.jit(
        jax.value_and_grad(
            lambda x, tw, t, temperature, beta: jxent.linear_distillation_loss(
                x, W, TX, tw, t, temperature=temperature, beta=beta, chunk_size=4
            ),
            argnums=(0, 1, 3, 4),
        )
    )
    bad_t = TARGET.copy()
    bad_t[0] = 13
    for args in ((bad_t, 1.0, 0.0), (TARGET, -1.0, 0.0), (TARGET, 1.0, 1.5)):
        value, grads = grad(X, TW, *args)
        assert np.isnan(value)
        assert all(np.all(np.isnan(g)) for g in grads)
    # Per position: a bad temperature or beta makes every derivative NaN,
    # the ignored positions' and beta's too (they were 0).
    per_position = jax.jit(
        jax.grad(
            lambda x, temperature, beta: jnp.sum(
                jxent.linear_distillation_loss(
                    x,
                    W,
                    TX,
                    TW,
                    TARGET,
                    temperature=temperature,
                    beta=beta,
                    reduction="none",
                )
            ),
            argnums=(0, 1, 2),
        )
    )
    for temperature, beta in ((-1.0, 0.0), (1.0, 1.5)):
        grads = per_position(X, temperature, beta)
        assert all(np.all(np.isnan(g)) for g in grads)


def test_vmap_of_the_heads():
    x, t, tx = X[:10].reshape(2, 5, D), TARGET[:10].reshape(2, 5), TX[:10]
    tx = tx.reshape(2, 5, DT)
    lp = jax.vmap(lambda x, t: jxent.linear_log_probs(x, W, t, chunk_size=2))(x, t)
    np.testing.assert_allclose(lp, jxent.linear_log_probs(x, W, t), rtol=1e-6)

    def grad(loss):
        return jax.vmap(jax.grad(loss, argnums=(0, 1)))(x, tx)

    fused = grad(lambda x, tx: jxent.linear_distillation_loss(
        x, W, tx, TW, beta=0.5, chunk_size=2))  # fmt: skip
    plain = grad(lambda x, tx: jxent.distillation_loss(x @ W, tx @ TW, beta=0.5))
    for a, b in zip(fused, plain, strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


CASES = Path(__file__).parent / "multidevice" / "heads_cases.py"


@pytest.mark.heavy
def test_heads_on_eight_devices(full):
    """shard_map with class and batch axes: tests/multidevice/heads_cases.py."""
    run_on_eight_devices(CASES, full=full)


BUDGET_SHAPE = (2048, 1024, 131072)


@pytest.mark.parametrize(
    ("head", "dtype"),
    [
        ("log_probs", jnp.float32),
        ("log_probs", jnp.bfloat16),
        ("log_probs_alone", jnp.bfloat16),
        ("distillation", jnp.float32),
        ("distillation", jnp.bfloat16),
        ("jsd", jnp.bfloat16),
        ("distillation_none", jnp.bfloat16),
    ],
)
def test_value_and_grad_fits_the_linear_cross_entropy_budget(head, dtype):
    """XLA's temporaries of value_and_grad w.r.t. x and w (compiled, not run)
    at (N, D, V) = (2048, 1024, 131072) stay within linear_cross_entropy's
    budget, 1.5 x (dx + dw in float32) + 64 MiB. Measured 0.19, 0.22, 0.54,
    0.52 and 0.62 of it (bfloat16 KL and JSD: 0.63 and 0.86 while the second
    column range of dw recomputed whole rows) (before: 1.06, 1.98, 0.69,
    1.85, 2.00: whole-vocabulary
    dw products per chunk; for bfloat16 log-probabilities a float32 dw and a
    float32 copy of w, now class blocks of dw accumulated in float32; a
    float32 copy of a 16-bit teacher head; one float32 dw). The
    log-probabilities hold no float32 copy of w (0.82 with one), nor does
    the per-token divergence (``reduction="none"``, class blocks) of the
    teacher's w: 0.35 of the budget, 0.96 with that copy. The 16-bit
    per-token heads stack the blocks of dw's cotangent on the CPU: 0.48 and
    0.62 (0.20 and 0.35 unstacked)."""
    n, d, v = BUDGET_SHAPE
    x = jax.ShapeDtypeStruct((n, d), dtype)
    w = jax.ShapeDtypeStruct((d, v), dtype)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)
    tx = jax.ShapeDtypeStruct((n, d), dtype)
    tw = jax.ShapeDtypeStruct((d, v), dtype)  # a frozen teacher
    if head == "log_probs":

        def loss(x, w, t, tx, tw):
            lp, ent = jxent.linear_log_probs(x, w, t, return_entropy=True)
            return jnp.sum(lp) + 0.01 * jnp.sum(ent)

    elif head == "log_probs_alone":

        def loss(x, w, t, tx, tw):
            return jnp.sum(jxent.linear_log_probs(x, w, t))

    else:
        beta = 0.5 if head == "jsd" else 0.0

        reduction = "none" if head == "distillation_none" else "mean"

        def loss(x, w, t, tx, tw):
            return jnp.sum(
                jxent.linear_distillation_loss(
                    x, w, tx, tw, t, beta=beta, reduction=reduction
                )
            )

    program = jax.jit(jax.value_and_grad(loss, argnums=(0, 1)))
    memory = program.lower(x, w, t, tx, tw).compile().memory_analysis()
    budget = 1.5 * 4 * (n * d + d * v) + 64 * 2**20
    limit = {"log_probs": 0.3, "distillation_none": 0.5}.get(head, 1.0) * budget
    if head != "distillation" and head != "jsd" and dtype == jnp.bfloat16:
        # The per-token heads stack the blocks of a 16-bit dw's cotangent on
        # the CPU (jxent._linear, _per_token_block_tangents): dw's size more,
        # for 0.6 of the time.
        limit = limit + 2 * d * v
    assert memory.temp_size_in_bytes <= limit, memory.temp_size_in_bytes / budget


@pytest.mark.parametrize(
    ("flags", "expected"),
    [
        (("GenuineIntel", "fpu avx512f avx512_bf16 amx_bf16 amx_tile"), "rounded"),
        (("GenuineIntel", "fpu avx512f avx512_bf16"), "transposed"),
        (("AuthenticAMD", "fpu avx512f avx512_bf16 avx512_vnni"), "rounded"),
        (("AuthenticAMD", "fpu avx2 fma"), "transposed"),
        ((None, "fpu avx512f avx512_bf16"), "transposed"),  # no vendor line
        (None, "transposed"),  # no /proc/cpuinfo (not Linux)
    ],
    ids=["intel-amx", "intel-avx512-bf16", "amd-avx512-bf16", "amd-avx2",
         "no-vendor", "no-cpuinfo"],
)  # fmt: skip
def test_cpu_dx_by_the_host_bfloat16_matmuls(flags, expected, monkeypatch, tmp_path):
    """AMX (``amx_bf16`` among the flags) and an AMD CPU with
    ``avx512_bf16`` take 16-bit matmuls (primal for one output, the rounded
    transpose for two), anything else, an unreadable cpuinfo included, the
    transposed float32 one (an Intel CPU with ``avx512_bf16`` alone measured
    slower 16-bit matmuls)."""
    import builtins

    real_open = builtins.open
    cpuinfo = tmp_path / "cpuinfo"
    if flags is not None:
        vendor, flag_list = flags
        vendor_line = "" if vendor is None else f"vendor_id\t: {vendor}\n"
        cpuinfo.write_text(
            f"processor\t: 0\n{vendor_line}cpu family\t: 25\n"
            f"flags\t\t: {flag_list}\n\nprocessor\t: 1\n{vendor_line}"
            f"flags\t\t: {flag_list}\n\n"
        )

    def fake_open(path, *args, **kwargs):
        if path == "/proc/cpuinfo":
            return real_open(cpuinfo, *args, **kwargs)
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(builtins, "open", fake_open)
    jxent._linear._cpu_bfloat16_matmuls.cache_clear()
    try:
        assert jxent._linear._cpu_dx_by() == expected
        fast = expected != "transposed"
        assert jxent._linear._cpu_has_fast_bfloat16_matmuls() == fast
    finally:
        jxent._linear._cpu_bfloat16_matmuls.cache_clear()


@pytest.mark.parametrize("order", ["cpu", "vocab_outer"])
def test_empty_batch_values_and_gradients(order, monkeypatch):
    """No positions at all (an empty batch): the LM-head losses give 0 (or
    empty arrays) and zero gradients of the inputs' shapes in both modes. The
    per-token heads' tangent reshaped an empty tile with -1 (ZeroDivisionError)
    and the class blocks read the first token's position (IndexError)."""
    if order == "vocab_outer":  # the chips' order (a static option: no stale trace)
        monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)
    x, w, b = jnp.zeros((0, 8)), jnp.ones((8, 10)), jnp.zeros(10)
    t = jnp.zeros((0,), jnp.int32)
    tx, tw = jnp.zeros((0, 5)), jnp.ones((5, 10))
    losses = {
        "log_probs": lambda x, w, b: jnp.sum(
            jnp.stack(jxent.linear_log_probs(x, w, t, bias=b, return_entropy=True))
        ),
        "cross_entropy": lambda x, w, b: jxent.linear_cross_entropy(x, w, t, bias=b),
        "probabilities": lambda x, w, b: jxent.linear_cross_entropy(
            x, w, jnp.zeros((0, 10)), bias=b
        ),
        "lse": lambda x, w, b: jnp.sum(
            jxent.linear_cross_entropy(x, w, t, bias=b, return_lse=True)[1]
        ),
        "distillation": lambda x, w, b: jxent.linear_distillation_loss(
            x, w, tx, tw, bias=b, beta=0.5
        ),
    }
    for name, f in losses.items():
        value, grads = jax.jit(jax.value_and_grad(f, (0, 1, 2)))(x, w, b)
        assert value == 0.0, name
        for g, a in zip(grads, (x, w, b), strict=True):
            assert g.shape == a.shape and not np.any(np.asarray(g)), name
        assert jax.jvp(f, (x, w, b), (x, w, b))[1] == 0.0, name
    assert jxent.linear_argmax(x, w).shape == (0,)


@pytest.mark.parametrize("order", ["cpu", "vocab_outer"])
def test_no_hidden_features(order, monkeypatch):
    """Hidden states of no features (D = 0): every logit is the bias, as
    ``x @ w + bias`` gives. The heads counted positions with ``x[..., 0]``
    (IndexError) and ``linear_argmax`` reshaped with -1 (ZeroDivisionError).
    Values and gradients w.r.t. the bias against float64 formulas; the
    gradients w.r.t. ``x`` and ``w`` are empty arrays of their shapes."""
    if order == "vocab_outer":
        monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)
    rng = np.random.default_rng(5)
    x, w = np.zeros((2, 3, 0)), np.zeros((0, 6))
    b, tb = rng.normal(size=6), rng.normal(size=6)
    t = np.array([[0, 5, -100], [2, 2, 1]])
    ct = rng.normal(size=(2, 3))
    z = lambda b: jnp.broadcast_to(b, (2, 3, 6))
    losses = {
        "cross_entropy": (
            lambda x, w, b: jxent.linear_cross_entropy(x, w, t, bias=b),
            lambda b: jxent.cross_entropy(z(b), t),
        ),
        "log_probs": (
            lambda x, w, b: jnp.sum(
                ct * sum(jxent.linear_log_probs(x, w, t, bias=b, return_entropy=True))
            ),
            lambda b: jnp.sum(ct * sum(ref_log_probs(z(b), t, 1.0, True, -1))),
        ),
        "distillation": (
            lambda x, w, b: jxent.linear_distillation_loss(
                x, w, x[..., :0], w[:0], t, bias=b, teacher_bias=tb, beta=0.5
            ),
            lambda b: ref_distillation(z(b), z(tb), t, 1.0, 0.5, -1, "mean"),
        ),
    }
    with x64():
        for name, (fused, ref) in losses.items():
            value, (dx, dw, db) = jax.value_and_grad(fused, (0, 1, 2))(x, w, b)
            want, want_db = jax.value_and_grad(ref)(b)
            np.testing.assert_allclose(value, want, rtol=1e-12, err_msg=name)
            np.testing.assert_allclose(db, want_db, rtol=1e-12, atol=1e-15)
            assert dx.shape == x.shape and dw.shape == w.shape, name
        np.testing.assert_array_equal(
            jxent.linear_argmax(x, w, bias=b), np.full((2, 3), np.argmax(b))
        )


def _padded_losses(target, ct):
    """The LM-head losses as functions of ``(x, w, bias, teacher_x, teacher_w)``:
    fused, and the float64 formulas on materialised logits (reference)."""

    def cross_entropy(fused, x, w, b, tx, tw):
        if fused:
            return jxent.linear_cross_entropy(x, w, target, bias=b, chunk_size=4)
        z = x @ w + b[None, :]
        valid = target != -100
        nll = jax.nn.logsumexp(z, axis=1) - z[np.arange(N), np.where(valid, target, 0)]
        return jnp.sum(jnp.where(valid, nll, 0.0)) / np.sum(valid)

    def log_probs(fused, x, w, b, tx, tw):
        if fused:
            lp, ent = jxent.linear_log_probs(
                x, w, target, bias=b, temperature=0.8, return_entropy=True, chunk_size=4
            )
        else:
            z = x @ w + b[None, :]
            lp, ent = ref_log_probs(z, target, 0.8, np.ones((N, V), bool), -1)
        return jnp.sum(lp * ct) + jnp.sum(ent)

    def distillation(reduction):
        def loss(fused, x, w, b, tx, tw):
            if fused:
                out = jxent.linear_distillation_loss(
                    x, w, tx, tw, target, bias=b, beta=0.5, reduction=reduction,
                    chunk_size=4,
                )  # fmt: skip
            else:
                out = ref_distillation(
                    x @ w + b[None, :], tx @ tw, target, 1.0, 0.5, -1, reduction
                )
            return jnp.sum(out * (ct if reduction == "none" else 1.0))

        return loss

    return {
        "cross_entropy": cross_entropy,
        "log_probs": log_probs,
        "distillation sum": distillation("sum"),
        "distillation none": distillation("none"),
    }


@pytest.mark.parametrize("order", ["cpu", "vocab_outer"])
# CI: NaN padding (inf padding meets the same 0 products), pytest --full both.
@pytest.mark.parametrize("padding", [np.nan, full_only(np.inf)])
def test_padding_hidden_states_do_not_reach_the_gradients(order, padding, monkeypatch):
    """Ignored positions (padding) whose hidden states are NaN or inf (a
    fully masked attention row), the student's and the teacher's: the losses
    and every gradient equal the float64 formulas over the other positions,
    in both modes, and the padding's own dx is exactly 0. ``x_cᵀ dz`` made
    dw NaN (``NaN · 0``), and with it the forward-mode tangent of a sum."""
    if order == "vocab_outer":  # the chips' order (a static option: no stale trace)
        monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)
    pad = np.array([2, 7])  # TARGET's ignored positions
    x, tx = X.copy(), TX.copy()
    x[pad], tx[pad] = padding, padding
    args = (x, W, BIAS, tx, TW)
    clean = (
        np.where(np.isfinite(x), x, 0.0),
        W,
        BIAS,
        np.where(np.isfinite(tx), tx, 0.0),
        TW,
    )
    tangents = tuple(RNG.normal(size=a.shape).astype(np.float32) for a in args)
    ct = np.arange(1.0, N + 1.0)
    for name, loss in _padded_losses(TARGET, ct).items():
        with x64():
            ref = functools.partial(loss, False)
            args64 = tuple(a.astype(np.float64) for a in clean)
            want, want_grads = jax.value_and_grad(ref, range(5))(*args64)
            want_tangent = jax.jvp(
                ref, args64, tuple(t.astype(np.float64) for t in tangents)
            )[1]
        fused = functools.partial(loss, True)
        value, grads = jax.jit(jax.value_and_grad(fused, range(5)))(*args)
        tangent = jax.jit(functools.partial(jax.jvp, fused, tangents=tangents))(args)[1]
        np.testing.assert_allclose(value, want, rtol=2e-6, err_msg=name)
        np.testing.assert_allclose(
            tangent, want_tangent, rtol=2e-5, atol=2e-5, err_msg=name
        )
        for i, (g, r) in enumerate(zip(grads, want_grads, strict=True)):
            np.testing.assert_allclose(
                g, r, rtol=2e-5, atol=2e-5, err_msg=f"{name} {i}"
            )
        assert not np.any(np.asarray(grads[0])[pad]) and not np.any(
            np.asarray(grads[3])[pad]
        )


@pytest.mark.parametrize("order", ["cpu", "vocab_outer"])
def test_ignored_positions_keep_their_own_logsumexp(order, monkeypatch):
    """``return_lse``: an ignored position's logsumexp (and its gradient) is
    its own row's, whatever zeroing the padding's bad states does for dw."""
    if order == "vocab_outer":
        monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", True)

    def loss(fused, x, w, b):
        if fused:
            value, lse = jxent.linear_cross_entropy(
                x, w, TARGET, bias=b, chunk_size=4, return_lse=True
            )
        else:
            z = x @ w + b[None, :]
            valid = TARGET != -100
            lse = jax.nn.logsumexp(z, axis=1)
            nll = lse - z[np.arange(N), np.where(valid, TARGET, 0)]
            value = jnp.sum(jnp.where(valid, nll, 0.0)) / np.sum(valid)
        return value + 0.1 * jnp.sum(lse * np.arange(1.0, N + 1.0))

    with x64():
        args64 = tuple(a.astype(np.float64) for a in (X, W, BIAS))
        want, want_grads = jax.value_and_grad(functools.partial(loss, False), range(3))(
            *args64
        )
    value, grads = jax.jit(jax.value_and_grad(functools.partial(loss, True), range(3)))(
        X, W, BIAS
    )
    np.testing.assert_allclose(value, want, rtol=2e-6)
    for g, r in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(g, r, rtol=2e-5, atol=2e-5)
