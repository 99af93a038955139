"""kernels/adaln_modulate.py vs its PyTorch reference (engine.ops.modulate_ref).

CPU: Triton interpreter (TRITON_INTERPRET=1, set in conftest.py before any kernel module is imported). Tolerance
(style.md lesson 7): reference in float64; ``err(kernel) <= 2 * err(torch in the same dtype) + floor``
with the noise floor ``((ref + 0.3 - 0.3) - ref).abs().max()`` in the test dtype.
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_within, max_err, noise_floor

from javisrt.engine.errors import ShapeError
from javisrt.kernels.adaln_modulate import adaln_modulate, adaln_modulate_ref

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6



def _check(x, shift, scale, dtype, what):  # type: ignore[no-untyped-def]
    ref = adaln_modulate_ref(x, shift, scale, EPS)  # float64
    xd, shd, scd = (t.to(dtype) for t in (x, shift, scale))
    out = adaln_modulate(xd, shd, scd, EPS)
    assert out.dtype == dtype
    torch_err = max_err(adaln_modulate_ref(xd, shd, scd, EPS), ref)
    atol = 2 * torch_err + noise_floor(ref, dtype)
    print(f"{what} {dtype}: kernel max {max_err(out, ref):.3e} | torch max {torch_err:.3e} | atol {atol:.3e}")
    assert_within(out, ref, atol, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize("batch,seq,dim", [(2, 113, 64), (1, 1, 96), (2, 203, 192)])
def test_adaln_modulate_matches_reference(batch: int, seq: int, dim: int, dtype: torch.dtype) -> None:
    # A residual stream with a large common offset: the two-pass variance must not cancel.
    x = torch.randn(batch, seq, dim, device=DEVICE, dtype=torch.float64) * 3 + 20
    shift, scale = (torch.randn(batch, 1, dim, device=DEVICE, dtype=torch.float64) * 0.5 for _ in range(2))
    _check(x, shift, scale, dtype, f"modulate B={batch} L={seq} d={dim}")


def test_chunk_views_and_batch_broadcast() -> None:
    """shift/scale as chunk views of a [B, 6, d] table (stride 6d), and a [1, 1, d] broadcast."""
    x = torch.randn(2, 70, 64, device=DEVICE, dtype=torch.float64)
    table = torch.randn(2, 6, 64, device=DEVICE, dtype=torch.float64) * 0.3
    shift, scale = table.chunk(6, dim=1)[:2]
    assert not shift.is_contiguous()
    _check(x, shift, scale, torch.float32, "chunk views")
    _check(x, shift[:1], scale[:1], torch.float32, "broadcast")


def test_rejects_bad_modulation_shape() -> None:
    x = torch.randn(2, 8, 64, device=DEVICE)
    with pytest.raises(ShapeError):
        adaln_modulate(x, torch.zeros(2, 8, 64, device=DEVICE), torch.zeros(2, 1, 64, device=DEVICE), EPS)


@pytest.mark.gpu
def test_adaln_modulate_bf16_cuda() -> None:
    x = torch.randn(2, 7301, 1536, device="cuda", dtype=torch.float64)
    shift, scale = (torch.randn(2, 1, 1536, device="cuda", dtype=torch.float64) * 0.5 for _ in range(2))
    _check(x, shift, scale, torch.bfloat16, "cuda bf16")
