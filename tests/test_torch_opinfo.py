"""PyTorch's own OpInfo samples for the multi-class losses, against jxent.

torch's test suite checks ``F.cross_entropy``, ``F.nll_loss``, ``F.kl_div``,
``torch.softmax`` and ``torch.log_softmax`` on the samples its OpInfo database
generates (class axis 1, or 0 unbatched; a 0-d input to the softmaxes; empty
arrays). Each sample runs here through jxent with torch's layout (``axis=1``)
in float64: the value, and the gradient of ``<output, ct>`` w.r.t. every
tensor torch differentiates (the input, and probability or KL targets).
The binary losses' samples are in test_binary_api.py, and
``F.linear_cross_entropy``'s in test_linear_opinfo.py.
"""

from __future__ import annotations

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


def _class_axis(x):
    return 1 if x.ndim > 1 else -1


def _softmaxes(f):
    def call(x, dim, dtype=None):
        # torch's ``dtype`` casts the input first: the samples' is the input's.
        assert dtype in (None, torch.float64), dtype
        return f(x, axis=dim)

    return call


# torch's op name -> jxent on (input, *args, **kwargs) with torch's layout.
_OURS = {
    "nn.functional.cross_entropy": lambda x, t, weight=None, **kw: jxent.cross_entropy(
        x, t, weight, axis=_class_axis(x), **kw
    ),
    "nn.functional.nll_loss": lambda x, t, weight=None, **kw: jxent.nll_loss(
        x, t, weight, axis=_class_axis(x), **kw
    ),
    "nn.functional.kl_div": jxent.kl_div,
    "softmax": _softmaxes(jxent.softmax),
    "log_softmax": _softmaxes(jxent.log_softmax),
}


def _describe(a):
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), str(a.dtype), a.requires_grad)
    return repr(a)


def _features(name, sample):
    """What a sample exercises: each argument's rank, emptiness, dtype and
    differentiation, and each option's value, each with the input's rank."""
    args = {"input": sample.input, **dict(enumerate(sample.args)), **sample.kwargs}
    rank = sample.input.ndim
    return {
        (name, rank, k, (len(d[0]), 0 in d[0], *d[1:]) if isinstance(d, tuple) else d)
        for k, d in ((k, _describe(v)) for k, v in args.items())
    }


def _samples(every):
    """(op name, sample) pairs: every distinct sample (shapes, dtypes and
    options), or (``every=False``) a covering subset, in which each feature
    of every sample (``_features``) appears at least once."""
    chosen, seen = {}, set()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in op_db:
            if op.name not in _OURS:
                continue
            for s in op.sample_inputs("cpu", torch.float64, requires_grad=True):
                key = (
                    op.name,
                    tuple(_describe(a) for a in (s.input, *s.args)),
                    tuple(sorted((k, _describe(v)) for k, v in s.kwargs.items())),
                )
                new = _features(op.name, s) - seen
                if key not in chosen and (every or new):
                    chosen[key] = (op.name, s)
                    seen |= new
    return list(chosen.values())


def _leaves(sample):
    """The sample's arguments as NumPy, and the names torch differentiates."""
    named = {"input": sample.input}
    named.update({f"arg{i}": a for i, a in enumerate(sample.args)})
    named.update(sample.kwargs)
    diff = [
        k for k, v in named.items() if isinstance(v, torch.Tensor) and v.requires_grad
    ]
    arrays = {
        k: v.detach().numpy() if isinstance(v, torch.Tensor) else v
        for k, v in named.items()
    }
    return named, arrays, diff


def _torch_value_and_grads(name, sample):
    named, _, diff = _leaves(sample)
    op = next(o for o in op_db if o.name == name)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = op(sample.input, *sample.args, **sample.kwargs)
    ct = torch.linspace(1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = (
        torch.autograd.grad(
            (out * ct).sum(), [named[k] for k in diff], allow_unused=True
        )
        if out.numel()
        else [None] * len(diff)
    )
    return (
        out.detach().numpy(),
        ct.numpy(),
        {
            k: np.zeros(named[k].shape) if g is None else g.numpy()
            for k, g in zip(diff, grads, strict=True)
        },
    )


def _jxent_value_and_grads(name, sample, ct):
    _, arrays, diff = _leaves(sample)
    n_args = len(sample.args)

    def call(diff_arrays):
        a = {**arrays, **diff_arrays}
        args = [a[f"arg{i}"] for i in range(n_args)]
        kwargs = {k: a[k] for k in sample.kwargs}
        out = _OURS[name](a["input"], *args, **kwargs)
        return jnp.sum(out * ct), out

    with x64():
        # One program per sample: eagerly, every op would compile on its own.
        (_, out), grads = jax.jit(jax.value_and_grad(call, has_aux=True))(
            {k: jnp.asarray(arrays[k]) for k in diff}
        )
    return np.asarray(out), {k: np.asarray(g) for k, g in grads.items()}


def test_every_opinfo_sample_matches_torch(full):
    """Every distinct sample with ``pytest --full`` (108 with torch 2.13); in
    CI a covering subset (each sample compiles anew)."""
    samples = _samples(every=full)
    failures = []
    for name, sample in samples:
        want, ct, want_grads = _torch_value_and_grads(name, sample)
        try:
            got, grads = _jxent_value_and_grads(name, sample, ct)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
            assert got.shape == want.shape, (got.shape, want.shape)
            for k, g in want_grads.items():
                record_deviation(f"{name} OpInfo", grads[k], g)
                np.testing.assert_allclose(
                    grads[k], g, rtol=1e-10, atol=1e-14, err_msg=k
                )
        except Exception as e:  # an error is a failing sample
            shapes = [
                tuple(getattr(a, "shape", ())) for a in (sample.input, *sample.args)
            ]
            failures.append(f"{name} {shapes} {sample.kwargs}: {type(e).__name__} {e}")
    names = {name for name, _ in samples}
    assert names == set(_OURS), names
    print(f"\nOpInfo samples agreeing: {len(samples) - len(failures)}/{len(samples)}")
    assert not failures, "\n".join(failures[:5])
