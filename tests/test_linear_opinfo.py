"""PyTorch's own OpInfo samples for F.linear_cross_entropy, against jxent.

torch's ``linear_weight`` is ``(C, *S, D)``: the logits are ``(*B, C, *S)`` with
a different ``(D, C)`` map per spatial position ``s``. jxent's ``w`` is one
``(D', V)`` matrix, so each sample is laid out as tokens ``(*B, *S)`` with a
block input ``x'[(b, s), (s', d)] = x[b, d]·δ(s, s')`` (plus one-hot columns
that carry the per-position bias) and ``w'[(s', d), c] = W[c, s', d]``: the
same logits, with gradients mapped back by autodiff through the layout.
"""

from __future__ import annotations

import itertools
import warnings

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64
from oracles import record_deviation, torch

import jxent

try:
    from torch.testing._internal.common_methods_invocations import op_db
except Exception:  # torch's test helpers need expecttest
    op_db = None

pytestmark = pytest.mark.skipif(
    torch is None or op_db is None, reason="torch's OpInfo database not importable"
)


def _key(sample, sizes=True):
    """What jxent sees of a sample: shapes, dtypes and options (torch's
    ``options`` only choose its chunking, so its variants repeat samples).
    Without ``sizes``, its structure: ranks (of torch's weight, whether it
    has spatial dimensions; none for the target), dtypes, which tensors are
    differentiated or empty, and whether label smoothing is 0."""

    def describe(a, rank=True):
        if isinstance(a, torch.Tensor):
            if sizes:
                shape = tuple(a.shape)
            else:
                shape = ((a.ndim,) if rank else ()) + (0 in a.shape,)
            return (shape, str(a.dtype), a.requires_grad)
        if isinstance(a, float) and not sizes:
            return a != 0
        return a

    x, (w, target) = sample.input, sample.args
    kwargs = {k: describe(v) for k, v in sample.kwargs.items() if k != "options"}
    w_key = describe(w) if sizes else w.ndim > 2
    args = (describe(x), w_key, describe(target, rank=sizes))
    return args, tuple(sorted(kwargs.items()))


def _pairs(sample):
    """The pairs of a sample's structural parts (each argument's structure,
    each option): a subset holding every pair of every sample covers each
    two-way interaction of ranks, dtypes, differentiation and options."""
    args, options = _key(sample, sizes=False)
    parts = sorted(repr(p) for p in (*enumerate(args), *options))
    return set(itertools.combinations(parts, 2))


def _samples(every_size=True):
    """Every variant's samples (torch 2.13: "", "chunked", "chunked_none"),
    one per distinct key (with ``every_size=False``, a pairwise-covering
    subset of the distinct structures); returns (samples, total before
    deduplication)."""
    ops = [o for o in op_db if o.name == "nn.functional.linear_cross_entropy"]
    assert ops
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        every = [
            sample
            for op in ops
            for sample in op.sample_inputs("cpu", torch.float64, requires_grad=True)
        ]
    unique = {}
    for sample in every:
        unique.setdefault(_key(sample, sizes=every_size), sample)
    if every_size:
        return list(unique.values()), len(every)
    covering, seen = [], set()
    for sample in unique.values():
        if _pairs(sample) - seen:
            covering.append(sample)
            seen |= _pairs(sample)
    return covering, len(every)


def _jxent_loss(x, big_w, target, bias, weight, **kw):
    """jxent on the block layout of one torch sample (see the module doc)."""
    classes, spatial, depth = big_w.shape[0], big_w.shape[1:-1], big_w.shape[-1]
    s = int(np.prod(spatial, dtype=int))
    batch = x.shape[:-1]
    eye = jnp.eye(s, dtype=x.dtype)
    # x' (*B, S, S*D + S): x in block s, then a one-hot column for the bias.
    blocks = jnp.einsum("...d,st->...std", x, eye).reshape(*batch, s, s * depth)
    ones = jnp.broadcast_to(eye, (*batch, s, s))
    x_big = jnp.concatenate([blocks, ones], axis=-1)
    w_rows = jnp.moveaxis(big_w.reshape(classes, s, depth), 0, -1)  # (S, D, C)
    b_rows = (
        jnp.zeros((s, classes), x.dtype) if bias is None else bias.reshape(classes, s).T
    )
    w_big = jnp.concatenate([w_rows.reshape(s * depth, classes), b_rows], axis=0)
    if jnp.issubdtype(target.dtype, jnp.floating):
        target = jnp.moveaxis(target.reshape(*batch, classes, s), -2, -1)
    else:
        target = target.reshape(*batch, s)
    out = jxent.linear_cross_entropy(x_big, w_big, target, weight, chunk_size=3, **kw)
    return out.reshape(*batch, *spatial) if out.ndim else out


def _torch_loss_and_grads(sample):
    """torch's loss and the gradients of <loss, ct> w.r.t. its leaves."""
    x_t, (w_t, target_t) = sample.input, sample.args
    kwargs = dict(sample.kwargs)
    kwargs.pop("options", None)
    bias_t = kwargs.pop("linear_bias", None)
    weight_t = kwargs.pop("weight", None)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        loss_t = torch.nn.functional.linear_cross_entropy(
            x_t, w_t, target_t, linear_bias=bias_t, weight=weight_t, **kwargs
        )
    tensors = {"x": x_t, "w": w_t, "bias": bias_t, "weight": weight_t,
               "target": target_t}  # fmt: skip
    diff = {k: t for k, t in tensors.items() if t is not None and t.requires_grad}
    ct = np.linspace(1.0, 2.0, loss_t.numel())
    grads_t = torch.autograd.grad(
        (loss_t.reshape(-1) * torch.tensor(ct)).sum(),
        list(diff.values()),
        allow_unused=True,
    )
    arrays = {k: None if t is None else t.detach().numpy() for k, t in tensors.items()}
    grads = {
        k: np.zeros_like(arrays[k]) if g is None else g.numpy()
        for k, g in zip(diff, grads_t, strict=True)
    }
    return loss_t.detach().numpy(), grads, arrays, kwargs, ct


def _jxent_loss_and_grads(arrays, names, kwargs, ct):
    def total(diff_arrays):
        a = {**arrays, **diff_arrays}
        out = _jxent_loss(a["x"], a["w"], a["target"], a["bias"], a["weight"], **kwargs)
        return jnp.sum(out.reshape(-1) * ct), out

    with x64():
        # One program per sample (eagerly, each of the block layout's ops
        # would compile on its own at each sample's shapes).
        (_, loss), grads = jax.jit(jax.value_and_grad(total, has_aux=True))(
            {k: arrays[k] for k in names}
        )
    return loss, grads


def test_every_opinfo_sample_matches_torch(full):
    """Every distinct sample with ``pytest --full`` (182 with torch 2.13);
    in CI a subset of the 88 structures holding every pair of their parts
    (41), since each distinct size compiles anew."""
    samples, total = _samples(every_size=full)
    failures = []
    for i, sample in enumerate(samples):
        loss_t, grads_t, arrays, kwargs, ct = _torch_loss_and_grads(sample)
        loss, grads = _jxent_loss_and_grads(arrays, grads_t, kwargs, ct)
        try:
            np.testing.assert_allclose(loss, loss_t, rtol=1e-10)
            for name, want in grads_t.items():
                record_deviation("linear_cross_entropy OpInfo", grads[name], want)
                np.testing.assert_allclose(
                    grads[name], want, rtol=1e-9, atol=1e-12, err_msg=name
                )
        except AssertionError as e:
            failures.append(f"sample {i}: {e}")
    print(
        f"\nOpInfo samples agreeing: {len(samples) - len(failures)}/{len(samples)} "
        f"{'distinct' if full else 'structures'} ({total} with torch's chunking "
        "variants)"
    )
    assert not failures, "\n".join(failures[:5])
