"""Tiny, seeded, random-weight components for tests and ``javisrt demo``.

Each builder makes the same *class* the real pipeline loads (transformers' ``UMT5EncoderModel`` and a
``tokenizers`` tokenizer, diffusers' ``AutoencoderKLWan`` and ``AutoencoderKL``, transformers'
``SpeechT5HifiGan``, the ``tiny`` JavisDiT preset) with small widths but the real strides, so every
shape rule of the pipeline (latent geometry, mel padding, vocoder hop, cropping) runs unchanged:

  text encoder  byte-level tokenizer (259 ids) + UMT5 encoder, d_model 32 = tiny ``text_dim``
  video VAE     AutoencoderKLWan, z_dim 16, stride (4, 8, 8), base_dim 8
  audio VAE     AutoencoderKL, 1 -> 8 latent channels, 3 blocks = /4 in time and mel (64 -> 16 bins)
  vocoder       SpeechT5HifiGan, 64 mel bins, upsample 5*4*2*2*2 = 160 = the hop at 16 kHz

Weights are random (seeded), so the demo proves the pipeline, not the art. The global torch RNG is
left as it was: construction runs under ``torch.random.fork_rng``.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from javisrt.engine.config import JavisConfig
from javisrt.engine.model import JavisDiT, random_model
from javisrt.runtime.backends import create_engine
from javisrt.runtime import sampling
from javisrt.runtime.decode import AudioDecoder, VideoDecoder
from javisrt.engine.latents import (
    AUDIO_LATENT_CHANNELS,
    AUDIO_SCALING_FACTOR,
    MEL_BINS,
    SAMPLE_RATE,
    VIDEO_LATENT_CHANNELS,
    VIDEO_LATENT_MEAN,
    VIDEO_LATENT_STD,
)
from javisrt.runtime.media import check_writable_dir
from javisrt.runtime.denoise_session import DenoiseLoop
from javisrt.runtime.pipeline import GenerationConfig, JavisPipeline, Progress, default_cuda_graphs
from javisrt.runtime.text import UMT5_XXL, PromptCache, TextEncoder

TINY_PRESET = "tiny"
# The demo request: 2 s (33 frames) at 64 x 64, enough to show motion and sound, fast on 2 CPU cores.
DEMO_PROMPT = "A drummer plays a fast rhythm on a wooden stage, the crowd claps along."
DEMO_FRAMES = 33
DEMO_SIZE = (64, 64)
DEMO_STEPS = 20


@contextlib.contextmanager
def seeded(seed: int) -> Iterator[None]:
    """Run a block with the global CPU RNG seeded, restoring the caller's RNG state afterwards."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        yield


def tiny_tokenizer(model_max_length: int = 16) -> Any:  # transformers.PreTrainedTokenizerFast
    """A byte-level tokenizer built in code: ids 0 <pad>, 1 </s>, 2 <unk>, then the 256 bytes.

    Any UTF-8 text (the Chinese negative prompt too) tokenizes; ``</s>`` is appended like umT5's.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    specials = ["<pad>", "</s>", "<unk>"]
    vocab = {tok: i for i, tok in enumerate(specials)}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):  # alphabet() is an unordered set
        vocab.setdefault(ch, len(vocab))
    tok = Tokenizer(models.BPE(vocab=vocab, merges=[], unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.TemplateProcessing(single="$A </s>", special_tokens=[("</s>", 1)])
    return PreTrainedTokenizerFast(
        tokenizer_object=tok,
        pad_token="<pad>",
        eos_token="</s>",
        unk_token="<unk>",
        model_max_length=model_max_length,
    )


def tiny_umt5(seed: int = 0, d_model: int = 32) -> Any:  # transformers.UMT5EncoderModel
    from transformers import UMT5Config, UMT5EncoderModel

    # the real encoder's architecture (relative-attention buckets, gated-GELU, encoder only), scaled down
    cfg = UMT5Config(**{**UMT5_XXL, "vocab_size": 259, "d_model": d_model, "d_kv": 8, "d_ff": 64,
                        "num_layers": 2, "num_heads": 4})
    with seeded(seed):
        model = UMT5EncoderModel(cfg)
    return model.eval().requires_grad_(False)


def tiny_video_vae(seed: int = 0) -> Any:  # diffusers.AutoencoderKLWan
    from diffusers import AutoencoderKLWan

    with seeded(seed):
        vae = AutoencoderKLWan(
            base_dim=8,
            z_dim=VIDEO_LATENT_CHANNELS,
            dim_mult=[1, 2, 2, 2],
            num_res_blocks=1,
            temperal_downsample=[False, True, True],
            latents_mean=list(VIDEO_LATENT_MEAN),
            latents_std=list(VIDEO_LATENT_STD),
        )
    return vae.eval().requires_grad_(False)  # type: ignore[attr-defined]


def tiny_audio_vae(seed: int = 0) -> Any:  # diffusers.AutoencoderKL (AudioLDM2 layout)
    from diffusers import AutoencoderKL

    with seeded(seed):
        vae = AutoencoderKL(
            in_channels=1,
            out_channels=1,
            down_block_types=("DownEncoderBlock2D",) * 3,
            up_block_types=("UpDecoderBlock2D",) * 3,
            block_out_channels=(8, 16, 16),
            layers_per_block=1,
            latent_channels=AUDIO_LATENT_CHANNELS,
            norm_num_groups=4,
            sample_size=64,
            scaling_factor=AUDIO_SCALING_FACTOR,
        )
    return vae.eval().requires_grad_(False)  # type: ignore[attr-defined]


def tiny_vocoder(seed: int = 0) -> Any:  # transformers.SpeechT5HifiGan
    from transformers import SpeechT5HifiGan, SpeechT5HifiGanConfig

    cfg = SpeechT5HifiGanConfig(
        model_in_dim=MEL_BINS,
        sampling_rate=SAMPLE_RATE,
        upsample_initial_channel=32,
        upsample_rates=[5, 4, 2, 2, 2],
        upsample_kernel_sizes=[10, 8, 4, 4, 4],
        resblock_kernel_sizes=[3],
        resblock_dilation_sizes=[[1, 3]],
        normalize_before=False,
    )
    with seeded(seed):
        vocoder = SpeechT5HifiGan(cfg)
        # transformers initialises with N(0, 0.01), which makes a random vocoder nearly silent
        # (~1e-11); U(+-sqrt(3/fan_in)) keeps it audible (measured ~0.07 rms on the demo latents).
        with torch.no_grad():
            for m in vocoder.modules():
                if isinstance(m, (torch.nn.Conv1d, torch.nn.ConvTranspose1d)):
                    fan_in = m.weight[0].numel()
                    if isinstance(m, torch.nn.ConvTranspose1d):
                        fan_in = m.weight.shape[0] * m.weight.shape[2] // m.stride[0]
                    bound = math.sqrt(3.0 / fan_in)  # unit-variance weights
                    m.weight.uniform_(-bound, bound)
    return vocoder.eval().requires_grad_(False)


def tiny_dit(seed: int = 0, config: JavisConfig | str = TINY_PRESET) -> JavisDiT:
    cfg = JavisConfig.from_name(config) if isinstance(config, str) else config
    return random_model(cfg, seed=seed)


@dataclass(frozen=True)
class DemoReport:
    """What ``javisrt demo`` did: where the file is and what it contains."""

    path: Path
    num_frames: int
    frame_size: tuple[int, int]
    fps: int
    audio_seconds: float
    sample_rate: int
    sampler: str
    seconds: float

    def describe(self, real_weights: bool = False) -> str:
        h, w = self.frame_size
        lines = [f"wrote {self.path}"]
        streams = []
        if self.num_frames:
            streams.append(f"video {self.num_frames} frames {w}x{h} at {self.fps} fps (H.264)")
        if self.audio_seconds:
            streams.append(f"audio {self.audio_seconds:.3f} s at {self.sample_rate} Hz (AAC)")
        lines.append(f"  {'; '.join(streams)}; generated and written in {self.seconds:.1f} s")
        lines.append(
            "What this proves: the whole javisrt path ran on this machine - umT5 text encoder -> seeded\n"
            f"noise -> {self.sampler} sampling loop with CFG over the JavisDiT++ network -> Wan video VAE +\n"
            "AudioLDM2 VAE + HiFi-GAN vocoder -> one MP4 with video and audio of equal length."
        )
        if real_weights:
            lines.append("Weights: the real checkpoints you passed.")
        else:
            lines.append(
                "All weights are tiny and random, so it shows the pipeline, not the art: expect coloured\n"
                "noise and hiss. Pass --checkpoint, --wan-dir and --audioldm2-dir to use real weights."
            )
        return "\n".join(lines)


def build_tiny_pipeline(
    seed: int = 0,
    backend: str = "torch",
    engine_file: str | Path | None = None,
    *,
    ops: str = "torch",
    device: torch.device | str = "cpu",
    parallel: Any = None,
    text_cache: PromptCache | None = None,
    loop: DenoiseLoop | str = DenoiseLoop.AUTO,
    cuda_graphs: bool | None = None,
) -> JavisPipeline:
    """The whole pipeline on the ``tiny`` preset with seeded random components (no files read, except
    ``engine_file``: a compiled tiny DiT for the onnxruntime / tensorrt engines, whose metadata then
    gives the network config; the torch engine runs :func:`tiny_dit`). ``parallel``: the ParallelContext
    of a --parallel launch (torch engine); ``text_cache`` as in :meth:`JavisPipeline.from_pretrained`
    (e.g. one shared by server workers); ``loop`` / ``cuda_graphs``: as there too."""
    graphs = default_cuda_graphs(backend, device) if cuda_graphs is None else cuda_graphs
    if backend == "torch":
        engine = create_engine(
            "torch", model=tiny_dit(seed), engine_file=engine_file, ops=ops, device=device, parallel=parallel,
            cuda_graphs=graphs,
        )  # fmt: skip
    else:
        engine = create_engine(
            backend, engine_file=engine_file, ops=ops, device=device, parallel=parallel, cuda_graphs=graphs
        )
    cfg = engine.contract.config
    text = TextEncoder(
        tiny_tokenizer(cfg.text_len),
        tiny_umt5(seed + 1, d_model=cfg.text_dim),
        identity=f"tiny-umt5:seed={seed + 1}",
        text_len=cfg.text_len,
        cache=text_cache,
    )
    video = VideoDecoder(tiny_video_vae(seed + 2))
    audio = AudioDecoder(tiny_audio_vae(seed + 3), tiny_vocoder(seed + 4)) if cfg.has_audio else None
    return JavisPipeline(engine, text, video, audio, device=device, name=f"tiny (random, seed {seed})", loop=loop)


def demo_config(**overrides: Any) -> GenerationConfig:
    """The demo request: 33 frames (2 s) at 64x64, DEMO_STEPS steps, seed 42."""
    h, w = DEMO_SIZE
    base: dict[str, Any] = dict(num_frames=DEMO_FRAMES, height=h, width=w, steps=DEMO_STEPS, seed=42)
    base.update(overrides)
    return GenerationConfig(**base)


def run_demo(
    out: str | Path = "demo.mp4",
    pipeline: JavisPipeline | None = None,
    config: GenerationConfig | None = None,
    prompt: str = DEMO_PROMPT,
    progress: Progress | None = None,
) -> DemoReport:
    """Generate ``prompt`` and write ``out``; ``pipeline`` defaults to the tiny random one."""
    start = time.perf_counter()
    out = Path(out)
    check_writable_dir(out.parent if str(out.parent) else Path("."))
    pipe = pipeline if pipeline is not None else build_tiny_pipeline()
    cfg = config if config is not None else demo_config()
    result = pipe(prompt, cfg, progress=progress)
    path = result.save(out)
    frames = result.frames
    return DemoReport(
        path=path.resolve(),
        num_frames=0 if frames is None else int(frames.shape[0]),
        frame_size=(0, 0) if frames is None else (int(frames.shape[1]), int(frames.shape[2])),
        fps=result.fps,
        audio_seconds=0.0 if result.waveform is None else result.waveform.shape[0] / result.sample_rate,
        sample_rate=result.sample_rate,
        sampler="C++" if sampling.backend() == "cpp" else "Python (C++ extension not built)",
        seconds=time.perf_counter() - start,
    )
