"""export/: the contract, the native and plugin ONNX flavours, ONNX Runtime parity with torch (tiny preset)."""

from __future__ import annotations

import copy
import inspect
import subprocess
import sys

import numpy as np
import onnx
import onnxruntime as ort
import pytest
import torch

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ShapeError
from javisrt.engine.model import FP32_MODULES, build_model, init_weights
from javisrt.engine.ops import OP_SETS, OpSet, get_ops
from javisrt.engine.rope import rope_cos_sin
from javisrt.export.contract import DEFAULT_PROFILES, DiTContract
from javisrt.export.fp8_rules import audit_ops
from javisrt.export.module import ExportableDiT
from javisrt.export.onnx import contract_of, export_dit
from javisrt.export.plugin_ops import DOMAIN, PLUGIN_OPS, ort_session
from tests._tolerance import rel_err

# Three shapes for ONE exported graph: odd token counts, a batch of 1, frames 1 -> uneven splits.
SHAPES = [
    {"batch": 2, "video_frames": 3, "video_height": 6, "video_width": 8, "audio_frames": 10},
    {"batch": 1, "video_frames": 2, "video_height": 4, "video_width": 14, "audio_frames": 6},
    {"batch": 3, "video_frames": 1, "video_height": 10, "video_width": 6, "audio_frames": 16},
]
# ORT vs torch, both fp32; the exported time sinusoid runs in fp32 where the model uses float64
# (angle error <= 3e-5 rad at t = 1000), measured ~6e-7 relative.
RTOL = 1e-4


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    cfg = JavisConfig.from_name("tiny")
    return init_weights(build_model(cfg), torch.Generator().manual_seed(0)).eval()


@pytest.fixture(scope="module")
def contract(tiny: torch.nn.Module) -> DiTContract:
    return DiTContract.for_config(tiny.cfg)


@pytest.fixture(scope="module")
def native(tiny: torch.nn.Module, contract: DiTContract) -> onnx.ModelProto:
    return export_dit(copy.deepcopy(tiny), "native", "fp32", contract)


@pytest.fixture(scope="module")
def plugin(tiny: torch.nn.Module, contract: DiTContract) -> onnx.ModelProto:
    return export_dit(copy.deepcopy(tiny), "plugin", "fp32", contract)


def torch_reference(model: torch.nn.Module, inputs: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
    with torch.no_grad():
        return model(inputs["video"], inputs["audio"], inputs["timestep"], inputs["context"])  # type: ignore[no-any-return]


def run_and_compare(session: ort.InferenceSession, model: torch.nn.Module, contract: DiTContract) -> None:
    for i, dims in enumerate(SHAPES):
        inputs = contract.sample_inputs(dims, torch.Generator().manual_seed(10 + i))
        got = session.run(contract.output_names, {k: v.numpy() for k, v in inputs.items()})
        ref = torch_reference(model, inputs)
        for name, g, r in zip(contract.output_names, got, ref):
            assert g.shape == tuple(r.shape) == contract.output_shapes(dims)[name]
            err = rel_err(torch.from_numpy(g), r)
            print(f"{dims} {name}: rel err {err:.2e}")
            assert err < RTOL, f"{name} at {dims}: relative error {err:.2e}"


# ---- contract -------------------------------------------------------------------------------------


def test_contract_shapes_and_profiles(contract: DiTContract) -> None:
    assert contract.input_names == ["video", "audio", "timestep", "context", "rope_cos", "rope_sin"]
    assert contract.output_names == ["video_velocity", "audio_velocity"]
    released = DiTContract.for_config(JavisConfig.from_name("javisdit-v1.0"))
    # model-spec §7-8: 240p 65 f -> [16,17,30,54] + [8,104,16], 6885 + 416 tokens
    from javisrt.export.contract import ShapePoint

    dims = ShapePoint(2, 65, 240, 426).dims()
    shapes = released.input_shapes(dims)
    assert shapes["video"] == (2, 16, 17, 30, 54)
    assert shapes["audio"] == (2, 8, 104, 16)
    assert shapes["rope_cos"] == (6885 + 416, 64)
    assert shapes["context"] == (2, 512, 4096)
    # 480p 81 f (480x854 -> 864): 34020 + 512 tokens
    assert released.input_shapes(ShapePoint(1, 81, 480, 854).dims())["rope_cos"] == (34532, 64)
    profiles = released.trt_profiles()
    assert [p.name for p in DEFAULT_PROFILES] == ["240p", "480p", "all"]
    lo, opt, hi = profiles[2]["video"]
    assert lo == (1, 16, 9, 30, 54) and hi == (2, 16, 21, 60, 108)
    assert profiles[2]["audio"][0] == (1, 8, 56, 16) and profiles[2]["audio"][2] == (2, 8, 128, 16)
    for prof in profiles:
        for name, (a, b, c) in prof.items():
            assert all(x <= y <= z for x, y, z in zip(a, b, c)), name
    assert DiTContract.from_dict(released.to_dict()) == released
    wan = DiTContract.for_config(JavisConfig.from_name("wan2.1-t2v-1.3b"))
    assert "audio" not in wan.input_names and wan.output_names == ["video_velocity"]


def test_contract_rope_tables_are_the_models(contract: DiTContract, tiny: torch.nn.Module) -> None:
    dims = SHAPES[0]
    cos, sin = contract.rope_tables(dims)
    grid = contract.token_grid(contract.resolve(dims))
    ref = tiny.rope(grid, torch.device("cpu"))
    assert torch.equal(cos, ref[0]) and torch.equal(sin, ref[1])
    cfg = tiny.cfg
    assert torch.equal(cos, rope_cos_sin(grid, cfg.audio_pos_mode, cfg.rope_axis_dims, cfg.rope_theta)[0])
    with pytest.raises(ShapeError):
        contract.input_shapes({"batch": 1, "video_frames": 2, "video_height": 5, "video_width": 4, "audio_frames": 4})
    with pytest.raises(ShapeError):
        contract.dims_of({"video": (1, 16, 2, 4, 4), "audio": (2, 8, 4, 16)})


def test_wrapper_matches_model_eagerly(tiny: torch.nn.Module, contract: DiTContract) -> None:
    for flavor in ("native", "plugin", "math"):
        wrapper = ExportableDiT(tiny, flavor)
        inputs = contract.sample_inputs(SHAPES[1], torch.Generator().manual_seed(3))
        with torch.no_grad():
            got = wrapper(*inputs.values())
        for g, r in zip(got, torch_reference(tiny, inputs)):
            assert rel_err(g, r) < 1e-5, flavor


OPSET_METHODS = ("for_layer", "linear", "sinusoid", "patch_embed", "modulate", "rms_norm", "attention", "modality_ffn")


# triton: tests/test_ops_triton.py; triton-fp8 (built from scales, not by name): tests/test_ops_triton_fp8.py
@pytest.mark.parametrize("name", [n for n in OP_SETS if n not in ("triton", "triton-fp8")])
def test_op_sets_follow_the_protocol(name: str) -> None:
    ops = get_ops(name)
    assert ops.name == name
    for method in OPSET_METHODS:
        want = list(inspect.signature(getattr(OpSet, method)).parameters)[1:]
        assert list(inspect.signature(getattr(ops, method)).parameters) == want, (name, method)


def test_engine_does_not_import_export() -> None:
    """Imports run one way (engine <- export): the graph op sets are imported by name on first use."""
    code = (
        "import sys, javisrt.engine.model as m, javisrt.engine.ops as o; o.get_ops('torch'); "
        "print(sorted(k for k in sys.modules if k.startswith(('javisrt.export', 'javisrt.runtime'))))"
    )
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert run.stdout.strip() == "[]", run.stdout


# ---- native flavour -------------------------------------------------------------------------------


def test_native_graph_structure(native: onnx.ModelProto, contract: DiTContract) -> None:
    onnx.checker.check_model(native, full_check=True)
    ops = {n.op_type for n in native.graph.node}
    assert {"Attention", "RotaryEmbedding", "RMSNormalization"} <= ops
    assert all(n.domain in ("", "ai.onnx") for n in native.graph.node)
    assert native.opset_import[0].version == 23 and native.ir_version <= 10
    for value in (*native.graph.input, *native.graph.output):
        dims = [d.dim_param or d.dim_value for d in value.type.tensor_type.shape.dim]
        assert tuple(dims) == contract.spec(value.name).shape, value.name
    assert contract_of(native) == contract
    assert audit_ops(native) == []
    # no float64 anywhere (TensorRT has none): the timestep sinusoid runs in fp32 in every graph op set
    double = onnx.TensorProto.DOUBLE
    assert all(i.data_type != double for i in native.graph.initializer)
    for n in native.graph.node:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs.get("to") != double, n.name
        assert n.op_type != "Constant" or attrs["value"].data_type != double, n.name
    attn = [n for n in native.graph.node if n.op_type == "Attention"]
    assert len(attn) == 2 * contract.config.num_layers
    for n in attn:
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["softmax_precision"] == onnx.TensorProto.FLOAT
    rope = [n for n in native.graph.node if n.op_type == "RotaryEmbedding"]
    assert len(rope) == 2 * contract.config.num_layers  # q and k of the self-attention only


def test_native_ort_matches_torch_at_three_shapes(native: onnx.ModelProto, tiny: torch.nn.Module, contract: DiTContract) -> None:
    session = ort.InferenceSession(native.SerializeToString(), providers=["CPUExecutionProvider"])
    run_and_compare(session, tiny, contract)


def test_bf16_graph_is_valid(tiny: torch.nn.Module, contract: DiTContract) -> None:
    """The TensorRT graph: bf16 weights, fp32 I/O, RMSNorm statistics / softmax / RoPE in fp32."""
    model = export_dit(copy.deepcopy(tiny), "native", "bf16", contract)
    onnx.checker.check_model(model, full_check=True)
    assert audit_ops(model) == []
    types = {i.name: i.data_type for i in model.graph.initializer}
    blocks = [t for n, t in types.items() if n.startswith("model.blocks.")]
    assert blocks and all(t == onnx.TensorProto.BFLOAT16 for t in blocks)
    islands = tuple(f"model.{m}." for m in FP32_MODULES)
    fp32_params = [n for n, t in types.items() if t == onnx.TensorProto.FLOAT and n.startswith("model.")]
    assert fp32_params and all(n.startswith(islands) for n in fp32_params), fp32_params
    for value in (*model.graph.input, *model.graph.output):
        assert value.type.tensor_type.elem_type == onnx.TensorProto.FLOAT
    producers = {o: n for n in model.graph.node for o in n.output}
    for n in model.graph.node:
        if n.op_type in ("RMSNormalization", "RotaryEmbedding"):  # fed through a Cast to fp32
            src = producers.get(n.input[0])
            assert src is not None and src.op_type == "Cast", n.op_type
            assert onnx.helper.get_attribute_value(src.attribute[0]) == onnx.TensorProto.FLOAT


# ---- plugin flavour -------------------------------------------------------------------------------


def test_plugin_graph_structure(plugin: onnx.ModelProto, contract: DiTContract) -> None:
    onnx.checker.check_model(plugin)  # custom domain: no full_check (no schemas for javisrt ops)
    custom = [n for n in plugin.graph.node if n.domain == DOMAIN]
    layers = contract.config.num_layers
    assert sorted(n.op_type for n in custom) == sorted(["rope_attention", "attention", "modality_ffn"] * layers)
    for n in custom:
        spec = PLUGIN_OPS[n.op_type]
        assert len(n.input) == len(spec["inputs"]) and len(n.output) == len(spec["outputs"])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in n.attribute}
        assert attrs["plugin_namespace"] == b"javisrt"
        assert set(attrs) == {"plugin_namespace", *spec["attrs"]}
        if n.op_type == "modality_ffn":
            assert attrs["eps"] == pytest.approx(1e-6)
            assert attrs["tensorrt_plugin_shape_input_indices"] == [6]
    assert not any(n.op_type in ("Attention", "Softmax") for n in plugin.graph.node)
    assert audit_ops(plugin) == []


def test_plugin_ort_matches_torch(plugin: onnx.ModelProto, tiny: torch.nn.Module, contract: DiTContract) -> None:
    run_and_compare(ort_session(plugin), tiny, contract)


def test_plugin_flavour_with_native_ffn(tiny: torch.nn.Module, contract: DiTContract) -> None:
    """ffn_plugin=False: attention plugins only (what TensorRT can build today), same numerics."""
    graph = export_dit(copy.deepcopy(tiny), "plugin", "fp32", contract, ffn_plugin=False)
    custom = sorted(n.op_type for n in graph.graph.node if n.domain == DOMAIN)
    assert custom == sorted(["rope_attention", "attention"] * contract.config.num_layers)
    assert audit_ops(graph) == []
    run_and_compare(ort_session(graph), tiny, contract)


def test_plugin_ffn_weights_are_initializers_at_any_size() -> None:
    """The stacked expert weights of javisrt::modality_ffn are folded into initializers even above the
    exporter's own folding limit (8192 elements; the released FFN is 8960 x 1536), not concatenated per call."""
    cfg = JavisConfig.from_name("tiny", num_layers=1, ffn_dim=1024, audio_ffn_dim=1024)
    model = init_weights(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    graph = export_dit(model, "plugin", "fp32", DiTContract.for_config(cfg))
    inits = {i.name: i for i in graph.graph.initializer}
    (ffn,) = [n for n in graph.graph.node if n.op_type == "modality_ffn"]
    assert all(name in inits for name in ffn.input[2:6])
    assert list(inits[ffn.input[2]].dims) == [2, 1024, 64]
    assert not any(n.op_type == "Concat" and all(i in inits for i in n.input) for n in graph.graph.node)


def test_op_audit_flags_unknown_ops(native: onnx.ModelProto) -> None:
    broken = copy.deepcopy(native)
    broken.graph.node[0].op_type = "NonMaxSuppression"
    node = broken.graph.node[1]
    node.domain = "com.microsoft"
    rules = audit_ops(broken)
    assert len(rules) == 2 and all(v.rule == "op_audit" for v in rules)
    assert np.all([v.node for v in rules])
