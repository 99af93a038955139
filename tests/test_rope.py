"""engine/rope.py: TA-RoPE positions (model-spec.md §4.3–4.4) and the real cos/sin tables."""

from __future__ import annotations

import math

import pytest
import torch

from javisrt.engine.config import AudioPosMode
from javisrt.engine.ops import apply_rope_ref
from javisrt.engine.rope import TokenGrid, audio_positions, inverse_frequencies, rope_cos_sin, ta_rope_positions

# model-spec.md §4.4: 240p, 65 frames -> video grid (17, 15, 27), audio grid (52, 8).
SPEC_240P_T_POS = [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 6, 7, 7, 7, 8, 8, 8, 9, 9, 9, 10, 10,
                   10, 11, 11, 11, 11, 12, 12, 12, 13, 13, 13, 14, 14, 14, 15, 15, 15, 16, 16, 16, 16]
GRID_240P = TokenGrid((17, 15, 27), (52, 8))


def test_240p_65f_time_positions_match_spec() -> None:
    pos = audio_positions(GRID_240P.video, GRID_240P.audio, AudioPosMode.INTERLEAVE_OFFSET).view(52, 8, 3)
    assert pos[:, 0, 0].long().tolist() == SPEC_240P_T_POS
    counts = torch.bincount(pos[:, 0, 0].long()).tolist()
    assert counts == [1, 3, 3, 3, 3, 3, 4, 3, 3, 3, 3, 4, 3, 3, 3, 3, 4]


def test_240p_65f_position_table_matches_spec() -> None:
    pos = ta_rope_positions(GRID_240P, AudioPosMode.INTERLEAVE_OFFSET)
    lv = 17 * 15 * 27
    assert pos.shape == (6885 + 416, 3)

    def audio(i: int, m: int) -> list[int]:
        return pos[lv + i * 8 + m].long().tolist()

    assert pos[0].long().tolist() == [0, 0, 0]
    assert pos[lv - 1].long().tolist() == [16, 14, 26]
    assert audio(0, 0) == [0, 15, 27]
    assert audio(1, 7) == [1, 16, 34]
    assert audio(10, 3) == [4, 25, 30]
    assert audio(51, 0) == [16, 66, 27]
    # video raster order (f, h, w): token index = (f*Hp + h)*Wp + w
    assert pos[(5 * 15 + 7) * 27 + 3].long().tolist() == [5, 7, 3]


def test_480p_81f_prefix_and_suffix() -> None:
    pos = audio_positions((21, 30, 54), (64, 8), AudioPosMode.INTERLEAVE_OFFSET).view(64, 8, 3)
    t = pos[:, 0, 0].long().tolist()
    assert t[:24] == [0, 1, 1, 1, 2, 2, 2, 3, 3, 3, 4, 4, 4, 5, 5, 5, 6, 6, 6, 7, 7, 7, 7, 8]
    assert t[-4:] == [20, 20, 20, 20]
    assert pos[0, 0, 1:].tolist() == [30, 54] and pos[63, 7, 1:].tolist() == [93, 61]


@pytest.mark.parametrize("frames", [33, 49, 65, 81])
def test_integer_form_of_ceil_linspace(frames: int) -> None:
    """model-spec.md §4.3/§11.9: ceil(i*(Tv-1)/(Ta-1)) equals the float64 linspace + ceil used."""
    tv = (frames - 1) // 4 + 1
    mel = math.ceil(int(frames / 16 / 0.01) / 32) * 32
    ta = mel // 8
    pos = audio_positions((tv, 1, 1), (ta, 1), AudioPosMode.INTERLEAVE_OFFSET)[:, 0].long().tolist()
    assert pos == [-((-i * (tv - 1)) // (ta - 1)) for i in range(ta)]


def test_ablation_modes_on_a_small_grid() -> None:
    video, audio = (3, 2, 2), (5, 2)  # linspace(0, 2, 5) = 0, .5, 1, 1.5, 2
    lin = [0.0, 0.5, 1.0, 1.5, 2.0]
    expect = {
        AudioPosMode.INTERLEAVE_OFFSET: [[math.ceil(lin[i]), 2 + i, 2 + m] for i in range(5) for m in range(2)],
        AudioPosMode.INTERLEAVE: [[math.ceil(lin[i]), i, m] for i in range(5) for m in range(2)],
        AudioPosMode.INTERPOLATE: [[lin[i], lin[i], m] for i in range(5) for m in range(2)],
        AudioPosMode.VANILLA: [[i, i, m] for i in range(5) for m in range(2)],
    }
    for mode, rows in expect.items():
        assert audio_positions(video, audio, mode).tolist() == rows, mode


def test_audio_only_grid_has_no_offsets() -> None:
    """t2a: the video grid is (Tv, 0, 0), so audio positions are (t_pos, i, m)."""
    pos = ta_rope_positions(TokenGrid((17, 0, 0), (52, 8)), AudioPosMode.INTERLEAVE_OFFSET)
    assert pos.shape == (416, 3)
    assert pos[8 * 10 + 3].long().tolist() == [4, 10, 3]


def mmrope_apply(x: torch.Tensor, freqs: torch.Tensor) -> torch.Tensor:
    """The reference's RoPE (JavisDiT ``mmrope_apply``): complex128 product, cast back to x's dtype."""
    xc = torch.view_as_complex(x.to(torch.float64).reshape(*x.shape[:-1], -1, 2))
    return torch.view_as_real(xc * freqs[None, :, None, :]).flatten(3).to(x.dtype)


def reference_freqs(pos: torch.Tensor, axes: tuple[int, ...], theta: float) -> torch.Tensor:
    """The reference's ``rope_cos_sin``: polar(1, outer(pos_a, inv_freq_a)) per axis, complex128."""
    return torch.cat(
        [torch.polar(torch.ones(len(pos), d // 2, dtype=torch.float64),
                     torch.outer(pos[:, a], 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)))
         for a, d in enumerate(axes)],
        dim=1,
    )


def test_real_tables_equal_complex_rotation() -> None:
    """Independent reference: the official complex128 form, polar(1, outer(pos_a, inv_freq_a)) per axis."""
    grid = TokenGrid((3, 4, 5), (6, 8))
    axes, theta = (12, 10, 10), 10000.0
    cos, sin = rope_cos_sin(grid, AudioPosMode.INTERLEAVE_OFFSET, axes, theta)
    freqs = reference_freqs(ta_rope_positions(grid, AudioPosMode.INTERLEAVE_OFFSET), axes, theta)
    x = torch.randn(2, grid.num_tokens, 3, 32, dtype=torch.float64)
    out = apply_rope_ref(x.float(), cos, sin)
    assert (out.double() - mmrope_apply(x, freqs)).abs().max() < 1e-5  # fp32 rotation of O(1) values
    assert [f.numel() for f in inverse_frequencies(axes, theta)] == [6, 5, 5]


def test_float64_tables_reproduce_the_bf16_reference_exactly() -> None:
    """``official`` numerics: float64 tables make the bf16 result equal the reference's complex128
    ``mmrope_apply`` bit for bit; fp32 tables (the kernels' and graphs') flip some bf16 roundings."""
    grid = TokenGrid((5, 15, 27), (52, 8))  # 240p/65f spatial extent, so angles reach the released range
    axes, theta = (44, 42, 42), 10000.0
    freqs = reference_freqs(ta_rope_positions(grid, AudioPosMode.INTERLEAVE_OFFSET), axes, theta)
    x = torch.randn(2, grid.num_tokens, 4, 128).to(torch.bfloat16)  # 2.5M values: about 12 flips
    want = mmrope_apply(x, freqs)
    cos64, sin64 = rope_cos_sin(grid, AudioPosMode.INTERLEAVE_OFFSET, axes, theta, dtype=torch.float64)
    assert cos64.dtype == torch.float64
    assert torch.equal(apply_rope_ref(x, cos64, sin64), want)
    cos32, sin32 = rope_cos_sin(grid, AudioPosMode.INTERLEAVE_OFFSET, axes, theta)
    flipped = int((apply_rope_ref(x, cos32, sin32) != want).sum())
    assert flipped > 0, "fp32 tables should differ from complex128 somewhere (else this test cannot fail)"
    print(f"fp32 tables: {flipped} of {x.numel()} bf16 values differ from the complex128 reference")
