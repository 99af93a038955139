"""FLOP accounting of one DiT forward (model-spec.md §8): FLOPs = 2 x MACs, elementwise ops ignored.

Per layer, with L = Lv + La tokens, d the width, f the FFN width, Lt text tokens:
  self-attn projections 8*L*d^2, self-attn core 4*L^2*d, cross-attn projections 4*L*d^2 + 4*Lt*d^2,
  cross-attn core 4*L*Lt*d, FFN 4*L*d*f (each token through exactly one expert of width f).
Outside the blocks: patch embeds, the text embedding and the heads.
"""

from __future__ import annotations

from typing import NamedTuple

from javisrt.engine.config import JavisConfig
from javisrt.engine.rope import TokenGrid


class ForwardFlops(NamedTuple):
    self_attn_proj: float
    self_attn_core: float
    cross_attn_proj: float
    cross_attn_core: float
    ffn: float
    outside_blocks: float

    @property
    def total(self) -> float:
        return float(sum(self))


def forward_flops(cfg: JavisConfig, grid: TokenGrid, batch: int = 1) -> ForwardFlops:
    """FLOPs of one forward over ``grid`` for ``batch`` samples (CFG doubles the batch)."""
    d, n, lt = cfg.dim, cfg.num_layers, cfg.text_len
    lv, la = grid.num_video_tokens, grid.num_audio_tokens
    length = lv + la
    pv = cfg.patch_size[0] * cfg.patch_size[1] * cfg.patch_size[2]
    pa = cfg.audio_patch_size[0] * cfg.audio_patch_size[1]
    outside = (
        2 * lv * pv * cfg.in_channels * d
        + 2 * la * pa * cfg.audio_in_channels * d
        + 2 * lt * (cfg.text_dim * d + d * d)
        + 2 * lv * d * cfg.video_patch_out
        + 2 * la * d * cfg.audio_patch_out
    )
    ffn = 4 * d * (lv * cfg.ffn_dim + la * cfg.audio_ffn_dim)
    parts = ForwardFlops(
        self_attn_proj=n * 8 * length * d * d,
        self_attn_core=n * 4 * length * length * d,
        cross_attn_proj=n * (4 * length * d * d + 4 * lt * d * d),
        cross_attn_core=n * 4 * length * lt * d,
        ffn=n * ffn,
        outside_blocks=outside,
    )
    return ForwardFlops(*(batch * float(p) for p in parts))
