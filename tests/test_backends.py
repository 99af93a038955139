"""The Engine interface (runtime/engine.py) and its torch / onnxruntime backends, on CPU.

Independent references: eager ``JavisDiT.forward`` (which builds its own RoPE tables) for the torch
backend; the torch backend for ONNX Runtime running the exported graph; ``np.prod * itemsize`` and the
contract's profile table for buffer sizes and buckets; the C++ loop (``javisrt._sampler.sample``) and
its Python reference for the host hand-off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError, EngineMismatchError, ShapeError, UnavailableError
from javisrt.engine.model import build_model, init_weights
from javisrt.export.contract import DiTContract
from javisrt.runtime.backends.onnxruntime import OnnxRuntimeBackend, has_float8_qdq
from javisrt.runtime.backends.torch_engine import TorchBackend
from javisrt.runtime.engine import (
    Engine,
    EngineState,
    HostDenoiser,
    PipelineEngine,
    ShapeBucket,
    buffer_plan,
    loop_binding,
    profile_contains,
    select_profile,
)
from tests._tolerance import assert_within

# Two buckets of the tiny network: CFG batch 2 at (T, H8, W8, Tm4) = (2, 4, 6, 4) and an odd one
# (batch 1, H8 6: 3x3 patches) so the graph's dynamic dims are exercised.
DIMS_A = {"batch": 2, "video_frames": 2, "video_height": 4, "video_width": 6, "audio_frames": 4}
DIMS_B = {"batch": 1, "video_frames": 3, "video_height": 6, "video_width": 6, "audio_frames": 6}


@pytest.fixture(scope="module")
def tiny() -> tuple[DiTContract, torch.nn.Module]:
    cfg = JavisConfig.from_name("tiny")
    model = init_weights(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    return DiTContract.for_config(cfg), model


@pytest.fixture(scope="module")
def tiny_onnx(tiny: tuple[DiTContract, torch.nn.Module], tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny network exported by javisrt.export.onnx (native flavour, fp32), once per module."""
    from javisrt.export.onnx import export_dit, save

    contract, model = tiny
    path = tmp_path_factory.mktemp("onnx") / "tiny.onnx"
    save(export_dit(model, "native", "fp32", contract), path)
    return path


def _inputs(contract: DiTContract, dims: dict[str, int], seed: int) -> dict[str, torch.Tensor]:
    return contract.sample_inputs(dims, torch.Generator().manual_seed(seed))


def _fp32_atol(ref: torch.Tensor, depth: int) -> float:
    """fp32 reassociation bound: eps32 * |ref|max * (number of sequential reductions ~ depth)."""
    return float(torch.finfo(torch.float32).eps) * float(ref.abs().max()) * depth


# ---- buffers, buckets, profiles ---------------------------------------------------------------


def test_buffer_plan_sizes(tiny: tuple[DiTContract, torch.nn.Module]) -> None:
    contract, _ = tiny
    plan = buffer_plan(contract, DIMS_A)
    assert list(plan) == contract.input_names + contract.output_names
    tokens = 2 * 2 * 3 + 2 * 8  # T * H8/2 * W8/2 video + Tm4/2 * 16/2 audio
    expect = {
        "video": (2, 16, 2, 4, 6), "audio": (2, 8, 4, 16), "timestep": (2,), "context": (2, 16, 32),
        "rope_cos": (tokens, 16), "rope_sin": (tokens, 16), "video_velocity": (2, 16, 2, 4, 6),
        "audio_velocity": (2, 8, 4, 16),
    }  # fmt: skip
    for name, spec in plan.items():
        assert spec.shape == expect[name], name
        assert spec.nbytes == int(np.prod(expect[name])) * 4, name
        assert spec.is_input == (name in contract.input_names)


def test_shape_bucket_key_and_validation(tiny: tuple[DiTContract, torch.nn.Module]) -> None:
    contract, _ = tiny
    a = ShapeBucket.of(contract, DIMS_A)
    assert a == ShapeBucket.of(contract, dict(reversed(list(DIMS_A.items()))))  # order-free key
    assert a.batch == 2 and a.as_dims() == DIMS_A
    with pytest.raises(ShapeError, match="missing dims"):
        ShapeBucket.of(contract, {"batch": 1})
    with pytest.raises(ShapeError, match="multiple of the patch"):
        ShapeBucket.of(contract, dict(DIMS_A, video_height=5))


def test_select_profile_follows_trt_rule() -> None:
    """min <= shape <= max for every input, elementwise, first match; busy profiles are skipped."""
    contract = DiTContract.for_config(JavisConfig.from_name("javisdit-v1.0"))
    names = [p.name for p in contract.profiles]
    p240 = contract.profiles[names.index("240p")].opt.dims()
    p480 = contract.profiles[names.index("480p")].max.dims()
    assert select_profile(contract, p240) == names.index("240p")
    assert select_profile(contract, p480) == names.index("480p")
    # 240p is busy (another context), so the spanning profile serves it
    assert select_profile(contract, p240, exclude=[names.index("240p")]) == names.index("all")
    with pytest.raises(ShapeError, match="already bound"):
        select_profile(contract, p480, exclude=[names.index("480p"), names.index("all")])
    too_big = dict(p480, batch=3)
    assert not any(profile_contains(contract, i, too_big) for i in range(len(names)))
    with pytest.raises(ShapeError, match="fit none"):
        select_profile(contract, too_big)


# ---- lifecycle --------------------------------------------------------------------------------


def test_lifecycle_is_enforced(tiny: tuple[DiTContract, torch.nn.Module]) -> None:
    contract, model = tiny
    eng = TorchBackend(contract, model=model)
    assert isinstance(eng, Engine) and eng.state is EngineState.UNLOADED
    with pytest.raises(ConfigError, match="call load"):
        eng.allocate(DIMS_A)
    eng.load()
    with pytest.raises(ConfigError, match="twice"):
        eng.load()
    with pytest.raises(ConfigError, match="allocate"):
        eng.infer({})
    eng.allocate(DIMS_A)
    x = _inputs(contract, DIMS_A, 1)
    with pytest.raises(ShapeError, match="never written"):
        eng.infer({"video": x["video"]})
    with pytest.raises(ShapeError, match="shape"):
        eng.infer(dict(x, video=x["video"][:1]))
    with pytest.raises(ShapeError, match="dtype"):
        eng.infer(dict(x, timestep=x["timestep"].double()))
    with pytest.raises(ShapeError, match="unknown engine input"):
        eng.infer(dict(x, mask=x["timestep"]))
    eng.infer(x)
    eng.unload()
    assert eng.state is EngineState.UNLOADED and eng.bucket is None
    with pytest.raises(ConfigError, match="cuda_graphs"):
        TorchBackend(contract, model=model, cuda_graphs=True)
    with pytest.raises(UnavailableError):
        OnnxRuntimeBackend(contract, "x.onnx", providers=("cuda",)).load()


def test_torch_backend_matches_eager_forward(tiny: tuple[DiTContract, torch.nn.Module]) -> None:
    """Contract I/O (RoPE tables as inputs) == JavisDiT.forward (RoPE built inside)."""
    contract, model = tiny
    x = _inputs(contract, DIMS_B, 2)
    with TorchBackend(contract, model=model) as eng:
        eng.allocate(DIMS_B)
        out = eng.infer(x)
        with torch.no_grad():
            ref_v, ref_a = model(x["video"], x["audio"], x["timestep"], x["context"])
        assert torch.equal(out["video_velocity"], ref_v) and torch.equal(out["audio_velocity"], ref_a)
        # outputs are the engine's persistent buffers, rewritten in place by the next run
        ptr = eng.buffer_pointers()["video_velocity"]
        assert out["video_velocity"].data_ptr() == ptr


def test_torch_and_onnxruntime_give_the_same_velocities(
    tiny: tuple[DiTContract, torch.nn.Module], tiny_onnx: Path
) -> None:
    contract, model = tiny
    torch_eng = TorchBackend(contract, model=model)
    ort_eng = OnnxRuntimeBackend(contract, tiny_onnx)
    engines: list[Engine] = [torch_eng, ort_eng]
    for e in engines:
        e.load()
    assert not ort_eng.fp8
    for seed, dims in enumerate((DIMS_A, DIMS_B, DIMS_A)):  # switch buckets both ways
        x = _inputs(contract, dims, 10 + seed)
        outs = []
        for e in engines:
            bucket = e.allocate(dims)
            assert bucket.as_dims() == dims
            outs.append({k: v.clone() for k, v in e.infer(x).items()})
            ptrs = e.buffer_pointers()
            assert all(e.outputs()[n].data_ptr() == ptrs[n] for n in contract.output_names)  # bound in place
        for name in contract.output_names:
            ref = outs[0][name]
            assert ref.abs().max() > 0.1  # not a trivially zero output
            assert_within(outs[1][name], ref, _fp32_atol(ref, depth=64), f"{name} {dims}")
    for e in engines:
        e.unload()


def test_onnxruntime_rejects_a_graph_of_another_contract(tiny_onnx: Path) -> None:
    other = DiTContract.for_config(JavisConfig.from_name("tiny", model_type="t2v"))
    with pytest.raises(EngineMismatchError, match="does not match the export contract"):
        OnnxRuntimeBackend(other, tiny_onnx).load()


def test_float8_qdq_detection() -> None:
    import onnx
    from onnx import TensorProto, helper

    def graph(zp_type: int) -> onnx.ModelProto:
        zp = helper.make_tensor("zp", zp_type, [], [0])
        sc = helper.make_tensor("sc", TensorProto.FLOAT, [], [1.0])
        q = helper.make_node("QuantizeLinear", ["x", "sc", "zp"], ["y"])
        g = helper.make_graph([q], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2])],
                              [helper.make_tensor_value_info("y", zp_type, [2])], [zp, sc])  # fmt: skip
        return helper.make_model(g)

    assert has_float8_qdq(graph(TensorProto.FLOAT8E4M3FN))
    assert not has_float8_qdq(graph(TensorProto.INT8))


# ---- the hand-off to the C++ sampling loop ------------------------------------------------------


def _static(x: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: x[k] for k in ("context", "rope_cos", "rope_sin")}


def test_host_loop_hand_off(tiny: tuple[DiTContract, torch.nn.Module], tiny_onnx: Path) -> None:
    """_sampler.sample drives each engine through HostDenoiser; both backends end at the same latents,
    and the C++ loop agrees with the Python reference loop."""
    sampling = pytest.importorskip("javisrt.runtime.sampling", reason="runtime/sampling.py not present")
    contract, model = tiny
    x = _inputs(contract, DIMS_A, 3)
    half = {k: x[k][:1].numpy().copy() for k in ("video", "audio")}
    cfg = sampling.SamplerConfig.rflow(32, 48, 33, 3, (5.0, 4.0))
    finals = []
    for eng in (TorchBackend(contract, model=model), OnnxRuntimeBackend(contract, tiny_onnx)):
        with eng:
            eng.allocate(DIMS_A)  # CFG batch 2 = [cond; uncond]
            den = HostDenoiser(eng, _static(x))
            res = sampling.sample([half["video"], half["audio"]], den, cfg)
            assert den.calls == 3 and res.steps_done == 3
            finals.append([np.asarray(a) for a in res.latents])
            ref = sampling.sample_ref([half["video"], half["audio"]], HostDenoiser(eng, _static(x)), cfg)
            for a, b in zip(finals[-1], ref.latents, strict=True):
                np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-5)
    for a, b in zip(*finals, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=_fp32_atol(torch.from_numpy(a), depth=256))


def test_cuda_loop_binding_on_cpu(tiny: tuple[DiTContract, torch.nn.Module]) -> None:
    """What sample_cuda would receive: the bound buffers' addresses, half-batch numels, the enqueue
    callback running on whatever the loop wrote into the bound buffers."""
    contract, model = tiny
    x = _inputs(contract, DIMS_A, 4)
    with TorchBackend(contract, model=model) as eng:
        with pytest.raises(ConfigError, match="allocated"):
            loop_binding(eng)
        eng.allocate(DIMS_A)
        eng.write_inputs(x)
        lb = loop_binding(eng)
        ptrs = eng.buffer_pointers()
        assert lb.inputs == (ptrs["video"], ptrs["audio"])
        assert lb.outputs == (ptrs["video_velocity"], ptrs["audio_velocity"])
        assert lb.timesteps == ptrs["timestep"] and lb.batch == 1 and lb.graph_exec == 0 and lb.stream == 0
        assert lb.numels == (16 * 2 * 4 * 6, 8 * 4 * 16)
        # the loop writes x into the bound input buffers directly, then calls enqueue(step, stream)
        plan = eng.plan
        for name in ("video", "audio"):
            assert plan[name].numel == 2 * lb.numels[("video", "audio").index(name)]
        assert lb.enqueue is not None
        lb.enqueue(0, lb.stream)
        expect = {k: v.clone() for k, v in eng.infer(x).items()}
        lb.enqueue(1, lb.stream)
        for k, v in eng.outputs().items():
            assert torch.equal(v, expect[k])
        with pytest.raises(UnavailableError, match="device buffers"):
            lb.sample_cuda_kwargs()
        with pytest.raises(UnavailableError, match="CUDA-graph"):
            loop_binding(eng, use_graph=True)
        eng.allocate(DIMS_B)
        with pytest.raises(ShapeError, match="even"):
            loop_binding(eng)


def test_pipeline_adapter(tiny: tuple[DiTContract, torch.nn.Module], tiny_onnx: Path) -> None:
    """PipelineEngine speaks runtime/backends' protocol (no RoPE inputs, short context) over ORT."""
    contract, model = tiny
    x = _inputs(contract, DIMS_B, 5)
    feed = {"video": x["video"], "audio": x["audio"], "timestep": x["timestep"], "context": x["context"][:, :9]}
    eng = PipelineEngine(OnnxRuntimeBackend(contract, tiny_onnx))
    eng.load()
    eng.allocate({k: tuple(v.shape) for k, v in feed.items()})
    out = eng.infer(feed)
    ctx = torch.nn.functional.pad(x["context"][:, :9], (0, 0, 0, 7))
    with torch.no_grad():
        ref_v, ref_a = model(x["video"], x["audio"], x["timestep"], ctx)
    assert_within(out["video_velocity"], ref_v, _fp32_atol(ref_v, 64), "video")
    assert_within(out["audio_velocity"], ref_a, _fp32_atol(ref_a, 64), "audio")
    with pytest.raises(NotImplementedError, match="t2a"):
        eng.infer(feed, video_latent_frames=3)
    with pytest.raises(NotImplementedError, match="torch backend"):
        eng.infer({k: v for k, v in feed.items() if k != "audio"})
    eng.unload()
