"""TA-RoPE: 3-axis rotary position ids for the joint [video; audio] sequence, as real cos/sin tables.

Positions (model-spec.md §4): video token (f, h, w) of the patchified grid (Tv, Hp, Wp) sits at
(f, h, w). Audio token (i, m) of the audio grid (Ta, M) sits, in the released ``interleave_offset``
mode, at ``(ceil(linspace(0, Tv-1, Ta)[i]), Hp + i, Wp + m)``: the first axis is a time coordinate
shared with the video (the "temporal alignment"), axes 2 and 3 carry the audio step and frequency band
shifted past the video's spatial range.

The paper describes the aligned time index as a *rounding* of the interpolated position; the released
code (``get_video_audio_position_ids``) takes the **ceil** of a float64 ``torch.linspace``. The
checkpoint was trained with the ceil, so we use exactly that (same linspace algorithm, same dtype).

The head's 64 channel pairs are split over the axes as [22, 21, 21] (for head_dim 128); pair j of
an axis with D real channels turns at ``inv_freq_j = theta^(-2j/D)``. Tables are built in float64 and
stored as [L, head_dim/2], fp32 (or float64 for ``official`` numerics, the reference's complex128
precision); nothing complex-valued, nothing per-sample, so the same tables feed eager PyTorch, the
Triton kernels and ONNX export.
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from javisrt.engine.config import AudioPosMode
from javisrt.engine.errors import ShapeError


class TokenGrid(NamedTuple):
    """Token grid of one forward: video (Tv, Hp, Wp) and audio (Ta, M).

    A modality that is absent has zero tokens: t2a uses (Tv, 0, 0) for the video (Tv still sets the
    audio's time alignment), t2v uses (0, M) or (0, 0) for the audio.
    """

    video: tuple[int, int, int]
    audio: tuple[int, int]

    @property
    def num_video_tokens(self) -> int:
        t, h, w = self.video
        return t * h * w

    @property
    def num_audio_tokens(self) -> int:
        t, m = self.audio
        return t * m

    @property
    def num_tokens(self) -> int:
        return self.num_video_tokens + self.num_audio_tokens


def video_positions(grid: tuple[int, int, int]) -> torch.Tensor:
    """Integer positions (f, h, w) of the video tokens in raster order: [Tv*Hp*Wp, 3] float64."""
    tv, hp, wp = grid
    f, h, w = torch.meshgrid(
        torch.arange(tv, dtype=torch.float64),
        torch.arange(hp, dtype=torch.float64),
        torch.arange(wp, dtype=torch.float64),
        indexing="ij",
    )
    return torch.stack((f, h, w), dim=-1).reshape(-1, 3)


def aligned_time_index(video_frames: int, audio_steps: int) -> torch.Tensor:
    """``linspace(0, Tv-1, Ta)`` in float64 (torch's own algorithm): audio step -> video latent frame."""
    return torch.linspace(0, max(video_frames - 1, 0), audio_steps, dtype=torch.float64)


def audio_positions(
    video_grid: tuple[int, int, int], audio_grid: tuple[int, int], mode: AudioPosMode
) -> torch.Tensor:
    """Positions of the audio tokens (time-major, band-minor): [Ta*M, 3] float64 (§4.3)."""
    tv, hp, wp = video_grid
    ta, m = audio_grid
    i = torch.arange(ta, dtype=torch.float64)[:, None].expand(ta, m)
    band = torch.arange(m, dtype=torch.float64)[None, :].expand(ta, m)
    lin = aligned_time_index(tv, ta)[:, None].expand(ta, m)
    mode = AudioPosMode(mode)
    if mode is AudioPosMode.INTERLEAVE_OFFSET:
        # Released: ceil (not round) of the float64 linspace, as the training code did.
        pos = (lin.ceil(), hp + i, wp + band)
    elif mode is AudioPosMode.INTERLEAVE:
        pos = (lin.ceil(), i, band)
    elif mode is AudioPosMode.INTERPOLATE:
        pos = (lin, lin, band)
    else:  # VANILLA
        pos = (i, i, band)
    return torch.stack(pos, dim=-1).reshape(-1, 3)


def ta_rope_positions(grid: TokenGrid, mode: AudioPosMode) -> torch.Tensor:
    """Positions of the whole joint sequence, video tokens first: [L, 3] float64."""
    return torch.cat((video_positions(grid.video), audio_positions(grid.video, grid.audio, mode)))


def inverse_frequencies(axis_dims: tuple[int, ...], theta: float) -> list[torch.Tensor]:
    """Per-axis ``theta^(-2j/D)`` (float64), j < D/2, D the axis' real-channel count."""
    return [
        1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d) for d in axis_dims
    ]


def rope_angles(positions: torch.Tensor, axis_dims: tuple[int, ...], theta: float) -> torch.Tensor:
    """Rotation angle of every (token, channel pair): [L, sum(axis_dims)/2] float64."""
    if positions.ndim != 2 or positions.shape[1] != len(axis_dims):
        raise ShapeError(f"positions must be [L, {len(axis_dims)}], got {tuple(positions.shape)}")
    freqs = inverse_frequencies(axis_dims, theta)
    return torch.cat(
        [torch.outer(positions[:, a].double(), f) for a, f in enumerate(freqs)], dim=1
    )


def rope_cos_sin(
    grid: TokenGrid,
    mode: AudioPosMode,
    axis_dims: tuple[int, int, int],
    theta: float,
    device: torch.device | str | None = None,
    dtype: torch.dtype = torch.float32,
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos and sin tables for ``grid``: two [L, head_dim/2] tensors of ``dtype`` on ``device``.

    The angles are float64; ``dtype=torch.float64`` keeps the reference's complex128 precision
    (``official`` numerics), fp32 is what the kernels and the exported graphs take.
    """
    angles = rope_angles(ta_rope_positions(grid, mode), axis_dims, theta)
    return angles.cos().to(device, dtype), angles.sin().to(device, dtype)
