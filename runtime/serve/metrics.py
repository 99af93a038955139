"""Prometheus metrics of one server, in their own registry (``GET /metrics``).

The queue and running gauges are read at scrape time from the queue and the workers themselves
(``Gauge.set_function``), so they cannot drift from the truth: ten waiting requests read 10.
"""

from __future__ import annotations

from collections.abc import Callable

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, ProcessCollector

# 10 ms .. ~1 h, x2.5 apart: a tiny CPU request to a real 480p/5 s one
LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, 100, 250, 500, 1000, 2500, float("inf"))
FINAL_STATUSES = ("completed", "failed", "cancelled")
STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 25, 50, float("inf"))


class ServeMetrics:
    def __init__(self, waiting: Callable[[], int], running: Callable[[], int], ready: Callable[[], int]) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        ProcessCollector(registry=r)  # process_resident_memory_bytes, cpu seconds, open fds
        Gauge("javisrt_requests_waiting", "Requests in the queue, not started", registry=r).set_function(waiting)
        Gauge("javisrt_requests_running", "Requests a worker is generating", registry=r).set_function(running)
        Gauge("javisrt_workers_ready", "Workers whose pipeline is loaded", registry=r).set_function(ready)
        self.jobs = Counter("javisrt_jobs", "Jobs that reached a final state", ["status"], registry=r)
        for status in FINAL_STATUSES:  # every series exists from the start, at 0
            self.jobs.labels(status)
        self.rejected = Counter("javisrt_requests_rejected", "Requests answered with an error", ["reason"], registry=r)
        self.queue_wait = Histogram("javisrt_queue_wait_seconds", "Time from create to a worker taking the job",
                                    buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.e2e = Histogram("javisrt_request_seconds", "Time from create to the final state",
                             buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.stage = Histogram("javisrt_stage_seconds", "Time per pipeline stage (text, denoise, decode, mux)",
                               ["stage"], buckets=LATENCY_BUCKETS, registry=r)  # fmt: skip
        self.step = Histogram("javisrt_denoise_step_seconds", "Wall time of one denoising step (CFG batch)",
                              buckets=STEP_BUCKETS, registry=r)  # fmt: skip
