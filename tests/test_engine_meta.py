"""Engine metadata (export/engine_meta.py) and the TensorRT backend's checks before deserializing.

No TensorRT here: the plan is a stand-in byte string; what is tested is that every mismatched or
corrupt engine file gives one clear EngineMismatchError before TensorRT would ever see it.
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import EngineMismatchError, UnavailableError
from javisrt.export import engine_meta as em
from javisrt.export.contract import DEFAULT_PROFILES, DiTContract

PLAN = b"\x00TRT-PLAN-STAND-IN" * 64


def _meta(contract: DiTContract, **kw: object) -> em.EngineMetadata:
    base = dict(
        tensorrt_version="11.4.0.106", compute_capability=(9, 0), gpu_name="NVIDIA H100 80GB HBM3",
        cuda_runtime_version=13040, precision="bf16", contract=contract.to_dict(), checkpoint_sha256="ab" * 32,
        onnx_sha256="cd" * 32, plan_sha256="", plan_bytes=0, refittable=True, weights_stripped=False,
        builder_optimization_level=3, profiling_verbosity="detailed",
        plugins=(em.PluginRecord("rope_attention", "javisrt", "sm_90a", "8.7", "ef" * 32),),
    )  # fmt: skip
    base.update(kw)
    return em.EngineMetadata(**base)  # type: ignore[arg-type]


@pytest.fixture
def contract() -> DiTContract:
    return DiTContract.for_config(JavisConfig.from_name("tiny"))


@pytest.fixture
def plan_file(tmp_path: Path, contract: DiTContract) -> Path:
    return em.write_engine(PLAN, _meta(contract), tmp_path / "engine.plan")


def _expected(built: DiTContract, **kw: object) -> em.Expected:
    base = dict(tensorrt_version="11.4.0.106", compute_capability=(9, 0), precision="bf16",
                contract=built.to_dict(), checkpoint_sha256="ab" * 32)  # fmt: skip
    base.update(kw)
    return em.Expected(**base)  # type: ignore[arg-type]


def test_round_trip_and_plan_is_untouched(plan_file: Path, contract: DiTContract) -> None:
    assert plan_file.read_bytes() == PLAN  # a plain plan: trtexec / C++ load it unchanged
    assert em.sidecar_path(plan_file).name == "engine.plan.json"
    plan, meta = em.load_checked(plan_file, _expected(contract))
    assert plan == PLAN and meta.plan_bytes == len(PLAN) and meta.plan_sha256 == em.sha256_bytes(PLAN)
    assert meta == em.EngineMetadata.from_dict(json.loads(meta.to_json()))
    assert meta.sm == "sm_90" and meta.plugins[0].target == "sm_90a"


@pytest.mark.parametrize(
    ("field", "value", "message"),
    [
        ("tensorrt_version", "11.3.0.1", "TensorRT version: built with 11.4.0.106"),
        ("compute_capability", (8, 9), "GPU: built for sm_90"),
        ("precision", "fp8", "precision: engine is bf16, requested fp8"),
        ("checkpoint_sha256", "12" * 32, "weights: engine holds checkpoint abababab"),
    ],
)
def test_each_mismatch_is_named(plan_file: Path, contract: DiTContract, field: str, value: object, message: str) -> None:
    with pytest.raises(EngineMismatchError, match=message.replace("(", r"\(")):
        em.load_checked(plan_file, _expected(contract, **{field: value}))


def test_all_mismatches_in_one_error(plan_file: Path, contract: DiTContract) -> None:
    other = DiTContract.for_config(JavisConfig.from_name("tiny", num_layers=3), DEFAULT_PROFILES[:1])
    with pytest.raises(EngineMismatchError) as err:
        em.load_checked(plan_file, _expected(contract, tensorrt_version="11.5.0.1", contract=other.to_dict()))
    text = str(err.value)
    assert "TensorRT version" in text and "contract config" in text and "optimisation profiles" in text


def test_unchecked_fields_pass(plan_file: Path, contract: DiTContract) -> None:
    em.load_checked(plan_file, em.Expected())  # nothing requested, nothing to disagree with


@pytest.mark.parametrize("damage", ["flip", "truncate", "append"])
def test_corrupt_plan(plan_file: Path, contract: DiTContract, damage: str) -> None:
    data = bytearray(plan_file.read_bytes())
    if damage == "flip":
        data[100] ^= 0xFF
    elif damage == "truncate":
        del data[-10:]
    else:
        data += b"x"
    plan_file.write_bytes(bytes(data))
    with pytest.raises(EngineMismatchError, match="corrupt|truncated"):
        em.load_checked(plan_file, _expected(contract))


def test_missing_or_corrupt_sidecar(plan_file: Path, contract: DiTContract, tmp_path: Path) -> None:
    side = em.sidecar_path(plan_file)
    side.write_text("{not json")
    with pytest.raises(EngineMismatchError, match="corrupt metadata"):
        em.read_metadata(plan_file)
    side.write_text(json.dumps({"format": "something-else"}))
    with pytest.raises(EngineMismatchError, match="not a javisrt engine sidecar"):
        em.read_metadata(plan_file)
    good = _meta(contract).to_dict()
    side.write_text(json.dumps(dict(good, format_version="0")))
    with pytest.raises(EngineMismatchError, match="format version"):
        em.read_metadata(plan_file)
    side.write_text(json.dumps(dict(good, surprise=1)))
    with pytest.raises(EngineMismatchError, match="unknown fields"):
        em.read_metadata(plan_file)
    side.write_text(json.dumps({k: v for k, v in good.items() if k != "precision"}))
    with pytest.raises(EngineMismatchError, match="malformed"):
        em.read_metadata(plan_file)
    side.write_text(json.dumps(dict(good, precision="int4")))
    with pytest.raises(EngineMismatchError, match="unknown precision"):
        em.read_metadata(plan_file)
    side.unlink()
    with pytest.raises(EngineMismatchError, match="no metadata sidecar"):
        em.read_metadata(plan_file)
    with pytest.raises(EngineMismatchError, match="does not exist"):
        em.read_metadata(tmp_path / "nope.plan")


def test_stripped_engine_skips_the_checkpoint_check(tmp_path: Path, contract: DiTContract) -> None:
    meta = _meta(contract, weights_stripped=True, checkpoint_sha256=None)
    path = em.write_engine(PLAN, meta, tmp_path / "stripped.plan")
    em.load_checked(path, _expected(contract, checkpoint_sha256="99" * 32))  # weights come from the refit
    meta2 = _meta(contract, checkpoint_sha256=None)
    path2 = em.write_engine(PLAN, meta2, tmp_path / "nohash.plan")
    with pytest.raises(EngineMismatchError, match="records no checkpoint hash"):
        em.load_checked(path2, _expected(contract))


def test_tensorrt_engine_checks_before_tensorrt(plan_file: Path, contract: DiTContract) -> None:
    """The engine takes its contract from the plan's sidecar; without TensorRT it stops at the import,
    with a reason; with it (GPU machines) the metadata check runs before deserialization."""
    from javisrt.export.tensorrt_api import import_tensorrt
    from javisrt.runtime.backends.tensorrt_engine import TensorRTEngine

    engine = TensorRTEngine(plan_file)
    assert engine.contract == contract
    try:
        import_tensorrt()
    except UnavailableError as exc:
        assert "TensorRT" in str(exc)
        with pytest.raises(UnavailableError):
            engine.load()
    else:  # pragma: no cover - GPU machines
        pytest.skip("TensorRT present: covered by the tensorrt-marked tests")


def test_dataclass_fields_are_all_serialised(contract: DiTContract) -> None:
    meta = _meta(contract)
    assert set(meta.to_dict()) == {f.name for f in dataclasses.fields(meta)}


def test_refit_source_must_be_the_build_onnx(tmp_path: Path, contract: DiTContract) -> None:
    """check_refit_source: a stripped plan only with the ONNX (graph + external data) it was built from;
    a kREFIT plan takes any weights of its graph."""
    from onnx import TensorProto, helper, save

    def graph(path: Path, value: float) -> Path:
        w = helper.make_tensor("w", TensorProto.FLOAT, [1], [value])
        g = helper.make_graph([], "g", [], [helper.make_tensor_value_info("w", TensorProto.FLOAT, [1])], [w])
        save(helper.make_model(g), str(path))
        return path

    a, b = graph(tmp_path / "a.onnx", 1.0), graph(tmp_path / "b.onnx", 2.0)
    assert em.onnx_sha256(a) == em.sha256_file(a)  # inline weights: the file's hash
    stripped = _meta(contract, weights_stripped=True, checkpoint_sha256=None, onnx_sha256=em.onnx_sha256(a))
    em.check_refit_source(stripped, a)
    with pytest.raises(EngineMismatchError, match="kREFIT_IDENTICAL"):
        em.check_refit_source(stripped, b)
    em.check_refit_source(_meta(contract, onnx_sha256=em.onnx_sha256(a)), b)  # kREFIT: new weights are the point
