"""PyTorch's own test inputs for the classification losses, against jxent.

torch's test suite checks ``F.cross_entropy``, ``F.nll_loss``, ``F.kl_div``,
``F.binary_cross_entropy``, ``F.binary_cross_entropy_with_logits``,
``torch.softmax`` and ``torch.log_softmax`` on the samples of its OpInfo
database (class axis 1, or 0 unbatched; a 0-d input to the softmaxes; empty
arrays), and ``nn.CrossEntropyLoss``, ``nn.NLLLoss``, ``nn.KLDivLoss``,
``nn.BCELoss`` and ``nn.BCEWithLogitsLoss`` on the inputs of its ModuleInfo
database (probability targets, K-dimensional inputs, label smoothing with
``ignore_index``, 0-d inputs, NaN data). Each runs here through jxent's
function or loss object with torch's layout (``axis=1``) in float64: the
value, and the gradient of ``<output, ct>`` w.r.t. every tensor torch
differentiates (the input, probability or KL targets), except where the
README's semantics table deviates on purpose (``_expected``).
``F.linear_cross_entropy``'s samples are in test_linear_opinfo.py (a block
layout of their own).
"""

from __future__ import annotations

import dataclasses
import warnings
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import x64
from oracles import record_deviation, torch

import jxent

try:
    from torch.testing._internal.common_methods_invocations import op_db
    from torch.testing._internal.common_modules import module_db
except Exception:  # torch's test helpers need expecttest
    op_db = module_db = None

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
_FUNCTIONS = {
    "nn.functional.cross_entropy": lambda x, t, weight=None, **kw: jxent.cross_entropy(
        x, t, weight, axis=_class_axis(x), **kw
    ),
    "nn.functional.nll_loss": lambda x, t, weight=None, **kw: jxent.nll_loss(
        x, t, weight, axis=_class_axis(x), **kw
    ),
    "nn.functional.kl_div": jxent.kl_div,
    "nn.functional.binary_cross_entropy": jxent.binary_cross_entropy,
    "nn.functional.binary_cross_entropy_with_logits": (
        jxent.binary_cross_entropy_with_logits
    ),
    "softmax": _softmaxes(jxent.softmax),
    "log_softmax": _softmaxes(jxent.log_softmax),
}

# torch's loss class -> jxent's, and whether it takes ``axis``.
_MODULES = {
    "CrossEntropyLoss": (jxent.CrossEntropyLoss, True),
    "NLLLoss": (jxent.NLLLoss, True),
    "KLDivLoss": (jxent.KLDivLoss, False),
    "BCELoss": (jxent.BCELoss, False),
    "BCEWithLogitsLoss": (jxent.BCEWithLogitsLoss, False),
}


@dataclasses.dataclass
class Case:
    """One torch test input: the same arguments to torch and to jxent."""

    name: str
    torch_fn: Callable  # (*args, **kwargs) -> tensor
    jxent_fn: Callable  # (*args, **kwargs) -> array, tensors as NumPy
    args: tuple
    kwargs: dict
    options: dict  # what configures the call (for keys and features)

    def leaves(self):
        """The distinct tensors torch differentiates (one tensor may be given
        twice, as input and target: its gradient is the sum)."""
        leaves = []
        for v in (*self.args, *self.kwargs.values()):
            differentiated = isinstance(v, torch.Tensor) and v.requires_grad
            if differentiated and all(v is not u for u in leaves):
                leaves.append(v)
        return leaves

    def key(self):
        described = (*self.args, *sorted(self.options.items()))
        return (self.name, tuple(_describe(a) for a in described))

    def features(self):
        """Each argument's rank, emptiness, dtype and differentiation, and
        each option's value, each with the input's rank."""
        rank = self.args[0].ndim
        named = {**dict(enumerate(self.args)), **self.options}
        return {
            (self.name, rank, k, _structure(_describe(v))) for k, v in named.items()
        }


def _describe(a):
    if isinstance(a, torch.Tensor):
        return (tuple(a.shape), str(a.dtype), a.requires_grad)
    if isinstance(a, tuple):  # an option (name, value)
        return (a[0], _describe(a[1]))
    return repr(a)


def _structure(described):
    if isinstance(described, tuple) and isinstance(described[0], tuple):
        shape, *rest = described
        return (len(shape), 0 in shape, *rest)
    return described


def _opinfo_cases():
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for op in op_db:
            if op.name in _FUNCTIONS:
                for s in op.sample_inputs("cpu", torch.float64, requires_grad=True):
                    yield Case(
                        op.name, op, _FUNCTIONS[op.name], (s.input, *s.args),
                        dict(s.kwargs), dict(s.kwargs),
                    )  # fmt: skip


def _moduleinfo_cases():
    torch.manual_seed(0)  # the inputs are random
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for m in module_db:
            name = m.module_cls.__name__
            if name not in _MODULES:
                continue
            ours, has_axis = _MODULES[name]
            inputs = m.module_inputs_func(
                m, device="cpu", dtype=torch.float64, requires_grad=True, training=True
            )
            for i in inputs:
                c, f = i.constructor_input, i.forward_input
                theirs = m.module_cls(*c.args, **c.kwargs)
                options = {k: _as_numpy(v) for k, v in c.kwargs.items()}
                if has_axis:
                    options["axis"] = _class_axis(f.args[0])

                def jxent_fn(*a, _options=options, _ours=ours, **kw):
                    return _ours(**_options)(*a, **kw)

                yield Case(
                    name, theirs, jxent_fn, tuple(f.args), dict(f.kwargs), c.kwargs
                )


# Cheap enough that CI runs every sample (37 OpInfo samples with torch 2.13).
_EVERY_SAMPLE_IN_CI = {
    "nn.functional.binary_cross_entropy",
    "nn.functional.binary_cross_entropy_with_logits",
}


def _cases(every):
    """Every distinct case (shapes, dtypes and options), or (``every=False``)
    a covering subset, in which each of every case's features appears (and
    every case of ``_EVERY_SAMPLE_IN_CI``)."""
    chosen, seen = {}, set()
    for case in (*_opinfo_cases(), *_moduleinfo_cases()):
        new = case.features() - seen
        every_one = every or case.name in _EVERY_SAMPLE_IN_CI
        if case.key() not in chosen and (every_one or new):
            chosen[case.key()] = case
            seen |= new
    return list(chosen.values())


def _as_numpy(v):
    return v.detach().numpy() if isinstance(v, torch.Tensor) else v


def _torch_value_and_grads(case):
    leaves = case.leaves()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = case.torch_fn(*case.args, **case.kwargs)
    ct = torch.linspace(1.0, 2.0, out.numel(), dtype=out.dtype).reshape(out.shape)
    grads = [None] * len(leaves)
    if out.numel() and leaves:
        grads = torch.autograd.grad((out * ct).sum(), leaves, allow_unused=True)
    return (
        out.detach().numpy(),
        ct.numpy(),
        [
            np.zeros(t.shape) if g is None else g.numpy()
            for t, g in zip(leaves, grads, strict=True)
        ],
    )


def _jxent_value_and_grads(case, ct):
    leaves = case.leaves()

    def position(v):
        return next((i for i, u in enumerate(leaves) if v is u), None)

    def call(diff):
        def arg(v):
            i = position(v)
            return _as_numpy(v) if i is None else diff[i]

        args = [arg(v) for v in case.args]
        out = case.jxent_fn(*args, **{k: arg(v) for k, v in case.kwargs.items()})
        return jnp.sum(out * ct), out

    with x64():
        # One program per case: eagerly, every op would compile on its own.
        (_, out), grads = jax.jit(jax.value_and_grad(call, has_aux=True))(
            [jnp.asarray(_as_numpy(t)) for t in leaves]
        )
    return np.asarray(out), [np.asarray(g) for g in grads]


def _expected(case, value, grads):
    """torch's value and gradients, as the README's semantics table changes
    them for jxent:

    - a ``"mean"`` over no counted target (every one ignored) is 0 with zero
      gradients, where torch's is NaN;
    - NaN data poisons: a NaN in ``kl_div``'s input or target, or a negative
      target without ``log_target``, gives NaN gradients at that element
      with ``"none"`` and everywhere otherwise (torch's gradient there, and
      elsewhere, is finite).
    """
    floats = [np.asarray(_as_numpy(a)) for a in case.args if _is_float(a)]
    has_nan = any(np.isnan(a).any() for a in floats)
    reduced = value.ndim == 0 and case.name not in ("softmax", "log_softmax")
    if reduced and np.isnan(value) and not has_nan:  # a zero denominator
        return np.zeros(()), [np.zeros_like(g) for g in grads]
    if case.name in ("nn.functional.kl_div", "KLDivLoss"):
        x, t = floats[:2]
        bad = np.isnan(x) | np.isnan(t)
        if not case.options.get("log_target", False):
            bad |= t < 0
        if bad.any():
            none = case.options.get("reduction", "mean") == "none"
            grads = [np.where(bad if none else True, np.nan, g) for g in grads]
    return value, grads


def _is_float(a):
    return isinstance(a, torch.Tensor) and a.is_floating_point()


def test_every_torch_sample_matches(full):
    """Every distinct case with ``pytest --full`` (145 OpInfo samples and 155
    ModuleInfo inputs with torch 2.13); in CI a covering subset (each case
    compiles anew)."""
    cases = _cases(every=full)
    failures = []
    for case in cases:
        value, ct, grads = _torch_value_and_grads(case)
        want, want_grads = _expected(case, value, grads)
        try:
            got, got_grads = _jxent_value_and_grads(case, ct)
            assert got.shape == want.shape, (got.shape, want.shape)
            np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)
            for g, w in zip(got_grads, want_grads, strict=True):
                record_deviation(f"{case.name} OpInfo/ModuleInfo", g, w)
                np.testing.assert_allclose(g, w, rtol=1e-10, atol=1e-14)
        except Exception as e:  # an error is a failing case
            shapes = [tuple(getattr(a, "shape", ())) for a in case.args]
            failures.append(f"{case.name} {shapes} {case.options}: {e!r}")
    names = {case.name for case in cases}
    assert names == set(_FUNCTIONS) | set(_MODULES), names
    print(f"\ntorch samples agreeing: {len(cases) - len(failures)}/{len(cases)}")
    assert not failures, "\n".join(failures[:5])
