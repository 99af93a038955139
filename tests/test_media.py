"""runtime/media.py: streams, frame count, rate, A/V duration alignment, atomic writes (read back with av)."""

from __future__ import annotations

import os
import stat
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import av
import numpy as np
import pytest

from javisrt.engine.errors import ShapeError
from javisrt.runtime.media import MediaError, fit_waveform, probe_mp4, write_mp4

FPS, SR = 16, 16000
AAC_SLACK = 2048  # AAC priming + padding to whole frames; PyAV ignores the edit list (feasibility.md §8)


def gradient_frames(n: int, h: int = 48, w: int = 64) -> np.ndarray:
    """Smooth moving gradients: H.264 keeps them within a few levels."""
    y, x = np.mgrid[0:h, 0:w]
    frames = [np.stack([(x * 4 + 3 * i) % 256, (y * 5 + i) % 256, np.full_like(x, 128)], -1) for i in range(n)]
    return np.asarray(frames, dtype=np.uint8)


def tone(n: int) -> np.ndarray:
    return (0.3 * np.sin(2 * np.pi * 440 * np.arange(n) / SR)).astype(np.float32)


def only_files(d: Path) -> list[str]:
    return sorted(p.name for p in d.iterdir())


@pytest.mark.parametrize("num_frames", [33, 65])
def test_roundtrip_video_and_audio(tmp_path: Path, num_frames: int) -> None:
    frames = gradient_frames(num_frames)
    path = write_mp4(tmp_path / "x.mp4", frames, tone(num_frames * 1000 + 517))  # longer: cut to F/16 s
    info = probe_mp4(path, decode_frames=True, decode_audio=True)
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert info.video_codec == "h264" and info.audio_codec == "aac"
    assert info.num_frames == num_frames and info.fps == FPS
    assert (info.height, info.width) == frames.shape[1:3]
    assert info.sample_rate == SR
    expected = num_frames / FPS
    assert abs(info.audio_seconds - expected) <= 1 / FPS  # within one video frame
    assert num_frames * 1000 <= info.audio_samples <= num_frames * 1000 + AAC_SLACK
    with av.open(str(path)) as c:  # container metadata: audio and video durations agree
        a, v = c.streams.audio[0], c.streams.video[0]
        assert abs(float(a.duration * a.time_base) - float(v.duration * v.time_base)) <= 1 / FPS
    assert info.frames is not None
    err = np.abs(info.frames.astype(np.int16) - frames.astype(np.int16)).mean()
    assert err < 6, err
    assert info.audio is not None and info.audio.shape[0] == 2  # mono written as stereo


def test_short_audio_is_padded(tmp_path: Path) -> None:
    info = probe_mp4(write_mp4(tmp_path / "x.mp4", gradient_frames(33), tone(1000)))
    assert 33000 <= info.audio_samples <= 33000 + AAC_SLACK


def test_single_stream_files(tmp_path: Path) -> None:
    v = probe_mp4(write_mp4(tmp_path / "v.mp4", gradient_frames(33), None))
    assert (v.video_streams, v.audio_streams, v.num_frames) == (1, 0, 33)
    a = probe_mp4(write_mp4(tmp_path / "a.mp4", None, tone(33000)))
    assert (a.video_streams, a.audio_streams) == (0, 1)
    assert 33000 <= a.audio_samples <= 33000 + AAC_SLACK


def test_odd_size_is_padded(tmp_path: Path) -> None:
    info = probe_mp4(write_mp4(tmp_path / "x.mp4", gradient_frames(33, 47, 63), None))
    assert (info.height, info.width) == (48, 64)


@pytest.mark.parametrize(
    "frames",
    [np.zeros((33, 32, 32, 3), np.float32), np.zeros((33, 32, 32), np.uint8), np.zeros((0, 32, 32, 3), np.uint8)],
)
def test_bad_frames_rejected_without_a_file(tmp_path: Path, frames: np.ndarray) -> None:
    with pytest.raises(ShapeError):
        write_mp4(tmp_path / "x.mp4", frames, None)
    assert only_files(tmp_path) == []


def test_failure_mid_write_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    target = tmp_path / "x.mp4"
    target.write_bytes(b"previous")
    calls = {"n": 0}
    real = av.VideoFrame.from_ndarray

    def failing(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] == 10:
            raise RuntimeError("encoder exploded")
        return real(*args, **kwargs)

    monkeypatch.setattr(av.VideoFrame, "from_ndarray", failing)
    with pytest.raises(RuntimeError, match="exploded"):
        write_mp4(target, gradient_frames(33), tone(33000))
    assert only_files(tmp_path) == ["x.mp4"]  # no temp file left
    assert target.read_bytes() == b"previous"  # the old file was not clobbered


def test_unwritable_directory(tmp_path: Path) -> None:
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    with pytest.raises(MediaError, match="cannot create output directory"):
        write_mp4(blocker / "sub" / "x.mp4", gradient_frames(33), None)


def test_fit_waveform() -> None:
    w = fit_waveform(np.array([[0.5, 2.0, -3.0, np.nan]]), 6)
    assert w.dtype == np.float32 and w.tolist() == [0.5, 1.0, -1.0, 0.0, 0.0, 0.0]
    with pytest.raises(ShapeError):
        fit_waveform(np.zeros((2, 10)), 5)


@contextmanager
def umask(mask: int) -> Iterator[None]:
    old = os.umask(mask)
    try:
        yield
    finally:
        os.umask(old)


@pytest.mark.parametrize("mask", [0o022, 0o077, 0o002])
def test_output_gets_the_umask_mode(tmp_path: Path, mask: int) -> None:
    """An MP4 is created like any user file (0666 less the umask), not 0600 as a mkstemp file."""
    with umask(mask):
        path = write_mp4(tmp_path / f"x{mask:o}.mp4", None, tone(1600))
    assert stat.S_IMODE(path.stat().st_mode) == 0o666 & ~mask
    assert only_files(tmp_path) == [path.name]
