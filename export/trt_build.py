"""The one place that builds TensorRT engines: ONNX -> strongly typed network -> plan + metadata sidecar.

TensorRT 11 facts this follows (tensorrt-notes.md §2, §5, §7):
* every network is strongly typed and the precision builder flags are gone: a BF16 engine comes from
  a BF16 ONNX (``javisrt.export.onnx`` precision ``bf16``), an FP8 engine from explicit float8
  Q/DQ nodes (``javisrt.export.quantize``); nothing here picks a precision. On TensorRT 10.x a network
  created without flags is weakly typed (a BF16 graph would silently build in FP32), so there
  :func:`network_flags` sets ``STRONGLY_TYPED``; older TensorRT is refused;
* one optimisation profile per entry of the export contract's ``profiles`` (``--profiles`` picks a
  subset by name); the plan records them and the runtime selects per shape bucket;
* timing cache loaded from / saved to a file; ``builder_optimization_level``; detailed profiling
  verbosity so the engine inspector can dump layers and fusions (bench/gpu_check.py reads them);
* refit: none by default (refittable engines may lose fusions and speed, so timed engines are built
  without ``kREFIT``); ``kREFIT`` on request (LoRA-merged weights swap in without a rebuild,
  :func:`refit_plan`), or ``kREFIT_IDENTICAL`` + ``kSTRIP_PLAN`` (weight-less plan, refitted at load
  from the very ONNX it was built from: the recorded ``onnx_sha256`` is checked, see
  :func:`javisrt.export.engine_meta.check_refit_source`);
* plugin flavour: :mod:`javisrt.export.trt_plugins` is imported (its AOT QDPs must be registered
  before parsing) and the network prefers AOT plugins, so the plan runs without Python.

``tensorrt`` is imported inside functions only; the option handling, artefact discovery and profile
tables are pure and tested on CPU (tests/test_trt_build.py, with a recording stand-in for the
TensorRT module that only accepts attributes present in the TensorRT stubs).
"""

from __future__ import annotations

import dataclasses
import enum
import json
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import TYPE_CHECKING, Any

import onnx

from javisrt.engine.errors import ConfigError, EngineMismatchError, JavisError
from javisrt.export import engine_meta
from javisrt.export.contract import META_CHECKPOINT, META_CONTRACT, META_FLAVOR, META_PRECISION, DiTContract

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type every TensorRT call below for mypy
    import tensorrt as trt

log = logging.getLogger(__name__)

Progress = Callable[[str, int, int], None]  # (phase, step, steps)


class BuildError(JavisError, RuntimeError):
    """TensorRT could not parse the ONNX or build the engine (the parser/builder errors are listed)."""


class Refit(enum.StrEnum):
    NONE = "none"  # fastest engine, weights frozen
    REFIT = "refit"  # kREFIT: every weight refittable (LoRA swaps, refit_plan)
    STRIP = "strip"  # kREFIT_IDENTICAL + kSTRIP_PLAN: weight-less plan, refitted from the ONNX at load


@dataclass(frozen=True)
class BuildOptions:
    """Build knobs (grouped like trtexec's BuildOptions); no precision here: it is in the ONNX."""

    profiles: tuple[str, ...] = ()  # names from the contract; () = all
    builder_optimization_level: int = 3  # 0..5 (TensorRT default 3)
    workspace_mib: int = 0  # 0 = TensorRT's default (device memory)
    timing_cache: Path | None = None
    refit: Refit = Refit.NONE  # kREFIT costs speed: only when weights must be swappable
    detailed_profiling: bool = True  # ProfilingVerbosity.DETAILED: layer dumps / fusion checks
    checkpoint_sha256: str | None = None  # overrides the ONNX metadata's
    # trt.TacticSource member names, e.g. ("EDGE_MASK_CONVOLUTIONS",); () = TensorRT's default. Checked
    # against the installed TensorRT's enum at build time (CUBLAS_LT, deprecated since 9.0, is gone in 11).
    tactic_sources: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if not 0 <= self.builder_optimization_level <= 5:
            raise ConfigError(f"builder_optimization_level must be 0..5, got {self.builder_optimization_level}")
        if self.workspace_mib < 0:
            raise ConfigError(f"workspace_mib must be >= 0, got {self.workspace_mib}")
        object.__setattr__(self, "refit", Refit(self.refit))


# ---- the ONNX artefact ------------------------------------------------------------------------



@dataclass(frozen=True)
class OnnxArtifact:
    """An exported graph and what the build needs to know about it."""

    path: Path
    contract: DiTContract
    flavor: str  # "native" | "plugin" | "math"
    precision: str  # "fp32" | "bf16" | "fp8"
    checkpoint_sha256: str | None
    sha256: str
    plugin_ops: tuple[str, ...]  # op_types of javisrt-domain nodes


def find_onnx(path: str | os.PathLike[str]) -> Path:
    """``path`` itself if it is a file, else the single ``*.onnx`` in the directory (``model.onnx`` wins)."""
    p = Path(path)
    if p.is_file():
        return p
    if not p.is_dir():
        raise ConfigError(f"--onnx {p}: no such file or directory")
    found = sorted(p.glob("*.onnx"))
    if (p / "model.onnx").is_file():
        return p / "model.onnx"
    if len(found) != 1:
        raise ConfigError(f"--onnx {p}: expected one *.onnx (or model.onnx), found {[f.name for f in found]}")
    return found[0]


def detect_precision(model: onnx.ModelProto) -> str:
    """fp8 if float8 Q/DQ are present, else bf16 if any initializer is bf16, else fp32."""
    from javisrt.export.fp8_rules import has_float8_qdq

    if has_float8_qdq(model):
        return "fp8"
    if any(t.data_type == onnx.TensorProto.BFLOAT16 for t in model.graph.initializer):
        return "bf16"
    return "fp32"


def read_artifact(path: str | os.PathLike[str]) -> OnnxArtifact:
    """Read the contract, flavour and precision of an exported graph (weights not loaded)."""
    from javisrt.export.plugin_ops import DOMAIN

    onnx_path = find_onnx(path)
    model = onnx.load(str(onnx_path), load_external_data=False)
    props = {p.key: p.value for p in model.metadata_props}
    if META_CONTRACT not in props:
        raise ConfigError(f"{onnx_path} carries no {META_CONTRACT} metadata: export it with javisrt.export")
    contract = DiTContract.from_dict(json.loads(props[META_CONTRACT]))
    detected = detect_precision(model)
    declared = props.get(META_PRECISION, detected)
    if declared != detected:
        raise ConfigError(f"{onnx_path}: metadata says precision {declared}, the graph's types say {detected}")
    plugin_ops = tuple(sorted({n.op_type for n in model.graph.node if n.domain == DOMAIN}))
    flavor = props.get(META_FLAVOR, "plugin" if plugin_ops else "native")
    return OnnxArtifact(
        path=onnx_path, contract=contract, flavor=flavor, precision=detected,
        checkpoint_sha256=props.get(META_CHECKPOINT), sha256=engine_meta.onnx_sha256(onnx_path),
        plugin_ops=plugin_ops,
    )  # fmt: skip


def select_profiles(contract: DiTContract, names: Sequence[str]) -> DiTContract:
    """The contract restricted to the named profiles (in the given order); () keeps all."""
    if not names:
        return contract
    known = {p.name: p for p in contract.profiles}
    unknown = [n for n in names if n not in known]
    if unknown:
        raise ConfigError(f"unknown profiles {unknown}; the contract has {list(known)}")
    if len(set(names)) != len(names):
        raise ConfigError(f"profiles listed twice: {list(names)}")
    return dataclasses.replace(contract, profiles=tuple(known[n] for n in names))


def profile_table(contract: DiTContract) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
    """Per profile: input -> (min, opt, max), validated (min <= opt <= max elementwise)."""
    table = contract.trt_profiles()
    for prof, p in zip(table, contract.profiles, strict=True):
        for name, (lo, mid, hi) in prof.items():
            if not all(a <= b <= c for a, b, c in zip(lo, mid, hi, strict=True)):
                raise ConfigError(f"profile {p.name}: {name} min/opt/max {lo}/{mid}/{hi} are not ordered")
    return table


def builder_flag_names(options: BuildOptions) -> list[str]:
    """``trt.BuilderFlag`` member names to set (never raw ints: the enum was renumbered in 11.0)."""
    if options.refit is Refit.REFIT:
        return ["REFIT"]
    if options.refit is Refit.STRIP:
        return ["REFIT_IDENTICAL", "STRIP_PLAN"]
    return []


def tensorrt_major(version: str) -> int:
    try:
        return int(version.split(".")[0])
    except ValueError as exc:
        raise ConfigError(f"cannot read TensorRT's major version from {version!r}") from exc


def network_flags(flavor: str) -> int:
    """Network creation flags: strongly typed (implicit in TensorRT 11, the ``STRONGLY_TYPED`` flag on
    10.x, where flags 0 give a weakly typed network that may build BF16 layers in FP32), plus
    prefer-AOT for the plugin flavour. Member names, never raw ints: the enum was renumbered in 11.0
    (10.x: STRONGLY_TYPED=1, PREFER_JIT=2, PREFER_AOT=3; 11.x: STRONGLY_TYPED=0 (ignored), PREFER_JIT=1,
    PREFER_AOT=2; tensorrt-notes.md §1.1)."""
    import tensorrt as trt

    major = tensorrt_major(trt.__version__)
    if major < 10:
        raise ConfigError(
            f"TensorRT {trt.__version__} is too old: javisrt builds strongly typed networks (TensorRT >= 10 with "
            "STRONGLY_TYPED, implicit in 11) and AOT plugins"
        )
    flag = trt.NetworkDefinitionCreationFlag
    flags = 1 << int(flag.STRONGLY_TYPED) if major == 10 else 0
    if flavor == "plugin":
        flags |= 1 << int(flag.PREFER_AOT_PYTHON_PLUGINS)
    return flags


# ---- the build --------------------------------------------------------------------------------


def _progress_monitor(progress: Progress | None) -> trt.IProgressMonitor:
    import tensorrt as trt

    class _Monitor(trt.IProgressMonitor):
        def __init__(self) -> None:
            trt.IProgressMonitor.__init__(self)
            self.steps: dict[str, int] = {}

        def phase_start(self, phase_name: str, parent_phase: str | None, num_steps: int) -> None:
            self.steps[phase_name] = num_steps
            log.info("build: %s%s (%d steps)", f"{parent_phase} / " if parent_phase else "", phase_name, num_steps)
            if progress is not None:
                progress(phase_name, 0, num_steps)

        def step_complete(self, phase_name: str, step: int) -> bool:
            if progress is not None:
                progress(phase_name, step + 1, self.steps.get(phase_name, 0))
            return True  # False would cancel the build

        def phase_finish(self, phase_name: str) -> None:
            log.debug("build: %s done", phase_name)

    return _Monitor()


def parse_onnx(
    builder: trt.Builder, logger: trt.ILogger, artifact: OnnxArtifact
) -> tuple[trt.INetworkDefinition, trt.OnnxParser]:
    """Network + parser for ``artifact`` (plugins registered first for the plugin flavour)."""
    import tensorrt as trt

    if artifact.plugin_ops:
        from javisrt.export import trt_plugins

        missing = [op for op in artifact.plugin_ops if op not in trt_plugins.PLUGINS]
        if missing:
            reasons = [trt_plugins.NOT_AOT.get(op, f"javisrt::{op}: no TensorRT plugin") for op in missing]
            raise NotImplementedError(f"{artifact.path.name}: " + " ".join(reasons))
        trt_plugins.register_all()
    network = builder.create_network(network_flags(artifact.flavor))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(artifact.path)):  # resolves external data next to the file
        errors = [str(parser.get_error(i)) for i in range(parser.num_errors)]
        raise BuildError(f"TensorRT's ONNX parser rejected {artifact.path}:\n  " + "\n  ".join(errors))
    return network, parser


def configure(
    builder: trt.Builder, contract: DiTContract, options: BuildOptions, progress: Progress | None
) -> trt.IBuilderConfig:
    """The IBuilderConfig: profiles, optimisation level, verbosity, refit flags, workspace, timing cache."""
    import tensorrt as trt

    config = builder.create_builder_config()
    config.builder_optimization_level = options.builder_optimization_level
    if options.detailed_profiling:
        config.profiling_verbosity = trt.ProfilingVerbosity.DETAILED
    for name in builder_flag_names(options):
        config.set_flag(getattr(trt.BuilderFlag, name))
    if options.workspace_mib:
        config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, options.workspace_mib << 20)
    if options.tactic_sources:
        known = [n for n in dir(trt.TacticSource) if n.isupper()]
        unknown = [src for src in options.tactic_sources if src not in known]
        if unknown:
            raise ConfigError(f"TensorRT {trt.__version__} has no tactic sources {unknown}; it has {known}")
        mask = 0
        for src in options.tactic_sources:
            mask |= 1 << int(getattr(trt.TacticSource, src))
        config.set_tactic_sources(mask)
    for prof in profile_table(contract):
        p = builder.create_optimization_profile()
        for name, (lo, mid, hi) in prof.items():
            p.set_shape(name, trt.Dims(list(lo)), trt.Dims(list(mid)), trt.Dims(list(hi)))
        if config.add_optimization_profile(p) < 0:
            raise BuildError(f"TensorRT rejected optimisation profile {prof}")
    cache_bytes = b""
    if options.timing_cache is not None and options.timing_cache.is_file():
        cache_bytes = options.timing_cache.read_bytes()
        log.info("timing cache: %s (%d bytes)", options.timing_cache, len(cache_bytes))
    cache = config.create_timing_cache(cache_bytes)
    if not config.set_timing_cache(cache, False):
        raise BuildError(f"timing cache {options.timing_cache} does not fit this TensorRT/GPU (delete it)")
    config.progress_monitor = _progress_monitor(progress)
    return config


def _gpu_info(device_id: int = 0) -> tuple[tuple[int, int], str, int]:
    from javisrt.export.tensorrt_api import cuda_call, cudart, device_compute_capability

    rt = cudart()
    props = cuda_call(rt.cudaGetDeviceProperties(device_id), "cudaGetDeviceProperties")
    name = props.name.decode(errors="replace").rstrip("\0") if isinstance(props.name, bytes) else str(props.name)
    version = int(cuda_call(rt.cudaRuntimeGetVersion(), "cudaRuntimeGetVersion"))
    return device_compute_capability(device_id), name, version


def build_engine(
    onnx_path: str | os.PathLike[str],
    out: str | os.PathLike[str],
    options: BuildOptions = BuildOptions(),
    progress: Progress | None = None,
) -> engine_meta.EngineMetadata:
    """Build ``out`` (+ ``out.json``) from an exported graph; returns the metadata written."""
    from javisrt.export.tensorrt_api import import_tensorrt, make_logger

    import_tensorrt()
    import tensorrt as trt

    artifact = read_artifact(onnx_path)
    contract = select_profiles(artifact.contract, options.profiles)
    log.info("building %s engine from %s (%s flavour), profiles %s", artifact.precision, artifact.path,
             artifact.flavor, [p.name for p in contract.profiles])  # fmt: skip
    t0 = time.perf_counter()
    logger = make_logger()
    builder = trt.Builder(logger)
    network, _parser = parse_onnx(builder, logger, artifact)
    config = configure(builder, contract, options, progress)
    plan = builder.build_serialized_network(network, config)
    if plan is None:
        raise BuildError("TensorRT failed to build the engine (see the TensorRT log above)")
    if options.timing_cache is not None:
        data = config.get_timing_cache().serialize()
        options.timing_cache.parent.mkdir(parents=True, exist_ok=True)
        options.timing_cache.write_bytes(bytes(data))
    cc, gpu, cuda_version = _gpu_info()
    plugins: tuple[engine_meta.PluginRecord, ...] = ()
    if artifact.plugin_ops:
        from javisrt.export import trt_plugins

        plugins = tuple(trt_plugins.plugin_records(artifact.plugin_ops))
    meta = engine_meta.EngineMetadata(
        tensorrt_version=trt.__version__, compute_capability=cc, gpu_name=gpu, cuda_runtime_version=cuda_version,
        precision=artifact.precision, contract=contract.to_dict(),
        checkpoint_sha256=None if options.refit is Refit.STRIP else (options.checkpoint_sha256 or artifact.checkpoint_sha256),
        onnx_sha256=artifact.sha256, plan_sha256="", plan_bytes=0,
        refittable=options.refit is not Refit.NONE, weights_stripped=options.refit is Refit.STRIP,
        builder_optimization_level=options.builder_optimization_level,
        profiling_verbosity="detailed" if options.detailed_profiling else "layer_names_only",
        plugins=plugins, created_utc=datetime.now(UTC).isoformat(timespec="seconds"),
        notes={"build_seconds": round(time.perf_counter() - t0, 1), "flavor": artifact.flavor},
    )  # fmt: skip
    engine_meta.write_engine(memoryview(plan), meta, out)
    log.info("built %s in %.0f s", out, time.perf_counter() - t0)
    return engine_meta.read_metadata(out)


def refit_plan(
    plan_path: str | os.PathLike[str],
    onnx_path: str | os.PathLike[str],
    out: str | os.PathLike[str] | None = None,
    checkpoint_sha256: str | None = None,
) -> engine_meta.EngineMetadata:
    """Swap the weights of a kREFIT plan for those of ``onnx_path`` (e.g. a LoRA-merged export of the
    same graph) without a rebuild; writes ``out`` (default: in place) and its updated sidecar.

    FP8 engines: the new ONNX must carry re-computed weight scales (its Q/DQ constants are refitted
    with the weights); activation scales stay those of the build.
    """
    from javisrt.export.tensorrt_api import import_tensorrt, make_logger, refit_engine_from_onnx

    import_tensorrt()
    import tensorrt as trt

    meta = engine_meta.read_metadata(plan_path)
    if not meta.refittable or meta.weights_stripped:
        raise EngineMismatchError(
            f"{plan_path} is {'weight-stripped' if meta.weights_stripped else 'not refittable'}: "
            "rebuild with --refit refit to swap weights in the plan"
        )
    artifact = read_artifact(onnx_path)
    engine_meta.check(meta, engine_meta.Expected(
        tensorrt_version=trt.__version__, precision=artifact.precision, contract=None,
    ), where=str(plan_path))  # fmt: skip
    if artifact.contract.to_dict()["inputs"] != meta.contract["inputs"]:
        raise EngineMismatchError(f"{onnx_path} is a graph of another contract than {plan_path}")
    plan = engine_meta.read_plan(plan_path, meta)
    logger = make_logger()
    runtime = trt.Runtime(logger)
    engine = runtime.deserialize_cuda_engine(plan)
    if engine is None:
        raise EngineMismatchError(f"TensorRT could not deserialize {plan_path}")
    refit_engine_from_onnx(engine, logger, artifact.path)
    new = dataclasses.replace(
        meta, checkpoint_sha256=checkpoint_sha256 or artifact.checkpoint_sha256, onnx_sha256=artifact.sha256,
        notes={**meta.notes, "refitted_utc": datetime.now(UTC).isoformat(timespec="seconds")},
    )  # fmt: skip
    target = Path(out) if out is not None else Path(plan_path)
    engine_meta.write_engine(memoryview(engine.serialize()), new, target)
    return engine_meta.read_metadata(target)


def layer_info(plan_path: str | os.PathLike[str]) -> dict[str, Any]:
    """The engine inspector's JSON (layers, tactics, fused ops) of a plan built with detailed verbosity."""
    from javisrt.export.tensorrt_api import import_tensorrt, make_logger

    import_tensorrt()
    import tensorrt as trt

    meta = engine_meta.read_metadata(plan_path)
    if meta.profiling_verbosity != "detailed":
        raise ConfigError(f"{plan_path} was built without detailed profiling verbosity: no layer details to dump")
    runtime = trt.Runtime(make_logger())
    engine = runtime.deserialize_cuda_engine(engine_meta.read_plan(plan_path, meta))
    if engine is None:
        raise EngineMismatchError(f"TensorRT could not deserialize {plan_path}")
    inspector = engine.create_engine_inspector()
    info: dict[str, Any] = json.loads(inspector.get_engine_information(trt.LayerInformationFormat.JSON))
    return info
