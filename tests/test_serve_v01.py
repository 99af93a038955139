"""runtime/serve with ``--model javisdit-v0.1``: ``javisrt serve --model javisdit-v0.1 --tiny`` as a real
uvicorn process, driven by the official ``openai`` SDK and httpx like tests/test_serve.py.

The same server code as JavisDiT++ (queue, progress, cancellation, metrics); what differs is the
pipeline (V01Pipeline) and the request mapping: 24 fps, Open-Sora's clip-length names, one CFG
scale, no negative prompt, the rflow loop only. Requests are 32x32 with 2 steps; the long job
(64x64, V01_LONG_STEPS steps, ~17 ms a step on one thread) exists to be cancelled.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import openai
import pytest

from javisrt.runtime.serve.process import ServerProcess
from javisrt.runtime.v01_generation import V01_FPS, V01_GUIDANCE
from tests._serve import (
    API_KEY,
    JOB_TIMEOUT_S,
    POLL_S,
    SERVER_ENV,
    V01_MODEL,
    assert_av_mp4,
    create,
    metric,
    v01_serve_args,
    wait_final,
    wait_steps,
)

pytestmark = pytest.mark.filterwarnings("ignore:The Sora API is scheduled:DeprecationWarning")

SMALL: dict[str, Any] = {"size": "32x32", "num_frames": 20, "num_inference_steps": 2}  # 17 + a remainder of 3
# 2,000 steps: progress (integer percent) moves every 20 steps, and the job is cancelled long before its end.
V01_LONG_STEPS = 2000
LONG: dict[str, Any] = {"size": "64x64", "num_frames": 17, "num_inference_steps": V01_LONG_STEPS}


@pytest.fixture(scope="module")
def server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServerProcess]:
    root = tmp_path_factory.mktemp("serve_v01")
    proc = ServerProcess(v01_serve_args(root / "out"), log_path=root / "serve.log", api_key=API_KEY, env=SERVER_ENV)
    proc.start()
    try:
        yield proc
    finally:
        code = proc.terminate(timeout_s=60.0)
        assert code in (0, -15), f"server exit code {code}:\n{proc.log_tail()}"


@pytest.fixture
def http(server: ServerProcess) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=server.url, headers=server.headers(), timeout=30.0) as client:
        yield client


def test_openai_sdk_job_completes_with_a_24fps_mp4_with_audio(server: ServerProcess, tmp_path: Path) -> None:
    client = openai.OpenAI(base_url=server.base_url, api_key=API_KEY, max_retries=0)
    video = client.videos.create(prompt="a drum is played in a small room", model=V01_MODEL, size="32x32",
                                 extra_body={"num_frames": 20, "num_inference_steps": 2, "seed": 3})  # fmt: skip
    assert video.status == "queued" and video.seconds == f"{20 / V01_FPS:g}"
    deadline = time.monotonic() + JOB_TIMEOUT_S
    while video.status in ("queued", "in_progress") and time.monotonic() < deadline:
        time.sleep(POLL_S)
        video = client.videos.retrieve(video.id)
    assert video.status == "completed", video
    assert video.progress == 100
    extra = video.model_extra or {}
    assert (extra["guidance_scale"], extra["audio_guidance_scale"], extra["solver"]) == (V01_GUIDANCE, V01_GUIDANCE, "euler")
    assert (extra["num_frames"], extra["num_inference_steps"], extra["seed"], extra["mode"]) == (20, 2, 3, None)
    out = tmp_path / "v01.mp4"
    client.videos.download_content(video.id).write_to_file(out)
    assert_av_mp4(out, 20, fps=V01_FPS)
    client.videos.delete(video.id)


def test_official_clip_length_names(http: httpx.Client, tmp_path: Path) -> None:
    """seconds "2" is Open-Sora's "2s" = 51 frames at 24 fps; num_frames also takes the map's names."""
    a = create(http, prompt="rain on a roof", size="32x32", seconds="2", num_inference_steps=1)
    b = create(http, prompt="rain on a roof", size="32x32", num_frames="2s", num_inference_steps=1)
    assert (a["num_frames"], a["seconds"], b["num_frames"], b["seconds"]) == (51, "2", 51, f"{51 / V01_FPS:g}")
    for video in (a, b):
        done = wait_final(http, video["id"])
        assert done["status"] == "completed", done
    r = http.get(f"/v1/videos/{a['id']}/content")
    (tmp_path / "a.mp4").write_bytes(r.content)
    assert_av_mp4(tmp_path / "a.mp4", 51, fps=V01_FPS)
    for video in (a, b):
        http.delete(f"/v1/videos/{video['id']}")


def test_progress_then_cancel_stops_at_the_next_step(http: httpx.Client) -> None:
    cancelled_before = metric(http, "javisrt_jobs_total", '{status="cancelled"}')
    long = create(http, prompt="a train passes", **LONG)
    nxt = create(http, prompt="a bird sings", **SMALL)
    step = V01_LONG_STEPS // 100  # steps per percent
    running = wait_steps(http, long["id"], step)
    assert 0 < running["progress"] < 100 and running["stage"] == "denoise"
    later = wait_steps(http, long["id"], running["steps_done"] + step)
    assert later["progress"] > running["progress"]  # progress advances with the denoise steps
    assert metric(http, "javisrt_requests_running") == 1 and metric(http, "javisrt_requests_waiting") == 1
    r = http.delete(f"/v1/videos/{long['id']}")
    assert r.status_code == 200, r.text
    video = r.json()["video"]
    assert video["status"] == "cancelled" and video["steps_done"] < V01_LONG_STEPS
    assert video["steps_done"] - video["cancel_requested_at_step"] <= 1
    assert metric(http, "javisrt_jobs_total", '{status="cancelled"}') == cancelled_before + 1
    after = wait_final(http, nxt["id"])
    assert after["status"] == "completed", after  # the worker moved on to the next job
    http.delete(f"/v1/videos/{nxt['id']}")


@pytest.mark.parametrize(
    ("body", "param", "code"),
    [
        ({"negative_prompt": "blurry"}, "negative_prompt", "unsupported_parameter"),
        ({"audio_guidance_scale": 3}, "audio_guidance_scale", "unsupported_parameter"),
        ({"solver": "unipc"}, "solver", "unsupported_parameter"),
        ({"mode": "t2v"}, "mode", "invalid_value"),
        ({"mode": "t2a"}, "mode", "invalid_value"),  # the loaded checkpoint is a -jav one (t2av)
        ({"seconds": "5"}, "seconds", "invalid_value"),
        ({"num_frames": 16}, "num_frames", "invalid_value"),
        ({"num_frames": "3s"}, "num_frames", "invalid_type"),
        ({"size": "426x240x1"}, "size", "unsupported_size"),
    ],
)  # fmt: skip
def test_fields_v01_does_not_have_are_refused(http: httpx.Client, body: dict[str, Any], param: str, code: str) -> None:
    r = http.post("/v1/videos", json={"prompt": "x", "size": "32x32", **body})
    assert r.status_code == 400, r.text
    error = r.json()["error"]
    assert (error["param"], error["code"], error["type"]) == (param, code, "invalid_request_error"), error


def test_models_lists_the_v01_family(http: httpx.Client) -> None:
    model = http.get("/v1/models").json()["data"][0]
    assert (model["id"], model["family"]) == (V01_MODEL, "javisdit-v0.1")
    assert model["seconds"] == ["2", "4", "8", "16", "32"]
    assert model["num_frames"] == {"min": 17, "max": 816, "fps": V01_FPS}


def test_request_mapping_in_process() -> None:
    """The v0.1 mapping without a server: defaults are the released sample.py (4s = 102 frames, 30 steps,
    CFG 7), seconds takes "4" or "4s", and the config the worker gets is a V01GenerationConfig."""
    from javisrt.runtime.serve.config import ServeConfig
    from javisrt.runtime.serve.request import parse_video_request
    from javisrt.runtime.v01_pipeline import V01GenerationConfig

    cfg = ServeConfig(family="javisdit-v0.1", sizes=("426x240", "32x32"), min_frames=17)
    req = parse_video_request({"prompt": "x", "seed": 5}, cfg)
    assert req.config == V01GenerationConfig(num_frames=102, height=240, width=426, steps=30, guidance=7.0, seed=5)
    assert (req.seconds, req.size) == ("4", "426x240")
    for seconds, frames in (("4s", 102), (8, 204), ("32", 816)):
        assert parse_video_request({"prompt": "x", "seconds": seconds}, cfg).config.num_frames == frames
    assert parse_video_request({"prompt": "x", "mode": "t2av"}, cfg).config.mode is not None


@pytest.mark.parametrize(
    ("flags", "error", "message"),
    [
        (["--model", "javisdit-v0.1", "--tiny", "--t5-dir", "t5"], "ConfigError", "--tiny uses random weights"),
        (["--model", "javisdit-v0.1", "--tiny", "--wan-dir", "wan"], "ConfigError", "JavisDiT++ flags"),
        (["--model", "javisdit-v0.1", "--checkpoint", "jav"], "ConfigError", "--t5-dir and --audioldm2-dir"),
        (["--tiny", "--prior", "p"], "ConfigError", "add --model javisdit-v0.1"),
        (["--model", "javisdit-v0.1", "--tiny", "--backend", "onnxruntime"], "NotImplementedError", "eager torch"),
        (["--model", "javisdit-v0.1", "--tiny", "--fp8-linear", "triton"], "NotImplementedError", "eager torch"),
        (["--tiny", "--ops", "triton-fp8"], "ConfigError", "head_dim 32"),
        (["--tiny", "--fp8-scales", "s.safetensors"], "ConfigError", "head_dim 32"),
    ],
)  # fmt: skip
def test_serve_flags_are_checked_before_loading(flags: list[str], error: str, message: str) -> None:
    from javisrt.runtime import cli
    from javisrt.runtime.serve.cli import serve_config

    args = cli.build_parser().parse_args(["serve", *flags])
    with pytest.raises(Exception) as raised:
        serve_config(args)
    assert type(raised.value).__name__ == error and message in str(raised.value)


def test_serve_config_of_the_tiny_v01_server() -> None:
    from javisrt.runtime import cli
    from javisrt.runtime.serve.cli import serve_config

    cfg = serve_config(cli.build_parser().parse_args(["serve", "--model", "javisdit-v0.1", "--tiny"]))
    assert (cfg.family, cfg.model_name, cfg.min_frames) == ("javisdit-v0.1", V01_MODEL, 17)
    assert cfg.sizes[:2] == ("64x64", "426x240") and "1280x720" in cfg.sizes  # the demo size, then the buckets


def test_v01_min_frames_is_at_least_one_micro_frame() -> None:
    from javisrt.engine.errors import ConfigError
    from javisrt.runtime.serve.config import ServeConfig

    with pytest.raises(ConfigError, match="17..816"):
        ServeConfig(family="javisdit-v0.1", min_frames=16)
    assert ServeConfig(family="javisdit-v0.1", min_frames=60).min_frames == 60
    with pytest.raises(ConfigError, match="family"):
        ServeConfig(family="javisdit-v2")
