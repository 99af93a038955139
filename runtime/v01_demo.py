"""Tiny, seeded, random-weight JavisDiT v0.1 components for tests and ``javisrt demo --model javisdit-v0.1``.

The same classes the real v0.1 pipeline loads, at tiny widths with the real strides: the ``tiny`` VASTDiT3
and prior presets, transformers' ``T5EncoderModel`` (on demo.py's byte-level tokenizer, 12 tokens = the
tiny DiT's ``model_max_length``), the ImageBind text trunk (real CLIP BPE vocabulary, 9 tokens x 24 =
the tiny prior's input), the Open-Sora VAE (x8 spatial, 17 -> 5 frames), and demo.py's AudioLDM2 VAE and
HiFi-GAN. Weights are random: the demo proves the pipeline, not the art.
"""

from __future__ import annotations

from functools import partial
from typing import Any

from javisrt.engine.model import Numerics
from javisrt.engine.st_prior import random_st_prior
from javisrt.engine.v01_config import STPriorConfig, V01Config
from javisrt.engine.v01_model import random_v01_model
from javisrt.runtime.decode import AudioDecoder
from javisrt.runtime.demo import seeded, tiny_audio_vae, tiny_tokenizer, tiny_vocoder
from javisrt.runtime.imagebind_text import ImageBindTextEncoder, random_imagebind_text
from javisrt.runtime.opensora_vae import random_opensora_vae
from javisrt.runtime.t5_text import v01_prompt
from javisrt.runtime.text import PromptCache, TextEncoder
from javisrt.runtime.v01_pipeline import V01GenerationConfig, V01Pipeline

# The demo request: 17 frames (one micro-frame, 0.71 s at 24 fps) at 64 x 64.
V01_DEMO_FRAMES = 17
V01_DEMO_SIZE = (64, 64)
V01_DEMO_STEPS = 10


def tiny_t5(seed: int = 0, d_model: int = 32) -> Any:  # transformers.T5EncoderModel
    from transformers import T5Config, T5EncoderModel

    cfg = T5Config(vocab_size=259, d_model=d_model, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu")  # t5-v1_1's FFN, scaled down
    with seeded(seed):
        model = T5EncoderModel(cfg)
    return model.eval().requires_grad_(False)


def build_tiny_v01_pipeline(seed: int = 0, audio_only: bool = False, text_cache: PromptCache | None = None) -> V01Pipeline:
    """The v0.1 pipeline on the ``tiny`` presets with seeded random components (no files read);
    ``text_cache`` is the prompt-embedding LRU to use (the server shares one between workers)."""
    cfg = V01Config.from_name("tiny-audio" if audio_only else "tiny")
    model = random_v01_model(cfg, Numerics.FP32, seed=seed)
    text = TextEncoder(
        tiny_tokenizer(cfg.model_max_length), tiny_t5(seed + 1, d_model=cfg.caption_channels),
        identity=f"tiny-t5:seed={seed + 1}", text_len=cfg.model_max_length, preprocess=v01_prompt, cache=text_cache,
    )
    audio = AudioDecoder(tiny_audio_vae(seed + 3), tiny_vocoder(seed + 4))
    if audio_only:
        return V01Pipeline(model, text, audio, name=f"tiny v0.1 audio (random, seed {seed})")
    prior = random_st_prior(STPriorConfig.from_name("tiny"), seed=seed + 5)
    imagebind = ImageBindTextEncoder(random_imagebind_text("tiny", seed=seed + 6))
    vae = random_opensora_vae(seed=seed + 2)
    return V01Pipeline(model, text, audio, prior=prior, imagebind=imagebind, video_vae=vae,
                       name=f"tiny v0.1 (random, seed {seed})")


v01_demo_config = partial(
    V01GenerationConfig, num_frames=V01_DEMO_FRAMES, height=V01_DEMO_SIZE[0], width=V01_DEMO_SIZE[1],
    steps=V01_DEMO_STEPS,
)
