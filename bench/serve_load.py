"""Load test of ``javisrt serve``: N concurrent clients for a duration, each running the async Videos
API cycle (create -> poll -> download -> delete) back to back.

    python -m javisrt.bench.serve_load --url http://127.0.0.1:8000 --clients 8 --duration 60
    python -m javisrt.bench.serve_load --launch-tiny --clients 8 --duration 60 --json serve_load.jsonl

``--launch-tiny`` starts ``javisrt serve --tiny`` itself on a free loopback port (one worker, one
torch thread) and stops it afterwards. Clients stop creating at ``--duration``; requests in flight
then finish (each bounded by ``--timeout``).

Reported (table on stdout, rows in ``--json``, with provenance):
  requests/min   completed requests / wall time of the run x 60
  queue wait     the server's time from create to a worker taking the job (``timings.queue_s``)
  end to end     the client's time from sending the create to having the MP4 bytes
  errors         by kind: ``http_<status>`` (e.g. http_429 queue full), ``job_<code>`` (failed jobs),
                 ``timeout``, ``transport`` (connection errors)
Percentiles follow trtexec (bench/stats.py).
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
import tempfile
import threading
import time
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import httpx

from javisrt.bench.results import append_row
from javisrt.bench.stats import summarize

log = logging.getLogger("javisrt.bench.serve_load")

PERCENTILES = (50.0, 99.0)


@dataclass(frozen=True)
class RequestRow:
    client: int
    ok: bool
    error: str | None
    e2e_s: float
    queue_s: float | None
    bytes: int


@dataclass(frozen=True)
class LoadOptions:
    url: str
    api_key: str | None
    clients: int
    duration_s: float
    timeout_s: float
    poll_s: float
    request: dict[str, Any]


def one_request(client: httpx.Client, opts: LoadOptions, index: int) -> RequestRow:
    """create -> poll until final -> download -> delete; never raises for a server-side failure."""
    t0 = time.perf_counter()

    def row(error: str | None, queue_s: float | None = None, size: int = 0) -> RequestRow:
        return RequestRow(index, error is None, error, time.perf_counter() - t0, queue_s, size)

    try:
        r = client.post("/v1/videos", json=opts.request)
        if r.status_code != 200:
            if r.status_code == 429:  # back off as told, but never past the run
                time.sleep(min(float(r.headers.get("retry-after", "1")), opts.duration_s))
            return row(f"http_{r.status_code}")
        video = r.json()
        deadline = t0 + opts.timeout_s
        while video["status"] in ("queued", "in_progress"):
            if time.perf_counter() > deadline:
                client.delete(f"/v1/videos/{video['id']}")
                return row("timeout")
            time.sleep(opts.poll_s)
            r = client.get(f"/v1/videos/{video['id']}")
            if r.status_code != 200:
                return row(f"http_{r.status_code}")
            video = r.json()
        queue_s = video.get("timings", {}).get("queue_s")
        if video["status"] != "completed":
            code = (video.get("error") or {}).get("code") or video["status"]
            return row(f"job_{code}", queue_s)
        content = client.get(f"/v1/videos/{video['id']}/content")
        if content.status_code != 200:
            return row(f"http_{content.status_code}", queue_s)
        result = row(None, queue_s, len(content.content))
        client.delete(f"/v1/videos/{video['id']}")
        return result
    except httpx.TimeoutException:
        return row("timeout")
    except httpx.TransportError:
        return row("transport")


def run_load(opts: LoadOptions) -> tuple[list[RequestRow], float]:
    rows: list[RequestRow] = []
    lock = threading.Lock()
    headers = {"Authorization": f"Bearer {opts.api_key}"} if opts.api_key else {}
    start = time.perf_counter()
    stop_at = start + opts.duration_s

    def client_loop(index: int) -> None:
        with httpx.Client(base_url=opts.url, headers=headers, timeout=opts.timeout_s) as client:
            while time.perf_counter() < stop_at:
                result = one_request(client, opts, index)
                with lock:
                    rows.append(result)

    threads = [threading.Thread(target=client_loop, args=(i,), daemon=True) for i in range(opts.clients)]
    for t in threads:
        t.start()
    for t in threads:  # each client ends after its last request: at most duration + timeout
        t.join(opts.duration_s + opts.timeout_s + 30.0)
    alive = sum(t.is_alive() for t in threads)
    if alive:
        log.error("%d client(s) still running after duration + timeout; their requests are not counted", alive)
    with lock:
        return list(rows), time.perf_counter() - start


def summary_row(rows: list[RequestRow], wall_s: float, opts: LoadOptions) -> dict[str, Any]:
    ok = [r for r in rows if r.ok]
    out: dict[str, Any] = {
        "kind": "summary", "url": opts.url, "clients": opts.clients, "duration_s": opts.duration_s,
        "wall_s": round(wall_s, 3), "request": opts.request, "requests": len(rows), "completed": len(ok),
        "requests_per_min": len(ok) / wall_s * 60.0 if wall_s > 0 else 0.0,
        "errors": dict(Counter(r.error for r in rows if r.error)),
    }  # fmt: skip
    for name, values in (("queue_wait_s", [r.queue_s for r in ok if r.queue_s is not None]),
                         ("e2e_s", [r.e2e_s for r in ok])):  # fmt: skip
        if values:
            s = summarize(values, PERCENTILES)
            out[name] = {"p50": s.percentile(50.0), "p99": s.percentile(99.0), "mean": s.mean, "max": s.maximum}
        else:
            out[name] = None
    return out


def format_table(summary: dict[str, Any]) -> str:
    def ms(stat: dict[str, float] | None, key: str) -> str:
        return "-" if stat is None else f"{stat[key] * 1000:.0f} ms"

    errors = ", ".join(f"{k}: {v}" for k, v in sorted(summary["errors"].items())) or "none"
    lines = [
        f"serve_load: {summary['clients']} clients x {summary['duration_s']:.0f} s against {summary['url']}",
        f"request: {json.dumps(summary['request'])}",
        "| measure | value |",
        "|---|---|",
        f"| requests completed / sent | {summary['completed']} / {summary['requests']} |",
        f"| requests per minute | {summary['requests_per_min']:.1f} |",
        f"| queue wait p50 / p99 | {ms(summary['queue_wait_s'], 'p50')} / {ms(summary['queue_wait_s'], 'p99')} |",
        f"| end to end p50 / p99 | {ms(summary['e2e_s'], 'p50')} / {ms(summary['e2e_s'], 'p99')} |",
        f"| errors by kind | {errors} |",
        f"| wall time | {summary['wall_s']:.1f} s |",
    ]
    return "\n".join(lines)


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m javisrt.bench.serve_load", description=__doc__.split("\n")[0])
    target = p.add_mutually_exclusive_group(required=True)
    target.add_argument("--url", help="a running server, e.g. http://127.0.0.1:8000")
    target.add_argument("--launch-tiny", action="store_true",
                        help="start `javisrt serve --tiny` on a free loopback port for the run (one torch thread)")  # fmt: skip
    p.add_argument("--api-key", help="bearer key of the server (with --launch-tiny: the key it is started with)")
    p.add_argument("--clients", type=int, default=8, help="concurrent clients (default 8)")
    p.add_argument("--duration", type=float, default=60.0, help="seconds during which clients create requests (default 60)")
    p.add_argument("--timeout", type=float, default=600.0, help="per-request limit in seconds (default 600)")
    p.add_argument("--poll", type=float, default=0.1, help="seconds between status polls (default 0.1)")
    p.add_argument("--size", default="32x32", help="WxH of every request (default 32x32, served by --launch-tiny)")
    p.add_argument("--num-frames", type=int, default=17, help="frames per request, 4n+1 (default 17)")
    p.add_argument("--steps", type=int, default=2, help="num_inference_steps per request (default 2)")
    p.add_argument("--max-queue", type=int, default=16, help="with --launch-tiny: the server's --max-queue (default 16)")
    p.add_argument("--json", help="append the summary row and one row per request (JSON lines, with provenance)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    if args.clients < 1 or args.duration <= 0 or args.timeout <= 0:
        p.error("--clients must be >= 1, --duration and --timeout > 0")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.DEBUG if args.verbose else logging.WARNING)  # a line per request
    request = {"prompt": "a drummer plays on a wooden stage", "size": args.size, "num_frames": args.num_frames,
               "num_inference_steps": args.steps}  # fmt: skip
    server = None
    url = args.url
    if args.launch_tiny:
        from javisrt.runtime.serve.process import ServerProcess

        work = Path(tempfile.mkdtemp(prefix="javisrt-serve-load-"))
        server = ServerProcess(
            ["--tiny", "--sizes", args.size, "--min-frames", "17", "--max-queue", str(args.max_queue),
             "--output-dir", str(work / "out"), "-q"],
            log_path=work / "serve.log", api_key=args.api_key, env={"OMP_NUM_THREADS": "1"},
        )  # fmt: skip
        log.info("starting javisrt serve --tiny (log: %s)", work / "serve.log")
        server.start()
        url = server.url
    try:
        opts = LoadOptions(url=url.rstrip("/"), api_key=args.api_key, clients=args.clients, duration_s=args.duration,
                           timeout_s=args.timeout, poll_s=args.poll, request=request)  # fmt: skip
        log.info("%d clients for %.0f s against %s", opts.clients, opts.duration_s, opts.url)
        rows, wall_s = run_load(opts)
    finally:
        if server is not None:
            server.stop()
    summary = summary_row(rows, wall_s, opts)
    print(format_table(summary))  # the command's report
    if args.json:
        append_row(summary, json_path=args.json)
        for r in rows:
            append_row({"kind": "request", **asdict(r)}, json_path=args.json)
    return 0 if summary["completed"] else 1


if __name__ == "__main__":
    sys.exit(main())
