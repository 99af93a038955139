"""The Engine protocol (runtime/engine.py), its torch / onnxruntime implementations, the factory
(runtime/backends/__init__.py) and the per-request DenoiseSession, on CPU.

Independent reference: the eager ``JavisDiT.forward`` (which builds its own RoPE tables, pads and masks
its own context, and takes the audio-only path itself) for every engine and every mode; ``np.prod *
itemsize`` and the contract's profile table for buffer sizes and buckets; the C++ loop
(``javisrt._sampler.sample``) against its Python reference for the host hand-off.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError, EngineMismatchError, ShapeError, UnavailableError
from javisrt.engine.model import JavisDiT, build_model, init_weights
from javisrt.export.contract import DiTContract
from javisrt.export.fp8_rules import has_float8_qdq
from javisrt.runtime import sampling
from javisrt.runtime.backends import ENGINES, create_engine
from javisrt.runtime.backends.onnxruntime_engine import OnnxRuntimeEngine
from javisrt.runtime.backends.torch_engine import TorchEngine
from javisrt.runtime.denoise_session import DenoiseSession, padded_context
from javisrt.runtime.engine import Engine, EngineState, ShapeBucket, buffer_plan, profile_contains, select_profile
from tests._tolerance import assert_within

# Two buckets of the tiny network: CFG batch 2 at (T, H8, W8, Tm4) = (2, 4, 6, 4) and an odd one
# (batch 1, H8 6: 3x3 patches) so the graph's dynamic dims are exercised.
DIMS_A = {"batch": 2, "video_frames": 2, "video_height": 4, "video_width": 6, "audio_frames": 4}
DIMS_B = {"batch": 1, "video_frames": 3, "video_height": 6, "video_width": 6, "audio_frames": 6}


@pytest.fixture(scope="module")
def tiny() -> tuple[DiTContract, JavisDiT]:
    cfg = JavisConfig.from_name("tiny")
    model = init_weights(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    return DiTContract.for_config(cfg), model


@pytest.fixture(scope="module")
def tiny_onnx(tiny: tuple[DiTContract, JavisDiT], tmp_path_factory: pytest.TempPathFactory) -> Path:
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


def _eager(model: JavisDiT, x: dict[str, torch.Tensor], **kw: object) -> tuple[torch.Tensor | None, ...]:
    with torch.no_grad():
        return model(x.get("video"), x.get("audio"), x["timestep"], x["context"], **kw)  # type: ignore[arg-type]


# ---- buffers, buckets, profiles ---------------------------------------------------------------


def test_buffer_plan_sizes(tiny: tuple[DiTContract, JavisDiT]) -> None:
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


def test_per_mode_contracts(tiny: tuple[DiTContract, JavisDiT]) -> None:
    """t2a: audio I/O only, video_frames kept as the TA-RoPE time axis; t2v: video I/O only."""
    cfg = tiny[0].config
    t2a = DiTContract.for_config(cfg, mode="t2a")
    assert t2a.input_names == ["audio", "timestep", "context", "rope_cos", "rope_sin"]
    assert t2a.output_names == ["audio_velocity"]
    assert t2a.free_dims == ("batch", "video_frames", "audio_frames")
    assert t2a.token_grid({"batch": 2, "video_frames": 5, "audio_frames": 4}).video == (5, 0, 0)
    t2v = DiTContract.for_config(cfg, mode="t2v")
    assert t2v.output_names == ["video_velocity"] and "audio_frames" not in t2v.free_dims
    assert DiTContract.from_dict(t2a.to_dict()).mode.value == "t2a"
    with pytest.raises(ConfigError, match="cannot generate t2a"):
        DiTContract.for_config(JavisConfig.from_name("tiny", model_type="t2v"), mode="t2a")


def test_shape_bucket_key_and_validation(tiny: tuple[DiTContract, JavisDiT]) -> None:
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


# ---- the factory and the lifecycle ------------------------------------------------------------


def test_create_engine_vocabulary_and_errors(tiny: tuple[DiTContract, JavisDiT], tiny_onnx: Path) -> None:
    _, model = tiny
    assert ENGINES == ("torch", "onnxruntime", "tensorrt")
    with pytest.raises(ConfigError, match="unknown engine 'ort'"):
        create_engine("ort", engine_file=tiny_onnx)
    with pytest.raises(ConfigError, match="exactly one of model= or checkpoint="):
        create_engine("torch")
    with pytest.raises(ConfigError, match="--engine-file is for"):
        create_engine("torch", model=model, engine_file=tiny_onnx)
    with pytest.raises(ConfigError, match="needs engine_file"):
        create_engine("onnxruntime")
    with pytest.raises(ConfigError, match="carries its weights"):
        create_engine("onnxruntime", model=model, engine_file=tiny_onnx)
    with pytest.raises(ConfigError, match="op sets"):
        create_engine("onnxruntime", engine_file=tiny_onnx, ops="triton")
    with pytest.raises(ConfigError, match="CUDA device"):
        create_engine("tensorrt", engine_file="x.plan", device="cpu")
    with pytest.raises(UnavailableError, match="cannot capture"):
        create_engine("onnxruntime", engine_file=tiny_onnx, cuda_graphs=True)
    eng = create_engine("onnxruntime", engine_file=tiny_onnx)
    assert isinstance(eng, OnnxRuntimeEngine) and eng.state is EngineState.LOADED
    assert eng.contract == DiTContract.for_config(model.cfg)  # read from the graph's metadata
    assert not eng.supports_cuda_graphs
    eng.unload()


def test_lifecycle_is_enforced(tiny: tuple[DiTContract, JavisDiT]) -> None:
    contract, model = tiny
    eng = TorchEngine(model)
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
    generation = eng.buffer_generation
    eng.allocate(DIMS_B)
    assert eng.buffer_generation == generation + 1  # buffers released: old pointers are dead
    eng.unload()
    assert eng.state is EngineState.UNLOADED and eng.bucket is None
    with pytest.raises(ConfigError, match="cuda_graphs"):
        TorchEngine(model, cuda_graphs=True)
    with pytest.raises(ConfigError, match="does not exist"):
        OnnxRuntimeEngine("missing.onnx")


def test_onnxruntime_cuda_provider_is_refused_without_it(tiny_onnx: Path) -> None:
    with pytest.raises(UnavailableError, match="providers"):
        OnnxRuntimeEngine(tiny_onnx, providers=("cuda",)).load()


# ---- every engine against the eager forward ----------------------------------------------------


def test_torch_engine_matches_eager_forward(tiny: tuple[DiTContract, JavisDiT]) -> None:
    """Contract I/O (RoPE tables as inputs) == JavisDiT.forward (RoPE built inside), bit for bit."""
    contract, model = tiny
    x = _inputs(contract, DIMS_B, 2)
    with TorchEngine(model) as eng:
        eng.allocate(DIMS_B)
        out = eng.infer(x)
        ref_v, ref_a = _eager(model, x)
        assert torch.equal(out["video_velocity"], ref_v) and torch.equal(out["audio_velocity"], ref_a)
        # outputs are the engine's persistent buffers, rewritten in place by the next run
        assert out["video_velocity"].data_ptr() == eng.buffer_pointers()["video_velocity"]


@pytest.mark.parametrize("mode", ["t2a", "t2v"])
def test_torch_engine_single_modality_modes_match_eager(tiny: tuple[DiTContract, JavisDiT], mode: str) -> None:
    """The per-mode contract runs the network's audio-only / video-only forward."""
    contract, model = tiny
    x = _inputs(contract, DIMS_A, 6)
    with TorchEngine(model).for_mode(mode) as eng:
        assert eng.contract.mode.value == mode
        dims = {k: DIMS_A[k] for k in eng.contract.free_dims}
        eng.allocate(dims)
        feed = {k: v for k, v in x.items() if k in eng.contract.input_names and not k.startswith("rope")}
        feed["rope_cos"], feed["rope_sin"] = eng.contract.rope_tables(dims)
        out = eng.infer(feed)
        if mode == "t2a":
            ref = _eager(model, {**x, "video": None}, video_latent_frames=DIMS_A["video_frames"])[1]
            assert list(out) == ["audio_velocity"]
            assert ref is not None and torch.equal(out["audio_velocity"], ref)
        else:
            ref = _eager(model, {**x, "audio": None})[0]
            assert list(out) == ["video_velocity"]
            assert ref is not None and torch.equal(out["video_velocity"], ref)


def test_onnxruntime_matches_eager_forward(tiny: tuple[DiTContract, JavisDiT], tiny_onnx: Path) -> None:
    """ORT on the exported graph == eager JavisDiT.forward, switching buckets both ways."""
    contract, model = tiny
    eng = create_engine("onnxruntime", engine_file=tiny_onnx)
    assert not eng.fp8
    for seed, dims in enumerate((DIMS_A, DIMS_B, DIMS_A)):
        x = _inputs(contract, dims, 10 + seed)
        bucket = eng.allocate(dims)
        assert bucket.as_dims() == dims
        out = eng.infer(x)
        ptrs = eng.buffer_pointers()
        assert all(out[n].data_ptr() == ptrs[n] for n in contract.output_names)  # bound in place
        for name, ref in zip(contract.output_names, _eager(model, x), strict=True):
            assert ref is not None and ref.abs().max() > 0.1  # not a trivially zero output
            assert_within(out[name], ref, _fp32_atol(ref, depth=64), f"{name} {dims}")
    eng.unload()


def test_onnxruntime_rejects_a_graph_that_is_not_its_contract(tiny_onnx: Path, tmp_path: Path) -> None:
    import onnx

    proto = onnx.load(str(tiny_onnx))
    other = DiTContract.for_config(JavisConfig.from_name("tiny", model_type="t2v"))
    for prop in proto.metadata_props:
        if prop.key == "javisrt.contract":
            prop.value = other.to_json()
    bad = tmp_path / "relabelled.onnx"
    onnx.save(proto, str(bad))
    with pytest.raises(EngineMismatchError, match="does not match the export contract"):
        create_engine("onnxruntime", engine_file=bad)


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


# ---- the per-request session and the hand-off to the C++ sampling loop --------------------------


def test_session_pads_and_masks_context_like_the_eager_forward(tiny: tuple[DiTContract, JavisDiT], tiny_onnx: Path) -> None:
    """A short masked context: the session zero-pads and zeroes masked tokens; the eager forward
    masks with its own ``context_mask``. Same velocities, on both engines."""
    contract, model = tiny
    x = _inputs(contract, DIMS_B, 5)
    ctx = x["context"][:, :9]
    mask = torch.ones(1, 9)
    mask[0, 6:] = 0
    ref_v, ref_a = _eager(model, {**x, "context": ctx}, context_mask=mask)
    assert ref_v is not None and ref_a is not None
    for eng in (create_engine("torch", model=model), create_engine("onnxruntime", engine_file=tiny_onnx)):
        session = DenoiseSession(eng, ctx, {"video": x["video"].shape[1:], "audio": x["audio"].shape[1:]}, mask=mask)
        assert session.bucket.as_dims() == DIMS_B
        v, a = session([x["video"], x["audio"]], x["timestep"])
        assert_within(v, ref_v, _fp32_atol(ref_v, 64), f"{eng.name} video")
        assert_within(a, ref_a, _fp32_atol(ref_a, 64), f"{eng.name} audio")
        eng.unload()
    with pytest.raises(ShapeError, match="text_len"):
        padded_context(contract, torch.zeros(1, contract.config.text_len + 1, contract.config.text_dim))
    with pytest.raises(ShapeError, match="mask"):
        padded_context(contract, ctx, mask[:, :5])


def test_compiled_engine_refuses_other_modes(tiny_onnx: Path) -> None:
    eng = create_engine("onnxruntime", engine_file=tiny_onnx)
    with pytest.raises(ShapeError, match="generates"):
        DenoiseSession(eng, torch.zeros(2, 4, 32), {"audio": (8, 4, 16)}, video_frames=2)
    eng.unload()


def test_host_loop_hand_off(tiny: tuple[DiTContract, JavisDiT], tiny_onnx: Path) -> None:
    """_sampler.sample drives each engine through DenoiseSession.host_denoiser; both engines end at
    the same latents, and the C++ loop agrees with the Python reference loop."""
    contract, model = tiny
    x = _inputs(contract, DIMS_A, 3)
    half = {k: x[k][:1].numpy().copy() for k in ("video", "audio")}
    cfg = sampling.SamplerConfig.rflow(32, 48, 33, 3, (5.0, 4.0))
    finals = []
    for eng in (create_engine("torch", model=model), create_engine("onnxruntime", engine_file=tiny_onnx)):
        session = DenoiseSession(eng, x["context"], {k: v.shape for k, v in half.items()})
        res = sampling.sample([half["video"], half["audio"]], session.host_denoiser(), cfg)
        assert session.calls == 3 and res.steps_done == 3
        finals.append([np.asarray(a) for a in res.latents])
        ref = sampling.sample_ref([half["video"], half["audio"]], session.host_denoiser(), cfg)
        for a, b in zip(finals[-1], ref.latents, strict=True):
            np.testing.assert_allclose(a, np.asarray(b), rtol=0, atol=1e-5)
        eng.unload()
    for a, b in zip(*finals, strict=True):
        assert a.shape == b.shape
        np.testing.assert_allclose(a, b, rtol=0, atol=_fp32_atol(torch.from_numpy(a), depth=256))


def test_cuda_loop_binding_on_cpu(tiny: tuple[DiTContract, JavisDiT]) -> None:
    """What sample_cuda would receive: the bound buffers' addresses, half-batch numels, and an enqueue
    callback that runs at step 0 on what the loop wrote into the bound buffers by pointer (no
    write_inputs of the latents: the loop declares them written)."""
    contract, model = tiny
    x = _inputs(contract, DIMS_A, 4)
    eng = create_engine("torch", model=model)
    session = DenoiseSession(eng, x["context"], {"video": x["video"].shape[1:], "audio": x["audio"].shape[1:]})
    lb = session.loop_binding()
    ptrs = eng.buffer_pointers()
    assert lb.inputs == (ptrs["video"], ptrs["audio"])
    assert lb.outputs == (ptrs["video_velocity"], ptrs["audio_velocity"])
    assert lb.timesteps == ptrs["timestep"] and lb.batch == 1 and lb.graph_exec == 0 and lb.stream == 0
    assert lb.numels == (16 * 2 * 4 * 6, 8 * 4 * 16)
    # the loop writes the latents into the bound input buffers directly, then calls enqueue(step, stream)
    plan = eng.plan
    for name in ("video", "audio", "timestep"):
        target = eng._buffers[name]  # type: ignore[attr-defined]  # the loop's raw-pointer write, emulated
        assert target.data_ptr() == ptrs[name] and target.numel() == plan[name].numel
        target.copy_(x[name])
    assert lb.enqueue is not None
    lb.enqueue(0, lb.stream)  # step 0: must not ask for write_inputs of what the loop wrote
    ref_v, ref_a = _eager(model, x)
    assert torch.equal(eng.outputs()["video_velocity"], ref_v) and torch.equal(eng.outputs()["audio_velocity"], ref_a)
    with pytest.raises(UnavailableError, match="device buffers"):
        lb.sample_cuda_kwargs()
    with pytest.raises(UnavailableError, match="CUDA-graph"):
        session.loop_binding(use_graph=True)
    eng.allocate(DIMS_B)
    with pytest.raises(ConfigError, match="re-allocated"):
        session.loop_binding()
    odd = DenoiseSession(eng, x["context"][:1], {"video": (16, 3, 6, 6), "audio": (8, 6, 16)})
    with pytest.raises(ShapeError, match="even"):
        odd.loop_binding()
    eng.unload()
