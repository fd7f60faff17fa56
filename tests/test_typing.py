"""Types: the Literal aliases match what runs, and the typed user script runs.

CI also checks tests/typing_user_script.py with ``mypy --strict`` (.ci/run).
"""

import inspect
import typing

import pytest
import typing_user_script

import jxent
from jxent._information import KL_REDUCTIONS
from jxent._types import KLReduction, Reduction
from jxent._validation import REDUCTIONS


def test_reduction_literals_are_the_accepted_values():
    assert set(typing.get_args(Reduction)) == set(REDUCTIONS) == {"none", "mean", "sum"}
    assert set(typing.get_args(KLReduction)) == set(KL_REDUCTIONS)


def test_reduction_types_are_public():
    assert jxent.Reduction is Reduction
    assert jxent.KLReduction is KLReduction
    assert {"Reduction", "KLReduction"} <= set(jxent.__all__)


def test_typed_user_script_runs(capsys):
    typing_user_script.main()
    assert "loss" in capsys.readouterr().out


@pytest.mark.parametrize("fn", [jxent.cross_entropy, jxent.linear_cross_entropy])
def test_overloads_on_return_lse_mirror_the_implementation(fn):
    """Each @overload has the implementation's parameters (names, kinds,
    defaults), except that it narrows ``return_lse``: a stub that misses a new
    argument would reject a valid call."""
    overloads = typing.get_overloads(fn)
    assert len(overloads) == 3, "return_lse: Literal[False], Literal[True], bool"
    impl = inspect.signature(fn).parameters
    returns = []
    for stub in overloads:
        params = inspect.signature(stub).parameters
        assert list(params) == list(impl)
        for name, p in params.items():
            assert p.kind == impl[name].kind, name
            if name != "return_lse":
                assert p.default == impl[name].default, name
        returns.append(inspect.signature(stub).return_annotation)
    assert returns == [
        "jax.Array",
        "tuple[jax.Array, jax.Array]",
        "jax.Array | tuple[jax.Array, jax.Array]",
    ]
