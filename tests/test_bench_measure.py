"""bench/measure.py: trtexec's run semantics, interleaving, paired ratios, trace layout."""

from __future__ import annotations

import pytest

from javisrt.bench.measure import InferenceOptions, measure, measure_interleaved, paired_ratio, trace_lines
from javisrt.bench.report import QueryTiming
from javisrt.bench.targets import HostCallableTarget


class FakeTarget:
    """Deterministic timings on a fake clock: query k takes ``ms[k % len(ms)]``."""

    def __init__(self, name: str, ms: list[float], log: list[str]) -> None:
        self.name, self.ms, self.log, self.t, self.k = name, ms, log, 0.0, 0

    def query(self) -> QueryTiming:
        c = self.ms[self.k % len(self.ms)]
        self.k += 1
        self.log.append(self.name)
        s = self.t
        self.t += c
        return QueryTiming(s, s + 0.01, s, s, s, s + c, s + c, s + c)


def test_iterations_is_a_minimum_and_warmup_is_not_reported() -> None:
    log: list[str] = []
    m = measure(FakeTarget("a", [2.0], log), InferenceOptions(warm_up_ms=0, iterations=7, duration_s=0))
    assert len(m.queries) == 7 and m.warm_up_queries == 0 and len(log) == 7


def test_duration_is_a_minimum() -> None:
    calls = []
    target = HostCallableTarget("sleep", lambda: calls.append(1))
    m = measure(target, InferenceOptions(warm_up_ms=20, iterations=1, duration_s=0.05))
    span = m.queries[-1].end_compute_ms - m.queries[0].start_compute_ms
    assert span >= 49.0 and m.warm_up_queries >= 1 and len(calls) == m.warm_up_queries + len(m.queries)
    assert all(q.h2d_ms == 0 and q.d2h_ms == 0 and q.compute_ms == q.enqueue_ms for q in m.queries)


def test_interleaved_order_and_paired_ratio() -> None:
    log: list[str] = []
    a = FakeTarget("a", [10.0, 12.0], log)
    b = FakeTarget("b", [5.0, 6.0], log)
    ma, mb = measure_interleaved(a, b, InferenceOptions(warm_up_ms=0, iterations=6, duration_s=0))
    assert log == ["a", "b"] * 6
    r = paired_ratio(ma, mb, "compute_ms")
    assert r.median_of_ratios == pytest.approx(0.5) and r.ratio_of_medians == pytest.approx(0.5) and r.pairs == 6


def test_trace_lines_layout() -> None:
    m = measure(FakeTarget("a", [1.0, 3.0], []), InferenceOptions(warm_up_ms=0, iterations=20, duration_s=0))
    lines = trace_lines(m, avg_runs=10)
    assert lines[0] == "Warmup completed 0 queries over 0 ms"
    assert lines[1] == "Timing trace has 20 queries over 0.04 s"
    assert lines[3:5] == ["=== Trace details ===", "Trace averages of 10 runs:"]
    assert lines[5] == "Average on 10 runs - GPU latency: 2 ms - Host latency: 2 ms (enqueue 0.01 ms)"
    assert len(lines) == 7


@pytest.mark.parametrize("bad", [{"iterations": 0}, {"avg_runs": 0}, {"warm_up_ms": -1}, {"duration_s": -0.5}])
def test_bad_options(bad: dict) -> None:
    with pytest.raises(ValueError):
        InferenceOptions(**bad)
