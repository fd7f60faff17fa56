"""The examples run end to end (shortened)."""

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.heavy
def test_imbalanced_digits_example(tmp_path):
    out = tmp_path / "recall.png"
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    result = subprocess.run(
        [
            sys.executable,
            str(ROOT / "examples" / "imbalanced_digits.py"),
            "--steps",
            "60",
            "--out",
            str(out),
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert "balanced accuracy" in result.stdout
    assert out.stat().st_size > 1000


@pytest.mark.heavy
def test_sharded_lm_step_example():
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("XLA_FLAGS", None)
    result = subprocess.run(
        [sys.executable, str(ROOT / "examples" / "sharded_lm_step.py")],
        env=env, capture_output=True, text=True, timeout=300, check=False,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr
    assert "devices: 8" in result.stdout
    # The differences it prints between the sharded and the unsharded step.
    diffs = [float(d) for d in re.findall(r"\|diff\| (\S+)", result.stdout)]
    assert len(diffs) == 3 and max(diffs) < 1e-5, result.stdout
    params = re.search(r"max parameter difference after 3 steps: (\S+)", result.stdout)
    assert params is not None and float(params.group(1)) < 1e-5, result.stdout
