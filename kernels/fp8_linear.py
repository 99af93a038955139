"""FP8 e4m3 Linear ``y = x @ W^T + b`` in one Triton launch, the activation quantized in the GEMM's prologue.

The alternative to ``kernels/ops_triton_fp8.scaled_mm_linear`` (a separate :func:`~javisrt.kernels.fp8.quantize_e4m3`
launch, then ``torch._scaled_mm``): here each A tile is quantized to e4m3 with the static per-tensor input
scale as it is loaded, so x is read once in its own dtype and no e4m3 copy of it is written. The price is
that every A tile is quantized once per N tile (N / BLOCK_N times). ``bench/gpu_proof.py`` part 2 times
both on the attention Linears; the op set's ``linear_impl`` picks one::

    for each output tile (m, n) in grouped order:          # grid (M tiles * N tiles,)
        acc = 0
        for k tile:
            a = e4m3(sat(x[m, k] * (1 / s_in)))             # prologue quantization (fp32 multiply)
            acc += a @ W_e4m3[n, k]^T                      # e4m3 x e4m3 tensor cores, fp32 accumulation
        y[m, n] = acc * (s_in * s_w) + b[n]                # epilogue, stored in x's dtype

The reciprocal ``1 / s_in`` is computed once per program with IEEE division (``div_rn``), so the
quantization equals torch's ``(x.float() * (1 / s_in)).clamp(-448, 448).to(float8_e4m3fn)`` value for
value; it can differ from :func:`~javisrt.kernels.fp8.quantize_e4m3`'s ``x / s_in`` by one fp32 rounding,
which moves an input across an e4m3 rounding tie only when it lies within that rounding of one
(:func:`fp8_linear_ref` has both spellings).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from javisrt.engine.errors import ShapeError
from javisrt.kernels import is_interpreted
from javisrt.kernels.fp8 import FP8_MAX, quant_e4m3, to_e4m3
from javisrt.kernels.modality_ffn import launch_config
from javisrt.kernels.tiling import grouped_tile

__all__ = ["fp8_linear", "fp8_linear_ref", "grid"]


@triton.jit
def _fp8_linear_kernel(
    # Pointers (inputs; bias None when the Linear has none)
    x_ptr, w_ptr, bias_ptr, in_scale_ptr, w_scale_ptr,
    # Dimensions
    M, N, K,
    # Strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_om, stride_on,
    # Pointers (outputs: last, the TensorRT AOT-plugin convention inputs / int scalars / outputs)
    out_ptr,
    # Meta-parameters
    SOFT_ROUND: tl.constexpr,  # interpreter only (fp8.py)
    EVEN_K: tl.constexpr,  # K % BLOCK_K == 0: no K masks (1536 = 12 * 128)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr,
):  # fmt: skip
    pid_m, pid_n = grouped_tile(tl.program_id(0), tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N), GROUP_M)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mask_m = offs_m < M
    mask_n = offs_n < N
    x_rows = x_ptr + offs_m[:, None] * stride_xm
    w_cols = w_ptr + offs_n[None, :] * stride_wn

    in_scale = tl.load(in_scale_ptr)
    inv_in_scale = tl.math.div_rn(tl.full([], 1.0, tl.float32), in_scale)  # correctly rounded, as torch's 1 / s

    acc = tl.zeros([BLOCK_M, BLOCK_N], dtype=tl.float32)
    for k0 in range(0, K, BLOCK_K):
        offs_k = k0 + tl.arange(0, BLOCK_K)
        mask_k = (offs_k < K) | EVEN_K  # folds to all-true when EVEN_K: unmasked loads
        xk = tl.load(x_rows + offs_k[None, :] * stride_xk, mask=mask_m[:, None] & mask_k[None, :], other=0.0)
        w = tl.load(w_cols + offs_k[:, None] * stride_wk, mask=mask_n[None, :] & mask_k[:, None], other=0.0)
        acc = tl.dot(quant_e4m3(xk.to(tl.float32), inv_in_scale, SOFT_ROUND), w, acc)  # e4m3 x e4m3 -> fp32

    # Epilogue: dequantize, bias, store in the activation dtype.
    acc = acc * (in_scale * tl.load(w_scale_ptr))
    if bias_ptr is not None:
        acc += tl.load(bias_ptr + offs_n, mask=mask_n, other=0.0).to(tl.float32)[None, :]
    o_ptrs = out_ptr + offs_m[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(o_ptrs, acc.to(out_ptr.dtype.element_ty), mask=mask_m[:, None] & mask_n[None, :])


def grid(m: int, n: int, block_m: int, block_n: int) -> tuple[int, int, int]:
    """Launch grid: (M tiles * N tiles, 1, 1)."""
    return (triton.cdiv(m, block_m) * triton.cdiv(n, block_n), 1, 1)


_ACTIVATION_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def _scalar_scale(scale: torch.Tensor, what: str) -> torch.Tensor:
    if scale.numel() != 1:
        raise ShapeError(f"fp8_linear: {what} must be a per-tensor scale (one value), got shape {tuple(scale.shape)}")
    return scale.reshape(()).to(torch.float32)


def fp8_linear(
    x: torch.Tensor,
    weight_e4m3: torch.Tensor,
    weight_scale: torch.Tensor,
    input_scale: torch.Tensor,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``x @ (W_e4m3 * s_w)^T + b`` with x quantized to e4m3 by the static ``input_scale`` inside the GEMM.

    x [..., K] (fp32/fp16/bf16) -> [..., N] in x's dtype; ``weight_e4m3`` [N, K] float8_e4m3fn (nn.Linear
    layout); ``weight_scale`` / ``input_scale`` fp32 per-tensor scales (device tensors with one value);
    ``bias`` [N] or None.
    """
    if x.dtype not in _ACTIVATION_DTYPES:
        raise ShapeError(f"fp8_linear: x must be fp32/fp16/bf16, got {x.dtype}")
    if weight_e4m3.dtype != torch.float8_e4m3fn or weight_e4m3.dim() != 2:
        raise ShapeError(f"fp8_linear: the weight must be a 2-D float8_e4m3fn [N, K], got {weight_e4m3.dtype} "
                         f"{tuple(weight_e4m3.shape)}")  # fmt: skip
    n, k = weight_e4m3.shape
    if x.dim() < 1 or x.shape[-1] != k:
        raise ShapeError(f"fp8_linear: x {tuple(x.shape)} does not end in the weight's K = {k}")
    if bias is not None and tuple(bias.shape) != (n,):
        raise ShapeError(f"fp8_linear: bias must be [{n}], got {tuple(bias.shape)}")
    s_w, s_in = _scalar_scale(weight_scale, "weight_scale"), _scalar_scale(input_scale, "input_scale")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k)
    m = x2.shape[0]
    out = torch.empty(m, n, device=x.device, dtype=x.dtype)
    if m and n:
        interpreted = is_interpreted(_fp8_linear_kernel)
        cfg = launch_config(n, k, fp8=True, interpreted=interpreted, max_rows=m)
        _fp8_linear_kernel[grid(m, n, cfg.block_m, cfg.block_n)](
            x2, weight_e4m3, bias, s_in, s_w,
            m, n, k,
            *x2.stride(), *weight_e4m3.stride(), *out.stride(),
            out,
            SOFT_ROUND=interpreted, EVEN_K=k % cfg.block_k == 0,
            BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n, BLOCK_K=cfg.block_k, GROUP_M=cfg.group_m,
            num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        )  # fmt: skip
    return out.reshape(*lead, n)


def fp8_linear_ref(
    x: torch.Tensor,
    weight_e4m3: torch.Tensor,
    weight_scale: torch.Tensor | float,
    input_scale: torch.Tensor | float,
    bias: torch.Tensor | None = None,
    reciprocal: bool = False,
) -> torch.Tensor:
    """Emulation of an FP8 Linear (either implementation) in x's dtype upcast to >= fp32 (float64 stays
    float64: the tests' reference): x quantized to e4m3 with the static input scale, times the dequantized
    e4m3 weight, plus bias. The e4m3 rounding is done in fp32 as the kernels do it: ``reciprocal=False``:
    ``x / s_in`` (:func:`~javisrt.kernels.fp8.quantize_e4m3`, the ``_scaled_mm`` path); ``True``:
    ``x * (1 / s_in)`` (:func:`fp8_linear`'s prologue)."""
    ct = torch.promote_types(x.dtype, torch.float32)
    s_in = torch.as_tensor(input_scale, device=x.device).to(torch.float32)  # the kernels' fp32 scale
    if reciprocal:
        x8 = (x.to(torch.float32) * (1.0 / s_in)).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    else:
        x8 = to_e4m3(x, s_in)
    xq = x8.to(ct) * s_in.to(ct)  # dequantized in ct: exact in float64
    w = weight_e4m3.to(ct) * torch.as_tensor(weight_scale, device=x.device).to(ct)
    out = xq @ w.T
    return out if bias is None else out + bias.to(ct)
