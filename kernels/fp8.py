"""FP8 e4m3 helpers shared by the FP8 kernel variants, and their PyTorch emulation.

Per-tensor scales everywhere: ``x_fp8 = saturate(x / scale)`` in float8_e4m3fn (max 448), and
``x ~= float(x_fp8) * scale``. Scales travel as device tensors (one compiled kernel serves every layer;
a TensorRT plugin takes them as a constant input, because AOT plugins pass only int scalars).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

FP8_MAX = 448.0  # largest finite float8_e4m3fn


@triton.jit
def _round_to_e4m3_grid(y):
    """Round fp32 ``y`` (|y| <= 448) to the nearest e4m3 value (ties to even), in fp32 arithmetic.

    Only used under TRITON_INTERPRET: the interpreter's fp32->fp8 cast rounds the mantissa without
    carrying into the exponent (``_convert_float`` in triton 3.7.1 ORs the overflowed significand into
    the exponent field), which gave ~10% errors. Exactly representable values convert correctly, so we
    round here and the cast becomes exact. On sm_90 the cast is ``cvt.rn.satfinite.e4m3x2.f32``.
    """
    bits = y.to(tl.int32, bitcast=True)
    e = ((bits >> 23) & 0xFF) - 127  # unbiased exponent of |y|
    e = tl.maximum(e, -6)  # subnormals (< 2^-6) share the spacing 2^-9 of the 2^-6 binade
    ulp = ((e - 3 + 127) << 23).to(tl.float32, bitcast=True)  # 2^(e-3): 3 mantissa bits
    magic = ulp * 12582912.0  # 1.5 * 2^23 * ulp: fp32 addition rounds (ties-to-even) at ulp granularity
    return (y + magic) - magic


@triton.jit
def quant_e4m3(x, inv_scale, SOFT_ROUND: tl.constexpr):
    """fp32 tile -> float8e4nv: ``saturate(x * inv_scale)``; SOFT_ROUND only under the interpreter."""
    y = tl.clamp(x * inv_scale, -448.0, 448.0)
    if SOFT_ROUND:
        y = _round_to_e4m3_grid(y)
    return y.to(tl.float8e4nv)


@triton.jit
def _quantize_e4m3_kernel(
    # Pointers
    x_ptr, scale_ptr, out_ptr,
    # Dimensions
    n,
    # Meta-parameters
    SOFT_ROUND: tl.constexpr, BLOCK: tl.constexpr,
):  # fmt: skip
    """``out = e4m3(sat(x / scale))`` over a contiguous tensor; one read of x, one byte written per value."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    x = tl.load(x_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    # div_rn: IEEE division as torch's ``x / scale`` (to_e4m3), so both round the same value to e4m3
    y = tl.math.div_rn(x, tl.load(scale_ptr))
    tl.store(out_ptr + offs, quant_e4m3(y, 1.0, SOFT_ROUND), mask=mask)


QUANT_BLOCK = 1024  # elementwise, memory-bound: any block >= 512 reads full 128-byte lines


def quantize_e4m3(x: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """:func:`to_e4m3` in one Triton launch (one read of x, one e4m3 write): activations with a static
    per-tensor ``scale`` (fp32 [] device tensor) -> float8_e4m3fn of x's shape. torch's spelling is four
    elementwise kernels (upcast, divide, clamp, cast), about 6x the memory traffic for bf16 input."""
    from javisrt.kernels import is_interpreted

    x = x.contiguous()
    out = torch.empty(x.shape, device=x.device, dtype=torch.float8_e4m3fn)
    n = x.numel()
    if n:
        _quantize_e4m3_kernel[(triton.cdiv(n, QUANT_BLOCK),)](
            x, scale, out, n, SOFT_ROUND=is_interpreted(_quantize_e4m3_kernel), BLOCK=QUANT_BLOCK
        )
    return out


def quantize_e4m3_ref(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Emulated per-tensor e4m3 quantization, returned dequantized in fp32: ``sat(x/scale) -> e4m3 -> *scale``."""
    ct = torch.promote_types(x.dtype, torch.float32)  # float64 stays float64 (test references)
    xs = (x.to(ct) / scale).clamp(-FP8_MAX, FP8_MAX)
    return xs.to(torch.float8_e4m3fn).to(ct) * scale


def to_e4m3(x: torch.Tensor, scale: torch.Tensor | float) -> torch.Tensor:
    """Quantize to float8_e4m3fn storage with a per-tensor scale (weights, offline)."""
    return (x.float() / scale).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)


def amax_scale(x: torch.Tensor) -> torch.Tensor:
    """The per-tensor scale that maps ``max|x|`` to 448 (fp32 scalar tensor)."""
    return (x.detach().abs().amax().float() / FP8_MAX).clamp_min(1e-12)


__all__ = ["FP8_MAX", "amax_scale", "quant_e4m3", "quantize_e4m3", "quantize_e4m3_ref", "to_e4m3"]
