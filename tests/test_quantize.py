"""export/quantize.py + export/fp8_rules.py: modelopt FP8 PTQ, the Q/DQ graph, the TensorRT rule checker."""

from __future__ import annotations

import copy

import onnx
import onnxruntime as ort
import pytest
import torch
from onnx import numpy_helper

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError
from javisrt.engine.model import build_model, init_weights
from javisrt.export.contract import DiTContract
from javisrt.runtime.sampling import SamplerConfig, Solver
from javisrt.export.fp8_rules import SOFTMAX_SCALE, attention_matmuls, audit_ops, check_fp8
from javisrt.export.quantize import export_fp8
from javisrt.runtime.backends import create_engine
from javisrt.runtime.calibration import CalibrationSet, calibrate_fp8, fp8_engine, fp8_fidelity
from tests._tolerance import rel_err

CALIB_SHAPE = {"batch": 1, "video_frames": 3, "video_height": 6, "video_width": 8, "audio_frames": 10}
CHECK_SHAPES = [
    {"batch": 2, "video_frames": 3, "video_height": 6, "video_width": 8, "audio_frames": 10},
    {"batch": 1, "video_frames": 2, "video_height": 4, "video_width": 14, "audio_frames": 6},
]
# modelopt 0.47 calls torch.jit.script (its fake-quant kernels), deprecated in torch 2.13: third-party,
# unavoidable, and it does not affect what we export (the TorchScript exporter is used knowingly).
pytestmark = pytest.mark.filterwarnings("ignore:`torch.jit.script:DeprecationWarning")

RULES = ("dq_before_attention_matmul", "softmax_fixed_scale", "no_cast_dq_matmul", "qdq_after_rope")


@pytest.fixture(scope="module")
def setup() -> tuple[torch.nn.Module, torch.nn.Module, DiTContract, onnx.ModelProto]:
    """(fp32 model copy, calibrated FP8 wrapper, contract, exported FP8 graph)."""
    cfg = JavisConfig.from_name("tiny")
    model = init_weights(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    contract = DiTContract.for_config(cfg)
    reference = copy.deepcopy(model)
    calib = CalibrationSet.random(contract, [CALIB_SHAPE], num_prompts=3, steps=10)
    wrapper = calibrate_fp8(model, calib)
    return reference, wrapper, contract, export_fp8(wrapper, contract)


def _ort(model: onnx.ModelProto) -> ort.InferenceSession:
    so = ort.SessionOptions()
    so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL  # FP8 Q/DQ: feasibility §3
    return ort.InferenceSession(model.SerializeToString(), so, providers=["CPUExecutionProvider"])


def test_fp8_graph_structure(setup) -> None:  # type: ignore[no-untyped-def]
    _, _, contract, graph = setup
    onnx.checker.check_model(graph, full_check=True)
    assert all(n.domain == "" for n in graph.graph.node) and all(o.domain in ("", "ai.onnx") for o in graph.opset_import)
    assert audit_ops(graph) == []
    for value in (*graph.graph.input, *graph.graph.output):
        dims = tuple(d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim)
        assert dims == contract.spec(value.name).shape, value.name
    layers = contract.config.num_layers
    assert len(attention_matmuls(graph)) == 4 * layers  # QK^T and PV of self- and cross-attention
    # 12 quantized Linears per block (q/k/v/o x 2 attentions + 2 x 2 experts): fp8 weights behind a DQ
    fp8_weights = [i for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT8E4M3FN and len(i.dims) == 2]
    assert len(fp8_weights) == 12 * layers
    # embedders, modulation and heads are not quantized: their weights stay fp32
    fp32 = {i.name for i in graph.graph.initializer if i.data_type == onnx.TensorProto.FLOAT}
    for name in ("patch_embedding.weight", "time_embedding.0.weight", "head.head.weight", "text_embedding.0.weight"):
        assert any(n.endswith(name) for n in fp32) or not any(name in n for n in (i.name for i in graph.graph.initializer)), name
    convs = [n for n in graph.graph.node if n.op_type == "Conv"]
    producers = {o: n.op_type for n in graph.graph.node for o in n.output}
    assert convs and all(producers.get(c.input[1]) != "DequantizeLinear" for c in convs)
    # separate scales per expert: the audio expert's Q nodes carry their own (different) scales
    values = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    values.update({n.output[0]: numpy_helper.to_array(n.attribute[0].t) for n in graph.graph.node if n.op_type == "Constant"})
    qs = [n for n in graph.graph.node if n.op_type == "QuantizeLinear"]
    # node names follow the module scopes, e.g. /model/blocks.0/ffn/0/input_quantizer/QuantizeLinear
    video = {float(values[n.input[1]]) for n in qs if "/ffn/" in n.name}
    audio = {float(values[n.input[1]]) for n in qs if "/audio_ffn/" in n.name}
    assert len(video) == len(audio) == 2 * layers and not video & audio


def test_fp8_checker_passes(setup) -> None:  # type: ignore[no-untyped-def]
    violations = check_fp8(setup[3])
    assert violations == [], "\n".join(map(str, violations))


def test_fp8_ort_matches_fake_quant(setup) -> None:  # type: ignore[no-untyped-def]
    reference, wrapper, contract, graph = setup
    session = _ort(graph)
    for i, dims in enumerate(CHECK_SHAPES):
        inputs = contract.sample_inputs(dims, torch.Generator().manual_seed(20 + i))
        got = session.run(contract.output_names, {k: v.numpy() for k, v in inputs.items()})
        with torch.no_grad():
            fake = wrapper(*inputs.values())
            full = reference(inputs["video"], inputs["audio"], inputs["timestep"], inputs["context"])
        for name, g, f, r in zip(contract.output_names, got, fake, full):
            e_fake, e_full = rel_err(torch.from_numpy(g), f), rel_err(torch.from_numpy(g), r)
            print(f"{dims} {name}: ORT vs fake-quant {e_fake:.2e}, vs fp32 {e_full:.2e}")
            assert e_fake < 1e-5  # same roundings; only fp32 summation order differs
            assert e_full < 0.1  # quantization error itself, sanity bound


def test_quantized_attention_needs_the_fp8_op_set(setup) -> None:  # type: ignore[no-untyped-def]
    """The MHA slots live on the quantized attention modules and only the onnx-fp8 op set applies them:
    running the quantized model with another op set is refused, not silently unquantized."""
    _, wrapper, contract, _ = setup
    inputs = contract.sample_inputs(CHECK_SHAPES[1], torch.Generator().manual_seed(5))
    with torch.no_grad(), pytest.raises(ConfigError, match="onnx-fp8"):
        wrapper.model(inputs["video"], inputs["audio"], inputs["timestep"], inputs["context"])


# ---- broken copies: each rule must fire on its own ---------------------------------------------------


def _nodes(model: onnx.ModelProto) -> tuple[dict[str, onnx.NodeProto], dict[str, list[onnx.NodeProto]]]:
    prod = {o: n for n in model.graph.node for o in n.output}
    cons: dict[str, list[onnx.NodeProto]] = {}
    for n in model.graph.node:
        for i in n.input:
            cons.setdefault(i, []).append(n)
    return prod, cons


def _break(graph: onnx.ModelProto, rule: str) -> onnx.ModelProto:
    m = copy.deepcopy(graph)
    prod, cons = _nodes(m)
    mms = attention_matmuls(m)
    mm_names = {n.name for n in mms}
    target = next(n for n in m.graph.node if n.name in mm_names)
    if rule == "dq_before_attention_matmul":  # feed the MatMul the un-quantized tensor
        dq = prod[target.input[1]]
        q = prod[dq.input[0]]
        target.input[1] = q.input[0]
    elif rule == "softmax_fixed_scale":  # a calibrated-looking scale instead of 1/448
        sm = next(n for n in m.graph.node if n.op_type == "Softmax")
        q = cons[sm.output[0]][0]
        m.graph.initializer.append(numpy_helper.from_array(torch.tensor(1 / 400.0).numpy(), "broken_scale"))
        q.input[1] = "broken_scale"
    elif rule == "no_cast_dq_matmul":  # Cast between a weight DQ and its MatMul
        mm = next(n for n in m.graph.node if n.op_type == "MatMul" and n.name not in mm_names and prod.get(n.input[1]) is not None)
        cast = onnx.helper.make_node("Cast", [mm.input[1]], ["cast_out"], to=onnx.TensorProto.FLOAT, name="broken_cast")
        mm.input[1] = "cast_out"
        m.graph.node.insert(list(m.graph.node).index(mm), cast)
    elif rule == "qdq_after_rope":  # quantize q *before* RoPE: Q reads the pre-RoPE tensor
        qk = [n for n in mms if any(c.op_type == "Softmax" for o in n.output for c in cons.get(o, []))]
        self_qk = qk[0]  # graph order: block 0 self-attention first
        q_node = prod[prod[self_qk.input[0]].input[0]]
        # walk back to the reshape that opens the rotation (the tensor before RoPE)
        t = q_node.input[0]
        for _ in range(20):
            p = prod[t]
            if p.op_type == "Transpose" and "rope" not in p.name:
                break
            t = p.input[0]
        q_node.input[0] = prod[t].output[0]
    return m


@pytest.mark.parametrize("rule", RULES)
def test_fp8_checker_fails_each_broken_copy(setup, rule: str) -> None:  # type: ignore[no-untyped-def]
    broken = _break(setup[3], rule)
    fired = {v.rule for v in check_fp8(broken)}
    assert rule in fired, f"{rule} not detected; got {fired}"
    assert fired == {rule}, f"only {rule} should fire, got {fired}"


# ---- fidelity ---------------------------------------------------------------------------------------


def test_fp8_fidelity_vs_bf16(setup) -> None:  # type: ignore[no-untyped-def]
    """10-step CFG Euler run (the project's sampler, shift 2), on a prompt and noise not used in
    calibration: FP8 fake-quant on top of the BF16 ("official") numerics vs the BF16 model, the pair a
    TensorRT FP8 engine and BF16 engine would form. Also printed: FP8 over fp32 vs fp32, and BF16 vs fp32
    for scale (BF16 rounds the timestep to bf16 before the sinusoid, the largest term)."""
    reference, fp32_fp8, contract, _ = setup
    bf16 = copy.deepcopy(reference).set_numerics("official")
    calib = CalibrationSet.random(contract, [CALIB_SHAPE], num_prompts=3, steps=10)
    bf16_fp8 = calibrate_fp8(copy.deepcopy(reference), calib, numerics="official")
    g = torch.Generator().manual_seed(99)
    dims = {**CALIB_SHAPE, "video_frames": 4, "audio_frames": 12}
    cfg = contract.config
    video = torch.randn(1, 16, dims["video_frames"], dims["video_height"], dims["video_width"], generator=g)
    audio = torch.randn(1, 8, dims["audio_frames"], 16, generator=g)
    cond = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    uncond = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
    ts = SamplerConfig(Solver.EULER, 10, (5.0, 5.0), 2.0)  # 10 Euler steps, shift 2, CFG 5 per modality
    fp32_ref, bf16_ref = create_engine("torch", model=reference), create_engine("torch", model=bf16)
    vs_bf16 = fp8_fidelity(fp8_engine(bf16_fp8.model), bf16_ref, video, audio, cond, uncond, ts)
    vs_fp32 = fp8_fidelity(fp8_engine(fp32_fp8.model), fp32_ref, video, audio, cond, uncond, ts)
    bf16_vs_fp32 = fp8_fidelity(bf16_ref, fp32_ref, video, audio, cond, uncond, ts)
    print(f"\nFP8 vs BF16: {vs_bf16}\nFP8(fp32) vs FP32: {vs_fp32}\nBF16 vs FP32: {bf16_vs_fp32}")
    for fid in (vs_bf16, vs_fp32):
        assert min(fid.velocity_cosine) >= 0.999
        assert min(fid.latent_psnr_db) >= 30.0


def test_softmax_scale_is_exactly_one_over_448(setup) -> None:  # type: ignore[no-untyped-def]
    graph = setup[3]
    _, cons = _nodes(graph)
    inits = {i.name: numpy_helper.to_array(i) for i in graph.graph.initializer}
    for sm in (n for n in graph.graph.node if n.op_type == "Softmax"):
        q = cons[sm.output[0]][0]
        assert q.op_type == "QuantizeLinear"
        assert float(inits[q.input[1]]) == pytest.approx(SOFTMAX_SCALE, rel=1e-7)
