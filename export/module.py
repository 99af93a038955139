"""``ExportableDiT``: the JavisDiT forward with the RoPE tables as inputs, written for graph capture.

Why a wrapper and not ``JavisDiT.forward``: the export needs (1) the TA-RoPE cos/sin tables as graph
inputs (built once per shape on the host, :meth:`DiTContract.rope_tables`), (2) every token count
read from tensor shapes, never from Python ints, so one graph serves every shape under both exporters
(dynamo for the native/plugin flavours, TorchScript for modelopt's FP8 path), (3) the op choice per
*graph flavour*, which is not the eager op seam of ``engine/ops.py``:

  ``native``  opset-23 ``RMSNormalization``, ``RotaryEmbedding`` (interleaved pairs) and
              ``Attention`` (softmax in fp32); the MS-MoE FFN as Slice -> two expert MLPs -> Concat.
  ``plugin``  ``javisrt::rope_attention`` / ``javisrt::attention`` / ``javisrt::modality_ffn`` nodes
              (:mod:`javisrt.export.plugin_ops` declares their I/O and attributes).
  ``math``    RoPE as real cos/sin arithmetic, attention as MatMul-Softmax-MatMul with the MHA
              quantizer slots modelopt fills (``q/k/v_bmm_quantizer``, ``softmax_quantizer``), RMSNorm
              decomposed: the FP8 Q/DQ path (the TorchScript exporter has no opset-23 ops).

The wrapper holds no weights of its own (plugin flavour: stacked views of the expert weights); it calls
the model's own modules (patch/time/text embeddings, q/k/v/o, FFN experts, heads, unpatchify), so a
checkpoint loaded into ``JavisDiT`` is what gets exported, and modelopt's module replacement
(``nn.Linear`` -> ``QuantLinear``) is seen. The block arithmetic mirrors ``engine.model.Block.forward``
step by step (same numbered sections); ``tests/test_export.py`` checks it against ``JavisDiT.forward``.
"""

from __future__ import annotations

import enum
import math

import torch
import torch.nn.functional as F
from torch import nn

from javisrt.engine.model import JavisDiT, RMSNorm
from javisrt.engine.model import Head
from javisrt.engine.ops import FFNWeights, Modulation, apply_rope_ref, attention_ref, modality_ffn_ref
from javisrt.export import plugin_ops


class Flavor(enum.StrEnum):
    NATIVE = "native"
    PLUGIN = "plugin"
    MATH = "math"


def _exporting() -> bool:
    return bool(torch.onnx.is_in_onnx_export())


def rope_math(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """RoPE on x [B, H, L, D] with cos/sin [L, D/2] as plain arithmetic (exports under any exporter)."""
    xf = x.float().unflatten(-1, (-1, 2))
    x0, x1 = xf[..., 0], xf[..., 1]
    c, s = cos[None, None], sin[None, None]
    return torch.stack((x0 * c - x1 * s, x0 * s + x1 * c), dim=-1).flatten(-2).to(x.dtype)


class AttentionCore(nn.Module):
    """Softmax attention over [B, L, H*D] projections with MHA quantizer slots (math flavour).

    The quantizers are identities until :mod:`javisrt.export.quantize` replaces them with modelopt
    ``TensorQuantizer`` modules. Order (TensorRT FP8 MHA fusion, tensorrt-notes §3): RoPE, then the
    1/sqrt(D) scale, then Q/DQ of q; K transposed, then Q/DQ; softmax in fp32, then the fixed-scale
    (amax 1 -> 1/448) Q/DQ; V Q/DQ; so a DQ sits directly before both MatMuls.
    """

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_bmm_quantizer: nn.Module = nn.Identity()
        self.k_bmm_quantizer: nn.Module = nn.Identity()
        self.v_bmm_quantizer: nn.Module = nn.Identity()
        self.softmax_quantizer: nn.Module = nn.Identity()

    def forward(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        """q [B, Lq, d], k/v [B, Lk, d], rope (cos, sin) [Lq, D/2] | None -> [B, Lq, d]."""
        heads = (self.num_heads, -1)
        q4, k4, v4 = (t.unflatten(-1, heads).transpose(1, 2) for t in (q, k, v))  # [B, H, L, D]
        if rope is not None:
            q4 = rope_math(q4, *rope)
            k4 = rope_math(k4, *rope)
        q4 = self.q_bmm_quantizer(q4 * (1.0 / math.sqrt(q4.shape[-1])))
        kt = self.k_bmm_quantizer(k4.transpose(-1, -2))
        p = torch.softmax(torch.matmul(q4, kt).float(), dim=-1).to(q.dtype)
        out = torch.matmul(self.softmax_quantizer(p), self.v_bmm_quantizer(v4))
        return out.transpose(1, 2).flatten(2)


class ExportableDiT(nn.Module):
    """``forward(video, audio, timestep, context, rope_cos, rope_sin) -> (video_velocity, audio_velocity)``.

    Shapes and names: :class:`javisrt.export.contract.DiTContract`. A t2v network takes no ``audio``
    and returns only the video velocity.
    """

    omega: torch.Tensor  # timestep sinusoid frequencies (a non-persistent buffer)

    def __init__(self, model: JavisDiT, flavor: Flavor | str = Flavor.NATIVE, ffn_plugin: bool = True) -> None:
        super().__init__()
        self.model = model
        self.flavor = Flavor(flavor)
        # Plugin flavour only: the MS-MoE FFN as one javisrt::modality_ffn node (True) or as the native
        # Slice -> two experts -> Concat subgraph (False). TensorRT has no AOT plugin for the FFN yet
        # (two launches; see export/trt_plugins.NOT_AOT), so False gives a plugin graph it can build.
        self.ffn_plugin = ffn_plugin and self.flavor is Flavor.PLUGIN
        cfg = model.cfg
        self.num_heads = cfg.num_heads
        self.dim = cfg.dim
        self.has_audio = cfg.has_audio
        # Timestep sinusoid frequencies, built in float64 like the model, stored fp32 (no float64 in the
        # graph: TensorRT has no fp64 compute). Error of the fp32 angle t*w: <= 0.5 ulp(1000) = 3e-5 rad.
        half = cfg.freq_dim // 2
        omega = torch.pow(10000.0, -torch.arange(half, dtype=torch.float64).div(half))
        self.register_buffer("omega", omega.float(), persistent=False)
        if self.flavor is Flavor.MATH:
            self.self_cores = nn.ModuleList(AttentionCore(cfg.num_heads) for _ in model.blocks)
            self.cross_cores = nn.ModuleList(AttentionCore(cfg.num_heads) for _ in model.blocks)
        if self.ffn_plugin:
            # Both experts stacked on a leading axis of 2 (video, audio): one pointer + stride per GEMM
            # operand for the plugin. A t2v network repeats the video expert (never read: Lv = L).
            for i, block in enumerate(model.blocks):
                experts = (block.ffn, block.audio_ffn) if cfg.has_audio else (block.ffn, block.ffn)
                for key, idx in (("w1", (0, "weight")), ("b1", (0, "bias")), ("w2", (2, "weight")), ("b2", (2, "bias"))):
                    stacked = torch.stack([getattr(e[idx[0]], idx[1]).detach() for e in experts])
                    self.register_buffer(f"ffn{i}_{key}", stacked, persistent=False)

    # ---- pieces --------------------------------------------------------------------------------
    # LayerNorm widths are the static model width, never ``x.shape[-1]``: the TorchScript exporter
    # cannot take a traced size as ``normalized_shape``.
    def _modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        """``engine.ops.modulate_ref``: LayerNorm (no affine, input dtype) * (1 + scale) + shift."""
        return F.layer_norm(x, (self.dim,), eps=eps) * (1 + scale) + shift

    def _patch(self, conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor, act: torch.dtype) -> torch.Tensor:
        """Patch embedding. The FP8 graph (math flavour) is exported at opset 20, where ONNX Conv has no
        bf16: there the (unquantized, small) embedding runs in fp32 on the bf16-valued weights and is
        rounded to the activation dtype after, one rounding fewer than the reference's bf16 conv."""
        if self.flavor is Flavor.MATH and act == torch.bfloat16:
            conv_fn = F.conv3d if isinstance(conv, nn.Conv3d) else F.conv2d
            bias = None if conv.bias is None else conv.bias.float()
            return conv_fn(x.float(), conv.weight.float(), bias, conv.stride).to(act)
        return conv(x.to(act))  # type: ignore[no-any-return]

    def _head(self, head: Head, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """``engine.model.Head.forward``: x [B, N, d], e [B, d] fp32 -> [B, N, out] fp32."""
        shift, scale = (head.modulation + e[:, None, :]).chunk(2, dim=1)
        y = F.layer_norm(x, (self.dim,), eps=head.eps).float() * (1 + scale) + shift
        return head.head(y)  # type: ignore[no-any-return]

    def _rms(self, norm: RMSNorm, y: torch.Tensor) -> torch.Tensor:
        """RMSNorm with fp32 statistics (``engine.model.RMSNorm``); opset-23 RMSNormalization when native."""
        if self.flavor is Flavor.NATIVE:
            return F.rms_norm(y.float(), (self.dim,), None, norm.eps).to(y.dtype) * norm.weight
        yf = y.float()
        return (yf * torch.rsqrt(yf.pow(2).mean(dim=-1, keepdim=True) + norm.eps)).to(y.dtype) * norm.weight

    def _attention(
        self, i: int, cross: bool, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """q [B, Lq, d], k/v [B, Lk, d] (normed, projected) -> [B, Lq, d]."""
        h = self.num_heads
        if self.flavor is Flavor.MATH:
            core = self.cross_cores[i] if cross else self.self_cores[i]
            return core(q, k, v, rope)  # type: ignore[no-any-return]
        if self.flavor is Flavor.NATIVE and _exporting():
            if rope is not None:
                b = q.shape[0]
                cos = rope[0][None].expand(b, -1, -1)
                sin = rope[1][None].expand(b, -1, -1)
                # RoPE in fp32 (the tables are fp32; the model rotates in fp32 and casts back)
                q = torch.onnx.ops.rotary_embedding(q.float(), cos, sin, interleaved=True, num_heads=h).to(q.dtype)
                k = torch.onnx.ops.rotary_embedding(k.float(), cos, sin, interleaved=True, num_heads=h).to(k.dtype)
            # softmax_precision=1: softmax in fp32 whatever the activation dtype (TensorProto.FLOAT).
            out, *_ = torch.onnx.ops.attention(q, k, v, q_num_heads=h, kv_num_heads=h, softmax_precision=1)
            return out
        q4, k4, v4 = (t.unflatten(-1, (h, -1)) for t in (q, k, v))  # [B, L, H, D]
        if self.flavor is Flavor.PLUGIN and _exporting():
            if rope is not None:
                out = plugin_ops.rope_attention(q4, k4, v4, rope[0], rope[1])
            else:
                out = plugin_ops.attention(q4, k4, v4)
            return out.flatten(2)
        if rope is not None:  # eager: the op-seam reference
            q4, k4 = apply_rope_ref(q4, *rope), apply_rope_ref(k4, *rope)
        return attention_ref(q4, k4, v4, None).flatten(2)

    def _block(
        self, i: int, x: torch.Tensor, e0: torch.Tensor, ae0: torch.Tensor | None, context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor], lv: torch.Tensor | int,
    ) -> torch.Tensor:
        """``engine.model.Block.forward``: x [B, L, d] -> [B, L, d]."""
        block = self.model.blocks[i]
        eps = block.eps
        sh1, sc1, g1, sh2, sc2, g2 = (block.modulation + e0).chunk(6, dim=1)
        # 1. self-attention
        sa = block.self_attn
        y = self._modulate(x, sh1, sc1, eps)
        q, k, v = self._rms(sa.norm_q, sa.q(y)), self._rms(sa.norm_k, sa.k(y)), sa.v(y)
        x = x + sa.o(self._attention(i, False, q, k, v, rope)) * g1
        # 2. cross-attention
        ca = block.cross_attn
        y = block.norm3(x)
        q, k, v = self._rms(ca.norm_q, ca.q(y)), self._rms(ca.norm_k, ca.k(context)), ca.v(context)
        x = x + ca.o(self._attention(i, True, q, k, v, None))
        # 3. FFN experts, hard-routed by position: [0, Lv) video, [Lv, L) audio
        amod = None
        if ae0 is not None:
            amod = Modulation(*(block.audio_modulation.param + ae0).chunk(3, dim=1))
        vmod = Modulation(sh2, sc2, g2)
        if self.ffn_plugin:
            stacked = [getattr(self, f"ffn{i}_{key}") for key in ("w1", "b1", "w2", "b2")]
            if _exporting():
                amod_ = amod if amod is not None else vmod
                mod = torch.stack([torch.stack([m.squeeze(1) for m in mm]) for mm in (vmod, amod_)])  # [2,3,B,d]
                return plugin_ops.modality_ffn(x, mod, *stacked, lv, eps)
            experts = [FFNWeights(*(s[j] for s in stacked)) for j in range(2)]
            return modality_ffn_ref(x, int(lv), experts[0], experts[1] if amod else None, vmod, amod, eps)
        if ae0 is None:
            return x + block.ffn(self._modulate(x, sh2, sc2, eps)) * g2
        xv, xa = x[:, :lv], x[:, lv:]
        xv = xv + block.ffn(self._modulate(xv, sh2, sc2, eps)) * g2
        xa = xa + block.audio_ffn(self._modulate(xa, amod.shift, amod.scale, eps)) * amod.gate  # type: ignore[union-attr]
        return torch.cat((xv, xa), dim=1)

    # ---- forward -------------------------------------------------------------------------------
    def forward(
        self, video: torch.Tensor, audio: torch.Tensor | None, timestep: torch.Tensor, context: torch.Tensor,
        rope_cos: torch.Tensor, rope_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:
        """Contract inputs (``audio`` None for a t2v network) -> (video_velocity[, audio_velocity]) fp32."""
        m = self.model
        d = m.cfg.dim
        act = m.dtype
        # 1. embeddings: video (f, h, w raster), then audio (time-major, band-minor)
        pv = self._patch(m.patch_embedding, video, act)  # [B, d, Tv, Hp, Wp]
        tv, hp, wp = pv.shape[2], pv.shape[3], pv.shape[4]
        x = pv.flatten(2).transpose(1, 2)
        lv = x.shape[1]
        if audio is not None:
            pa = self._patch(m.audio_patch_embedding, audio, act)  # [B, d, Ta, M]
            ta, mb = pa.shape[2], pa.shape[3]
            x = torch.cat((x, pa.flatten(2).transpose(1, 2)), dim=1)
        # Time embedding (fp32 island). Official numerics round t to bf16 first, like the reference.
        t = timestep.float()
        if act == torch.bfloat16:
            t = t.to(torch.bfloat16).float()
        angles = t[:, None] * self.omega[None, :]
        sinus = torch.cat((angles.cos(), angles.sin()), dim=1)
        e = m.time_embedding(sinus.to(next(m.time_embedding.parameters()).dtype))
        e0 = m.time_projection(e).unflatten(1, (6, d)).to(act)
        ae0 = m.audio_time_projection(e).unflatten(1, (3, d)).to(act) if audio is not None else None
        ctx = m.text_embedding(context.to(act))
        # 2. blocks
        rope = (rope_cos, rope_sin)
        for i in range(len(m.blocks)):
            x = self._block(i, x, e0, ae0, ctx, rope, lv)
        # 3. heads, unpatchify, sign flip (fp32)
        vel = -m.unpatchify_video(self._head(m.head, x[:, :lv], e), (tv, hp, wp)).float()
        if audio is None:
            return (vel,)
        avel = -m.unpatchify_audio(self._head(m.audio_head, x[:, lv:], e), (ta, mb)).float()
        return vel, avel
