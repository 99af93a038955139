"""kernels/ops_triton_fp8.py + runtime/fp8_scales.py: the triton-fp8 op set against modelopt's fake-quant
forward (the same calibrated quantizers), the scaled_mm Linear against its emulation, the scales sidecar.

The tiny preset has head_dim 32; the e4m3 attention kernel needs >= 64, so these tests use one head
(head_dim 64). Everything runs in fp32 (the interpreter's bf16 is wrong, tests/conftest.py).
"""

from __future__ import annotations

import copy
import dataclasses
import math
from pathlib import Path

import pytest
import torch

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError
from javisrt.engine.model import build_model, init_weights
from javisrt.engine.ops import get_ops
from javisrt.export.contract import DiTContract
from javisrt.kernels import ops_triton_fp8
from javisrt.kernels.fp8 import amax_scale, to_e4m3
from javisrt.kernels.fp8_linear import fp8_linear_ref
from javisrt.kernels.ops_triton_fp8 import Fp8Linear, TritonFp8Ops, scaled_mm_linear
from javisrt.kernels.rope_attention import rope_attention_fp8_ref
from javisrt.runtime.backends.torch_engine import contract_forward
from javisrt.runtime.calibration import CalibrationSet, calibrate_fp8
from javisrt.runtime.fp8_scales import Fp8Scales, default_path, describe_calibration, scales_from_calibration
from tests._tolerance import assert_within, max_err, noise_floor, rel_err

pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")  # modelopt, see test_quantize

SHAPE = {"batch": 1, "video_frames": 3, "video_height": 6, "video_width": 8, "audio_frames": 10}
CHECK = {"batch": 2, "video_frames": 2, "video_height": 4, "video_width": 14, "audio_frames": 6}


def fp8_config() -> JavisConfig:
    return JavisConfig.from_name("tiny", num_heads=1)


@pytest.fixture(scope="module")
def calibrated() -> tuple[torch.nn.Module, torch.nn.Module, Fp8Scales, DiTContract]:
    """(unquantized fp32 model, modelopt fake-quant wrapper calibrated on 2 trajectories, its scales, contract)."""
    cfg = fp8_config()
    model = init_weights(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    contract = DiTContract.for_config(cfg)
    plain = copy.deepcopy(model).requires_grad_(False)
    wrapper = calibrate_fp8(model, CalibrationSet.random(contract, [SHAPE], num_prompts=2, steps=4))
    return plain, wrapper, scales_from_calibration(wrapper, describe_calibration(2, 4, [SHAPE], True)), contract


def _set_softmax_quant(wrapper: torch.nn.Module, on: bool) -> None:
    for m in wrapper.modules():
        if hasattr(m, "softmax_quantizer"):
            m.softmax_quantizer.enable() if on else m.softmax_quantizer.disable()


def test_forward_matches_modelopt_fake_quant(calibrated) -> None:  # type: ignore[no-untyped-def]
    """Whole tiny forward, triton-fp8 vs modelopt's fake-quant forward (onnx-fp8 op set, same quantizers).

    Both quantize the same tensors with the same scales; they differ in (1) P: modelopt rounds the
    normalised softmax as ``P * 448``, the kernel ``exp(s - running max) * 256`` before normalising, a
    different rounding of the same e4m3 precision; (2) fp32 accumulation order (kernels, _scaled_mm),
    which can flip a few e4m3 roundings downstream. (1) dominates; its size is measured on the emulation
    itself: the fake-quant forward with P quantized vs not. Two independent P roundings of that size are
    <= 2x apart (sqrt(2) expected), so: rel err(kernel, fake-quant) <= 2 x rel err(P rounding) + floor.
    """
    plain, wrapper, scales, contract = calibrated
    model = copy.deepcopy(plain)
    model.set_ops(TritonFp8Ops.prepare(model, scales.scales))
    inputs = contract.sample_inputs(CHECK, torch.Generator().manual_seed(3))
    with torch.no_grad():
        got = contract_forward(model, inputs, CHECK["video_frames"])
        fake = wrapper(*inputs.values())
        _set_softmax_quant(wrapper, False)
        try:
            fake_no_p = wrapper(*inputs.values())
        finally:
            _set_softmax_quant(wrapper, True)
        full = contract_forward(plain, inputs, CHECK["video_frames"])
    for name, f, f_no_p in zip(contract.output_names, fake, fake_no_p, strict=True):
        g = got[name]
        e, e_p, e_q = rel_err(g, f), rel_err(f_no_p, f), rel_err(f, full[name])
        floor = noise_floor(f) / float(f.abs().max())
        print(f"{name}: triton-fp8 vs fake-quant {e:.2e}; P-rounding class {e_p:.2e}; FP8 vs fp32 {e_q:.2e}")
        assert e <= 2 * e_p + floor, name


def test_linears_and_ffn_match_modelopt_quantized_modules(calibrated) -> None:  # type: ignore[no-untyped-def]
    """Per layer, where the roundings are the same ones (only fp32 summation order differs): the
    _scaled_mm Linear vs modelopt's QuantLinear, and the FP8 FFN kernel vs the fake-quant experts.
    Tolerance: 2 x torch's own fp32 error on that GEMM (vs float64) + floor, plus a rare e4m3 tie flip
    (an input within fp32 rounding of a tie): at most one e4m3 step of the input times max|w| per flip."""
    plain, wrapper, scales, _ = calibrated
    ops = TritonFp8Ops.prepare(plain, scales.scales)
    g = torch.Generator().manual_seed(7)
    x = torch.randn(2, 37, plain.cfg.dim, generator=g)
    for lin in ("self_attn.q", "self_attn.o", "cross_attn.k"):
        ours, theirs = plain.blocks[1].get_submodule(lin), wrapper.model.blocks[1].get_submodule(lin)
        with torch.no_grad():
            got, want = ops.linear(ours, x), theirs(x)
            f64 = torch.nn.functional.linear(x.double(), ours.weight.double(), ours.bias.double())
            err32 = max_err(torch.nn.functional.linear(x, ours.weight, ours.bias), f64)
        s_in = scales.scales[f"blocks.1.{lin}.input"]
        flip = float(s_in) * 2.0 ** (8 - 3) * float(ours.weight.abs().max())  # one e4m3 step (32) of the top binade [256, 448]
        assert_within(got, want, 2 * err32 + noise_floor(want) + flip, lin)
        assert rel_err(got, want) < 1e-5, lin  # flips are rare: the bulk agrees to fp32 rounding
    block, fq_block = plain.blocks[0], wrapper.model.blocks[0]
    e0 = torch.randn(2, 6, plain.cfg.dim, generator=g) * 0.1
    ae0 = torch.randn(2, 3, plain.cfg.dim, generator=g) * 0.1
    from javisrt.engine.ops import Modulation, modality_ffn_ref

    mods = [Modulation(*(block.modulation + e0).chunk(6, dim=1)[3:]),
            Modulation(*(block.audio_modulation.param + ae0).chunk(3, dim=1))]  # fmt: skip
    with torch.no_grad():
        got = ops.modality_ffn(x, 20, block.ffn, block.audio_ffn, *mods, block.eps)
        want = modality_ffn_ref(x, 20, fq_block.ffn, fq_block.audio_ffn, *mods, block.eps)
    print(f"ffn: triton-fp8 vs fake-quant rel {rel_err(got, want):.2e}, max {max_err(got, want):.2e}")
    assert rel_err(got, want) < 1e-4


def test_attention_scales_are_the_calibrated_ranges(calibrated) -> None:  # type: ignore[no-untyped-def]
    """The q scale conversion: modelopt's q_bmm slot sees q/sqrt(D), the kernel's q scale is amax * sqrt(D)
    / 448. With P left unquantized on both sides, the fake-quant attention (onnx-fp8 op set bound to the
    calibrated module) equals the kernel's emulation with the sidecar's scales to fp32 rounding."""
    plain, wrapper, scales, _ = calibrated
    attn = wrapper.model.blocks[0].self_attn
    d = plain.cfg.head_dim
    g = torch.Generator().manual_seed(11)
    q, k, v = (torch.randn(1, 40, 1, d, generator=g) for _ in range(3))
    angles = torch.rand(40, d // 2, generator=g) * 6
    rope = (angles.cos(), angles.sin())
    s = torch.stack([scales.scales[f"blocks.0.self_attn.attn_{c}"] for c in "qkv"])
    assert float(s[0]) == pytest.approx(float(attn.q_bmm_quantizer.amax) * math.sqrt(d) / 448, rel=1e-6)
    _set_softmax_quant(wrapper, False)
    try:
        with torch.no_grad():
            want = get_ops("onnx-fp8").for_layer(attn).attention(q, k, v, rope)
    finally:
        _set_softmax_quant(wrapper, True)
    got = rope_attention_fp8_ref(q, k, v, rope, s)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
@pytest.mark.parametrize("m", [1, 37, 64])
def test_scaled_mm_linear_matches_emulation(dtype: torch.dtype, m: int) -> None:
    """``torch._scaled_mm`` Linear vs its emulation (``fp8_linear_ref``: x quantized as ``x / s`` in fp32, the
    e4m3 weight, GEMM in float64): the same two roundings, so the error is the output dtype's rounding +
    fp32 accumulation (2x torch's own error)."""
    g = torch.Generator().manual_seed(m)
    x = torch.randn(3, m, 64, generator=g).to(dtype)
    w = torch.randn(48, 64, generator=g) / 8
    b = torch.randn(48, generator=g).to(dtype)
    s_x, s_w = amax_scale(x) * 0.8, amax_scale(w)  # 0.8: some inputs saturate, as with a static scale
    fp8 = Fp8Linear(to_e4m3(w, s_w), s_w, s_x)
    got = scaled_mm_linear(x, fp8, b)
    assert got.dtype == dtype and got.shape == (3, m, 48)
    ref = fp8_linear_ref(x.double(), fp8.weight, s_w, s_x, b.double())
    torch_err = max_err(torch.nn.functional.linear(x.float(), w.float(), b.float()).to(dtype), x.double() @ w.double().T + b.double())
    assert_within(got, ref, 2 * torch_err + noise_floor(ref, dtype), f"scaled_mm {dtype} m={m}")


def _emulated_linear(reciprocal: bool):  # type: ignore[no-untyped-def]
    """An FP8 Linear implementation for the op set: :func:`fp8_linear_ref` in float64, back in x's dtype."""

    def run(x: torch.Tensor, fp8: Fp8Linear, bias: torch.Tensor | None) -> torch.Tensor:
        b = None if bias is None else bias.double()
        return fp8_linear_ref(x.double(), fp8.weight, fp8.weight_scale, fp8.input_scale, b, reciprocal).to(x.dtype)

    return run


def test_triton_linear_forward_matches_scaled_mm(calibrated, monkeypatch: pytest.MonkeyPatch) -> None:  # type: ignore[no-untyped-def]
    """Whole tiny forward, ``linear_impl="triton"`` vs ``"scaled_mm"``. The two differ in (1) the fp32
    summation order of every attention Linear and (2) x's e4m3 rounding spelled ``x * (1/s)`` vs ``x / s``
    (one fp32 rounding apart: it moves an input only across a tie). Both effects are measured on the
    emulation (the Linears in float64 with each spelling): (1) e_acc = scaled_mm forward vs the float64
    ``x / s`` forward, (2) e_q = float64 ``x * (1/s)`` forward vs ``x / s``. The triton forward carries (1)
    with an independent summation order plus (2): rel err(triton, scaled_mm) <= 2 (e_acc + e_q) + floor."""
    plain, _, scales, contract = calibrated
    monkeypatch.setitem(ops_triton_fp8.LINEAR_IMPLS, "emulation_div", _emulated_linear(False))
    monkeypatch.setitem(ops_triton_fp8.LINEAR_IMPLS, "emulation_reciprocal", _emulated_linear(True))
    model = copy.deepcopy(plain)
    base = TritonFp8Ops.prepare(model, scales.scales)
    inputs = contract.sample_inputs(CHECK, torch.Generator().manual_seed(5))
    outs = {}
    with torch.no_grad():
        for impl in ("triton", "scaled_mm", "emulation_div", "emulation_reciprocal"):
            model.set_ops(dataclasses.replace(base, linear_impl=impl))  # one prepared e4m3 copy for all four
            outs[impl] = contract_forward(model, inputs, CHECK["video_frames"])
    for name in contract.output_names:
        o = {impl: out[name] for impl, out in outs.items()}
        e = rel_err(o["triton"], o["scaled_mm"])
        e_acc = rel_err(o["scaled_mm"], o["emulation_div"])
        e_q = rel_err(o["emulation_reciprocal"], o["emulation_div"])
        floor = noise_floor(o["scaled_mm"]) / float(o["scaled_mm"].abs().max())
        print(f"{name}: triton vs scaled_mm {e:.2e}; summation class {e_acc:.2e}; x/s vs x*(1/s) {e_q:.2e}")
        assert e <= 2 * (e_acc + e_q) + floor, name


def test_linear_impl_is_validated(calibrated) -> None:  # type: ignore[no-untyped-def]
    plain, _, scales, _ = calibrated
    with pytest.raises(ConfigError, match="unknown FP8 Linear implementation 'cublas'.*scaled_mm, triton"):
        TritonFp8Ops.prepare(plain, scales.scales, linear_impl="cublas")
    ops = TritonFp8Ops.prepare(plain, scales.scales, linear_impl="triton")
    assert ops.linear_impl == "triton" and ops.for_layer(plain.blocks[0].self_attn).linear_impl == "triton"
    assert TritonFp8Ops.prepare(plain, scales.scales).linear_impl == "scaled_mm"  # the default
    with pytest.raises(ConfigError, match="--fp8-linear"):
        dataclasses.replace(ops, linear_impl="")


def test_fp8_linear_plumbing_engine_and_cli(calibrated, capsys: pytest.CaptureFixture[str]) -> None:  # type: ignore[no-untyped-def]
    """``fp8_linear=`` reaches the prepared op set (and for_mode's engines); it is refused off triton-fp8, an
    unknown value is a ConfigError, and both CLIs take ``--fp8-linear scaled_mm|triton`` only."""
    import argparse

    from javisrt.bench import cli as bench_cli
    from javisrt.runtime import cli
    from javisrt.runtime.backends import create_engine
    from javisrt.runtime.backends.torch_engine import TorchEngine

    plain, _, scales, _ = calibrated
    engine = TorchEngine(copy.deepcopy(plain), ops="triton-fp8", fp8_scales=scales.scales, fp8_linear="triton")
    engine.load()
    assert engine.model.ops.linear_impl == "triton"
    assert engine.for_mode("t2a").model.ops is engine.model.ops
    with pytest.raises(ConfigError, match="unknown FP8 Linear implementation 'cutlass'"):
        TorchEngine(copy.deepcopy(plain), ops="triton-fp8", fp8_scales=scales.scales, fp8_linear="cutlass")
    with pytest.raises(ConfigError, match="--fp8-linear"):
        create_engine("torch", model=copy.deepcopy(plain), ops="triton", fp8_linear="triton")
    with pytest.raises(ConfigError, match="--fp8-linear"):
        create_engine("onnxruntime", engine_file="x.onnx", fp8_linear="triton")

    for register in (cli.build_parser, None):
        if register is None:
            parser = argparse.ArgumentParser(prog="javisrt")
            bench_cli.register(parser.add_subparsers(dest="command"))
            argv = ["bench"]
        else:
            parser, argv = register(), ["generate", "--tiny", "--prompt", "x"]
        assert parser.parse_args([*argv, "--fp8-linear", "triton"]).fp8_linear == "triton"
        assert parser.parse_args(argv).fp8_linear is None  # the op set's default
        with pytest.raises(SystemExit):
            parser.parse_args([*argv, "--fp8-linear", "cublas"])
        assert "--fp8-linear {scaled_mm,triton}" in capsys.readouterr().err
    assert cli.main(["generate", "--tiny", "--prompt", "x", "--fp8-linear", "triton", "--quiet"]) == cli.EXIT_ERROR
    assert "--ops triton-fp8" in capsys.readouterr().err


def test_gpu_proof_faster_row_is_computed_from_the_timings() -> None:
    """bench/gpu_proof.py part 2's ``attention_linears_faster``: the candidate with fewer ms, never a
    constant; skipped (with the reason) while a candidate is not timed, as _scaled_mm on the CPU."""
    from javisrt.bench.gpu_proof import faster_row

    names = {"scaled_mm": "a", "triton": "b"}
    row = faster_row({"a": {"status": "ok", "ms": 2.0}, "b": {"status": "ok", "ms": 1.6}}, names)
    assert (row["status"], row["faster"], row["speedup"]) == ("ok", "triton", 1.25)
    assert faster_row({"a": {"status": "ok", "ms": 1.0}, "b": {"status": "ok", "ms": 1.6}}, names)["faster"] == "scaled_mm"
    row = faster_row({"a": {"status": "skipped: torch._scaled_mm is timed on an FP8 GPU only"}, "b": {"status": "ok", "ms": 1.6}}, names)
    assert row["status"].startswith("skipped") and "scaled_mm: skipped" in row["status"] and "faster" not in row


def test_op_set_needs_its_scales(calibrated) -> None:  # type: ignore[no-untyped-def]
    plain, _, scales, _ = calibrated
    with pytest.raises(ConfigError, match="fp8-scales"):
        get_ops("triton-fp8")
    partial = {k: v for k, v in scales.scales.items() if not k.startswith("blocks.1.cross_attn.v.")}
    with pytest.raises(ConfigError, match="blocks.1.cross_attn.v.input"):
        TritonFp8Ops.prepare(plain, partial)
    ops = TritonFp8Ops.prepare(plain, scales.scales)
    other = build_model(fp8_config())
    with pytest.raises(ConfigError, match="no FP8"):
        ops.for_layer(other.blocks[0].self_attn)
    with pytest.raises(ConfigError, match="no FP8"):
        ops.linear(other.blocks[0].self_attn.q, torch.zeros(1, 64))


def test_sidecar_round_trip_and_errors(calibrated, tmp_path: Path) -> None:  # type: ignore[no-untyped-def]
    _, _, scales, _ = calibrated
    cfg = fp8_config()
    path = default_path(tmp_path / "model.safetensors")
    assert path.name == "model.safetensors.fp8-scales.safetensors"
    scales.save(path)
    back = Fp8Scales.load(path, cfg)
    assert back.scales.keys() == scales.scales.keys()
    assert all(torch.equal(back.scales[k], scales.scales[k].reshape(())) for k in scales.scales)
    assert back.config_hash == scales.config_hash and "random stand-in embeddings" in back.calibration
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]  # atomic: no temp file left
    with pytest.raises(ConfigError, match="calibrated for config"):
        Fp8Scales.load(path, JavisConfig.from_name("tiny", num_heads=1, num_layers=3))
    with pytest.raises(ConfigError, match="javisrt export"):
        Fp8Scales.load(tmp_path / "missing.safetensors", cfg)


def test_export_cli_sidecar_then_engine_from_checkpoint(tmp_path: Path) -> None:
    """``javisrt export --checkpoint CKPT --fp8-scales`` writes the sidecar next to the checkpoint; the torch
    engine with ``ops="triton-fp8"`` finds it there and samples; without it the error names the command."""
    import argparse

    from javisrt.engine.checkpoint import save_model
    from javisrt.runtime import export_cli
    from javisrt.runtime.backends import create_engine
    from javisrt.runtime.calibration import calibration_sampler, sample_trajectory

    cfg = fp8_config()
    ckpt = save_model(init_weights(build_model(cfg), torch.Generator().manual_seed(1)), tmp_path / "m.safetensors")
    parser = argparse.ArgumentParser(prog="javisrt")
    export_cli.register(parser.add_subparsers(dest="command"))
    with pytest.raises(ConfigError, match="javisrt export --checkpoint CKPT --fp8-scales"):
        create_engine("torch", checkpoint=ckpt, ops="triton-fp8", numerics="fp32")
    args = parser.parse_args(["export", "--checkpoint", str(ckpt), "--fp8-scales", "--calib-shape", "33,32,48",
                              "--calib-steps", "2", "--calib-num-prompts", "1"])  # fmt: skip
    assert export_cli.run(args) == 0
    assert default_path(ckpt).is_file()
    with pytest.raises(ConfigError, match="--fp8-scales applies"):
        create_engine("torch", checkpoint=ckpt, ops="triton", fp8_scales=default_path(ckpt))
    engine = create_engine("torch", checkpoint=ckpt, ops="triton-fp8", numerics="fp32")
    fp8_ops = engine.model.ops
    assert fp8_ops.name == "triton-fp8"
    assert engine.for_mode("t2a").model.ops is fp8_ops  # one prepared e4m3 copy for every mode
    g = torch.Generator().manual_seed(2)
    video, audio = torch.randn(1, 16, 2, 4, 6, generator=g), torch.randn(1, 8, 6, 16, generator=g)
    cond, uncond = (torch.randn(1, cfg.text_len, cfg.text_dim, generator=g) for _ in range(2))
    dims = {"video_frames": 2, "video_height": 4, "video_width": 6, "audio_frames": 6}
    out = sample_trajectory(engine, video, audio, cond, uncond, calibration_sampler(dims, 2, 5.0, True))
    assert [tuple(o.shape) for o in out] == [tuple(video.shape), tuple(audio.shape)]
    assert all(bool(torch.isfinite(o).all()) for o in out)


def test_one_forward_amax_equals_modelopt_calibration(calibrated) -> None:  # type: ignore[no-untyped-def]
    """The modelopt-free stand-in (GPU proof): amax observed on the same trajectories gives the same scales
    as modelopt's max calibration, up to the fp32 differences of the two attention spellings."""
    from javisrt.runtime.backends.torch_engine import TorchEngine
    from javisrt.runtime.calibration import sample_trajectory
    from javisrt.runtime.fp8_scales import scales_from_forward

    plain, _, scales, contract = calibrated
    model = copy.deepcopy(plain)
    calib = CalibrationSet.random(contract, [SHAPE], num_prompts=2, steps=4)
    engine = TorchEngine(model)
    engine.load()

    def run() -> None:
        for video, audio, prompt, config, _ in calib.trajectories():
            sample_trajectory(engine, video, audio, prompt, calib.negative, config)

    observed = scales_from_forward(model, run, "test").scales
    assert observed.keys() == scales.scales.keys()
    worst = max(abs(float(observed[k]) / float(scales.scales[k]) - 1) for k in observed)
    print(f"one-forward amax vs modelopt: worst relative scale difference {worst:.2e}")
    assert worst < 1e-4


def test_generate_tiny_triton_fp8_is_a_clear_error(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """``generate --tiny --ops triton-fp8``: one typed error line (head_dim 32 < 64), no traceback."""
    from javisrt.runtime import cli

    argv = ["generate", "--tiny", "--prompt", "x", "--ops", "triton-fp8", "--steps", "1", "--quiet",
            "--output-dir", str(tmp_path)]  # fmt: skip
    assert cli.main(argv) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "head_dim 32" in err and err.count("\n") <= 3, err


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_quantize_e4m3_kernel_equals_to_e4m3(dtype: torch.dtype) -> None:
    """The fused activation quantization rounds exactly as torch's ``to_e4m3`` (value for value; under the
    interpreter's soft rounding a tiny negative may give +0 where torch gives -0), saturation included."""
    from javisrt.kernels.fp8 import quantize_e4m3

    x = (torch.randn(3, 1000, 64, generator=torch.Generator().manual_seed(4)) * 3).to(dtype)
    s = amax_scale(x) * 0.7  # the top 30% of the range saturates
    got, want = quantize_e4m3(x, s), to_e4m3(x, s)
    assert got.dtype == torch.float8_e4m3fn and got.shape == x.shape
    assert torch.equal(got.float(), want.float())


def test_follows_the_op_set_protocol(calibrated) -> None:  # type: ignore[no-untyped-def]
    import inspect

    from javisrt.engine.ops import OpSet
    from tests.test_export import OPSET_METHODS

    ops = TritonFp8Ops.prepare(calibrated[0], calibrated[2].scales)
    assert ops.name == "triton-fp8"
    for method in OPSET_METHODS:
        want = list(inspect.signature(getattr(OpSet, method)).parameters)[1:]
        assert list(inspect.signature(getattr(ops, method)).parameters) == want, method
