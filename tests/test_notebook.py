"""The Colab notebook executes on the CPU, and the benchmark's quick mode runs."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOK = ROOT / "examples" / "colab_tpu.ipynb"
BENCHMARK = ROOT / "benchmarks" / "bench_cross_entropy.py"


def strict_env(**extra: str) -> dict[str, str]:
    """The environment, with conftest.py's strictness for another process."""
    return {**os.environ, "JAX_NUMPY_RANK_PROMOTION": "raise", **extra}


@pytest.mark.heavy
def test_colab_notebook_executes():
    nbclient = pytest.importorskip("nbclient")
    nbformat = pytest.importorskip("nbformat")
    pytest.importorskip("ipykernel")
    notebook = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(
        notebook,
        timeout=300,
        kernel_name="python3",
        resources={"metadata": {"path": str(NOTEBOOK.parent)}},
    )
    # On the CPU even where a GPU is present; raises CellExecutionError on a
    # failing cell.
    # The benchmark script itself is run by test_benchmark_quick: here the
    # notebook takes its small inline comparison.
    env = strict_env(
        JAX_PLATFORMS="cpu", CUDA_VISIBLE_DEVICES="", JXENT_NOTEBOOK_INLINE_BENCH="1"
    )
    client.execute(env=env)
    text = "\n".join(
        output.get("text", "") + output.get("data", {}).get("text/markdown", "")
        for cell in notebook.cells
        if cell.cell_type == "code"
        for output in cell.get("outputs", [])
    )
    assert "max |jxent - optax|" in text
    assert "| jxent" in text  # the benchmark table


def test_benchmark_quick(tmp_path):
    result = subprocess.run(
        [sys.executable, str(BENCHMARK), "--quick", "--out-dir", str(tmp_path)],
        cwd=ROOT,
        env=strict_env(),
        capture_output=True,
        text=True,
        timeout=300,
        check=False,
    )
    assert result.returncode == 0, result.stderr[-4000:]
    for name in ("results.md", "results.json", "time_vs_C.png"):
        assert (tmp_path / name).stat().st_size > 500, name
    report = json.loads((tmp_path / "results.json").read_text())
    assert report["environment"]["quick"] is True
    rows = report["rows"]
    assert {(r["pass"], r["dtype"]) for r in rows} == {
        (p, d) for p in ("fwd", "fwd+bwd") for d in ("float32", "bfloat16")
    }
    for row in rows:
        assert row["ratios"]["jxent/optax"] > 0
        assert all(len(ms) == row["repeats"] for ms in row["raw_ms"].values())
    assert "jxent/optax" in (tmp_path / "results.md").read_text()
