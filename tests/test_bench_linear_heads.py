"""benchmarks/bench_linear_heads.py runs and writes its table, JSON and plot."""

from __future__ import annotations

import json

from benchmark_modules import load_benchmark


def test_quick_run_writes_results(tmp_path):
    bench = load_benchmark("bench_linear_heads")
    rows = bench.main(["--quick", "--dtype", "float32", "--out-dir", str(tmp_path)])
    assert [r["head"] for r in rows] == list(bench.HEADS)
    for r in rows:
        assert r["fused_ms"] > 0 and r["naive_ms"] > 0
        assert abs(r["time_ratio"] - r["fused_ms"] / r["naive_ms"]) < 1e-9
    assert "entropy_over_alone" in rows[1]
    assert rows[1]["entropy_over_alone_paired"] > 0
    # The paired ratio is the median of per-round ratios.
    assert bench._paired([2.0, 3.0, 8.0], [1.0, 2.0, 2.0]) == 2.0
    saved = json.loads((tmp_path / "heads_results.json").read_text())
    assert saved["rows"] == rows
    table = (tmp_path / "heads_results.md").read_text()
    assert "| (64, 32, 512) | float32 | linear_log_probs |" in table
    assert (tmp_path / "heads_time.png").stat().st_size > 0
