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


def test_bad_requests(pipe: V01Pipeline) -> None:
    with pytest.raises(NotImplementedError, match="multiple of 17"):
        V01GenerationConfig(num_frames=20)
    with pytest.raises(ConfigError, match="empty"):
        pipe("  ", REQUEST)


def test_prior_must_fit_the_dit(pipe: V01Pipeline) -> None:
    audio_only = build_tiny_v01_pipeline(seed=0, audio_only=True)
    with pytest.raises(ConfigError, match="needs the prior"):
        V01Pipeline(pipe.model, pipe.text_encoder, pipe.audio_decoder)
    with pytest.raises(ConfigError, match="takes no prior"):
        V01Pipeline(audio_only.model, pipe.text_encoder, pipe.audio_decoder, prior=pipe.prior)


def test_missing_component_directories(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="checkpoint not found"):
        V01Pipeline.from_pretrained(tmp_path / "dit", t5_dir=tmp_path, audioldm2_dir=tmp_path)


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
