"""Shared test configuration: strict rank promotion, jit/eager modes, oracles."""

from __future__ import annotations

import contextlib

import jax
import pytest
from oracles import ORACLE_DEVIATIONS

jax.config.update("jax_numpy_rank_promotion", "raise")


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
