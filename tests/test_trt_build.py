"""The engine builder (export/trt_build.py) on CPU: artefact discovery, precision detection, profile
tables, refit flags, and the whole TensorRT call sequence against a recording stand-in module.

The stand-in checks *our* logic (which calls, in which order, with which values); that the names
exist in TensorRT's Python API is checked statically by mypy against tensorrt-stubs (see the report);
that TensorRT accepts them only a GPU machine with TensorRT can show (``@pytest.mark.tensorrt``).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import onnx.numpy_helper
import pytest
from onnx import TensorProto, helper

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError
from javisrt.export import engine_meta, trt_build, trt_cli
from javisrt.export.contract import DiTContract


def _graph(path: Path, contract: DiTContract, init_type: int = TensorProto.BFLOAT16, fp8: bool = False,
           declared: str | None = None, plugin: bool = False) -> Path:  # fmt: skip
    inits = [helper.make_tensor("w", init_type, [1], [0])]
    nodes = [helper.make_node("Identity", ["x"], ["y"])]
    if fp8:
        inits += [helper.make_tensor("zp", TensorProto.FLOAT8E4M3FN, [], [0]),
                  helper.make_tensor("sc", TensorProto.FLOAT, [], [1.0])]  # fmt: skip
        nodes.append(helper.make_node("QuantizeLinear", ["y", "sc", "zp"], ["q"]))
    if plugin:
        nodes.append(helper.make_node("modality_ffn", ["y"], ["z"], domain="javisrt"))
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1])], inits)  # fmt: skip
    m = helper.make_model(g)
    m.metadata_props.add(key="javisrt.contract", value=contract.to_json())
    if declared:
        m.metadata_props.add(key="javisrt.precision", value=declared)
    m.metadata_props.add(key="javisrt.checkpoint_sha256", value="ab" * 32)
    onnx.save(m, str(path))
    return path


@pytest.fixture
def contract() -> DiTContract:
    return DiTContract.for_config(JavisConfig.from_name("tiny"))


def test_find_and_read_artifact(tmp_path: Path, contract: DiTContract) -> None:
    d = tmp_path / "onnx"
    d.mkdir()
    with pytest.raises(ConfigError, match="expected one"):
        trt_build.find_onnx(d)
    p = _graph(d / "dit.onnx", contract, declared="bf16")
    assert trt_build.find_onnx(d) == p and trt_build.find_onnx(p) == p
    art = trt_build.read_artifact(d)
    assert art.precision == "bf16" and art.flavor == "native" and art.contract == contract
    assert art.checkpoint_sha256 == "ab" * 32 and art.sha256 == engine_meta.sha256_file(p)
    _graph(d / "other.onnx", contract)
    with pytest.raises(ConfigError, match="expected one"):
        trt_build.find_onnx(d)
    with pytest.raises(ConfigError, match="no such file"):
        trt_build.find_onnx(tmp_path / "missing")


def test_precision_comes_from_the_graph(tmp_path: Path, contract: DiTContract) -> None:
    assert trt_build.read_artifact(_graph(tmp_path / "a.onnx", contract, TensorProto.FLOAT)).precision == "fp32"
    assert trt_build.read_artifact(_graph(tmp_path / "b.onnx", contract, fp8=True)).precision == "fp8"
    with pytest.raises(ConfigError, match="metadata says precision fp8"):
        trt_build.read_artifact(_graph(tmp_path / "c.onnx", contract, declared="fp8"))
    bare = onnx.load(str(tmp_path / "a.onnx"))
    del bare.metadata_props[:]
    onnx.save(bare, str(tmp_path / "bare.onnx"))
    with pytest.raises(ConfigError, match="no javisrt.contract"):
        trt_build.read_artifact(tmp_path / "bare.onnx")


def test_profiles_and_flags(contract: DiTContract) -> None:
    names = [p.name for p in contract.profiles]
    sub = trt_build.select_profiles(contract, ["480p"])
    assert [p.name for p in sub.profiles] == ["480p"]
    assert trt_build.select_profiles(contract, []) is contract
    with pytest.raises(ConfigError, match="unknown profiles"):
        trt_build.select_profiles(contract, ["1080p"])
    with pytest.raises(ConfigError, match="twice"):
        trt_build.select_profiles(contract, ["240p", "240p"])
    table = trt_build.profile_table(contract)
    assert len(table) == len(names) and set(table[0]) == set(contract.input_names)
    assert trt_build.builder_flag_names(trt_build.BuildOptions(refit=trt_build.Refit.REFIT)) == ["REFIT"]
    assert trt_build.builder_flag_names(trt_build.BuildOptions(refit="strip")) == ["REFIT_IDENTICAL", "STRIP_PLAN"]
    assert trt_build.builder_flag_names(trt_build.BuildOptions(refit="none")) == []
    with pytest.raises(ConfigError):
        trt_build.BuildOptions(builder_optimization_level=6)


# ---- a recording stand-in for the tensorrt module -----------------------------------------------


class FakeTRT:
    """Just enough of TensorRT's Python API (11.x, or 10.x with ``version="10..."``) for build_engine;
    records every call.

    Enum values follow the release: NetworkDefinitionCreationFlag was renumbered in 11.0 (10.x:
    STRONGLY_TYPED=1, PREFER_JIT=2, PREFER_AOT=3 as in 10.x's NvInfer.h; 11.x: STRONGLY_TYPED=0 (ignored),
    PREFER_JIT=1, PREFER_AOT=2, tensorrt-notes.md §1.1). TacticSource: 10.x binds CUBLAS, CUBLAS_LT,
    CUDNN, EDGE_MASK_CONVOLUTIONS, JIT_CONVOLUTIONS (NVIDIA/TensorRT python/src/infer/pyCore.cpp, 10.x);
    11.x no longer has CUBLAS_LT (review of the 11.1 sources; our search index holds no 11.x NvInfer.h),
    so the 11.x stand-in lists only the two convolution sources.
    """

    Runtime = None  # import_tensorrt's "is this the real package" probe
    Dims = tuple  # trt.Dims(list) -> compared as tuples below

    def __init__(self, version: str = "11.4.0.106") -> None:
        self.__version__ = version
        self.calls: list[tuple[Any, ...]] = []
        rec = self.calls

        class Severity:
            INTERNAL_ERROR, ERROR, WARNING, INFO, VERBOSE = range(5)

        class ILogger:
            pass

        ILogger.Severity = Severity  # type: ignore[attr-defined]

        class IProgressMonitor:
            def __init__(self) -> None:
                pass

        class Enum:
            def __init__(self, prefix: str, names: list[str], first: int | None = None) -> None:
                for i, n in enumerate(names):  # first=None: opaque members; else ints from `first`
                    setattr(self, n, f"{prefix}.{n}" if first is None else first + i)

        ten = version.startswith("10.")
        self.ILogger, self.IProgressMonitor = ILogger, IProgressMonitor
        self.NetworkDefinitionCreationFlag = Enum(
            "Net", ["STRONGLY_TYPED", "PREFER_JIT_PYTHON_PLUGINS", "PREFER_AOT_PYTHON_PLUGINS"], 1 if ten else 0
        )
        conv = ["EDGE_MASK_CONVOLUTIONS", "JIT_CONVOLUTIONS"]
        self.TacticSource = Enum("TacticSource", ["CUBLAS", "CUBLAS_LT", "CUDNN", *conv], 0) if ten else Enum(
            "TacticSource", conv, 3
        )
        self.BuilderFlag = Enum("BuilderFlag", ["REFIT", "REFIT_IDENTICAL", "STRIP_PLAN"])
        self.ProfilingVerbosity = Enum("ProfilingVerbosity", ["DETAILED"])
        self.MemoryPoolType = Enum("MemoryPoolType", ["WORKSPACE"])

        class Profile:
            def set_shape(self, name: str, lo: Any, mid: Any, hi: Any) -> None:
                rec.append(("set_shape", name, lo, mid, hi))

        class Cache:
            def serialize(self) -> bytes:
                return b"CACHE"

        class Config:
            def __init__(self) -> None:
                self.profiles = 0

            def __setattr__(self, k: str, v: Any) -> None:
                if k != "profiles":
                    rec.append(("config." + k, v))
                object.__setattr__(self, k, v)

            def set_flag(self, f: Any) -> None:
                rec.append(("set_flag", f))

            def set_memory_pool_limit(self, pool: Any, size: int) -> None:
                rec.append(("pool", pool, size))

            def set_tactic_sources(self, mask: int) -> bool:
                rec.append(("set_tactic_sources", mask))
                return True

            def add_optimization_profile(self, p: Any) -> int:
                self.profiles += 1
                rec.append(("add_profile", self.profiles - 1))
                return self.profiles - 1

            def create_timing_cache(self, data: bytes) -> Cache:
                rec.append(("create_timing_cache", data))
                return Cache()

            def set_timing_cache(self, cache: Any, ignore_mismatch: bool) -> bool:
                return True

            def get_timing_cache(self) -> Cache:
                return Cache()

        class Builder:
            def __init__(self, logger: Any) -> None:
                rec.append(("Builder",))

            def create_network(self, flags: int) -> str:
                rec.append(("create_network", flags))
                return "network"

            def create_builder_config(self) -> Config:
                return Config()

            def create_optimization_profile(self) -> Profile:
                return Profile()

            def build_serialized_network(self, network: Any, config: Any) -> bytes:
                rec.append(("build", network, config.profiles))
                config.progress_monitor.phase_start("Building", None, 2)
                config.progress_monitor.step_complete("Building", 0)
                return b"PLAN" * 10

        class OnnxParser:
            def __init__(self, network: Any, logger: Any) -> None:
                pass

            def parse_from_file(self, path: str) -> bool:
                rec.append(("parse_from_file", Path(path).name))
                return True

        self.Builder, self.OnnxParser = Builder, OnnxParser


@pytest.fixture
def fake_trt(monkeypatch: pytest.MonkeyPatch, request: pytest.FixtureRequest) -> FakeTRT:
    fake = FakeTRT(getattr(request, "param", "11.4.0.106"))
    monkeypatch.setitem(sys.modules, "tensorrt", fake)  # every `import tensorrt` inside the builder
    monkeypatch.setattr(trt_build, "_gpu_info", lambda device_id=0: ((9, 0), "NVIDIA H100 80GB HBM3", 13040))
    return fake


def test_build_engine_call_sequence(tmp_path: Path, contract: DiTContract, fake_trt: FakeTRT) -> None:
    onnx_path = _graph(tmp_path / "model.onnx", contract, declared="bf16")
    cache = tmp_path / "trt.cache"
    cache.write_bytes(b"OLD")
    progress: list[tuple[str, int, int]] = []
    opts = trt_build.BuildOptions(profiles=("480p", "240p"), builder_optimization_level=5, workspace_mib=64,
                                  timing_cache=cache, refit=trt_build.Refit.REFIT)  # fmt: skip
    meta = trt_build.build_engine(tmp_path, tmp_path / "e.plan", opts, progress=lambda *a: progress.append(a))
    calls = fake_trt.calls
    kinds = [c[0] for c in calls]
    assert kinds.index("create_network") < kinds.index("parse_from_file") < kinds.index("build")
    assert ("create_network", 0) in calls  # strongly typed is implicit in TensorRT 11: no flags
    assert ("config.builder_optimization_level", 5) in calls
    assert ("config.profiling_verbosity", "ProfilingVerbosity.DETAILED") in calls
    assert ("set_flag", "BuilderFlag.REFIT") in calls
    assert ("pool", "MemoryPoolType.WORKSPACE", 64 << 20) in calls
    assert ("create_timing_cache", b"OLD") in calls and cache.read_bytes() == b"CACHE"
    assert not any("FP16" in str(c) or "BF16" in str(c) or "FP8" in str(c) for c in calls)  # no precision flags
    # every input of every selected profile, in the order given
    sub = trt_build.select_profiles(contract, ["480p", "240p"])
    shapes = [c[1:] for c in calls if c[0] == "set_shape"]
    expect = [(n, *mmm) for prof in sub.trt_profiles() for n, mmm in prof.items()]
    assert shapes == expect and ("build", "network", 2) in calls
    assert progress == [("Building", 0, 2), ("Building", 1, 2)]
    # plan + sidecar
    assert (tmp_path / "e.plan").read_bytes() == b"PLAN" * 10
    assert meta.precision == "bf16" and meta.refittable and not meta.weights_stripped
    assert meta.checkpoint_sha256 == "ab" * 32 and meta.compute_capability == (9, 0)
    assert [p["name"] for p in meta.contract["profiles"]] == ["480p", "240p"]
    engine_meta.load_checked(tmp_path / "e.plan", engine_meta.Expected(tensorrt_version="11.4.0.106", precision="bf16"))


def test_build_strip_and_plugin_refusal(tmp_path: Path, contract: DiTContract, fake_trt: FakeTRT) -> None:
    _graph(tmp_path / "model.onnx", contract)
    meta = trt_build.build_engine(tmp_path / "model.onnx", tmp_path / "s.plan", trt_build.BuildOptions(refit="strip"))
    assert ("set_flag", "BuilderFlag.REFIT_IDENTICAL") in fake_trt.calls
    assert ("set_flag", "BuilderFlag.STRIP_PLAN") in fake_trt.calls
    assert meta.weights_stripped and meta.checkpoint_sha256 is None
    p = _graph(tmp_path / "plug.onnx", contract, plugin=True)
    with pytest.raises(NotImplementedError, match="modality_ffn has no AOT"):
        trt_build.build_engine(p, tmp_path / "p.plan")


def test_cli_parses_into_build_options(tmp_path: Path, contract: DiTContract, fake_trt: FakeTRT) -> None:
    ap = argparse.ArgumentParser()
    trt_cli.register(ap.add_subparsers(dest="command"))
    _graph(tmp_path / "model.onnx", contract)
    args = ap.parse_args(["build", "--onnx", str(tmp_path), "--out", str(tmp_path / "c.plan"), "--profiles",
                          "240p", "--opt-level", "4", "--refit", "none"])  # fmt: skip
    opts = trt_cli.options_from_args(args)
    assert opts.profiles == ("240p",) and opts.builder_optimization_level == 4 and opts.refit is trt_build.Refit.NONE
    assert trt_cli.run(args) == 0
    side = json.loads(engine_meta.sidecar_path(tmp_path / "c.plan").read_text())
    assert side["refittable"] is False and side["builder_optimization_level"] == 4


def test_timed_engines_are_not_refittable_by_default(tmp_path: Path, contract: DiTContract, fake_trt: FakeTRT) -> None:
    """kREFIT costs speed: BuildOptions() builds a frozen engine; refit only when asked for."""
    assert trt_build.BuildOptions().refit is trt_build.Refit.NONE
    _graph(tmp_path / "model.onnx", contract)
    meta = trt_build.build_engine(tmp_path, tmp_path / "e.plan")
    assert not any(c[0] == "set_flag" for c in fake_trt.calls)
    assert not meta.refittable and not meta.weights_stripped


@pytest.mark.parametrize(
    ("fake_trt", "flavor", "expect"),
    [("11.4.0.106", "native", 0), ("11.4.0.106", "plugin", 1 << 2),
     ("10.13.0.35", "native", 1 << 1), ("10.13.0.35", "plugin", (1 << 1) | (1 << 3))],
    indirect=["fake_trt"],
)  # fmt: skip
def test_network_is_strongly_typed_on_every_release(fake_trt: FakeTRT, flavor: str, expect: int) -> None:
    """TensorRT 10.x builds a weakly typed network from flags 0 (BF16 layers may run in FP32): there the
    STRONGLY_TYPED bit is set; 11.x is strongly typed only. Bits come from member names (renumbered in 11)."""
    assert trt_build.network_flags(flavor) == expect


@pytest.mark.parametrize("fake_trt", ["9.3.0.1"], indirect=True)
def test_old_tensorrt_is_refused(fake_trt: FakeTRT) -> None:
    with pytest.raises(ConfigError, match="too old"):
        trt_build.network_flags("native")


def test_tactic_sources_are_checked_against_tensorrt(tmp_path: Path, contract: DiTContract, fake_trt: FakeTRT) -> None:
    _graph(tmp_path / "model.onnx", contract)
    with pytest.raises(ConfigError, match=r"no tactic sources \['CUBLAS_LT'\]"):
        trt_build.build_engine(tmp_path, tmp_path / "t.plan", trt_build.BuildOptions(tactic_sources=("CUBLAS_LT",)))
    trt_build.build_engine(tmp_path, tmp_path / "t.plan", trt_build.BuildOptions(tactic_sources=("JIT_CONVOLUTIONS",)))
    assert ("set_tactic_sources", 1 << 4) in fake_trt.calls


def test_artifact_hash_covers_external_weights(tmp_path: Path, contract: DiTContract) -> None:
    """The recorded onnx_sha256 hashes the graph and its external-data file: a stripped plan's refit
    source is only accepted with the very weights it was built from."""
    p = _graph(tmp_path / "model.onnx", contract)
    assert trt_build.read_artifact(p).sha256 == engine_meta.sha256_file(p)  # inline weights: the file hash
    m = onnx.load(str(p))
    m.graph.initializer.append(onnx.numpy_helper.from_array(np.arange(64, dtype=np.float32), "w2"))  # raw data
    big = tmp_path / "big"
    big.mkdir()
    onnx.save_model(m, str(big / "model.onnx"), save_as_external_data=True, location="model.onnx.data",
                    size_threshold=0)  # fmt: skip
    before = trt_build.read_artifact(big).sha256
    data = (big / "model.onnx.data").read_bytes()
    (big / "model.onnx.data").write_bytes(bytes([data[0] ^ 1]) + data[1:])
    after = trt_build.read_artifact(big).sha256
    assert before != after and engine_meta.sha256_file(big / "model.onnx") != before
