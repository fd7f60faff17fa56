"""Every public function under every transform, w.r.t. every floating input.

``jax.test_util.check_grads`` (forward and reverse mode, to second order, in
float64) checks the derivatives against finite differences of the function
itself; the torch tests below check them against PyTorch's autograd, an
independent oracle: gradients w.r.t. probability targets (including entries
that are exactly 0), class weights, ``kl_div``'s target, second derivatives
(``torch.autograd.functional.hessian``). Then the transformations users compose
with a loss: ``jvp``, ``jacfwd``, ``linearize``, ``hessian``, ``jacrev(jacfwd)``,
``jacfwd(jacrev)``, ``vmap`` of ``grad``, ``grad`` of ``vmap``, ``checkpoint``
and ``scan``, on the CPU path and on the accelerators' one-pass path.
"""

from __future__ import annotations

import functools
import itertools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import full_only, x64
from jax.test_util import check_grads
from oracles import torch

import jxent
import jxent._kernels as kernels

C = 4
REDUCTIONS = ("none", "mean", "sum")
# (logits shape, class axis): classes last, and torch's (N, C, d) layout.
LAYOUTS = (((3, C), -1), ((2, C, 2), 1))
# Options whose values are differentiated (traced leaves of the check).
OPTION_SETS = {
    "plain": {},
    "weight+ignore+smoothing": {"weight": True, "ignore": True, "smoothing": True},
    "everything": {
        "weight": True,
        "ignore": True,
        "smoothing": True,
        "z_loss": True,
        "soft_cap": True,
        "where": True,
    },
}
FLOAT_VALUES = {
    "weight": np.array([0.7, 1.3, 0.9, 2.0]),
    "label_smoothing": np.float64(0.15),
    "z_loss": np.float64(0.05),
    "soft_cap": np.float64(2.5),
}


def _grid_inputs(shape, axis, kind, options, rng):
    """float64 inputs away from every kink (no ties, targets on included classes)."""
    axis = axis % len(shape)
    logits = rng.normal(scale=1.5, size=shape)
    batch_shape = shape[:axis] + shape[axis + 1 :]
    where = None
    if options.get("where"):
        where = np.ones(shape, bool)
        # Class 0 excluded at the first position along the batch.
        where[(0,) * axis + (0,) + (0,) * (len(shape) - axis - 1)] = False
    if kind == "int":
        target = rng.integers(1, C, size=batch_shape)  # never the excluded class 0
        if options.get("ignore"):
            target.flat[-1] = -100
    else:
        target = np.moveaxis(rng.dirichlet(np.ones(C), size=batch_shape), -1, axis)
    return logits, target, where


def _option_names(options):
    return [
        name
        for key, name in (
            ("weight", "weight"),
            ("smoothing", "label_smoothing"),
            ("z_loss", "z_loss"),
            ("soft_cap", "soft_cap"),
        )
        if options.get(key)
    ]


# CI: no options and every option; the middle set with pytest --full.
@pytest.mark.parametrize(
    "option_set", ["plain", full_only("weight+ignore+smoothing"), "everything"]
)
@pytest.mark.parametrize("kind", ["int", "prob"])
def test_cross_entropy_check_grads_fwd_rev_order2(kind, option_set):
    """Both layouts and the reductions "none" and "mean" in one function.

    Differentiated w.r.t. the logits of both layouts, the probability targets
    and every option value in the set.
    """
    options = OPTION_SETS[option_set]
    names = _option_names(options)
    rng = np.random.default_rng(len(option_set))
    inputs = [_grid_inputs(shape, axis, kind, options, rng) for shape, axis in LAYOUTS]

    def losses(logits, targets, values):
        values = dict(zip(names, values, strict=True))
        out = []
        for (_, axis), x, t, (_, int_target, where) in zip(
            LAYOUTS, logits, targets, inputs, strict=True
        ):
            # "sum" is "none" summed: its order-1 gradients are checked
            # elsewhere, and a third reduction here costs CI a third more.
            for reduction in ("none", "mean"):
                out.append(
                    jxent.cross_entropy(
                        x,
                        int_target if kind == "int" else t,
                        values.get("weight"),
                        reduction=reduction,
                        axis=axis,
                        label_smoothing=values.get("label_smoothing", 0.0),
                        z_loss=values.get("z_loss", 0.0),
                        soft_cap=values.get("soft_cap"),
                        where=where,
                    )
                )
        return tuple(out)

    with x64():
        logits = tuple(i[0] for i in inputs)
        targets = tuple(i[1] if kind == "prob" else np.zeros(()) for i in inputs)
        values = tuple(FLOAT_VALUES[n] for n in names)
        check_grads(
            jax.jit(losses), (logits, targets, values), order=2,
            modes=("fwd", "rev"), atol=1e-5, rtol=1e-5,
        )  # fmt: skip


SIMPLE = [
    ("log_softmax", lambda x: jxent.log_softmax(x, axis=1)),
    ("softmax", lambda x: jxent.softmax(x, axis=0)),
    ("entropy", lambda x: jxent.entropy(jax.nn.softmax(x), axis=-1)),
]


@pytest.mark.parametrize(("name", "fn"), SIMPLE, ids=[s[0] for s in SIMPLE])
def test_simple_functions_check_grads(name, fn):
    with x64():
        x = np.random.default_rng(1).normal(size=(3, 4))
        check_grads(fn, (x,), order=2, modes=("fwd", "rev"))


@pytest.mark.parametrize("reduction", ["none", "mean", "sum"])
@pytest.mark.parametrize("weighted", [False, True])
def test_nll_loss_check_grads(reduction, weighted):
    with x64():
        rng = np.random.default_rng(2)
        log_probs = rng.normal(size=(2, C, 3))
        target = np.array([[1, -100, 3], [0, 2, 2]])
        weight = np.array([0.5, 1.5, 1.0, 2.0])

        def loss(lp, *w):
            return jxent.nll_loss(lp, target, *w, reduction=reduction, axis=1)

        check_grads(
            loss, (log_probs, *([weight] if weighted else [])), order=2,
            modes=("fwd", "rev"),
        )  # fmt: skip


# CI: each reduction once, the target's two forms alternating.
@pytest.mark.parametrize(
    ("reduction", "log_target"),
    [("none", False), ("batchmean", True), ("sum", False), ("mean", True),
     full_only("none", True), full_only("batchmean", False),
     full_only("sum", True), full_only("mean", False)],
)  # fmt: skip
def test_kl_div_check_grads_input_and_target(reduction, log_target):
    with x64():
        rng = np.random.default_rng(3)
        # Probabilities away from 0, where the second derivative 1/p is huge.
        log_q = np.log(rng.dirichlet(np.full(C, 8.0), size=3))
        p = rng.dirichlet(np.full(C, 8.0), size=3)
        target = np.log(p) if log_target else p

        def loss(i, t):
            return jxent.kl_div(i, t, reduction=reduction, log_target=log_target)

        check_grads(loss, (log_q, target), order=2, modes=("fwd", "rev"))


# --- against PyTorch's autograd ------------------------------------------------

needs_torch = pytest.mark.skipif(torch is None, reason="torch oracle not installed")


def _numpy(tree):
    """Arrays as NumPy (float64 stays float64 outside the x64 context)."""
    return jax.tree.map(np.asarray, tree)


def _torch(fn, *arrays):
    """``fn`` on float64 torch tensors; returns (value, grads of sum(value))."""
    tensors = [
        torch.tensor(np.asarray(a, np.float64), requires_grad=True) for a in arrays
    ]
    value = fn(*tensors)
    grads = torch.autograd.grad(value.sum(), tensors, allow_unused=True)
    return value.detach().numpy(), [
        np.zeros(np.shape(a)) if g is None else g.numpy()
        for a, g in zip(arrays, grads, strict=True)
    ]


@needs_torch
def test_probability_target_gradient_at_zero_entries_matches_torch():
    """The issue's example: torch and optax give -log p where the target is 0."""
    logits = np.array([[1.0, 2.0, 3.0]])
    target = np.array([[0.0, 1.0, 0.0]])
    got = jax.grad(
        lambda x, t: jxent.cross_entropy(x, t, reduction="sum"), argnums=(0, 1)
    )(logits, target)
    np.testing.assert_allclose(got[1], [[2.4076059, 1.4076059, 0.4076059]], rtol=1e-6)
    _, want = _torch(
        lambda x, t: torch.nn.functional.cross_entropy(x, t, reduction="sum"),
        logits,
        target,
    )
    np.testing.assert_allclose(got[0], want[0], rtol=1e-6)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-6)


PROB_CASES = list(itertools.product((False, True), (0.0, 0.2), REDUCTIONS))


@needs_torch
@pytest.mark.parametrize(("weighted", "eps", "reduction"), PROB_CASES)
def test_probability_targets_grads_wrt_logits_target_weight_match_torch(
    weighted, eps, reduction
):
    rng = np.random.default_rng(11)
    logits = rng.normal(scale=2.0, size=(4, C))
    target = rng.dirichlet(np.ones(C), size=4)
    target[0] = [0.0, 1.0, 0.0, 0.0]  # exact zeros
    target[1, 2] = 0.0
    target[1] /= target[1].sum()
    weight = rng.uniform(0.3, 2.0, size=C)
    arrays = (logits, target, weight) if weighted else (logits, target)

    def ours(x, t, *w):
        return jxent.cross_entropy(x, t, *w, reduction=reduction, label_smoothing=eps)

    def theirs(x, t, *w):
        return torch.nn.functional.cross_entropy(
            x, t, *w, reduction=reduction, label_smoothing=eps
        )

    with x64():
        value = ours(*arrays)
        grads = jax.grad(
            lambda *a: jnp.sum(ours(*a)), argnums=tuple(range(len(arrays)))
        )(*arrays)
        value, grads = _numpy((value, grads))
    want_value, want_grads = _torch(theirs, *arrays)
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@needs_torch
@pytest.mark.parametrize("reduction", REDUCTIONS)
def test_integer_target_weight_gradient_matches_torch_probability_form(reduction):
    """torch does not differentiate ``weight`` for class indices; its one-hot
    probability-target form does, and equals it for ``"none"``/``"sum"``."""
    rng = np.random.default_rng(12)
    logits = rng.normal(size=(5, C))
    target = np.array([0, 3, 1, 1, 2])
    weight = rng.uniform(0.3, 2.0, size=C)
    with x64():
        got = jax.grad(
            lambda x, w: jnp.sum(
                jxent.cross_entropy(x, target, w, reduction=reduction)
            ),
            argnums=(0, 1),
        )(logits, weight)
        got = _numpy(got)
    if reduction == "mean":
        # Σ w_y ℓ / Σ w_y: differentiate torch's own formula for the ratio.
        def theirs(x, w):
            t = torch.tensor(target)
            losses = torch.nn.functional.cross_entropy(x, t, reduction="none")
            return (w[t] * losses).sum() / w[t].sum()
    else:
        one_hot = np.eye(C)[target]

        def theirs(x, w):
            return torch.nn.functional.cross_entropy(
                x, torch.tensor(one_hot), w, reduction=reduction
            )

    _, want = _torch(theirs, logits, weight)
    np.testing.assert_allclose(got[0], want[0], rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(got[1], want[1], rtol=1e-10, atol=1e-12)


def _torch_option_loss(x, w, eps, z, target, reduction):
    """torch's cross-entropy formula with a z-loss, every input a tensor.

    ``(1-ε)·w_y·(-log p_y) + (ε/C)·Σ_c w_c·(-log p_c) + z·lse²`` per row (0
    where the target is -100), summed, or divided by ``Σ w_y`` for "mean".
    Its value without ``z`` is checked against ``F.cross_entropy``.
    """
    t = torch.tensor(target)
    kept = t != -100
    safe = torch.where(kept, t, 0)
    log_p = torch.log_softmax(x[kept], dim=-1)
    w_y = w[safe[kept]]
    nll = -log_p.gather(1, safe[kept, None])[:, 0]
    rows = (1 - eps) * w_y * nll - eps / x.shape[1] * (w * log_p).sum(-1)
    rows = rows + z * torch.logsumexp(x[kept], dim=-1) ** 2
    if reduction == "sum":
        return rows.sum()
    return rows.sum() / w_y.sum()


OPTIONS_AT_EDGES = {
    # ε at 0 and 1, z at 0, a class weight of 0 at a target class: the
    # derivative w.r.t. each is finite and must not be dropped.
    "eps0-z0-w0": (0.0, 0.0, 0),
    "eps1-z0-w0": (1.0, 0.0, 0),
    "eps0.2-z0-w0": (0.2, 0.0, 0),
}


@needs_torch
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("case", OPTIONS_AT_EDGES)
@pytest.mark.parametrize("ignored_row", [None, "-inf", "nan"])
def test_option_gradients_at_their_edges_match_torch(case, reduction, ignored_row):
    """Gradients w.r.t. logits, class weights, ε and z, in both modes, at
    ε ∈ {0, 1}, z = 0 and a zero class weight; with an ignored row whose
    logits are -inf or NaN (it adds nothing, so nothing NaN either)."""
    eps, z, zero_class = OPTIONS_AT_EDGES[case]
    rng = np.random.default_rng(14)
    logits = rng.normal(scale=2.0, size=(4, C))
    target = np.array([zero_class, 3, 1, zero_class])
    weight = rng.uniform(0.5, 2.0, size=C)
    weight[zero_class] = 0.0
    if reduction == "mean":
        target[3] = 2  # a nonzero total weight
    if ignored_row is not None:
        target[2] = -100
        logits[2, 1] = -np.inf if ignored_row == "-inf" else np.nan

    def ours(x, w, e, zz):
        return jxent.cross_entropy(
            x, target, w, label_smoothing=e, z_loss=zz, reduction=reduction
        )

    arrays = (logits, weight, np.float64(eps), np.float64(z))
    with x64():
        value, grads = jax.value_and_grad(ours, argnums=(0, 1, 2, 3))(*arrays)
        _, forward = jax.jvp(
            lambda e, zz: ours(logits, weight, e, zz),
            (np.float64(eps), np.float64(z)),
            (np.float64(1.0), np.float64(-2.0)),
        )
        value, grads, forward = _numpy((value, grads, forward))
    want_value, want = _torch(
        lambda x, w, e, zz: _torch_option_loss(x, w, e, zz, target, reduction),
        *arrays,
    )
    clean = np.where(np.isfinite(logits), logits, 0.0)
    check = torch.nn.functional.cross_entropy(
        torch.tensor(clean), torch.tensor(target), torch.tensor(weight),
        reduction=reduction, label_smoothing=eps,
    )  # fmt: skip
    np.testing.assert_allclose(
        _torch_option_loss(
            torch.tensor(clean), torch.tensor(weight), eps, 0.0, target, reduction
        ).numpy(),
        check.numpy(),
        rtol=1e-12,
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    if ignored_row is not None:
        want[0][2] = 0.0  # torch differentiates only the kept rows
    for got, expected in zip(grads, want, strict=True):
        np.testing.assert_allclose(got, expected, rtol=1e-10, atol=1e-12)
    np.testing.assert_allclose(forward, want[2] - 2.0 * want[3], rtol=1e-10)


@needs_torch
def test_soft_cap_gradient_with_a_minus_inf_logit_matches_torch():
    """A -inf logit caps to -cap: d/dcap is finite (its limit), not inf · 0.

    Hard and probability targets, the LM head's cross-entropy and token
    log-probabilities (the -inf in the bias), reverse and forward mode.
    """
    rng = np.random.default_rng(16)
    x, w_head = rng.normal(size=(4, 3)), rng.normal(size=(3, C))
    bias = np.array([0.3, -np.inf, 0.0, -0.2])
    target = np.array([0, 2, 3, 0])
    probs = rng.dirichlet(np.ones(C), size=4)
    probs[:, 1] = 0.0
    probs /= probs.sum(-1, keepdims=True)
    cap = np.float64(1.7)
    logits = x @ w_head + bias

    def capped(z, c):  # the limit -c at a -inf logit
        finite = torch.where(torch.isinf(z), 0.0, z)  # no inf · 0 in its autograd
        return torch.where(
            torch.isinf(z), torch.sign(z) * c, c * torch.tanh(finite / c)
        )

    def theirs(z, c):
        zc = capped(z, c)
        hard = torch.nn.functional.cross_entropy(zc, torch.tensor(target))
        soft = torch.nn.functional.cross_entropy(zc, torch.tensor(probs))
        log_p = torch.log_softmax(zc, -1)[torch.arange(4), torch.tensor(target)]
        return torch.stack([hard, soft, hard, log_p.sum()])

    def ours(c):
        return jnp.stack([
            jxent.cross_entropy(logits, target, soft_cap=c),
            jxent.cross_entropy(logits, probs, soft_cap=c),
            jxent.linear_cross_entropy(x, w_head, target, bias=bias, soft_cap=c),
            jnp.sum(jxent.linear_log_probs(x, w_head, target, bias=bias, soft_cap=c)),
        ])  # fmt: skip

    with x64():
        value = ours(cap)
        reverse = jax.jacrev(ours)(cap)
        forward = jax.jacfwd(ours)(cap)
        value, reverse, forward = _numpy((value, reverse, forward))
    z = torch.tensor(logits)
    c = torch.tensor(cap, requires_grad=True)
    want_value = theirs(z, c)
    want = np.array(
        [torch.autograd.grad(v, c, retain_graph=True)[0] for v in want_value]
    )
    np.testing.assert_allclose(value, want_value.detach().numpy(), rtol=1e-12)
    assert np.all(np.isfinite(want))
    np.testing.assert_allclose(reverse, want, rtol=1e-10)
    np.testing.assert_allclose(forward, want, rtol=1e-10)
    # Second order, the hard-target cross-entropy: the limit, not NaN.
    with x64():
        second = float(jax.hessian(lambda c: ours(c)[0])(cap))
    c = torch.tensor(cap, requires_grad=True)
    (first,) = torch.autograd.grad(theirs(z, c)[0], c, create_graph=True)
    (want_second,) = torch.autograd.grad(first, c)
    np.testing.assert_allclose(second, want_second.item(), rtol=1e-9)


@needs_torch
def test_nll_loss_and_linear_cross_entropy_option_gradients_at_zero():
    """``nll_loss``'s weight gradient at a zero weight, and
    ``linear_cross_entropy``'s ε gradient at ε = 0."""
    rng = np.random.default_rng(15)
    x, w_head = rng.normal(size=(5, 3)), rng.normal(size=(3, C))
    target = np.array([0, 2, 0, 1, 3])
    weight = np.array([0.0, 1.5, 0.7, 1.1])
    with x64():
        log_probs = jax.nn.log_softmax(x @ w_head)
        d_weight = jax.grad(
            lambda w: jxent.nll_loss(log_probs, target, w, reduction="sum")
        )(weight)
        d_eps = jax.grad(
            lambda e: jxent.linear_cross_entropy(
                x, w_head, target, label_smoothing=e, reduction="sum"
            )
        )(np.float64(0.0))
        d_weight, d_eps = _numpy((d_weight, d_eps))
    logits = x @ w_head
    _, (_, want_weight, want_eps, _) = _torch(
        lambda z, w, e, zz: _torch_option_loss(z, w, e, zz, target, "sum"),
        logits, weight, np.float64(0.0), np.float64(0.0),
    )  # fmt: skip
    np.testing.assert_allclose(d_weight, want_weight, rtol=1e-10)
    _, (_, _, want_eps, _) = _torch(
        lambda z, w, e, zz: _torch_option_loss(z, w, e, zz, target, "sum"),
        logits, np.ones(C), np.float64(0.0), np.float64(0.0),
    )  # fmt: skip
    np.testing.assert_allclose(d_eps, want_eps, rtol=1e-10)


@needs_torch
@pytest.mark.filterwarnings("ignore:reduction. 'mean' divides:UserWarning")
@pytest.mark.parametrize("log_target", [False, True])
@pytest.mark.parametrize("reduction", ["none", "batchmean", "sum", "mean"])
def test_kl_div_values_and_grads_match_torch(log_target, reduction):
    rng = np.random.default_rng(13)
    log_q = np.log(rng.dirichlet(np.ones(C), size=3))
    p = rng.dirichlet(np.ones(C), size=3)
    target = np.log(p) if log_target else p
    with x64():
        value = jxent.kl_div(log_q, target, reduction=reduction, log_target=log_target)
        grads = jax.grad(
            lambda i, t: jnp.sum(
                jxent.kl_div(i, t, reduction=reduction, log_target=log_target)
            ),
            argnums=(0, 1),
        )(log_q, target)
        value, grads = _numpy((value, grads))
    want_value, want_grads = _torch(
        lambda i, t: torch.nn.functional.kl_div(
            i, t, reduction=reduction, log_target=log_target
        ),
        log_q,
        target,
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    for got, want in zip(grads, want_grads, strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@needs_torch
def test_kl_div_zero_target_entries():
    """Value as torch; d/d target at a zero entry is the true -inf (torch: NaN)."""
    log_q = np.log(np.array([[0.2, 0.3, 0.5]]))
    target = np.array([[0.0, 0.4, 0.6]])
    with x64():
        d_input, d_target = jax.grad(
            lambda i, t: jxent.kl_div(i, t, reduction="sum"), argnums=(0, 1)
        )(log_q, target)
        value = jxent.kl_div(log_q, target, reduction="sum")
        value, d_input, d_target = _numpy((value, d_input, d_target))
    want_value, (want_input, want_target) = _torch(
        lambda i, t: torch.nn.functional.kl_div(i, t, reduction="sum"), log_q, target
    )
    np.testing.assert_allclose(value, want_value, rtol=1e-12)
    np.testing.assert_allclose(d_input, want_input, rtol=1e-12)
    assert d_target[0, 0] == -np.inf and np.isnan(want_target[0, 0])
    np.testing.assert_allclose(d_target[0, 1:], want_target[0, 1:], rtol=1e-12)


@needs_torch
def test_kl_div_negative_target_is_nan_like_torch():
    log_q = np.log(np.array([[0.2, 0.3, 0.5]]))
    target = np.array([[-0.1, 0.5, 0.6]])
    got = jxent.kl_div(log_q, target, reduction="none")
    want, _ = _torch(
        lambda i, t: torch.nn.functional.kl_div(i, t, reduction="none"), log_q, target
    )
    assert np.isnan(got[0, 0]) and np.isnan(want[0, 0])
    np.testing.assert_allclose(got[0, 1:], want[0, 1:], rtol=1e-6)
    for reduction in ("mean", "sum", "batchmean"):
        assert np.isnan(jax.jit(jxent.kl_div, static_argnames="reduction")(
            log_q, target, reduction=reduction
        ))  # fmt: skip


@needs_torch
def test_entropy_matches_torch_entr_values_and_grads():
    p = np.array([[0.5, 0.5, 0.0], [0.2, 0.3, 0.5]])
    with x64():
        value = jxent.entropy(p)
        grad = jax.grad(lambda p: jnp.sum(jxent.entropy(p)))(p)
        value, grad = _numpy((value, grad))
    want, (want_grad,) = _torch(lambda p: torch.special.entr(p).sum(-1), p)
    np.testing.assert_allclose(value, want, rtol=1e-12)
    np.testing.assert_array_equal(np.isinf(grad), np.isinf(want_grad))
    finite = np.isfinite(want_grad)
    np.testing.assert_allclose(grad[finite], want_grad[finite], rtol=1e-12)


@needs_torch
@pytest.mark.parametrize("fn", ["log_softmax", "softmax"])
def test_softmax_grads_match_torch(fn):
    x = np.random.default_rng(14).normal(size=(3, 5))
    cot = np.random.default_rng(15).normal(size=(3, 5))
    with x64():
        got = np.asarray(
            jax.grad(lambda x: jnp.sum(getattr(jxent, fn)(x, axis=0) * cot))(x)
        )
    _, (want,) = _torch(
        lambda x: getattr(torch.nn.functional, fn)(x, dim=0) * torch.tensor(cot), x
    )
    np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-14)


HESSIAN_CASES = {
    "int": {},
    "int+weight+smoothing": {"weight": True, "label_smoothing": 0.1},
    "int+ignore": {"ignore": True},
    "prob": {"prob": True},
}


@needs_torch
@pytest.mark.parametrize("case", list(HESSIAN_CASES))
def test_hessian_matches_torch(case):
    opts = HESSIAN_CASES[case]
    rng = np.random.default_rng(16)
    logits = rng.normal(size=(3, C))
    if opts.get("prob"):
        target = rng.dirichlet(np.ones(C), size=3)
    else:
        target = (
            np.array([1, 0, 3]) if not opts.get("ignore") else np.array([1, -100, 3])
        )
    weight = np.array([0.5, 1.5, 1.0, 2.0]) if opts.get("weight") else None
    eps = opts.get("label_smoothing", 0.0)
    with x64():
        got = jax.hessian(
            lambda x: jxent.cross_entropy(x, target, weight, label_smoothing=eps)
        )(logits)
        got = np.asarray(got)
    tt = torch.tensor(target)
    wt = None if weight is None else torch.tensor(weight)
    want = torch.autograd.functional.hessian(
        lambda x: torch.nn.functional.cross_entropy(x, tt, wt, label_smoothing=eps),
        torch.tensor(logits),
    ).numpy()
    np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


# --- every transform, every path -----------------------------------------------


def _on_path(one_pass, fn):
    kernels._ONE_PASS = one_pass
    jax.clear_caches()  # the path is chosen at trace time
    try:
        return fn()
    finally:
        kernels._ONE_PASS = None
        jax.clear_caches()


@pytest.mark.parametrize("one_pass", [False, True], ids=["cpu-path", "one-pass"])
def test_every_transform_on_every_path(one_pass):
    rng = np.random.default_rng(17)
    logits = rng.normal(size=(3, C))
    target = np.array([1, -100, 3])
    weight = np.array([0.5, 1.5, 1.0, 2.0])

    def f(x):
        return jxent.cross_entropy(
            x, target, weight, label_smoothing=0.1, z_loss=0.01, soft_cap=5.0
        )

    def per_position(x):
        return jxent.cross_entropy(x, target, weight, reduction="none", soft_cap=5.0)

    def run():
        with x64():
            tangent = rng.normal(size=logits.shape)
            _, jvp = jax.jvp(f, (logits,), (tangent,))
            grad = jax.grad(f)(logits)
            _, lin = jax.linearize(f, logits)
            return _numpy({
                "jvp": (jvp, np.sum(grad * tangent)),
                "linearize": (lin(tangent), np.sum(grad * tangent)),
                "jacfwd": (jax.jacfwd(per_position)(logits),
                           jax.jacrev(per_position)(logits)),
                "hessian": (jax.hessian(f)(logits),
                            jax.jacrev(jax.jacrev(f))(logits)),
                "jacrev(jacfwd)": (jax.jacrev(jax.jacfwd(f))(logits),
                                   jax.jacfwd(jax.jacfwd(f))(logits)),
                "jacfwd(jacrev)": (jax.jacfwd(jax.jacrev(f))(logits),
                                   jax.jacfwd(jax.jacfwd(f))(logits)),
            })  # fmt: skip

    for name, (got, want) in _on_path(one_pass, run).items():
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12, err_msg=name)
    with x64():
        check_grads(f, (logits,), order=2, modes=("fwd", "rev"))


def test_vmap_of_grad_and_grad_of_vmap():
    rng = np.random.default_rng(18)
    logits = jnp.asarray(rng.normal(size=(4, 3, C)), jnp.float32)
    target = jnp.asarray(rng.integers(0, C, size=(4, 3)))
    weight = jnp.asarray([0.5, 1.5, 1.0, 2.0])

    def loss(x, t, w):
        return jxent.cross_entropy(x, t, w, label_smoothing=0.1)

    per_example = jax.vmap(jax.grad(loss, argnums=(0, 2)), (0, 0, None))(
        logits, target, weight
    )
    for i in range(4):
        want = jax.grad(loss, argnums=(0, 2))(logits[i], target[i], weight)
        np.testing.assert_allclose(per_example[0][i], want[0], rtol=1e-6)
        np.testing.assert_allclose(per_example[1][i], want[1], rtol=1e-6)
    total = jax.grad(
        lambda x, w: jnp.sum(jax.vmap(loss, (0, 0, None))(x, target, w)), (0, 1)
    )(logits, weight)
    np.testing.assert_allclose(total[0], per_example[0], rtol=1e-6)
    np.testing.assert_allclose(total[1], per_example[1].sum(0), rtol=1e-6)


def _plain_cross_entropy(x, t, eps=0.0, z_loss=0.0, soft_cap=None):
    """Mean cross-entropy in plain JAX (the reference of the vmap tests)."""
    if soft_cap is not None:
        x = soft_cap * jnp.tanh(x / soft_cap)
    lp = jax.nn.log_softmax(x, axis=-1)
    nll = -jnp.take_along_axis(lp, t[:, None], axis=-1)[:, 0]
    lse = jax.nn.logsumexp(x, axis=-1)
    loss = (1 - eps) * nll - eps * jnp.mean(lp, axis=-1) + z_loss * lse**2
    return jnp.mean(loss)


def _summed_over(loss, batch, x):
    return jnp.sum(jax.vmap(loss, (None, 0))(x, batch))


@pytest.mark.parametrize("one_pass", [False, True], ids=["cpu-path", "one-pass"])
def test_vmap_over_targets_and_options_with_shared_logits(one_pass):
    """One logits array, a vmap over the targets or an option (a sweep of
    smoothing values, several label sets): jit(grad) and jvp of the mean
    raised (the gradient-poisoning custom_jvp's output was unbatched, its
    tangent batched like the flag); now equal to plain JAX."""
    rng = np.random.default_rng(19)
    logits = jnp.asarray(rng.normal(size=(5, C)), jnp.float32)
    targets = jnp.asarray(rng.integers(0, C, size=(3, 5)))
    values = jnp.asarray([0.0, 0.2, 0.7])
    cases = {
        "target": (lambda x, t: jxent.cross_entropy(x, t), _plain_cross_entropy, 0),
        "nll_loss": (
            lambda x, t: jxent.nll_loss(jax.nn.log_softmax(x), t),
            _plain_cross_entropy,
            0,
        ),
        "label_smoothing": (
            lambda x, e: jxent.cross_entropy(x, targets[0], label_smoothing=e),
            lambda x, e: _plain_cross_entropy(x, targets[0], eps=e),
            1,
        ),
        "z_loss": (
            lambda x, z: jxent.cross_entropy(x, targets[0], z_loss=z, reduction="sum"),
            lambda x, z: 5 * _plain_cross_entropy(x, targets[0], z_loss=z),
            1,
        ),
        "soft_cap": (
            lambda x, c: jxent.cross_entropy(x, targets[0], soft_cap=c),
            lambda x, c: _plain_cross_entropy(x, targets[0], soft_cap=c),
            1,
        ),
    }

    def run():
        out = {}
        for name, (ours, plain, which) in cases.items():
            batch = targets if which == 0 else values + (name == "soft_cap") * 2.0
            for tag, loss in (("ours", ours), ("plain", plain)):
                total = functools.partial(_summed_over, loss, batch)
                grad = jax.jit(jax.grad(total))(logits)
                tangent = jax.jit(lambda x, total=total: jax.jvp(total, (x,), (x,))[1])
                out[name, tag] = (grad, tangent(logits))
        return out

    out = _on_path(one_pass, run)
    for name in cases:
        for got, want in zip(out[name, "ours"], out[name, "plain"], strict=True):
            np.testing.assert_allclose(got, want, rtol=2e-5, atol=2e-6, err_msg=name)


def test_soft_cap_under_vmap_of_a_later_axis():
    """Probability targets with ``soft_cap``, under ``jit(grad)`` of a
    ``vmap`` over axis 1 (or over ``w`` in ``x @ w``): the soft-cap's
    ``custom_jvp`` failed to lower (its rule's selects; jax 0.10.2); now a
    clip, equal to plain JAX in both modes."""
    rng = np.random.default_rng(20)
    logits = jnp.asarray(rng.normal(size=(5, 3, C)), jnp.float32)
    q = jax.nn.softmax(jnp.asarray(rng.normal(size=(5, C)), jnp.float32))

    def plain(z):
        return -jnp.mean(jnp.sum(q * jax.nn.log_softmax(3.0 * jnp.tanh(z / 3.0)), -1))

    def ours(z):
        return jxent.cross_entropy(z, q, soft_cap=3.0)

    for loss in (ours, plain):
        total = functools.partial(_summed_over_axis_1, loss)
        got = (
            jax.jit(jax.grad(total))(logits),
            jax.jit(functools.partial(jax.jvp, total))((logits,), (logits,))[1],
        )
        if loss is ours:
            mine = got
    for a, b in zip(mine, got, strict=True):
        np.testing.assert_allclose(a, b, rtol=2e-5, atol=2e-6)


def _summed_over_axis_1(loss, x):
    return jnp.sum(jax.vmap(loss, in_axes=1)(x))


def test_checkpoint_and_scan():
    rng = np.random.default_rng(19)
    logits = jnp.asarray(rng.normal(size=(5, 3, C)), jnp.float32)
    target = jnp.asarray(rng.integers(0, C, size=(5, 3)))

    def step_loss(x, t):
        return jxent.cross_entropy(x, t, label_smoothing=0.1, z_loss=1e-3)

    def scanned(x):
        def body(total, xs):
            return total + jax.checkpoint(step_loss)(*xs), None

        return jax.lax.scan(body, jnp.float32(0), (x, target))[0]

    unrolled = lambda x: sum(step_loss(x[i], target[i]) for i in range(5))
    np.testing.assert_allclose(scanned(logits), unrolled(logits), rtol=1e-6)
    np.testing.assert_allclose(
        jax.grad(scanned)(logits), jax.grad(unrolled)(logits), rtol=1e-5, atol=1e-7
    )
    tangent = jnp.ones_like(logits)
    np.testing.assert_allclose(
        jax.jvp(scanned, (logits,), (tangent,))[1],
        jax.jvp(unrolled, (logits,), (tangent,))[1],
        rtol=1e-5,
    )


@functools.cache
def _compiled_value_and_grad(n, c, dtype, smoothing, keep=None, forward=False):
    x = jax.ShapeDtypeStruct((n, c), dtype)
    t = jax.ShapeDtypeStruct((n,), jnp.int32)
    w = jax.ShapeDtypeStruct((c,), jnp.float32)

    def loss(x, t, w):
        return jxent.cross_entropy(x, t, w, label_smoothing=0.1 if smoothing else 0.0)

    kernels._KEEP_EXPS = keep
    jax.clear_caches()
    try:
        program = loss if forward else jax.value_and_grad(loss)
        return jax.jit(program).lower(x, t, w).compile()
    finally:
        kernels._KEEP_EXPS = None
        jax.clear_caches()


@pytest.mark.parametrize(
    "dtype,keep",
    [(jnp.float32, False), (jnp.float32, True), (jnp.bfloat16, None)],
    ids=["float32-recomputed", "float32-kept", "bfloat16"],
)
@pytest.mark.parametrize("smoothing", [False, True])
@pytest.mark.parametrize("shape", [(256, 4096), (2048, 512)], ids=["split", "rows"])
def test_value_and_grad_has_no_logits_sized_temporary(dtype, keep, smoothing, shape):
    """The custom_jvp's transposed tangent map fuses into the gradient's pass.

    On the CPU's float32 path the gradient rescales the forward's kept
    exponentials instead of recomputing them, and XLA writes it over them.
    Short rows are split into more rows (``split``); 2048 rows are not. The
    forward alone holds nothing either (its rarely taken branch included,
    which redoes the statistics from the row maximum).
    """
    n, c = shape
    compiled = _compiled_value_and_grad(n, c, dtype, smoothing, keep)
    temp = compiled.memory_analysis().temp_size_in_bytes
    assert temp < 0.05 * n * c * jnp.dtype(dtype).itemsize, temp
    forward = _compiled_value_and_grad(n, c, dtype, smoothing, keep, forward=True)
    temp = forward.memory_analysis().temp_size_in_bytes
    assert temp < 0.05 * n * c * jnp.dtype(dtype).itemsize, temp
    recomputed = [
        line
        for line in compiled.as_text().splitlines()
        if f"f32[{n},{c}]{{1,0}} exponential(" in line and "transpose(" in line
    ]
    assert len(recomputed) == (0 if keep else 1), recomputed
