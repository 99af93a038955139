"""Latent geometry and seeded noise (model-spec.md §6.1, §7).

Everything here is arithmetic on sizes plus one function that draws the initial noise; no model is
touched. The pipeline asks :func:`latent_geometry` for the shapes of one request and
:func:`draw_noise` for the noise, in the reference's order (video first, then audio, both bf16).

Resolution buckets (Open-Sora / JavisDiT ``datasets/aspect.py``, S8). A bucket is named by a
resolution ("144p", "240p", "360p", "480p") and an aspect ratio key. The keys follow the reference's
``ASPECT_RATIO_MAP``: the ratio is **H:W written as in the reference**, i.e. ``"9:16"`` is the
landscape bucket with H/W ≈ 0.56 — (240, 426) at 240p and (480, 854) at 480p — and ``"16:9"`` is
portrait (426, 240). Every bucket of one resolution has about the same pixel count (240p: 102 240).
Widths and heights that are not multiples of 16 are rounded **up** in latent space (426 -> 432), so
the decoded frames are a few pixels larger than the bucket's nominal size, exactly as the reference.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from javisrt.engine.config import GenerationMode
from javisrt.engine.errors import ConfigError

# ---- constants of the released model (model-spec.md §6.1, §7) -------------------------------------
FPS = 16
SAMPLE_RATE = 16000
VAE_TEMPORAL_STRIDE = 4  # Wan VAE: frames = 1 + 4 (T - 1)
VAE_SPATIAL_STRIDE = 8
VIDEO_LATENT_CHANNELS = 16
AUDIO_LATENT_CHANNELS = 8
MEL_BINS = 64
MEL_FRAMES_PER_SECOND = 100  # hop 160 at 16 kHz
AUDIO_VAE_STRIDE = 4  # AudioLDM2 VAE: /4 in time and mel frequency
MEL_PAD_MULTIPLE = 32  # inference pads mel frames to a multiple of 32 (vae_scale_factor * 8)
AUDIO_SCALING_FACTOR = 0.4110932946205139
# Frame counts: 4n+1 between 2 s and 5 s at 16 fps (the range the model was trained on, §9).
MIN_FRAMES = 33
MAX_FRAMES = 81

# Wan VAE per-channel latent normalisation (§7.1): z_norm = (mu - mean) / std.
VIDEO_LATENT_MEAN = (
    -0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
    0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921,
)  # fmt: skip
VIDEO_LATENT_STD = (
    2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
    3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160,
)  # fmt: skip

# ---- resolution buckets -----------------------------------------------------------------------------
# Aspect ratio name -> the reference's H/W key.
ASPECT_RATIOS: dict[str, str] = {
    "3:8": "0.38", "9:21": "0.43", "12:25": "0.48", "1:2": "0.50", "9:17": "0.53", "27:50": "0.54",
    "9:16": "0.56", "5:8": "0.62", "2:3": "0.67", "3:4": "0.75", "1:1": "1.00", "4:3": "1.33",
    "3:2": "1.50", "16:9": "1.78", "17:9": "1.89", "2:1": "2.00", "50:27": "2.08",
}  # fmt: skip

# Resolution -> H/W key -> (H, W), copied from the reference tables.
BUCKETS: dict[str, dict[str, tuple[int, int]]] = {
    "144p": {
        "0.38": (117, 312), "0.43": (125, 291), "0.48": (133, 277), "0.50": (135, 270),
        "0.53": (139, 262), "0.54": (141, 260), "0.56": (144, 256), "0.62": (151, 241),
        "0.67": (156, 234), "0.75": (166, 221), "1.00": (192, 192), "1.33": (221, 165),
        "1.50": (235, 156), "1.78": (256, 144), "1.89": (263, 139), "2.00": (271, 135),
        "2.08": (277, 132),
    },
    "240p": {
        "0.38": (196, 522), "0.43": (210, 490), "0.48": (222, 462), "0.50": (226, 452),
        "0.53": (232, 438), "0.54": (236, 436), "0.56": (240, 426), "0.62": (252, 404),
        "0.67": (262, 393), "0.75": (276, 368), "1.00": (320, 320), "1.33": (370, 278),
        "1.50": (392, 262), "1.78": (426, 240), "1.89": (440, 232), "2.00": (452, 226),
        "2.08": (462, 222),
    },
    "360p": {
        "0.38": (294, 784), "0.43": (314, 732), "0.48": (332, 692), "0.50": (340, 680),
        "0.53": (350, 662), "0.54": (352, 652), "0.56": (360, 640), "0.62": (380, 608),
        "0.67": (392, 588), "0.75": (416, 554), "1.00": (480, 480), "1.33": (554, 416),
        "1.50": (588, 392), "1.78": (640, 360), "1.89": (660, 350), "2.00": (678, 340),
        "2.08": (692, 332),
    },
    "480p": {
        "0.38": (392, 1046), "0.43": (420, 980), "0.48": (444, 925), "0.50": (452, 904),
        "0.53": (466, 880), "0.54": (470, 870), "0.56": (480, 854), "0.62": (506, 810),
        "0.67": (522, 784), "0.75": (554, 738), "1.00": (640, 640), "1.33": (740, 555),
        "1.50": (784, 522), "1.78": (854, 480), "1.89": (880, 466), "2.00": (906, 454),
        "2.08": (924, 444),
    },
}  # fmt: skip


def bucket_size(resolution: str, aspect_ratio: str = "9:16") -> tuple[int, int]:
    """(H, W) of a named bucket, e.g. ("240p", "9:16") -> (240, 426)."""
    if resolution not in BUCKETS:
        raise ConfigError(f"unknown resolution {resolution!r}; known: {sorted(BUCKETS)}")
    key = ASPECT_RATIOS.get(aspect_ratio, aspect_ratio)  # also accept the raw key "0.56"
    if key not in BUCKETS[resolution]:
        raise ConfigError(f"unknown aspect ratio {aspect_ratio!r}; known: {list(ASPECT_RATIOS)}")
    return BUCKETS[resolution][key]


def check_num_frames(num_frames: int, min_frames: int = MIN_FRAMES, max_frames: int = MAX_FRAMES) -> None:
    """Frame counts must be 4n+1 (the Wan VAE's causal stride) and within the trained range."""
    if not isinstance(num_frames, int) or isinstance(num_frames, bool):
        raise ConfigError(f"num_frames must be an int, got {num_frames!r}")
    if (num_frames - 1) % VAE_TEMPORAL_STRIDE:
        raise ConfigError(f"num_frames must be 4n+1 (33, 49, 65, 81, ...), got {num_frames}")
    if not min_frames <= num_frames <= max_frames:
        raise ConfigError(
            f"num_frames {num_frames} is outside {min_frames}..{max_frames} "
            f"({min_frames / FPS:.2f}-{max_frames / FPS:.2f} s at {FPS} fps)"
        )


@dataclass(frozen=True)
class LatentGeometry:
    """Shapes of one request (batch excluded). ``video``/``audio`` are None when not generated."""

    num_frames: int
    height: int  # requested pixel size
    width: int
    video: tuple[int, int, int, int] | None  # (16, T, H8, W8)
    audio: tuple[int, int, int] | None  # (8, mel/4, 16)
    video_latent_frames: int  # T, also the TA-RoPE time axis in t2a
    mel_frames: int  # padded mel length the audio VAE decodes to
    num_samples: int  # waveform length after cropping: int(F / 16 * 16000)

    @property
    def seconds(self) -> float:
        return self.num_frames / FPS

    @property
    def frame_size(self) -> tuple[int, int]:
        """(H, W) of the decoded frames: the latent size times 8 (>= the requested size)."""
        if self.video is None:
            return (0, 0)
        return (self.video[2] * VAE_SPATIAL_STRIDE, self.video[3] * VAE_SPATIAL_STRIDE)


def video_latent_size(num_frames: int, height: int, width: int) -> tuple[int, int, int]:
    """(T, H8, W8) as ``WanVAE.get_latent_size``: T = (F-1)/4+1, H8 = ceil(H/8/2)*2 (round up to the patch)."""
    t = (num_frames - 1) // VAE_TEMPORAL_STRIDE + 1
    h8 = math.ceil(height / VAE_SPATIAL_STRIDE / 2) * 2
    w8 = math.ceil(width / VAE_SPATIAL_STRIDE / 2) * 2
    return t, h8, w8


def mel_frames(num_frames: int, fps: int = FPS) -> int:
    """Padded mel length: int(F/fps/0.01) rounded up to a multiple of 32 (AudioLDM2.prepare_latents)."""
    raw = int(num_frames / fps / 0.01)
    return math.ceil(raw / MEL_PAD_MULTIPLE) * MEL_PAD_MULTIPLE


def latent_geometry(
    num_frames: int,
    height: int,
    width: int,
    mode: GenerationMode | str = GenerationMode.T2AV,
    *,
    min_frames: int = MIN_FRAMES,
    max_frames: int = MAX_FRAMES,
) -> LatentGeometry:
    """Validated shapes for ``num_frames`` at ``height`` x ``width`` in ``mode``."""
    mode = GenerationMode(mode)
    check_num_frames(num_frames, min_frames, max_frames)
    if height <= 0 or width <= 0 or height % 2 or width % 2:
        raise ConfigError(f"height and width must be positive and even, got {height}x{width}")
    t, h8, w8 = video_latent_size(num_frames, height, width)
    mel = mel_frames(num_frames)
    video = (VIDEO_LATENT_CHANNELS, t, h8, w8) if mode is not GenerationMode.T2A else None
    audio = (
        (AUDIO_LATENT_CHANNELS, mel // AUDIO_VAE_STRIDE, MEL_BINS // AUDIO_VAE_STRIDE)
        if mode is not GenerationMode.T2V
        else None
    )
    num_samples = int(num_frames / FPS * SAMPLE_RATE)
    return LatentGeometry(num_frames, height, width, video, audio, t, mel, num_samples)


def draw_noise(
    geometry: LatentGeometry,
    seed: int,
    batch: int = 1,
    device: torch.device | str = "cpu",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """Initial noise as the reference draws it: one generator seeded with ``seed``, the video noise
    ``randn([B,16,T,H8,W8], bf16)`` first, then the audio noise ``randn([B,8,Tm4,16], bf16)``.

    Returned as fp32 (the bf16 values, exactly) for the fp32 sampling loop. Seeds reproduce the
    reference's noise on the same device type (CPU and CUDA generators differ). ``generator``: draw
    from this already seeded generator instead (``seed`` is then unused), for callers that keep drawing
    from it afterwards (JavisDiT v0.1 draws its prior noise next).
    """
    device = torch.device(device)
    gen = generator if generator is not None else torch.Generator(device=device).manual_seed(int(seed))
    video = audio = None
    if geometry.video is not None:
        video = torch.randn((batch, *geometry.video), generator=gen, dtype=torch.bfloat16, device=device).float()
    if geometry.audio is not None:
        audio = torch.randn((batch, *geometry.audio), generator=gen, dtype=torch.bfloat16, device=device).float()
    return video, audio
