"""JavisDiT v0.1 generation defaults: latent geometry, seeded noise, sampler settings and the CFG batch
(v01-spec.md §2, §7, §8.5), on top of the project's one sampling loop (``runtime/sampling.py`` and
its C++ twin ``javisrt._sampler``).

Sampler. v0.1 samples with Open-Sora's RFLOW: Euler, 30 steps, ``t_i = (1 - i/30)·1000`` shifted by
``timestep_transform`` with ``ratio = sqrt(h·w/512²)·sqrt(F // 17 · 5)``, computed from bf16
height/width/num_frames tensors. That is exactly the schedule JavisDiT++ uses
(``sampling.rflow_shift``/``rflow_timesteps``: the frame factor ``(F // 17)·5`` is already in it), so
v0.1 only picks its defaults: :func:`v01_sampler_config` (240x426, 102 frames -> ratio 3.421875).
CFG 7.0 for both modalities, ``v = v_u + 7 (v_c - v_u)``, ``z <- z + v·dt``: the loop's own math.

The CFG batch (:class:`V01Denoiser`), as ``scripts/inference.py`` + ``RFLOW.sample`` build it:
  * latents ``[z; z]``, timesteps ``[t; t]``;
  * text ``y = [y_cond; y_null]`` with ``y_null = y_embedder.y_embedding`` (the learned null caption,
    300 tokens), and the **cond prompt's mask only**: the model repeats it over the batch, so the null
    caption keeps the cond prompt's valid positions (quirk kept: the reference does it);
  * priors ``[prior; null_prior]`` with ``null_prior = st_prior_embedder.y_embedding`` split 32 + 32;
  * the model's ``pred_sigma`` output is cut to the first half of the channels.
The reference also passes all-True ``x_mask``/``ax_mask`` in T2AV; with every frame True the t0
branch is selected nowhere, so leaving the masks out gives bit-identical outputs (tested).

Seeds (:func:`draw_v01_noise`): ``set_random_seed(seed)`` then ``randn`` video (bf16), audio (bf16) on the
model's device, then the prior's ``eps = randn(mean.shape)`` on the CPU generator; on a CPU run this is
one generator, on CUDA the CPU generator is fresh at the prior draw. Each step the reference draws a
discarded ``randn_like`` per modality (:func:`advance_step_draws` replays them when a seeded run
continues with another batch).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.st_prior import STPrior, STPriorEstimator, split_prior
from javisrt.engine.v01_model import VASTDiT3
from javisrt.runtime.engine import as_torch
from javisrt.engine.latents import ASPECT_RATIOS, BUCKETS, LatentGeometry, draw_noise, mel_frames
from javisrt.runtime.opensora_vae import latent_frames
from javisrt.runtime.sampling import SamplerConfig

V01_STEPS = 30
V01_GUIDANCE = 7.0
V01_FPS = 24
V01_SEED = 42
V01_SAMPLE_RATE = 16000
MICRO_FRAMES = 17  # OpenSoraVAE_V1_2 micro_frame_size: 17 frames -> 5 latent frames
LATENT_FRAMES_PER_MICRO = 5
VIDEO_LATENT_CHANNELS = 4
AUDIO_LATENT_CHANNELS = 8
AUDIO_LATENT_BINS = 16  # 64 mel bins / 4


# Open-Sora 1.2's resolution buckets, (H, W) per H/W key: hpcaitech/Open-Sora
# opensora/datasets/aspect.py @ 3b6d136d0a7c0941c35ff5edf26cee5c520eba04 (ASPECT_RATIO_144P .. _720P,
# ASPECT_RATIO_MAP, get_image_size). 144p..480p are engine/latents.py's BUCKETS (the same table, which
# JavisDiT++ also uses); v0.1's sample.py may also name 720p, added here.
V01_BUCKETS: dict[str, dict[str, tuple[int, int]]] = {
    **BUCKETS,
    "720p": {
        "0.38": (588, 1568), "0.43": (628, 1466), "0.48": (666, 1388), "0.50": (678, 1356),
        "0.53": (698, 1318), "0.54": (706, 1306), "0.56": (720, 1280), "0.62": (758, 1212),
        "0.67": (784, 1176), "0.75": (832, 1110), "1.00": (960, 960), "1.33": (1108, 832),
        "1.50": (1176, 784), "1.78": (1280, 720), "1.89": (1320, 698), "2.00": (1358, 680),
        "2.08": (1386, 666),
    },
}  # fmt: skip
V01_RESOLUTIONS = tuple(V01_BUCKETS)  # 144p, 240p, 360p, 480p, 720p


def v01_image_size(resolution: str = "240p", aspect_ratio: str = "9:16") -> tuple[int, int]:
    """(H, W) of a bucket as Open-Sora's ``get_image_size(resolution, ar_ratio)`` looks it up: the ratio is
    an ``ASPECT_RATIO_MAP`` name (H:W, "9:16" = landscape, H/W 0.56) or a raw key ("0.56").
    ("240p", "9:16") -> (240, 426); ("720p", "1:1") -> (960, 960)."""
    if resolution not in V01_BUCKETS:
        raise ConfigError(f"unknown v0.1 resolution {resolution!r}; known: {list(V01_RESOLUTIONS)}")
    key = ASPECT_RATIOS.get(aspect_ratio, aspect_ratio)
    if key not in V01_BUCKETS[resolution]:
        raise ConfigError(f"aspect ratio {aspect_ratio!r} not found for resolution {resolution}; known: {list(ASPECT_RATIOS)}")
    return V01_BUCKETS[resolution][key]


def v01_latent_geometry(num_frames: int = 102, height: int = 240, width: int = 426) -> LatentGeometry:
    """Shapes of a v0.1 request (v01-spec §2): 102 frames at 240x426 -> video [4, 30, 30, 53], audio [8, 112, 16].

    Video: the Open-Sora VAE v1.2's ``get_latent_size`` (:func:`~javisrt.runtime.opensora_vae.latent_frames`):
    17 frames -> 5 latent frames per micro-frame, a remainder ``r`` -> ``ceil(r / 4)`` more (60 -> 15 + 3);
    H/8 and W/8 floored. Audio: ``F/24`` s, ``int(s/0.01)`` mel frames padded to a multiple of 32, /4;
    the waveform is cut to ``int(F/24 · 16000)`` samples and the MP4 holds F frames at 24 fps.

    Frame counts below 17 are refused (ConfigError): the reference's ``timestep_transform`` uses
    ``F // 17 · 5`` latent frames for the shift, which is 0 for 2..16 frames (every timestep becomes 0,
    nothing is denoised), and 1 frame is its image mode, which no v0.1 checkpoint was trained for.
    """
    if isinstance(num_frames, bool) or not isinstance(num_frames, int):
        raise ConfigError(f"num_frames must be an int, got {num_frames!r}")
    if num_frames < MICRO_FRAMES:
        raise ConfigError(
            f"v0.1 frame counts must be >= {MICRO_FRAMES} (one micro-frame), got {num_frames}: the reference's shift "
            f"uses F // {MICRO_FRAMES} * {LATENT_FRAMES_PER_MICRO} latent frames, 0 below {MICRO_FRAMES}"
        )
    if height < 16 or width < 16:
        raise ConfigError(f"height and width must be >= 16, got {height}x{width}")
    t = latent_frames(num_frames, MICRO_FRAMES)
    mel = mel_frames(num_frames, V01_FPS)
    video = (VIDEO_LATENT_CHANNELS, t, height // 8, width // 8)
    audio = (AUDIO_LATENT_CHANNELS, mel // 4, AUDIO_LATENT_BINS)
    return LatentGeometry(num_frames, height, width, video, audio, t, mel, int(num_frames / V01_FPS * V01_SAMPLE_RATE))


def v01_sampler_config(
    height: int = 240, width: int = 426, num_frames: int = 102, steps: int = V01_STEPS,
    guidance: float = V01_GUIDANCE, audio_only: bool = False,
) -> SamplerConfig:
    """RFLOW Euler, 30 steps, CFG 7 on every modality, shift = the bf16-computed ratio (3.421875 by default)."""
    scales = (guidance,) if audio_only else (guidance, guidance)
    return SamplerConfig.rflow(height, width, num_frames, steps=steps, guidance=scales)


@dataclass(frozen=True)
class V01Noise:
    video: torch.Tensor | None  # [B, 4, T, H, W] bf16 values as fp32
    audio: torch.Tensor  # [B, 8, Ta, 16]
    prior_generator: torch.Generator  # the CPU generator the prior's eps is drawn from next


def draw_v01_noise(
    geometry: LatentGeometry, seed: int = V01_SEED, batch: int = 1, device: torch.device | str = "cpu",
    audio_only: bool = False,
) -> V01Noise:
    """The reference's draws after ``set_random_seed(seed)``: video, then audio, on ``device`` (bf16);
    the returned CPU generator then gives the prior's eps (pass it to ``STPriorEstimator.forward``)."""
    device = torch.device(device)
    gen = torch.Generator(device=device).manual_seed(int(seed))
    if audio_only:
        geometry = dataclasses.replace(geometry, video=None)
    video, audio = draw_noise(geometry, seed, batch, device, generator=gen)
    assert audio is not None
    cpu_gen = gen if device.type == "cpu" else torch.Generator().manual_seed(int(seed))
    return V01Noise(video, audio, cpu_gen)


def advance_step_draws(generator: torch.Generator, latents: Sequence[torch.Tensor], steps: int = V01_STEPS) -> None:
    """Replay the per-step ``randn_like(z)`` of ``RFLOW.sample``'s mask branch (each modality, each
    step; bf16 at step 0, fp32 after, as z is promoted by the first update). The values are discarded by
    the reference too; only the generator state matters for what is drawn next."""
    for i in range(steps):
        for z in latents:
            torch.randn(z.shape, generator=generator, dtype=torch.bfloat16 if i == 0 else torch.float32,
                        device=z.device)


def null_prior(model: VASTDiT3, batch: int) -> STPrior:
    """CFG's unconditional prior: ``st_prior_embedder.y_embedding`` [64, 128] repeated, split 32 + 32."""
    table = model.st_prior_embedder.y_embedding
    return split_prior(table[None].repeat(batch, 1, 1), model.cfg.spatial_prior_len)


def sample_prior(
    estimator: STPriorEstimator, text_hidden: torch.Tensor, generator: torch.Generator
) -> STPrior:
    """The conditional prior, sampled once before the loop (eps from ``generator``, see :class:`V01Noise`)."""
    with torch.no_grad():
        return estimator(text_hidden, generator)


class V01Denoiser:
    """The sampler's :data:`~javisrt.runtime.sampling.Denoiser` for a v0.1 model: builds the CFG batch
    (module docstring) and returns the velocities' first ``C`` channels as float32 arrays.

    ``y`` [B, 1 | -, L, 4096] and ``mask`` [B, L] are the cond prompt's T5 output; ``prior`` the sampled
    cond prior (jav only); ``fps``/``height``/``width`` the clip's frame rate and pixel size.
    """

    def __init__(
        self, model: VASTDiT3, y: torch.Tensor, mask: torch.Tensor, prior: STPrior | None,
        fps: float = V01_FPS, height: float = 240, width: float = 426, frame_masks: bool = False,
    ) -> None:
        self.model = model
        cfg = model.cfg
        if y.ndim == 4:
            y = y.squeeze(1)
        b = y.shape[0]
        if mask.shape != y.shape[:2]:
            raise ShapeError(f"mask must be {tuple(y.shape[:2])}, got {tuple(mask.shape)}")
        null_y = model.y_embedder.y_embedding
        if null_y.shape[0] != y.shape[1]:
            raise ShapeError(f"y has {y.shape[1]} tokens; the null caption has {null_y.shape[0]} (model_max_length)")
        self.y = torch.cat([y.to(null_y.dtype), null_y[None].repeat(b, 1, 1)])  # [2B, L, 4096]
        self.mask = mask  # cond mask only: the model repeats it for the null half
        self.prior: STPrior | None = None
        if cfg.has_video:
            if prior is None:
                raise ShapeError("the jav model needs the sampled prior")
            null = null_prior(model, b)
            self.prior = STPrior(torch.cat([prior.spatial.to(null.spatial.dtype), null.spatial]),
                                 torch.cat([prior.temporal.to(null.temporal.dtype), null.temporal]))
        elif prior is not None:
            raise ConfigError("the audio-only model takes no prior")
        self.fps, self.height, self.width = fps, height, width
        self.frame_masks = frame_masks

    def __call__(self, inputs: list[np.ndarray], timesteps: np.ndarray) -> list[np.ndarray]:
        cfg = self.model.cfg
        device = self.y.device
        tensors = [as_torch(x).to(device) for x in inputs]
        if cfg.has_video:
            video, audio = tensors
        else:
            (audio,), video = tensors, None
        t = as_torch(timesteps).to(device)
        x_mask = ax_mask = None
        if self.frame_masks:  # the reference's all-True T2AV masks (t0 computed, selected nowhere)
            if video is not None:
                x_mask = torch.ones(video.shape[0], video.shape[2], dtype=torch.bool, device=device)
            ax_mask = torch.ones(audio.shape[0], audio.shape[2], dtype=torch.bool, device=device)
        with torch.no_grad():
            out = self.model(
                video, audio, t, self.y, self.mask, self.fps, self.height, self.width,
                self.prior.spatial if self.prior else None, self.prior.temporal if self.prior else None,
                x_mask=x_mask, ax_mask=ax_mask,
            )
        results: list[Any] = []
        if cfg.has_video:
            assert out.video is not None
            results.append(out.video[:, : cfg.in_channels])
        results.append(out.audio[:, : cfg.audio_in_channels])
        return [np.ascontiguousarray(r.cpu().numpy(), dtype=np.float32) for r in results]
