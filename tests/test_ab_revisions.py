"""benchmarks/ab_revisions.py imports another revision and times both."""

from __future__ import annotations

import re

import jax.numpy as jnp
from benchmark_modules import load_benchmark

import jxent


def test_heads_cases_report_both_programs(tmp_path, capsys):
    ab = load_benchmark("ab_revisions")
    base = ab.import_revision("HEAD", tmp_path)
    assert base.__name__ == "jxent_base" and base.linear_log_probs is not None
    dtypes = [jnp.dtype("float32"), jnp.dtype("bfloat16")]
    ab.heads_cases(jxent, base, (8, 4, 16), 1, dtypes)
    lines = capsys.readouterr().out.splitlines()
    labels = [
        f"{dtype} linear_log_probs {head}"
        for dtype in ("float32", "bfloat16")
        for head in ("alone", "with the entropy")
    ]
    assert [line.split(" new/base")[0].split() for line in lines] == [
        label.split() for label in labels
    ]
    for line in lines:
        assert float(re.search(r"new/base ([0-9.]+)", line).group(1)) > 0
    ab.report("case", {"new": 2.0, "base": 8.0})
    assert "new/base 0.250  (new 2.0 ms, base 8.0 ms)" in capsys.readouterr().out


def test_linear_cases_report_both_programs(tmp_path, capsys):
    ab = load_benchmark("ab_revisions")
    base = ab.import_revision("HEAD", tmp_path)
    ab.linear_cases(jxent, base, (8, 4, 16), 1, [jnp.dtype("bfloat16")])
    (line,) = capsys.readouterr().out.splitlines()
    assert line.split(" new/base")[0].split() == ["bfloat16", "linear_cross_entropy"]
    assert float(re.search(r"new/base ([0-9.]+)", line).group(1)) > 0
