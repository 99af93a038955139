"""kernels/ops_triton.py: the "triton" op set at the engine/ops.py seam.

Whole-model parity (style.md lesson 8): the tiny preset's forward with ``set_ops("triton")`` against the
same weights on the "torch" path. CPU: Triton interpreter (TRITON_INTERPRET=1, set in conftest.py
before any kernel module is imported). Tolerance: reference = the torch path in float64; the triton path in fp32
must be within twice the torch fp32 path's error plus the noise floor.
"""

from __future__ import annotations

import copy
import inspect

import pytest
import torch
from _tolerance import assert_within, max_err, noise_floor, rel_err

from javisrt.engine.config import JavisConfig
from javisrt.engine.model import JavisDiT, init_weights
from javisrt.engine.ops import OpSet, TorchOps, get_ops

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def test_triton_ops_satisfy_the_opset_protocol() -> None:
    ops = get_ops("triton")
    assert ops.name == "triton"
    for method in ("for_layer", "linear", "sinusoid", "patch_embed", "modulate", "rms_norm", "attention", "modality_ffn"):
        want = list(inspect.signature(getattr(OpSet, method)).parameters)[1:]
        assert list(inspect.signature(getattr(ops, method)).parameters) == want
        assert list(inspect.signature(getattr(TorchOps(), method)).parameters) == want


def _inputs(batch: int, frames: int, h8: int, w8: int, mel4: int, device: str, dtype: torch.dtype):  # type: ignore[no-untyped-def]
    g = torch.Generator().manual_seed(1)
    video = torch.randn(batch, 16, frames, h8, w8, generator=g) if frames else None
    audio = torch.randn(batch, 8, mel4, 16, generator=g) if mel4 else None
    t = torch.tensor([999.0, 500.0][:batch])
    ctx = torch.randn(batch, 16, 32, generator=g)
    cast = lambda x: None if x is None else x.to(device, dtype)  # noqa: E731
    return cast(video), cast(audio), t.to(device), cast(ctx)


def _compare(got, want, ref, what: str) -> None:  # type: ignore[no-untyped-def]
    for name, g, w, r in zip(("video", "audio"), got, want, ref):
        if r is None:
            assert g is None and w is None
            continue
        torch_err = max_err(w, r)
        atol = 2 * torch_err + noise_floor(r)
        print(f"{what} {name} {tuple(g.shape)}: triton max {max_err(g, r):.3e} rel {rel_err(g, r):.2e} | "
              f"torch max {torch_err:.3e} | atol {atol:.3e} | triton vs torch {max_err(g, w):.3e}")  # fmt: skip
        assert_within(g, r, atol, f"{what} forward {name}")


def _model() -> JavisDiT:
    return init_weights(JavisDiT(JavisConfig.from_name("tiny")).to(DEVICE)).eval()


@pytest.mark.parametrize(
    "frames,h8,w8,mel4",
    [(3, 8, 10, 12), (2, 6, 6, 0)],
    ids=["t2av-60v+48a", "t2v-18v"],
)
def test_tiny_forward_triton_equals_torch(frames: int, h8: int, w8: int, mel4: int) -> None:
    """2-layer tiny model (d 64, 2 heads x 32), fp32: Lv = frames*h8*w8/4 video tokens, La = mel4*4
    audio tokens (audio grid (mel4/2, 8)); batch 2 as with CFG."""
    model = _model()
    ref_model = copy.deepcopy(model).double()
    inputs = _inputs(2, frames, h8, w8, mel4, DEVICE, torch.float32)
    with torch.no_grad():
        ref = ref_model(*(None if x is None else x.double() for x in inputs))
        want = model(*inputs)
        got = model.set_ops("triton")(*inputs)
    _compare(got, want, ref, "tiny fp32")


def test_tiny_forward_audio_only() -> None:
    """t2a: no video tokens (Lv = 0); the audio's time alignment comes from video_latent_frames."""
    model = _model()
    ref_model = copy.deepcopy(model).double()
    _, audio, t, ctx = _inputs(2, 3, 8, 10, 12, DEVICE, torch.float32)
    with torch.no_grad():
        ref = ref_model(None, audio.double(), t, ctx.double(), video_latent_frames=3)
        want = model(None, audio, t, ctx, video_latent_frames=3)
        got = model.set_ops("triton")(None, audio, t, ctx, video_latent_frames=3)
    _compare(got, want, ref, "tiny t2a")


def test_tiny_forward_official_bf16() -> None:
    """The "official" numerics (bf16 with fp32 islands): under the interpreter the kernels' bf16 dots run
    on fp32 operands (its bf16 dot is wrong), on a GPU on bf16 tensor cores."""
    model = _model().set_numerics("official")
    ref_model = copy.deepcopy(model).double()  # the same bf16-rounded weights, computed in float64
    inputs = _inputs(2, 3, 8, 10, 12, DEVICE, torch.float32)
    with torch.no_grad():
        ref = ref_model(*(None if x is None else x.double() for x in inputs))
        want = model(*inputs)
        got = model.set_ops("triton")(*inputs)
    _compare(got, want, ref, "tiny official")
