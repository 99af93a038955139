"""``TritonOps``: the "triton" implementation of the op seam (``engine/ops.py:OpSet``).

Same signatures, layouts and dtypes as the PyTorch references there; chosen with ``get_ops("triton")``
or ``JavisDiT.set_ops("triton")``. The fused kernels replace ``modulate``, ``attention`` and
``modality_ffn``; the ops without a kernel (timestep sinusoid, patch embedding, RMSNorm) are the
references, inherited from :class:`~javisrt.engine.ops.TorchOps`. On a CUDA device the kernels are
JIT-compiled by Triton; with ``TRITON_INTERPRET=1`` (set before this module is imported) they run on CPU
tensors, which is how the CPU tests exercise them.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from javisrt.engine.ops import Expert, Modulation, TorchOps, ffn_weights
from javisrt.kernels.adaln_modulate import adaln_modulate
from javisrt.kernels.modality_ffn import modality_ffn
from javisrt.kernels.rope_attention import rope_attention

__all__ = ["TritonOps"]


@dataclass(frozen=True)
class TritonOps(TorchOps):
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
        video: Expert | None,
        audio: Expert | None,
        video_mod: Modulation | None,
        audio_mod: Modulation | None,
        eps: float,
    ) -> torch.Tensor:
        video_w = None if video is None else ffn_weights(video)
        audio_w = None if audio is None else ffn_weights(audio)
        return modality_ffn(x, num_video_tokens, video_w, audio_w, video_mod, audio_mod, eps)
