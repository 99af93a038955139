"""MS-MoE FFN of JavisDiT++: two hard-routed experts in one launch per GEMM (grouped over a ragged split).

Tokens [0, Lv) of every sequence go through the video expert, [Lv, L) through the audio expert
(model-spec.md §3.2); each modality brings its own modulation chunks (shift, scale, gate). Two kernels::

    # 1. up:   h = GELU_tanh( (LN(x) * (1 + scale_e) + shift_e) @ W1_e^T + b1_e )        [B, L, F]
    # 2. down: out = x + gate_e * (h @ W2_e^T + b2_e)                                      [B, L, d]
    for each (output tile (m, n), batch b):        # grid (M tiles of both experts * N tiles, B)
        e, rows = expert_of(m)                     # M tiles never straddle Lv: the two problems are
                                                   # tiled separately (cdiv(Lv, BM) + cdiv(La, BM))
        up only:   mean, rstd of rows over d       # two passes over the row block: mean, then centred var
        acc = 0
        for k tile:
            a = x[rows, k]                                       (up)   or h[rows, k] (down)
            a = (a - mean) * rstd * (1 + scale_e[k]) + shift_e[k]  (up: the modulation prologue)
            acc += a @ W_e[n, k]^T                 # tensor cores, fp32 accumulation
        up:   h[rows, n] = GELU_tanh(acc + b1_e[n])
        down: out[rows, n] = x[rows, n] + gate_e[n] * (acc + b2_e[n])

The modulated input is rounded to the activation dtype before the dot, like the reference (it is the
input of an nn.Linear there); h is stored in the activation dtype (or e4m3 in the FP8 variant).
GELU-tanh is computed as ``x * sigmoid(2u)`` (= 0.5 x (1 + tanh u)), which saturates correctly.

FP8 e4m3 (``FP8=True``): weights are stored in e4m3 with per-tensor scales; the modulated input is
quantized in the prologue with a static per-expert activation scale, h is quantized in the up kernel's
epilogue (so the down GEMM reads 1 byte per element), and the down GEMM reads e4m3 h directly. Scales
(fp32 [2, 4] = per expert: input, w1, h, w2) are a device tensor.
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl

from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.ops import FFNWeights, Modulation, modality_ffn_ref, modulate_ref
from javisrt.kernels import is_interpreted
from javisrt.kernels.fp8 import amax_scale, quant_e4m3, quantize_e4m3_ref, to_e4m3
from javisrt.kernels.tiling import grouped_tile

__all__ = [
    "FFNConfig",
    "FP8FFNWeights",
    "modality_ffn",
    "modality_ffn_fp8",
    "modality_ffn_fp8_ref",
    "modality_ffn_ref",
    "quantize_ffn_weights",
]

assert modality_ffn_ref  # the PyTorch reference lives at the op seam (engine/ops.py); re-exported here


@triton.jit
def _expert_tile(pid, Lv, L, tiles_n, BLOCK_M: tl.constexpr, GROUP_M: tl.constexpr):
    """Map a linear tile id to (is_audio, first row, row end, n tile).

    M tiles: cdiv(Lv, BLOCK_M) video tiles, then cdiv(L - Lv, BLOCK_M) audio tiles, in grouped order
    (kernels/tiling.grouped_tile).
    """
    tiles_v = tl.cdiv(Lv, BLOCK_M)
    pid_m, pid_n = grouped_tile(pid, tiles_v + tl.cdiv(L - Lv, BLOCK_M), tiles_n, GROUP_M)
    is_audio = pid_m >= tiles_v
    row0 = tl.where(is_audio, Lv + (pid_m - tiles_v) * BLOCK_M, pid_m * BLOCK_M)
    row_end = tl.where(is_audio, L, Lv)
    return is_audio, row0, row_end, pid_n


@triton.jit
def _expert_block(pid, Lv, L, N, wv_ptr, wa_ptr, bv_ptr, ba_ptr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                  GROUP_M: tl.constexpr):  # fmt: skip
    """The output block of tile ``pid`` of a [L, N] grouped GEMM: expert index (0 video, 1 audio), that
    expert's weight and bias pointers, row / column offsets and their masks (rows stop at the
    modality boundary). Shared by the up and down projections."""
    is_audio, row0, row_end, pid_n = _expert_tile(pid, Lv, L, tl.cdiv(N, BLOCK_N), BLOCK_M, GROUP_M)
    w_ptr = wv_ptr
    bias_ptr = bv_ptr
    if is_audio:
        w_ptr = wa_ptr
        bias_ptr = ba_ptr
    offs_m = row0 + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    return is_audio.to(tl.int32), w_ptr, bias_ptr, offs_m, offs_n, offs_m < row_end, offs_n < N


@triton.jit
def _ffn_up_kernel(
    # Pointers (inputs; scales None unless FP8)
    x_ptr, mod_ptr, w1v_ptr, w1a_ptr, b1v_ptr, b1a_ptr, scales_ptr,
    # Dimensions
    Lv, L, D, F,
    # Strides
    stride_xb, stride_xl, stride_xd,
    stride_me, stride_mc, stride_mb, stride_md,
    stride_wn, stride_wk,
    stride_hb, stride_hl, stride_hf,
    # Pointers (outputs: last, the TensorRT AOT-plugin convention inputs / int scalars / outputs)
    h_ptr,
    # Meta-parameters
    EPS: tl.constexpr,  # constexpr: TensorRT AOT plugins pass only int scalars
    FP8: tl.constexpr,
    SOFT_ROUND: tl.constexpr,  # interpreter only (fp8.py)
    DOT_DTYPE: tl.constexpr,  # activation dtype; fp32 for bf16 under the interpreter (its bf16 dot is wrong)
    PRECISION: tl.constexpr,  # "ieee" for fp32: the clean fp32 mode must not silently become tf32
    EVEN_K: tl.constexpr,  # D % BLOCK_K == 0: no K masks (d = 1536)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)  # int64 batch offsets: B*L*F passes 2^31 at 480p with CFG
    e, w_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n = _expert_block(
        tl.program_id(0), Lv, L, F, w1v_ptr, w1a_ptr, b1v_ptr, b1a_ptr, BLOCK_M, BLOCK_N, GROUP_M
    )
    x_rows = x_ptr + b * stride_xb + offs_m[:, None] * stride_xl
    shift_ptr = mod_ptr + e * stride_me + b * stride_mb
    scale_ptr = shift_ptr + stride_mc

    # 1. LayerNorm statistics of the row block (two passes; the block is re-read from L2).
    mean = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = (offs_k < D) | EVEN_K  # folds to all-true when EVEN_K: unmasked loads
        xk = tl.load(x_rows + offs_k[None, :] * stride_xd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        mean += tl.sum(xk.to(tl.float32), axis=1)
    mean = mean / D
    var = tl.zeros([BLOCK_M], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = (offs_k < D) | EVEN_K
        xk = tl.load(x_rows + offs_k[None, :] * stride_xd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        xc = tl.where(mask_k[None, :], xk.to(tl.float32) - mean[:, None], 0.0)
        var += tl.sum(xc * xc, axis=1)
    rstd = 1.0 / tl.sqrt(var / D + EPS)

    inv_in_scale = 1.0
    if FP8:
        inv_in_scale = 1.0 / tl.load(scales_ptr + e * 4)

    # 2. Main loop: modulated A tile (prologue) @ W1^T tile.
    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, D, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = (offs_k < D) | EVEN_K
        xk = tl.load(x_rows + offs_k[None, :] * stride_xd, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        sh = tl.load(shift_ptr + offs_k * stride_md, mask=mask_k, other=0.0).to(tl.float32)
        sc = tl.load(scale_ptr + offs_k * stride_md, mask=mask_k, other=0.0).to(tl.float32)
        a = (xk.to(tl.float32) - mean[:, None]) * rstd[:, None] * (1.0 + sc[None, :]) + sh[None, :]
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if FP8:
            acc = tl.dot(quant_e4m3(a, inv_in_scale, SOFT_ROUND), w, acc)
        else:
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)

    # 3. Epilogue: dequant (FP8), bias, GELU-tanh, store h.
    if FP8:
        acc = acc * (tl.load(scales_ptr + e * 4) * tl.load(scales_ptr + e * 4 + 1))
    bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    z = acc + bias[None, :]
    u = 0.7978845608028654 * (z + 0.044715 * z * z * z)  # sqrt(2/pi) (z + 0.044715 z^3)
    g = z * tl.sigmoid(2.0 * u)  # 0.5 z (1 + tanh u)
    h_ptrs = h_ptr + b * stride_hb + offs_m[:, None] * stride_hl + offs_n[None, :] * stride_hf
    if FP8:
        hq = quant_e4m3(g, 1.0 / tl.load(scales_ptr + e * 4 + 2), SOFT_ROUND)
        tl.store(h_ptrs, hq, mask=mask_m[:, None] & mask_n[None, :])
    else:
        tl.store(h_ptrs, g.to(h_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


@triton.jit
def _ffn_down_kernel(
    # Pointers (inputs; scales None unless FP8)
    h_ptr, mod_ptr, w2v_ptr, w2a_ptr, b2v_ptr, b2a_ptr, scales_ptr, x_ptr,
    # Dimensions
    Lv, L, D, F,
    # Strides
    stride_hb, stride_hl, stride_hf,
    stride_me, stride_mc, stride_mb, stride_md,
    stride_wn, stride_wk,
    stride_xb, stride_xl, stride_xd,
    stride_ob, stride_ol, stride_od,
    # Pointers (outputs)
    out_ptr,
    # Meta-parameters
    FP8: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
    PRECISION: tl.constexpr,
    EVEN_K: tl.constexpr,  # F % BLOCK_K == 0 (8960 = 140 * 64)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    b = tl.program_id(1).to(tl.int64)
    e, w_ptr, bias_ptr, offs_m, offs_n, mask_m, mask_n = _expert_block(
        tl.program_id(0), Lv, L, D, w2v_ptr, w2a_ptr, b2v_ptr, b2a_ptr, BLOCK_M, BLOCK_N, GROUP_M
    )
    h_rows = h_ptr + b * stride_hb + offs_m[:, None] * stride_hl

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, F, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = (offs_k < F) | EVEN_K
        a = tl.load(h_rows + offs_k[None, :] * stride_hf, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_ptr + offs_n[None, :] * stride_wn + offs_k[:, None] * stride_wk, mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        if FP8:
            acc = tl.dot(a, w, acc)  # e4m3 x e4m3 -> fp32
        else:
            acc = tl.dot(a.to(DOT_DTYPE), w.to(DOT_DTYPE), acc, input_precision=PRECISION)

    # Epilogue: dequant (FP8), bias, gate, residual.
    if FP8:
        acc = acc * (tl.load(scales_ptr + e * 4 + 2) * tl.load(scales_ptr + e * 4 + 3))
    bias = tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)
    gate = tl.load(mod_ptr + e * stride_me + 2 * stride_mc + b * stride_mb + offs_n * stride_md, mask=mask_n, other=0.0).to(tl.float32)
    mask = mask_m[:, None] & mask_n[None, :]
    res = tl.load(x_ptr + b * stride_xb + offs_m[:, None] * stride_xl + offs_n[None, :] * stride_xd, mask=mask, other=0.0)
    out = res.to(tl.float32) + gate[None, :] * (acc + bias[None, :])
    o_ptrs = out_ptr + b * stride_ob + offs_m[:, None] * stride_ol + offs_n[None, :] * stride_od
    tl.store(o_ptrs, out.to(out_ptr.dtype.element_ty), mask=mask)


# ---------------------------------------------------------------------------------------------------
# Launch math and launchers
# ---------------------------------------------------------------------------------------------------


class FFNConfig(NamedTuple):
    block_m: int
    block_n: int
    block_k: int
    group_m: int
    num_warps: int
    num_stages: int


def launch_config(n: int, k: int, fp8: bool, interpreted: bool, max_rows: int = 1 << 30) -> FFNConfig:
    """Tile sizes for one GEMM of output width ``n`` and depth ``k``.

    GPU (sm_90): 128x128x64 (bf16) / 128x128x128 (e4m3: 128 B of K per row, as for bf16) tiles,
    8 warps (two warpgroups for the 128-row wgmma), 3 stages; GROUP_M 8 as in Triton tutorial 03.
    Compiled for sm_90a (`python -m javisrt.bench.kernel_report`, Triton 3.7.1), 0 spills everywhere:
    up bf16 178 registers / 96.5 KiB smem, down bf16 140 / 96 KiB, up e4m3 225 / 129 KiB, down e4m3
    150 / 96 KiB. Not yet timed or swept on a GPU.
    Interpreter: the largest tiles that fit the problem (its cost is per program and per op).
    """
    if interpreted:
        bm = min(128, max(16, triton.next_power_of_2(max_rows)))
        bn = min(128, max(16, triton.next_power_of_2(n)))
        bk = min(128, max(16, triton.next_power_of_2(k)))
        return FFNConfig(bm, bn, bk, 8, 4, 1)
    return FFNConfig(128, 128, 128 if fp8 else 64, 8, 8, 3)


def grid(batch: int, num_video_tokens: int, seq_len: int, n: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    """Launch grid of either GEMM: (M tiles of both experts * N tiles, B, 1).

    The two experts are tiled separately so that no M tile straddles the video/audio boundary.
    """
    tiles_m = triton.cdiv(num_video_tokens, block_m) + triton.cdiv(seq_len - num_video_tokens, block_m)
    return (tiles_m * triton.cdiv(n, block_n), batch, 1)


_TORCH_TO_TL = {torch.float32: tl.float32, torch.float16: tl.float16, torch.bfloat16: tl.bfloat16}


class FP8FFNWeights(NamedTuple):
    """One expert for the FP8 path: e4m3 weights and fp32 [4] scales (input, w1, h, w2)."""

    w1: torch.Tensor  # [f, d] float8_e4m3fn
    b1: torch.Tensor  # [f] activation dtype
    w2: torch.Tensor  # [d, f] float8_e4m3fn
    b2: torch.Tensor  # [d]
    scales: torch.Tensor  # [4] fp32: s_in (modulated input), s_w1, s_h (GELU output), s_w2


def quantize_ffn_weights(w: FFNWeights, in_scale: torch.Tensor, h_scale: torch.Tensor) -> FP8FFNWeights:
    """Per-tensor e4m3 weights (amax scales) plus the given static activation scales (calibrated)."""
    s1, s2 = amax_scale(w.w1), amax_scale(w.w2)
    scales = torch.stack([torch.as_tensor(in_scale, dtype=torch.float32).reshape(()), s1,
                          torch.as_tensor(h_scale, dtype=torch.float32).reshape(()), s2]).to(torch.float32)  # fmt: skip
    return FP8FFNWeights(to_e4m3(w.w1, s1), w.b1, to_e4m3(w.w2, s2), w.b2, scales.to(w.w1.device))


def _stack_modulation(video_mod: Modulation | None, audio_mod: Modulation | None, batch: int, dim: int,
                      like: torch.Tensor) -> torch.Tensor:  # fmt: skip
    """[2 experts, 3 (shift, scale, gate), B, d]: one small contiguous tensor (6*B*d values) instead of
    twelve (stride_b, stride_d) kernel arguments; a missing modality gets zeros (its tiles never run)."""
    mods = []
    for mod in (video_mod, audio_mod):
        if mod is None:
            mods.append(like.new_zeros(3, batch, dim))
            continue
        for t in mod:
            if t.dim() != 3 or t.shape[1] != 1 or t.shape[2] != dim or t.shape[0] not in (1, batch):
                raise ShapeError(f"modality_ffn: modulation chunks must be [B|1, 1, {dim}], got {tuple(t.shape)}")
        mods.append(torch.stack([t[:, 0].expand(batch, dim) for t in mod]))
    return torch.stack(mods).to(like.dtype).contiguous()


def _launch(x, num_video_tokens, video, audio, video_mod, audio_mod, eps, fp8):  # type: ignore[no-untyped-def]
    if x.dim() != 3:
        raise ShapeError(f"modality_ffn: x must be [B, L, d], got {tuple(x.shape)}")
    if x.dtype not in _TORCH_TO_TL:
        raise ShapeError(f"modality_ffn: unsupported dtype {x.dtype}")
    bsz, seq_len, dim = x.shape
    lv = int(num_video_tokens)
    if not 0 <= lv <= seq_len:
        raise ShapeError(f"modality_ffn: num_video_tokens {lv} outside [0, {seq_len}]")
    for n_tokens, w, mod, name in ((lv, video, video_mod, "video"), (seq_len - lv, audio, audio_mod, "audio")):
        if n_tokens and (w is None or mod is None):
            raise ConfigError(f"tokens present for the {name} modality whose FFN expert is not built")
    present = [w for w in (video, audio) if w is not None]
    if not present or x.numel() == 0:
        return x.clone()
    ref_w = present[0]
    ffn = ref_w.w1.shape[0]
    for w in present:
        if w.w1.shape != (ffn, dim) or w.w2.shape != (dim, ffn) or w.b1.shape != (ffn,) or w.b2.shape != (dim,):
            raise ShapeError(
                f"modality_ffn: expert shapes w1 {tuple(w.w1.shape)} w2 {tuple(w.w2.shape)} do not fit d={dim}, "
                f"f={ffn} (both experts must have the same FFN width)"
            )
        if w.w1.stride() != ref_w.w1.stride() or w.w2.stride() != ref_w.w2.stride():
            raise ShapeError("modality_ffn: the two experts' weights must have the same strides")
    vw = video if video is not None else ref_w  # a missing expert's pointers are never dereferenced
    aw = audio if audio is not None else ref_w
    if fp8:
        for w in present:
            if w.w1.dtype != torch.float8_e4m3fn or w.w2.dtype != torch.float8_e4m3fn:
                raise ShapeError("modality_ffn_fp8: weights must be float8_e4m3fn")
        scales = torch.stack([vw.scales, aw.scales]).to(torch.float32).contiguous()
    else:
        for w in present:
            if w.w1.dtype != x.dtype or w.w2.dtype != x.dtype:
                raise ShapeError(f"modality_ffn: weights {w.w1.dtype} do not match x {x.dtype}")
        scales = None  # a constexpr: absent from the compiled signature
    mod = _stack_modulation(video_mod, audio_mod, bsz, dim, x)

    interpreted = is_interpreted(_ffn_up_kernel)
    dot_dtype = _TORCH_TO_TL[x.dtype]
    if interpreted and x.dtype == torch.bfloat16:
        dot_dtype = tl.float32  # the interpreter's bf16 dot is wrong (raw bits); fp32 is exact for bf16 values
    precision = "ieee" if x.dtype == torch.float32 else "tf32"
    max_rows = max(lv, seq_len - lv)

    h = torch.empty(bsz, seq_len, ffn, device=x.device, dtype=torch.float8_e4m3fn if fp8 else x.dtype)
    up = launch_config(ffn, dim, fp8, interpreted, max_rows)
    _ffn_up_kernel[grid(bsz, lv, seq_len, ffn, up.block_m, up.block_n)](
        x, mod, vw.w1, aw.w1, vw.b1, aw.b1, scales,
        lv, seq_len, dim, ffn,
        *x.stride(), *mod.stride(), *vw.w1.stride(), *h.stride(),
        h,
        EPS=eps, FP8=fp8, SOFT_ROUND=interpreted, DOT_DTYPE=dot_dtype, PRECISION=precision,
        EVEN_K=dim % up.block_k == 0,
        BLOCK_M=up.block_m, BLOCK_N=up.block_n, BLOCK_K=up.block_k, GROUP_M=up.group_m,
        num_warps=up.num_warps, num_stages=up.num_stages,
    )  # fmt: skip
    out = torch.empty_like(x)
    down = launch_config(dim, ffn, fp8, interpreted, max_rows)
    _ffn_down_kernel[grid(bsz, lv, seq_len, dim, down.block_m, down.block_n)](
        h, mod, vw.w2, aw.w2, vw.b2, aw.b2, scales, x,
        lv, seq_len, dim, ffn,
        *h.stride(), *mod.stride(), *vw.w2.stride(), *x.stride(), *out.stride(),
        out,
        FP8=fp8, DOT_DTYPE=dot_dtype, PRECISION=precision, EVEN_K=ffn % down.block_k == 0,
        BLOCK_M=down.block_m, BLOCK_N=down.block_n, BLOCK_K=down.block_k, GROUP_M=down.group_m,
        num_warps=down.num_warps, num_stages=down.num_stages,
    )  # fmt: skip
    return out


def modality_ffn(
    x: torch.Tensor,
    num_video_tokens: int,
    video: FFNWeights | None,
    audio: FFNWeights | None,
    video_mod: Modulation | None,
    audio_mod: Modulation | None,
    eps: float,
) -> torch.Tensor:
    """Same contract as ``engine.ops.modality_ffn_ref``: x [B, L, d] -> [B, L, d], two launches."""
    return _launch(x, num_video_tokens, video, audio, video_mod, audio_mod, eps, fp8=False)


def modality_ffn_fp8(
    x: torch.Tensor,
    num_video_tokens: int,
    video: FP8FFNWeights | None,
    audio: FP8FFNWeights | None,
    video_mod: Modulation | None,
    audio_mod: Modulation | None,
    eps: float,
) -> torch.Tensor:
    """FP8 e4m3 variant: x [B, L, d] (bf16/fp16/fp32 activations) -> [B, L, d]; h lives in e4m3."""
    return _launch(x, num_video_tokens, video, audio, video_mod, audio_mod, eps, fp8=True)


def modality_ffn_fp8_ref(
    x: torch.Tensor,
    num_video_tokens: int,
    video: FP8FFNWeights | None,
    audio: FP8FFNWeights | None,
    video_mod: Modulation | None,
    audio_mod: Modulation | None,
    eps: float,
) -> torch.Tensor:
    """fp32 upcast emulation of :func:`modality_ffn_fp8`: the same e4m3 roundings of the modulated input
    and of h with the same scales, everything else in fp32 -- or float64 when x is float64, which gives
    the tests a reference above the kernel's precision (no ``torch._scaled_mm``: ~50x too slow on CPU)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    parts = []
    for seg, w, mod in ((x[:, :num_video_tokens], video, video_mod), (x[:, num_video_tokens:], audio, audio_mod)):
        if seg.shape[1] == 0:
            continue
        assert w is not None and mod is not None
        s_in, s_w1, s_h, s_w2 = w.scales.to(ct)
        seg = seg.to(ct)
        a = quantize_e4m3_ref(modulate_ref(seg, mod.shift.to(ct), mod.scale.to(ct), eps), s_in).to(ct)
        h = torch.nn.functional.gelu(a @ (w.w1.to(ct) * s_w1).T + w.b1.to(ct), approximate="tanh")
        h = quantize_e4m3_ref(h, s_h).to(ct)
        parts.append(seg + (h @ (w.w2.to(ct) * s_w2).T + w.b2.to(ct)) * mod.gate.to(ct))
    return torch.cat(parts, dim=1)

