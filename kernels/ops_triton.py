"""``TritonOps``: the "triton" implementation of the op seam (``engine/ops.py:OpSet``).

Same signatures, layouts and dtypes as the PyTorch references there; chosen with ``get_ops("triton")``
or ``JavisDiT.set_ops("triton")``. On a CUDA device the kernels are JIT-compiled by Triton; with
``TRITON_INTERPRET=1`` (set before this module is imported) they run on CPU tensors, which is how the
CPU tests exercise them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from javisrt.engine.ops import FFNWeights, Modulation
from javisrt.kernels.adaln_modulate import adaln_modulate
from javisrt.kernels.modality_ffn import modality_ffn
from javisrt.kernels.rope_attention import rope_attention

__all__ = ["TritonOps"]


@dataclass(frozen=True)
class TritonOps:
    """Fused Triton kernels: adaLN modulation, RoPE flash attention, the two-expert FFN."""

    name: str = "triton"

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return adaln_modulate(x, shift, scale, eps)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        # The kernel rotates in fp32: float64 tables (official numerics) are rounded to fp32 here,
        # a 4e-4-relative difference from the reference's complex128 RoPE at the released width.
        if rope is not None and rope[0].dtype != torch.float32:
            rope = (rope[0].float(), rope[1].float())
        return rope_attention(q, k, v, rope)

    def modality_ffn(
        self,
        x: torch.Tensor,
        num_video_tokens: int,
        video: FFNWeights | None,
        audio: FFNWeights | None,
        video_mod: Modulation | None,
        audio_mod: Modulation | None,
        eps: float,
    ) -> torch.Tensor:
        return modality_ffn(x, num_video_tokens, video, audio, video_mod, audio_mod, eps)
