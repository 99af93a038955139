"""Metadata of a serialized TensorRT engine, and the checks run before deserializing it.

A TensorRT plan is opaque and is only valid for the TensorRT version, GPU architecture (SM) and
CUDA major it was built with (tensorrt-notes.md §6). It also silently bakes in one precision, one set
of optimisation profiles and one set of weights. javisrt therefore writes a JSON sidecar next to
every plan (``engine.plan`` -> ``engine.plan.json``) and refuses to load a plan whose sidecar is
missing, unreadable, does not hash-match the plan bytes, or disagrees with what the caller expects;
every disagreement is listed in one :class:`~javisrt.engine.errors.EngineMismatchError`.

The plan itself stays a plain TensorRT plan, so ``trtexec --loadEngine=engine.plan`` and a C++
``IRuntime::deserializeCudaEngine`` read it unchanged (AOT plugins need no Python at run time).

This module imports neither tensorrt nor CUDA: the checks are unit-tested on CPU.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import os
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from javisrt.engine.errors import EngineMismatchError

log = logging.getLogger(__name__)

META_FORMAT = "javisrt-trt-engine"
META_FORMAT_VERSION = "1"
META_SUFFIX = ".json"
PRECISIONS = ("fp32", "bf16", "fp8")


def sidecar_path(plan_path: str | os.PathLike[str]) -> Path:
    """``engine.plan`` -> ``engine.plan.json``."""
    p = Path(plan_path)
    return p.with_name(p.name + META_SUFFIX)


def sha256_bytes(data: bytes | bytearray | memoryview) -> str:
    return hashlib.sha256(data).hexdigest()


def sha256_file(path: str | os.PathLike[str], chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        while block := f.read(chunk):
            h.update(block)
    return h.hexdigest()


def onnx_sha256(path: str | os.PathLike[str]) -> str:
    """SHA-256 of an ONNX graph *with its weights*: the ``.onnx`` file, then every external-data file
    its initializers reference (sorted by location, each preceded by its name). Equal to
    :func:`sha256_file` of the graph when all weights are inline. ``onnx`` is imported lazily."""
    import onnx

    path = Path(path)
    model = onnx.load(str(path), load_external_data=False)
    locations = sorted({
        entry.value
        for t in model.graph.initializer if t.data_location == onnx.TensorProto.EXTERNAL
        for entry in t.external_data if entry.key == "location"
    })  # fmt: skip
    h = hashlib.sha256()
    for part in [path, *(path.parent / loc for loc in locations)]:
        if part != path:
            h.update(b"\0" + part.name.encode() + b"\0")
        with open(part, "rb") as f:
            while block := f.read(1 << 24):
                h.update(block)
    return h.hexdigest()


@dataclass(frozen=True)
class PluginRecord:
    """One AOT plugin baked into the plan (name/namespace as registered, PTX provenance)."""

    name: str
    namespace: str
    target: str  # e.g. "sm_90a"
    ptx_version: str  # e.g. "8.7"
    kernels_sha256: str  # hash of the PTX text(s) compiled for this plugin


@dataclass(frozen=True)
class EngineMetadata:
    """Everything a loader must agree with before it trusts ``engine.plan``."""

    tensorrt_version: str  # trt.__version__ at build time; plans are tied to it
    compute_capability: tuple[int, int]  # GPU the plan was built on, e.g. (9, 0)
    gpu_name: str
    cuda_runtime_version: int  # cudaRuntimeGetVersion(), e.g. 13040
    precision: str  # "fp32" | "bf16" | "fp8": from the ONNX types / Q/DQ (strongly typed)
    contract: dict[str, Any]  # DiTContract.to_dict(): I/O names, dtypes, profiles
    checkpoint_sha256: str | None  # the export's checkpoint hash (ONNX javisrt.checkpoint_sha256); None if stripped
    onnx_sha256: str  # the ONNX file the plan was built from
    plan_sha256: str
    plan_bytes: int
    refittable: bool
    weights_stripped: bool
    builder_optimization_level: int
    profiling_verbosity: str  # "detailed" lets the engine inspector dump layers / fusions
    plugins: tuple[PluginRecord, ...] = ()
    javisrt_version: str = "0.1.0"
    created_utc: str = ""
    format: str = META_FORMAT
    format_version: str = META_FORMAT_VERSION
    notes: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        if self.precision not in PRECISIONS:
            raise EngineMismatchError(f"engine metadata: unknown precision {self.precision!r}; known {PRECISIONS}")

    @property
    def sm(self) -> str:
        return f"sm_{self.compute_capability[0]}{self.compute_capability[1]}"

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        out = dataclasses.asdict(self)
        out["compute_capability"] = list(self.compute_capability)
        out["plugins"] = [dataclasses.asdict(p) for p in self.plugins]
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], where: str = "engine metadata") -> EngineMetadata:
        if not isinstance(data, Mapping):
            raise EngineMismatchError(f"{where}: expected a JSON object, got {type(data).__name__}")
        if data.get("format") != META_FORMAT:
            raise EngineMismatchError(f"{where}: not a javisrt engine sidecar (format {data.get('format')!r})")
        if data.get("format_version") != META_FORMAT_VERSION:
            raise EngineMismatchError(
                f"{where}: sidecar format version {data.get('format_version')!r} is not supported "
                f"(this javisrt reads {META_FORMAT_VERSION!r}); rebuild the engine"
            )
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(data) - names)
        if unknown:
            raise EngineMismatchError(f"{where}: unknown fields {unknown}")
        try:
            kwargs = dict(data)
            kwargs["compute_capability"] = tuple(int(x) for x in data["compute_capability"])
            kwargs["plugins"] = tuple(PluginRecord(**p) for p in data.get("plugins", ()))
            return cls(**kwargs)
        except (KeyError, TypeError, ValueError) as exc:
            raise EngineMismatchError(f"{where}: malformed ({type(exc).__name__}: {exc})") from exc

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# ---- files ------------------------------------------------------------------------------------


def write_engine(plan: bytes | bytearray | memoryview, meta: EngineMetadata, plan_path: str | os.PathLike[str]) -> Path:
    """Write the plan and its sidecar atomically (plan first, then the sidecar that vouches for it).

    ``meta.plan_sha256`` / ``plan_bytes`` are filled in here from ``plan``.
    """
    plan_path = Path(plan_path)
    data = bytes(plan)
    meta = dataclasses.replace(meta, plan_sha256=sha256_bytes(data), plan_bytes=len(data))
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    _atomic_write(plan_path, data)
    _atomic_write(sidecar_path(plan_path), meta.to_json().encode())
    log.info("wrote %s (%.1f MiB) and %s", plan_path, len(data) / 2**20, sidecar_path(plan_path).name)
    return plan_path


def _atomic_write(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(prefix=path.name + ".", suffix=".tmp", dir=path.parent)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def read_metadata(plan_path: str | os.PathLike[str]) -> EngineMetadata:
    """The sidecar of ``plan_path``; EngineMismatchError when it is missing or unreadable."""
    side = sidecar_path(plan_path)
    if not Path(plan_path).is_file():
        raise EngineMismatchError(f"engine file {plan_path} does not exist")
    if not side.is_file():
        raise EngineMismatchError(
            f"{plan_path} has no metadata sidecar {side.name}: it was not built by `javisrt build` "
            "(or the sidecar was lost); rebuild it so its TensorRT version, GPU, precision, profiles and "
            "weights can be checked"
        )
    try:
        data = json.loads(side.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise EngineMismatchError(f"{side}: corrupt metadata sidecar ({exc})") from exc
    return EngineMetadata.from_dict(data, where=str(side))


def read_plan(plan_path: str | os.PathLike[str], meta: EngineMetadata) -> bytes:
    """The plan bytes, verified against the sidecar's size and SHA-256 (corrupt/truncated/replaced)."""
    data = Path(plan_path).read_bytes()
    if len(data) != meta.plan_bytes:
        raise EngineMismatchError(
            f"{plan_path}: {len(data)} bytes but its metadata records {meta.plan_bytes} "
            "(truncated or replaced engine file); rebuild it"
        )
    digest = sha256_bytes(data)
    if digest != meta.plan_sha256:
        raise EngineMismatchError(
            f"{plan_path}: SHA-256 {digest[:12]}… does not match its metadata ({meta.plan_sha256[:12]}…): "
            "the engine file is corrupt or was replaced; rebuild it"
        )
    return data


# ---- the checks -------------------------------------------------------------------------------


@dataclass(frozen=True)
class Expected:
    """What the loading process needs. ``None`` fields are not checked."""

    tensorrt_version: str | None = None
    compute_capability: tuple[int, int] | None = None
    precision: str | None = None
    contract: Mapping[str, Any] | None = None  # DiTContract.to_dict() of the runtime
    checkpoint_sha256: str | None = None
    check_profiles: bool = True  # False: the loader adopts the engine's profiles (a subset built with --profiles)


def mismatches(meta: EngineMetadata, expected: Expected) -> list[str]:
    """Human-readable list of every disagreement between ``meta`` and ``expected`` (empty: OK)."""
    out: list[str] = []
    if expected.tensorrt_version is not None and expected.tensorrt_version != meta.tensorrt_version:
        out.append(
            f"TensorRT version: built with {meta.tensorrt_version}, this process has "
            f"{expected.tensorrt_version} (plans are not portable across TensorRT versions)"
        )
    if expected.compute_capability is not None and tuple(expected.compute_capability) != meta.compute_capability:
        cc = expected.compute_capability
        out.append(f"GPU: built for {meta.sm} ({meta.gpu_name}), this GPU is sm_{cc[0]}{cc[1]}")
    if expected.precision is not None and expected.precision != meta.precision:
        out.append(f"precision: engine is {meta.precision}, requested {expected.precision}")
    if expected.contract is not None:
        out += _contract_mismatches(meta.contract, expected.contract, expected.check_profiles)
    if expected.checkpoint_sha256 is not None:
        if meta.weights_stripped:
            pass  # weights come from the refit at load time; the loader checks those instead
        elif meta.checkpoint_sha256 is None:
            out.append("weights: the engine records no checkpoint hash, a specific checkpoint was requested")
        elif meta.checkpoint_sha256 != expected.checkpoint_sha256:
            out.append(
                f"weights: engine holds checkpoint {meta.checkpoint_sha256[:12]}…, requested "
                f"{expected.checkpoint_sha256[:12]}… (refit it with `javisrt build --refit` or rebuild)"
            )
    return out


def _contract_mismatches(built: Mapping[str, Any], want: Mapping[str, Any], profiles: bool) -> list[str]:
    out = []
    for key in ("module", "version", "config", "inputs", "outputs"):
        if built.get(key) != want.get(key):
            out.append(f"contract {key}: engine {_short(built.get(key))} != runtime {_short(want.get(key))}")
    if profiles and built.get("trt_profiles") != want.get("trt_profiles"):
        names_b = [p.get("name") for p in built.get("profiles", [])]
        names_w = [p.get("name") for p in want.get("profiles", [])]
        out.append(f"optimisation profiles: engine {names_b} != runtime contract {names_w} (or their shapes differ)")
    return out


def _short(value: Any, limit: int = 120) -> str:
    text = json.dumps(value, sort_keys=True)
    return text if len(text) <= limit else text[: limit - 1] + "…"


def check(meta: EngineMetadata, expected: Expected, where: str = "engine") -> None:
    """Raise one EngineMismatchError listing every mismatch."""
    problems = mismatches(meta, expected)
    if problems:
        raise EngineMismatchError(f"{where} does not fit this process:\n  - " + "\n  - ".join(problems))


def check_refit_source(meta: EngineMetadata, onnx_path: str | os.PathLike[str], where: str = "engine") -> None:
    """A weight-stripped plan (kREFIT_IDENTICAL + kSTRIP_PLAN) may only be refitted with the very weights
    it was built from: TensorRT optimised for them, and other weights are undefined behaviour
    (NvInfer.h, BuilderFlag::kREFIT_IDENTICAL). Compares :func:`onnx_sha256` of ``onnx_path`` with the
    recorded ``onnx_sha256``; plans built with kREFIT take any weights of the same graph."""
    if not meta.weights_stripped:
        return
    digest = onnx_sha256(onnx_path)
    if digest != meta.onnx_sha256:
        raise EngineMismatchError(
            f"{where} is weight-stripped (kREFIT_IDENTICAL): it can only be refitted from the ONNX it was built from "
            f"(SHA-256 {meta.onnx_sha256[:12]}…, graph + external data), but {onnx_path} hashes to {digest[:12]}…; "
            "refitting other weights is undefined behaviour: rebuild the plan, or build it with --refit refit"
        )


def load_checked(plan_path: str | os.PathLike[str], expected: Expected) -> tuple[bytes, EngineMetadata]:
    """Sidecar + verified plan bytes, after every metadata check passed."""
    meta = read_metadata(plan_path)
    check(meta, expected, where=str(plan_path))
    return read_plan(plan_path, meta), meta
