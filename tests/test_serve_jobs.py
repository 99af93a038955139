"""runtime/serve, in process: request validation, the bounded queue, the job store's TTL, record cap
and restart recovery, and the app's handling of a failing generation (no server process)."""

from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path

import numpy as np
import pytest
from fastapi.testclient import TestClient

from javisrt.engine.errors import ConfigError
from javisrt.engine.latents import BUCKETS
from javisrt.runtime.pipeline import GenerationConfig, GenerationResult
from javisrt.runtime.serve.app import create_app
from javisrt.runtime.serve.config import ServeConfig, bucket_sizes, frames_for_seconds
from javisrt.runtime.serve.errors import APIError
from javisrt.runtime.serve.jobs import Job, JobQueue, JobStatus, JobStore, QueueFull, valid_id
from javisrt.runtime.serve.request import parse_video_request

CFG = ServeConfig(sizes=("32x32", "426x240"), min_frames=17)


def make_job(**fields: object) -> Job:
    return Job.create(parse_video_request({"prompt": "a cat", **fields}, CFG))


def test_seconds_map_to_4n_plus_1_frames_and_num_frames_wins() -> None:
    assert [frames_for_seconds(s) for s in (2, 3, 4, 5)] == [33, 49, 65, 81]
    req = parse_video_request({"prompt": "x", "seconds": "3"}, CFG)  # form value: a string
    assert (req.config.num_frames, req.seconds, req.size) == (49, "3", "32x32")  # default size: the first
    req = parse_video_request({"prompt": "x", "seconds": 3, "num_frames": "17"}, CFG)
    assert (req.config.num_frames, req.seconds) == (17, "1")
    assert req.config.size == (32, 32)  # (H, W) from "WxH"
    req = parse_video_request({"prompt": "x", "size": "426x240"}, CFG)
    assert req.config.size == (240, 426)


def test_defaults_are_the_released_sampler_with_a_random_echoed_seed() -> None:
    a, b = (parse_video_request({"prompt": "x"}, CFG) for _ in range(2))
    assert (a.config.steps, a.config.guidance, a.config.num_frames) == (50, (5.0, 5.0), 65)
    assert a.extensions["seed"] != b.extensions["seed"]  # 1 in 2^31 to collide
    c = parse_video_request({"prompt": "x", "guidance_scale": "3", "audio_guidance_scale": 2}, CFG)
    assert c.config.guidance == (3.0, 2.0)


@pytest.mark.parametrize(
    ("fields", "param"),
    [({"prompt": "x", "solver": "dpm"}, "solver"), ({"prompt": "x", "guidance_scale": "nan"}, "guidance_scale"),
     ({"prompt": "x", "num_frames": 85}, "num_frames"), ({"prompt": 3}, "prompt"),
     ({"prompt": "x", "input_reference": {"filename": "a.png"}}, "input_reference")],
)  # fmt: skip
def test_bad_fields_name_their_param(fields: dict[str, object], param: str) -> None:
    with pytest.raises(APIError) as err:
        parse_video_request(fields, CFG)
    assert err.value.status == 400 and err.value.param == param


def test_default_sizes_are_the_generable_buckets_released_first() -> None:
    sizes = bucket_sizes()
    assert sizes[0] == "426x240" and "240x426" in sizes and len(sizes) == len(set(sizes))
    everything = ServeConfig(min_frames=17)
    for size in sizes:  # each one is a request the pipeline accepts
        req = parse_video_request({"prompt": "x", "size": size, "num_frames": 17}, everything)
        assert req.config.geometry().video is not None
    buckets = {f"{w}x{h}" for res in BUCKETS.values() for (h, w) in res.values()}
    assert set(sizes) == {s for s in buckets if all(int(v) % 2 == 0 for v in s.split("x"))}


def test_ids_are_random_and_validated() -> None:
    ids = {make_job().id for _ in range(100)}
    assert len(ids) == 100 and all(valid_id(i) for i in ids)
    for bad in ("video_", "video_" + "g" * 32, "../video_" + "0" * 32, "video_" + "0" * 32 + "/x"):
        assert not valid_id(bad)


def test_queue_is_bounded_fifo_and_frees_cancelled_slots() -> None:
    q = JobQueue(2)
    a, b, c = make_job(), make_job(), make_job()
    q.put(a)
    q.put(b)
    with pytest.raises(QueueFull):
        q.put(c)
    assert q.remove(a) and len(q) == 1
    q.put(c)
    assert [q.get(0.01), q.get(0.01), q.get(0.01)] == [b, c, None]
    q.put(a)
    assert q.close() == [a] and q.get(0.01) is None


def finished(store: JobStore, status: JobStatus = JobStatus.COMPLETED) -> Job:
    job = make_job()
    store.add(job)
    job.path = store.video_path(job)
    job.path.write_bytes(b"mp4")
    store.finish(job, status)
    return job


def test_records_and_files_expire_after_ttl(tmp_path: Path) -> None:
    store = JobStore(tmp_path, ttl_s=10.0, max_records=100)
    job = finished(store)
    assert job.expires_at == pytest.approx(job.completed_at + 10.0)  # type: ignore[operator]
    assert store.expire(now=job.expires_at - 1) == 0 and len(store) == 1  # type: ignore[operator]
    assert store.expire(now=job.expires_at) == 1  # type: ignore[arg-type]
    assert len(store) == 0 and list(tmp_path.iterdir()) == []


def test_record_cap_drops_the_oldest_finished(tmp_path: Path) -> None:
    store = JobStore(tmp_path, ttl_s=3600.0, max_records=3)
    jobs = [finished(store) for _ in range(5)]
    running = make_job()
    store.add(running)  # not final: never expired
    assert store.expire() == 2
    assert [j.id for j in store] == [j.id for j in jobs[2:]] + [running.id]
    assert sorted(p.name for p in tmp_path.glob("*.mp4")) == sorted(f"{j.id}.mp4" for j in jobs[2:])


def test_failed_jobs_keep_no_file(tmp_path: Path) -> None:
    store = JobStore(tmp_path, ttl_s=3600.0, max_records=10)
    job = finished(store, JobStatus.FAILED)
    assert job.path is None and not list(tmp_path.glob("*.mp4"))
    assert not store.finish(job, JobStatus.COMPLETED)  # final once


def test_restart_reloads_records_fails_unfinished_and_removes_strays(tmp_path: Path) -> None:
    store = JobStore(tmp_path, ttl_s=3600.0, max_records=10)
    done = finished(store)
    pending = make_job()
    store.add(pending)  # its record says "queued": the process died before finishing it
    stray = tmp_path / ("video_" + "f" * 32 + ".mp4")
    stray.write_bytes(b"x")
    (tmp_path / f".{done.id}.mp4.abc.tmp.mp4").write_bytes(b"x")
    (tmp_path / "keep.txt").write_text("not ours")

    again = JobStore(tmp_path, ttl_s=3600.0, max_records=10)
    assert asyncio.run(asyncio.to_thread(again.load)) == 2
    got = {j.id: j for j in again}
    assert got[done.id].status is JobStatus.COMPLETED and got[done.id].path == again.video_path(done)
    assert got[pending.id].status is JobStatus.FAILED and got[pending.id].error["code"] == "server_restart"  # type: ignore[index]
    assert json.loads((tmp_path / f"{pending.id}.json").read_text())["status"] == "failed"
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f"{done.id}.mp4", f"{done.id}.json", f"{pending.id}.json", "keep.txt"]
    )


def test_progress_is_per_step_and_100_only_when_completed(tmp_path: Path) -> None:
    job = make_job(num_inference_steps=4)
    assert job.progress == 0
    job.steps_done = 1
    assert job.progress == 25
    job.steps_done = 4
    assert job.progress == 99  # decode and mux still to come
    store = JobStore(tmp_path, ttl_s=1.0, max_records=10)
    store.add(job)
    store.finish(job, JobStatus.COMPLETED)
    assert job.progress == 100 and job.to_object()["status"] == "completed"
    assert time.time() - job.created_at < 60


# ---- the app in process, over a pipeline double that fails on request ------------------------------------
class FailingOnRequest:
    """Stands in for JavisPipeline where a test needs a generation to fail: prompts starting with
    "raise:" raise, others return a small black clip with silence (a real GenerationResult)."""

    name = "double"

    def check(self, config: object) -> None:
        return None

    def __call__(self, prompt: str, config: GenerationConfig, *, progress: object, cancel: object) -> GenerationResult:
        if prompt.startswith("raise:config"):
            raise ConfigError("the double refuses this request")
        if prompt.startswith("raise:bug"):
            raise ZeroDivisionError("division by zero")
        h, w = config.size
        frames = np.zeros((config.num_frames, h, w, 3), np.uint8)
        wave = np.zeros(config.num_frames * 1000, np.float32)
        return GenerationResult(frames=frames, waveform=wave, prompt=prompt, config=config)


def test_a_failing_job_is_failed_with_its_message_and_the_worker_goes_on(tmp_path: Path) -> None:
    app = create_app(ServeConfig(sizes=("32x32",), min_frames=17, output_dir=tmp_path), lambda device: FailingOnRequest())
    with TestClient(app) as client:

        def run(prompt: str) -> dict[str, object]:
            video = client.post("/v1/videos", json={"prompt": prompt, "num_frames": 17, "num_inference_steps": 1}).json()
            deadline = time.monotonic() + 30.0
            while video["status"] in ("queued", "in_progress") and time.monotonic() < deadline:
                time.sleep(0.02)
                video = client.get(f"/v1/videos/{video['id']}").json()
            return dict(video)

        config_error, bug, fine = run("raise:config"), run("raise:bug"), run("a cat")
        assert config_error["status"] == "failed"
        assert config_error["error"] == {"code": "ConfigError", "message": "the double refuses this request"}
        assert bug["status"] == "failed" and bug["error"] == {"code": "internal_error",  # type: ignore[comparison-overlap]
                                                              "message": "ZeroDivisionError: division by zero"}
        assert fine["status"] == "completed"
        assert client.get("/health").status_code == 200
        assert sorted(p.name for p in tmp_path.glob("*.mp4")) == [f"{fine['id']}.mp4"]
