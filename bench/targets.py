"""Benchmark targets: adapters that run one inference and return its :class:`QueryTiming`.

On the CPU every call is synchronous and there are no host<->device transfers, so enqueue time and
compute time are the same wall-clock interval and H2D/D2H are zero-length (trtexec's
``--noDataTransfers``, its 11.x default). GPU targets (CUDA events) come with the Engine backends.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from javisrt.bench.measure import now_ms
from javisrt.bench.report import QueryTiming


@dataclass
class HostCallableTarget:
    """Times ``fn()`` with the host clock; for synchronous (CPU) backends only."""

    name: str
    fn: Callable[[], Any]

    def query(self) -> QueryTiming:
        start = now_ms()
        self.fn()
        end = now_ms()
        return QueryTiming(start, end, start, start, start, end, end, end)
