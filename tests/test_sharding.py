"""Multi-device tests: run tests/multidevice/cases.py on 8 simulated devices."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import compilation_cache_env

CASES = Path(__file__).parent / "multidevice" / "cases.py"


def _run_cases(
    *pytest_args: str, full: bool = False, pythonpath: str | None = None
) -> None:
    """Runs the cases in a fresh process that sees 8 CPU devices (with
    ``full``, the exhaustive sweeps' extra cases too: ``pytest --full``)."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        **compilation_cache_env(),
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p
        )
    root = CASES.parents[2]
    command = [sys.executable, "-m", "pytest", str(CASES), "-q", "-p",
               "no:cacheprovider", "-c", str(root / "pyproject.toml"),
               *pytest_args, *(["--full"] if full else [])]  # fmt: skip
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


@pytest.mark.heavy
def test_sharded_equals_unsharded_on_eight_devices(full):
    _run_cases(full=full)


@pytest.mark.heavy
def test_one_pass_reduction_across_class_shards():
    """The accelerators' one-pass path, combined across class shards."""
    _run_cases(
        "-p", "one_pass_plugin",
        "-k", "(class_and_batch_axes and 2x4-all) or "
              "(linear_cross_entropy_shard_map and 2x4)",
        pythonpath=str(CASES.parent),
    )  # fmt: skip
