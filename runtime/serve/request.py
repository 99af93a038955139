"""The create request: OpenAI Videos fields plus the peers' extension fields, validated into a
:class:`VideoRequest` holding the pipeline's frozen generation config. The served family
(``ServeConfig.family``) picks the mapping; the common fields are read once for both.

    OpenAI      prompt (required), model, size ("WxH"), seconds
    extensions  num_frames (wins over seconds), num_inference_steps, guidance_scale, seed (default:
                random, echoed back), mode

    javisdit++     seconds 2..5 -> 16 s + 1 frames; num_frames 4n+1; audio_guidance_scale (default:
                   guidance_scale), negative_prompt, mode t2av | t2a | t2v, solver euler | unipc
                   -> GenerationConfig (50 steps, CFG 5)
    javisdit-v0.1  seconds 2, 4, 8, 16, 32 (also "4s"): Open-Sora's NUM_FRAMES_MAP names, 2 -> 51 frames
                   at 24 fps; num_frames a count or a map name ("4s", "2x"); one CFG scale, no negative
                   prompt (the learned null caption), the rflow (euler) loop only; mode t2av | t2a must be
                   the checkpoint's -> V01GenerationConfig (30 steps, CFG 7). A field v0.1 does not have
                   is a 400 ``unsupported_parameter``, never ignored.

Values arrive as JSON types or, from multipart/form-data (what the OpenAI SDK sends), as strings; both
are accepted for numbers. Every problem is a 400 :class:`APIError` naming the field, raised before
anything is queued.
"""

from __future__ import annotations

import math
import re
import secrets
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from javisrt.engine.config import GenerationMode
from javisrt.engine.errors import ConfigError
from javisrt.engine.latents import FPS, MAX_FRAMES
from javisrt.runtime.pipeline import GenerationConfig
from javisrt.runtime.v01_pipeline import NUM_FRAMES_MAP, V01GenerationConfig
from javisrt.runtime.v01_generation import V01_FPS, V01_GUIDANCE, V01_STEPS
from javisrt.runtime.sampling import Solver
from javisrt.runtime.serve.config import (
    DEFAULT_SECONDS,
    DEFAULT_STEPS,
    JAVISDIT_V01,
    SECONDS_RANGE,
    V01_MAX_FRAMES,
    ServeConfig,
    frames_for_seconds,
    parse_size,
)
from javisrt.runtime.serve.errors import APIError, invalid

FIELDS = (
    "prompt", "model", "seconds", "size", "input_reference",
    "num_frames", "num_inference_steps", "guidance_scale", "audio_guidance_scale",
    "seed", "negative_prompt", "mode", "solver",
)  # fmt: skip
MAX_SEED = 2**63
DEFAULT_GUIDANCE = 5.0  # the released CFG scale, both modalities
_INT = re.compile(r"^[+-]?[0-9]{1,19}$")


V01_SECONDS = tuple(int(k[:-1]) for k in NUM_FRAMES_MAP if k.endswith("s"))  # 2, 4, 8, 16, 32
V01_DEFAULT_SECONDS = 4  # "4s" = 102 frames: the released sample.py


@dataclass(frozen=True)
class VideoRequest:
    """A validated create request; ``config`` is what the worker hands the pipeline.

    ``extensions`` are the extension fields echoed in the video object (seed included, so a result
    can be redone): num_frames, num_inference_steps, guidance_scale, audio_guidance_scale, seed, mode
    (None: the checkpoint's own, v0.1 only) and solver (None: the model's own)."""

    prompt: str
    model: str
    seconds: str  # as reported in the video object: the requested seconds, or frames / fps for num_frames
    size: str
    config: GenerationConfig | V01GenerationConfig
    extensions: dict[str, Any]


def seconds_choices(cfg: ServeConfig) -> tuple[int, ...]:
    """The ``seconds`` values the served family accepts (for /v1/models and the playground)."""
    return V01_SECONDS if cfg.family == JAVISDIT_V01 else tuple(range(SECONDS_RANGE[0], SECONDS_RANGE[1] + 1))


def frame_limits(cfg: ServeConfig) -> tuple[int, int, int]:
    """``(min, max, fps)`` of ``num_frames`` for the served family."""
    if cfg.family == JAVISDIT_V01:
        return cfg.min_frames, V01_MAX_FRAMES, V01_FPS
    return cfg.min_frames, MAX_FRAMES, FPS


def _as_int(name: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, (int, str)):
        raise invalid(f"{name} must be an integer, got {value!r}", name, "invalid_type")
    if isinstance(value, str):
        if not _INT.match(value.strip()):
            raise invalid(f"{name} must be an integer, got {value!r}", name, "invalid_type")
        value = int(value.strip())
    return value


def _as_float(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise invalid(f"{name} must be a number, got {value!r}", name, "invalid_type")
    try:
        number = float(value)
    except ValueError:
        raise invalid(f"{name} must be a number, got {value!r}", name, "invalid_type") from None
    if not math.isfinite(number):
        raise invalid(f"{name} must be finite, got {value!r}", name)
    return number


def _as_text(name: str, value: Any, limit: int) -> str:
    if not isinstance(value, str):
        raise invalid(f"{name} must be a string", name, "invalid_type")
    if len(value) > limit:
        raise invalid(f"{name} is {len(value)} characters; the limit is {limit}", name, "string_above_max_length")
    return value


@dataclass(frozen=True)
class _Common:
    """The fields both families read the same way."""

    prompt: str
    model: str
    size: str
    width: int
    height: int
    steps: int
    seed: int


def parse_video_request(fields: Mapping[str, Any], cfg: ServeConfig) -> VideoRequest:
    """Validate a create request (JSON object or form fields) against the server's limits."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise invalid(f"unknown parameter {unknown[0]!r}; known: {', '.join(FIELDS)}", unknown[0], "unknown_parameter")
    if fields.get("input_reference") is not None:
        raise invalid(
            "input_reference (image-to-video) is not supported: javisrt generates from text only",
            "input_reference",
            "unsupported_parameter",
        )

    # 1. prompt and model
    if fields.get("prompt") is None:
        raise invalid("prompt is required", "prompt", "missing_required_parameter")
    prompt = _as_text("prompt", fields["prompt"], cfg.max_prompt_chars)
    if not prompt.strip():
        raise invalid("prompt is empty", "prompt", "empty_prompt")
    model = fields.get("model")
    if model is None:
        model = cfg.model_name
    elif model != cfg.model_name:
        raise invalid(f"model {model!r} is not served here; this server serves {cfg.model_name!r}", "model",
                      "model_not_found")  # fmt: skip

    # 2. size
    size = cfg.default_size if fields.get("size") is None else fields["size"]
    if not isinstance(size, str) or size not in cfg.sizes:
        shown = ", ".join(cfg.sizes[:8]) + (", ..." if len(cfg.sizes) > 8 else "")
        raise invalid(f"size {size!r} is not served; sizes: {shown} (GET /v1/models lists all)", "size",
                      "unsupported_size")  # fmt: skip

    # 3. steps and seed
    v01 = cfg.family == JAVISDIT_V01
    steps = V01_STEPS if v01 else DEFAULT_STEPS
    if fields.get("num_inference_steps") is not None:
        steps = _as_int("num_inference_steps", fields["num_inference_steps"])
        if not 1 <= steps <= cfg.max_steps:
            raise invalid(f"num_inference_steps must be in 1..{cfg.max_steps}, got {steps}", "num_inference_steps")
    seed = secrets.randbelow(2**31) if fields.get("seed") is None else _as_int("seed", fields["seed"])
    if not 0 <= seed < MAX_SEED:
        raise invalid(f"seed must be in 0..2^63-1, got {seed}", "seed")
    width, height = parse_size(size)
    common = _Common(prompt, model, size, width, height, steps, seed)
    return _v01_request(fields, cfg, common) if v01 else _javisdit_request(fields, cfg, common)


def _guidance(fields: Mapping[str, Any], name: str, default: float) -> float:
    if fields.get(name) is None:
        return default
    g = _as_float(name, fields[name])
    if g < 0:
        raise invalid(f"{name} must be >= 0, got {g}", name)
    return g


def _javisdit_request(fields: Mapping[str, Any], cfg: ServeConfig, c: _Common) -> VideoRequest:
    """JavisDiT++: seconds 2..5 at 16 fps, num_frames 4n+1, two CFG scales, negative prompt, solver."""
    # length: num_frames wins over seconds
    seconds = DEFAULT_SECONDS
    if fields.get("seconds") is not None:
        seconds = _as_int("seconds", fields["seconds"])
        lo, hi = SECONDS_RANGE
        if not lo <= seconds <= hi:
            raise invalid(f"seconds must be an integer in {lo}..{hi} ({FPS} fps); got {seconds}", "seconds")
    num_frames = frames_for_seconds(seconds)
    reported_seconds = str(seconds)
    if fields.get("num_frames") is not None:
        num_frames = _as_int("num_frames", fields["num_frames"])
        if (num_frames - 1) % 4 or not cfg.min_frames <= num_frames <= MAX_FRAMES:
            raise invalid(
                f"num_frames must be 4n+1 in {cfg.min_frames}..{MAX_FRAMES}, got {num_frames}", "num_frames"
            )
        reported_seconds = f"{(num_frames - 1) / FPS:g}"

    guidance = _guidance(fields, "guidance_scale", DEFAULT_GUIDANCE)
    audio_guidance = _guidance(fields, "audio_guidance_scale", guidance)
    mode = fields.get("mode") or GenerationMode.T2AV.value
    if mode not in {m.value for m in GenerationMode}:
        raise invalid(f"mode must be one of {[m.value for m in GenerationMode]}, got {mode!r}", "mode")
    extra: dict[str, Any] = {}
    if fields.get("negative_prompt") is not None:
        extra["negative_prompt"] = _as_text("negative_prompt", fields["negative_prompt"], cfg.max_prompt_chars)
    solver = fields.get("solver") or None
    if solver is not None and solver not in {s.value for s in Solver}:
        raise invalid(f"solver must be one of {[s.value for s in Solver]}, got {solver!r}", "solver")
    extra["solver"] = solver

    try:
        config = GenerationConfig(
            num_frames=num_frames, height=c.height, width=c.width, steps=c.steps, guidance=(guidance, audio_guidance),
            seed=c.seed, mode=mode, min_frames=cfg.min_frames, **extra,
        )  # fmt: skip
    except ConfigError as exc:
        raise invalid(str(exc)) from None
    echo = {"num_frames": config.num_frames, "num_inference_steps": config.steps, "guidance_scale": config.video_guidance,
            "audio_guidance_scale": config.audio_guidance, "seed": config.seed,
            "mode": GenerationMode(config.mode).value, "solver": solver}  # fmt: skip
    return VideoRequest(prompt=c.prompt, model=c.model, seconds=reported_seconds, size=c.size, config=config,
                        extensions=echo)  # fmt: skip


# What v0.1 does not have, and why a request naming it is refused rather than ignored.
_V01_UNSUPPORTED = {
    "negative_prompt": "JavisDiT v0.1 has no negative prompt: its unconditional branch is the learned null caption",
    "audio_guidance_scale": "JavisDiT v0.1 has one CFG scale for video and audio: send guidance_scale only",
}


def _v01_request(fields: Mapping[str, Any], cfg: ServeConfig, c: _Common) -> VideoRequest:
    """JavisDiT v0.1: Open-Sora's clip-length names at 24 fps, one CFG scale, the rflow loop."""
    for name, why in _V01_UNSUPPORTED.items():
        if fields.get(name) is not None:
            raise invalid(why, name, "unsupported_parameter")
    solver = fields.get("solver") or None
    if solver is not None and solver != Solver.EULER.value:
        raise invalid(f"JavisDiT v0.1 samples with its rflow loop only (solver {Solver.EULER.value!r}); got {solver!r}",
                      "solver", "unsupported_parameter")  # fmt: skip

    # length: num_frames wins over seconds
    seconds = fields.get("seconds")
    name = str(V01_DEFAULT_SECONDS if seconds is None else seconds).strip()
    number = name[:-1] if name.endswith("s") else name
    if isinstance(seconds, bool) or not number.isdigit() or int(number) not in V01_SECONDS:
        raise invalid(f"seconds must be one of {list(V01_SECONDS)} (Open-Sora's \"2s\" .. \"32s\": 51 .. 816 frames at "
                      f"{V01_FPS} fps); got {seconds!r}", "seconds")  # fmt: skip
    num_frames = NUM_FRAMES_MAP[f"{int(number)}s"]
    reported_seconds = str(int(number))
    if fields.get("num_frames") is not None:
        value = fields["num_frames"]
        if isinstance(value, str) and value.strip() in NUM_FRAMES_MAP:
            num_frames = NUM_FRAMES_MAP[value.strip()]
        else:
            num_frames = _as_int("num_frames", value)
        if not cfg.min_frames <= num_frames <= V01_MAX_FRAMES:
            raise invalid(f"num_frames must be in {cfg.min_frames}..{V01_MAX_FRAMES} or one of {sorted(NUM_FRAMES_MAP)}, "
                          f"got {value!r}", "num_frames")  # fmt: skip
        reported_seconds = f"{num_frames / V01_FPS:g}"

    guidance = _guidance(fields, "guidance_scale", V01_GUIDANCE)
    mode = fields.get("mode") or None  # None: the checkpoint's own (the worker checks a given one)
    v01_modes = [GenerationMode.T2AV.value, GenerationMode.T2A.value]
    if mode is not None and mode not in v01_modes:
        raise invalid(f"JavisDiT v0.1 modes are {v01_modes} (no video-only model), got {mode!r}", "mode")
    try:
        config = V01GenerationConfig(num_frames=num_frames, height=c.height, width=c.width, steps=c.steps,
                                     guidance=guidance, seed=c.seed, mode=mode)  # fmt: skip
    except ConfigError as exc:
        raise invalid(str(exc)) from None
    echo = {"num_frames": num_frames, "num_inference_steps": c.steps, "guidance_scale": guidance,
            "audio_guidance_scale": guidance, "seed": c.seed, "mode": None if config.mode is None else config.mode.value,
            "solver": Solver.EULER.value}  # fmt: skip
    return VideoRequest(prompt=c.prompt, model=c.model, seconds=reported_seconds, size=c.size, config=config,
                        extensions=echo)  # fmt: skip
