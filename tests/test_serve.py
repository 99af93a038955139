"""runtime/serve: ``javisrt serve --tiny`` as a real uvicorn process on a free loopback port, driven
by the official ``openai`` SDK (unmodified), by httpx for what the SDK does not send (bad inputs,
raw headers), and by Debian's headless Chromium for the playground page.

Every wait is bounded in count and time; the module's server is stopped (SIGTERM) in teardown.
Requests use 32x32 / 17 frames / 2 steps so one takes well under a second on one CPU thread; the
"long" job (64x64, LONG_STEPS steps) exists to be cancelled or to hold the worker.
"""

from __future__ import annotations

import json
import os
import re
import select
import shutil
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from javisrt.bench.serve_load import LoadOptions, format_table, run_load, summary_row
from javisrt.engine.latents import FPS
from javisrt.runtime.serve.process import ServerProcess
from tests._serve import (
    API_KEY,
    JOB_TIMEOUT_S,
    LONG,
    LONG_STEPS,
    MAX_QUEUE,
    MODEL,
    POLL_S,
    SERVER_ENV,
    SMALL,
    assert_av_mp4,
    create,
    metric,
    serve_args,
    wait_final,
    wait_steps,
)

# the SDK marks client.videos deprecated (OpenAI's hosted Sora shuts down); the methods are what we test
pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")

@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("serve")
    proc = ServerProcess(serve_args(root / "out"), log_path=root / "serve.log", api_key=API_KEY, env=SERVER_ENV)
    proc.start()
    proc.output_dir = root / "out"  # type: ignore[attr-defined]
    try:
        yield proc
    finally:
        code = proc.terminate(timeout_s=60.0)
        assert code in (0, -15), f"server exit code {code}:\n{proc.log_tail()}"


def output_files(server: ServerProcess) -> set[str]:
    return {p.name for p in server.output_dir.iterdir()}  # type: ignore[attr-defined]


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30.0) as client:
        yield client


# ---- memory (first: it measures the cold server's first request) -----------------------------------------------
def test_rss_bounded_after_50_requests(server: ServerProcess, http: httpx.Client) -> None:
    """Memory does not grow with the number of requests served.

    Per-request memory is measured, not guessed: the rise of the server's RSS during its very first
    request above its idle RSS (sampled every 2 ms): the working memory one request needs (VAE and
    codec buffers, the result, its record) before any allocator cache holds it. After 10 warm-up
    requests, 40 more may add less than that one request did: anything kept per request (results, MP4
    bytes, records, buffers) of more than 1/40 of a request's working memory fails the bound.
    """
    text = http.get("/metrics").text
    served = sum(float(v) for v in re.findall(r"^javisrt_jobs_total\{.*\} (\S+)$", text, re.M))
    assert served == 0, "this test measures the first request: it must run first on a fresh server"

    def one(i: int) -> None:
        r = http.post("/v1/videos/sync", json={"prompt": f"memory {i}", **SMALL}, timeout=JOB_TIMEOUT_S)
        assert r.status_code == 200, r.text

    def settled_rss() -> int:  # the smallest of a few samples: no single allocator blip decides
        samples = []
        for _ in range(5):
            samples.append(server.rss_bytes())
            time.sleep(0.1)
        return min(samples)

    idle = peak = settled_rss()
    done = threading.Event()

    def poll() -> None:
        nonlocal peak
        while not done.wait(0.002):
            peak = max(peak, server.rss_bytes())

    sampler = threading.Thread(target=poll)
    sampler.start()
    try:
        one(0)
    finally:
        done.set()
        sampler.join(10.0)
    per_request = peak - idle
    assert per_request > 0
    for i in range(1, 10):
        one(i)
    warm = settled_rss()
    for i in range(10, 50):
        one(i)
    grown = settled_rss() - warm
    assert grown <= per_request, (
        f"RSS grew {grown / 2**20:.1f} MiB over 40 requests; the first request needed {per_request / 2**20:.1f} MiB"
    )


# ---- the OpenAI SDK ----------------------------------------------------------------------------------
def test_openai_sdk_create_retrieve_list_download_delete(server: ServerProcess, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    video = client.videos.create(prompt="a dog barks in the rain", model=MODEL, seconds="2", size="32x32",
                                 extra_body={"num_frames": 17, "num_inference_steps": 2, "seed": 7})  # fmt: skip
    assert video.object == "video" and video.status == "queued" and video.progress == 0
    assert (video.model, video.size, video.seconds) == (MODEL, "32x32", "1")  # num_frames wins: 17 frames = 1 s
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while video.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(POLL_S)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed", video
    assert video.progress == 100 and video.completed_at is not None and video.expires_at is not None
    assert video.expires_at > video.completed_at >= video.created_at
    assert video.id in [v.id for v in client.videos.list(limit=100)]
    out = tmp_path / "sdk.mp4"
    client.videos.download_content(video.id).write_to_file(out)
    assert_av_mp4(out, 17)
    deleted = client.videos.delete(video.id)
    assert (deleted.id, deleted.deleted, deleted.object) == (video.id, True, "video.deleted")
    with pytest.raises(openai.NotFoundError):
        client.videos.retrieve(video.id)
    with pytest.raises(openai.BadRequestError) as bad:  # the SDK's multipart path reports errors too
        client.videos.create(prompt="x", model=MODEL, size="1280x720")
    assert bad.value.body["param"] == "size"  # type: ignore[index]


def test_sync_route_returns_mp4_with_server_timing(http: httpx.Client, tmp_path: Path) -> None:
    r = http.post("/v1/videos/sync", json={"prompt": "a bell rings", **SMALL}, timeout=JOB_TIMEOUT_S)
    assert r.status_code == 200, r.text
    assert r.headers["content-type"] == "video/mp4"
    stages = dict(re.findall(r"(\w+);dur=([0-9.]+)", r.headers["server-timing"]))
    assert set(stages) == {"queue", "text", "denoise", "decode", "mux", "total"}
    assert float(stages["total"]) >= float(stages["denoise"]) + float(stages["decode"])
    (tmp_path / "sync.mp4").write_bytes(r.content)
    assert_av_mp4(tmp_path / "sync.mp4", 17)
    assert http.get(f"/v1/videos/{r.headers['x-video-id']}").status_code == 404  # a sync job is gone once sent


def test_sync_client_that_goes_away_cancels_its_job(server: ServerProcess, http: httpx.Client) -> None:
    before = metric(http, "javisrt_jobs_total", '{status="cancelled"}')
    with pytest.raises(httpx.ReadTimeout):  # the client gives up long before LONG_STEPS steps
        http.post("/v1/videos/sync", json={"prompt": "never mind", **LONG}, timeout=2.0)
    deadline = time.monotonic() + 30.0
    while metric(http, "javisrt_jobs_total", '{status="cancelled"}') == before and time.monotonic() < deadline:
        time.sleep(0.1)
    assert metric(http, "javisrt_jobs_total", '{status="cancelled"}') == before + 1
    assert metric(http, "javisrt_requests_running") == 0


def test_models_health_ready(server: ServerProcess, http: httpx.Client) -> None:
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}  # no key needed
    assert http.get("/ready").json()["status"] == "ready"
    models = http.get("/v1/models").json()["data"]
    assert [m["id"] for m in models] == [MODEL] and models[0]["sizes"] == ["32x32", "64x64"]


# ---- bad input: status, OpenAI error body, nothing queued or written ---------------------------------------
BAD_CREATE = [
    ({"prompt": "x", "size": "1000x1000"}, 400, "size"),
    ({"prompt": "x", "size": "32x32", "seconds": "7"}, 400, "seconds"),
    ({"prompt": "x", "size": "32x32", "seconds": 1}, 400, "seconds"),
    ({"prompt": "x", "size": "32x32", "num_frames": 18}, 400, "num_frames"),
    ({"prompt": "x", "size": "32x32", "num_frames": 13}, 400, "num_frames"),
    ({"prompt": "   ", "size": "32x32"}, 400, "prompt"),
    ({"size": "32x32"}, 400, "prompt"),
    ({"prompt": "x" * 4001, "size": "32x32"}, 400, "prompt"),
    ({"prompt": "x", "num_inference_steps": 0}, 400, "num_inference_steps"),
    ({"prompt": "x", "seed": -1}, 400, "seed"),
    ({"prompt": "x", "seed": True}, 400, "seed"),
    ({"prompt": "x", "mode": "i2v"}, 400, "mode"),
    ({"prompt": "x", "model": "sora-2"}, 400, "model"),
    ({"prompt": "x", "colour": "red"}, 400, "colour"),
]


def assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict[str, Any]:
    assert r.status_code == status, r.text
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.mark.parametrize(("body", "status", "param"), BAD_CREATE, ids=[f"{p}-{i}" for i, (_, _, p) in enumerate(BAD_CREATE)])
def test_bad_create_fields(server: ServerProcess, http: httpx.Client, body: dict[str, Any], status: int, param: str) -> None:
    before = (http.get("/v1/videos", params={"limit": 100}).json()["data"], output_files(server))
    assert_error(http.post("/v1/videos", json=body), status, param)
    assert_error(http.post("/v1/videos", data={k: str(v) for k, v in body.items()}), status, param)  # form
    after = (http.get("/v1/videos", params={"limit": 100}).json()["data"], output_files(server))
    assert [v["id"] for v in after[0]] == [v["id"] for v in before[0]] and after[1] == before[1]


def test_prompt_limit_is_named(http: httpx.Client) -> None:
    error = assert_error(http.post("/v1/videos", json={"prompt": "x" * 4001}), 400, "prompt")
    assert "4000" in error["message"]


def test_malformed_json_and_body_caps(server: ServerProcess, http: httpx.Client) -> None:
    before = output_files(server)
    headers = {"Content-Type": "application/json"}
    assert assert_error(http.post("/v1/videos", content=b'{"prompt": ', headers=headers), 400)["code"] == "invalid_json"
    assert assert_error(http.post("/v1/videos", content=b"[1, 2]", headers=headers), 400)["code"] == "invalid_json"
    assert_error(http.post("/v1/videos", content=b"prompt=x", headers={"Content-Type": "text/plain"}), 415)
    big = json.dumps({"prompt": "x" * (1 << 20)}).encode()
    assert assert_error(http.post("/v1/videos", content=big, headers=headers), 413)["code"] == "request_too_large"

    def chunks() -> Iterator[bytes]:  # no Content-Length: counted while read
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"x" * (1 << 16)
        yield b'"}'

    assert_error(http.post("/v1/videos", content=chunks(), headers=headers), 413)
    assert output_files(server) == before


@pytest.mark.parametrize(
    ("path", "status"),
    [("video_" + "0" * 32, 404), ("video_xyz", 400), ("..%2F..%2Fetc%2Fpasswd", 400), ("video_" + "A" * 32, 400)],
)
def test_unknown_and_malformed_ids(http: httpx.Client, path: str, status: int) -> None:
    for method, suffix in (("GET", ""), ("GET", "/content"), ("DELETE", "")):
        r = http.request(method, f"/v1/videos/{path}{suffix}")
        if r.status_code == 404 and status == 400:  # a path the router never matched is a 404 too: still no leak
            assert r.json()["error"]["code"] in ("not_found",), r.text
            continue
        assert_error(r, status, "video_id")


def test_api_key_required(server: ServerProcess) -> None:
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": f"Basic {API_KEY}"}):
        for method, path in (("POST", "/v1/videos"), ("GET", "/v1/videos"), ("GET", "/v1/models"), ("GET", "/metrics")):
            r = httpx.request(method, f"{server.url}{path}", headers=headers, json={"prompt": "x", **SMALL})
            assert_error(r, 401)
            assert r.headers["www-authenticate"] == "Bearer"
    bad = openai.OpenAI(base_url=server.base_url, api_key="wrong", max_retries=0)
    with pytest.raises(openai.AuthenticationError):
        bad.videos.list()


# ---- concurrency and lifecycle ------------------------------------------------------------------------------
def test_16_concurrent_requests(server: ServerProcess, http: httpx.Client, tmp_path: Path) -> None:
    n = 16
    results: list[Any] = [None] * n

    def submit(i: int) -> None:
        with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30.0) as c:
            results[i] = c.post("/v1/videos", json={"prompt": f"clip {i}", "seed": i, **SMALL})

    threads = [threading.Thread(target=submit, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60.0)
    assert all(r is not None and r.status_code == 200 for r in results), [r and r.text for r in results]
    ids = [r.json()["id"] for r in results]
    assert len(set(ids)) == n
    finals = [wait_final(http, i) for i in ids]
    assert [v["status"] for v in finals] == ["completed"] * n
    assert sorted(v["seed"] for v in finals) == list(range(n))
    listed = [v["id"] for v in http.get("/v1/videos", params={"limit": 100}).json()["data"]]
    assert sorted(i for i in listed if i in ids) == sorted(ids)  # each exactly once
    for i in ids:
        r = http.get(f"/v1/videos/{i}/content")
        assert r.status_code == 200
        (tmp_path / f"{i}.mp4").write_bytes(r.content)
        assert_av_mp4(tmp_path / f"{i}.mp4", 17)
        assert http.delete(f"/v1/videos/{i}").status_code == 200


def test_delete_mid_generation_stops_within_one_step(server: ServerProcess, http: httpx.Client) -> None:
    long = create(http, **LONG)
    nxt = create(http, **SMALL)
    wait_steps(http, long["id"], 2)
    t0 = time.time()
    r = http.delete(f"/v1/videos/{long['id']}")
    assert r.status_code == 200, r.text
    gone = r.json()
    assert (gone["object"], gone["deleted"]) == ("video.deleted", True)
    video = gone["video"]
    assert video["status"] == "cancelled" and video["steps_done"] < LONG_STEPS
    assert video["steps_done"] - video["cancel_requested_at_step"] <= 1  # stopped at the next step boundary
    assert http.get(f"/v1/videos/{long['id']}").status_code == 404
    assert not any(p.startswith(long["id"]) for p in output_files(server))
    after = wait_final(http, nxt["id"])
    assert after["status"] == "completed" and after["started_at"] >= t0 - 1.0  # the worker moved on
    http.delete(f"/v1/videos/{nxt['id']}")


def test_full_queue_answers_429_and_the_gauge_counts(server: ServerProcess, http: httpx.Client) -> None:
    blocker = create(http, **LONG)
    wait_steps(http, blocker["id"], 1)
    queued = [create(http, **SMALL)["id"] for _ in range(MAX_QUEUE)]
    assert metric(http, "javisrt_requests_waiting") == MAX_QUEUE
    assert metric(http, "javisrt_requests_running") == 1
    r = http.post("/v1/videos", json={"prompt": "one too many", **SMALL})
    error = assert_error(r, 429)
    assert error["code"] == "queue_full" and int(r.headers["retry-after"]) > 0
    for i in queued:  # a queued job leaves the queue at once
        assert http.delete(f"/v1/videos/{i}").json()["video"]["status"] == "cancelled"
    assert metric(http, "javisrt_requests_waiting") == 0
    assert http.delete(f"/v1/videos/{blocker['id']}").json()["video"]["status"] == "cancelled"


def test_list_pagination(http: httpx.Client) -> None:
    ids = [create(http, **SMALL)["id"] for _ in range(3)]
    for i in ids:
        wait_final(http, i)
    asc = [v["id"] for v in http.get("/v1/videos", params={"order": "asc", "limit": 100}).json()["data"]]
    assert [i for i in asc if i in ids] == ids
    page = http.get("/v1/videos", params={"order": "asc", "limit": 1, "after": ids[0]}).json()
    assert [v["id"] for v in page["data"]] == [ids[1]] and page["has_more"] is True
    assert_error(http.get("/v1/videos", params={"limit": 0}), 400, "limit")
    assert_error(http.get("/v1/videos", params={"order": "up"}), 400, "order")
    for i in ids:
        http.delete(f"/v1/videos/{i}")


def test_serve_load_bench_counts_every_request(server: ServerProcess) -> None:
    opts = LoadOptions(url=server.url, api_key=API_KEY, clients=2, duration_s=2.0, timeout_s=JOB_TIMEOUT_S,
                       poll_s=POLL_S, request={"prompt": "load", **SMALL})  # fmt: skip
    rows, wall_s = run_load(opts)
    summary = summary_row(rows, wall_s, opts)
    assert summary["completed"] == len(rows) >= 2 and summary["errors"] == {}
    assert 0 <= summary["queue_wait_s"]["p50"] <= summary["e2e_s"]["p99"]
    assert summary["requests_per_min"] == pytest.approx(len(rows) / wall_s * 60)
    assert "requests per minute" in format_table(summary)


# ---- the playground in headless Chromium (Debian's package; .ci/run installs it) -------------------------------
class Chromium:
    """Chromium's DevTools protocol over ``--remote-debugging-pipe`` (fd 3 in, fd 4 out, NUL-framed JSON)."""

    def __init__(self, profile: Path) -> None:
        exe = shutil.which("chromium")
        if exe is None:
            pytest.fail("chromium is not installed; the playground test needs it (.ci/run: apt-get install chromium)")
        to_browser, self._in = os.pipe()
        self._out, from_browser = os.pipe()
        flags = ["--headless", "--disable-gpu", "--remote-debugging-pipe", f"--user-data-dir={profile}",
                 "--no-first-run", "--mute-audio"] + (["--no-sandbox"] if os.geteuid() == 0 else [])  # fmt: skip
        cmd = f"exec {exe} {' '.join(flags)} about:blank 3<&{to_browser} 4>&{from_browser}"
        self.proc = subprocess.Popen(["bash", "-c", cmd], pass_fds=(to_browser, from_browser),
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
        os.close(to_browser)
        os.close(from_browser)
        self._buf = b""
        self._id = 0

    def send(self, method: str, params: dict[str, Any] | None = None, session: str | None = None,
             timeout_s: float = 30.0) -> dict[str, Any]:  # fmt: skip
        self._id += 1
        msg: dict[str, Any] = {"id": self._id, "method": method, "params": params or {}}
        if session:
            msg["sessionId"] = session
        os.write(self._in, json.dumps(msg).encode() + b"\0")
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            while b"\0" in self._buf:
                raw, self._buf = self._buf.split(b"\0", 1)
                reply = json.loads(raw)
                if reply.get("id") == self._id:
                    assert "error" not in reply, reply
                    return dict(reply["result"])
            ready, _, _ = select.select([self._out], [], [], 1.0)
            if ready:
                chunk = os.read(self._out, 1 << 16)
                assert chunk, "chromium closed the DevTools pipe"
                self._buf += chunk
        raise AssertionError(f"chromium did not answer {method} within {timeout_s} s")

    def close(self) -> None:
        try:
            self.send("Browser.close", timeout_s=10.0)
        except (AssertionError, OSError):
            pass
        try:
            self.proc.wait(10.0)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10.0)
        os.close(self._in)
        os.close(self._out)


PLAYGROUND_SCRIPT = """
(async () => {
  const $ = (id) => document.getElementById(id);
  $("apikey").value = %(key)s;
  $("size").value = "32x32";
  $("frames").value = "17";
  $("steps").value = "3";
  $("submit").click();
  const seen = new Set();
  const deadline = Date.now() + %(timeout_ms)d;
  const video = $("video");
  while (Date.now() < deadline) {
    seen.add(Number($("progress").value));
    if (video.error || (!video.hidden && video.readyState >= 1 && video.duration > 0)) break;
    if ($("status").className === "error") break;
    await new Promise((r) => setTimeout(r, 20));
  }
  return {seen: [...seen], duration: video.duration, error: video.error ? video.error.code : null,
          status: $("status").textContent, hidden: video.hidden};
})()
"""


def test_playground_in_headless_chromium(server: ServerProcess, tmp_path: Path) -> None:
    browser = Chromium(tmp_path / "profile")
    try:
        targets = browser.send("Target.getTargets")["targetInfos"]
        page = next(t["targetId"] for t in targets if t["type"] == "page")
        session = browser.send("Target.attachToTarget", {"targetId": page, "flatten": True})["sessionId"]
        browser.send("Page.enable", session=session)
        browser.send("Page.navigate", {"url": f"{server.url}/"}, session=session)
        loaded = "document.readyState + ':' + !!document.getElementById('submit')"
        deadline = time.monotonic() + 30.0
        while time.monotonic() < deadline:  # the page and its script are loaded
            state = browser.send("Runtime.evaluate", {"expression": loaded, "returnByValue": True}, session=session)
            if state["result"].get("value") == "complete:true":
                break
            time.sleep(0.1)
        script = PLAYGROUND_SCRIPT % {"key": json.dumps(API_KEY), "timeout_ms": int(JOB_TIMEOUT_S * 1000)}
        out = browser.send("Runtime.evaluate", {"expression": script, "awaitPromise": True, "returnByValue": True},
                           session=session, timeout_s=JOB_TIMEOUT_S + 10)["result"]["value"]  # fmt: skip
    finally:
        browser.close()
    assert out["error"] is None and not out["hidden"], out
    assert max(out["seen"]) == 100, out  # the bar reached 100%
    assert out["duration"] > 0, out
    assert abs(out["duration"] - 17 / FPS) <= 2 / FPS, out
