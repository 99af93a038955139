"""trtexec's "Performance summary", reproduced (shared/tensorrt-notes.md §7).

Per query: ``latency = h2d + compute + d2h``; walltime = last d2h end - first h2d start;
throughput = batch x queries / walltime. Numbers use C++ iostream's default formatting (6 significant
digits, ``%g``), as trtexec prints them.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

from javisrt.bench.stats import DEFAULT_PERCENTILES, Summary, summarize

# Explanations trtexec prints in its verbose log; we print them with --verbose.
METRIC_EXPLANATIONS = {
    "Throughput": "the observed throughput computed by dividing the number of queries by the Total Host Walltime",
    "Latency": "the summation of H2D Latency, GPU Compute Time, and D2H Latency (the latency to infer a single query)",
    "Enqueue Time": "the host latency to enqueue a query; if this is longer than GPU Compute Time, the GPU may be under-utilized",
    "H2D Latency": "the latency for host-to-device data transfers for input tensors of a single query",
    "GPU Compute Time": "the GPU latency to execute the kernels for a query",
    "D2H Latency": "the latency for device-to-host data transfers for output tensors of a single query",
    "Total Host Walltime": "the host walltime from when the first query (after warmups) is enqueued to when the last query is completed",
    "Total GPU Compute Time": "the summation of the GPU Compute Time of all the queries",
}


@dataclass(frozen=True)
class QueryTiming:
    """One inference, in milliseconds on one clock (host or device events)."""

    start_enq_ms: float
    end_enq_ms: float
    start_h2d_ms: float
    end_h2d_ms: float
    start_compute_ms: float
    end_compute_ms: float
    start_d2h_ms: float
    end_d2h_ms: float

    @property
    def h2d_ms(self) -> float:
        return self.end_h2d_ms - self.start_h2d_ms

    @property
    def compute_ms(self) -> float:
        return self.end_compute_ms - self.start_compute_ms

    @property
    def d2h_ms(self) -> float:
        return self.end_d2h_ms - self.start_d2h_ms

    @property
    def enqueue_ms(self) -> float:
        return self.end_enq_ms - self.start_enq_ms

    @property
    def latency_ms(self) -> float:
        return self.h2d_ms + self.compute_ms + self.d2h_ms

    def export_row(self) -> dict[str, float]:
        """trtexec's ``--exportTimes`` JSON row."""
        return {
            "startEnqMs": self.start_enq_ms, "endEnqMs": self.end_enq_ms,
            "startH2dMs": self.start_h2d_ms, "endH2dMs": self.end_h2d_ms,
            "startComputeMs": self.start_compute_ms, "endComputeMs": self.end_compute_ms,
            "startD2hMs": self.start_d2h_ms, "endD2hMs": self.end_d2h_ms,
            "h2dMs": self.h2d_ms, "computeMs": self.compute_ms, "d2hMs": self.d2h_ms,
            "latencyMs": self.latency_ms,
        }


@dataclass(frozen=True)
class PerformanceSummary:
    throughput_qps: float
    latency: Summary
    enqueue: Summary
    h2d: Summary
    compute: Summary
    d2h: Summary
    walltime_s: float
    total_compute_s: float

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def summarize_queries(
    queries: Sequence[QueryTiming], batch: int = 1, percentiles: Sequence[float] = DEFAULT_PERCENTILES
) -> PerformanceSummary:
    if not queries:
        raise ValueError("no timed queries")
    walltime_ms = max(q.end_d2h_ms for q in queries) - min(q.start_h2d_ms for q in queries)
    if walltime_ms <= 0:
        raise ValueError(f"non-positive walltime {walltime_ms} ms")
    return PerformanceSummary(
        throughput_qps=batch * len(queries) / (walltime_ms / 1e3),
        latency=summarize([q.latency_ms for q in queries], percentiles),
        enqueue=summarize([q.enqueue_ms for q in queries], percentiles),
        h2d=summarize([q.h2d_ms for q in queries], percentiles),
        compute=summarize([q.compute_ms for q in queries], percentiles),
        d2h=summarize([q.d2h_ms for q in queries], percentiles),
        walltime_s=walltime_ms / 1e3,
        total_compute_s=sum(q.compute_ms for q in queries) / 1e3,
    )


def _g(x: float) -> str:
    return f"{x:g}"


def summary_line(name: str, s: Summary, unit: str = "ms") -> str:
    fields = [f"min = {_g(s.minimum)} {unit}", f"max = {_g(s.maximum)} {unit}", f"mean = {_g(s.mean)} {unit}",
              f"median = {_g(s.median)} {unit}"]
    fields += [f"percentile({_g(p)}%) = {_g(v)} {unit}" for p, v in s.percentiles]
    return f"{name}: " + ", ".join(fields)


def warnings_for(summary: PerformanceSummary) -> list[str]:
    """trtexec's warnings about the measurement (printed with a '* ' prefix)."""
    out = []
    c = summary.compute
    if summary.enqueue.median > 0.8 * c.median:
        out.append("* Throughput may be bound by Enqueue Time rather than GPU Compute and the GPU may be under-utilized.")
    if summary.h2d.median >= c.median:
        out.append("* Throughput may be bound by host-to-device transfers for the inputs rather than GPU Compute "
                   "and the GPU may be under-utilized.")
    if summary.d2h.median >= c.median:
        out.append("* Throughput may be bound by device-to-host transfers for the outputs rather than GPU Compute "
                   "and the GPU may be under-utilized.")
    if c.cov_percent > 2.5:
        out.append(f"* GPU compute time is unstable, with coefficient of variance = {_g(c.cov_percent)}%.")
        out.append("  If not already in use, locking GPU clock frequency or adding --useSpinWait may improve the stability.")
    return out


def format_summary(summary: PerformanceSummary, verbose: bool = False) -> str:
    lines = [
        "=== Performance summary ===",
        f"Throughput: {_g(summary.throughput_qps)} qps",
        summary_line("Latency", summary.latency),
        summary_line("Enqueue Time", summary.enqueue),
        summary_line("H2D Latency", summary.h2d),
        summary_line("GPU Compute Time", summary.compute),
        summary_line("D2H Latency", summary.d2h),
        f"Total Host Walltime: {_g(summary.walltime_s)} s",
        f"Total GPU Compute Time: {_g(summary.total_compute_s)} s",
    ]
    lines += warnings_for(summary)
    if verbose:
        lines.append("=== Explanations of the performance metrics ===")
        lines += [f"{k}: {v}." for k, v in METRIC_EXPLANATIONS.items()]
    else:
        lines.append("Explanations of the performance metrics are printed in the verbose logs.")
    return "\n".join(lines)


def export_times(queries: Sequence[QueryTiming], path: str | Path) -> None:
    Path(path).write_text(json.dumps([q.export_row() for q in queries], indent=1))
