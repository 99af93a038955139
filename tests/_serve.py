"""Shared pieces of the ``javisrt serve`` tests (tests/test_serve*.py): the tiny server's flags,
request presets and bounded polling helpers."""

from __future__ import annotations

import re
import secrets
import time
from pathlib import Path
from typing import Any

import av
import httpx

from javisrt.engine.latents import FPS
from javisrt.runtime.media import probe_mp4

API_KEY = "test-" + secrets.token_hex(8)
MODEL = "javisrt-tiny"
MAX_QUEUE = 16
SMALL: dict[str, Any] = {"size": "32x32", "num_frames": 17, "num_inference_steps": 2}
# A long job (64x64, milliseconds a step) must never finish on its own while a test waits to cancel it,
# stop the server past its grace period or time a client out: 1000 steps once finished inside a 5 s
# shutdown grace on a fast CI core; 100,000 steps would need < 0.1 ms a step.
LONG_STEPS = 100_000
LONG: dict[str, Any] = {"size": "64x64", "num_frames": 17, "num_inference_steps": LONG_STEPS}
# One torch thread per server: two shared cores oversubscribed by OpenMP run the tiny VAE ~10x slower.
SERVER_ENV = {"OMP_NUM_THREADS": "1"}
JOB_TIMEOUT_S = 120.0
POLL_S = 0.05


V01_MODEL = "javisrt-tiny-v0.1"


def v01_serve_args(output_dir: Path, *extra: str) -> list[str]:
    """The tiny JavisDiT v0.1 server: the same limits as :func:`serve_args`, v0.1's frame rules."""
    return ["--model", "javisdit-v0.1", "--tiny", "--sizes", "32x32,64x64", "--max-steps", str(LONG_STEPS),
            "--max-queue", str(MAX_QUEUE), "--output-dir", str(output_dir), *extra]  # fmt: skip


def serve_args(output_dir: Path, *extra: str) -> list[str]:
    return ["--tiny", "--sizes", "32x32,64x64", "--min-frames", "17", "--max-steps", str(LONG_STEPS),
            "--max-queue", str(MAX_QUEUE), "--output-dir", str(output_dir), *extra]  # fmt: skip


def wait_final(http: httpx.Client, video_id: str, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = http.get(f"/v1/videos/{video_id}").json()
        if video["status"] not in ("queued", "in_progress"):
            return video
        time.sleep(POLL_S)
    raise AssertionError(f"{video_id} not final after {timeout_s} s: {video}")


def wait_steps(http: httpx.Client, video_id: str, steps: int, timeout_s: float = JOB_TIMEOUT_S) -> dict[str, Any]:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        video = http.get(f"/v1/videos/{video_id}").json()
        if video["status"] == "in_progress" and video["steps_done"] >= steps:
            return video
        assert video["status"] in ("queued", "in_progress"), video
        time.sleep(POLL_S)
    raise AssertionError(f"{video_id} did not reach step {steps} in {timeout_s} s")


def create(http: httpx.Client, **fields: Any) -> dict[str, Any]:
    r = http.post("/v1/videos", json={"prompt": "a red ball bounces", **fields})
    assert r.status_code == 200, r.text
    return r.json()


def metric(http: httpx.Client, name: str, labels: str = "") -> float:
    text = http.get("/metrics").text
    m = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.M)
    assert m is not None, f"{name}{labels} missing from /metrics"
    return float(m.group(1))


def assert_av_mp4(path: Path, num_frames: int, fps: int = FPS) -> None:
    """One H.264 and one AAC stream of equal length (as tests/test_media.py checks write_mp4)."""
    info = probe_mp4(path)
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert (info.video_codec, info.audio_codec) == ("h264", "aac")
    assert info.num_frames == num_frames and info.fps == fps
    with av.open(str(path)) as c:
        a, v = c.streams.audio[0], c.streams.video[0]
        assert abs(float(a.duration * a.time_base) - float(v.duration * v.time_base)) <= 1 / fps
