"""engine/latents.py against the numbers written in model-spec.md §6.1 and §7 (not recomputed)."""

from __future__ import annotations

import pytest
import torch

from javisrt.engine.errors import ConfigError
from javisrt.engine.latents import (
    SAMPLE_RATE,
    bucket_size,
    check_num_frames,
    draw_noise,
    latent_geometry,
    mel_frames,
)


@pytest.mark.parametrize(
    ("resolution", "aspect", "size"),
    [
        ("240p", "9:16", (240, 426)),  # §7.1: "9:16" is the landscape bucket (H:W ~ 0.56)
        ("480p", "9:16", (480, 854)),
        ("240p", "16:9", (426, 240)),
        ("240p", "1:1", (320, 320)),
        ("360p", "9:16", (360, 640)),
        ("480p", "0.56", (480, 854)),  # the reference's raw key is accepted too
    ],
)
def test_bucket_size(resolution: str, aspect: str, size: tuple[int, int]) -> None:
    assert bucket_size(resolution, aspect) == size


@pytest.mark.parametrize(("resolution", "aspect"), [("999p", "9:16"), ("240p", "7:3"), ("240", "9:16")])
def test_unknown_bucket(resolution: str, aspect: str) -> None:
    with pytest.raises(ConfigError, match="unknown"):
        bucket_size(resolution, aspect)


@pytest.mark.parametrize(
    ("frames", "h", "w", "video", "audio", "frame_size"),
    [
        # §7.1 / §8 table: 240x426 -> latent [16,17,30,54], frames 240x432; §7.2 table: 65 f -> [8,104,16]
        (65, 240, 426, (16, 17, 30, 54), (8, 104, 16), (240, 432)),
        (33, 240, 426, (16, 9, 30, 54), (8, 56, 16), (240, 432)),
        (81, 480, 854, (16, 21, 60, 108), (8, 128, 16), (480, 864)),
        (81, 480, 832, (16, 21, 60, 104), (8, 128, 16), (480, 832)),
    ],
)
def test_geometry_matches_spec(frames, h, w, video, audio, frame_size) -> None:
    geo = latent_geometry(frames, h, w)
    assert geo.video == video
    assert geo.audio == audio
    assert geo.frame_size == frame_size
    assert geo.video_latent_frames == video[1]
    assert geo.num_samples == int(frames / 16 * SAMPLE_RATE)  # waveform crop (§7.2)


@pytest.mark.parametrize(("frames", "mel"), [(33, 224), (65, 416), (81, 512)])
def test_mel_padding(frames: int, mel: int) -> None:
    assert mel_frames(frames) == mel  # §7.2: padded to a multiple of 32


def test_modes_drop_a_modality() -> None:
    assert latent_geometry(33, 64, 64, "t2v").audio is None
    t2a = latent_geometry(33, 64, 64, "t2a")
    assert t2a.video is None and t2a.audio == (8, 56, 16) and t2a.video_latent_frames == 9


@pytest.mark.parametrize("frames", [64, 31, 29, 85, 0, 1, -3])
def test_bad_frame_counts(frames: int) -> None:
    with pytest.raises(ConfigError, match="num_frames"):
        check_num_frames(frames)


def test_odd_size_rejected() -> None:
    with pytest.raises(ConfigError, match="even"):
        latent_geometry(33, 63, 64)


def test_noise_order_and_dtype() -> None:
    """§6.1: one seeded generator, video randn(bf16) first, then audio randn(bf16)."""
    geo = latent_geometry(33, 64, 64)
    video, audio = draw_noise(geo, seed=42)
    gen = torch.Generator().manual_seed(42)
    ref_v = torch.randn((1, *geo.video), generator=gen, dtype=torch.bfloat16)
    ref_a = torch.randn((1, *geo.audio), generator=gen, dtype=torch.bfloat16)
    assert video is not None and audio is not None
    assert video.dtype == torch.float32 and torch.equal(video, ref_v.float())
    assert torch.equal(audio, ref_a.float())
    # audio-only draws audio first, so its noise differs from the t2av audio noise
    _, audio_only = draw_noise(latent_geometry(33, 64, 64, "t2a"), seed=42)
    assert audio_only is not None and not torch.equal(audio_only, audio)
    # same seed -> same noise; the global RNG is untouched
    state = torch.get_rng_state()
    again, _ = draw_noise(geo, seed=42)
    assert torch.equal(again, video) and torch.equal(torch.get_rng_state(), state)
