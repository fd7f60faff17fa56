"""Multi-device tests: run tests/multidevice/cases.py on 8 simulated devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

CASES = Path(__file__).parent / "multidevice" / "cases.py"


@pytest.mark.heavy
def test_sharded_equals_unsharded_on_eight_devices():
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
    }
    root = CASES.parents[2]
    command = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p",
               "no:cacheprovider", "-c", str(root / "pyproject.toml")]  # fmt: skip
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout
