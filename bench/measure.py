"""trtexec's measurement loop for any :class:`Target` (shared/tensorrt-notes.md §7, sampleInference.cpp).

* Warm-up: queries run until ``warm_up_ms`` of wall time has passed (they are not reported).
* Timed run: queries run until at least ``iterations`` queries are done **and** they span at least
  ``duration_s`` seconds (first H2D start to last D2H end, on the target's clock).
* Trace: averages over groups of ``avg_runs`` consecutive queries ("Average on N runs - GPU latency ...").
* Compare: two targets run interleaved, query by query (A, B, A, B, ...), so that drift of the machine
  (thermal, other load) hits both equally; the report gives the paired ratio B/A.
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

from javisrt.bench.report import QueryTiming
from javisrt.engine.errors import ConfigError


class Target(Protocol):
    """Something that runs one inference per :meth:`query` and reports its timing (ms, one clock)."""

    name: str

    def query(self) -> QueryTiming: ...


@dataclass(frozen=True)
class InferenceOptions:
    """trtexec's inference options (names as its flags)."""

    warm_up_ms: float = 200.0  # --warmUp
    iterations: int = 10  # --iterations (minimum)
    duration_s: float = 3.0  # --duration (minimum)
    avg_runs: int = 10  # --avgRuns

    def __post_init__(self) -> None:
        if self.warm_up_ms < 0 or self.duration_s < 0:
            raise ConfigError("--warmUp and --duration must be >= 0")
        if self.iterations < 1 or self.avg_runs < 1:
            raise ConfigError("--iterations and --avgRuns must be >= 1")


@dataclass(frozen=True)
class Measurement:
    target: str
    warm_up_queries: int
    warm_up_ms: float
    queries: tuple[QueryTiming, ...]


def now_ms() -> float:
    return time.perf_counter() * 1e3


def _warm_up(targets: Sequence[Target], warm_up_ms: float) -> int:
    count = 0
    start = now_ms()
    # at least one warm-up round when a warm-up is asked for, whatever the clock did before it
    while warm_up_ms > 0 and (count == 0 or now_ms() - start < warm_up_ms):
        for t in targets:
            t.query()
        count += 1
    return count


def _span_ms(queries: Sequence[QueryTiming]) -> float:
    """Wall time the queries cover on their own clock: first H2D start to last D2H end."""
    return queries[-1].end_d2h_ms - queries[0].start_h2d_ms if queries else 0.0


def _more(queries: Sequence[QueryTiming], opts: InferenceOptions) -> bool:
    # The duration is measured on the queries' own timestamps, so the reported trace covers at least
    # --duration whatever happens between queries (a clock read before the first query would count a
    # scheduling stall as measured time).
    return len(queries) < opts.iterations or _span_ms(queries) < opts.duration_s * 1e3


def measure(target: Target, opts: InferenceOptions, progress: Callable[[int], None] | None = None) -> Measurement:
    """Warm up, then time at least ``iterations`` queries covering at least ``duration_s`` seconds."""
    warm = _warm_up([target], opts.warm_up_ms)
    queries: list[QueryTiming] = []
    while _more(queries, opts):
        queries.append(target.query())
        if progress is not None:
            progress(len(queries))
    return Measurement(target.name, warm, opts.warm_up_ms, tuple(queries))


def measure_interleaved(
    a: Target, b: Target, opts: InferenceOptions, progress: Callable[[int], None] | None = None
) -> tuple[Measurement, Measurement]:
    """Run ``a`` and ``b`` alternately (one warm-up for both), the same number of queries each."""
    warm = _warm_up([a, b], opts.warm_up_ms)
    qa: list[QueryTiming] = []
    qb: list[QueryTiming] = []
    while _more(qa, opts):
        qa.append(a.query())
        qb.append(b.query())
        if progress is not None:
            progress(len(qa))
    return (Measurement(a.name, warm, opts.warm_up_ms, tuple(qa)), Measurement(b.name, warm, opts.warm_up_ms, tuple(qb)))


@dataclass(frozen=True)
class PairedRatio:
    """B/A from interleaved pairs: the median of per-pair ratios, and the ratio of the medians."""

    metric: str
    median_of_ratios: float
    ratio_of_medians: float
    pairs: int


def paired_ratio(a: Measurement, b: Measurement, metric: str = "latency_ms") -> PairedRatio:
    if len(a.queries) != len(b.queries) or not a.queries:
        raise ValueError("paired ratio needs the same, non-zero number of queries from both targets")
    va = [getattr(q, metric) for q in a.queries]
    vb = [getattr(q, metric) for q in b.queries]
    if min(va) <= 0:
        raise ValueError(f"{a.target}: non-positive {metric}")
    ratios = [y / x for x, y in zip(va, vb, strict=True)]
    return PairedRatio(metric, statistics.median(ratios), statistics.median(vb) / statistics.median(va), len(ratios))


def trace_lines(m: Measurement, avg_runs: int) -> list[str]:
    """trtexec's header and "=== Trace details ===" block (first/last 200 groups)."""
    qs = m.queries
    walltime_s = (max(q.end_d2h_ms for q in qs) - min(q.start_h2d_ms for q in qs)) / 1e3
    lines = [
        f"Warmup completed {m.warm_up_queries} queries over {m.warm_up_ms:g} ms",
        f"Timing trace has {len(qs)} queries over {walltime_s:g} s",
        "",
        "=== Trace details ===",
        f"Trace averages of {avg_runs} runs:",
    ]
    groups = [qs[i:i + avg_runs] for i in range(0, len(qs) - avg_runs + 1, avg_runs)]
    rows = [
        f"Average on {avg_runs} runs - GPU latency: {sum(q.compute_ms for q in g) / len(g):g} ms - Host latency: "
        f"{sum(q.latency_ms for q in g) / len(g):g} ms (enqueue {sum(q.enqueue_ms for q in g) / len(g):g} ms)"
        for g in groups
    ]
    if len(rows) > 400:
        rows = rows[:200] + [f"... Omitting {len(rows) - 400} lines"] + rows[-200:]
    return lines + rows
