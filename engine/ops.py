"""The one seam where an op implementation is chosen, by name (:func:`get_ops`).

The model (``engine/model.py``) is the only implementation of the network; it calls the functions of
an :class:`OpSet` for the ops that have more than one implementation, and nothing else in javisrt
branches on the implementation. The op sets:

  ``torch``                   eager PyTorch on any device: the numerical reference (this file).
  ``triton``                  fused Triton kernels (``kernels/ops_triton.py``).
  ``onnx-native``             what the native ONNX graph holds: opset-23 RMSNormalization, RotaryEmbedding
                              and Attention (``export/op_sets.py``).
  ``onnx-plugin``             the ``javisrt::`` plugin nodes for attention and the FFN (``export/op_sets.py``);
  ``onnx-plugin-native-ffn``  the same with the FFN left native (what TensorRT can build today).
  ``onnx-fp8``                attention written out as MatMul-Softmax-MatMul with modelopt's MHA quantizer
                              slots, for the FP8 Q/DQ graph (``export/op_sets.py``).
  ``triton-fp8``              the Triton kernels in e4m3 with calibrated per-tensor scales, the attention
                              Linears through ``torch._scaled_mm`` (``kernels/ops_triton_fp8.py``); it needs
                              its scales, so it is built by ``TritonFp8Ops.prepare``, not by name alone.

Per-layer state (FP8 scales, modelopt's quantizer slots) is found through two ops the model calls:
``ops.for_layer(module)`` (the op set for one attention module; the reference returns itself) and
``ops.linear(layer, x)`` for the quantized Linears (the reference calls the module, so modelopt's
quantized Linears take part).

Op sets outside ``engine/`` are imported by name on first use, so ``engine/`` never imports the layers
above it. Every op computes in the dtype of its inputs (the model decides the numerics: the
``official`` bf16 mode or the clean fp32 mode, see ``engine/model.py``).

Layouts (B batch, L tokens, H heads, D head_dim, d = H*D model width):
  q, k, v        [B, L, H, D]
  rope cos/sin   [L, D/2] fp32 (float64 in official numerics); pair j of a head is channels (2j, 2j+1) (the complex view of Wan/JavisDiT)
  x              [B, L, d]; tokens [0, Lv) are video, [Lv, L) audio
  shift/scale/gate  [B, 1, d]
"""

from __future__ import annotations

import functools
import importlib
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn.functional as F
from torch import nn

from javisrt.engine.errors import ConfigError

# name -> "module:class" of every op set; the class is constructed with no arguments (an op set that
# needs per-model state, triton-fp8, refuses that with a ConfigError saying what it needs).
OP_SETS: dict[str, str] = {
    "torch": "javisrt.engine.ops:TorchOps",
    "triton": "javisrt.kernels.ops_triton:TritonOps",
    "onnx-native": "javisrt.export.op_sets:NativeOps",
    "onnx-plugin": "javisrt.export.op_sets:PluginOps",
    "onnx-plugin-native-ffn": "javisrt.export.op_sets:PluginAttentionOps",
    "onnx-fp8": "javisrt.export.op_sets:Fp8Ops",
    "triton-fp8": "javisrt.kernels.ops_triton_fp8:TritonFp8Ops",
}


class FFNWeights(NamedTuple):
    """One expert: ``Linear(d->f)``, GELU-tanh, ``Linear(f->d)`` (nn.Linear layout: weight [out, in])."""

    w1: torch.Tensor  # [f, d]
    b1: torch.Tensor  # [f]
    w2: torch.Tensor  # [d, f]
    b2: torch.Tensor  # [d]

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return ffn_ref(x, self)


Expert = Callable[[torch.Tensor], torch.Tensor]
"""An FFN expert, x [..., d] -> [..., d]: the model's ``nn.Sequential`` (Linear, GELU-tanh, Linear), called
as a module so module replacements (modelopt's quantized Linears) take part, or bare :class:`FFNWeights`."""


def ffn_weights(expert: Expert) -> FFNWeights:
    """The weights of an expert, for kernels that take them as tensors."""
    if isinstance(expert, FFNWeights):
        return expert
    up, down = expert[0], expert[2]  # type: ignore[index]
    assert isinstance(up, nn.Linear) and isinstance(down, nn.Linear), "an expert is Linear, GELU, Linear"
    return FFNWeights(up.weight, up.bias, down.weight, down.bias)


class Modulation(NamedTuple):
    """adaLN chunks of one sub-layer, each [B, 1, d]."""

    shift: torch.Tensor
    scale: torch.Tensor
    gate: torch.Tensor


class OpSet(Protocol):
    @property
    def name(self) -> str: ...

    def for_layer(self, module: nn.Module) -> OpSet:
        """The op set to use inside ``module`` (an attention module of the model): op sets with
        per-layer state (scales, quantizer slots) bind it here; the others return themselves."""
        ...

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """``layer(x)`` for the quantizable Linears (attention q/k/v/o): x [..., in] -> [..., out]."""
        ...

    def sinusoid(self, t: torch.Tensor, dim: int) -> torch.Tensor: ...

    def patch_embed(self, conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor: ...

    def modulate(
        self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float
    ) -> torch.Tensor: ...

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor: ...

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
        video: Expert | None,
        audio: Expert | None,
        video_mod: Modulation | None,
        audio_mod: Modulation | None,
        eps: float,
    ) -> torch.Tensor: ...


# ---------------------------------------------------------------------------------------------------
# Reference implementations (PyTorch). The Triton kernels and the ONNX op sets are tested against these.
# ---------------------------------------------------------------------------------------------------


@functools.cache
def sinusoid_frequencies(half: int) -> tuple[float, ...]:
    """Wan's timestep frequencies ``w_i = 10000^(-i/half)``, i < half, in float64 (Python floats: equal,
    bit for bit, to Wan's ``torch.pow(10000, -arange(half).div(half))``; no tensor, so an exporter traces
    a tensor made from them as a constant)."""
    return tuple(10000.0 ** -(i / half) for i in range(half))


def sinusoid_of(t: torch.Tensor, omega: torch.Tensor) -> torch.Tensor:
    """``[cos(t*w), sin(t*w)]`` in the common dtype of t and omega: t [B], omega [half] -> [B, 2*half]."""
    angles = t[:, None] * omega[None, :]
    return torch.cat((angles.cos(), angles.sin()), dim=1)


def sinusoid_ref(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Wan's timestep sinusoid, computed in float64 and returned fp32: t [B] -> [B, dim]."""
    omega = torch.tensor(sinusoid_frequencies(dim // 2), dtype=torch.float64, device=t.device)
    return sinusoid_of(t.to(torch.float64), omega).float()


def patch_embed_ref(conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
    """The patch embedding in the conv's dtype: x [B, C, ...] -> [B, d, ...]."""
    return conv(x.to(conv.weight.dtype))  # type: ignore[no-any-return]


def modulate_ref(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift``; LayerNorm without affine, in the input dtype.

    x [B, L, d], shift/scale [B, 1, d] -> [B, L, d]. JavisDiT runs this LayerNorm in the activation
    dtype (bf16 at inference) where upstream Wan upcasts to fp32 (model-spec.md §3.4). ``int()``: the
    width is static, and TorchScript tracing (the FP8 export) records every size as a graph value,
    which a LayerNorm's ``normalized_shape`` cannot be.
    """
    return F.layer_norm(x, (int(x.shape[-1]),), eps=eps) * (1 + scale) + shift


def rms_norm_ref(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim, statistics in fp32, then the input dtype times ``weight``: x [..., d]."""
    xf = x.float()
    return (xf * torch.rsqrt(xf.pow(2).mean(dim=-1, keepdim=True) + eps)).type_as(x) * weight


def rotate_pairs(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of the last dim by angles whose cos/sin broadcast against
    ``x[..., D/2]``; in the tables' precision, at least fp32 (float64 tables: the reference's complex128
    ``mmrope_apply``; the exported graphs take fp32 tables), returned in x's dtype."""
    xf = x.to(torch.promote_types(cos.dtype, torch.float32)).unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    return torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1).flatten(-2).to(x.dtype)


def apply_rope_ref(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2j, 2j+1) of every head by the per-token angle table.

    x [B, L, H, D], cos/sin [L, D/2] fp32 or float64 -> [B, L, H, D] in x's dtype. Equals multiplying
    the complex view of x by exp(i*angle), computed in the tables' precision (at least fp32): float64
    tables give JavisDiT's ``mmrope_apply``, which does it in complex128 then casts back.
    """
    return rotate_pairs(x, cos[None, :, None, :], sin[None, :, None, :])


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
    video: Expert | None,
    audio: Expert | None,
    video_mod: Modulation | None,
    audio_mod: Modulation | None,
    eps: float,
) -> torch.Tensor:
    """MS-MoE FFN: hard routing by position, tokens [0, Lv) -> video expert, [Lv, L) -> audio expert.

    Each modality: ``x + FFN(LN(x) * (1 + scale) + shift) * gate`` with its own chunks; in a graph, a
    Slice per modality, the two experts, a Concat. x [B, L, d] -> [B, L, d]. An expert may be None only
    if its modality has no tokens.
    """
    parts = []
    for seg, expert, mod in (
        (x[:, :num_video_tokens], video, video_mod),
        (x[:, num_video_tokens:], audio, audio_mod),
    ):
        if seg.shape[1] == 0:
            continue
        if expert is None or mod is None:
            raise ConfigError("tokens present for a modality whose FFN expert is not built")
        parts.append(seg + expert(modulate_ref(seg, mod.shift, mod.scale, eps)) * mod.gate)
    return torch.cat(parts, dim=1) if len(parts) > 1 else parts[0]


@dataclass(frozen=True)
class TorchOps:
    """Eager PyTorch on any device; the numerical reference for every other implementation.

    Other op sets derive from it and replace the ops they implement differently.
    """

    name: str = "torch"

    def for_layer(self, module: nn.Module) -> OpSet:
        return self

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        return layer(x)  # type: ignore[no-any-return]  # called as a module: quantized replacements take part

    def sinusoid(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return sinusoid_ref(t, dim)

    def patch_embed(self, conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        return patch_embed_ref(conv, x)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return modulate_ref(x, shift, scale, eps)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return rms_norm_ref(x, weight, eps)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        return attention_ref(q, k, v, rope)

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
        return modality_ffn_ref(x, num_video_tokens, video, audio, video_mod, audio_mod, eps)


def get_ops(name: str) -> OpSet:
    """The op set called ``name`` (one of :data:`OP_SETS`), its module imported on first use."""
    if name not in OP_SETS:
        raise ConfigError(f"unknown op set {name!r}; choose one of {tuple(OP_SETS)}")
    module, cls = OP_SETS[name].split(":")
    return getattr(importlib.import_module(module), cls)()  # type: ignore[no-any-return]
