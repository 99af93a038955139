"""kernels/modality_ffn.py vs its PyTorch reference (engine.ops.modality_ffn_ref).

CPU: Triton interpreter (TRITON_INTERPRET=1, set in conftest.py before any kernel module is imported). Tolerance
(style.md lesson 7): reference in float64; ``err(kernel) <= 2 * err(torch in the same dtype) + floor``
with the noise floor ``((ref + 0.3 - 0.3) - ref).abs().max()`` in the test dtype. Weights are scaled by
1/sqrt(fan_in), so every intermediate is O(1).
"""

from __future__ import annotations

import pytest
import torch
from _tolerance import assert_within, max_err, noise_floor, rel_err

from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.ops import FFNWeights, Modulation, modulate_ref
from javisrt.kernels.fp8 import amax_scale
from javisrt.kernels.modality_ffn import (
    modality_ffn,
    modality_ffn_fp8,
    modality_ffn_fp8_ref,
    modality_ffn_ref,
    quantize_ffn_weights,
)

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
EPS = 1e-6



def _expert(d: int, f: int) -> FFNWeights:
    r = lambda *s, fan: torch.randn(*s, device=DEVICE, dtype=torch.float64) / fan**0.5  # noqa: E731
    return FFNWeights(r(f, d, fan=d), r(f, fan=d), r(d, f, fan=f), r(d, fan=f))


def _mod(b: int, d: int) -> Modulation:
    return Modulation(*(torch.randn(b, 1, d, device=DEVICE, dtype=torch.float64) * 0.3 for _ in range(3)))


def _cast(t, dtype):  # type: ignore[no-untyped-def]
    return None if t is None else type(t)(*(u.to(dtype) for u in t))


def _problem(b: int, lv: int, la: int, d: int, f: int):  # type: ignore[no-untyped-def]
    x = torch.randn(b, lv + la, d, device=DEVICE, dtype=torch.float64) * 2 + 0.5
    return x, _expert(d, f), _expert(d, f), _mod(b, d), _mod(b, d)


def _check(x, lv, vw, aw, vm, am, dtype, what):  # type: ignore[no-untyped-def]
    ref = modality_ffn_ref(x, lv, vw, aw, vm, am, EPS)  # float64
    args = (x.to(dtype), lv, _cast(vw, dtype), _cast(aw, dtype), _cast(vm, dtype), _cast(am, dtype), EPS)
    out = modality_ffn(*args)
    assert out.dtype == dtype and out.shape == x.shape
    torch_err = max_err(modality_ffn_ref(*args), ref)
    atol = 2 * torch_err + noise_floor(ref, dtype)
    print(f"{what} {dtype}: kernel max {max_err(out, ref):.3e} rel {rel_err(out, ref):.2e} | torch max {torch_err:.3e} | atol {atol:.3e}")
    assert_within(out, ref, atol, what)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
@pytest.mark.parametrize(
    "batch,lv,la,d,f",
    [
        (2, 100, 37, 64, 128),  # CFG batch, tiny preset widths, ragged split (tiles never straddle Lv)
        (1, 0, 50, 96, 160),  # Lv = 0 (t2a); d and f miss the K tile (masked K loop)
        (1, 70, 0, 64, 256),  # La = 0 (t2v)
        (2, 130, 20, 128, 192),  # video needs 2 M tiles, audio a ragged 20-row tile
    ],
    ids=["cfg-ragged", "Lv0", "La0", "2tiles"],
)
def test_modality_ffn_matches_reference(batch: int, lv: int, la: int, d: int, f: int, dtype: torch.dtype) -> None:
    x, vw, aw, vm, am = _problem(batch, lv, la, d, f)
    _check(x, lv, vw if lv else None, aw if la else None, vm if lv else None, am if la else None, dtype,
           f"ffn B={batch} Lv={lv} La={la} d={d} f={f}")  # fmt: skip


def test_modality_ffn_chunk_views_and_broadcast() -> None:
    """Modulation chunks as views of the block's [B, 6, d] table, audio chunks batch-broadcast [1, 1, d]."""
    x, vw, aw, _, _ = _problem(2, 40, 24, 64, 128)
    table = torch.randn(2, 6, 64, device=DEVICE, dtype=torch.float64) * 0.3
    vm = Modulation(*table.chunk(6, dim=1)[3:])
    am = Modulation(*(torch.randn(1, 1, 64, device=DEVICE, dtype=torch.float64) * 0.3 for _ in range(3)))
    _check(x, 40, vw, aw, vm, am, torch.float32, "chunk views")


def test_modality_ffn_errors() -> None:
    x, vw, aw, vm, am = _problem(1, 8, 8, 64, 128)
    with pytest.raises(ConfigError):
        modality_ffn(x.float(), 8, _cast(vw, torch.float32), None, _cast(vm, torch.float32), None, EPS)
    bad = FFNWeights(aw.w1[:64].float(), aw.b1[:64].float(), aw.w2[:, :64].float(), aw.b2.float())
    with pytest.raises(ShapeError, match="same FFN width"):
        modality_ffn(x.float(), 8, _cast(vw, torch.float32), bad, _cast(vm, torch.float32), _cast(am, torch.float32), EPS)


# ---- FP8 e4m3 ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("batch,lv,la,d,f", [(2, 100, 37, 64, 128), (1, 0, 45, 96, 160)], ids=["cfg-ragged", "Lv0"])
def test_modality_ffn_fp8_matches_emulation(batch: int, lv: int, la: int, d: int, f: int) -> None:
    """Against an fp32 upcast emulation with the same e4m3 roundings (weights, modulated input, h).

    The reference is the emulation in float64; the kernel (e4m3 products, fp32 accumulation) must be
    within twice the error of the same emulation run by torch in fp32, plus the noise floor. No
    ``torch._scaled_mm`` (about 50x too slow on CPU).
    """
    x, vw, aw, vm, am = _problem(batch, lv, la, d, f)
    x, vm, am = x.float(), _cast(vm, torch.float32), _cast(am, torch.float32)
    experts = []
    for seg, w, mod in ((x[:, :lv], vw, vm), (x[:, lv:], aw, am)):
        w = _cast(w, torch.float32)
        if seg.shape[1] == 0:
            experts.append(None)
            continue
        # Static activation scales as a calibration would set them (amax of this batch).
        a = modulate_ref(seg, mod.shift, mod.scale, EPS)
        h = torch.nn.functional.gelu(a @ w.w1.T + w.b1, approximate="tanh")
        experts.append(quantize_ffn_weights(w, amax_scale(a), amax_scale(h)))
    vq, aq = experts
    out = modality_ffn_fp8(x, lv, vq, aq, vm if lv else None, am if la else None, EPS)
    emu = modality_ffn_fp8_ref(x, lv, vq, aq, vm, am, EPS)
    emu64 = modality_ffn_fp8_ref(x.double(), lv, _f64(vq), _f64(aq), _cast(vm, torch.float64), _cast(am, torch.float64), EPS)
    torch_err = max_err(emu, emu64)
    atol = 2 * torch_err + noise_floor(emu64, torch.float32)
    full = modality_ffn_ref(x, lv, _cast(vw, torch.float32) if lv else None, _cast(aw, torch.float32) if la else None,
                            vm if lv else None, am if la else None, EPS)  # fmt: skip
    print(f"fp8 ffn Lv={lv} La={la}: kernel-vs-emulation max {max_err(out, emu64):.3e} mean "
          f"{(out - emu64).abs().mean():.3e} | torch fp32 {torch_err:.3e} | atol {atol:.3e} | vs unquantized fp32: rel {rel_err(out - x, full - x):.3e}")  # fmt: skip
    assert_within(out, emu64, atol, "fp8 ffn")


def _f64(w):  # type: ignore[no-untyped-def]
    return None if w is None else type(w)(w.w1, w.b1.double(), w.w2, w.b2.double(), w.scales.double())


# ---- GPU (bf16, compiled kernels) ---------------------------------------------------------------------


@pytest.mark.gpu
def test_modality_ffn_bf16_cuda() -> None:
    x, vw, aw, vm, am = _problem(2, 6885, 416, 1536, 8960)
    _check(x, 6885, vw, aw, vm, am, torch.bfloat16, "cuda bf16 240p")
