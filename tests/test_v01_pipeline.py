"""JavisDiT v0.1 pipeline end to end on tiny random components: MP4 streams at 24 fps, A/V duration,
seed reproducibility, t2a, request checks."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from javisrt.engine.errors import CheckpointError, ConfigError
from javisrt.runtime.media import probe_mp4
from javisrt.runtime.pipeline import GenerationResult
from javisrt.runtime.v01_demo import build_tiny_v01_pipeline
from javisrt.runtime.v01_pipeline import V01GenerationConfig, V01Pipeline, parse_num_frames

PROMPT = "a bell rings twice in an empty church"
REQUEST = V01GenerationConfig(num_frames=17, height=32, width=48, steps=3, seed=42)


@pytest.fixture(scope="module")
def pipe() -> V01Pipeline:
    return build_tiny_v01_pipeline(seed=0)


@pytest.fixture(scope="module")
def reference(pipe: V01Pipeline) -> GenerationResult:
    return pipe(PROMPT, REQUEST)


def test_mp4_streams_rate_and_durations(reference: GenerationResult, tmp_path: Path) -> None:
    frames, wave = reference.frames, reference.waveform
    assert frames is not None and wave is not None
    assert frames.dtype == np.uint8 and frames.shape == (17, 32, 48, 3)
    assert wave.shape == (int(17 / 24 * 16000),)  # the reference's int(seconds * 16000)
    assert np.isfinite(wave).all() and frames.std() > 0
    path = reference.save(tmp_path / "v01.mp4")
    info = probe_mp4(path, decode_frames=True, decode_audio=True)
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert info.num_frames == 17 and info.fps == 24 and (info.height, info.width) == (32, 48)
    assert info.sample_rate == 16000
    # equal durations up to the AAC frame (1024 samples = 64 ms), which the encoder pads the last one to
    assert abs(info.audio_seconds - 17 / 24) <= 1024 / 16000


def test_same_seed_same_file(pipe: V01Pipeline, reference: GenerationResult, tmp_path: Path) -> None:
    again = pipe(PROMPT, REQUEST)
    a, b = reference.save(tmp_path / "a.mp4"), again.save(tmp_path / "b.mp4")
    assert a.read_bytes() == b.read_bytes()
    other = pipe(PROMPT, V01GenerationConfig(num_frames=17, height=32, width=48, steps=3, seed=43))
    assert not np.array_equal(other.frames, reference.frames)


def test_audio_only_checkpoint(tmp_path: Path) -> None:
    result = build_tiny_v01_pipeline(seed=1, audio_only=True)(PROMPT, REQUEST)
    assert result.frames is None and result.waveform is not None
    info = probe_mp4(result.save(tmp_path / "a.mp4"))
    assert (info.video_streams, info.audio_streams) == (0, 1)


def test_frame_names() -> None:
    assert parse_num_frames("4s") == 102 and parse_num_frames("2s") == 51 and parse_num_frames("34") == 34
    with pytest.raises(ConfigError):
        parse_num_frames("3s")


def test_frame_count_off_the_micro_frame_grid(pipe: V01Pipeline, tmp_path: Path) -> None:
    """20 frames = one micro-frame of 17 + a remainder of 3 (the VAE's remainder rule): the MP4 has all 20."""
    result = pipe(PROMPT, V01GenerationConfig(num_frames=20, height=32, width=48, steps=2, seed=1))
    assert result.frames is not None and result.frames.shape[0] == 20
    assert result.waveform is not None and result.waveform.shape == (int(20 / 24 * 16000),)
    info = probe_mp4(result.save(tmp_path / "20.mp4"))
    assert info.num_frames == 20 and info.fps == 24


def test_bad_requests(pipe: V01Pipeline) -> None:
    with pytest.raises(ConfigError, match=">= 17"):
        V01GenerationConfig(num_frames=16)
    with pytest.raises(ConfigError, match="no video-only model"):
        V01GenerationConfig(num_frames=17, mode="t2v")
    with pytest.raises(ConfigError, match="mode must be one of"):
        V01GenerationConfig(num_frames=17, mode="i2v")
    with pytest.raises(ConfigError, match="does not fit the video\\+audio"):
        pipe(PROMPT, V01GenerationConfig(num_frames=17, height=32, width=48, steps=1, mode="t2a"))
    with pytest.raises(ConfigError, match="empty"):
        pipe("  ", REQUEST)


def test_prior_must_fit_the_dit(pipe: V01Pipeline) -> None:
    audio_only = build_tiny_v01_pipeline(seed=0, audio_only=True)
    with pytest.raises(ConfigError, match="needs the prior"):
        V01Pipeline(pipe.model, pipe.text_encoder, pipe.audio_decoder)
    with pytest.raises(ConfigError, match="takes no prior"):
        V01Pipeline(audio_only.model, pipe.text_encoder, pipe.audio_decoder, prior=pipe.prior)


@pytest.mark.parametrize(
    ("missing", "named"),
    [("checkpoint", "checkpoint"), ("t5_dir", "T5 directory"), ("audioldm2_dir", "AudioLDM2 directory"),
     ("prior", "prior"), ("imagebind", "ImageBind checkpoint"), ("vae_dir", "video VAE directory")],
)  # fmt: skip
def test_missing_component_directories(tmp_path: Path, missing: str, named: str) -> None:
    """Every component path is checked before anything is read; the error names the component."""
    paths = {k: tmp_path for k in ("checkpoint", "t5_dir", "audioldm2_dir", "prior", "imagebind", "vae_dir")}
    paths[missing] = tmp_path / "absent"
    checkpoint = paths.pop("checkpoint")
    with pytest.raises(CheckpointError, match=f"{named} not found: .*absent"):
        V01Pipeline.from_pretrained(checkpoint, **paths)  # type: ignore[arg-type]


@pytest.mark.parametrize("change", [{"out_dim": 6}, {"spatial_token_num": 5}, {"temporal_token_num": 2}])
def test_a_prior_that_does_not_fit_the_dit_fails_at_load(pipe: V01Pipeline, tmp_path: Path,
                                                          change: dict[str, int]) -> None:
    """Tiny checkpoints written here: the tiny DiT and a prior whose output differs in one dimension. The
    load stops with a CheckpointError before T5, AudioLDM2, ImageBind or the VAE are read (empty dirs)."""
    import dataclasses

    from javisrt.engine.st_prior import random_st_prior
    from javisrt.engine.v01_checkpoint import save_pretrained

    assert pipe.prior is not None
    save_pretrained(pipe.model, tmp_path / "dit")
    save_pretrained(random_st_prior(dataclasses.replace(pipe.prior.cfg, **change), seed=3), tmp_path / "prior")
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(CheckpointError, match="does not fit the DiT"):
        V01Pipeline.from_pretrained(tmp_path / "dit", t5_dir=empty, audioldm2_dir=empty, prior=tmp_path / "prior",
                                    imagebind=empty, vae_dir=empty, numerics="fp32")  # fmt: skip


def test_from_pretrained_reproduces_the_tiny_pipeline(pipe: V01Pipeline, reference: GenerationResult,
                                                      tmp_path: Path) -> None:
    """Every component written in its released layout, loaded back through from_pretrained (fp32)."""
    from javisrt.engine.v01_checkpoint import save_pretrained
    from javisrt.runtime.imagebind_text import save_imagebind_text
    from javisrt.runtime.opensora_vae import TINY_SPATIAL_CONFIG, save_opensora_vae

    assert pipe.prior is not None and pipe.imagebind is not None and pipe.video_vae is not None
    save_pretrained(pipe.model, tmp_path / "JavisDiT-v0.1-jav")
    save_pretrained(pipe.prior, tmp_path / "JavisDiT-v0.1-prior")
    pipe.text_encoder.model.save_pretrained(str(tmp_path / "t5"))
    pipe.text_encoder.tokenizer.save_pretrained(str(tmp_path / "t5"))
    save_imagebind_text(pipe.imagebind.trunk, tmp_path / "imagebind_huge.pth")
    save_opensora_vae(pipe.video_vae, tmp_path / "OpenSora-VAE-v1.2")
    pipe.audio_decoder.vae.save_pretrained(str(tmp_path / "audioldm2" / "vae"))
    pipe.audio_decoder.vocoder.save_pretrained(str(tmp_path / "audioldm2" / "vocoder"))
    loaded = V01Pipeline.from_pretrained(
        tmp_path / "JavisDiT-v0.1-jav", t5_dir=tmp_path / "t5", audioldm2_dir=tmp_path / "audioldm2",
        prior=tmp_path / "JavisDiT-v0.1-prior", imagebind=tmp_path / "imagebind_huge.pth",
        vae_dir=tmp_path / "OpenSora-VAE-v1.2", numerics="fp32", trained_gates=True, imagebind_config="tiny",
        vae_spatial_config=TINY_SPATIAL_CONFIG, vae_temporal_config="tiny",
    )
    result = loaded(PROMPT, REQUEST)
    assert np.array_equal(result.frames, reference.frames)
    assert np.array_equal(result.waveform, reference.waveform)
    with pytest.raises(CheckpointError, match="also pass prior, imagebind, vae_dir"):
        V01Pipeline.from_pretrained(tmp_path / "JavisDiT-v0.1-jav", t5_dir=tmp_path / "t5",
                                    audioldm2_dir=tmp_path / "audioldm2", numerics="fp32")
