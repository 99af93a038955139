"""runtime/serve: SIGTERM on a real ``javisrt serve --tiny`` process leaves no job in a non-final
state, as the records on disk that a restarted server on the same --output-dir loads show.

Two workers: one runs a short job that finishes inside the grace period, the other a long one
that is cancelled after it; two more wait in the queue and fail at once. Every wait is bounded.
"""

from __future__ import annotations

import signal
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from javisrt.runtime.cli import EXIT_ERROR, main
from javisrt.runtime.serve.jobs import JobStore
from javisrt.runtime.serve.process import ServerProcess
from tests._serve import JOB_TIMEOUT_S, LONG, LONG_STEPS, POLL_S, SERVER_ENV, SMALL, assert_av_mp4, serve_args

GRACE_S = 5.0


def status_of(client: httpx.Client, video_id: str) -> dict[str, Any]:
    r = client.get(f"/v1/videos/{video_id}")
    assert r.status_code == 200, r.text
    return dict(r.json())


def test_sigterm_finishes_or_fails_every_job(tmp_path: Path) -> None:
    out = tmp_path / "out"
    args = serve_args(out, "--devices", "cpu,cpu", "--shutdown-grace", str(GRACE_S))
    server = ServerProcess(args, log_path=tmp_path / "serve.log", env=SERVER_ENV).start()
    try:
        with httpx.Client(base_url=server.url, timeout=30.0) as c:
            done = c.post("/v1/videos", json={"prompt": "finished before", **SMALL}).json()["id"]
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while status_of(c, done)["status"] != "completed" and time.monotonic() < deadline:
                time.sleep(POLL_S)
            long = c.post("/v1/videos", json={"prompt": "long", **LONG}).json()["id"]
            short = c.post("/v1/videos", json={"prompt": "short", **SMALL, "num_inference_steps": 20}).json()["id"]
            waiting = [c.post("/v1/videos", json={"prompt": f"waits {i}", **LONG}).json()["id"] for i in range(2)]
            deadline = time.monotonic() + JOB_TIMEOUT_S
            while time.monotonic() < deadline:  # both workers busy: the long job steps, the short one started
                s_long, s_short = status_of(c, long), status_of(c, short)
                if s_long["steps_done"] >= 1 and s_short["status"] != "queued":
                    break
                time.sleep(POLL_S)
            assert [status_of(c, w)["status"] for w in waiting] == ["queued", "queued"]
        t0 = time.monotonic()
        server.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        code = server.proc.wait(GRACE_S + 60.0)  # type: ignore[union-attr]
        took = time.monotonic() - t0
    finally:
        server.stop()
    assert code in (0, -signal.SIGTERM), server.log_tail()
    assert took < GRACE_S + 30.0, f"shutdown took {took:.1f} s"

    # what a restarted server on the same directory loads (the app's lifespan runs JobStore.load)
    store = JobStore(out, ttl_s=3600.0, max_records=100)
    assert store.load() == 5
    listed = {j.id: j.to_object() for j in store}
    assert set(listed) == {done, long, short, *waiting}
    assert all(v["status"] in ("completed", "failed", "cancelled") for v in listed.values()), listed
    assert listed[done]["status"] == "completed" and listed[short]["status"] == "completed"
    for i in (done, short):
        assert_av_mp4(out / f"{i}.mp4", 17)
    stopped = listed[long]
    assert stopped["status"] == "failed" and stopped["error"]["code"] == "server_shutdown"
    assert 1 <= stopped["steps_done"] < LONG_STEPS
    for w in waiting:
        assert listed[w]["status"] == "failed" and listed[w]["error"]["code"] == "server_shutdown"
        assert listed[w]["steps_done"] == 0
    assert sorted(p.name for p in out.glob("*.mp4")) == sorted(f"{i}.mp4" for i in (done, short))


@pytest.mark.parametrize(
    ("flags", "message"),
    [(["--checkpoint", "x"], "--tiny uses random weights"), (["--devices", "cuda:0"], "--tiny builds its pipeline"),
     (["--sizes", "33x32"], "must be even"), (["--min-frames", "5"], "min_frames"), (["--max-queue", "0"], "max_queue")],
)  # fmt: skip
def test_bad_flags_exit_with_a_message(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], flags: list[str], message: str
) -> None:
    assert main(["serve", "--tiny", "--output-dir", str(tmp_path), *flags]) == EXIT_ERROR
    assert message in capsys.readouterr().err
