"""Fused RoPE + flash-attention forward (non-causal) for the joint [video; audio] sequence.

JavisDiT++ runs one self-attention over all video and audio tokens with time-aligned 3D RoPE
(model-spec.md §4); the per-token angles are precomputed as cos/sin tables [L, D/2] (pair j of a head is
channels (2j, 2j+1)). The kernel rotates Q and K tiles in registers right after loading them, so rotated
Q/K never go to memory. The same kernel serves the cross-attention (no RoPE, Lq != Lk).

Because ``q.k = sum_j q[2j] k[2j] + q[2j+1] k[2j+1]``, the kernel never re-interleaves the rotated pairs:
it keeps the even channels and the odd channels as two half tiles and computes ``QK^T`` as two dots of
depth D/2 (the channel order inside a dot does not matter, as long as Q and K use the same one)::

    for each (query tile m, batch b, head h):            # grid (cdiv(Lq, BLOCK_M), B*H)
        q0, q1 = q[b, m, h, 0::2], q[b, m, h, 1::2]      # fp32 after the load
        q0, q1 = q0*cos - q1*sin, q0*sin + q1*cos        # RoPE (if given)
        m_i = -inf; l_i = 0; acc = 0                     # fp32 online-softmax statistics
        for key tile n:                                  # full tiles unmasked, the ragged tail masked
            k0, k1 = rope(k[b, n, h, 0::2], k[b, n, h, 1::2])
            s   = (q0 @ k0^T + q1 @ k1^T) * log2(e)/sqrt(D)
            m_new = max(m_i, rowmax(s)); p = exp2(s - m_new); alpha = exp2(m_i - m_new)
            l_i = l_i*alpha + rowsum(p); acc = acc*alpha + p @ v[b, n, h, :]; m_i = m_new
        out[b, m, h, :] = acc / l_i

FP8 (``FP8=True``, the FP8 engine path): the rotated Q and K tiles and the V tile are quantized to e4m3
with per-tensor scales (``QUANT: x_fp8 = sat(x / scale)``), P is quantized as ``P * P_SCALE`` (256; P <= 1; the
power-of-two factor keeps P's small values out of e4m3's subnormal range and is exact), both dots run on
e4m3 tensor cores with fp32 accumulation, and the scales are folded into ``qk_scale`` and the final
normalisation.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import triton
import triton.language as tl

from javisrt.engine.errors import ShapeError
from javisrt.engine.ops import apply_rope_ref, attention_ref
from javisrt.kernels import is_interpreted
from javisrt.kernels.fp8 import quant_e4m3, quantize_e4m3_ref

__all__ = [
    "AttentionConfig",
    "apply_rope_ref",
    "launch_config",
    "rope_attention",
    "rope_attention_fp8",
    "rope_attention_fp8_ref",
    "rope_attention_ref",
    "quantize_e4m3_ref",
]

rope_attention_ref = attention_ref  # the PyTorch reference lives at the op seam; re-exported here

# FP8 P tile = P * P_SCALE (an exact power of two; keeps P >= 2^-14 out of e4m3's subnormals). A
# constexpr, so the kernel and its emulation (``rope_attention_fp8_ref``) read the one value.
P_SCALE = tl.constexpr(256.0)
LOG2E = 1.4426950408889634


@triton.jit
def _attn_inner(
    acc, l_i, m_i, q0, q1,
    k_base, v_base, cos_ptr, sin_ptr,
    stride_kl, stride_kd, stride_vl, stride_vd, stride_cl, stride_cd,
    lo, hi, Lk, qk_scale, inv_k_scale, inv_v_scale,
    DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
    HAS_ROPE: tl.constexpr, FP8: tl.constexpr, SOFT_ROUND: tl.constexpr, MASK_N: tl.constexpr,
    BLOCK_N: tl.constexpr, HALF_D: tl.constexpr, HEAD_DIM: tl.constexpr,
):  # fmt: skip
    """Online-softmax update over key tiles [lo, hi); MASK_N only for the ragged last tile."""
    offs_j = tl.arange(0, HALF_D)
    offs_d = tl.arange(0, HEAD_DIM)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        mask_n = offs_n < Lk
        # K^T as even / odd channel halves [HALF_D, BLOCK_N]
        kt_ptrs = k_base + offs_n[None, :] * stride_kl + (2 * offs_j)[:, None] * stride_kd
        if MASK_N:
            k0 = tl.load(kt_ptrs, mask=mask_n[None, :], other=0.0).to(tl.float32)
            k1 = tl.load(kt_ptrs + stride_kd, mask=mask_n[None, :], other=0.0).to(tl.float32)
        else:
            k0 = tl.load(kt_ptrs).to(tl.float32)
            k1 = tl.load(kt_ptrs + stride_kd).to(tl.float32)
        if HAS_ROPE:
            cs_off = offs_n[None, :] * stride_cl + offs_j[:, None] * stride_cd
            if MASK_N:
                c = tl.load(cos_ptr + cs_off, mask=mask_n[None, :], other=0.0)
                s = tl.load(sin_ptr + cs_off, mask=mask_n[None, :], other=0.0)
            else:
                c = tl.load(cos_ptr + cs_off)
                s = tl.load(sin_ptr + cs_off)
            k0, k1 = k0 * c - k1 * s, k0 * s + k1 * c
        if FP8:
            k0d = quant_e4m3(k0, inv_k_scale, SOFT_ROUND)
            k1d = quant_e4m3(k1, inv_k_scale, SOFT_ROUND)
        else:
            k0d = k0.to(DOT_DTYPE)
            k1d = k1.to(DOT_DTYPE)
        qk = tl.dot(q0, k0d, input_precision=PRECISION)
        qk = tl.dot(q1, k1d, qk, input_precision=PRECISION)
        qk = qk * qk_scale
        if MASK_N:
            qk = tl.where(mask_n[None, :], qk, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(qk, 1))
        p = tl.math.exp2(qk - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v_ptrs = v_base + offs_n[:, None] * stride_vl + offs_d[None, :] * stride_vd
        if MASK_N:
            v = tl.load(v_ptrs, mask=mask_n[:, None], other=0.0)
        else:
            v = tl.load(v_ptrs)
        if FP8:
            acc = tl.dot(quant_e4m3(p, P_SCALE, SOFT_ROUND), quant_e4m3(v.to(tl.float32), inv_v_scale, SOFT_ROUND), acc)
        else:
            acc = tl.dot(p.to(DOT_DTYPE), v.to(DOT_DTYPE), acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _rope_attention_kernel(
    # Pointers (inputs; cos/sin None without RoPE, scales None unless FP8)
    q_ptr, k_ptr, v_ptr, cos_ptr, sin_ptr, scales_ptr,
    # Dimensions
    H, Lq, Lk,
    # Strides
    stride_qb, stride_ql, stride_qh, stride_qd,
    stride_kb, stride_kl, stride_kh, stride_kd,
    stride_vb, stride_vl, stride_vh, stride_vd,
    stride_cl, stride_cd,
    stride_ob, stride_ol, stride_oh, stride_od,
    # Pointers (outputs: last, the TensorRT AOT-plugin convention inputs / int scalars / outputs)
    out_ptr,
    # Meta-parameters
    HEAD_DIM: tl.constexpr,
    QK_SCALE: tl.constexpr,  # log2(e) / sqrt(HEAD_DIM)
    HAS_ROPE: tl.constexpr,
    FP8: tl.constexpr,  # quantize Q/K/V/P tiles to e4m3 with the per-tensor scales in scales_ptr[0:3]
    SOFT_ROUND: tl.constexpr,  # interpreter only: round to the e4m3 grid in fp32 before the cast (fp8.py)
    DOT_DTYPE: tl.constexpr,  # operand dtype of the non-FP8 dots (the input dtype, fp32 for bf16 under the interpreter)
    PRECISION: tl.constexpr,  # "ieee" for fp32 inputs: the clean fp32 mode must not silently become tf32
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):  # fmt: skip
    HALF_D: tl.constexpr = HEAD_DIM // 2
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = (pid_bh // H).to(tl.int64)  # int64 batch offsets: B*L*H*D passes 2^31 at 480p with CFG
    h = pid_bh % H

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_j = tl.arange(0, HALF_D)
    offs_d = tl.arange(0, HEAD_DIM)
    mask_m = offs_m < Lq

    # Q as even / odd channel halves [BLOCK_M, HALF_D], rotated in fp32, scaled, cast once.
    q_ptrs = q_ptr + b * stride_qb + h * stride_qh + offs_m[:, None] * stride_ql + (2 * offs_j)[None, :] * stride_qd
    q0 = tl.load(q_ptrs, mask=mask_m[:, None], other=0.0).to(tl.float32)
    q1 = tl.load(q_ptrs + stride_qd, mask=mask_m[:, None], other=0.0).to(tl.float32)
    if HAS_ROPE:
        cs_off = offs_m[:, None] * stride_cl + offs_j[None, :] * stride_cd
        c = tl.load(cos_ptr + cs_off, mask=mask_m[:, None], other=0.0)
        s = tl.load(sin_ptr + cs_off, mask=mask_m[:, None], other=0.0)
        q0, q1 = q0 * c - q1 * s, q0 * s + q1 * c

    qk_scale = QK_SCALE  # log2(e)/sqrt(D): the loop uses exp2
    inv_k_scale = 1.0
    inv_v_scale = 1.0
    if FP8:
        q_scale = tl.load(scales_ptr)
        k_scale = tl.load(scales_ptr + 1)
        v_scale = tl.load(scales_ptr + 2)
        inv_k_scale = 1.0 / k_scale
        inv_v_scale = 1.0 / v_scale
        qk_scale = qk_scale * q_scale * k_scale
        q0d = quant_e4m3(q0, 1.0 / q_scale, SOFT_ROUND)
        q1d = quant_e4m3(q1, 1.0 / q_scale, SOFT_ROUND)
    else:
        q0d = q0.to(DOT_DTYPE)
        q1d = q1.to(DOT_DTYPE)

    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, HEAD_DIM], dtype=tl.float32)

    k_base = k_ptr + b * stride_kb + h * stride_kh
    v_base = v_ptr + b * stride_vb + h * stride_vh
    n_full = (Lk // BLOCK_N) * BLOCK_N
    # Full key tiles: no masks, no -inf selects.
    acc, l_i, m_i = _attn_inner(
        acc, l_i, m_i, q0d, q1d, k_base, v_base, cos_ptr, sin_ptr,
        stride_kl, stride_kd, stride_vl, stride_vd, stride_cl, stride_cd,
        0, n_full, Lk, qk_scale, inv_k_scale, inv_v_scale,
        DOT_DTYPE, PRECISION, HAS_ROPE, FP8, SOFT_ROUND, False, BLOCK_N, HALF_D, HEAD_DIM,
    )  # fmt: skip
    # The ragged tail (audio length is rarely a multiple of BLOCK_N): one masked tile.
    if n_full < Lk:
        acc, l_i, m_i = _attn_inner(
            acc, l_i, m_i, q0d, q1d, k_base, v_base, cos_ptr, sin_ptr,
            stride_kl, stride_kd, stride_vl, stride_vd, stride_cl, stride_cd,
            n_full, Lk, Lk, qk_scale, inv_k_scale, inv_v_scale,
            DOT_DTYPE, PRECISION, HAS_ROPE, FP8, SOFT_ROUND, True, BLOCK_N, HALF_D, HEAD_DIM,
        )  # fmt: skip

    if FP8:
        acc = acc * (v_scale / P_SCALE)  # undo the P * P_SCALE and V / v_scale of the e4m3 PV dot
    out = acc / l_i[:, None]
    o_ptrs = out_ptr + b * stride_ob + h * stride_oh + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask_m[:, None])


class AttentionConfig(NamedTuple):
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def launch_config(head_dim: int, seq_q: int, seq_k: int, interpreted: bool) -> AttentionConfig:
    """Tile sizes.

    GPU (sm_90): 128x64 tiles, 8 warps, 2 stages for head_dim 128 -- Triton tutorial 06's Hopper shape
    with BLOCK_N halved because the K tile is rotated in registers (two [64, BLOCK_N] fp32 halves plus
    their cos/sin live next to the 128x128 fp32 accumulator). Compiled for sm_90a (Triton 3.7.1,
    `python -m javisrt.bench.kernel_report`): bf16 214 registers, 112 KiB smem, 0 spills, 24 wgmma;
    e4m3 227 registers, 72 KiB, 0 spills (the same tiles serve both). Not yet timed or swept on a GPU.
    Interpreter: one tile per 128 tokens, because its cost is per program and per op (feasibility.md §2).
    """
    if interpreted:
        bm = min(128, max(16, triton.next_power_of_2(seq_q)))
        bn = min(128, max(16, triton.next_power_of_2(seq_k)))
        return AttentionConfig(bm, bn, 4, 1)
    if head_dim >= 128:
        return AttentionConfig(128, 64, 8, 2)
    return AttentionConfig(128, 64, 4, 2)


def grid(batch: int, heads: int, seq_q: int, block_m: int) -> tuple[int, int, int]:
    """Launch grid: (query tiles, batch*heads, 1)."""
    return (triton.cdiv(seq_q, block_m), batch * heads, 1)


_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


def _check(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None) -> None:
    if q.dim() != 4 or k.dim() != 4 or v.dim() != 4:
        raise ShapeError(f"attention: q/k/v must be [B, L, H, D], got {tuple(q.shape)}, {tuple(k.shape)}, {tuple(v.shape)}")
    b, _, h, d = q.shape
    if k.shape != v.shape or k.shape[0] != b or k.shape[2:] != (h, d):
        raise ShapeError(f"attention: k/v {tuple(k.shape)}/{tuple(v.shape)} do not match q {tuple(q.shape)}")
    if d < 16 or d & (d - 1):
        raise ShapeError(f"attention: head_dim must be a power of two >= 16, got {d}")
    if q.dtype not in _TORCH_TO_TL or k.dtype != q.dtype or v.dtype != q.dtype:
        raise ShapeError(f"attention: unsupported dtypes {q.dtype}/{k.dtype}/{v.dtype}")
    if rope is not None:
        cos, sin = rope
        if q.shape[1] != k.shape[1]:
            raise ShapeError("attention: RoPE needs self-attention (Lq == Lk)")
        want = (q.shape[1], d // 2)
        if cos.shape != want or sin.shape != want or cos.stride() != sin.stride():
            raise ShapeError(f"attention: cos/sin must both be {want} with equal strides")
        if cos.dtype != torch.float32 or sin.dtype != torch.float32:
            raise ShapeError("attention: cos/sin must be float32")


def _launch(q, k, v, rope, scales):  # type: ignore[no-untyped-def]
    _check(q, k, v, rope)
    b, lq, h, d = q.shape
    lk = k.shape[1]
    out = torch.empty_like(q)
    if out.numel() == 0:
        return out
    if lk == 0:
        raise ShapeError("attention: no keys (Lk == 0)")
    fp8 = scales is not None
    interpreted = is_interpreted(_rope_attention_kernel)
    cfg = launch_config(d, lq, lk, interpreted)
    dot_dtype = _TORCH_TO_TL[q.dtype]
    if interpreted and q.dtype == torch.bfloat16:
        dot_dtype = tl.float32  # the interpreter's bf16 dot is wrong (raw bits); fp32 is exact for bf16 values
    cos, sin = rope if rope is not None else (None, None)  # None: a constexpr, absent from the compiled signature
    _rope_attention_kernel[grid(b, h, lq, cfg.block_m)](
        q, k, v, cos, sin, scales,
        h, lq, lk,
        *q.stride(), *k.stride(), *v.stride(),
        cos.stride(0) if rope is not None else 0, cos.stride(1) if rope is not None else 0,
        *out.stride(),
        out,
        HEAD_DIM=d, QK_SCALE=LOG2E / math.sqrt(d), HAS_ROPE=rope is not None, FP8=fp8, SOFT_ROUND=interpreted, DOT_DTYPE=dot_dtype,
        PRECISION="ieee" if q.dtype == torch.float32 else "tf32",
        BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, num_warps=cfg.num_warps, num_stages=cfg.num_stages,
    )  # fmt: skip
    return out


def rope_attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
) -> torch.Tensor:
    """Softmax attention with in-kernel RoPE; same contract as ``engine.ops.attention_ref``.

    q [B, Lq, H, D], k/v [B, Lk, H, D] (fp32/fp16/bf16, any strides), rope (cos, sin) [Lq, D/2] fp32 or
    None -> [B, Lq, H, D] in q's dtype.
    """
    return _launch(q, k, v, rope, None)


def rope_attention_fp8(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    scales: torch.Tensor,
) -> torch.Tensor:
    """FP8 e4m3 attention: ``scales`` = fp32 [3] per-tensor (q, k, v) scales, x_fp8 = sat(x / scale).

    Q and K are quantized after the in-kernel RoPE. Inputs/outputs as :func:`rope_attention`. The scales
    are a device tensor, not Python floats, so one compiled kernel serves every layer (and a TensorRT
    plugin can take them as a constant input).
    """
    if scales.shape != (3,) or scales.dtype != torch.float32:
        raise ShapeError(f"attention fp8: scales must be float32 [3] (q, k, v), got {scales.dtype} {tuple(scales.shape)}")
    if q.shape[-1] < 64:
        raise ShapeError("attention fp8: head_dim must be >= 64 (the e4m3 QK^T dots have depth head_dim/2 >= 32)")
    return _launch(q, k, v, rope, scales)


def rope_attention_fp8_ref(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    rope: tuple[torch.Tensor, torch.Tensor] | None,
    scales: torch.Tensor,
    quantize_p: bool = False,
) -> torch.Tensor:
    """fp32 emulation of :func:`rope_attention_fp8`: RoPE in fp32, Q/K/V quantized to e4m3 with the same
    scales, attention in fp32. ``quantize_p`` also rounds P (normalised by the final row max) to e4m3 as
    ``P * 256``; the kernel quantizes P against the running max instead, so the difference between the
    two emulations measures the size of the P-rounding error class. Returns fp32 [B, Lq, H, D]."""
    qf, kf, vf = q.float(), k.float(), v.float()
    if rope is not None:
        qf = apply_rope_ref(qf, *rope)
        kf = apply_rope_ref(kf, *rope)
    qf = quantize_e4m3_ref(qf, scales[0])
    kf = quantize_e4m3_ref(kf, scales[1])
    vf = quantize_e4m3_ref(vf, scales[2])
    s = torch.einsum("bqhd,bkhd->bhqk", qf, kf) / math.sqrt(q.shape[-1])
    p = torch.exp(s - s.amax(-1, keepdim=True))
    denom = p.sum(-1, keepdim=True)
    if quantize_p:
        p = quantize_e4m3_ref(p, 1.0 / P_SCALE.value)
    out = torch.einsum("bhqk,bkhd->bqhd", p / denom, vf)
    return out
