"""The one seam where an op implementation is chosen: ``"torch"`` (any device) or ``"triton"`` (CUDA).

The model calls only the functions of an :class:`OpSet`; nothing else in javisrt branches on the
implementation. Every op computes in the dtype of its inputs (the model decides the numerics: the
``official`` bf16 mode or the clean fp32 mode, see ``engine/model.py``).

Layouts (B batch, L tokens, H heads, D head_dim, d = H*D model width):
  q, k, v        [B, L, H, D]
  rope cos/sin   [L, D/2] fp32 (float64 in official numerics); pair j of a head is channels (2j, 2j+1) (the complex view of Wan/JavisDiT)
  x              [B, L, d]; tokens [0, Lv) are video, [Lv, L) audio
  shift/scale/gate  [B, 1, d]
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F

from javisrt.engine.errors import ConfigError

IMPLEMENTATIONS = ("torch", "triton")


class FFNWeights(NamedTuple):
    """One expert: ``Linear(d->f)``, GELU-tanh, ``Linear(f->d)`` (nn.Linear layout: weight [out, in])."""

    w1: torch.Tensor  # [f, d]
    b1: torch.Tensor  # [f]
    w2: torch.Tensor  # [d, f]
    b2: torch.Tensor  # [d]


class Modulation(NamedTuple):
    """adaLN chunks of one sub-layer, each [B, 1, d]."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class OpSet(Protocol):
    @property
    def name(self) -> str: ...

    def modulate(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> torch.Tensor: ...

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor: ...

    def modality_ffn(
        self,
        x: torch.Tensor,
        num_video_tokens: int,
        video: FFNWeights | None,
        audio: FFNWeights | None,
        video_mod: Modulation | None,
        audio_mod: Modulation | None,
        eps: float,
    ) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------
# Reference implementations (PyTorch). The Triton kernels are tested against these.
# ---------------------------------------------------------------------------------------------------


def modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift``; LayerNorm without affine, in the input dtype.

    x [B, L, d], shift/scale [B, 1, d] -> [B, L, d]. JavisDiT runs this LayerNorm in the activation
    dtype (bf16 at inference) where upstream Wan upcasts to fp32 (model-spec.md §3.4).
    """
    return F.layer_norm(x, (x.shape[-1],), eps=eps) * (1 + scale) + shift


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of every head by the per-token angle table.

    x [B, L, H, D], cos/sin [L, D/2] fp32 or float64 -> [B, L, H, D] in x's dtype. Equals multiplying
    the complex view of x by exp(i*angle), computed in the tables' precision (at least fp32): float64
    tables give JavisDiT's ``mmrope_apply``, which does it in complex128 then casts back.
    """
    xf = x.to(torch.promote_types(cos.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c = cos[None, :, None, :]
    s = sin[None, :, None, :]
    out = torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2)
    return out.to(x.dtype)


def attention_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
) -> torch.Tensor:
    """Non-causal softmax attention, scale 1/sqrt(D), RoPE on q and k when given.

    q [B, Lq, H, D], k/v [B, Lk, H, D], rope (cos, sin) [Lq, D/2] (self-attention: Lq == Lk)
    -> [B, Lq, H, D].
    """
    if rope is not None:
        cos, sin = rope
        q = apply_rope_ref(q, cos, sin)
        k = apply_rope_ref(k, cos, sin)
    out = F.scaled_dot_product_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def ffn_ref(x: torch.Tensor, w: FFNWeights) -> torch.Tensor:
    """``Linear(f->d)(GELU_tanh(Linear(d->f)(x)))``: x [..., d] -> [..., d]."""
    return F.linear(F.gelu(F.linear(x, w.w1, w.b1), approximate="tanh"), w.w2, w.b2)


def modality_ffn_ref(
    x: torch.Tensor,
    num_video_tokens: int,
    video: FFNWeights | None,
    audio: FFNWeights | None,
    video_mod: Modulation | None,
    audio_mod: Modulation | None,
    eps: float,
) -> torch.Tensor:
    """MS-MoE FFN: hard routing by position, tokens [0, Lv) -> video expert, [Lv, L) -> audio expert.

    Each modality: ``x + FFN(LN(x) * (1 + scale) + shift) * gate`` with its own chunks.
    x [B, L, d] -> [B, L, d]. An expert may be None only if its modality has no tokens.
    """
    parts = []
    for seg, w, mod in (
        (x[:, :num_video_tokens], video, video_mod),
        (x[:, num_video_tokens:], audio, audio_mod),
    ):
        if seg.shape[1] == 0:
            continue
        if w is None or mod is None:
            raise ConfigError("tokens present for a modality whose FFN expert is not built")
        parts.append(seg + ffn_ref(modulate_ref(seg, mod.shift, mod.scale, eps), w) * mod.gate)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class TorchOps:
    """Eager PyTorch on any device; the numerical reference for every other implementation."""

    name: str = "torch"

    def modulate(self, x, shift, scale, eps):  # type: ignore[no-untyped-def]
        return modulate_ref(x, shift, scale, eps)

    def attention(self, q, k, v, rope):  # type: ignore[no-untyped-def]
        return attention_ref(q, k, v, rope)

    def modality_ffn(self, x, num_video_tokens, video, audio, video_mod, audio_mod, eps):  # type: ignore[no-untyped-def]
        return modality_ffn_ref(x, num_video_tokens, video, audio, video_mod, audio_mod, eps)


def get_ops(name: str) -> OpSet:
    """The op set called ``name``: "torch" here, "triton" from ``javisrt.kernels.ops_triton``."""
    if name == "torch":
        return TorchOps()
    if name == "triton":
        module = importlib.import_module("javisrt.kernels.ops_triton")
        return module.TritonOps()  # type: ignore[no-any-return]
    raise ConfigError(f"unknown op implementation {name!r}; choose one of {IMPLEMENTATIONS}")
