"""Shared test configuration: strict rank promotion, jit/eager modes, oracles,
and the exhaustive sweeps that ``pytest --full`` adds to the CI suite."""

from __future__ import annotations

import contextlib

import jax
import pytest
from oracles import ORACLE_DEVIATIONS

jax.config.update("jax_numpy_rank_promotion", "raise")


FULL_REASON = "an exhaustive sweep's extra case: run with pytest --full"


def pytest_addoption(parser):
    parser.addoption(
        "--full",
        action="store_true",
        help="also run the exhaustive sweeps' extra cases (tests marked `full`: "
        "every grid point and sample where CI runs a covering subset)",
    )


def pytest_configure(config):
    config.addinivalue_line(
        "markers",
        "full: an exhaustive sweep's extra case, beyond the covering subset that "
        "CI runs; skipped unless pytest --full",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--full"):
        return
    skip = pytest.mark.skip(reason=FULL_REASON)
    for item in items:
        if "full" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def full(request) -> bool:
    """Whether this run includes the exhaustive sweeps (``pytest --full``)."""
    return bool(request.config.getoption("--full"))


def full_only(*values):
    """``pytest.param(*values)`` marked ``full`` (run by ``pytest --full``)."""
    return pytest.param(*values, marks=pytest.mark.full)


@pytest.fixture(params=["jit", "eager"])
def jit_mode(request):
    """Runs the test body once under jax.jit and once with jit disabled."""
    return request.param


def maybe_jit(fn, mode: str):
    """``jax.jit(fn)`` in "jit" mode; in "eager" mode ``fn`` under disable_jit."""
    if mode == "jit":
        return jax.jit(fn)

    def eager(*args, **kwargs):
        with jax.disable_jit():
            return fn(*args, **kwargs)

    return eager


@contextlib.contextmanager
def x64():
    with jax.enable_x64(True):
        yield


def pytest_terminal_summary(terminalreporter):
    for kind, values in sorted(ORACLE_DEVIATIONS.items()):
        terminalreporter.write_line(
            f"torch oracle [{kind}]: {len(values)} comparisons, largest normwise "
            f"relative deviation {max(values):.3g}"
        )
