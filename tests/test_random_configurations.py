"""The LM-head losses at randomly drawn configurations, against float64 formulas.

Each seed draws a batch shape, D, V, the options (class weights, smoothing,
z-loss, soft cap, a class mask, bias, ``ignore_index``, probability targets,
temperature, beta, a teacher of its own hidden size, reductions, the
logsumexp output, the entropy), ragged ``chunk_size`` / ``vocab_chunk_size``
and the code path (token- or vocabulary-outer order, one or two ``dw``
passes), and compares the value, a VJP and a JVP w.r.t. every floating
input with the materialised formulas (``cross_entropy`` on ``x @ w + b``,
itself checked against torch, and ``test_rl``'s float64 references). CI runs
two seeds per head; ``pytest --full`` forty (a run of 400 such draws found the
empty ``dw`` range at V = 1).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only, x64
from test_rl import ref_distillation, ref_log_probs

import jxent
import jxent._linear
import jxent._linear_heads

HEADS = ("cross_entropy", "log_probs", "distillation")
CI_SEEDS = range(2)
SEEDS = [*CI_SEEDS, *(full_only(seed) for seed in range(2, 40))]


def _with_bias(z, b):
    return z if b is None else z + jnp.reshape(b, (1,) * (z.ndim - 1) + (-1,))


def _draw(rng, head: str) -> dict:
    """A configuration: arrays (float64) and options."""
    vocab, depth = int(rng.integers(1, 10)), int(rng.integers(1, 5))
    batch = tuple(int(s) for s in rng.integers(1, 4, size=int(rng.integers(1, 3))))
    c = {
        "x": rng.normal(size=(*batch, depth)),
        "w": 2 * rng.normal(size=(depth, vocab)),
        "b": rng.normal(size=vocab) if rng.random() < 0.5 else None,
        "ignore_index": int(rng.choice([-100, 0])),
        "chunk_size": [None, 1, 2, 3, 5][int(rng.integers(0, 5))],
        "vocab_chunk_size": [None, 1, 2, 3, 5][int(rng.integers(0, 5))],
        "vocab_outer": [None, True, False][int(rng.integers(0, 3))],
        "dw_passes": int(rng.choice([1, 2])),
        "where": None,
    }
    soft = head == "cross_entropy" and rng.random() < 0.25
    if soft:
        c["ignore_index"] = -100
        target = rng.dirichlet(np.ones(vocab), size=batch)
    else:
        target = rng.integers(0, vocab, size=batch)
        if rng.random() < 0.4:
            target.flat[0] = c["ignore_index"]
    if vocab > 1 and rng.random() < 0.25:
        mask = rng.random(vocab) < 0.7
        mask[0] = True
        c["where"] = mask
        if soft:
            target = target * mask
            target = target / target.sum(-1, keepdims=True)
        else:  # no target on an excluded class (NaN by design)
            target = np.where(np.isin(target, np.flatnonzero(~mask)), 0, target)
    c["target"] = target
    if head == "cross_entropy":
        c["options"] = {
            "weight": rng.uniform(0.1, 2, size=vocab) if rng.random() < 0.4 else None,
            "label_smoothing": float(rng.choice([0.0, 0.0, 0.2])),
            "z_loss": float(rng.choice([0.0, 0.0, 1e-2])),
            "soft_cap": float(rng.choice([0.0, 0.0, 3.0])) or None,
            "reduction": str(rng.choice(["none", "mean", "sum"])),
            "return_lse": bool(rng.random() < 0.2),
        }
    elif head == "log_probs":
        c["options"] = {
            "temperature": float(rng.choice([1.0, 0.7, 2.0])),
            "soft_cap": float(rng.choice([0.0, 0.0, 3.0])) or None,
            "return_entropy": bool(rng.random() < 0.5),
        }
    else:
        teacher_depth = int(rng.integers(1, 5))
        c["teacher_x"] = rng.normal(size=(*batch, teacher_depth))
        c["teacher_w"] = 2 * rng.normal(size=(teacher_depth, vocab))
        c["teacher_bias"] = rng.normal(size=vocab) if rng.random() < 0.5 else None
        c["with_target"] = bool(rng.random() < 0.7)
        c["options"] = {
            "temperature": float(rng.choice([1.0, 0.7, 2.0])),
            "beta": float(rng.choice([0.0, 1.0, 0.3])),
            "reduction": str(rng.choice(["none", "mean", "sum"])),
        }
    return c


def _losses(head: str, c: dict):
    """(fused, reference, floating arguments)."""
    t, opts, mask = c["target"], c["options"], c["where"]
    chunks = {"chunk_size": c["chunk_size"], "vocab_chunk_size": c["vocab_chunk_size"]}
    ignore = c["ignore_index"]
    if head == "cross_entropy":
        kw = {**opts, "ignore_index": ignore, "where": mask}

        def fused(x, w, b):
            return jxent.linear_cross_entropy(x, w, t, bias=b, **kw, **chunks)

        def reference(x, w, b):
            return jxent.cross_entropy(_with_bias(x @ w, b), t, **kw)

        return fused, reference, (c["x"], c["w"], c["b"])
    if head == "log_probs":
        cap, temperature = opts["soft_cap"], opts["temperature"]

        def fused(x, w, b):
            return jxent.linear_log_probs(
                x, w, t, bias=b, where=mask, ignore_index=ignore, **opts, **chunks
            )

        def reference(x, w, b):
            z = _with_bias(x @ w, b)
            z = z if cap is None else cap * jnp.tanh(z / cap)
            keep = True if mask is None else mask
            out = ref_log_probs(z, t, temperature, keep, -1, ignore_index=ignore)
            return out if opts["return_entropy"] else out[0]

        return fused, reference, (c["x"], c["w"], c["b"])
    target = t if c["with_target"] else None
    tb = c["teacher_bias"]

    def fused(x, w, b, tx, tw):
        return jxent.linear_distillation_loss(
            x, w, tx, tw, target, bias=b, teacher_bias=tb, ignore_index=ignore,
            **opts, **chunks,
        )  # fmt: skip

    def reference(x, w, b, tx, tw):
        return ref_distillation(
            _with_bias(x @ w, b), _with_bias(tx @ tw, tb), target,
            opts["temperature"], opts["beta"], -1, opts["reduction"],
            ignore_index=ignore,
        )  # fmt: skip

    args = (c["x"], c["w"], c["b"], c["teacher_x"], c["teacher_w"])
    return fused, reference, args


@pytest.mark.parametrize("seed", SEEDS)
@pytest.mark.parametrize("head", HEADS)
def test_random_configuration_matches_float64_formulas(head, seed, monkeypatch):
    rng = np.random.default_rng([seed, HEADS.index(head)])
    c = _draw(rng, head)
    passes = c["dw_passes"]
    monkeypatch.setattr(jxent._linear, "_VOCAB_OUTER", c["vocab_outer"])
    monkeypatch.setattr(jxent._linear, "_dw_passes", lambda *_: passes)
    monkeypatch.setattr(jxent._linear_heads, "_dw_passes", lambda *_: passes)
    fused, reference, args = _losses(head, c)
    config = {k: v for k, v in c.items() if not isinstance(v, np.ndarray)}
    with x64():
        args = tuple(None if a is None else jnp.asarray(a) for a in args)
        value, vjp = jax.vjp(fused, *args)
        want, ref_vjp = jax.vjp(reference, *args)
        cotangent = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), want)
        tangents = jax.tree.map(lambda a: jnp.asarray(rng.normal(size=a.shape)), args)
        results = {
            "value": (value, want),
            "vjp": (vjp(cotangent), ref_vjp(cotangent)),
            "jvp": (jax.jvp(fused, args, tangents)[1],
                    jax.jvp(reference, args, tangents)[1]),
        }  # fmt: skip
    for kind, (got, expected) in results.items():
        got, expected = jax.tree.leaves(got), jax.tree.leaves(expected)
        assert len(got) == len(expected), (kind, config)
        for g, e in zip(got, expected, strict=True):
            np.testing.assert_allclose(
                g, e, rtol=1e-8, atol=1e-10, err_msg=f"{kind}: {config}"
            )
