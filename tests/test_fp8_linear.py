"""kernels/fp8_linear.py (Triton FP8 GEMM, activation quantized in the prologue) vs its float64 emulation.

CPU: Triton interpreter (TRITON_INTERPRET=1, conftest.py); fp32/fp16 only (the interpreter's bf16 is wrong).
The emulation (``fp8_linear_ref(..., reciprocal=True)``) makes the same e4m3 roundings as the kernel
(x * (1 / s_in) in fp32, the stored e4m3 weight), and the GEMM in float64. What is left is the kernel's
fp32 accumulation and its rounding to the output dtype, so (style.md lesson 7, as test_modality_ffn's FP8
test): ``err(kernel) <= 2 * err(the same emulation run by torch in fp32) + noise floor in the output dtype``.
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_within, max_err, noise_floor, rel_err

from javisrt.engine.errors import ShapeError
from javisrt.kernels.fp8 import amax_scale, to_e4m3
from javisrt.kernels.fp8_linear import fp8_linear, fp8_linear_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _problem(m: int, k: int, n: int, seed: int, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(seed)
    x = (torch.randn(m, k, generator=g) * 3 + 0.5).to(dtype).to(DEVICE)
    w = (torch.randn(n, k, generator=g) / k**0.5).to(DEVICE)
    b = torch.randn(n, generator=g).to(dtype).to(DEVICE)
    s_x, s_w = amax_scale(x) * 0.8, amax_scale(w)  # 0.8: the top of the range saturates, as with a static scale
    return x, to_e4m3(w, s_w), s_w, s_x, b


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("bias", [True, False], ids=["bias", "nobias"])
@pytest.mark.parametrize(
    "m,k,n",
    [
        (146, 64, 48),  # ragged M (two M tiles, the second partial), N not a power of two
        (37, 96, 80),  # K not a multiple of BLOCK_K (masked K loop), ragged N
        (1, 128, 128),  # one token
    ],
    ids=["raggedM", "raggedK", "m1"],
)
def test_fp8_linear_matches_emulation(m: int, k: int, n: int, bias: bool, dtype: torch.dtype) -> None:
    x, w8, s_w, s_x, b = _problem(m, k, n, seed=m + k + n, dtype=dtype)
    bb = b if bias else None
    got = fp8_linear(x, w8, s_w, s_x, bb)
    assert got.dtype == dtype and got.shape == (m, n)
    ref = fp8_linear_ref(x.double(), w8, s_w, s_x, None if bb is None else bb.double(), reciprocal=True)
    # torch's own error on this problem: the same emulation run in fp32 (the kernel accumulates in fp32)
    emu32 = fp8_linear_ref(x.float(), w8, s_w, s_x, None if bb is None else bb.float(), reciprocal=True)
    torch_err = max_err(emu32, ref)
    atol = 2 * torch_err + noise_floor(ref, dtype)
    print(f"fp8_linear {dtype} m={m} k={k} n={n} bias={bias}: max {max_err(got, ref):.3e} rel {rel_err(got, ref):.2e}"
          f" | torch {torch_err:.3e} | atol {atol:.3e}")  # fmt: skip
    assert_within(got, ref, atol, "fp8_linear")


def test_fp8_linear_leading_dims_and_empty() -> None:
    """x [B, L, K] -> [B, L, N] (the op set's Linears); zero tokens give an empty result."""
    x, w8, s_w, s_x, b = _problem(2 * 21, 64, 32, seed=5, dtype=torch.float32)
    got = fp8_linear(x.reshape(2, 21, 64), w8, s_w, s_x, b)
    assert got.shape == (2, 21, 32)
    assert torch.equal(got.reshape(42, 32), fp8_linear(x, w8, s_w, s_x, b))
    assert fp8_linear(x[:0], w8, s_w, s_x, b).shape == (0, 32)


def test_fp8_linear_errors() -> None:
    x, w8, s_w, s_x, b = _problem(4, 64, 32, seed=6, dtype=torch.float32)
    with pytest.raises(ShapeError, match="float8_e4m3fn"):
        fp8_linear(x, w8.float(), s_w, s_x, b)
    with pytest.raises(ShapeError, match="K = 64"):
        fp8_linear(x[:, :32], w8, s_w, s_x, b)
    with pytest.raises(ShapeError, match="bias"):
        fp8_linear(x, w8, s_w, s_x, b[:16])
    with pytest.raises(ShapeError, match="per-tensor"):
        fp8_linear(x, w8, s_w.expand(2), s_x, b)
    with pytest.raises(ShapeError, match="fp32/fp16/bf16"):
        fp8_linear(x.double(), w8, s_w, s_x, b)


# ---- GPU (bf16, compiled kernel, released shape) -------------------------------------------------------


@pytest.mark.gpu
def test_fp8_linear_bf16_cuda_released_shape() -> None:
    """An attention Linear at the released size: M = 2 x 7301 tokens (ragged against BLOCK_M 128), K = N = 1536,
    bf16 activations; same emulation and tolerance rule as the CPU test (output rounding in bf16)."""
    x, w8, s_w, s_x, b = _problem(2 * 7301, 1536, 1536, seed=1, dtype=torch.bfloat16)
    got = fp8_linear(x, w8, s_w, s_x, b)
    ref = fp8_linear_ref(x.double(), w8, s_w, s_x, b.double(), reciprocal=True)
    emu32 = fp8_linear_ref(x.float(), w8, s_w, s_x, b.float(), reciprocal=True)
    atol = 2 * max_err(emu32, ref) + noise_floor(ref, torch.bfloat16)
    print(f"fp8_linear cuda bf16 14602x1536x1536: max {max_err(got, ref):.3e} rel {rel_err(got, ref):.2e} atol {atol:.3e}")
    assert_within(got, ref, atol, "fp8_linear cuda")
