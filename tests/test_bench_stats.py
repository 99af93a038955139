"""bench/stats.py and bench/report.py: trtexec's statistics vs numpy, and the report's layout."""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from javisrt.bench.report import QueryTiming, export_times, format_summary, summarize_queries
from javisrt.bench.stats import coefficient_of_variation, percentile_index, summarize


@pytest.mark.parametrize("n", [1, 2, 7, 10, 100, 1001])
def test_summary_vs_numpy(n: int) -> None:
    values = np.random.default_rng(n).gamma(2.0, 3.0, size=n)
    s = summarize(values.tolist(), (50, 90, 95, 99))
    assert s.minimum == values.min() and s.maximum == values.max()
    assert s.mean == pytest.approx(values.mean(), rel=1e-12)
    assert s.median == pytest.approx(np.median(values), rel=1e-12)
    assert s.cov_percent == pytest.approx(values.std() / values.mean() * 100, rel=1e-9)  # population std
    ordered = np.sort(values)
    for p in (90, 95, 99):
        assert s.percentile(p) == ordered[percentile_index(p, n)], (n, p)


TRTEXEC_PERCENTILE_C = r"""
#include <stdio.h>
int main(void) {
    float ps[] = {50.F, 90.F, 95.F, 99.F, 99.9F, 0.F, 100.F};
    for (int all = 1; all <= 300; ++all)
        for (int i = 0; i < 7; ++i) {
            int exclude = (int)((1 - ps[i] / 100.F) * all);   /* trtexec sampleReporting.cpp */
            int idx = all - 1 - exclude;
            printf("%d %g %d\n", all, ps[i], idx > 0 ? idx : 0);
        }
    return 0;
}
"""


def test_percentile_index_equals_trtexec_c_expression(tmp_path: Path) -> None:
    """Independent reference: trtexec's own float expression compiled with the C compiler."""
    cc = shutil.which("cc") or shutil.which("gcc")
    if cc is None:
        pytest.skip("no C compiler to evaluate trtexec's float expression")
    src = tmp_path / "p.c"
    src.write_text(TRTEXEC_PERCENTILE_C)
    subprocess.run([cc, "-O0", "-o", str(tmp_path / "p"), str(src)], check=True)
    out = subprocess.run([str(tmp_path / "p")], check=True, capture_output=True, text=True).stdout
    rows = [line.split() for line in out.splitlines()]
    assert len(rows) == 300 * 7
    mismatches = [(n, p, idx) for n, p, idx in rows if percentile_index(float(p), int(n)) != int(idx)]
    assert not mismatches, mismatches[:10]


def test_percentile_index_formula() -> None:
    # n = 10: p90 -> 10 - 1 - int(0.1f * 10) = 8; p99 -> 9 - int(0.1) = 9; p0 -> max(9 - 10, 0) = 0
    assert [percentile_index(p, 10) for p in (90, 99, 50, 0, 100)] == [8, 9, 4, 0, 9]
    assert percentile_index(99, 100) == 99  # float32: (1 - 0.99f) * 100 = 0.99999905 -> 0
    with pytest.raises(ValueError):
        percentile_index(101, 10)
    assert coefficient_of_variation([2.0, 2.0]) == 0.0


def _queries(compute: list[float], h2d: float = 0.1, enq: float = 0.05) -> list[QueryTiming]:
    out, t = [], 0.0
    for c in compute:
        out.append(QueryTiming(t, t + enq, t, t + h2d, t + h2d, t + h2d + c, t + h2d + c, t + h2d + c + 0.2))
        t += h2d + c + 0.2
    return out


def test_report_layout_and_numbers(tmp_path: Path) -> None:
    qs = _queries([10.0, 12.0, 11.0, 13.0])
    s = summarize_queries(qs)
    text = format_summary(s)
    lines = text.splitlines()
    assert lines[0] == "=== Performance summary ==="
    assert lines[1] == f"Throughput: {4 / (sum(q.latency_ms for q in qs) / 1e3):g} qps"
    assert lines[2] == ("Latency: min = 10.3 ms, max = 13.3 ms, mean = 11.8 ms, median = 11.8 ms, "
                        "percentile(90%) = 13.3 ms, percentile(95%) = 13.3 ms, percentile(99%) = 13.3 ms")
    assert [ln.split(":")[0] for ln in lines[3:9]] == [
        "Enqueue Time", "H2D Latency", "GPU Compute Time", "D2H Latency", "Total Host Walltime", "Total GPU Compute Time"]
    assert lines[8] == "Total GPU Compute Time: 0.046 s"
    # CoV of compute = std([10,12,11,13]) / 11.5 = 9.7% > 2.5% -> instability warning
    assert any(ln.startswith("* GPU compute time is unstable") for ln in lines)
    assert lines[-1].startswith("Explanations of the performance metrics")
    export_times(qs, tmp_path / "t.json")
    rows = json.loads((tmp_path / "t.json").read_text())
    assert len(rows) == 4 and rows[0]["computeMs"] == 10.0 and rows[0]["latencyMs"] == pytest.approx(10.3)


def test_stable_run_has_no_warnings() -> None:
    text = format_summary(summarize_queries(_queries([10.0] * 20, h2d=0.01, enq=0.01)))
    assert "* " not in text


def test_result_rows_carry_provenance(tmp_path: Path) -> None:
    import csv

    from javisrt.bench.results import append_row

    row = {"backend": "torch", "precision": "fp32", "shape": [1, 16, 3, 8, 8], "latency_ms": 1.5}
    append_row(row, tmp_path / "r.csv", tmp_path / "r.jsonl")
    append_row({**row, "latency_ms": 2.5}, tmp_path / "r.csv", tmp_path / "r.jsonl")
    lines = (tmp_path / "r.jsonl").read_text().splitlines()
    first = json.loads(lines[0])
    assert len(lines) == 2 and first["latency_ms"] == 1.5
    assert {"timestamp_utc", "device", "git_commit", "versions"} <= first.keys()
    assert first["versions"]["torch"].startswith("2.13.0")
    with (tmp_path / "r.csv").open(newline="") as f:
        rows = list(csv.DictReader(f))
    assert [r["latency_ms"] for r in rows] == ["1.5", "2.5"] and json.loads(rows[0]["shape"]) == [1, 16, 3, 8, 8]
    with pytest.raises(ValueError, match="columns"):
        append_row({"other": 1}, tmp_path / "r.csv")
