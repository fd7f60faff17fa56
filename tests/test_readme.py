"""The README runs: its Python blocks, in order, as one script, showing what they claim.

Every ```python block of README.md is executed in order in one shared namespace
(one script, one process), statement by statement. Two comment forms at the
end of a statement are claims that the test checks:

* ``expression  # -> EXPECTED``: the expression's value is EXPECTED. Numbers
  are compared to the precision written (``2.3185`` means within 5e-5 of it;
  ``nan`` must be NaN), lists and tuples element by element, anything that is
  not a Python literal (``float32``) with ``str(value)``, and strings match
  with ``...`` standing for any text.
* ``statement  # raises NAME: MESSAGE``: the statement raises an exception
  whose class (or a base class) is named NAME, with a message that starts with
  MESSAGE (``...`` again standing for any text).

Other comments are prose. A claim anywhere but at the end of a top-level
statement fails the test, so that no claim goes unchecked.
"""

from __future__ import annotations

import ast
import math
import re
from decimal import Decimal
from pathlib import Path

import numpy as np
import pytest

README = Path(__file__).resolve().parents[1] / "README.md"
BLOCK = re.compile(r"^```python\n(.*?)^```$", re.MULTILINE | re.DOTALL)
VALUE_CLAIM = re.compile(r"#\s*->\s*(?P<expected>.+?)\s*$")
RAISES_CLAIM = re.compile(r"#\s*raises\s+(?P<name>\w+):\s*(?P<message>.+?)\s*$")
NUMBER = re.compile(r"-?(?:nan|inf|\d+\.?\d*(?:[eE][-+]?\d+)?|\.\d+(?:[eE][-+]?\d+)?)")


def python_blocks(text: str) -> list[str]:
    return BLOCK.findall(text)


def _flatten(value: object) -> list[object]:
    if isinstance(value, list | tuple):
        return [leaf for item in value for leaf in _flatten(item)]
    return [value]


def _as_python(value: object) -> object:
    """Arrays and NumPy scalars as Python scalars or nested lists."""
    if hasattr(value, "__array__") and not isinstance(value, str):
        return np.asarray(value).tolist()
    return value


def _wildcard(pattern: str) -> re.Pattern[str]:
    return re.compile(".*".join(map(re.escape, pattern.split("..."))), re.DOTALL)


def check_value(actual: object, expected_text: str) -> None:
    """Asserts that ``actual`` is what ``# -> expected_text`` claims."""
    try:
        expected = eval(  # a literal, with nan and inf allowed
            compile(expected_text, "<claim>", "eval"),
            {"__builtins__": {}, "nan": math.nan, "inf": math.inf},
        )
    except (NameError, SyntaxError):
        assert str(actual) == expected_text, (actual, expected_text)
        return
    if expected is None or isinstance(expected, bool):
        assert _as_python(actual) is expected or actual is expected, (
            actual,
            expected_text,
        )
        return
    if isinstance(expected, str):
        assert isinstance(actual, str), (actual, expected_text)
        assert _wildcard(expected).fullmatch(actual), (actual, expected_text)
        return
    actual = _as_python(actual)
    assert type(actual) is type(expected) or isinstance(expected, float | int), (
        actual,
        expected_text,
    )
    got, want = _flatten(actual), _flatten(expected)
    numbers = NUMBER.findall(expected_text)
    assert len(got) == len(want) == len(numbers), (actual, expected_text)
    assert np.shape(actual) == np.shape(expected), (actual, expected_text)
    for g, w, text in zip(got, want, numbers, strict=True):
        if isinstance(w, bool):
            assert g is w, (actual, expected_text)
        elif math.isnan(w):
            assert math.isnan(g), (actual, expected_text)
        elif math.isinf(w):
            assert g == w, (actual, expected_text)
        else:
            tolerance = 0.5 * 10.0 ** Decimal(text.lstrip("-")).as_tuple().exponent
            assert abs(g - w) <= tolerance * (1 + 1e-9), (actual, expected_text)


def run_statement(stmt: ast.stmt, lines: list[str], namespace: dict) -> int:
    """Runs one top-level statement; returns how many claims it checked."""
    last_line = lines[stmt.end_lineno - 1]
    value_claim = VALUE_CLAIM.search(last_line)
    raises_claim = RAISES_CLAIM.search(last_line)
    if value_claim and isinstance(stmt, ast.Expr):
        code = compile(ast.Expression(stmt.value), "<README.md>", "eval")
        check_value(eval(code, namespace), value_claim["expected"])
        return 1
    code = compile(ast.Module([stmt], type_ignores=[]), "<README.md>", "exec")
    if raises_claim:
        try:
            exec(code, namespace)
        except Exception as e:  # its type and message are checked below
            error = e
        else:
            raise AssertionError(f"did not raise: {last_line}")
        names = [cls.__name__ for cls in type(error).__mro__]
        assert raises_claim["name"] in names, (names, last_line)
        message = _wildcard(raises_claim["message"])
        assert message.match(str(error)), (str(error), last_line)
        return 1
    assert not value_claim, (
        f"a `# ->` claim on a statement, not an expression: {last_line}"
    )
    exec(code, namespace)
    return 0


def run_blocks(blocks: list[str]) -> dict:
    """Runs the blocks as one script; returns its namespace."""
    namespace: dict = {"__name__": "readme"}
    for block in blocks:
        lines = block.splitlines()
        claims = sum(
            bool(VALUE_CLAIM.search(ln) or RAISES_CLAIM.search(ln)) for ln in lines
        )
        checked = sum(
            run_statement(stmt, lines, namespace) for stmt in ast.parse(block).body
        )
        assert checked == claims, f"claims not at the end of a statement in:\n{block}"
    return namespace


@pytest.fixture(scope="module")
def readme_namespace():
    pytest.importorskip("equinox")
    pytest.importorskip("flax")
    pytest.importorskip("optax")
    return run_blocks(python_blocks(README.read_text()))


def test_readme_runs_as_one_script_showing_what_it_claims(readme_namespace):
    assert "jxent" in readme_namespace


def test_the_use_example_is_torchs():
    """The first block's numbers are torch's, as its prose says."""
    torch = pytest.importorskip("torch")
    ns = run_blocks(python_blocks(README.read_text())[:1])
    x = torch.tensor(np.asarray(ns["logits"]), dtype=torch.float64)
    t = torch.tensor(np.asarray(ns["target"]), dtype=torch.int64)
    w = torch.tensor(np.asarray(ns["weight"]), dtype=torch.float64)
    plain = torch.nn.functional.cross_entropy(x, t)
    np.testing.assert_allclose(float(plain), 2.3185, atol=5e-5)
    x.requires_grad_(True)
    smoothed = torch.nn.functional.cross_entropy(x, t, w, label_smoothing=0.1)
    smoothed.backward()
    np.testing.assert_allclose(float(ns["loss"]), smoothed.item(), rtol=1e-6)
    np.testing.assert_allclose(ns["grads"], x.grad.numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize(
    ("actual", "claim", "ok"),
    [
        (np.float32(2.318465), "2.3185", True),
        (np.float32(2.3186), "2.3185", False),
        (np.float32(np.nan), "nan", True),
        (np.float32(1.0), "nan", False),
        (np.array([1.0, 2.0, 0.5]), "[1.0, 2.0, 0.5]", True),
        (np.array([1.0, 2.0, 0.5]), "[1.0, 2.0]", False),
        (np.array([2.3185]), "2.3185", False),
        ((2, 3), "(2, 3)", True),
        ((2, 3), "(3, 2)", False),
        (np.bool_(True), "True", True),
        (np.bool_(False), "True", False),
        (None, "None", True),
        (np.dtype("float32"), "float32", True),
        (np.dtype("float32"), "bfloat16", False),
        ("`target` must be in [0, 3); got 7", "'`target` must be ...; got 7'", True),
        ("`target` must be in [0, 3); got 8", "'`target` must be ...; got 7'", False),
    ],
)
def test_claims_are_checked(actual, claim, ok):
    if ok:
        check_value(actual, claim)
    else:
        with pytest.raises(AssertionError):
            check_value(actual, claim)


def test_unchecked_or_false_claims_fail():
    with pytest.raises(AssertionError):
        run_blocks(["x = 1 + 1  # -> 2\n"])  # an assignment has no value
    with pytest.raises(AssertionError):
        run_blocks(["y = (\n    1  # -> 1\n)\n"])  # not at the statement's end
    with pytest.raises(AssertionError):
        run_blocks(["1 + 1  # -> 3\n"])
    with pytest.raises(AssertionError):
        run_blocks(["int('1')  # raises ValueError: invalid\n"])
    assert run_blocks(["z = 2\nz * 2  # -> 4\nint('a')  # raises ValueError: inv...\n"])


def test_readme_default_chunk_sizes_are_the_codes():
    """The Large vocabularies section's default `chunk_size` examples (and
    benchmarks/README.md's) are what linear_cross_entropy picks."""
    from jxent._linear import _default_chunk_size

    claim = re.compile(
        r"(\d+) (?:tokens )?at (?:\(N, D, V\) = )?\((\d+), (\d+), (\d+)\)"
    )
    for path in (README, README.parent / "benchmarks" / "README.md"):
        text = " ".join(path.read_text().split())
        start = text.index("chunk_size")
        found = claim.findall(text[start:])
        assert len(found) >= 3, path
        for chunk, n, d, v in found[:3]:
            assert _default_chunk_size(int(n), int(d), int(v)) == int(chunk), path
    text = " ".join(README.read_text().split())
    assert "half of each with label smoothing or `where`" in text
    for n, d, v in [(2048, 512, 65536), (2048, 1024, 131072), (1024, 2304, 256000)]:
        plain = _default_chunk_size(n, d, v)
        assert _default_chunk_size(n, d, v, smoothing=True) == plain // 2
        assert _default_chunk_size(n, d, v, where=True) == plain // 2
