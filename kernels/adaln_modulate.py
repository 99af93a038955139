"""Fused adaLN modulation: ``LayerNorm(x) * (1 + scale) + shift`` (LayerNorm without affine).

The input of JavisDiT++'s shared self-attention (model-spec.md §3.2: every token, video and audio, uses
the attention chunks ``sh1, sc1``). One program normalises ``BLOCK_M`` rows of one batch element::

    for rows m in this block:                        # x [B, L, d], shift/scale [B, 1, d]
        xf   = float32(x[b, m, :])
        mean = sum(xf) / d
        var  = sum((xf - mean)^2) / d                # two-pass: no E[x^2]-E[x]^2 cancellation
        out[b, m, :] = (xf - mean) * rsqrt(var + eps) * (1 + scale[b]) + shift[b]   # one rounding

Everything is computed in fp32 and rounded once on store; the reference (``modulate_ref``) rounds after
the LayerNorm, the product and the sum, so in fp16/bf16 the kernel is at least as close to the fp32
reference as torch itself.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from javisrt.engine.errors import ShapeError
from javisrt.engine.ops import modulate_ref
from javisrt.kernels import is_interpreted

__all__ = ["adaln_modulate", "adaln_modulate_ref", "launch_config"]

adaln_modulate_ref = modulate_ref  # the PyTorch reference lives at the op seam; re-exported here


@triton.jit
def _adaln_modulate_kernel(
    # Pointers (inputs)
    x_ptr,
    shift_ptr,
    scale_ptr,
    # Dimensions
    L,
    D,
    # Strides
    stride_xb,
    stride_xl,
    stride_xd,
    stride_sb,
    stride_sd,
    stride_cb,
    stride_cd,
    stride_ob,
    stride_ol,
    stride_od,
    # Pointers (outputs: last, the TensorRT AOT-plugin convention inputs / int scalars / outputs)
    out_ptr,
    # Meta-parameters
    EPS: tl.constexpr,  # constexpr, not a runtime float: TensorRT AOT plugins pass only int scalars
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,  # next power of two >= D: a whole row stays in registers
):
    pid_m = tl.program_id(0)
    pid_b = tl.program_id(1).to(tl.int64)  # int64 offsets: B*L*d exceeds 2^31 at 480p with CFG

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    mask_m = offs_m < L
    mask_d = offs_d < D
    mask = mask_m[:, None] & mask_d[None, :]

    x_ptrs = x_ptr + pid_b * stride_xb + offs_m[:, None] * stride_xl + offs_d[None, :] * stride_xd
    x = tl.load(x_ptrs, mask=mask, other=0.0).to(tl.float32)
    mean = tl.sum(x, axis=1) / D
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + EPS)

    shift = tl.load(shift_ptr + pid_b * stride_sb + offs_d * stride_sd, mask=mask_d, other=0.0)
    scale = tl.load(scale_ptr + pid_b * stride_cb + offs_d * stride_cd, mask=mask_d, other=0.0)
    y = xc * rstd[:, None] * (1.0 + scale.to(tl.float32))[None, :] + shift.to(tl.float32)[None, :]

    out_ptrs = out_ptr + pid_b * stride_ob + offs_m[:, None] * stride_ol + offs_d[None, :] * stride_od
    tl.store(out_ptrs, y.to(out_ptr.dtype.element_ty), mask=mask)


def launch_config(seq_len: int, dim: int, interpreted: bool) -> dict[str, int]:
    """Block sizes and warps. GPU: 4 rows x next_pow2(d) per program (d=1536: 8 KB of fp32 per row,
    32 values per thread with 8 warps) -- a bandwidth-bound row kernel; not swept on a GPU yet.
    Interpreter: 64 rows per program, because its cost is per program and per op, not per element."""
    block_d = triton.next_power_of_2(dim)
    if interpreted:
        return {"BLOCK_M": min(64, triton.next_power_of_2(max(seq_len, 1))), "BLOCK_D": block_d, "num_warps": 4}
    return {"BLOCK_M": 4, "BLOCK_D": block_d, "num_warps": 8 if block_d >= 1024 else 4}


def grid(batch: int, seq_len: int, block_m: int) -> tuple[int, int, int]:
    """Launch grid: one program per ``block_m`` rows of one batch element."""
    return (triton.cdiv(seq_len, block_m), batch, 1)


def adaln_modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
    """``LayerNorm(x) * (1 + scale) + shift``: x [B, L, d], shift/scale [B, 1, d] (or [1, 1, d]) -> [B, L, d]."""
    if x.dim() != 3:
        raise ShapeError(f"adaln_modulate: x must be [B, L, d], got {tuple(x.shape)}")
    b, seq_len, dim = x.shape
    for name, t in (("shift", shift), ("scale", scale)):
        if t.dim() != 3 or t.shape[1] != 1 or t.shape[2] != dim or t.shape[0] not in (1, b):
            raise ShapeError(f"adaln_modulate: {name} must be [B|1, 1, {dim}], got {tuple(t.shape)}")
    out = torch.empty_like(x)
    if x.numel() == 0:
        return out
    cfg = launch_config(seq_len, dim, is_interpreted(_adaln_modulate_kernel))
    # A batch-broadcast modulation ([1, 1, d]) gets batch stride 0.
    s_sb = shift.stride(0) if shift.shape[0] == b else 0
    s_cb = scale.stride(0) if scale.shape[0] == b else 0
    _adaln_modulate_kernel[grid(b, seq_len, cfg["BLOCK_M"])](
        x, shift, scale,
        seq_len, dim,
        x.stride(0), x.stride(1), x.stride(2),
        s_sb, shift.stride(2),
        s_cb, scale.stride(2),
        out.stride(0), out.stride(1), out.stride(2),
        out,
        EPS=eps, BLOCK_M=cfg["BLOCK_M"], BLOCK_D=cfg["BLOCK_D"], num_warps=cfg["num_warps"],
    )  # fmt: skip
    return out
