"""kernels/rope_attention.py vs its PyTorch reference (engine.ops.attention_ref).

On CPU the kernel runs in the Triton interpreter (TRITON_INTERPRET=1, set in conftest.py before any kernel
module is imported; the interpreter's cost is per program, so shapes are a few 128-token tiles). Tolerance
(style.md lesson 7): reference in float64; ``err(kernel) <= 2 * err(torch in the same dtype) + floor``
with the noise floor ``((ref + 0.3 - 0.3) - ref).abs().max()`` evaluated in the test dtype.
"""

from __future__ import annotations

import pytest
import torch

from javisrt.engine.config import AudioPosMode
from javisrt.engine.rope import TokenGrid, rope_cos_sin
from javisrt.kernels.rope_attention import (
    rope_attention,
    rope_attention_fp8,
    rope_attention_fp8_ref,
    rope_attention_ref,
)
from _tolerance import assert_within, max_err, noise_floor, rel_err

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"



def _axes(head_dim: int) -> tuple[int, int, int]:
    return (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))


def _ta_rope(video: tuple[int, int, int], audio: tuple[int, int], head_dim: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The real TA-RoPE tables (interleave_offset) for a token grid."""
    return rope_cos_sin(TokenGrid(video, audio), AudioPosMode.INTERLEAVE_OFFSET, _axes(head_dim), 10000.0, DEVICE)


def _qkv(b: int, lq: int, lk: int, h: int, d: int, dtype: torch.dtype) -> tuple[torch.Tensor, ...]:
    # q/k as after the RMSNorm (unit RMS): O(1) scores, a softmax neither flat nor one-hot.
    return tuple(torch.randn(b, n, h, d, device=DEVICE, dtype=torch.float64) for n in (lq, lk, lk))


def _check(q, k, v, rope, dtype, what):  # type: ignore[no-untyped-def]
    rope64 = None if rope is None else (rope[0].double(), rope[1].double())
    ref = rope_attention_ref(q, k, v, rope64)  # float64
    qd, kd, vd = (t.to(dtype) for t in (q, k, v))
    out = rope_attention(qd, kd, vd, rope)
    assert out.dtype == dtype and out.shape == q.shape
    torch_err = max_err(rope_attention_ref(qd, kd, vd, rope), ref)
    atol = 2 * torch_err + noise_floor(ref, dtype)
    print(f"{what} {dtype}: kernel max {max_err(out, ref):.3e} rel {rel_err(out, ref):.2e} | torch max {torch_err:.3e} | atol {atol:.3e}")
    assert_within(out, ref, atol, what)


DTYPES = [torch.float32, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize(
    "video,audio,batch,heads,head_dim",
    [
        ((2, 5, 7), (13, 8), 2, 3, 32),  # 70 video + 104 audio = 174 tokens, CFG batch, tiny preset's head_dim
        ((3, 4, 6), (9, 3), 1, 2, 128),  # 72 + 27 = 99 (La not a multiple of anything), the model's head_dim
        ((2, 8, 9), (0, 0), 2, 1, 64),  # Lv = 144, La = 0 (t2v)
        ((3, 0, 0), (25, 8), 1, 12, 128),  # Lv = 0, La = 200 (t2a), 12 heads
    ],
    ids=["tiny-cfg", "hd128", "La0", "Lv0-12heads"],
)
def test_rope_attention_matches_reference(video, audio, batch, heads, head_dim, dtype) -> None:  # type: ignore[no-untyped-def]
    cos, sin = _ta_rope(video, audio, head_dim)
    seq = cos.shape[0]
    q, k, v = _qkv(batch, seq, seq, heads, head_dim, dtype)
    _check(q, k, v, (cos, sin), dtype, f"attn L={seq} H={heads} D={head_dim}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("lq,lk", [(113, 16), (77, 203)])
def test_cross_attention_no_rope(lq: int, lk: int, dtype: torch.dtype) -> None:
    """The cross-attention call: no RoPE, Lq != Lk (text_len keys), ragged key tail."""
    q, k, v = _qkv(2, lq, lk, 2, 64, dtype)
    _check(q, k, v, None, dtype, f"cross Lq={lq} Lk={lk}")


def test_strided_qkv_views() -> None:
    """q/k/v as views of one fused [B, L, 3, H, D] projection (non-contiguous strides)."""
    cos, sin = _ta_rope((2, 4, 5), (7, 4), 64)
    seq = cos.shape[0]
    qkv = torch.randn(2, seq, 3, 2, 64, device=DEVICE, dtype=torch.float64)
    q, k, v = qkv.unbind(2)
    assert not q.is_contiguous()
    _check(q, k, v, (cos, sin), torch.float32, "strided")


@pytest.mark.slow
def test_long_sequence() -> None:
    """One long joint sequence: 9 x 128-token tiles of each of q and k."""
    cos, sin = _ta_rope((5, 10, 18), (25, 8), 128)  # 900 video + 200 audio = 1100 tokens
    q, k, v = _qkv(1, 1100, 1100, 1, 128, torch.float32)
    _check(q, k, v, (cos, sin), torch.float32, "long L=1100")


def test_rejects_bad_shapes() -> None:
    from javisrt.engine.errors import ShapeError

    q = torch.randn(1, 8, 2, 48, device=DEVICE)
    with pytest.raises(ShapeError, match="power of two"):
        rope_attention(q, q, q, None)
    q = torch.randn(1, 8, 2, 32, device=DEVICE)
    with pytest.raises(ShapeError, match="cos/sin"):
        rope_attention(q, q, q, (torch.ones(8, 8, device=DEVICE), torch.ones(8, 8, device=DEVICE)))


# ---- FP8 e4m3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "video,audio,heads,head_dim",
    [((2, 4, 8), (11, 8), 2, 64), ((1, 6, 8), (20, 7), 1, 128)],
    ids=["152tok-hd64", "188tok-hd128"],
)
def test_rope_attention_fp8_matches_emulation(video, audio, heads, head_dim) -> None:  # type: ignore[no-untyped-def]
    """Against an fp32 upcast emulation with the same e4m3 roundings of Q, K (after RoPE) and V.

    The kernel also rounds P to e4m3 (against the running row max); the emulation that rounds P against
    the final max measures that error class, so: err(kernel) <= 2 * err(P-rounding emulation) + floor.
    """
    cos, sin = _ta_rope(video, audio, head_dim)
    seq = cos.shape[0]
    q, k, v = (t.float() for t in _qkv(2, seq, seq, heads, head_dim, torch.float32))
    # Per-tensor scales as a calibration would set them: amax of the rotated q/k (rotation keeps pair
    # norms, so the pre-rotation amax * sqrt(2) bounds it) and of v, mapped to 448.
    scales = torch.stack([q.abs().amax() * 2**0.5, k.abs().amax() * 2**0.5, v.abs().amax()]).float() / 448
    out = rope_attention_fp8(q, k, v, (cos, sin), scales)
    emu = rope_attention_fp8_ref(q, k, v, (cos, sin), scales)
    emu_p = rope_attention_fp8_ref(q, k, v, (cos, sin), scales, quantize_p=True)
    p_err = max_err(emu_p, emu)
    atol = 2 * p_err + noise_floor(emu, torch.float32)
    full = rope_attention_ref(q, k, v, (cos, sin))
    print(
        f"fp8 attn L={seq} D={head_dim}: kernel-vs-emulation max {max_err(out, emu):.3e} | P-rounding {p_err:.3e} "
        f"| atol {atol:.3e} | vs unquantized fp32: rel {rel_err(out, full):.3e}"
    )
    assert_within(out, emu, atol, "fp8 attention")


# ---- GPU (bf16, compiled kernels) ---------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("seq,heads", [(7301, 12), (1000, 3)])
def test_rope_attention_bf16_cuda(seq: int, heads: int) -> None:
    angles = torch.rand(seq, 64, device="cuda", dtype=torch.float64) * 50
    cos, sin = angles.cos().float(), angles.sin().float()
    q, k, v = (torch.randn(1, seq, heads, 128, device="cuda", dtype=torch.float64) for _ in range(3))
    _check(q, k, v, (cos, sin), torch.bfloat16, f"cuda bf16 L={seq}")
