"""Jobs: the video object's state, a FIFO queue with a hard bound, and the store that expires them.

A :class:`Job` moves ``queued -> in_progress -> completed | failed | cancelled`` once; only
:meth:`JobStore.finish` makes the last move, under the store's lock, so a worker finishing and a
DELETE or a shutdown racing it agree on one final state.

Memory stays bounded: the MP4 lives on disk (``<output_dir>/<id>.mp4``, written atomically by
``GenerationResult.save``), and a finished job's record and file expire ``ttl`` seconds after it
finished, or earlier when more than ``max_records`` finished jobs are kept. Each record is also
written atomically to ``<id>.json``, so a restarted server still serves unexpired results and
reports jobs the previous process did not finish as failed.
"""

from __future__ import annotations

import asyncio
import enum
import json
import logging
import os
import re
import secrets
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from javisrt.runtime.pipeline import GenerationConfig
from javisrt.runtime.v01_pipeline import V01GenerationConfig
from javisrt.runtime.serve.request import VideoRequest

log = logging.getLogger(__name__)

ID_PREFIX = "video_"
ID_PATTERN = re.compile(r"^video_[0-9a-f]{32}$")


class JobStatus(str, enum.Enum):
    QUEUED = "queued"
    IN_PROGRESS = "in_progress"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"

    @property
    def final(self) -> bool:
        return self in (JobStatus.COMPLETED, JobStatus.FAILED, JobStatus.CANCELLED)


def new_id() -> str:
    return ID_PREFIX + secrets.token_hex(16)


def valid_id(value: str) -> bool:
    return ID_PATTERN.match(value) is not None


@dataclass(eq=False)
class Job:
    """One video job. ``config`` is None for a record reloaded from disk (it never runs again)."""

    id: str
    prompt: str
    model: str
    seconds: str
    size: str
    extensions: dict[str, Any]
    config: GenerationConfig | V01GenerationConfig | None
    created_at: float
    sync: bool = False  # POST /v1/videos/sync: removed once its bytes are sent
    status: JobStatus = JobStatus.QUEUED
    stage: str = "queued"  # queued, text, denoise, decode, mux, done
    steps_done: int = 0
    started_at: float | None = None
    completed_at: float | None = None
    expires_at: float | None = None
    error: dict[str, str] | None = None
    # queue_s, text_s, denoise_s, decode_s, mux_s, total_s; replaced, never mutated (see add_timings)
    timings: dict[str, float] = field(default_factory=dict)
    path: Path | None = None
    worker: str | None = None
    cancel: threading.Event = field(default_factory=threading.Event)  # polled by the sampling loop
    cancel_reason: str | None = None  # "client" (DELETE / sync disconnect) or "shutdown"
    cancel_requested_at_step: int | None = None  # denoise steps done when the cancel arrived
    finished: asyncio.Event = field(default_factory=asyncio.Event)  # set on the event loop when final

    @classmethod
    def create(cls, request: VideoRequest, sync: bool = False) -> Job:
        return cls(
            id=new_id(), prompt=request.prompt, model=request.model, seconds=request.seconds, size=request.size,
            extensions=dict(request.extensions), config=request.config, created_at=time.time(), sync=sync,
        )  # fmt: skip

    def add_timings(self, **seconds: float) -> None:
        """Add stage times by swapping in a new dict: a reader on another thread never sees one change size."""
        self.timings = {**self.timings, **seconds}

    @property
    def progress(self) -> int:
        """Percent of denoise steps done; 100 only once completed (decode and mux follow the last step)."""
        if self.status is JobStatus.COMPLETED:
            return 100
        total = int(self.extensions.get("num_inference_steps") or 1)
        return min(99, 100 * self.steps_done // total)

    def to_object(self) -> dict[str, Any]:
        """The OpenAI video object plus the extension fields."""

        def stamp(t: float | None) -> int | None:
            return None if t is None else int(t)

        return {
            "id": self.id,
            "object": "video",
            "status": self.status.value,
            "progress": self.progress,
            "created_at": int(self.created_at),
            "completed_at": stamp(self.completed_at),
            "expires_at": stamp(self.expires_at),
            "seconds": self.seconds,
            "size": self.size,
            "model": self.model,
            "prompt": self.prompt,
            "remixed_from_video_id": None,
            "error": self.error,
            **self.extensions,
            "stage": self.stage,
            "steps_done": self.steps_done,
            "cancel_requested_at_step": self.cancel_requested_at_step,
            "started_at": self.started_at,  # float seconds: the queue wait is started_at - created_at
            "timings": {k: round(v, 6) for k, v in self.timings.items()},
        }

    def record(self) -> dict[str, Any]:
        return {**self.to_object(), "created_at": self.created_at, "completed_at": self.completed_at,
                "expires_at": self.expires_at, "has_file": self.path is not None}  # fmt: skip

    @classmethod
    def from_record(cls, rec: dict[str, Any], output_dir: Path) -> Job:
        ext_names = ("num_frames", "num_inference_steps", "guidance_scale", "audio_guidance_scale", "seed", "mode",
                     "solver")  # fmt: skip
        job = cls(
            id=rec["id"], prompt=rec["prompt"], model=rec["model"], seconds=rec["seconds"], size=rec["size"],
            extensions={k: rec.get(k) for k in ext_names}, config=None, created_at=float(rec["created_at"]),
            status=JobStatus(rec["status"]), stage=rec.get("stage", "done"), steps_done=int(rec.get("steps_done", 0)),
            started_at=rec.get("started_at"), completed_at=rec.get("completed_at"), expires_at=rec.get("expires_at"),
            error=rec.get("error"), timings=dict(rec.get("timings") or {}),
        )  # fmt: skip
        if rec.get("has_file"):
            job.path = output_dir / f"{job.id}.mp4"
        return job


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.stem}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


class QueueFull(Exception):
    pass


class QueueClosed(Exception):
    pass


class JobQueue:
    """FIFO of waiting jobs with a hard bound; a cancelled job leaves it at once (its slot frees)."""

    def __init__(self, maxsize: int) -> None:
        self.maxsize = maxsize
        self._items: deque[Job] = deque()
        self._cond = threading.Condition()
        self._closed = False

    def put(self, job: Job) -> None:
        with self._cond:
            if self._closed:
                raise QueueClosed
            if len(self._items) >= self.maxsize:
                raise QueueFull
            self._items.append(job)
            self._cond.notify()

    def get(self, timeout: float) -> Job | None:
        """The oldest job, or None after ``timeout`` seconds or once closed and empty."""
        with self._cond:
            if not self._items and not self._closed:
                self._cond.wait(timeout)
            return self._items.popleft() if self._items else None

    def remove(self, job: Job) -> bool:
        with self._cond:
            try:
                self._items.remove(job)
            except ValueError:
                return False
            return True

    def close(self) -> list[Job]:
        """Refuse new jobs; return (and drop) the ones still waiting."""
        with self._cond:
            self._closed = True
            left = list(self._items)
            self._items.clear()
            self._cond.notify_all()
            return left

    def position(self, job: Job) -> int | None:
        with self._cond:
            try:
                return self._items.index(job)
            except ValueError:
                return None

    def __len__(self) -> int:
        return len(self._items)


class JobStore:
    """Every job the server knows, by id, in creation order; records and files on disk."""

    def __init__(self, output_dir: Path, ttl_s: float, max_records: int) -> None:
        self.output_dir = Path(output_dir)
        self.ttl_s = ttl_s
        self.max_records = max_records
        self._jobs: dict[str, Job] = {}
        self._lock = threading.RLock()
        self.loop: asyncio.AbstractEventLoop | None = None
        self.on_final: Callable[[Job], None] = lambda job: None

    # ---- paths ----------------------------------------------------------------------------------
    def video_path(self, job: Job) -> Path:
        return self.output_dir / f"{job.id}.mp4"

    def _record_path(self, job_id: str) -> Path:
        return self.output_dir / f"{job_id}.json"

    # ---- records --------------------------------------------------------------------------------
    def add(self, job: Job) -> None:
        with self._lock:
            self._jobs[job.id] = job
        if not job.sync:
            self.save(job)

    def get(self, job_id: str) -> Job | None:
        with self._lock:
            return self._jobs.get(job_id)

    def save(self, job: Job) -> None:
        """Write the job's record next to its file (atomic); sync jobs are never persisted."""
        if job.sync:
            return
        try:
            write_json_atomic(self._record_path(job.id), job.record())
        except OSError as exc:
            log.error("cannot write the record of %s: %s", job.id, exc)

    def finish(self, job: Job, status: JobStatus, error: dict[str, str] | None = None) -> bool:
        """Make ``job`` final (once). Returns False when it already was."""
        assert status.final
        with self._lock:
            if job.status.final:
                return False
            now = time.time()
            job.status = status
            job.stage = "done"
            job.error = error
            job.completed_at = now
            job.expires_at = now + self.ttl_s
            job.add_timings(total_s=now - job.created_at)
            still_stored = job.id in self._jobs
            if (status is not JobStatus.COMPLETED or not still_stored) and job.path is not None:
                job.path.unlink(missing_ok=True)  # a failed, cancelled or already deleted job keeps no file
                job.path = None
        if still_stored:
            self.save(job)
        self.on_final(job)
        if self.loop is not None and not self.loop.is_closed():
            self.loop.call_soon_threadsafe(job.finished.set)
        return True

    def remove(self, job: Job) -> None:
        """Forget ``job`` and delete its files (an MP4 being streamed stays readable until closed)."""
        with self._lock:
            self._jobs.pop(job.id, None)
            path, job.path = job.path, None
        for p in (path, self._record_path(job.id)):
            if p is not None:
                p.unlink(missing_ok=True)

    def snapshot(self) -> list[Job]:
        with self._lock:
            return list(self._jobs.values())

    def __iter__(self) -> Iterator[Job]:
        return iter(self.snapshot())

    def __len__(self) -> int:
        return len(self._jobs)

    def page(self, after: str | None, limit: int, order: str) -> tuple[list[Job], bool]:
        """Jobs by creation time (``order`` asc | desc) strictly after the id ``after``; has_more."""
        jobs = [j for j in self.snapshot() if not j.sync]
        jobs.sort(key=lambda j: j.created_at, reverse=order == "desc")
        if after is not None:
            ids = [j.id for j in jobs]
            if after not in ids:
                raise KeyError(after)
            jobs = jobs[ids.index(after) + 1 :]
        return jobs[:limit], len(jobs) > limit

    # ---- expiry ---------------------------------------------------------------------------------
    def expire(self, now: float | None = None) -> int:
        """Remove finished jobs past ``expires_at``, then the oldest beyond ``max_records``."""
        now = time.time() if now is None else now
        done = [j for j in self.snapshot() if j.status.final and not j.sync]
        gone = [j for j in done if j.expires_at is not None and j.expires_at <= now]
        keep = sorted((j for j in done if j not in gone), key=lambda j: j.completed_at or 0.0)
        gone += keep[: max(0, len(keep) - self.max_records)]
        for job in gone:
            self.remove(job)
        if gone:
            log.info("expired %d job(s)", len(gone))
        return len(gone)

    # ---- start-up -------------------------------------------------------------------------------
    def load(self) -> int:
        """Reload the records a previous server left; jobs it did not finish become failed.

        Files that belong to no record (an interrupted write's temporary, a lost record) are removed.
        Only names this server writes are touched: ``video_<32 hex>.{json,mp4}`` and their temporaries
        (``.video_<32 hex>.*.tmp*``).
        """
        self.output_dir.mkdir(parents=True, exist_ok=True)
        loaded = 0
        for rec_path in sorted(self.output_dir.glob(f"{ID_PREFIX}*.json")):
            if not valid_id(rec_path.stem):
                continue
            try:
                job = Job.from_record(json.loads(rec_path.read_text(encoding="utf-8")), self.output_dir)
            except (OSError, ValueError, KeyError, TypeError) as exc:
                log.warning("dropping unreadable job record %s: %s", rec_path.name, exc)
                rec_path.unlink(missing_ok=True)
                continue
            if job.path is not None and not job.path.is_file():
                job.path = None
                if job.status is JobStatus.COMPLETED:
                    job.status, job.error = JobStatus.FAILED, {"code": "file_lost", "message": "the MP4 is gone"}
            if not job.status.final:
                now = time.time()
                job.status, job.stage = JobStatus.FAILED, "done"
                job.completed_at, job.expires_at = now, now + self.ttl_s
                job.error = {"code": "server_restart", "message": "the server stopped before this job finished"}
                self.save(job)
            with self._lock:
                self._jobs[job.id] = job
            loaded += 1
        known = {j.id for j in self.snapshot() if j.path is not None}
        for p in self.output_dir.iterdir():
            stray_mp4 = p.suffix == ".mp4" and valid_id(p.stem) and p.stem not in known
            stray_tmp = p.name.startswith(f".{ID_PREFIX}") and ".tmp" in p.suffixes
            if stray_mp4 or stray_tmp:
                p.unlink(missing_ok=True)
        with self._lock:
            self._jobs = dict(sorted(self._jobs.items(), key=lambda kv: kv[1].created_at))
        self.expire()
        return loaded
