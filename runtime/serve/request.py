"""The create request: OpenAI Videos fields plus the peers' extension fields, validated into a
:class:`VideoRequest` holding the pipeline's frozen :class:`GenerationConfig`.

    OpenAI      prompt (required), model, seconds (2..5 -> 16 s + 1 frames), size ("WxH")
    extensions  num_frames (4n+1; wins over seconds), num_inference_steps, guidance_scale,
                audio_guidance_scale (default: guidance_scale), seed (default: random, echoed back),
                negative_prompt, mode (t2av | t2a | t2v), solver

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
from javisrt.runtime.sampling import Solver
from javisrt.runtime.serve.config import (
    DEFAULT_SECONDS,
    DEFAULT_STEPS,
    SECONDS_RANGE,
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


@dataclass(frozen=True)
class VideoRequest:
    """A validated create request; ``config`` is what the worker hands the pipeline."""

    prompt: str
    model: str
    seconds: str  # as reported in the video object: "2".."5", or frames / 16 when num_frames was given
    size: str
    config: GenerationConfig
    solver: str | None  # None: the model's own solver (GenerationConfig.solver's default)

    def extensions(self) -> dict[str, Any]:
        """The extension fields echoed in the video object (seed included, so a result can be redone)."""
        c = self.config
        return {
            "num_frames": c.num_frames,
            "num_inference_steps": c.steps,
            "guidance_scale": c.video_guidance,
            "audio_guidance_scale": c.audio_guidance,
            "seed": c.seed,
            "mode": GenerationMode(c.mode).value,
            "solver": self.solver,
        }


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


def parse_video_request(fields: Mapping[str, Any], cfg: ServeConfig) -> VideoRequest:
    """Validate a create request (JSON object or form fields) against the server's limits."""
    unknown = sorted(set(fields) - set(FIELDS))
    if unknown:
        raise invalid(f"unknown parameter {unknown[0]!r}; known: {', '.join(FIELDS)}", unknown[0], "unknown_parameter")
    if fields.get("input_reference") is not None:
        raise invalid(
            "input_reference (image-to-video) is not supported: JavisDiT++ generates from text only",
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

    # 2. length: num_frames wins over seconds
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

    # 3. size
    size = cfg.default_size if fields.get("size") is None else fields["size"]
    if not isinstance(size, str) or size not in cfg.sizes:
        shown = ", ".join(cfg.sizes[:8]) + (", ..." if len(cfg.sizes) > 8 else "")
        raise invalid(f"size {size!r} is not served; sizes: {shown} (GET /v1/models lists all)", "size",
                      "unsupported_size")  # fmt: skip
    width, height = parse_size(size)

    # 4. sampling
    steps = DEFAULT_STEPS
    if fields.get("num_inference_steps") is not None:
        steps = _as_int("num_inference_steps", fields["num_inference_steps"])
        if not 1 <= steps <= cfg.max_steps:
            raise invalid(f"num_inference_steps must be in 1..{cfg.max_steps}, got {steps}", "num_inference_steps")
    guidance = DEFAULT_GUIDANCE
    if fields.get("guidance_scale") is not None:
        guidance = _as_float("guidance_scale", fields["guidance_scale"])
    audio_guidance = guidance
    if fields.get("audio_guidance_scale") is not None:
        audio_guidance = _as_float("audio_guidance_scale", fields["audio_guidance_scale"])
    for name, g in (("guidance_scale", guidance), ("audio_guidance_scale", audio_guidance)):
        if g < 0:
            raise invalid(f"{name} must be >= 0, got {g}", name)
    seed = secrets.randbelow(2**31) if fields.get("seed") is None else _as_int("seed", fields["seed"])
    if not 0 <= seed < MAX_SEED:
        raise invalid(f"seed must be in 0..2^63-1, got {seed}", "seed")
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
            num_frames=num_frames, height=height, width=width, steps=steps, guidance=(guidance, audio_guidance),
            seed=seed, mode=mode, min_frames=cfg.min_frames, **extra,
        )  # fmt: skip
    except ConfigError as exc:
        raise invalid(str(exc)) from None
    return VideoRequest(prompt=prompt, model=model, seconds=reported_seconds, size=size, config=config, solver=solver)
