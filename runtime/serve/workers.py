"""One worker thread per device, each owning a pipeline, taking jobs FIFO from one bounded queue.

    submit  --> JobQueue (bounded; full -> 429) --> worker_i: pipeline(prompt, config,
                                                                progress=steps -> job,
                                                                cancel=job.cancel.is_set)
                                                    --> <output_dir>/<id>.mp4 (atomic) --> JobStore.finish

Cancellation: a queued job leaves the queue at once; a running one has its ``cancel`` event set,
which the C++ sampling loop polls before every step, so it stops at the next step boundary and the
worker takes the next job. A cancel that lands during decode discards the result.

The pipeline is whatever the served family loads (:class:`ServedPipeline`: JavisPipeline for
javisdit++, V01Pipeline for javisdit-v0.1); the queue, progress, cancellation and metrics are the same.

Shutdown (SIGTERM): stop taking jobs, fail the queued ones (``server_shutdown``), give the running
ones ``shutdown_grace_s`` to finish, then cancel them; every job ends final.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Protocol

from javisrt.engine.errors import ConfigError, JavisError
from javisrt.runtime.pipeline import GenerationCancelled, GenerationConfig, GenerationResult, Progress
from javisrt.runtime.v01_pipeline import V01GenerationConfig
from javisrt.runtime.serve.config import ServeConfig
from javisrt.runtime.serve.errors import invalid, queue_full, unavailable
from javisrt.runtime.serve.jobs import Job, JobQueue, JobStatus, JobStore, QueueClosed, QueueFull
from javisrt.runtime.serve.metrics import ServeMetrics

log = logging.getLogger(__name__)


class ServedPipeline(Protocol):
    """What a worker needs of a pipeline; ``JavisPipeline`` and ``V01Pipeline`` both are one.

    ``check(config)`` raises ConfigError for a request the loaded checkpoint cannot run (before it is
    queued); a call reports ``progress(stage, done, total)`` (stage "denoise" once per step), polls
    ``cancel()`` before every step and raises GenerationCancelled when it returns True."""

    name: str

    def check(self, config: Any) -> object: ...

    def __call__(
        self, prompt: str, config: Any, *, progress: Progress | None = None, cancel: Callable[[], bool] | None = None
    ) -> GenerationResult: ...


PipelineFactory = Callable[[str], ServedPipeline]
"""``factory(device) -> ServedPipeline``, called once in each worker's own thread."""

POLL_S = 0.25  # how often an idle worker looks at the stop flag


class WorkerPool:
    def __init__(self, cfg: ServeConfig, factory: PipelineFactory, store: JobStore) -> None:
        self.cfg = cfg
        self.factory = factory
        self.store = store
        self.queue = JobQueue(cfg.max_queue)
        self.metrics = ServeMetrics(waiting=lambda: len(self.queue), running=lambda: len(self._running),
                                    ready=lambda: len(self._pipelines))  # fmt: skip
        self.store.on_final = self._on_final
        self._running: dict[str, Job] = {}
        self._pipelines: list[ServedPipeline] = []
        self._threads: list[threading.Thread] = []
        self._lock = threading.Lock()
        # Pipelines are built one at a time: transformers' lazy imports are not thread-safe (two
        # workers importing at once raised "cannot import name 'PreTrainedTokenizerFast'").
        self._load_lock = threading.Lock()
        self._stopping = threading.Event()
        self.accepting = True
        self.load_error: str | None = None
        self.on_fatal: Callable[[str], None] = lambda message: None

    # ---- state ----------------------------------------------------------------------------------
    @property
    def ready(self) -> bool:
        return self.load_error is None and len(self._pipelines) == len(self.cfg.devices)

    def running(self) -> list[Job]:
        with self._lock:
            return list(self._running.values())

    # ---- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        for i, device in enumerate(self.cfg.devices):
            t = threading.Thread(target=self._worker, args=(device, f"worker{i}:{device}"), name=f"javisrt-worker{i}",
                                 daemon=True)  # fmt: skip
            t.start()
            self._threads.append(t)

    def begin_shutdown(self) -> None:
        """Stop taking jobs, fail the waiting ones, cancel the running ones after the grace period."""
        if not self.accepting:
            return
        self.accepting = False
        waiting = self.queue.close()
        for job in waiting:
            self.store.finish(job, JobStatus.FAILED, _shutdown_error("before it started"))
        running = self.running()
        log.info("shutting down: %d queued job(s) failed, %d running get %.0f s to finish",
                 len(waiting), len(running), self.cfg.shutdown_grace_s)  # fmt: skip
        if running:
            timer = threading.Timer(self.cfg.shutdown_grace_s, self._cancel_running)
            timer.daemon = True
            timer.start()

    def stop(self) -> None:
        """Shut down and join the workers (bounded); any job still not final is failed."""
        self.begin_shutdown()
        self._stopping.set()
        deadline = time.monotonic() + self.cfg.shutdown_grace_s + self.cfg.cancel_wait_s
        for t in self._threads:
            t.join(max(0.0, deadline - time.monotonic()))
        for job in self.store:
            if not job.status.final:
                self.store.finish(job, JobStatus.FAILED, _shutdown_error("while it was running"))

    def _cancel_running(self) -> None:
        for job in self.running():
            job.cancel_reason = job.cancel_reason or "shutdown"
            job.cancel.set()

    # ---- requests -------------------------------------------------------------------------------
    def check(self, config: GenerationConfig | V01GenerationConfig) -> None:
        """Reject what the loaded pipeline cannot do (e.g. t2av on a t2v checkpoint) before queueing."""
        with self._lock:
            pipe = self._pipelines[0] if self._pipelines else None
        if pipe is not None:
            try:
                pipe.check(config)
            except ConfigError as exc:
                raise invalid(str(exc), "mode") from None

    def submit(self, job: Job) -> None:
        if not self.accepting:
            raise unavailable("the server is shutting down", "shutting_down")
        if self.load_error is not None:
            raise unavailable(f"the model failed to load: {self.load_error}", "model_not_loaded")
        try:
            self.queue.put(job)
        except QueueFull:
            self.metrics.rejected.labels("queue_full").inc()
            raise queue_full(self.cfg.max_queue, self.cfg.retry_after_s) from None
        except QueueClosed:
            raise unavailable("the server is shutting down", "shutting_down") from None
        self.store.add(job)

    def cancel(self, job: Job, reason: str = "client") -> None:
        """Cancel ``job``: at once if queued, at the next denoise step if running."""
        job.cancel_reason = job.cancel_reason or reason
        job.cancel.set()
        if job.cancel_requested_at_step is None:  # read after the set: the loop stops at most one step later
            job.cancel_requested_at_step = job.steps_done
        if self.queue.remove(job):
            self.store.finish(job, JobStatus.CANCELLED)

    # ---- the worker -----------------------------------------------------------------------------
    def _worker(self, device: str, name: str) -> None:
        try:
            with self._load_lock:
                t0 = time.perf_counter()
                pipe = self.factory(device)
            log.info("%s: pipeline %s loaded in %.1f s", name, pipe.name, time.perf_counter() - t0)
        except Exception as exc:  # any load failure is fatal for the server, reported once
            log.exception("%s: the pipeline failed to load", name)
            self.load_error = f"{device}: {type(exc).__name__}: {exc}"
            self.begin_shutdown()
            self.on_fatal(self.load_error)
            return
        with self._lock:
            self._pipelines.append(pipe)
        while not self._stopping.is_set():
            job = self.queue.get(POLL_S)
            if job is None:
                if not self.accepting and not len(self.queue):
                    break
                continue
            self._run(pipe, job, name)

    def _start(self, job: Job, name: str) -> bool:
        with self._lock:
            if job.status is not JobStatus.QUEUED or job.cancel.is_set():
                start = False
            else:
                job.status, job.stage, job.worker = JobStatus.IN_PROGRESS, "text", name
                job.started_at = time.time()
                job.add_timings(queue_s=job.started_at - job.created_at)
                self._running[job.id] = job
                start = True
        if start:
            self.metrics.queue_wait.observe(job.timings["queue_s"])
        elif not job.status.final:
            self._finish_cancelled(job)
        return start

    def _run(self, pipe: ServedPipeline, job: Job, name: str) -> None:
        if not self._start(job, name):
            return
        assert job.config is not None
        try:

            def progress(stage: str, done: int, total: int) -> None:
                job.stage = stage
                if stage == "denoise":
                    job.steps_done = done

            try:
                result = pipe(job.prompt, job.config, progress=progress, cancel=job.cancel.is_set)
            except GenerationCancelled:
                self._finish_cancelled(job)
                return
            except JavisError as exc:
                self.store.finish(job, JobStatus.FAILED, {"code": type(exc).__name__, "message": str(exc)})
                return
            except Exception as exc:  # the server stays up; the job says what went wrong
                log.exception("%s failed", job.id)
                self.store.finish(job, JobStatus.FAILED, {"code": "internal_error",
                                                          "message": f"{type(exc).__name__}: {exc}"})  # fmt: skip
                return
            job.add_timings(**{k: result.timings[k] for k in ("text_s", "denoise_s", "decode_s") if k in result.timings})
            for s in result.step_times_s:
                self.metrics.step.observe(s)
            if job.cancel.is_set():  # cancelled during decode: drop the result
                self._finish_cancelled(job)
                return
            job.stage = "mux"
            t0 = time.perf_counter()
            path = self.store.video_path(job)
            try:
                result.save(path)
            except Exception as exc:
                log.exception("%s: writing the MP4 failed", job.id)
                self.store.finish(job, JobStatus.FAILED, {"code": "write_failed", "message": f"{exc}"})
                return
            finally:
                del result
            job.path = path
            job.add_timings(mux_s=time.perf_counter() - t0)
            if job.cancel.is_set():
                self._finish_cancelled(job)
            else:
                self.store.finish(job, JobStatus.COMPLETED)
        finally:
            with self._lock:
                self._running.pop(job.id, None)

    def _finish_cancelled(self, job: Job) -> None:
        if job.cancel_reason == "shutdown":
            self.store.finish(job, JobStatus.FAILED, _shutdown_error("while it was running"))
        else:
            self.store.finish(job, JobStatus.CANCELLED)

    def _on_final(self, job: Job) -> None:
        self.metrics.jobs.labels(job.status.value).inc()
        self.metrics.e2e.observe(job.timings["total_s"])
        for stage in ("text", "denoise", "decode", "mux"):
            if f"{stage}_s" in job.timings and job.status is JobStatus.COMPLETED:
                self.metrics.stage.labels(stage).observe(job.timings[f"{stage}_s"])


def _shutdown_error(when: str) -> dict[str, Any]:
    return {"code": "server_shutdown", "message": f"the server shut down {when}"}

