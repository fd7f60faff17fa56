"""Types: the Literal aliases match what runs, and the typed user script runs.

CI also checks tests/typing_user_script.py with ``mypy --strict`` (.ci/run).
"""

import typing

import typing_user_script

from jxent._information import KL_REDUCTIONS
from jxent._types import KLReduction, Reduction
from jxent._validation import REDUCTIONS


def test_reduction_literals_are_the_accepted_values():
    assert set(typing.get_args(Reduction)) == set(REDUCTIONS) == {"none", "mean", "sum"}
    assert set(typing.get_args(KLReduction)) == set(KL_REDUCTIONS)


def test_typed_user_script_runs(capsys):
    typing_user_script.main()
    assert "loss" in capsys.readouterr().out
