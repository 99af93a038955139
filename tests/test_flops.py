"""engine/flops.py against the table of model-spec.md §8."""

from __future__ import annotations

import pytest

from javisrt.engine.config import JavisConfig
from javisrt.engine.flops import forward_flops
from javisrt.engine.rope import TokenGrid

CFG = JavisConfig.from_name("javisdit-v1.0")


@pytest.mark.parametrize(
    ("grid", "total", "proj", "core", "cross", "ffn"),
    [
        (TokenGrid((17, 15, 27), (52, 8)), 28.9e12, 4.13e12, 9.83e12, 2.21e12 + 0.69e12, 12.06e12),
        (TokenGrid((9, 15, 27), (28, 8)), 13.0e12, 2.19e12, 2.76e12, 1.24e12 + 0.37e12, 6.39e12),
        (TokenGrid((21, 30, 54), (64, 8)), 309.6e12, 19.55e12, 219.79e12, 9.92e12 + 3.26e12, 57.03e12),
        (TokenGrid((21, 30, 52), (64, 8)), 290.6e12, 18.84e12, 204.05e12, 9.56e12 + 3.14e12, 54.95e12),
    ],
    ids=["240p-65f", "240p-33f", "480p-854-81f", "480p-832-81f"],
)
def test_spec_table(grid: TokenGrid, total: float, proj: float, core: float, cross: float, ffn: float) -> None:
    f = forward_flops(CFG, grid)
    # tolerance = half a unit of the digit the spec prints: totals to 0.1 T, parts to 0.01 T
    # (the cross-attention entry is a sum of two printed parts)
    assert f.total == pytest.approx(total, abs=0.05e12)
    assert f.self_attn_proj == pytest.approx(proj, abs=0.005e12)
    assert f.self_attn_core == pytest.approx(core, abs=0.005e12)
    assert f.cross_attn_proj + f.cross_attn_core == pytest.approx(cross, abs=0.01e12)
    assert f.ffn == pytest.approx(ffn, abs=0.005e12)
    assert forward_flops(CFG, grid, batch=2).total == 2 * f.total


def test_audio_overhead_240p() -> None:
    """§8: +8.1% over a video-only forward at 240p/4 s (26.76 T -> 28.93 T)."""
    video_only = forward_flops(CFG, TokenGrid((17, 15, 27), (0, 0))).total
    assert video_only == pytest.approx(26.76e12, abs=0.005e12)
