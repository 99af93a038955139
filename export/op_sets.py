"""The op sets of the exported graphs: what each ONNX flavour holds in place of an eager op.

They plug into the one op seam (``engine/ops.py``, :func:`~javisrt.engine.ops.get_ops` imports this module
by name), so the exported graph is a trace of ``JavisDiT``'s own stages; nothing here re-states the
network. Each op set derives from the torch reference and replaces only what its graph spells differently:

``onnx-native``             RMSNorm as opset-23 ``RMSNormalization`` (fp32 statistics), RoPE as
                            ``RotaryEmbedding`` (interleaved pairs, fp32), attention as ``Attention`` with
                            the softmax in fp32; the FFN is the reference's Slice -> two experts -> Concat.
``onnx-plugin``             attention as ``javisrt::rope_attention`` / ``javisrt::attention`` and the FFN as
                            one ``javisrt::modality_ffn`` node (:mod:`javisrt.export.plugin_ops`).
``onnx-plugin-native-ffn``  the attention plugins only: TensorRT has no AOT plugin for the FFN yet (two
                            launches, ``export/trt_plugins.NOT_AOT``), so this graph is one it can build.
``onnx-fp8``                attention written out as MatMul-Softmax-MatMul with modelopt's MHA quantizer
                            slots (:data:`MHA_SLOTS`); the graph ``export/quantize.py`` fake-quantizes and
                            exports through the TorchScript exporter (opset 20, no opset-23 ops).

All of them compute the timestep sinusoid in fp32 (:class:`GraphOps`): a graph holds no float64
(TensorRT has none).

The plugin nodes have no eager meaning (``torch.onnx.ops.symbolic`` returns zeros outside an export), so
:class:`PluginOps` emits them only while exporting and runs the torch reference otherwise: the same
reference ONNX Runtime runs for those nodes (``plugin_ops.ort_session``).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from javisrt.engine.errors import ShapeError
from javisrt.engine.ops import (
    Expert,
    Modulation,
    TorchOps,
    attention_ref,
    ffn_weights,
    modality_ffn_ref,
    patch_embed_ref,
    rotate_pairs,
    sinusoid_frequencies,
    sinusoid_of,
)
from javisrt.export import plugin_ops

__all__ = ["MHA_SLOTS", "Fp8Ops", "GraphOps", "NativeOps", "PluginAttentionOps", "PluginOps"]

# The MHA quantizer slots of one attention, modelopt's names: q after RoPE and the 1/sqrt(D) scale, K^T,
# V, and the softmax output P.
MHA_SLOTS = ("q_bmm_quantizer", "k_bmm_quantizer", "v_bmm_quantizer", "softmax_quantizer")


@dataclass(frozen=True)
class GraphOps(TorchOps):
    """The torch reference, with the timestep sinusoid in fp32 (the base of every graph op set)."""

    name: str = "onnx"

    def sinusoid(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        """fp32 angles ``t*w``: error <= 0.5 ulp(1000) = 3e-5 rad against the float64 reference."""
        omega = torch.tensor(sinusoid_frequencies(dim // 2), dtype=torch.float32, device=t.device)
        return sinusoid_of(t.float(), omega)


@dataclass(frozen=True)
class NativeOps(GraphOps):
    """Opset-23 ``RMSNormalization``, ``RotaryEmbedding`` and ``Attention`` (their eager implementations
    outside an export, ``torch.onnx.ops``)."""

    name: str = "onnx-native"

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        return F.rms_norm(x.float(), (x.shape[-1],), None, eps).to(x.dtype) * weight

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """The ONNX ops' 3D layout [B, L, H*D]: q/k/v [B, L, H, D] -> [B, Lq, H, D]."""
        b, h = q.shape[0], q.shape[2]
        q3, k3, v3 = (t.flatten(2) for t in (q, k, v))
        if rope is not None:
            cos, sin = (c[None].expand(b, -1, -1) for c in rope)
            # RoPE in fp32 (the tables are fp32; the reference rotates in fp32 and casts back)
            q3 = torch.onnx.ops.rotary_embedding(q3.float(), cos, sin, interleaved=True, num_heads=h).to(q.dtype)
            k3 = torch.onnx.ops.rotary_embedding(k3.float(), cos, sin, interleaved=True, num_heads=h).to(k.dtype)
        # softmax_precision=1: softmax in fp32 whatever the activation dtype (TensorProto.FLOAT).
        out, *_ = torch.onnx.ops.attention(q3, k3, v3, q_num_heads=h, kv_num_heads=h, softmax_precision=1)
        return out.unflatten(-1, (h, -1))


@dataclass(frozen=True)
class PluginOps(GraphOps):
    """``javisrt::`` plugin nodes for attention and (``ffn_plugin``) the MS-MoE FFN."""

    name: str = "onnx-plugin"
    ffn_plugin: bool = True

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        if not torch.onnx.is_in_onnx_export():
            return attention_ref(q, k, v, rope)
        if rope is not None:
            return plugin_ops.rope_attention(q, k, v, *rope)
        return plugin_ops.attention(q, k, v)

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
        if not (self.ffn_plugin and torch.onnx.is_in_onnx_export()):
            return modality_ffn_ref(x, num_video_tokens, video, audio, video_mod, audio_mod, eps)
        if video is None or video_mod is None:
            raise ShapeError("the modality_ffn plugin graph needs the video expert (a t2a graph is not exported)")
        # Both experts stacked on a leading axis of 2 (video, audio): one pointer + stride per GEMM operand.
        # A t2v network repeats the video expert (never read: Lv = L).
        experts = (ffn_weights(video), ffn_weights(audio if audio is not None else video))
        w1, b1, w2, b2 = (torch.stack(ws) for ws in zip(*experts))
        mods = (video_mod, audio_mod if audio_mod is not None else video_mod)
        mod = torch.stack([torch.stack([c.squeeze(1) for c in m]) for m in mods])  # [2, 3, B, d]
        return plugin_ops.modality_ffn(x, mod, w1, b1, w2, b2, num_video_tokens, eps)


@dataclass(frozen=True)
class PluginAttentionOps(PluginOps):
    """The attention plugins, the FFN native (Slice -> two experts -> Concat)."""

    name: str = "onnx-plugin-native-ffn"
    ffn_plugin: bool = False


def _identity(t: torch.Tensor) -> torch.Tensor:
    return t


@dataclass(frozen=True)
class Fp8Ops(GraphOps):
    """The FP8 Q/DQ graph's op set: attention as MatMul-Softmax-MatMul with the :data:`MHA_SLOTS`.

    ``slots`` is the attention module whose quantizers apply: :mod:`javisrt.export.quantize` registers
    with modelopt a quantized version of the model's attention modules that creates the four slots, and
    the model hands each attention module to the op set (``ops.for_layer(self)``, the op seam's per-layer
    hook). Unbound (``slots`` None, or a module without the slots), every slot is an identity.
    """

    name: str = "onnx-fp8"
    slots: nn.Module | None = None

    def for_layer(self, module: nn.Module) -> Fp8Ops:
        """This op set with ``module``'s MHA quantizer slots (none if it has none: not quantized)."""
        return dataclasses.replace(self, slots=module if hasattr(module, MHA_SLOTS[0]) else None)

    def _slot(self, name: str) -> Callable[[torch.Tensor], torch.Tensor]:
        return getattr(self.slots, name) if self.slots is not None else _identity  # type: ignore[no-any-return]

    def patch_embed(self, conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        """The FP8 graph is exported at opset 20, where ONNX Conv has no bf16: a bf16 embedding runs in fp32
        on the bf16-valued weights and is rounded after, one rounding fewer than the reference's bf16 conv."""
        if conv.weight.dtype != torch.bfloat16:
            return patch_embed_ref(conv, x)
        conv_fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
        bias = None if conv.bias is None else conv.bias.float()
        return conv_fn(x.float(), conv.weight.float(), bias, conv.stride).to(conv.weight.dtype)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """``attention_ref`` written out, a quantizer slot directly before both MatMuls (TensorRT FP8 MHA
        fusion, tensorrt-notes §3): RoPE, then the 1/sqrt(D) scale, then q's slot; K transposed, then its
        slot; softmax in fp32, then P's slot (fixed amax 1 -> scale 1/448); V's slot.
        q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D]."""
        q4, k4, v4 = (t.transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        if rope is not None:
            cos, sin = (c[None, None] for c in rope)
            q4, k4 = rotate_pairs(q4, cos, sin), rotate_pairs(k4, cos, sin)
        qs = self._slot("q_bmm_quantizer")(q4 * (1.0 / math.sqrt(q4.shape[-1])))
        kt = self._slot("k_bmm_quantizer")(k4.transpose(-1, -2))
        p = torch.softmax(torch.matmul(qs, kt).float(), dim=-1).to(q.dtype)
        out = torch.matmul(self._slot("softmax_quantizer")(p), self._slot("v_bmm_quantizer")(v4))
        return out.transpose(1, 2)
