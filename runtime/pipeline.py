"""``JavisPipeline``: prompt -> frames + waveform -> MP4. It only wires the runtime modules together:

    text.py             TextEncoder      prompt + negative prompt -> [2, text_len, text_dim] (cached)
    engine/latents.py   latent_geometry  shapes; draw_noise: seeded bf16 noise, video then audio
    denoise_session.py  DenoiseSession   the sampling loop (javisrt._sampler) over an Engine
                                         (backends/: torch | onnxruntime | tensorrt) running the DiT
                                         on the [cond; uncond] batch: on CUDA the device loop
                                         (sample_cuda replaying one CUDA graph per bucket), on the
                                         CPU the host loop (sample)
    decode.py           Video/AudioDecoder  Wan VAE; AudioLDM2 VAE + HiFi-GAN
    media.py            write_mp4        H.264 16 fps + AAC 16 kHz, atomic

A request is a frozen :class:`GenerationConfig`; the CLI builds it from flags, library code never
reads argv or the environment.
"""

from __future__ import annotations

import logging
import math
import os
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch

from javisrt.engine.config import GenerationMode, JavisConfig
from javisrt.engine.errors import CheckpointError, ConfigError, JavisError
from javisrt.engine.model import Numerics
from javisrt.export.contract import AUDIO, VIDEO
from javisrt.runtime import sampling
from javisrt.runtime.backends import create_engine
from javisrt.runtime.decode import AudioDecoder, VideoDecoder
from javisrt.runtime.denoise_session import DenoiseLoop, DenoiseSession
from javisrt.runtime.engine import Engine
from javisrt.engine.latents import (
    FPS,
    MAX_FRAMES,
    MIN_FRAMES,
    SAMPLE_RATE,
    LatentGeometry,
    bucket_size,
    check_num_frames,
    draw_noise,
    latent_geometry,
)
from javisrt.runtime.media import write_mp4
from javisrt.runtime.text import NEGATIVE_PROMPT, PromptCache, TextEncoder

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]
"""``progress(stage, done, total)``; stages: "text", "denoise" (per step), "decode"."""


class GenerationCancelled(JavisError):
    """The ``cancel`` callback stopped the sampling loop."""


@dataclass(frozen=True)
class GenerationConfig:
    """One request. Size: a bucket (``resolution`` + ``aspect_ratio``, latents.py) unless both
    ``height`` and ``width`` are given. ``guidance``: one CFG scale for both modalities or a
    (video, audio) pair (released: 5.0 for both). Defaults are the released sampler (§6.1).
    ``solver``: ``"euler"`` (the released JavisDiT++ rflow sampler, shift from the bucket) or
    ``"unipc"`` (Wan2.1 T2V's flow UniPC, shift 5.0); None takes the model's own (:func:`default_solver`)."""

    num_frames: int = 65
    resolution: str = "240p"
    aspect_ratio: str = "9:16"
    height: int | None = None
    width: int | None = None
    steps: int = 50
    guidance: float | tuple[float, float] = 5.0
    seed: int = 42
    mode: GenerationMode | str = GenerationMode.T2AV
    negative_prompt: str = NEGATIVE_PROMPT
    solver: sampling.Solver | str | None = None
    min_frames: int = MIN_FRAMES
    max_frames: int = MAX_FRAMES

    def __post_init__(self) -> None:
        set_ = object.__setattr__
        try:
            set_(self, "mode", GenerationMode(self.mode))
        except ValueError:
            raise ConfigError(f"unknown mode {self.mode!r}; known: {[m.value for m in GenerationMode]}") from None
        check_num_frames(self.num_frames, self.min_frames, self.max_frames)
        if (self.height is None) != (self.width is None):
            raise ConfigError("give both height and width, or neither (then resolution + aspect_ratio pick a bucket)")
        if self.height is None:
            bucket_size(self.resolution, self.aspect_ratio)  # validates both names
        elif not all(isinstance(v, int) and v > 0 and v % 2 == 0 for v in (self.height, self.width)):
            raise ConfigError(f"height and width must be positive even ints, got {self.height}x{self.width}")
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps < 1:
            raise ConfigError(f"steps must be an int >= 1, got {self.steps!r}")
        g = self.guidance
        pair = (float(g), float(g)) if isinstance(g, (int, float)) else tuple(float(x) for x in g)
        if len(pair) != 2 or not all(math.isfinite(x) for x in pair):
            raise ConfigError(f"guidance must be a finite scale or a (video, audio) pair, got {g!r}")
        set_(self, "guidance", pair)
        if isinstance(self.seed, bool) or not isinstance(self.seed, int) or not 0 <= self.seed < 2**63:
            raise ConfigError(f"seed must be an int in [0, 2^63), got {self.seed!r}")
        if not isinstance(self.negative_prompt, str):
            raise ConfigError("negative_prompt must be a string")
        if self.solver is not None:
            try:
                set_(self, "solver", sampling.Solver(self.solver))
            except ValueError:
                known = [s.value for s in sampling.Solver]
                raise ConfigError(f"unknown solver {self.solver!r}; known: {known}") from None

    @property
    def size(self) -> tuple[int, int]:
        """Requested (H, W) in pixels (the decoded frames are rounded up to a multiple of 16)."""
        if self.height is not None and self.width is not None:
            return self.height, self.width
        return bucket_size(self.resolution, self.aspect_ratio)

    @property
    def video_guidance(self) -> float:
        return self.guidance[0]  # type: ignore[index]

    @property
    def audio_guidance(self) -> float:
        return self.guidance[1]  # type: ignore[index]

    def geometry(self) -> LatentGeometry:
        h, w = self.size
        return latent_geometry(
            self.num_frames, h, w, self.mode, min_frames=self.min_frames, max_frames=self.max_frames
        )

    def sampler_config(self, cfg: JavisConfig, guidance: tuple[float, ...]) -> sampling.SamplerConfig:
        """The sampling loop's config for this request on the network ``cfg`` (``guidance``: one scale
        per generated modality, video first)."""
        solver = default_solver(cfg) if self.solver is None else sampling.Solver(self.solver)
        if solver is sampling.Solver.UNIPC:
            return sampling.SamplerConfig.wan_unipc(self.steps, guidance=guidance)
        h, w = self.size
        return sampling.SamplerConfig.rflow(h, w, self.num_frames, self.steps, guidance)


def default_cuda_graphs(backend: str, device: torch.device | str) -> bool:
    """Whether an engine is built with CUDA-graph capture by default: on a CUDA device for the engines
    that can capture (torch, tensorrt); the device loop then replays one graph per shape bucket."""
    return torch.device(device).type == "cuda" and backend in ("torch", "tensorrt")


def default_solver(cfg: JavisConfig) -> sampling.Solver:
    """The sampler each released model ships with: the rflow Euler loop for JavisDiT++ (model-spec
    §6.1), flow UniPC for the Wan2.1 T2V network (§6.2)."""
    return sampling.Solver.UNIPC if cfg.model_type is GenerationMode.T2V else sampling.Solver.EULER


@dataclass
class GenerationResult:
    """``frames`` uint8 [F, H, W, 3] (None in t2a), ``waveform`` float32 [N] at 16 kHz (None in t2v)."""

    frames: np.ndarray | None
    waveform: np.ndarray | None
    prompt: str
    config: GenerationConfig
    fps: int = FPS
    sample_rate: int = SAMPLE_RATE
    sampler: str = ""  # "cuda" (device loop), "cpp" (host C++ loop) or "python" (reference loop)
    solver: str = ""  # "euler" or "unipc"
    timings: dict[str, float] = field(default_factory=dict)  # text_s, denoise_s, video_/audio_decode_s, decode_s
    step_times_s: tuple[float, ...] = ()  # wall time of each denoising step (the sampler's own timing)

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write an MP4 (H.264 + AAC; one stream in t2v/t2a) atomically; returns the path."""
        return write_mp4(path, self.frames, self.waveform, fps=self.fps, sample_rate=self.sample_rate)


class JavisPipeline:
    """Text -> sounding video. Build with :meth:`from_pretrained` (local weights) or
    :func:`javisrt.runtime.demo.build_tiny_pipeline` (random tiny weights); call with a prompt.

    ``engine``: the DiT executor (:func:`~javisrt.runtime.backends.create_engine`); the network config
    comes from its contract. A torch engine serves every mode of its network; a compiled engine only
    the mode its graph was exported for (other modes are refused by :meth:`check`). ``loop``: the
    sampling loop (:class:`~javisrt.runtime.denoise_session.DenoiseLoop`; ``auto``: the device loop on
    a CUDA engine, the host loop elsewhere).
    """

    def __init__(
        self,
        engine: Engine,
        text_encoder: TextEncoder,
        video_decoder: VideoDecoder | None,
        audio_decoder: AudioDecoder | None,
        *,
        device: torch.device | str = "cpu",
        name: str = "",
        loop: DenoiseLoop | str = DenoiseLoop.AUTO,
    ) -> None:
        self.cfg: JavisConfig = engine.contract.config
        if text_encoder.dim != self.cfg.text_dim:
            raise ConfigError(
                f"text encoder width {text_encoder.dim} != the DiT's text_dim {self.cfg.text_dim} ({self.cfg.name})"
            )
        if text_encoder.text_len > self.cfg.text_len:
            raise ConfigError(f"text encoder pads to {text_encoder.text_len} > the DiT's text_len {self.cfg.text_len}")
        self.engine = engine
        self.text_encoder = text_encoder
        self.video_decoder = video_decoder
        self.audio_decoder = audio_decoder
        self.device = torch.device(device)
        self.name = name or self.cfg.name
        try:
            self.loop = DenoiseLoop(loop)
        except ValueError:
            raise ConfigError(f"unknown sampling loop {loop!r}; choose one of {[m.value for m in DenoiseLoop]}") from None
        self._mode_engines: dict[GenerationMode, Engine] = {engine.contract.mode: engine}

    # ---- construction ------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        checkpoint: str | os.PathLike[str] | None,
        wan_dir: str | os.PathLike[str],
        audioldm2_dir: str | os.PathLike[str] | None = None,
        *,
        config: JavisConfig | str | None = None,
        numerics: Numerics | str = Numerics.OFFICIAL,
        device: torch.device | str = "cpu",
        decoder_dtype: torch.dtype = torch.float32,
        text_dtype: torch.dtype = torch.bfloat16,
        backend: str = "torch",
        engine_file: str | os.PathLike[str] | None = None,
        ops: str = "torch",
        fp8_scales: str | os.PathLike[str] | None = None,
        fp8_linear: str | None = None,
        text_cache: PromptCache | None = None,
        parallel: Any = None,
        loop: DenoiseLoop | str = DenoiseLoop.AUTO,
        cuda_graphs: bool | None = None,
    ) -> JavisPipeline:
        """Load everything from local directories (no hub):

        ``checkpoint``: the DiT for the torch engine (official ``model/`` [+ ``lora/``] dir, a Wan2.1
        dir, or a javisrt file — see engine/checkpoint.py); ``engine_file``: the compiled DiT for the
        onnxruntime / tensorrt engines instead (its metadata carries the network config);
        ``wan_dir``: Wan2.1 with the video VAE, umT5 encoder and tokenizer; ``audioldm2_dir``:
        ``vae/`` + ``vocoder/`` (not needed for a t2v network). ``parallel``: the ParallelContext of a
        ``--parallel`` launch (the torch engine's forward then runs over the ranks). ``loop``: the
        sampling loop; ``cuda_graphs``: capture the DiT step as a CUDA graph per bucket (default:
        :func:`default_cuda_graphs`; False makes the device loop enqueue the engine each step).
        ``ops`` / ``fp8_scales`` / ``fp8_linear``: the torch engine's op set and, for ``triton-fp8``, its scales
        sidecar (default: next to the checkpoint) and attention-Linear implementation (see
        :func:`~javisrt.runtime.backends.create_engine`).
        """
        for what, path in (("checkpoint", checkpoint), ("engine file", engine_file), ("Wan2.1 directory", wan_dir)):
            if path is not None and not Path(path).exists():
                raise CheckpointError(f"{what} not found: {path}")
        engine = create_engine(
            backend, checkpoint=checkpoint, config=config if backend == "torch" else None, engine_file=engine_file,
            numerics=numerics if backend == "torch" else None, device=device, ops=ops, parallel=parallel,
            fp8_scales=fp8_scales, fp8_linear=fp8_linear, cuda_graphs=default_cuda_graphs(backend, device) if cuda_graphs is None else cuda_graphs,
        )  # fmt: skip
        cfg = engine.contract.config
        text = TextEncoder.from_pretrained(wan_dir, dtype=text_dtype, device=device, text_len=cfg.text_len, cache=text_cache)
        video = VideoDecoder.from_pretrained(wan_dir, device=device, dtype=decoder_dtype)
        audio = None
        if cfg.has_audio:
            if audioldm2_dir is None:
                where = checkpoint if checkpoint is not None else engine_file
                raise CheckpointError(f"{where} has an audio branch: pass the AudioLDM2 directory (vae/, vocoder/)")
            audio = AudioDecoder.from_pretrained(audioldm2_dir, device=device, dtype=decoder_dtype)
        return cls(engine, text, video, audio, device=device, name=str(checkpoint or engine_file), loop=loop)

    def engine_for(self, mode: GenerationMode | str) -> Engine:
        """The engine generating ``mode``: the torch engine serves every mode of its network (one
        contract per mode on the same model); a compiled engine only the mode it was exported for."""
        mode = GenerationMode(mode)
        engine = self._mode_engines.get(mode)
        if engine is None:
            for_mode = getattr(self.engine, "for_mode", None)
            if for_mode is None:
                raise ConfigError(
                    f"the {self.engine.name} engine's graph was exported for mode {self.engine.contract.mode.value}; "
                    f"mode {mode.value} runs on the torch engine (`--backend torch`); per-mode graph export is not "
                    "implemented"
                )
            engine = self._mode_engines[mode] = for_mode(mode)
        return engine

    # ---- checks ----------------------------------------------------------------------------------
    def check(self, config: GenerationConfig) -> LatentGeometry:
        """Validate a request against this pipeline (mode vs checkpoint, decoders); returns its geometry."""
        mode = GenerationMode(config.mode)
        if not self.cfg.supports(mode):
            raise ConfigError(
                f"mode {mode.value} needs an audio branch, but the checkpoint {self.name!r} is a "
                f"{self.cfg.model_type.value} model; use --mode t2v or a JavisDiT++ (t2av) checkpoint"
            )
        if mode is not GenerationMode.T2A and self.video_decoder is None:
            raise ConfigError(f"mode {mode.value} needs the video VAE, which this pipeline was built without")
        if mode is not GenerationMode.T2V and self.audio_decoder is None:
            raise ConfigError(f"mode {mode.value} needs the audio VAE + vocoder, which this pipeline was built without")
        self.engine_for(mode)
        return config.geometry()

    # ---- generation ------------------------------------------------------------------------------
    def __call__(
        self,
        prompt: str,
        config: GenerationConfig | None = None,
        *,
        progress: Progress | None = None,
        cancel: Callable[[], bool] | None = None,
        **overrides: Any,
    ) -> GenerationResult:
        """Generate one sample. ``overrides`` are GenerationConfig fields (``num_frames=33, seed=1``)."""
        config = replace(config or GenerationConfig(), **overrides) if overrides else (config or GenerationConfig())
        if not isinstance(prompt, str) or not prompt.strip():
            raise ConfigError("the prompt is empty")
        geo = self.check(config)
        mode = GenerationMode(config.mode)
        timings: dict[str, float] = {}
        report = progress or (lambda stage, done, total: None)

        # 1. text: [cond; uncond] — the negative prompt is the unconditional branch (§6.1)
        t0 = time.perf_counter()
        report("text", 0, 1)
        emb = self.text_encoder.encode([prompt, config.negative_prompt])
        report("text", 1, 1)
        timings["text_s"] = time.perf_counter() - t0

        # 2. noise, video first then audio (§6.1)
        video0, audio0 = draw_noise(geo, config.seed, batch=1, device=self.device)
        noise = {name: x for name, x in ((VIDEO, video0), (AUDIO, audio0)) if x is not None}
        guidance = tuple(g for g, name in ((config.video_guidance, VIDEO), (config.audio_guidance, AUDIO)) if name in noise)

        # 3. the sampling loop over the engine on the CFG batch: device loop on CUDA, host loop on CPU
        sampler_cfg = config.sampler_config(self.cfg, guidance)
        session = DenoiseSession(
            self.engine_for(mode), emb.context, {k: v.shape for k, v in noise.items()},
            mask=emb.mask, video_frames=geo.video_latent_frames,
        )  # fmt: skip
        names = session.latent_names

        def on_step(done: int, total: int, t: float, seconds: float) -> None:
            report("denoise", done, total)

        t0 = time.perf_counter()
        report("denoise", 0, config.steps)
        result = session.sample(list(noise.values()), sampler_cfg, on_step, cancel, loop=self.loop)
        timings["denoise_s"] = time.perf_counter() - t0
        if result.cancelled:
            raise GenerationCancelled(f"cancelled after {result.steps_done} of {config.steps} steps")
        final = dict(zip(names, result.latents, strict=True))
        loop_name = "cuda" if result.loop is DenoiseLoop.DEVICE else sampling.backend()

        # 4. decode
        t0 = time.perf_counter()
        n_dec = len(names)
        report("decode", 0, n_dec)
        frames = waveform = None
        if VIDEO in final:
            assert self.video_decoder is not None
            frames = self.video_decoder.decode(final[VIDEO])[0]
            report("decode", 1, n_dec)
        timings["video_decode_s"] = time.perf_counter() - t0
        if AUDIO in final:
            assert self.audio_decoder is not None
            waveform = self.audio_decoder.decode(final[AUDIO], geo.num_samples)[0]
            report("decode", n_dec, n_dec)
        timings["decode_s"] = time.perf_counter() - t0
        timings["audio_decode_s"] = timings["decode_s"] - timings["video_decode_s"]
        log.info(
            "generated %s: %d %s steps (%s loop%s, %s engine) in %.2f s, decode %.2f s",
            mode.value, result.steps_done, sampler_cfg.solver.value, loop_name,
            ", CUDA graph" if result.graph else "", session.engine.name,
            timings["denoise_s"], timings["decode_s"],
        )  # fmt: skip
        return GenerationResult(
            frames=frames,
            waveform=waveform,
            prompt=prompt,
            config=config,
            sampler=loop_name,
            solver=sampler_cfg.solver.value,
            timings=timings,
            step_times_s=tuple(result.step_times_s),
        )

    generate = __call__
