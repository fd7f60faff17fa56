"""Packaging: the sdist's contents, and the notebook's install cell run in a fresh
environment (an empty folder, a new virtual environment without jxent) in each of
the four situations it handles, with a wheel built from this checkout.
"""

import json
import os
import subprocess
import sys
import sysconfig
import tarfile
import venv
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "colab_tpu.ipynb"
SOURCE_SETTING = 'JXENT_SOURCE = ""'


def hatchling_build(target: str, out_dir: Path) -> Path:
    """Builds this checkout's ``target`` ("wheel" or "sdist") into ``out_dir``."""
    pytest.importorskip("hatchling")
    result = subprocess.run(
        [sys.executable, "-m", "hatchling", "build", "-t", target, "-d", str(out_dir)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    suffix = ".whl" if target == "wheel" else ".tar.gz"
    (built,) = out_dir.glob(f"jxent-*{suffix}")
    return built


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> Path:
    """A wheel freshly built from this checkout."""
    return hatchling_build("wheel", tmp_path_factory.mktemp("dist"))


def test_sdist_holds_the_package_tests_and_license_only(tmp_path):
    sdist = hatchling_build("sdist", tmp_path)
    with tarfile.open(sdist) as archive:
        names = {name.split("/", 1)[1] for name in archive.getnames() if "/" in name}
    for required in (
        "LICENSE",
        "README.md",
        "pyproject.toml",
        "jxent/__init__.py",
        "jxent/py.typed",
        "tests/conftest.py",
        "tests/test_install.py",
    ):
        assert required in names, required
    assert not [n for n in names if n.startswith(".ci/")]
    assert not [n for n in names if n.endswith((".png", ".json")) or "results/" in n]
    assert "Apache License" in (ROOT / "LICENSE").read_text()


def install_cell_source() -> str:
    """The source of the notebook's install cell (the one that sets JXENT_SOURCE)."""
    cells = json.loads(NOTEBOOK.read_text())["cells"]
    (source,) = [
        "".join(c["source"])
        for c in cells
        if c["cell_type"] == "code" and SOURCE_SETTING in "".join(c["source"])
    ]
    assert source.count(SOURCE_SETTING) == 1
    return source


@pytest.fixture(scope="module")
def fresh_python(tmp_path_factory) -> Path:
    """A new virtual environment that sees this one's packages except jxent.

    jax, optax and the rest are linked in (no download); jxent is absent, as on
    a fresh Colab runtime, so the install cell has to install it.
    """
    root = tmp_path_factory.mktemp("fresh")
    venv.create(root / "venv", with_pip=False)
    python = root / "venv" / "bin" / "python"
    # pip itself is linked from this environment too.
    shared = root / "site-packages-without-jxent"
    shared.mkdir()
    site_dirs = [Path(sysconfig.get_paths()["purelib"])]
    site_dirs += [Path(p) for p in sys.path if Path(p).name == "site-packages"]
    for site_dir in site_dirs:
        for entry in site_dir.iterdir():
            name = entry.name.lower()
            skip = name.startswith(("jxent", "_jxent", "__editable__"))
            if not (skip or name.endswith(".pth") or (shared / entry.name).exists()):
                (shared / entry.name).symlink_to(entry)
    query = "import sysconfig; print(sysconfig.get_paths()['purelib'])"
    purelib = subprocess.run(
        [str(python), "-c", query], capture_output=True, text=True, check=True
    ).stdout.strip()
    Path(purelib, "shared.pth").write_text(f"{shared}\n")
    return python


def run_install_cell(python: Path, folder: Path, source: str = "", **env: str):
    """Runs the install cell as a script with ``python`` in ``folder``."""
    cell = install_cell_source().replace(SOURCE_SETTING, f"JXENT_SOURCE = {source!r}")
    clean = {k: v for k, v in os.environ.items() if not k.startswith("PIP_")}
    clean.pop("PYTHONPATH", None)
    # No package index and no pip configuration: the situations are offline.
    offline = {"PIP_CONFIG_FILE": os.devnull, "PIP_NO_INDEX": "1", **env}
    return subprocess.run(
        [str(python), "-c", cell],
        cwd=folder,
        env={**clean, **offline},
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )


def uninstall_jxent(python: Path) -> None:
    """Removes jxent from the fresh environment (between situations)."""
    subprocess.run(
        [str(python), "-m", "pip", "uninstall", "--yes", "--quiet", "jxent"],
        capture_output=True, check=False,
    )  # fmt: skip


def assert_installed_from(result, python: Path) -> None:
    """The cell succeeded and jxent is imported from the fresh environment."""
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    where = result.stdout.split("jxent from:")[1].split("|")[0].strip()
    assert Path(where).is_relative_to(python.parents[1]), where


def assert_stops_with_instructions(result, *phrases: str) -> None:
    """The cell stopped with the instructions, not a pip traceback."""
    assert result.returncode == 1, result.stdout[-2000:] + result.stderr[-2000:]
    assert "Traceback" not in result.stderr, result.stderr
    assert "CalledProcessError" not in result.stderr
    for phrase in ("JXENT_SOURCE", "python -m build", *phrases):
        assert phrase in result.stderr, (phrase, result.stderr)


@pytest.mark.heavy
def test_install_cell_wheel_next_to_notebook(fresh_python, wheel, tmp_path):
    """(b): an empty folder holding only a freshly built wheel (a Colab upload)."""
    (tmp_path / wheel.name).write_bytes(wheel.read_bytes())
    uninstall_jxent(fresh_python)
    assert_installed_from(run_install_cell(fresh_python, tmp_path), fresh_python)


@pytest.mark.heavy
def test_install_cell_source_variable(fresh_python, wheel, tmp_path):
    """(c): JXENT_SOURCE set to a wheel elsewhere; a bad source says what to do."""
    uninstall_jxent(fresh_python)
    result = run_install_cell(fresh_python, tmp_path, source=str(wheel))
    assert_installed_from(result, fresh_python)
    uninstall_jxent(fresh_python)
    missing = str(tmp_path / "no-such-clone")
    result = run_install_cell(fresh_python, tmp_path, source=missing)
    assert_stops_with_instructions(result, missing)


@pytest.mark.heavy
def test_install_cell_package_index(fresh_python, wheel, tmp_path):
    """(d): nothing local, jxent on the index (a local one standing in for PyPI)."""
    uninstall_jxent(fresh_python)
    result = run_install_cell(fresh_python, tmp_path, PIP_FIND_LINKS=str(wheel.parent))
    assert_installed_from(result, fresh_python)


@pytest.mark.heavy
def test_install_cell_nothing_found(fresh_python, tmp_path):
    """None of the four: a short message saying what to do, no pip traceback."""
    uninstall_jxent(fresh_python)
    result = run_install_cell(fresh_python, tmp_path)
    assert_stops_with_instructions(result, "jxent from the package index")


@pytest.mark.heavy
def test_install_cell_inside_checkout(fresh_python):
    """(a): run from examples/ in this checkout, without network access."""
    uninstall_jxent(fresh_python)
    # Without an index pip cannot fetch the build backend for the editable
    # install; the cell then imports the checkout directly (pure Python).
    result = run_install_cell(fresh_python, NOTEBOOK.parent)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-3000:]
    assert f"jxent from: {ROOT / 'jxent'}" in result.stdout
    assert f"local checkout: {ROOT}" in result.stdout
