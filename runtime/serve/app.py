"""The FastAPI app: OpenAI's Videos API over a :class:`WorkerPool`, plus health, metrics and a page.

    POST   /v1/videos               JSON or multipart/form-data -> the video object, status "queued"
    GET    /v1/videos               list: after, limit (1..100), order (asc | desc)
    GET    /v1/videos/{id}          the video object (progress advances per denoise step)
    GET    /v1/videos/{id}/content  the MP4, streamed from disk
    DELETE /v1/videos/{id}          cancel (queued: at once; running: at the next step), delete files
    POST   /v1/videos/sync          generate and answer with the MP4 bytes + a Server-Timing header
    GET    /v1/models  /ready  /metrics   (behind the API key when one is set)
    GET    /health  /                     (always open: liveness and the playground page)

Bodies are capped before they are buffered (Content-Length, then counted while read): 413.
Every error is an OpenAI error body (errors.py).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import logging
import os
import time
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager
from importlib import resources
from typing import Any

from fastapi import Depends, FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, Response, StreamingResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from starlette.background import BackgroundTask
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from javisrt.runtime.serve.config import JAVISDIT_V01, ServeConfig
from javisrt.runtime.serve.errors import APIError, invalid, not_found, too_large, unauthorized, unavailable
from javisrt.runtime.serve.jobs import Job, JobStatus, JobStore, valid_id
from javisrt.runtime.serve.request import FIELDS, frame_limits, parse_video_request, seconds_choices
from javisrt.runtime.serve.workers import PipelineFactory, WorkerPool

log = logging.getLogger(__name__)

MAX_LIST = 100
CHUNK = 1 << 16
DISCONNECT_POLL_S = 0.5  # a /sync request checks this often whether its client went away
POLL_AFTER_MS = 500  # advised poll interval of an unfinished job (the SDK's create_and_poll reads it)
FORM_CONTENT_TYPES = ("multipart/form-data", "application/x-www-form-urlencoded")


class BodyLimit:
    """ASGI middleware: refuse a body over ``limit`` bytes by its Content-Length before reading it,
    and stop reading one without Content-Length as soon as it passes the limit."""

    def __init__(self, app: ASGIApp, limit: int, on_reject: Any) -> None:
        self.app = app
        self.limit = limit
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None and (not length.isdigit() or int(length) > self.limit):
            err = too_large(self.limit)
            self.on_reject(err)
            await JSONResponse(err.body(), err.status, headers={"Connection": "close"})(scope, receive, send)
            return
        received = 0

        async def limited() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > self.limit:
                    raise too_large(self.limit)
            return message

        await self.app(scope, limited, send)


def playground_page(cfg: ServeConfig) -> str:
    page = resources.files("javisrt.runtime.serve").joinpath("static/index.html").read_text(encoding="utf-8")
    settings = {
        "model": cfg.model_name,
        "sizes": list(cfg.sizes),
        "seconds": list(seconds_choices(cfg)),
        "max_steps": cfg.max_steps,
        "min_frames": frame_limits(cfg)[0],
        "max_frames": frame_limits(cfg)[1],
        "frame_step": 1 if cfg.family == JAVISDIT_V01 else 4,
        "frame_rule": f"{frame_limits(cfg)[2]} fps" if cfg.family == JAVISDIT_V01 else "4n+1",
        "auth": cfg.api_key is not None,
    }
    blob = json.dumps(settings).replace("<", "\\u003c")  # cannot close the <script> it sits in
    return page.replace("__JAVISRT_SETTINGS__", blob)


def _file_chunks(fd: int) -> Iterator[bytes]:
    """The open file's bytes; the descriptor keeps an expired (unlinked) file readable until closed."""
    with os.fdopen(fd, "rb") as f:
        while chunk := f.read(CHUNK):
            yield chunk


def _open_video(job: Job) -> tuple[int, int]:
    path = job.path
    if job.status is not JobStatus.COMPLETED or path is None:
        raise APIError(409, f"video {job.id} is {job.status.value}, it has no content", param="video_id",
                       code="video_not_ready")  # fmt: skip
    try:
        fd = os.open(path, os.O_RDONLY)
    except FileNotFoundError:
        raise not_found(f"the content of video {job.id} has expired", "video_id", "video_expired") from None
    return fd, os.fstat(fd).st_size


def _server_timing(job: Job) -> str:
    names = ("queue", "text", "denoise", "decode", "mux", "total")
    return ", ".join(f"{n};dur={job.timings[f'{n}_s'] * 1000:.1f}" for n in names if f"{n}_s" in job.timings)


def create_app(cfg: ServeConfig, factory: PipelineFactory) -> FastAPI:
    """The app; its lifespan loads the job records, starts the workers (each loads its pipeline)
    and, on shutdown, lets running jobs finish for the grace period before cancelling them."""
    store = JobStore(cfg.output_dir, cfg.ttl_s, cfg.max_records)
    pool = WorkerPool(cfg, factory, store)
    started = int(time.time())
    page = playground_page(cfg)

    def count(err: APIError) -> None:
        pool.metrics.rejected.labels(err.code or str(err.status)).inc()

    async def janitor() -> None:
        interval = min(60.0, max(0.5, cfg.ttl_s / 4))
        while True:
            await asyncio.sleep(interval)
            await asyncio.to_thread(store.expire)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        store.loop = asyncio.get_running_loop()
        loaded = await asyncio.to_thread(store.load)
        if loaded:
            log.info("reloaded %d job record(s) from %s", loaded, cfg.output_dir)
        pool.start()
        task = asyncio.create_task(janitor())
        try:
            yield
        finally:
            task.cancel()
            await asyncio.to_thread(pool.stop)

    app = FastAPI(title="javisrt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.pool = pool
    app.state.store = store
    app.add_middleware(BodyLimit, limit=cfg.max_body_bytes, on_reject=count)

    # ---- errors ---------------------------------------------------------------------------------
    @app.exception_handler(APIError)
    async def api_error(request: Request, exc: APIError) -> JSONResponse:
        count(exc)
        return JSONResponse(exc.body(), exc.status, headers=exc.headers)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        err = APIError(exc.status_code, str(exc.detail), code=code, headers=dict(exc.headers or {}))
        return await api_error(request, err)

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        first = exc.errors()[0] if exc.errors() else {}
        param = str(first.get("loc", ["", ""])[-1]) or None
        return await api_error(request, invalid(f"{param}: {first.get('msg', 'invalid value')}", param))

    @app.exception_handler(Exception)
    async def internal_error(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error on %s %s", request.method, request.url.path)
        err = APIError(500, f"internal error: {type(exc).__name__}", type="server_error", code="internal_error")
        return JSONResponse(err.body(), 500)

    # ---- auth -----------------------------------------------------------------------------------
    expected = None if cfg.api_key is None else cfg.api_key.encode()

    async def require_key(request: Request) -> None:
        if expected is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            raise unauthorized("missing API key: send 'Authorization: Bearer <key>'")
        if not hmac.compare_digest(token.strip().encode(), expected):  # constant time
            raise unauthorized("wrong API key")

    auth = [Depends(require_key)]

    def job_or_404(video_id: str) -> Job:
        if not valid_id(video_id):
            raise invalid(f"malformed video id {video_id[:80]!r}: expected 'video_' and 32 hex digits", "video_id",
                          "invalid_video_id")  # fmt: skip
        job = store.get(video_id)
        if job is None:
            raise not_found(f"no video {video_id} (never created, deleted or expired)", "video_id", "video_not_found")
        return job

    async def read_fields(request: Request) -> dict[str, Any]:
        ctype = request.headers.get("content-type", "").split(";")[0].strip().lower()
        if ctype == "application/json":
            body = await request.body()
            try:
                fields = json.loads(body)
            except (UnicodeDecodeError, json.JSONDecodeError) as exc:
                raise invalid(f"malformed JSON body: {exc}", code="invalid_json") from None
            if not isinstance(fields, dict):
                raise invalid("the JSON body must be an object", code="invalid_json")
            return fields
        if ctype in FORM_CONTENT_TYPES:
            form = await request.form(max_files=1, max_fields=len(FIELDS))
            try:
                fields = {}
                for key, value in form.multi_items():
                    if key in fields:
                        raise invalid(f"field {key!r} is given twice", key)
                    fields[key] = value if isinstance(value, str) else {"filename": value.filename}
                return fields
            finally:
                await form.close()
        raise APIError(415, "send the request as application/json or multipart/form-data",
                       code="unsupported_content_type")  # fmt: skip

    async def admit(request: Request, sync: bool) -> tuple[Job, dict[str, Any]]:
        """Validate, queue; the job and its object as created (status "queued", whatever a worker does next)."""
        req = parse_video_request(await read_fields(request), cfg)
        pool.check(req.config)
        job = Job.create(req, sync=sync)
        created = job.to_object()
        pool.submit(job)
        log.info("%s queued: %s %s, %d frames, %d steps%s", job.id, req.size, job.extensions["mode"],
                 req.config.num_frames, req.config.steps, " (sync)" if sync else "")  # fmt: skip
        return job, created

    # ---- routes ---------------------------------------------------------------------------------
    @app.get("/", include_in_schema=False)
    async def playground() -> HTMLResponse:
        return HTMLResponse(page)

    @app.get("/health")
    async def health() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/ready", dependencies=auth)
    async def ready() -> dict[str, Any]:
        if pool.load_error is not None:
            raise unavailable(f"the model failed to load: {pool.load_error}", "model_not_loaded")
        if not pool.ready:
            raise unavailable("the model is loading", "not_ready")
        return {"status": "ready", "model": cfg.model_name, "workers": len(cfg.devices)}

    @app.get("/metrics", dependencies=auth)
    async def metrics() -> Response:
        return Response(generate_latest(pool.metrics.registry), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models", dependencies=auth)
    async def models() -> dict[str, Any]:
        lo, hi, fps = frame_limits(cfg)
        return {"object": "list", "data": [{
            "id": cfg.model_name, "object": "model", "created": started, "owned_by": "javisrt", "family": cfg.family,
            "sizes": list(cfg.sizes), "seconds": [str(s) for s in seconds_choices(cfg)],
            "num_frames": {"min": lo, "max": hi, "fps": fps}, "max_steps": cfg.max_steps,
        }]}  # fmt: skip

    @app.post("/v1/videos", dependencies=auth)
    async def create_video(request: Request) -> dict[str, Any]:
        return (await admit(request, sync=False))[1]

    @app.get("/v1/videos", dependencies=auth)
    async def list_videos(after: str | None = None, limit: int = 20, order: str = "desc") -> dict[str, Any]:
        if not 1 <= limit <= MAX_LIST:
            raise invalid(f"limit must be in 1..{MAX_LIST}, got {limit}", "limit")
        if order not in ("asc", "desc"):
            raise invalid(f"order must be 'asc' or 'desc', got {order!r}", "order")
        if after is not None and not valid_id(after):
            raise invalid(f"malformed cursor {after[:80]!r}", "after", "invalid_video_id")
        try:
            jobs, more = store.page(after, limit, order)
        except KeyError:
            raise invalid(f"unknown cursor {after!r} (deleted or expired)", "after", "video_not_found") from None
        data = [j.to_object() for j in jobs]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": more}  # fmt: skip

    @app.get("/v1/videos/{video_id}", dependencies=auth)
    async def retrieve_video(video_id: str) -> JSONResponse:
        job = job_or_404(video_id)
        headers = {} if job.status.final else {"openai-poll-after-ms": str(POLL_AFTER_MS)}
        return JSONResponse(job.to_object(), headers=headers)

    @app.get("/v1/videos/{video_id}/content", dependencies=auth)
    async def video_content(video_id: str, variant: str = "video") -> StreamingResponse:
        job = job_or_404(video_id)
        if variant != "video":
            raise invalid(f"variant {variant!r} is not available; only 'video'", "variant", "unsupported_parameter")
        fd, size = _open_video(job)
        return StreamingResponse(_file_chunks(fd), media_type="video/mp4", headers={
            "Content-Length": str(size), "Content-Disposition": f'attachment; filename="{job.id}.mp4"'})  # fmt: skip

    @app.delete("/v1/videos/{video_id}", dependencies=auth)
    async def delete_video(video_id: str) -> dict[str, Any]:
        job = job_or_404(video_id)
        if not job.status.final:
            pool.cancel(job, "client")
            try:
                await asyncio.wait_for(job.finished.wait(), cfg.cancel_wait_s)
            except TimeoutError:  # the worker deletes the file itself when it gets there
                log.warning("%s: the worker did not stop within %.0f s", job.id, cfg.cancel_wait_s)
        obj = job.to_object()
        store.remove(job)
        return {"id": job.id, "object": "video.deleted", "deleted": True, "video": obj}

    @app.post("/v1/videos/sync", dependencies=auth)
    async def create_video_sync(request: Request) -> StreamingResponse:
        job, _ = await admit(request, sync=True)
        try:
            while not job.finished.is_set():
                try:
                    await asyncio.wait_for(job.finished.wait(), DISCONNECT_POLL_S)
                except TimeoutError:
                    if await request.is_disconnected():
                        log.info("%s: the client went away; cancelling", job.id)
                        pool.cancel(job, "client")
                        await asyncio.wait_for(job.finished.wait(), cfg.cancel_wait_s)
            if job.status is not JobStatus.COMPLETED:
                error = job.error or {"code": job.status.value, "message": f"the job was {job.status.value}"}
                status = 503 if error["code"] == "server_shutdown" else 500
                raise APIError(status, error["message"], type="server_error", code=error["code"])
            fd, size = _open_video(job)
        except BaseException:
            store.remove(job)
            raise
        headers = {"Content-Length": str(size), "Server-Timing": _server_timing(job), "X-Video-Id": job.id}
        return StreamingResponse(_file_chunks(fd), media_type="video/mp4", headers=headers,
                                 background=BackgroundTask(store.remove, job))  # fmt: skip

    return app
