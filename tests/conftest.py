"""Shared test configuration: strict rank promotion, jit/eager modes, oracles,
and the exhaustive sweeps that ``pytest --full`` adds to the CI suite."""

from __future__ import annotations

import contextlib
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

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
    _share_compiled_programs(config)


# Programs that take at least this long to compile go to the run's cache.
CACHE_MIN_COMPILE_SECONDS = 0.1


def _share_compiled_programs(config) -> None:
    """One JAX compilation cache for the whole run, pytest-xdist's workers
    and the 8-device child processes (``run_on_eight_devices``) included.

    Many tests compile the same programs (check_grads' numerical derivatives,
    the same loss under several tests): a cache hit skips XLA's compile,
    never a trace or an assertion. The directory is new for each run and
    removed after it, unless ``JAX_COMPILATION_CACHE_DIR`` names one.
    """
    if jax.config.jax_compilation_cache_dir:
        return
    worker = getattr(config, "workerinput", None)
    if worker is not None and "jxent_compilation_cache" in worker:
        directory = worker["jxent_compilation_cache"]
    else:
        directory = tempfile.mkdtemp(prefix="jxent-compilation-cache-")
        config.jxent_compilation_cache_owned = directory
    config.jxent_compilation_cache = directory
    jax.config.update("jax_compilation_cache_dir", directory)
    jax.config.update(
        "jax_persistent_cache_min_compile_time_secs", CACHE_MIN_COMPILE_SECONDS
    )


@pytest.hookimpl(optionalhook=True)
def pytest_configure_node(node):
    """pytest-xdist: the workers share the controller's compilation cache."""
    directory = getattr(node.config, "jxent_compilation_cache", None)
    if directory is not None:
        node.workerinput["jxent_compilation_cache"] = directory


def pytest_unconfigure(config):
    directory = getattr(config, "jxent_compilation_cache_owned", None)
    if directory is not None:
        shutil.rmtree(directory, ignore_errors=True)


def _compilation_cache_env() -> dict[str, str]:
    """Environment variables that give a child process the run's cache."""
    directory = jax.config.jax_compilation_cache_dir
    if not directory:
        return {}
    return {
        "JAX_COMPILATION_CACHE_DIR": directory,
        "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS": str(
            jax.config.jax_persistent_cache_min_compile_time_secs
        ),
    }


def run_on_eight_devices(
    cases: Path, *pytest_args: str, full: bool = False, pythonpath: str | None = None
) -> None:
    """Runs the test file ``cases`` in a fresh process that sees 8 CPU devices
    (with ``full``, the exhaustive sweeps' extra cases too: ``pytest --full``),
    with this run's compilation cache, and fails unless all pass."""
    env = {
        **os.environ,
        "XLA_FLAGS": "--xla_force_host_platform_device_count=8",
        "JAX_PLATFORMS": "cpu",
        **_compilation_cache_env(),
    }
    if pythonpath is not None:
        env["PYTHONPATH"] = os.pathsep.join(
            p for p in (pythonpath, os.environ.get("PYTHONPATH")) if p
        )
    root = Path(__file__).resolve().parents[1]
    command = [sys.executable, "-m", "pytest", str(cases), "-q", "-p",
               "no:cacheprovider", "-c", str(root / "pyproject.toml"),
               *pytest_args, *(["--full"] if full else [])]  # fmt: skip
    result = subprocess.run(
        command, cwd=root, env=env, capture_output=True, text=True, timeout=600,
        check=False,
    )  # fmt: skip
    print(result.stdout[-3000:])
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-3000:]
    assert " passed" in result.stdout


def pytest_collection_modifyitems(config, items):
    # The slowest tests (marked heavy: child processes, larger shapes) first,
    # in their order: pytest-xdist hands tests out in this order, and one
    # started last would leave the other workers idle until it ends.
    items.sort(key=lambda item: "heavy" not in item.keywords)
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
