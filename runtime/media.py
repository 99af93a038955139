"""MP4 writing with PyAV: H.264 video at 16 fps + AAC audio at 16 kHz, written atomically.

The file is encoded into a temporary file next to the target and renamed over it only when
complete (``engine/atomic_file.py``), so an error never leaves a half-written MP4 (and never clobbers
an existing one); the MP4 gets the mode any file the user creates gets (0666 less the umask).

Durations are aligned: the waveform is cut or zero-padded to exactly ``frames / fps`` seconds
(``F * 1000`` samples at 16 fps / 16 kHz). Mono audio is written as stereo by duplicating the
channel, as the reference does. AAC adds encoder priming and pads to whole 1024-sample frames, so a
decoder that ignores the MP4 edit list (PyAV does) reads back ~1024-2048 samples more than written
(feasibility.md §8).

Codecs: the best of PyAV's bundled encoders — libx264 (``h264``), else mpeg4 — and aac.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass
from fractions import Fraction
from pathlib import Path
from typing import Any, cast

import numpy as np

from javisrt.engine.atomic_file import atomic_file
from javisrt.engine.errors import JavisError, ShapeError

log = logging.getLogger(__name__)

VIDEO_CODECS = ("libx264", "h264", "mpeg4")
AUDIO_CODEC = "aac"
AAC_FRAME = 1024


class MediaError(JavisError, OSError):
    """The output cannot be written (unwritable directory, no usable encoder)."""


def _pick_video_codec() -> str:
    import av

    for name in VIDEO_CODECS:
        try:
            av.codec.Codec(name, "w")
        except Exception:  # av raises UnknownCodecError (a ValueError) or FFmpegError subclasses
            continue
        if name == "mpeg4":
            log.warning("PyAV's FFmpeg has no H.264 encoder; writing MPEG-4 Part 2 video instead")
        return name
    raise MediaError(f"PyAV's FFmpeg has none of the video encoders {VIDEO_CODECS}")


def check_writable_dir(directory: Path) -> None:
    """Raise MediaError unless files can be created in ``directory`` (created if missing)."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise MediaError(f"cannot create output directory {directory}: {exc.strerror or exc}") from exc
    if not os.access(directory, os.W_OK | os.X_OK):
        raise MediaError(f"output directory {directory} is not writable")


def fit_waveform(waveform: np.ndarray, num_samples: int) -> np.ndarray:
    """Mono float32 waveform cut or zero-padded to ``num_samples``, clipped to [-1, 1]."""
    wave = np.asarray(waveform, dtype=np.float32)
    if wave.ndim == 2 and wave.shape[0] == 1:
        wave = wave[0]
    if wave.ndim != 1:
        raise ShapeError(f"waveform must be mono [N], got shape {wave.shape}")
    if wave.shape[0] >= num_samples:
        wave = wave[:num_samples]
    else:
        wave = np.pad(wave, (0, num_samples - wave.shape[0]))
    return np.clip(np.nan_to_num(wave), -1.0, 1.0)


def write_mp4(
    path: str | os.PathLike[str],
    frames: np.ndarray | None,
    waveform: np.ndarray | None,
    *,
    fps: int = 16,
    sample_rate: int = 16000,
    crf: int = 18,
) -> Path:
    """Write ``frames`` (uint8 [F, H, W, 3]) and/or ``waveform`` (float [N], mono) to an MP4, atomically.

    With video, the audio is aligned to ``F / fps`` seconds; audio alone keeps its own length.
    """
    import av

    path = Path(path)
    if frames is None and waveform is None:
        raise ShapeError("nothing to write: no frames and no waveform")
    if frames is not None:
        frames = np.asarray(frames)
        if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] == 0:
            raise ShapeError(f"frames must be uint8 [F, H, W, 3] with F > 0, got {frames.dtype} {frames.shape}")
        if frames.shape[1] % 2 or frames.shape[2] % 2:  # yuv420p needs even sizes: repeat the last row/column
            pad = ((0, 0), (0, frames.shape[1] % 2), (0, frames.shape[2] % 2), (0, 0))
            frames = np.pad(frames, pad, mode="edge")
    wave = None
    if waveform is not None:
        n = int(round(frames.shape[0] * sample_rate / fps)) if frames is not None else np.asarray(waveform).shape[-1]
        wave = fit_waveform(waveform, n)

    check_writable_dir(path.parent)
    with atomic_file(path, suffix=".tmp.mp4") as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        vstream = astream = None
        if frames is not None:  # both streams exist before the first packet is muxed
            vstream = cast(Any, container.add_stream(_pick_video_codec(), rate=fps))
            vstream.height, vstream.width = frames.shape[1], frames.shape[2]
            vstream.pix_fmt = "yuv420p"
            if vstream.codec_context.name in ("libx264", "h264"):
                vstream.options = {"crf": str(crf), "preset": "medium"}
        if wave is not None:
            astream = cast(Any, container.add_stream(AUDIO_CODEC, rate=sample_rate, layout="stereo"))
        if vstream is not None and frames is not None:
            _encode_video(container, vstream, frames, fps)
        if astream is not None and wave is not None:
            _encode_audio(container, astream, wave, sample_rate)
    log.info("wrote %s", path)
    return path


def _encode_video(container: Any, stream: Any, frames: np.ndarray, fps: int) -> None:
    import av

    for i, img in enumerate(frames):
        frame = av.VideoFrame.from_ndarray(np.ascontiguousarray(img), format="rgb24")
        frame.pts = i
        frame.time_base = Fraction(1, fps)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


def _encode_audio(container: Any, stream: Any, wave: np.ndarray, sample_rate: int) -> None:
    import av

    stereo = np.stack([wave, wave])  # mono -> stereo, as the reference
    for start in range(0, stereo.shape[1], AAC_FRAME):
        chunk = np.ascontiguousarray(stereo[:, start : start + AAC_FRAME])
        frame = av.AudioFrame.from_ndarray(chunk, format="fltp", layout="stereo")
        frame.sample_rate = sample_rate
        frame.pts = start
        frame.time_base = Fraction(1, sample_rate)
        container.mux(stream.encode(frame))
    container.mux(stream.encode(None))


@dataclass(frozen=True)
class MediaInfo:
    """What an MP4 holds, read back with PyAV (decoded, not just the header)."""

    video_streams: int
    audio_streams: int
    video_codec: str | None
    audio_codec: str | None
    num_frames: int
    fps: float
    width: int
    height: int
    audio_samples: int  # decoded samples per channel (includes AAC priming/padding)
    sample_rate: int
    audio_channels: int
    frames: np.ndarray | None  # uint8 [F, H, W, 3] when decode_frames
    audio: np.ndarray | None  # float32 [C, N] when decode_audio

    @property
    def video_seconds(self) -> float:
        return self.num_frames / self.fps if self.fps else 0.0

    @property
    def audio_seconds(self) -> float:
        return self.audio_samples / self.sample_rate if self.sample_rate else 0.0


def probe_mp4(path: str | os.PathLike[str], *, decode_frames: bool = False, decode_audio: bool = False) -> MediaInfo:
    """Open ``path`` with PyAV and decode every stream (counts frames and samples)."""
    import av

    with av.open(str(path)) as container:
        vs = list(container.streams.video)
        aus = list(container.streams.audio)
        num_frames, width, height, fps, frames = 0, 0, 0, 0.0, []
        if vs:
            v = vs[0]
            fps = float(v.average_rate or v.base_rate or 0)
            width, height = v.codec_context.width, v.codec_context.height
            for frame in container.decode(v):
                num_frames += 1
                if decode_frames:
                    frames.append(frame.to_ndarray(format="rgb24"))
        container.seek(0)
        samples, rate, channels, chunks = 0, 0, 0, []
        if aus:
            a = aus[0]
            rate = a.codec_context.sample_rate
            channels = a.codec_context.channels
            for aframe in container.decode(a):
                samples += aframe.samples
                if decode_audio:
                    chunks.append(aframe.to_ndarray())
        return MediaInfo(
            video_streams=len(vs),
            audio_streams=len(aus),
            video_codec=vs[0].codec_context.name if vs else None,
            audio_codec=aus[0].codec_context.name if aus else None,
            num_frames=num_frames,
            fps=fps,
            width=width,
            height=height,
            audio_samples=samples,
            sample_rate=rate,
            audio_channels=channels,
            frames=np.stack(frames) if frames else None,
            audio=np.concatenate(chunks, axis=1).astype(np.float32) if chunks else None,
        )
