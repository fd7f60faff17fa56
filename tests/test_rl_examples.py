"""The RL and distillation examples run end to end (shortened)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(script, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / script), *args],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    return result.stdout


@pytest.mark.heavy
def test_grpo_char_lm_example():
    out = _run("grpo_char_lm.py", "--steps", "25", "--group", "32")
    first, last = map(
        float, re.search(r"first step (\S+), last step (\S+)", out).groups()
    )
    assert last > first + 0.3, out


@pytest.mark.heavy
def test_distill_char_lm_example():
    out = _run(
        "distill_char_lm.py", "--steps", "40", "--memory-shape", "1024", "128", "32768"
    )
    first, last = map(
        float, re.search(r"first step (\S+), last step (\S+)", out).groups()
    )
    assert last < 0.2 * first, out
    fused, naive = map(
        float, re.search(r"fused (\S+) MiB, naive (\S+) MiB", out).groups()
    )
    assert fused < 0.5 * naive, out
