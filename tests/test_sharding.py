"""Multi-device tests: run tests/multidevice/cases.py on 8 simulated devices."""

from pathlib import Path

import pytest
from conftest import run_on_eight_devices

CASES = Path(__file__).parent / "multidevice" / "cases.py"


@pytest.mark.heavy
def test_sharded_equals_unsharded_on_eight_devices(full):
    run_on_eight_devices(CASES, full=full)


@pytest.mark.heavy
def test_one_pass_reduction_across_class_shards():
    """The accelerators' one-pass path, combined across class shards."""
    run_on_eight_devices(
        CASES,
        "-p", "one_pass_plugin",
        "-k", "(class_and_batch_axes and 2x4-all) or "
              "(linear_cross_entropy_shard_map and 2x4)",
        pythonpath=str(CASES.parent),
    )  # fmt: skip
