"""``V01Pipeline``: JavisDiT v0.1 text -> sounding video, wiring the runtime modules in the reference's order
(``scripts/inference.py``; v01-spec.md §2, §7):

    t5_text.py          prompt + " aesthetic score: 6.5." -> clean_caption x2 -> T5 [1, 300, 4096] + mask
    v01_generation.py   seeded draws: video noise, audio noise, then the prior's eps (CPU generator)
    imagebind_text.py   the same processed string -> ImageBind text trunk [1, 77, 1024]  (jav only)
    engine/st_prior.py  -> sampled spatial / temporal prior (once, before the loop)      (jav only)
    sampling.sample     the C++ RFLOW loop, CFG 7, 30 steps, calling V01Denoiser on [cond; null]
    opensora_vae.py     Open-Sora 1.2 VAE: latents [4, T, H/8, W/8] -> frames            (jav only)
    decode.py           AudioLDM2 VAE + HiFi-GAN, cut to int(F / 24 * 16000) samples
    media.py            MP4: H.264 at 24 fps + AAC 16 kHz, atomic

There is no negative prompt: the unconditional branch is the DiT's learned null caption and null prior.
It owns no math; the result is :class:`javisrt.runtime.pipeline.GenerationResult` (at 24 fps).
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from javisrt.engine.config import GenerationMode
from javisrt.engine.errors import CheckpointError, ConfigError
from javisrt.engine.model import Numerics
from javisrt.engine.st_prior import STPriorEstimator
from javisrt.engine.v01_checkpoint import load_st_prior, load_v01_model
from javisrt.engine.v01_model import VASTDiT3
from javisrt.runtime import sampling
from javisrt.runtime.decode import AudioDecoder, to_uint8_frames
from javisrt.runtime.imagebind_text import ImageBindTextConfig, ImageBindTextEncoder
from javisrt.runtime.opensora_vae import OpenSoraVAE, TemporalVAEConfig, load_opensora_vae
from javisrt.runtime.pipeline import GenerationCancelled, GenerationResult, Progress
from javisrt.runtime.t5_text import AESTHETIC_SCORE, load_t5_encoder, v01_prompt
from javisrt.runtime.text import PromptCache, TextEncoder
from javisrt.runtime.v01_generation import (
    V01_FPS,
    V01_GUIDANCE,
    V01_SAMPLE_RATE,
    V01_SEED,
    V01_STEPS,
    V01Denoiser,
    draw_v01_noise,
    sample_prior,
    v01_latent_geometry,
    v01_sampler_config,
)

log = logging.getLogger(__name__)

# Open-Sora's NUM_FRAMES_MAP (opensora/datasets/aspect.py @ 3b6d136d): the names the official configs use
# for clip lengths (all multiples of 17; "4s" = 102 frames = 4.25 s at 24 fps).
NUM_FRAMES_MAP = {"1x": 51, "2x": 102, "4x": 204, "8x": 408, "16x": 816, "2s": 51, "4s": 102, "8s": 204, "16s": 408, "32s": 816}


def parse_num_frames(value: str | int) -> int:
    """``"4s"`` -> 102 (NUM_FRAMES_MAP), or a plain frame count, as Open-Sora's ``get_num_frames``
    (the geometry then checks it: >= 17, see ``v01_latent_geometry``)."""
    if isinstance(value, int):
        return value
    if value in NUM_FRAMES_MAP:
        return NUM_FRAMES_MAP[value]
    try:
        return int(value)
    except ValueError:
        raise ConfigError(f"unknown v0.1 frame count {value!r}; names: {sorted(NUM_FRAMES_MAP)}") from None


@dataclass(frozen=True)
class V01GenerationConfig:
    """One v0.1 request; the defaults are ``configs/javisdit-v0-1/inference/sample.py`` (240p 9:16, "4s")."""

    num_frames: int = 102
    height: int = 240
    width: int = 426
    steps: int = V01_STEPS
    guidance: float = V01_GUIDANCE
    seed: int = V01_SEED
    aesthetic_score: float | None = AESTHETIC_SCORE
    mode: GenerationMode | None = None  # None: what the checkpoint does (t2av for -jav, t2a for -audio)

    def __post_init__(self) -> None:
        if self.mode is not None:
            try:
                object.__setattr__(self, "mode", GenerationMode(self.mode))
            except ValueError:
                raise ConfigError(f"mode must be one of {[m.value for m in GenerationMode]}, got {self.mode!r}") from None
            if self.mode is GenerationMode.T2V:
                raise ConfigError("JavisDiT v0.1 has no video-only model: the modes are t2av (-jav) and t2a (-audio)")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an int >= 1, got {self.steps!r}")
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an int in [0, 2^63), got {self.seed!r}")
        v01_latent_geometry(self.num_frames, self.height, self.width)  # frame count and size rules


class V01Pipeline:
    """JavisDiT v0.1 t2av (``-jav`` checkpoints) or t2a (``-audio``). Build with :meth:`from_pretrained`
    or :func:`javisrt.runtime.v01_demo.build_tiny_v01_pipeline`; call with a prompt."""

    def __init__(
        self,
        model: VASTDiT3,
        text_encoder: TextEncoder,
        audio_decoder: AudioDecoder,
        *,
        prior: STPriorEstimator | None = None,
        imagebind: ImageBindTextEncoder | None = None,
        video_vae: OpenSoraVAE | None = None,
        device: torch.device | str = "cpu",
        name: str = "",
    ) -> None:
        cfg = model.cfg
        if text_encoder.dim != cfg.caption_channels or text_encoder.text_len != cfg.model_max_length:
            raise ConfigError(
                f"the text encoder gives {text_encoder.text_len} x {text_encoder.dim}; the DiT expects "
                f"{cfg.model_max_length} x {cfg.caption_channels}"
            )
        if cfg.has_video:
            if prior is None or imagebind is None or video_vae is None:
                raise ConfigError("a jav (video + audio) checkpoint needs the prior, the ImageBind text tower and the video VAE")
            for problem in (prior_misfit(model, prior), imagebind_misfit(prior, imagebind)):
                if problem:
                    raise ConfigError(problem)
        elif prior is not None or video_vae is not None:
            raise ConfigError("the audio-only checkpoint takes no prior and no video VAE")
        self.model, self.text_encoder, self.audio_decoder = model, text_encoder, audio_decoder
        self.prior, self.imagebind, self.video_vae = prior, imagebind, video_vae
        self.device = torch.device(device)
        self.name = name or cfg.name

    @property
    def has_video(self) -> bool:
        return self.model.cfg.has_video

    @property
    def mode(self) -> GenerationMode:
        """What the checkpoint generates: t2av (``-jav``) or t2a (``-audio``)."""
        return GenerationMode.T2AV if self.has_video else GenerationMode.T2A

    def check(self, config: V01GenerationConfig) -> None:
        """Reject a request this pipeline cannot run (a mode other than the checkpoint's) before any work."""
        if config.mode is not None and config.mode is not self.mode:
            kind = "video+audio (t2av)" if self.has_video else "audio-only (t2a)"
            raise ConfigError(f"mode {config.mode.value} does not fit the {kind} JavisDiT v0.1 checkpoint {self.name!r}")

    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike[str],
        *,
        t5_dir: str | os.PathLike[str],
        audioldm2_dir: str | os.PathLike[str],
        prior: str | os.PathLike[str] | None = None,
        imagebind: str | os.PathLike[str] | None = None,
        vae_dir: str | os.PathLike[str] | None = None,
        numerics: Numerics | str = Numerics.OFFICIAL,
        trained_gates: bool = False,
        device: torch.device | str = "cpu",
        text_dtype: torch.dtype | None = None,
        decoder_dtype: torch.dtype | None = None,
        text_cache: PromptCache | None = None,
        imagebind_config: ImageBindTextConfig | str = "imagebind-huge",
        vae_spatial_config: dict[str, Any] | None = None,
        vae_temporal_config: TemporalVAEConfig | str = "opensora-v1.2",
    ) -> V01Pipeline:
        """Local directories only: the DiT (``JavisDiT-v0.1-jav`` / ``-audio``), ``t5_dir``
        (``t5-v1_1-xxl``), ``audioldm2_dir`` (``vae/`` + ``vocoder/``); for a jav checkpoint also
        ``prior`` (``JavisDiT-v0.1-prior``), ``imagebind`` (``imagebind_huge.pth`` or its folder) and
        ``vae_dir`` (``OpenSora-VAE-v1.2``).

        Component dtypes follow ``numerics`` unless given: ``official`` runs T5, ImageBind and both VAEs
        in bf16, as the reference's ``--dtype bf16`` inference does (every module ``.to(dtype)``);
        ``fp32`` runs everything in fp32. The ``*_config`` arguments describe smaller test checkpoints
        (the released files do not carry their architecture)."""
        bf16 = Numerics(numerics) is Numerics.OFFICIAL
        text_dtype = text_dtype or (torch.bfloat16 if bf16 else torch.float32)
        decoder_dtype = decoder_dtype or (torch.bfloat16 if bf16 else torch.float32)
        check_dirs(checkpoint=checkpoint, T5_directory=t5_dir, AudioLDM2_directory=audioldm2_dir, prior=prior,
                   ImageBind_checkpoint=imagebind, video_VAE_directory=vae_dir)
        model = load_v01_model(checkpoint, numerics=numerics, device=device, trained_gates=trained_gates)
        missing = [flag for flag, value in (("prior", prior), ("imagebind", imagebind), ("vae_dir", vae_dir)) if value is None]
        if model.cfg.has_video and missing:
            raise CheckpointError(f"{checkpoint} is a video+audio (jav) checkpoint: also pass {', '.join(missing)}")
        extra = [flag for flag, value in (("prior", prior), ("imagebind", imagebind), ("vae_dir", vae_dir)) if value is not None]
        if not model.cfg.has_video and extra:
            raise CheckpointError(f"{checkpoint} is an audio-only checkpoint: it takes no {', '.join(extra)}")
        estimator = None
        if model.cfg.has_video:  # the small prior first: a misfit fails before the big encoders load
            assert prior is not None
            estimator = load_st_prior(prior, numerics=numerics, device=device)
            if problem := prior_misfit(model, estimator):
                raise CheckpointError(f"the prior {prior} does not fit the DiT {checkpoint}: {problem}")
        text = load_t5_encoder(t5_dir, dtype=text_dtype, device=device, text_len=model.cfg.model_max_length, cache=text_cache)
        audio = AudioDecoder.from_pretrained(audioldm2_dir, device=device, dtype=decoder_dtype)
        if estimator is None:
            return cls(model, text, audio, device=device, name=str(checkpoint))
        assert imagebind is not None and vae_dir is not None
        ib = ImageBindTextEncoder.from_pretrained(imagebind, config=imagebind_config, dtype=text_dtype, device=device)
        if problem := imagebind_misfit(estimator, ib):
            raise CheckpointError(f"the ImageBind text tower {imagebind} does not fit the prior {prior}: {problem}")
        vae = load_opensora_vae(vae_dir, dtype=decoder_dtype, device=device, spatial_config=vae_spatial_config,
                                temporal_cfg=vae_temporal_config)
        return cls(model, text, audio, prior=estimator, imagebind=ib, video_vae=vae, device=device, name=str(checkpoint))

    # ---- generation ------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str,
        config: V01GenerationConfig | None = None,
        *,
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
    ) -> GenerationResult:
        config = config or V01GenerationConfig()
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("the prompt is empty")
        self.check(config)
        geo = v01_latent_geometry(config.num_frames, config.height, config.width)
        report = progress or (lambda stage, done, total: None)
        timings: dict[str, float] = {}
        audio_only = not self.has_video

        # 1. text: T5 on the suffixed, cleaned prompt (the text encoder's preprocess does both)
        t0 = time.perf_counter()
        report("text", 0, 1)
        emb = self.text_encoder.encode(prompt)
        report("text", 1, 1)
        timings["text_s"] = time.perf_counter() - t0

        # 2. seeded draws in the reference's order: video, audio, then the prior's eps
        noise = draw_v01_noise(geo, config.seed, batch=1, device=self.device, audio_only=audio_only)

        # 3. the prior from the same processed string through ImageBind (jav only)
        t0 = time.perf_counter()
        prior = None
        if not audio_only:
            assert self.imagebind is not None and self.prior is not None
            hidden = self.imagebind.encode(v01_prompt(prompt, config.aesthetic_score))
            prior = sample_prior(self.prior, hidden.to(self.device), noise.prior_generator)
        timings["prior_s"] = time.perf_counter() - t0

        # 4. the RFLOW loop with CFG against the null caption / null prior
        h, w = config.height, config.width
        denoiser = V01Denoiser(self.model, emb.context.to(self.device), emb.mask.to(self.device), prior,
                               fps=V01_FPS, height=h, width=w)
        sampler_cfg = v01_sampler_config(h, w, config.num_frames, config.steps, config.guidance, audio_only)
        latents = [x.float().cpu().numpy() for x in (noise.video, noise.audio) if x is not None]

        def on_step(done: int, total: int, t: float, seconds: float) -> None:
            report("denoise", done, total)

        t0 = time.perf_counter()
        report("denoise", 0, config.steps)
        result = sampling.sample(latents, denoiser, sampler_cfg, on_step, cancel)
        timings["denoise_s"] = time.perf_counter() - t0
        if result.cancelled:
            raise GenerationCancelled(f"cancelled after {result.steps_done} of {config.steps} steps")
        final = [torch.from_numpy(np.array(x)) for x in result.latents]

        # 5. decode: Open-Sora VAE (the reference hands it bf16-rounded latents in its bf16 run; we pass
        #    the loop's fp32 values in the decoder's dtype), AudioLDM2 VAE + vocoder
        t0 = time.perf_counter()
        report("decode", 0, len(final))
        frames = None
        if not audio_only:
            assert self.video_vae is not None
            dtype = next(self.video_vae.parameters()).dtype
            with torch.no_grad():
                pixels = self.video_vae.decode(final[0].to(self.device, dtype), config.num_frames)
            frames = to_uint8_frames(pixels)[0]
            report("decode", 1, len(final))
        timings["video_decode_s"] = time.perf_counter() - t0
        waveform = self.audio_decoder.decode(final[-1], geo.num_samples)[0]
        report("decode", len(final), len(final))
        timings["decode_s"] = time.perf_counter() - t0
        timings["audio_decode_s"] = timings["decode_s"] - timings["video_decode_s"]
        log.info("JavisDiT v0.1 %s: %d steps (%s loop) in %.2f s, decode %.2f s", "t2a" if audio_only else "t2av",
                 result.steps_done, sampling.backend(), timings["denoise_s"], timings["decode_s"])
        return GenerationResult(
            frames=frames, waveform=waveform, prompt=prompt, config=config,  # type: ignore[arg-type]
            fps=V01_FPS, sample_rate=V01_SAMPLE_RATE, sampler=sampling.backend(), solver=sampler_cfg.solver.value,
            timings=timings, step_times_s=tuple(result.step_times_s),
        )

    generate = __call__


def prior_misfit(model: VASTDiT3, prior: STPriorEstimator) -> str | None:
    """Why the prior's output does not fit the DiT's prior cross-attention (tokens, channels), or None."""
    cfg, p = model.cfg, prior.cfg
    got = (p.spatial_token_num, p.temporal_token_num, p.out_dim)
    if got != (cfg.spatial_prior_len, cfg.temporal_prior_len, cfg.st_prior_channel):
        return (f"the prior gives {p.spatial_token_num}+{p.temporal_token_num} tokens of {p.out_dim}; the DiT takes "
                f"{cfg.spatial_prior_len}+{cfg.temporal_prior_len} of {cfg.st_prior_channel}")  # fmt: skip
    return None


def imagebind_misfit(prior: STPriorEstimator, imagebind: ImageBindTextEncoder) -> str | None:
    """Why the ImageBind text width does not fit the prior's input, or None (it reads any token count)."""
    width = imagebind.trunk.cfg.width
    return None if width == prior.cfg.text_dim else f"ImageBind gives width {width}; the prior reads text_dim {prior.cfg.text_dim}"


def check_dirs(**paths: str | os.PathLike[str] | None) -> None:
    """Typed errors for component paths that do not exist (before anything heavy is loaded)."""
    for what, path in paths.items():
        if path is not None and not Path(path).exists():
            raise CheckpointError(f"{what.replace('_', ' ')} not found: {path}")
