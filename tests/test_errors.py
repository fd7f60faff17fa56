"""Error contract: trace-time messages, out-of-range targets, zero denominators.

Every trace-time problem must raise the same ``ValueError`` (``TypeError`` for
dtypes) eagerly and under ``jax.jit``, naming the argument and the value
received. Bad options are closed over; arrays are passed as (traced) jit
arguments, so shape and dtype errors are shown to fire at trace time.
"""

from __future__ import annotations

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from conftest import maybe_jit
from jax.experimental import checkify
from oracles import torch_cross_entropy
from small_batch import LOG_PROBS, LOGITS, PROBS, TARGET, WEIGHT

import jxent

C = 3
# Created outside any trace, so it stays concrete when closed over by jit.
NEGATIVE_EPS = jnp.float32(-0.5)

ce = jxent.cross_entropy
nll = jxent.nll_loss
bce_logits = jxent.binary_cross_entropy_with_logits

# --------------------------------------------------------------------------
# Trace-time errors: (id, fn, args, exception, regex matched against message).
# --------------------------------------------------------------------------

_CE_CASES = [
    (
        "ce-reduction-unknown",
        lambda x, t: ce(x, t, reduction="avg"),
        (LOGITS, TARGET),
        ValueError,
        r"`reduction`.*'none', 'mean', 'sum'.*'avg'",
    ),
    (
        "ce-reduction-batchmean",
        lambda x, t: ce(x, t, reduction="batchmean"),
        (LOGITS, TARGET),
        ValueError,
        r"`reduction`.*'batchmean'",
    ),
    (
        "ce-reduction-None",
        lambda x, t: ce(x, t, reduction=None),
        (LOGITS, TARGET),
        ValueError,
        r"`reduction`.*got None",
    ),
    (
        "ce-reduction-soft-target",
        lambda x, q: ce(x, q, reduction="Mean"),
        (LOGITS, PROBS),
        ValueError,
        r"`reduction`.*'Mean'",
    ),
    (
        "ce-label-smoothing-negative",
        lambda x, t: ce(x, t, label_smoothing=-0.1),
        (LOGITS, TARGET),
        ValueError,
        r"`label_smoothing`.*\[0, 1\].*-0\.1",
    ),
    (
        "ce-label-smoothing-above-one",
        lambda x, t: ce(x, t, label_smoothing=1.5),
        (LOGITS, TARGET),
        ValueError,
        r"`label_smoothing`.*\[0, 1\].*1\.5",
    ),
    (
        "ce-label-smoothing-nan",
        lambda x, t: ce(x, t, label_smoothing=float("nan")),
        (LOGITS, TARGET),
        ValueError,
        r"`label_smoothing`.*nan",
    ),
    (
        "ce-label-smoothing-negative-soft",
        lambda x, q: ce(x, q, label_smoothing=-0.25),
        (LOGITS, PROBS),
        ValueError,
        r"`label_smoothing`.*-0\.25",
    ),
    (
        "ce-label-smoothing-negative-array",
        lambda x, t: ce(x, t, label_smoothing=NEGATIVE_EPS),
        (LOGITS, TARGET),
        ValueError,
        r"`label_smoothing`.*\[0, 1\].*-0\.5",
    ),
    (
        "ce-label-smoothing-vector",
        lambda x, t, eps: ce(x, t, label_smoothing=eps),
        (LOGITS, TARGET, jnp.array([0.1, 0.2])),
        ValueError,
        r"`label_smoothing`.*scalar",
    ),
    (
        "ce-weight-length",
        lambda x, t, w: ce(x, t, w),
        (LOGITS, TARGET, jnp.ones(2)),
        ValueError,
        r"`weight`.*C=3.*\(2,\)",
    ),
    (
        "ce-weight-2d",
        lambda x, t, w: ce(x, t, w),
        (LOGITS, TARGET, jnp.ones((3, 1))),
        ValueError,
        r"`weight`.*C=3.*\(3, 1\)",
    ),
    (
        "ce-weight-scalar",
        lambda x, t, w: ce(x, t, w),
        (LOGITS, TARGET, jnp.ones(())),
        ValueError,
        r"`weight`.*C=3.*got shape \(\)",
    ),
    (
        "ce-weight-length-soft-target",
        lambda x, q, w: ce(x, q, w),
        (LOGITS, PROBS, jnp.ones(4)),
        ValueError,
        r"`weight`.*C=3.*\(4,\)",
    ),
    (
        "ce-target-shape",
        lambda x, t: ce(x, t),
        (LOGITS, TARGET[:3]),
        ValueError,
        r"`target`.*expected \(4,\), got \(3,\)",
    ),
    (
        "ce-target-rank",
        lambda x, t: ce(x, t),
        (LOGITS, TARGET[:, None]),
        ValueError,
        r"`target`.*expected \(4,\), got \(4, 1\)",
    ),
    (
        "ce-target-shape-axis0",
        lambda x, t: ce(x, t, axis=0),
        (LOGITS, TARGET),
        ValueError,
        r"`target`.*expected \(3,\), got \(4,\)",
    ),
    (
        "ce-soft-target-shape",
        lambda x, q: ce(x, q),
        (LOGITS, PROBS[:, :2]),
        ValueError,
        r"`target`.*expected \(4, 3\), got \(4, 2\)",
    ),
    (
        "ce-integer-logits",
        lambda x, t: ce(x, t),
        (LOGITS.astype(jnp.int32), TARGET),
        TypeError,
        r"`logits`.*floating.*int32",
    ),
    (
        "ce-bool-target",
        lambda x, t: ce(x, t),
        (LOGITS, TARGET > 0),
        TypeError,
        r"`target`.*integer.*bool",
    ),
    (
        "ce-axis-too-large",
        lambda x, t: ce(x, t, axis=2),
        (LOGITS, TARGET),
        ValueError,
        r"`axis`.*\[-2, 2\).*got 2",
    ),
    (
        "ce-axis-too-small",
        lambda x, t: ce(x, t, axis=-3),
        (LOGITS, TARGET),
        ValueError,
        r"`axis`.*\[-2, 2\).*got -3",
    ),
    (
        "ce-axis-float",
        lambda x, t: ce(x, t, axis=1.0),
        (LOGITS, TARGET),
        TypeError,
        r"`axis`.*1\.0",
    ),
    (
        "ce-scalar-logits",
        lambda x, t: ce(x, t),
        (LOGITS[0, 0], TARGET[0]),
        ValueError,
        r"`logits`.*scalar",
    ),
    (
        "ce-ignore-index-zero-soft",
        lambda x, q: ce(x, q, ignore_index=0),
        (LOGITS, PROBS),
        ValueError,
        r"`ignore_index`.*ignore_index=0\b.*negative",
    ),
    (
        "ce-ignore-index-positive-soft",
        lambda x, q: ce(x, q, ignore_index=5),
        (LOGITS, PROBS),
        ValueError,
        r"`ignore_index`.*ignore_index=5\b",
    ),
    (
        "ce-ignore-index-float",
        lambda x, t: ce(x, t, ignore_index=1.5),
        (LOGITS, TARGET),
        TypeError,
        r"`ignore_index`.*1\.5",
    ),
]

_NLL_CASES = [
    (
        "nll-reduction-unknown",
        lambda lp, t: nll(lp, t, reduction="avg"),
        (LOG_PROBS, TARGET),
        ValueError,
        r"`reduction`.*'none', 'mean', 'sum'.*'avg'",
    ),
    (
        "nll-weight-length",
        lambda lp, t, w: nll(lp, t, w),
        (LOG_PROBS, TARGET, jnp.ones(5)),
        ValueError,
        r"`weight`.*C=3.*\(5,\)",
    ),
    (
        "nll-weight-2d",
        lambda lp, t, w: nll(lp, t, w),
        (LOG_PROBS, TARGET, jnp.ones((1, 3))),
        ValueError,
        r"`weight`.*\(1, 3\)",
    ),
    (
        "nll-target-shape",
        lambda lp, t: nll(lp, t),
        (LOG_PROBS, TARGET[:2]),
        ValueError,
        r"`target`.*expected \(4,\), got \(2,\)",
    ),
    (
        "nll-float-target",
        lambda lp, q: nll(lp, q),
        (LOG_PROBS, PROBS),
        TypeError,
        r"`target`.*integer.*float32",
    ),
    (
        "nll-integer-log-probs",
        lambda lp, t: nll(lp, t),
        (LOG_PROBS.astype(jnp.int32), TARGET),
        TypeError,
        r"`log_probs`.*floating.*int32",
    ),
    (
        "nll-axis",
        lambda lp, t: nll(lp, t, axis=3),
        (LOG_PROBS, TARGET),
        ValueError,
        r"`axis`.*\[-2, 2\).*got 3",
    ),
    (
        "nll-ignore-index-str",
        lambda lp, t: nll(lp, t, ignore_index="-100"),
        (LOG_PROBS, TARGET),
        TypeError,
        r"`ignore_index`.*'-100'",
    ),
]

_SOFTMAX_CASES = [
    (
        f"{fn.__name__}-{kind}",
        (lambda f, a: lambda x: f(x, axis=a))(fn, axis),
        (arg,),
        exc,
        regex,
    )
    for fn in (jxent.log_softmax, jxent.softmax)
    for kind, axis, arg, exc, regex in (
        ("integer", -1, LOGITS.astype(jnp.int32), TypeError, r"`x`.*floating.*int32"),
        ("bool", -1, LOGITS > 0, TypeError, r"`x`.*floating.*bool"),
        ("axis-too-large", 2, LOGITS, ValueError, r"`axis`.*\[-2, 2\).*got 2"),
        ("axis-too-small", -3, LOGITS, ValueError, r"`axis`.*\[-2, 2\).*got -3"),
        ("axis-1d", 1, LOGITS[0], ValueError, r"`axis`.*\[-1, 1\).*got 1"),
        ("axis-0d", 1, LOGITS[0, 0], ValueError, r"`axis`.*0, -1 or None.*0-d.*got 1"),
    )
] + [
    (
        "entropy-integer",
        lambda p: jxent.entropy(p),
        (PROBS.astype(jnp.int32),),
        TypeError,
        r"`probs`.*floating.*int32",
    ),
    (
        "entropy-axis",
        lambda p: jxent.entropy(p, axis=-5),
        (PROBS,),
        ValueError,
        r"`axis`.*got -5",
    ),
]

_KL_CASES = [
    (
        "kl-reduction-unknown",
        lambda lq, p: jxent.kl_div(lq, p, reduction="avg"),
        (LOG_PROBS, PROBS),
        ValueError,
        r"`reduction`.*'batchmean'.*'avg'",
    ),
    (
        "kl-reduction-elementwise_mean",
        lambda lq, p: jxent.kl_div(lq, p, reduction="elementwise_mean"),
        (LOG_PROBS, PROBS),
        ValueError,
        r"`reduction`.*'elementwise_mean'",
    ),
    (
        "kl-shape-mismatch",
        lambda lq, p: jxent.kl_div(lq, p),
        (LOG_PROBS, PROBS[:, :2]),
        ValueError,
        r"`input`.*`target`.*input\.shape=\(4, 3\).*target\.shape=\(4, 2\)",
    ),
    (
        "kl-shape-mismatch-transposed",
        lambda lq, p: jxent.kl_div(lq, p, reduction="batchmean"),
        (LOG_PROBS[:3], PROBS[:3].T[:, :2].T),
        ValueError,
        r"input\.shape=\(3, 3\).*target\.shape=\(2, 3\)",
    ),
    (
        "kl-log-target-int",
        lambda lq, p: jxent.kl_div(lq, p, log_target=1),
        (LOG_PROBS, PROBS),
        TypeError,
        r"`log_target`.*bool.*got 1\b",
    ),
    (
        "kl-log-target-str",
        lambda lq, p: jxent.kl_div(lq, p, log_target="yes"),
        (LOG_PROBS, PROBS),
        TypeError,
        r"`log_target`.*bool.*'yes'",
    ),
    (
        "kl-log-target-None",
        lambda lq, p: jxent.kl_div(lq, p, log_target=None),
        (LOG_PROBS, PROBS),
        TypeError,
        r"`log_target`.*None",
    ),
    (
        "kl-integer-input",
        lambda lq, p: jxent.kl_div(lq, p),
        (LOG_PROBS.astype(jnp.int32), PROBS),
        TypeError,
        r"`input`.*floating.*int32",
    ),
    (
        "kl-integer-target",
        lambda lq, p: jxent.kl_div(lq, p),
        (LOG_PROBS, PROBS.astype(jnp.int32)),
        TypeError,
        r"`target`.*floating.*int32",
    ),
]

_MODULE_CASES = [
    (
        "CrossEntropyLoss-reduction",
        lambda x, t: jxent.CrossEntropyLoss(reduction="avg")(x, t),
        (LOGITS, TARGET),
        ValueError,
        r"`reduction`.*'avg'",
    ),
    (
        "CrossEntropyLoss-reduction-batchmean",
        lambda x, t: jxent.CrossEntropyLoss(reduction="batchmean")(x, t),
        (LOGITS, TARGET),
        ValueError,
        r"`reduction`.*'batchmean'",
    ),
    (
        "NLLLoss-reduction",
        lambda lp, t: jxent.NLLLoss(reduction="elementwise_mean")(lp, t),
        (LOG_PROBS, TARGET),
        ValueError,
        r"`reduction`.*'elementwise_mean'",
    ),
    (
        "CrossEntropyLoss-label-smoothing",
        lambda x, t: jxent.CrossEntropyLoss(label_smoothing=-0.2)(x, t),
        (LOGITS, TARGET),
        ValueError,
        r"`label_smoothing`.*\[0, 1\].*-0\.2",
    ),
    (
        "CrossEntropyLoss-ignore-index",
        lambda x, t: jxent.CrossEntropyLoss(ignore_index=2.0)(x, t),
        (LOGITS, TARGET),
        TypeError,
        r"`ignore_index`.*2\.0",
    ),
    (
        "NLLLoss-ignore-index",
        lambda lp, t: jxent.NLLLoss(ignore_index=None)(lp, t),
        (LOG_PROBS, TARGET),
        TypeError,
        r"`ignore_index`.*None",
    ),
    (
        "CrossEntropyLoss-weight-shape",
        lambda x, t, w: jxent.CrossEntropyLoss(w)(x, t),
        (LOGITS, TARGET, jnp.ones(2)),
        ValueError,
        r"`weight`.*C=3.*\(2,\)",
    ),
    (
        "NLLLoss-weight-shape",
        lambda lp, t, w: jxent.NLLLoss(w)(lp, t),
        (LOG_PROBS, TARGET, jnp.ones((3, 3))),
        ValueError,
        r"`weight`.*\(3, 3\)",
    ),
    (
        "CrossEntropyLoss-target-shape",
        lambda x, t: jxent.CrossEntropyLoss()(x, t),
        (LOGITS, TARGET[1:]),
        ValueError,
        r"`target`.*expected \(4,\), got \(3,\)",
    ),
]

ERROR_CASES = [
    pytest.param(fn, args, exc, regex, id=case_id)
    for case_id, fn, args, exc, regex in (
        _CE_CASES + _NLL_CASES + _SOFTMAX_CASES + _KL_CASES + _MODULE_CASES
    )
]


@pytest.mark.parametrize(("fn", "args", "exc", "regex"), ERROR_CASES)
def test_trace_time_error(fn, args, exc, regex, jit_mode):
    with pytest.raises(exc, match=regex):
        maybe_jit(fn, jit_mode)(*args)


def test_complex_scalar_options_name_the_argument():
    """A complex option reached float() and raised its message, naming nothing."""
    cases = [
        ("label_smoothing", lambda: jxent.CrossEntropyLoss(label_smoothing=0.1j)),
        ("label_smoothing", lambda: ce(LOGITS, TARGET, label_smoothing=0.1 + 0j)),
        ("alpha", lambda: jxent.sigmoid_focal_loss(LOGITS, PROBS, alpha=0.25 + 0j)),
        ("gamma", lambda: jxent.sigmoid_focal_loss(LOGITS, PROBS, gamma=2 + 0j)),
    ]
    for name, call in cases:
        with pytest.raises(TypeError, match=f"`{name}` must be a real scalar"):
            call()


@pytest.mark.parametrize("dtype", [np.int64, np.uint8, np.bool_])
@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("logits", lambda x: ce(x, np.zeros(4, np.int64))),
        ("log_probs", lambda x: nll(x, np.zeros(4, np.int64))),
        ("logits", lambda x: jxent.binary_cross_entropy_with_logits(x, PROBS)),
        ("x", lambda x: jxent.log_softmax(x)),
        ("input", lambda x: jxent.kl_div(x, PROBS)),
    ],
    ids=["cross_entropy", "nll_loss", "bce_with_logits", "log_softmax", "kl_div"],
)
def test_integer_numpy_input_reports_the_dtype_passed(name, call, dtype):
    """A NumPy int64 array is named int64, not the int32 jnp.asarray makes of it
    (x64 off)."""
    x = np.zeros((4, C), dtype)
    with pytest.raises(TypeError, match=rf"`{name}` must have a floating dtype"):
        call(x)
    with pytest.raises(TypeError, match=rf"got {np.dtype(dtype).name}\.$"):
        call(x)


@pytest.mark.parametrize(
    "make",
    [
        lambda: jxent.CrossEntropyLoss(reduction="avg"),
        lambda: jxent.CrossEntropyLoss(None, reduction="batchmean"),
        lambda: jxent.NLLLoss(reduction="avg"),
        lambda: jxent.NLLLoss(WEIGHT, reduction=""),
    ],
    ids=["ce", "ce-batchmean", "nll", "nll-weight"],
)
def test_constructor_rejects_bad_reduction_before_any_call(make):
    with pytest.raises(ValueError, match=r"`reduction`.*got '[a-z]*'"):
        make()


@pytest.mark.parametrize(
    ("make", "exc", "regex"),
    [
        (lambda: jxent.CrossEntropyLoss(weight="abc"), TypeError, r"`weight`.*'abc'"),
        (lambda: jxent.CrossEntropyLoss([1.0, "x"]), TypeError, r"`weight`.*'x'"),
        (lambda: jxent.NLLLoss(np.ones((2, 3))), ValueError, r"`weight`.*\(2, 3\)"),
        (lambda: jxent.CrossEntropyLoss(np.float32(2)), ValueError, r"1-D.*\(\)"),
        (lambda: jxent.BCELoss(weight=["a"]), TypeError, r"`weight`"),
        (
            lambda: jxent.BCEWithLogitsLoss(pos_weight=object()),
            TypeError,
            r"`pos_weight`.*object",
        ),
    ],
    ids=["ce-str", "ce-list", "nll-2d", "ce-scalar", "bce", "bce-logits-pos"],
)
def test_constructor_rejects_bad_buffers_before_any_call(make, exc, regex):
    with pytest.raises(exc, match=regex):
        make()


@pytest.mark.parametrize("bad", ["abc", {"a": 1.0}, [[1.0, 2.0], [3.0]]])
@pytest.mark.parametrize(
    ("name", "call"),
    [
        ("logits", lambda v: ce(v, TARGET)),
        ("target", lambda v: ce(LOGITS, v)),
        ("weight", lambda v: ce(LOGITS, TARGET, v)),
        ("where", lambda v: ce(LOGITS, TARGET, where=v)),
        ("log_probs", lambda v: nll(v, TARGET)),
        ("x", lambda v: jxent.log_softmax(v)),
        ("weight", lambda v: jxent.binary_cross_entropy(PROBS, PROBS, v)),
        ("target", lambda v: jxent.binary_cross_entropy(PROBS, v)),
        ("pos_weight", lambda v: bce_logits(LOGITS, PROBS, pos_weight=v)),
        ("target", lambda v: jxent.log_probs(LOGITS, v)),
    ],
    ids=["ce-logits", "ce-target", "ce-weight", "ce-where", "nll", "log_softmax",
         "bce-weight", "bce-target", "bce-pos-weight", "log-probs-target"],
)  # fmt: skip
def test_what_is_no_array_is_named(name, call, bad):
    """A string, a dict or a ragged list reached jnp.asarray, whose TypeError
    names no argument ("Value 'abc' with dtype <U3 is not a valid JAX array
    type")."""
    with pytest.raises(TypeError, match=rf"^`{name}` must be an array.*got "):
        call(bad)


@pytest.mark.parametrize("make", [jxent.CrossEntropyLoss, jxent.NLLLoss])
@pytest.mark.parametrize("axis", [1.5, "1", True, None])
def test_constructor_rejects_a_bad_axis_before_any_call(make, axis):
    with pytest.raises(TypeError, match=r"`axis` must be an int, got "):
        make(axis=axis)
    assert make(axis=np.int64(1)).axis == 1


def test_equal_options_give_equal_loss_objects():
    """label_smoothing=0 is the default 0.0: equal, hashed alike (one program
    under jit, one cache entry as a static argument)."""
    made = jxent.CrossEntropyLoss(label_smoothing=0)
    assert made == jxent.CrossEntropyLoss()
    assert hash(made) == hash(jxent.CrossEntropyLoss())
    assert jxent.BCELoss(weight=2) == jxent.BCELoss(weight=2.0)


def test_constructor_accepts_real_buffers_and_leaves_traced_ones_to_the_call():
    assert jxent.CrossEntropyLoss([1, 2, 3]).weight.tolist() == [1, 2, 3]
    jxent.BCEWithLogitsLoss(weight=[[1.0, 2.0]], pos_weight=np.array([True, False]))

    @jax.jit
    def stacked_weight(w):  # traced: no shape known yet, checked by the call
        return jxent.CrossEntropyLoss(w)(jnp.zeros((2, 3)), jnp.array([0, 1]))

    with pytest.raises(ValueError, match="length C=3"):
        stacked_weight(jnp.ones((2, 3)))


def test_boolean_weights_count_as_zero_one_for_bce_and_are_refused_for_ce():
    # torch-style masks as BCE weights: True/False weigh as 1/0, in the
    # function and in the loss object alike; class weights must be numbers.
    x = jnp.array([[0.3, -1.2], [2.0, 0.5]])
    y = jnp.array([[1.0, 0.0], [0.0, 1.0]])
    mask = np.array([True, False])
    ones = mask.astype(np.float32)
    want = jxent.binary_cross_entropy_with_logits(x, y, ones, pos_weight=ones)
    got = jxent.binary_cross_entropy_with_logits(x, y, mask, pos_weight=mask)
    np.testing.assert_allclose(got, want, rtol=1e-6)
    module = jxent.BCEWithLogitsLoss(weight=mask, pos_weight=mask)
    np.testing.assert_allclose(module(x, y), want, rtol=1e-6)
    with pytest.raises(TypeError, match=r"`weight`.*bool"):
        jxent.cross_entropy(x, jnp.array([0, 1]), weight=mask)
    with pytest.raises(TypeError, match=r"`weight`.*bool"):
        jxent.CrossEntropyLoss(mask)


def test_integer_class_weights_weigh_as_their_float_values():
    """``weight=np.array([1, 2, 3])`` (ints, as NumPy writes them): the class
    losses crashed while poisoning the weights ("cannot convert float NaN to
    integer"); they now weigh as the same floats, values and gradients, in
    every function taking class weights and in the loss objects."""
    logits, target = LOGITS, TARGET
    as_ints, as_floats = np.array([1, 2, 3]), np.array([1.0, 2.0, 3.0], np.float32)
    losses = {
        "cross_entropy": lambda x, w: jxent.cross_entropy(x, target, w),
        "smoothed": lambda x, w: jxent.cross_entropy(x, target, w, label_smoothing=0.2),
        "none": lambda x, w: jnp.sum(
            jxent.cross_entropy(x, target, w, reduction="none")
        ),
        "probabilities": lambda x, w: jxent.cross_entropy(
            x, jax.nn.softmax(x[::-1]), w
        ),
        "nll_loss": lambda x, w: jxent.nll_loss(jax.nn.log_softmax(x), target, w),
        "linear": lambda x, w: jxent.linear_cross_entropy(x, jnp.eye(3), target, w),
        "module": lambda x, w: jxent.CrossEntropyLoss(w)(x, target),
        "nll_module": lambda x, w: jxent.NLLLoss(w)(jax.nn.log_softmax(x), target),
    }
    for name, f in losses.items():
        want = jax.value_and_grad(f)(logits, as_floats)
        for fn in (f, jax.jit(f)):
            got = jax.value_and_grad(fn)(logits, as_ints)
            np.testing.assert_allclose(got[0], want[0], rtol=1e-6, err_msg=name)
            np.testing.assert_allclose(got[1], want[1], rtol=1e-6, err_msg=name)
    torch_value, torch_grad = torch_cross_entropy(logits, target, as_floats)
    value, grad = jax.value_and_grad(jxent.cross_entropy)(logits, target, as_ints)
    np.testing.assert_allclose(value, torch_value, rtol=1e-6)
    np.testing.assert_allclose(grad, torch_grad, rtol=1e-6, atol=1e-7)


def test_traced_label_smoothing_gives_nan_outside_and_concrete_raises():
    """A traced value cannot raise: outside [0, 1] the loss is NaN."""
    f = jax.jit(lambda x, t, eps: ce(x, t, label_smoothing=eps))
    assert np.isfinite(f(LOGITS, TARGET, 0.5))
    assert np.isnan(f(LOGITS, TARGET, 1.5))
    assert np.isnan(f(LOGITS, TARGET, -0.5))
    with pytest.raises(ValueError, match=r"`label_smoothing`.*-0\.5"):
        ce(LOGITS, TARGET, label_smoothing=-0.5)


# --------------------------------------------------------------------------
# Out-of-range class indices.
# --------------------------------------------------------------------------

_RANGE_LOSSES = {
    "cross_entropy": lambda t, x=LOGITS, **kw: ce(x, t, **kw),
    "nll_loss": lambda t, x=LOG_PROBS, **kw: nll(x, t, **kw),
    "CrossEntropyLoss": lambda t, x=LOGITS, **kw: jxent.CrossEntropyLoss(**kw)(x, t),
    "NLLLoss": lambda t, x=LOG_PROBS, **kw: jxent.NLLLoss(**kw)(x, t),
}
_RANGE_INPUTS = {"cross_entropy": LOGITS, "CrossEntropyLoss": LOGITS}


def _with_bad(bad: int, position: int = 1) -> jax.Array:
    return TARGET.at[position].set(bad)


@pytest.mark.parametrize("name", list(_RANGE_LOSSES))
@pytest.mark.parametrize("bad", [3, -1, 7, -2, -101])
def test_concrete_out_of_range_raises_naming_value(name, bad, jit_mode):
    """Eagerly, and under jit when the target is a closed-over constant (the
    input is a traced jit argument)."""
    loss = _RANGE_LOSSES[name]
    target = _with_bad(bad)
    x = _RANGE_INPUTS.get(name, LOG_PROBS)
    with pytest.raises(
        ValueError, match=rf"`target`.*class index {bad},.*outside \[0, 3\)"
    ):
        maybe_jit(lambda x: loss(target, x), jit_mode)(x)


@pytest.mark.parametrize("name", ["cross_entropy", "nll_loss"])
def test_concrete_out_of_range_with_options(name):
    loss = _RANGE_LOSSES[name]
    for kw in ({"weight": WEIGHT}, {"reduction": "none"}, {"reduction": "sum"}):
        with pytest.raises(ValueError, match=r"class index 3,"):
            loss(_with_bad(3), **kw)
    if name == "cross_entropy":
        with pytest.raises(ValueError, match=r"class index -1,"):
            loss(_with_bad(-1), label_smoothing=0.2)
    # A custom ignore_index makes that value legal and the default one illegal.
    loss(_with_bad(-1), ignore_index=-1)
    with pytest.raises(ValueError, match=r"class index -100,.*ignore_index=-1\b"):
        loss(_with_bad(-100), ignore_index=-1)
    with pytest.raises(ValueError, match=r"class index 3,.*ignore_index=-1\b"):
        loss(_with_bad(3), ignore_index=-1)


def test_concrete_out_of_range_multidim_names_value():
    logits = jnp.zeros((2, C, 2))
    target = jnp.array([[0, 1], [5, 2]])
    with pytest.raises(ValueError, match=r"class index 5,"):
        ce(logits, target, axis=1)


def test_ignore_index_entries_are_not_out_of_range():
    target = TARGET.at[0].set(-100)
    assert np.isfinite(ce(LOGITS, target))
    assert np.isfinite(nll(LOG_PROBS, target))
    assert np.isfinite(ce(LOGITS, TARGET.at[2].set(C + 4), ignore_index=C + 4))


_JIT_CONFIGS = {
    "plain": {},
    "weight": {"weight": WEIGHT},
    "smoothing": {"label_smoothing": 0.1},
    "weight-smoothing": {"weight": WEIGHT, "label_smoothing": 0.3},
}


@functools.cache
def _jitted_all_reductions(name: str, config: str):
    kw = _JIT_CONFIGS[config]
    if name == "cross_entropy":
        fn = lambda t, r: ce(LOGITS, t, reduction=r, **kw)
    else:
        fn = lambda t, r: nll(LOG_PROBS, t, reduction=r, **kw)
    return jax.jit(lambda t: tuple(fn(t, r) for r in ("none", "mean", "sum")))


_JIT_RANGE_CASES = [("cross_entropy", config) for config in _JIT_CONFIGS] + [
    ("nll_loss", "plain"),
    ("nll_loss", "weight"),
]


@pytest.mark.parametrize(("name", "config"), _JIT_RANGE_CASES)
@pytest.mark.parametrize("bad", [3, -1, 4, -2, 1000, -100000])
@pytest.mark.parametrize("position", [0, 3])
def test_traced_out_of_range_gives_nan_never_a_wrapped_class(
    name, config, bad, position
):
    f = _jitted_all_reductions(name, config)
    good_none, _, _ = f(TARGET)
    none, mean, sum_ = f(_with_bad(bad, position))
    none = np.asarray(none)
    assert np.isnan(none[position]), none
    others = np.arange(len(TARGET)) != position
    np.testing.assert_array_equal(none[others], np.asarray(good_none)[others])
    assert np.isnan(mean)
    assert np.isnan(sum_)
    # Never the loss of a wrapped (Python/NumPy style) or clamped class.
    for cls in {bad % C, min(max(bad, 0), C - 1)}:
        other_none, _, _ = f(_with_bad(cls, position))
        assert np.isfinite(other_none[position])
        assert not none[position] == other_none[position]


@pytest.mark.parametrize("dtype", [jnp.uint8, jnp.int8, jnp.int16, jnp.uint32])
def test_out_of_range_with_small_integer_dtypes(dtype):
    bad = 200 if dtype in (jnp.uint8, jnp.uint32) else 100
    target = _with_bad(bad).astype(dtype)
    with pytest.raises(ValueError, match=rf"class index {bad},"):
        ce(LOGITS, target)
    f = jax.jit(lambda t: ce(LOGITS, t, reduction="none"))
    out = np.asarray(f(target))
    assert np.isnan(out[1])
    np.testing.assert_array_equal(np.delete(out, 1), np.delete(f(TARGET), 1))
    np.testing.assert_array_equal(f(TARGET.astype(dtype)), f(TARGET))


def _wide_head(num_classes: int, rows: int = 3, depth: int = 8):
    rng = np.random.default_rng(7)
    x = rng.normal(size=(rows, depth))
    w = rng.normal(size=(depth, num_classes)) / np.sqrt(depth)
    logits = x @ w
    lse = np.log(np.sum(np.exp(logits - logits.max(-1, keepdims=True)), -1))
    return x, w, logits, lse + logits.max(-1)


# Every public function that takes class indices, as a per-position NLL.
_INDEX_LOSSES = {
    "cross_entropy": lambda x, w, t: jxent.cross_entropy(x @ w, t, reduction="none"),
    "nll_loss": lambda x, w, t: jxent.nll_loss(
        jax.nn.log_softmax(x @ w), t, reduction="none"
    ),
    "linear_cross_entropy": lambda x, w, t: jxent.linear_cross_entropy(
        x, w, t, reduction="none"
    ),
    "log_probs": lambda x, w, t: -jxent.log_probs(x @ w, t),
    "linear_log_probs": lambda x, w, t: -jxent.linear_log_probs(x, w, t),
}


@pytest.mark.parametrize("name", sorted(_INDEX_LOSSES))
@pytest.mark.parametrize(
    ("dtype", "index"), [(np.uint8, 156), (np.uint16, 65436), (np.uint32, 2**32 - 100)]
)
def test_unsigned_index_equal_to_ignore_index_mod_two_to_the_bits(name, dtype, index):
    # uint8 156, uint16 65436 and uint32 2**32 - 100 are -100 wrapped: the
    # first two are classes (the float64 NLL, as torch gives), the third is
    # outside any class range (ValueError; NaN under jit), never ignored.
    num_classes = min(index + 1, 65437)
    x, w, logits, lse = _wide_head(num_classes)
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    loss = _INDEX_LOSSES[name]
    target = np.array([min(index, num_classes - 1), 3, 0], dtype)
    expected = lse - logits[np.arange(3), target.astype(np.int64)]
    jitted = jax.jit(loss)(x, w, jnp.asarray(target))
    if index < num_classes:
        np.testing.assert_allclose(loss(x, w, target), expected, rtol=2e-5)
        np.testing.assert_allclose(jitted, expected, rtol=2e-5)
        return
    target[0] = index
    with pytest.raises(ValueError, match=rf"class index {index},"):
        loss(x, w, target)
    jitted = np.asarray(jax.jit(loss)(x, w, jnp.asarray(target)))
    assert np.isnan(jitted[0])
    np.testing.assert_allclose(jitted[1:], expected[1:], rtol=2e-5)


@pytest.mark.parametrize("index", [2**31 - 1, 2**31])
def test_uint32_index_at_the_int32_limit(index):
    # Either side of the signed maximum: the index as given, never wrapped.
    target = np.array([0, index, 2], np.uint32)
    with pytest.raises(ValueError, match=rf"class index {index},"):
        jxent.cross_entropy(jnp.zeros((3, C)), target)


@pytest.mark.parametrize("name", sorted(_INDEX_LOSSES))
def test_concrete_unsigned_target_captured_by_a_jitted_function(name):
    # A jax.Array constant closed over by a jitted function is concrete, but
    # jnp ops on it are staged into the trace: the range check once took
    # jnp.max of it and raised a ConcretizationTypeError. The float64 NLL;
    # an index beyond int32 still raises, naming it.
    x, w, logits, lse = _wide_head(C)
    x, w = jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
    target = jnp.asarray([2, 0, 1], jnp.uint32)
    loss = _INDEX_LOSSES[name]
    got = jax.jit(lambda x, w: loss(x, w, target))(x, w)
    np.testing.assert_allclose(got, lse - logits[np.arange(3), [2, 0, 1]], rtol=2e-5)
    beyond = jnp.asarray([2, 2**31, 1], jnp.uint32)
    with pytest.raises(ValueError, match=rf"class index {2**31},"):
        jax.jit(lambda x, w: loss(x, w, beyond))(x, w)


def test_concrete_arrays_captured_by_checkify_and_jit():
    # check_target on a captured uint32 target, and bfloat16 probabilities
    # captured by a jitted binary_cross_entropy (once a TracerArrayConversion).
    target = jnp.asarray([1, 2], jnp.uint32)
    checked = checkify.checkify(lambda: jxent.check_target(target, 3))
    assert checked()[0].get() is None
    assert jax.jit(checked)()[0].get() is None
    bad = jnp.asarray([1, 3], jnp.uint32)
    error, _ = jax.jit(checkify.checkify(lambda: jxent.check_target(bad, 3)))()
    with pytest.raises(checkify.JaxRuntimeError, match="got 3"):
        error.throw()
    probs = jnp.asarray([0.5, 0.25], jnp.bfloat16)
    t = jnp.asarray([1.0, 0.0], jnp.bfloat16)
    got = jax.jit(lambda t: jxent.binary_cross_entropy(probs, t, reduction="none"))(t)
    np.testing.assert_allclose(
        np.asarray(got, np.float64), [np.log(2), -np.log(0.75)], rtol=1e-2
    )
    outside = jnp.asarray([0.5, 1.5], jnp.bfloat16)
    with pytest.raises(ValueError, match="probabilities in"):
        jax.jit(lambda t: jxent.binary_cross_entropy(outside, t))(t)


# (option, good value, value outside its range) per function taking it.
_SCALAR_OPTIONS = [
    ("cross_entropy", "label_smoothing", 0.1, 1.5),
    ("cross_entropy", "z_loss", 1e-3, -1.0),
    ("cross_entropy", "soft_cap", 5.0, -5.0),
    ("linear_cross_entropy", "label_smoothing", 0.1, 1.5),
    ("log_probs", "temperature", 0.7, -0.7),
    ("linear_log_probs", "temperature", 0.7, 0.0),
    ("distillation_loss", "beta", 0.5, 1.5),
    ("linear_distillation_loss", "beta", 0.5, -0.5),
    ("sigmoid_focal_loss", "gamma", 2.0, -1.0),
]


def _with_option(name, option, value):
    x, w, logits, _ = _wide_head(C)
    x, w, logits = (jnp.asarray(a, jnp.float32) for a in (x, w, logits))
    target = jnp.asarray([2, 0, 1])
    calls = {
        "cross_entropy": lambda **o: jxent.cross_entropy(logits, target, **o),
        "linear_cross_entropy": lambda **o: jxent.linear_cross_entropy(
            x, w, target, **o
        ),
        "log_probs": lambda **o: jxent.log_probs(logits, target, **o),
        "linear_log_probs": lambda **o: jxent.linear_log_probs(x, w, target, **o),
        "distillation_loss": lambda **o: jxent.distillation_loss(
            logits, logits[::-1], **o
        ),
        "linear_distillation_loss": lambda **o: jxent.linear_distillation_loss(
            x, w, x[::-1], w, **o
        ),
        "sigmoid_focal_loss": lambda **o: jxent.sigmoid_focal_loss(
            logits, (logits > 0).astype(jnp.float32), **o
        ),
    }
    return calls[name](**{option: value})


@pytest.mark.parametrize(("name", "option", "good", "bad"), _SCALAR_OPTIONS)
def test_bfloat16_scalar_options_are_real_numbers(name, option, good, bad):
    # A bfloat16 scalar (NumPy's dtype for it is not np.number) was refused
    # as "not a real scalar". It is the float32 number it holds; outside the
    # option's range it is refused as that number.
    value = jnp.asarray(good, jnp.bfloat16)
    np.testing.assert_array_equal(
        _with_option(name, option, value), _with_option(name, option, float(value))
    )
    with pytest.raises(ValueError, match=rf"`{option}` must be"):
        _with_option(name, option, jnp.asarray(bad, jnp.bfloat16))


def test_stacked_bfloat16_label_smoothing_of_a_loss_object():
    ls = jnp.asarray([0.1, 0.2], jnp.bfloat16)
    assert jxent.CrossEntropyLoss(label_smoothing=ls).label_smoothing is not None
    with pytest.raises(ValueError, match="`label_smoothing` must be real values"):
        jxent.CrossEntropyLoss(label_smoothing=ls.at[1].set(1.5))


def test_int64_index_that_jax_would_wrap_to_32_bits_raises():
    # Without x64 jnp.asarray wraps a NumPy int64 2**32 + 1 to class 1.
    target = np.array([0, 2**32 + 1, 2], np.int64)
    for loss in _INDEX_LOSSES.values():
        x, w, _, _ = _wide_head(C)
        with pytest.raises(ValueError, match=r"class index 4294967297.*wrap to 1"):
            loss(jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32), target)
        # The same NumPy constant under jit (a tracer once converted).
        with pytest.raises(ValueError, match=r"class index 4294967297.*wrap to 1"):
            jax.jit(lambda x, w, loss=loss: loss(x, w, target))(
                jnp.asarray(x, jnp.float32), jnp.asarray(w, jnp.float32)
            )


def test_ignore_index_beyond_a_narrow_target_dtype():
    # An int8 target and ignore_index=-1000 (no int8 equals it): every
    # position counts, as torch (int64 targets) gives.
    _, _, logits, lse = _wide_head(C)
    target = np.array([0, 2, 1], np.int8)
    out = jxent.cross_entropy(
        jnp.asarray(logits, jnp.float32), target, ignore_index=-1000, reduction="none"
    )
    np.testing.assert_allclose(out, lse - logits[np.arange(3), target], rtol=1e-6)


@pytest.mark.parametrize("ignore_index", [2**31, -(2**40)])
def test_ignore_index_no_class_index_can_equal(ignore_index):
    # Without x64 class indices are int32: such an ignore_index is an error
    # naming it, not an OverflowError from inside the comparison.
    with pytest.raises(ValueError, match=rf"`ignore_index`.*got {ignore_index}"):
        ce(LOGITS, TARGET, ignore_index=ignore_index)


def test_traced_minus_one_is_not_last_class():
    f = jax.jit(lambda t: ce(LOGITS, t, reduction="none"))
    minus_one = f(jnp.array([-1, -1, -1, -1]))
    last = f(jnp.array([C - 1] * 4))
    assert np.all(np.isnan(minus_one))
    assert np.all(np.isfinite(last))


def test_traced_out_of_range_under_vmap_gives_nan():
    f = jax.vmap(lambda x, t: ce(x, t, reduction="none"))
    out = np.asarray(f(LOGITS[None], _with_bad(C)[None]))
    assert np.isnan(out[0, 1])
    assert np.isfinite(np.delete(out[0], 1)).all()


# --------------------------------------------------------------------------
# checkify + check_target.
# --------------------------------------------------------------------------


def _checked_ce(x, t):
    return ce(x, jxent.check_target(t, x.shape[-1]))


def _checked_nll(lp, t):
    return nll(lp, jxent.check_target(t, lp.shape[-1]))


def _checked_ce_ignore_minus_one(x, t):
    return ce(x, jxent.check_target(t, x.shape[-1], ignore_index=-1), ignore_index=-1)


_CHECKED = {
    "ce": (checkify.checkify(jax.jit(_checked_ce)), LOGITS, -100),
    "ce-jit-outside": (jax.jit(checkify.checkify(_checked_ce)), LOGITS, -100),
    "nll": (checkify.checkify(jax.jit(_checked_nll)), LOG_PROBS, -100),
    "ce-ignore-minus-one": (
        checkify.checkify(jax.jit(_checked_ce_ignore_minus_one)),
        LOGITS,
        -1,
    ),
}


@pytest.mark.parametrize("name", list(_CHECKED))
@pytest.mark.parametrize("bad", [3, -3, 50])
def test_checkify_reports_bad_target(name, bad):
    checked, x, _ = _CHECKED[name]
    err, value = checked(x, _with_bad(bad, 2))
    assert err.get() is not None
    assert re.search(rf"got {bad}\b", err.get()), err.get()
    assert "[0, 3)" in err.get()
    with pytest.raises(checkify.JaxRuntimeError, match=rf"got {bad}\b"):
        err.throw()
    assert np.isnan(value)


@pytest.mark.parametrize("name", list(_CHECKED))
def test_checkify_reports_the_default_ignore_index_when_not_ignored(name):
    checked, x, ignore_index = _CHECKED[name]
    other = -100 if ignore_index == -1 else -1
    err, _ = checked(x, _with_bad(other, 0))
    assert err.get() is not None
    assert re.search(rf"got {other}\b", err.get()), err.get()


@pytest.mark.parametrize("name", list(_CHECKED))
@pytest.mark.parametrize(
    "positions", [(), (0,), (1, 3), (0, 1, 2, 3)], ids=["none", "one", "two", "all"]
)
def test_checkify_passes_good_targets_and_ignore_index(name, positions):
    checked, x, ignore_index = _CHECKED[name]
    target = TARGET
    for p in positions:
        target = target.at[p].set(ignore_index)
    err, value = checked(x, target)
    assert err.get() is None
    err.throw()  # no-op
    fn = ce if x is LOGITS else nll
    expected = fn(x, target, ignore_index=ignore_index)
    np.testing.assert_allclose(value, expected, rtol=1e-6, atol=0)


@pytest.mark.parametrize("order", ["checkify(vmap)", "vmap(checkify)"])
def test_checkify_with_a_loss_per_example_under_vmap(order):
    # A loss per example (vmap) inside or around checkify (float checks, and
    # check_target): the CPU's overflow-redo loop had a batched predicate,
    # which checkify refuses ("Checkify does not support batched
    # while-loops"), even with no check of its own. Values and gradients
    # against the float64 NLL, one member's logits overflowing the fast path
    # (its gradient reads the exponentials that the loop redoes).
    rng = np.random.default_rng(3)
    x = rng.normal(scale=3.0, size=(4, 3, C)).astype(np.float32)
    x[1, 0, 2] = 200.0
    t = rng.integers(0, C, (4, 3))
    t[1, 0] = 0
    x64_ = x.astype(np.float64)
    lp = x64_ - x64_.max(-1, keepdims=True)
    lp -= np.log(np.sum(np.exp(lp), -1, keepdims=True))
    want = -np.take_along_axis(lp, t[..., None], -1)[..., 0].mean(-1)
    want_grad = (np.exp(lp) - np.eye(C)[t]) / t.shape[1]
    value_and_grad = jax.value_and_grad(_checked_ce)
    if order == "checkify(vmap)":
        checked = checkify.checkify(
            jax.vmap(value_and_grad), errors=checkify.all_checks
        )
    else:
        checked = jax.vmap(checkify.checkify(value_and_grad))
    checked = jax.jit(checked)
    err, (value, grad) = checked(jnp.asarray(x), jnp.asarray(t))
    assert err.get() is None
    np.testing.assert_allclose(value, want, rtol=1e-6)
    np.testing.assert_allclose(grad, want_grad, rtol=1e-5, atol=1e-7)
    err, (value, _) = checked(jnp.asarray(x), jnp.asarray(t).at[2, 1].set(C + 4))
    assert re.search(rf"got {C + 4}\b", err.get()), err.get()
    assert np.isnan(value[2]) and np.isfinite(np.delete(value, 2)).all()


def test_checkify_multidim_and_empty_targets():
    checked = checkify.checkify(jax.jit(lambda t: jxent.check_target(t, C)))
    err, out = checked(jnp.array([[0, 1], [-100, 2]]))
    assert err.get() is None
    np.testing.assert_array_equal(out, [[0, 1], [-100, 2]])
    err, _ = checked(jnp.array([[0, 1], [2, 5]]))
    assert re.search(r"got 5\b", err.get()), err.get()
    err, _ = checked(jnp.zeros((0,), jnp.int32))
    assert err.get() is None


def test_check_target_under_jit_without_checkify_refuses_to_trace():
    with pytest.raises(ValueError, match="checkify"):
        jax.jit(_checked_ce)(LOGITS, TARGET)


def test_check_target_concrete_raises_and_returns_target():
    with pytest.raises(checkify.JaxRuntimeError, match=r"got 3\b"):
        jxent.check_target(_with_bad(3), C)
    np.testing.assert_array_equal(jxent.check_target(TARGET, C), TARGET)


@pytest.mark.parametrize(
    "target, num_classes, error, match",
    [
        (np.array([0.0, 2.0]), C, TypeError, "integer class indices.*float"),
        (np.array([True]), C, TypeError, "integer class indices.*bool"),
        (np.array([0, 1]), 0, ValueError, "`num_classes` must be a positive int.*0"),
        (np.array([0, 1]), 3.0, ValueError, "`num_classes`.*3.0"),
    ],
)
def test_check_target_refuses_what_is_not_class_indices(
    target, num_classes, error, match
):
    with pytest.raises(error, match=match):
        jxent.check_target(target, num_classes)


# --------------------------------------------------------------------------
# Zero "mean" denominator: 0.0 with exactly zero, finite gradients.
# --------------------------------------------------------------------------

ALL_IGNORED = jnp.full((4,), -100, jnp.int32)
EMPTY_X = jnp.zeros((0, C), jnp.float32)
EMPTY_T = jnp.zeros((0,), jnp.int32)

_ZERO_DENOMINATOR_CASES = {
    "ce-all-ignored": lambda x, w, r: ce(x, ALL_IGNORED, reduction=r),
    "ce-all-ignored-smoothing": lambda x, w, r: ce(
        x, ALL_IGNORED, w, reduction=r, label_smoothing=0.2
    ),
    "ce-all-ignored-custom-index": lambda x, w, r: ce(
        x, jnp.full((4,), 2), w, reduction=r, ignore_index=2, label_smoothing=0.1
    ),
    "ce-zero-weights": lambda x, w, r: ce(x, TARGET, w * 0, reduction=r),
    "ce-zero-weights-smoothing-some-ignored": lambda x, w, r: ce(
        x, TARGET.at[0].set(-100), w * 0, reduction=r, label_smoothing=0.4
    ),
    "nll-all-ignored": lambda x, w, r: nll(x, ALL_IGNORED, w, reduction=r),
    "nll-zero-weights": lambda x, w, r: nll(x, TARGET, w * 0, reduction=r),
}


def _zero_denominator_outputs(fn, x, w):
    """The mean and its gradients, the sum, per-element: one compilation."""
    mean, (gx, gw) = jax.value_and_grad(lambda x, w: fn(x, w, "mean"), argnums=(0, 1))(
        x, w
    )
    return mean, gx, gw, fn(x, w, "sum"), fn(x, w, "none")


# Every case under jit; eagerly (op-by-op, which compiles each primitive) a
# subset covering cross_entropy with and without smoothing, and nll_loss.
_EAGER_ZERO_DENOMINATOR = (
    "ce-all-ignored-smoothing",
    "ce-zero-weights",
    "nll-all-ignored",
)


@pytest.mark.parametrize(
    ("case", "jit_mode"),
    [(case, "jit") for case in _ZERO_DENOMINATOR_CASES]
    + [(case, "eager") for case in _EAGER_ZERO_DENOMINATOR],
)
def test_zero_denominator_mean_is_zero_with_zero_gradients(case, jit_mode):
    fn = _ZERO_DENOMINATOR_CASES[case]
    outputs = maybe_jit(functools.partial(_zero_denominator_outputs, fn), jit_mode)
    mean, gx, gw, total, per_element = outputs(LOGITS, WEIGHT)
    assert mean.dtype == jnp.float32
    assert float(mean) == 0.0
    assert np.isfinite(gx).all() and np.isfinite(gw).all()
    np.testing.assert_array_equal(gx, np.zeros_like(gx))
    np.testing.assert_array_equal(gw, np.zeros_like(gw))
    assert float(total) == 0.0
    np.testing.assert_array_equal(per_element, np.zeros(4, np.float32))


def test_zero_denominator_with_smoothing_mass_on_other_classes(jit_mode):
    """Weights zero on every target class but not on all classes: the mean's
    denominator sum(w[y]) is 0, so the mean is 0.0, while the sum is not."""
    w = jnp.array([0.0, 0.0, 1.0])
    target = jnp.array([0, 1, 1, 0])
    f = lambda x, r: ce(x, target, w, reduction=r, label_smoothing=0.3)
    value, grad = maybe_jit(jax.value_and_grad(lambda x: f(x, "mean")), jit_mode)(
        LOGITS
    )
    assert float(value) == 0.0
    np.testing.assert_array_equal(grad, np.zeros_like(grad))
    total = maybe_jit(lambda x: f(x, "sum"), jit_mode)(LOGITS)
    assert np.isfinite(total) and float(total) > 0.0


_EMPTY_CASES = {
    "ce-hard": lambda x, r: ce(x, EMPTY_T, reduction=r),
    "ce-hard-weight-smoothing": lambda x, r: ce(
        x, EMPTY_T, WEIGHT, reduction=r, label_smoothing=0.1
    ),
    "ce-soft-weight": lambda x, r: ce(x, jnp.zeros((0, C)), WEIGHT, reduction=r),
    "nll": lambda x, r: nll(x, EMPTY_T, reduction=r),
}


@pytest.mark.parametrize(
    ("case", "jit_mode"),
    [(case, "jit") for case in _EMPTY_CASES]
    + [(case, "eager") for case in ("ce-hard-weight-smoothing", "ce-soft-weight")],
)
def test_empty_batch(case, jit_mode):
    fn = _EMPTY_CASES[case]
    for reduction in ("mean", "sum"):
        loss = functools.partial(lambda x, r: fn(x, r), r=reduction)
        g = maybe_jit(jax.value_and_grad(loss), jit_mode)
        value, grad = g(EMPTY_X)
        assert value.shape == ()
        assert float(value) == 0.0
        assert grad.shape == (0, C)
    none = maybe_jit(lambda x: fn(x, "none"), jit_mode)(EMPTY_X)
    assert none.shape == (0,)


def test_empty_batch_kl_div(jit_mode):
    for reduction in ("mean", "batchmean", "sum"):
        kl = functools.partial(jxent.kl_div, reduction=reduction)
        out = maybe_jit(kl, jit_mode)(EMPTY_X, EMPTY_X)
        assert float(out) == 0.0


# --------------------------------------------------------------------------
# Target-shape messages name the likely fix.
# --------------------------------------------------------------------------

TORCH_LAYOUT = jnp.zeros((2, 5, 8))  # (N, C, L) with C=5, L=8
_ONE_HOT = jax.nn.one_hot(TARGET, C, dtype=jnp.int32)

TARGET_SHAPE_HINTS = [
    pytest.param(
        lambda x, t: ce(x, t),
        (TORCH_LAYOUT, jnp.zeros((2, 8), jnp.int32)),
        r"without the class axis, the last axis \(axis=-1\): expected \(2, 5\), "
        r"got \(2, 8\) .* pass `axis=1` "
        r"\(PyTorch's \(N, C, d1, \.\.\.\) layout\)\.(\n|$)",
        id="torch-layout-without-axis",
    ),
    pytest.param(
        lambda lp, t: nll(lp, t),
        (TORCH_LAYOUT, jnp.zeros((2, 8), jnp.int32)),
        r"shape of `log_probs` without the class axis, the last axis \(axis=-1\)"
        r".*pass `axis=1`",
        id="nll-torch-layout-without-axis",
    ),
    pytest.param(
        lambda x, t: jxent.CrossEntropyLoss()(x, t),
        (TORCH_LAYOUT, jnp.zeros((2, 8), jnp.int32)),
        r"the last axis \(axis=-1\).*pass `axis=1`",
        id="module-torch-layout-without-axis",
    ),
    pytest.param(
        lambda x, t: ce(x, t, axis=1),
        (TORCH_LAYOUT, jnp.zeros((2, 5), jnp.int32)),
        r"without the class axis, axis=1: expected \(2, 8\), got \(2, 5\) .*"
        r"pass `axis=2`\.(\n|$)",
        id="explicit-axis-other-axis-fits",
    ),
    pytest.param(
        lambda x, t: ce(x, t),
        (LOGITS, _ONE_HOT),
        r"expected \(4,\), got \(4, 3\) .* looks one-hot: pass class indices, "
        r"`jnp\.argmax\(target, axis=-1\)`, or class probabilities as a floating "
        r"array, `target\.astype\(logits\.dtype\)`\.(\n|$)",
        id="one-hot-integer-target",
    ),
    pytest.param(
        lambda x, t: ce(x, t, axis=1),
        (TORCH_LAYOUT, jnp.zeros((2, 5, 8), jnp.int32)),
        r"axis=1: expected \(2, 8\).*`jnp\.argmax\(target, axis=1\)`",
        id="one-hot-integer-target-torch-layout",
    ),
    pytest.param(
        lambda x, t: ce(x, t),
        (LOGITS, TARGET[:, None]),
        r"expected \(4,\), got \(4, 1\) .* trailing axis of size 1: pass "
        r"`target\.squeeze\(-1\)` \(shape \(4,\)\)\.(\n|$)",
        id="trailing-size-one-axis",
    ),
    pytest.param(
        lambda lp, t: nll(lp, t),
        (LOG_PROBS, TARGET[:, None]),
        r"`log_probs`.*`target\.squeeze\(-1\)`",
        id="nll-trailing-size-one-axis",
    ),
]


@pytest.mark.parametrize(("fn", "args", "regex"), TARGET_SHAPE_HINTS)
def test_target_shape_message_names_the_fix(fn, args, regex, jit_mode):
    with pytest.raises(ValueError, match=regex):
        maybe_jit(fn, jit_mode)(*args)


def test_target_shape_message_without_a_likely_fix_gives_no_hint():
    """A batch of the wrong size: no axis, squeeze or argmax is suggested."""
    with pytest.raises(ValueError) as info:
        ce(LOGITS, TARGET[:3])
    message = str(info.value)
    assert message.endswith("(`logits`.shape=(4, 3)).")
    assert "class axis 1" not in message and "axis=-1" in message
    for hint in ("pass `axis", "squeeze", "argmax"):
        assert hint not in message


@pytest.mark.parametrize(
    "shape", [(2, 3, 4), (2, 3, 3), (2, 3, 3, 3), (2, 3, 3, 4), (2, 3, 4, 3)]
)
def test_forgotten_axis_1_is_caught_iff_a_spatial_size_differs_from_c(shape):
    """docs/porting.md: torch-layout logits (N, C, d1, ...) without `axis=1`.

    Class indices: a ValueError unless every spatial size equals C (then the
    default axis computes another loss, silently). Class probabilities: never
    caught.
    """
    _, c, *spatial = shape
    x = jax.random.normal(jax.random.key(0), shape)
    t = jax.random.randint(jax.random.key(1), (shape[0], *spatial), 0, c)
    if any(d != c for d in spatial):
        with pytest.raises(ValueError, match=r"pass `axis=1`"):
            ce(x, t)
    else:
        assert not np.isclose(ce(x, t), ce(x, t, axis=1))
    q = jax.nn.softmax(jax.random.normal(jax.random.key(2), shape), axis=1)
    assert not np.isclose(ce(x, q), ce(x, q, axis=1))


def test_class_split_that_does_not_divide_the_classes_names_both():
    """The Explicit-sharding wrappers' check (cross_entropy, log_probs and
    the LM heads share it): the size, the axes, the device count, the fix."""
    from jax.sharding import AbstractMesh

    from jxent._sharding import check_class_split

    mesh = AbstractMesh((2, 4), ("data", "model"))
    check_class_split(32, mesh, ("model",), "The vocabulary of `w`")
    check_class_split(30, mesh, (), "The vocabulary of `w`")
    with pytest.raises(ValueError, match=r"size 30\).*\('model',\) of 4 devices.*pad"):
        check_class_split(30, mesh, ("model",), "The vocabulary of `w`")
    with pytest.raises(ValueError, match="of 8 devices"):
        check_class_split(12, mesh, ("data", "model"), "The class axis of `logits`")
