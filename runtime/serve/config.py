"""``ServeConfig``: everything ``javisrt serve`` decides once at start-up (frozen, validated).

The CLI builds it from flags; the app, the request parser and the workers only read it.

``family`` names the served network (``javisdit++`` or ``javisdit-v0.1``, the CLI's ``--model``): it
picks the request mapping (request.py) and the frame-count rules; everything else is shared.

Sizes are OpenAI's ``"WxH"`` strings. By default every resolution bucket of latents.py is served
(``426x240`` = the 240p 9:16 bucket, the released default, comes first and is the default size);
``--sizes`` replaces the list (the first one becomes the default), e.g. small sizes for the tiny
pipeline in tests.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass, field
from pathlib import Path

from javisrt.engine.errors import ConfigError
from javisrt.engine.latents import BUCKETS, FPS, MAX_FRAMES, MIN_FRAMES

SIZE_PATTERN = re.compile(r"^([1-9][0-9]{0,4})x([1-9][0-9]{0,4})$")
DEFAULT_SIZE = "426x240"  # 240p, H:W 9:16 in the reference's naming: the released default
SECONDS_RANGE = (2, 5)  # OpenAI ``seconds`` -> 16 s + 1 frames: 33, 49, 65, 81
DEFAULT_SECONDS = 4
DEFAULT_STEPS = 50  # the released sampler
JAVISDIT = "javisdit++"
JAVISDIT_V01 = "javisdit-v0.1"
V01_MIN_FRAMES = 17  # one Open-Sora micro-frame; fewer is refused (v01_latent_geometry says why)
V01_MAX_FRAMES = 816  # NUM_FRAMES_MAP's longest name ("32s" / "16x")


def parse_size(text: str) -> tuple[int, int]:
    """``"WxH"`` -> (width, height); positive even ints (the VAE works on even sizes)."""
    m = SIZE_PATTERN.match(text)
    if m is None:
        raise ConfigError(f"size must be WIDTHxHEIGHT, e.g. {DEFAULT_SIZE}; got {text!r}")
    w, h = int(m.group(1)), int(m.group(2))
    if w % 2 or h % 2:
        raise ConfigError(f"size {text!r}: width and height must be even")
    return w, h


def bucket_sizes() -> tuple[str, ...]:
    """Every bucket the pipeline can generate as ``"WxH"``, the released default first, then by
    resolution and aspect. Buckets with an odd side (144p ones such as 312x117) are left out:
    ``latent_geometry`` needs even sizes."""
    sizes = [f"{w}x{h}" for res in BUCKETS.values() for (h, w) in res.values() if h % 2 == 0 and w % 2 == 0]
    return (DEFAULT_SIZE, *dict.fromkeys(s for s in sizes if s != DEFAULT_SIZE))


def v01_bucket_sizes() -> tuple[str, ...]:
    """JavisDiT v0.1's buckets (Open-Sora 1.2's table, 144p..720p) as ``"WxH"``, 426x240 first; odd-sided
    ones are left out as in :func:`bucket_sizes` (``parse_size`` takes even sizes)."""
    from javisrt.runtime.v01_generation import V01_BUCKETS

    sizes = [f"{w}x{h}" for res in V01_BUCKETS.values() for (h, w) in res.values() if h % 2 == 0 and w % 2 == 0]
    return (DEFAULT_SIZE, *dict.fromkeys(s for s in sizes if s != DEFAULT_SIZE))


def frames_for_seconds(seconds: int) -> int:
    """OpenAI ``seconds`` -> frames at 16 fps, 4n+1: 2 -> 33 ... 5 -> 81."""
    return seconds * FPS + 1


@dataclass(frozen=True)
class ServeConfig:
    """Server-wide settings. Times in seconds, sizes in bytes / characters."""

    model_name: str = "javisrt"
    family: str = JAVISDIT  # javisdit++ | javisdit-v0.1 (runtime/cli.py MODELS)
    devices: tuple[str, ...] = ("cpu",)
    output_dir: Path = Path("javisrt-videos")
    max_queue: int = 16  # requests waiting (not counting the ones running)
    api_key: str | None = None
    ttl_s: float = 3600.0  # finished jobs (record + file) expire this long after they finish
    max_records: int = 10_000  # finished records kept at most, oldest expire first
    max_body_bytes: int = 1 << 20
    max_prompt_chars: int = 4000
    max_steps: int = 200
    min_frames: int = MIN_FRAMES  # lower bound of ``num_frames`` (``seconds`` always maps to 33..81)
    sizes: tuple[str, ...] = field(default_factory=bucket_sizes)
    shutdown_grace_s: float = 30.0  # SIGTERM: running jobs may finish this long, then are cancelled
    cancel_wait_s: float = 30.0  # DELETE of a running job waits this long for its worker to stop
    retry_after_s: int = 5  # the Retry-After of a 429

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ConfigError("the served model name is empty")
        if not self.devices:
            raise ConfigError("give at least one device")
        for name in ("max_queue", "max_records", "max_body_bytes", "max_prompt_chars", "max_steps", "retry_after_s"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ConfigError(f"{name} must be an int >= 1, got {value!r}")
        for name in ("ttl_s", "shutdown_grace_s", "cancel_wait_s"):
            value = getattr(self, name)
            if not (math.isfinite(value) and value >= 0):
                raise ConfigError(f"{name} must be a finite number >= 0, got {value!r}")
        if self.api_key is not None and not self.api_key.strip():
            raise ConfigError("the API key is empty")
        from javisrt.runtime.cli import MODELS  # the CLI's --model choices (light module: no torch)

        if self.family not in MODELS:
            raise ConfigError(f"family must be one of {MODELS}, got {self.family!r}")
        if self.family == JAVISDIT_V01:
            if not V01_MIN_FRAMES <= self.min_frames <= V01_MAX_FRAMES:
                raise ConfigError(f"min_frames must be in {V01_MIN_FRAMES}..{V01_MAX_FRAMES} for {JAVISDIT_V01}, "
                                  f"got {self.min_frames}")  # fmt: skip
        elif not 17 <= self.min_frames <= MAX_FRAMES or (self.min_frames - 1) % 4:
            raise ConfigError(f"min_frames must be 4n+1 in 17..{MAX_FRAMES}, got {self.min_frames}")
        if not self.sizes:
            raise ConfigError("give at least one size")
        for s in self.sizes:
            parse_size(s)
        object.__setattr__(self, "output_dir", Path(self.output_dir))

    @property
    def default_size(self) -> str:
        return self.sizes[0]
