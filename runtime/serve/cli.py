"""``javisrt serve``: the OpenAI-compatible Videos API server (uvicorn + the app in app.py).

    javisrt serve --tiny                                   random tiny weights, http://127.0.0.1:8000
    javisrt serve --checkpoint DIR --wan-dir DIR --audioldm2-dir DIR --devices cuda:0,cuda:1 \\
        --api-key KEY --output-dir /var/lib/javisrt --ttl 3600
    javisrt serve --model javisdit-v0.1 --checkpoint JavisDiT-v0.1-jav/ --prior JavisDiT-v0.1-prior/ \\
        --t5-dir t5-v1_1-xxl/ --imagebind imagebind_huge.pth --vae-dir OpenSora-VAE-v1.2/ --audioldm2-dir audioldm2/
    javisrt serve --model javisdit-v0.1 --tiny             tiny random v0.1 components

``--model`` picks the pipeline (JavisPipeline or V01Pipeline) and the request mapping (request.py);
the queue, progress, cancellation, metrics and API are the same for both.

One worker per ``--devices`` entry, each with its own pipeline; the umT5 prompt cache is shared.
SIGTERM stops taking jobs, gives running ones ``--shutdown-grace`` seconds, then cancels them.
"""

from __future__ import annotations

import argparse
import ipaddress
import logging
import os
import threading
from pathlib import Path
from types import FrameType
from typing import Any

from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.runtime.backends import ENGINES
from javisrt.engine.latents import MIN_FRAMES
from javisrt.runtime.serve.config import JAVISDIT_V01, V01_MIN_FRAMES
from javisrt.runtime.text import PromptCache

log = logging.getLogger(__name__)

API_KEY_ENV = "JAVISRT_API_KEY"
TINY_MODEL_NAME = "javisrt-tiny"
TINY_V01_MODEL_NAME = "javisrt-tiny-v0.1"


class SharedPromptCache(PromptCache):
    """The prompt-embedding LRU, safe to share between worker threads."""

    def __init__(self, max_entries: int = 64) -> None:
        super().__init__(max_entries)
        self._lock = threading.Lock()

    def get(self, key: tuple[str, str]) -> Any:
        with self._lock:
            return super().get(key)

    def put(self, key: tuple[str, str], value: Any) -> None:
        with self._lock:
            super().put(key, value)

    def clear(self) -> None:
        with self._lock:
            super().clear()


def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "serve",
        help="serve OpenAI's Videos API (create, poll, download, delete) with a queue, metrics and a playground",
        description="An OpenAI-compatible Videos API server. Point the openai SDK at http://HOST:PORT/v1.",
    )
    from javisrt.runtime.cli import add_fp8_flags, add_model_flag, add_v01_weight_flags

    add_model_flag(p)
    w = p.add_argument_group("model (local directories; nothing is downloaded)")
    w.add_argument("--tiny", action="store_true", help="serve the tiny random-weight pipeline (no weights needed)")
    w.add_argument("--checkpoint", help="DiT: official JavisDiT++ dir (model/ [+ lora/]), a Wan2.1 dir or a javisrt file")
    w.add_argument("--wan-dir", help="Wan2.1 dir: vae/, text_encoder/, tokenizer/ (diffusers layout) or the original .pth files")
    w.add_argument("--audioldm2-dir", help="AudioLDM2 dir: vae/, vocoder/")
    w.add_argument("--config", help="network preset when the checkpoint does not say (e.g. javisdit-v1.0)")
    w.add_argument("--backend", choices=ENGINES, default="torch",
                   help="DiT engine: torch (the checkpoint, every mode), onnxruntime or tensorrt (--engine-file, "
                   "the one mode it was exported for) (default: torch)")  # fmt: skip
    w.add_argument("--engine-file", help="compiled DiT for --backend onnxruntime (.onnx) or tensorrt (.plan)")
    w.add_argument("--ops", default="torch",
                   help="op set of the torch engine: torch, triton (CUDA) or triton-fp8 (CUDA, calibrated e4m3 scales: "
                   "--fp8-scales) (default: torch)")  # fmt: skip
    add_fp8_flags(w)
    w.add_argument("--served-model-name", help="the model id clients send and /v1/models lists "
                   f"(default: {TINY_MODEL_NAME} with --tiny, {TINY_V01_MODEL_NAME} with --tiny --model javisdit-v0.1, "
                   "else the checkpoint's directory name)")  # fmt: skip
    w.add_argument("--devices", default="cpu",
                   help="comma-separated torch devices, one worker each: cpu, cuda:0,cuda:1 (default: cpu)")  # fmt: skip

    add_v01_weight_flags(p, num_frames=False)

    n = p.add_argument_group("network and security")
    n.add_argument("--host", default="127.0.0.1", help="bind address (default 127.0.0.1: loopback only)")
    n.add_argument("--port", type=int, default=8000, help="TCP port (default 8000)")
    n.add_argument("--api-key", help=f"require 'Authorization: Bearer KEY' on every route but /health and / (default: "
                   f"the {API_KEY_ENV} environment variable, which unlike a flag does not show in ps; unset = no key)")  # fmt: skip
    n.add_argument("--max-body-bytes", type=int, default=1 << 20, help="request body cap, 413 above (default 1 MiB)")
    n.add_argument("--max-prompt-chars", type=int, default=4000, help="prompt / negative prompt cap (default 4000)")

    q = p.add_argument_group("jobs")
    q.add_argument("--max-queue", type=int, default=16, help="requests that may wait; more get 429 (default 16)")
    q.add_argument("--output-dir", default="javisrt-videos", help="where MP4s and job records live (default ./javisrt-videos)")
    q.add_argument("--ttl", type=float, default=3600.0, help="seconds a finished job and its MP4 are kept (default 3600)")
    q.add_argument("--max-records", type=int, default=10_000, help="finished jobs kept at most, oldest go first (default 10000)")
    q.add_argument("--max-steps", type=int, default=200, help="largest num_inference_steps accepted (default 200)")
    q.add_argument("--min-frames", type=int,
                   help=f"smallest num_frames accepted: javisdit++ 4n+1 >= 17 (default {MIN_FRAMES}; seconds always map "
                   f"to 33..81); javisdit-v0.1 >= {V01_MIN_FRAMES} (default {V01_MIN_FRAMES}, one micro-frame)")  # fmt: skip
    q.add_argument("--sizes", help="comma-separated WxH sizes served, the first is the default (default: every "
                   "resolution bucket of the model, 426x240 first; --tiny puts the demo's 64x64 before them)")  # fmt: skip
    q.add_argument("--shutdown-grace", type=float, default=30.0,
                   help="on SIGTERM, seconds running jobs may finish before they are cancelled (default 30)")  # fmt: skip
    q.add_argument("--cancel-wait", type=float, default=30.0,
                   help="seconds DELETE waits for a running job to stop before answering (default 30)")  # fmt: skip
    p.add_argument("-q", "--quiet", action="store_true", help="warnings and errors only, no access log")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.set_defaults(func=run)


V01_ONLY_FLAGS = ("prior", "t5_dir", "imagebind", "vae_dir", "trained_gates")


def serve_config(args: argparse.Namespace) -> Any:
    from javisrt.runtime.cli import check_tiny_fp8, check_v01_engine_flags, resolve_model
    from javisrt.runtime.demo import DEMO_SIZE
    from javisrt.runtime.serve.config import ServeConfig, bucket_sizes, v01_bucket_sizes
    from javisrt.runtime.v01_demo import V01_DEMO_SIZE

    v01 = resolve_model(args) == JAVISDIT_V01
    weights = ("checkpoint", "audioldm2_dir", *V01_ONLY_FLAGS) if v01 else ("checkpoint", "wan_dir", "audioldm2_dir")
    if args.tiny and any(getattr(args, flag) for flag in weights):
        given = ", ".join("--" + f.replace("_", "-") for f in weights if getattr(args, f))
        raise ConfigError(f"--tiny uses random weights; do not combine it with {given}")
    if args.tiny and not v01:
        check_tiny_fp8(args)
    if v01:
        check_v01_engine_flags(args)
    if not v01 and any(getattr(args, flag) for flag in V01_ONLY_FLAGS):
        raise ConfigError("--prior/--t5-dir/--imagebind/--vae-dir/--trained-gates are javisdit-v0.1 flags: add --model javisdit-v0.1")
    if not args.tiny and not v01 and not (args.checkpoint and args.wan_dir):
        raise ConfigError("give --tiny, or --checkpoint and --wan-dir (and --audioldm2-dir for audio)")
    if not args.tiny and v01 and not (args.checkpoint and args.t5_dir and args.audioldm2_dir):
        raise ConfigError("javisdit-v0.1: give --tiny, or --checkpoint, --t5-dir and --audioldm2-dir (a -jav checkpoint "
                          "also --prior, --imagebind and --vae-dir)")  # fmt: skip
    devices = tuple(d.strip() for d in args.devices.split(",") if d.strip())
    if args.tiny and any(d != "cpu" for d in devices):
        raise ConfigError("--tiny builds its pipeline on the CPU; use --devices cpu (repeat it for more workers)")
    tiny_name = TINY_V01_MODEL_NAME if v01 else TINY_MODEL_NAME
    name = args.served_model_name or (tiny_name if args.tiny else Path(args.checkpoint).resolve().name)
    api_key = args.api_key if args.api_key is not None else os.environ.get(API_KEY_ENV) or None
    if args.sizes:
        sizes = tuple(s.strip() for s in args.sizes.split(",") if s.strip())
    else:  # the tiny pipeline is a CPU demo: its small size first, so the playground's default is quick
        demo = V01_DEMO_SIZE if v01 else DEMO_SIZE
        sizes = ((f"{demo[1]}x{demo[0]}",) if args.tiny else ()) + (v01_bucket_sizes() if v01 else bucket_sizes())
    min_frames = args.min_frames if args.min_frames is not None else V01_MIN_FRAMES if v01 else MIN_FRAMES
    return ServeConfig(
        model_name=name, family=args.model, devices=devices, output_dir=Path(args.output_dir), max_queue=args.max_queue,
        api_key=api_key, ttl_s=args.ttl, max_records=args.max_records, max_body_bytes=args.max_body_bytes,
        max_prompt_chars=args.max_prompt_chars, max_steps=args.max_steps, min_frames=min_frames, sizes=sizes,
        shutdown_grace_s=args.shutdown_grace, cancel_wait_s=args.cancel_wait,
    )  # fmt: skip


def pipeline_factory(args: argparse.Namespace) -> Any:
    """``device -> ServedPipeline`` for the workers (V01Pipeline for ``--model javisdit-v0.1``, else
    JavisPipeline); every pipeline shares one prompt cache."""
    cache = SharedPromptCache()

    def build(device: str) -> Any:
        from javisrt.runtime.cli import load_v01_pipeline
        from javisrt.runtime.demo import build_tiny_pipeline
        from javisrt.runtime.pipeline import JavisPipeline

        if args.model == JAVISDIT_V01:
            return load_v01_pipeline(args, tiny=args.tiny, device=device, text_cache=cache)
        if args.tiny:
            return build_tiny_pipeline(
                backend=args.backend, engine_file=args.engine_file, ops=args.ops, device=device, text_cache=cache
            )
        return JavisPipeline.from_pretrained(
            args.checkpoint, args.wan_dir, args.audioldm2_dir, config=args.config, device=device,
            backend=args.backend, engine_file=args.engine_file, ops=args.ops, fp8_scales=args.fp8_scales,
            fp8_linear=args.fp8_linear, text_cache=cache,
        )  # fmt: skip

    return build


def _is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def run(args: argparse.Namespace) -> int:
    try:
        import uvicorn
    except ImportError as exc:  # pinned in requirements.txt; only a broken install lacks it
        raise UnavailableError(f"javisrt serve needs uvicorn and fastapi (requirements.txt): {exc}") from exc
    from javisrt.runtime.serve.app import create_app

    cfg = serve_config(args)
    if not _is_loopback(args.host):
        log.warning("binding to %s: the server is reachable from the network%s", args.host,
                    "" if cfg.api_key else " and has NO API key (--api-key)")  # fmt: skip
    app = create_app(cfg, pipeline_factory(args))
    pool = app.state.pool
    level = "debug" if args.verbose else "warning" if args.quiet else "info"
    config = uvicorn.Config(
        app, host=args.host, port=args.port, log_level=level, access_log=not args.quiet, lifespan="on",
        timeout_graceful_shutdown=int(cfg.shutdown_grace_s + cfg.cancel_wait_s) + 5,
    )  # fmt: skip

    class Server(uvicorn.Server):
        def handle_exit(self, sig: int, frame: FrameType | None) -> None:
            # a signal handler: only schedule the pool's shutdown on the event loop (it takes locks)
            loop = pool.store.loop
            if loop is not None and not loop.is_closed():
                loop.call_soon_threadsafe(pool.begin_shutdown)
            super().handle_exit(sig, frame)

    server = Server(config)

    def fatal(message: str) -> None:
        server.should_exit = True

    pool.on_fatal = fatal
    log.info("serving %s on http://%s:%d (playground at /, API at /v1)", cfg.model_name, args.host, args.port)
    server.run()
    if pool.load_error is not None:
        raise UnavailableError(f"the pipeline failed to load: {pool.load_error}")
    return 0
