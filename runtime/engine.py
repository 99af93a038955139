"""The Engine interface every denoiser backend implements (torch, onnxruntime, tensorrt).

Lifecycle (explicit, checked; shared/style.md lesson 10)::

    engine = Backend(...)                  state UNLOADED: nothing allocated
    engine.load()                          LOADED: weights / session / deserialized plan in memory
    bucket = engine.allocate(dims)         ALLOCATED: persistent I/O buffers for one shape bucket
    out = engine.infer({"video": ..., ...})   copy given inputs into the bound buffers, run, return
                                               the bound output buffers (valid until the next run)
    engine.unload()                        UNLOADED again (also ``with engine: ...``)

* I/O tensors are addressed by the names of the export contract (``export/contract.py``), which is
  the single source of names, dtypes and shapes; buffer sizes come from :func:`buffer_plan`.
* A **shape bucket** is one concrete set of the contract's free dims (batch, video frames/height/width,
  audio frames). Buffers, TensorRT input shapes and CUDA graphs are per bucket; :func:`select_profile`
  maps a bucket to the first optimisation profile of the contract that contains it (the same rule
  TensorRT applies: min <= shape <= max elementwise for every input).
* Inputs written once stay bound: a sampling loop writes ``context`` / ``rope_*`` once per request
  and only ``video`` / ``audio`` / ``timestep`` per step (:class:`HostDenoiser`), or lets the C++ loop
  write the device buffers itself and replay a CUDA graph (:func:`loop_binding`).

The hand-off to the C++ sampler (``javisrt._sampler``):
* host path: ``_sampler.sample(latents, HostDenoiser(engine, static_inputs), config)``;
* CUDA path: ``_sampler.sample_cuda(latents, **loop_binding(engine).sample_cuda_kwargs())`` with the
  engine's own device buffers, stream and captured graph (or an enqueue callback).
"""

from __future__ import annotations

import abc
import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Protocol, runtime_checkable

import numpy as np
import torch

from javisrt.engine.errors import ConfigError, ShapeError, UnavailableError
from javisrt.export.contract import BATCH, DIM_NAMES, Dims, DiTContract

log = logging.getLogger(__name__)

# (input latent, output velocity) per modality, in the C++ loop's order: video first, then audio.
MODALITY_IO: tuple[tuple[str, str], ...] = (("video", "video_velocity"), ("audio", "audio_velocity"))
TIMESTEP = "timestep"
# Inputs that are constant over the steps of one request.
STATIC_INPUTS = ("context", "rope_cos", "rope_sin")

Array = torch.Tensor | np.ndarray


def velocity_outputs(video: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The model's (video, audio) velocities under the contract's output names; absent modalities omitted."""
    out: dict[str, torch.Tensor] = {}
    for (_, name), value in zip(MODALITY_IO, (video, audio), strict=True):
        if value is not None:
            out[name] = value
    return out


class EngineState(enum.StrEnum):
    UNLOADED = "unloaded"
    LOADED = "loaded"
    ALLOCATED = "allocated"


# ---- buffers and shape buckets ----------------------------------------------------------------


@dataclass(frozen=True)
class BufferSpec:
    """One I/O buffer of a shape bucket."""

    name: str
    shape: tuple[int, ...]
    dtype: torch.dtype
    is_input: bool

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nbytes(self) -> int:
        return self.numel * torch.empty((), dtype=self.dtype).element_size()


def buffer_plan(contract: DiTContract, dims: Dims) -> dict[str, BufferSpec]:
    """Name -> buffer spec of every graph input and output at ``dims`` (inputs first, contract order)."""
    ins = contract.input_shapes(dims)
    outs = contract.output_shapes(dims)
    plan = {n: BufferSpec(n, ins[n], contract.spec(n).torch_dtype, True) for n in contract.input_names}
    plan.update({n: BufferSpec(n, outs[n], contract.spec(n).torch_dtype, False) for n in contract.output_names})
    return plan


def _free_dims(contract: DiTContract) -> tuple[str, ...]:
    return tuple(d for d in DIM_NAMES if d != "audio_frames" or contract.config.has_audio)


@dataclass(frozen=True)
class ShapeBucket:
    """A concrete shape of the engine's I/O: the contract's free dims, plus the profile serving it."""

    dims: tuple[tuple[str, int], ...]  # sorted (name, value) of the free dims: hashable cache key
    profile: int | None = None  # optimisation profile index (TensorRT); None where profiles do not apply

    @classmethod
    def of(cls, contract: DiTContract, dims: Mapping[str, int], profile: int | None = None) -> ShapeBucket:
        full = contract.resolve(dict(dims))  # validates: every free dim given, patch multiples
        return cls(tuple(sorted((k, full[k]) for k in _free_dims(contract))), profile)

    def as_dims(self) -> Dims:
        return dict(self.dims)

    @property
    def batch(self) -> int:
        return self.as_dims()[BATCH]

    def __str__(self) -> str:
        inner = ",".join(f"{k}={v}" for k, v in self.dims)
        return f"bucket({inner}{'' if self.profile is None else f'; profile {self.profile}'})"


def profile_contains(contract: DiTContract, index: int, dims: Dims) -> bool:
    """Whether profile ``index`` of the contract admits ``dims`` (min <= shape <= max, every input)."""
    shapes = contract.input_shapes(dims)
    prof = contract.trt_profiles()[index]
    return all(
        all(lo <= s <= hi for lo, s, hi in zip(prof[n][0], shapes[n], prof[n][2], strict=True)) for n in shapes
    )


def select_profile(contract: DiTContract, dims: Dims, exclude: Sequence[int] = ()) -> int:
    """First profile of the contract that contains ``dims`` and is not in ``exclude``.

    ``exclude`` holds profiles already bound to another concurrently used execution context: TensorRT
    requires a separate profile per context in concurrent use (NvInferRuntime.h, IExecutionContext).
    """
    candidates = [i for i in range(len(contract.profiles)) if profile_contains(contract, i, dims)]
    free = [i for i in candidates if i not in exclude]
    if free:
        return free[0]
    names = [p.name for p in contract.profiles]
    if candidates:
        raise ShapeError(
            f"dims {dims} fit profiles {[names[i] for i in candidates]}, but each is already bound to another "
            "execution context; build the engine with more profiles or use fewer concurrent streams"
        )
    ranges = contract.dim_ranges()
    raise ShapeError(f"dims {dims} fit none of the engine's profiles {names} (overall dim ranges {ranges})")


def check_inputs(plan: Mapping[str, BufferSpec], inputs: Mapping[str, Array]) -> None:
    """Names, shapes and dtypes of ``inputs`` against the bucket's buffer plan (no silent casts)."""
    for name, value in inputs.items():
        spec = plan.get(name)
        if spec is None or not spec.is_input:
            known = [n for n, s in plan.items() if s.is_input]
            raise ShapeError(f"unknown engine input {name!r}; inputs are {known}")
        shape = tuple(value.shape)
        if shape != spec.shape:
            raise ShapeError(f"input {name}: shape {shape} != the allocated bucket's {spec.shape}")
        dtype = value.dtype if isinstance(value, torch.Tensor) else _torch_dtype_of_numpy(value.dtype)
        if dtype != spec.dtype:
            raise ShapeError(f"input {name}: dtype {value.dtype} != contract dtype {spec.dtype}")


def _torch_dtype_of_numpy(dtype: np.dtype[Any]) -> torch.dtype | None:
    try:
        return torch.from_numpy(np.empty(0, dtype=dtype)).dtype
    except TypeError:
        return None


def as_torch(value: Array) -> torch.Tensor:
    """A torch view of ``value`` (numpy arrays are wrapped without a copy where writable)."""
    if isinstance(value, torch.Tensor):
        return value
    if not value.flags.writeable:  # the C++ loop hands read-only views; torch warns on those
        value = value.copy()
    return torch.from_numpy(np.ascontiguousarray(value))


# ---- the interface ----------------------------------------------------------------------------


@runtime_checkable
class Engine(Protocol):
    """What the pipeline, the samplers and the benchmark may call on any backend."""

    name: str
    contract: DiTContract

    @property
    def state(self) -> EngineState: ...

    @property
    def bucket(self) -> ShapeBucket | None: ...

    @property
    def device(self) -> torch.device: ...

    def load(self) -> None: ...

    def allocate(self, dims: Mapping[str, int]) -> ShapeBucket: ...

    def infer(self, inputs: Mapping[str, Array]) -> dict[str, torch.Tensor]: ...

    def write_inputs(self, inputs: Mapping[str, Array]) -> None: ...

    def enqueue(self, stream: int | None = None) -> None: ...

    def synchronize(self) -> None: ...

    def outputs(self) -> dict[str, torch.Tensor]: ...

    def buffer_pointers(self) -> dict[str, int]: ...

    @property
    def stream_handle(self) -> int: ...

    def capture_graph(self) -> int: ...

    def unload(self) -> None: ...


class EngineBase(abc.ABC):
    """Lifecycle bookkeeping shared by the backends; subclasses fill in the ``_`` hooks.

    Subclasses implement ``_load``, ``_allocate``, ``_write``, ``_run``, ``_sync``, ``_outputs``,
    ``_pointers``, ``_release_buffers`` and ``_unload``; this class checks the state machine, the
    input names/shapes/dtypes and that every input was written since the last ``allocate``.
    """

    name = "base"

    def __init__(self, contract: DiTContract) -> None:
        self.contract = contract
        self._state = EngineState.UNLOADED
        self._bucket: ShapeBucket | None = None
        self._plan: dict[str, BufferSpec] = {}
        self._written: set[str] = set()

    # ---- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def bucket(self) -> ShapeBucket | None:
        return self._bucket

    @property
    def plan(self) -> dict[str, BufferSpec]:
        """Buffer plan of the allocated bucket."""
        self._require(EngineState.ALLOCATED, "plan")
        return dict(self._plan)

    @property
    @abc.abstractmethod
    def device(self) -> torch.device: ...

    def _require(self, at_least: EngineState, what: str) -> None:
        order = [EngineState.UNLOADED, EngineState.LOADED, EngineState.ALLOCATED]
        if order.index(self._state) < order.index(at_least):
            hint = {EngineState.LOADED: "call load() first", EngineState.ALLOCATED: "call allocate(dims) first"}
            raise ConfigError(f"{self.name} engine: {what}() in state {self._state.value}; {hint[at_least]}")

    # ---- lifecycle -----------------------------------------------------------------------------
    def load(self) -> None:
        if self._state is not EngineState.UNLOADED:
            raise ConfigError(f"{self.name} engine: load() called twice (state {self._state.value})")
        self._load()
        self._state = EngineState.LOADED
        log.info("%s engine loaded", self.name)

    def allocate(self, dims: Mapping[str, int]) -> ShapeBucket:
        """Persistent I/O buffers for the bucket of ``dims``; a no-op when that bucket is allocated."""
        self._require(EngineState.LOADED, "allocate")
        bucket = self._bucket_for(dims)
        if self._bucket is not None and bucket.dims == self._bucket.dims:
            return self._bucket
        if self._bucket is not None:
            self._release_buffers()
        plan = buffer_plan(self.contract, bucket.as_dims())
        self._allocate(bucket, plan)
        self._bucket, self._plan, self._written = bucket, plan, set()
        self._state = EngineState.ALLOCATED
        log.info(
            "%s engine: %s, %.1f MiB of I/O buffers",
            self.name, bucket, sum(s.nbytes for s in plan.values()) / 2**20,
        )
        return bucket

    def _bucket_for(self, dims: Mapping[str, int]) -> ShapeBucket:
        return ShapeBucket.of(self.contract, dims)

    def write_inputs(self, inputs: Mapping[str, Array]) -> None:
        """Copy ``inputs`` into the bound input buffers (other inputs keep their last value)."""
        self._require(EngineState.ALLOCATED, "write_inputs")
        check_inputs(self._plan, inputs)
        for name, value in inputs.items():
            self._write(name, value)
            self._written.add(name)

    def enqueue(self, stream: int | None = None) -> None:
        """Run on whatever the bound input buffers hold, writing the bound output buffers.

        Asynchronous on GPU backends (``stream``: a cudaStream_t as int; None = the engine's own).
        """
        self._require(EngineState.ALLOCATED, "enqueue")
        missing = [n for n in self.contract.input_names if n not in self._written]
        if missing:
            raise ShapeError(f"{self.name} engine: inputs {missing} were never written since allocate()")
        self._run(stream)

    def synchronize(self) -> None:
        self._require(EngineState.ALLOCATED, "synchronize")
        self._sync()

    def outputs(self) -> dict[str, torch.Tensor]:
        """The bound output buffers by name (torch tensors on :attr:`device`; views, not copies)."""
        self._require(EngineState.ALLOCATED, "outputs")
        return self._outputs()

    def infer(self, inputs: Mapping[str, Array]) -> dict[str, torch.Tensor]:
        """write_inputs + enqueue + synchronize; returns the output buffers (valid until the next run)."""
        self.write_inputs(inputs)
        self.enqueue()
        self.synchronize()
        return self.outputs()

    def buffer_pointers(self) -> dict[str, int]:
        """Name -> address of every bound buffer (device pointers on GPU backends)."""
        self._require(EngineState.ALLOCATED, "buffer_pointers")
        return self._pointers()

    @property
    def stream_handle(self) -> int:
        """cudaStream_t of the engine's stream as an int (0 where there is none: CPU)."""
        return 0

    def capture_graph(self) -> int:
        """Capture one run of the current bucket as a CUDA graph; returns its cudaGraphExec_t."""
        raise UnavailableError(f"{self.name} engine: CUDA-graph capture is not available for this backend/device")

    def unload(self) -> None:
        if self._state is EngineState.UNLOADED:
            return
        if self._bucket is not None:
            self._release_buffers()
        self._unload()
        self._bucket, self._plan, self._written = None, {}, set()
        self._state = EngineState.UNLOADED
        log.info("%s engine unloaded", self.name)

    def __enter__(self) -> EngineBase:
        if self._state is EngineState.UNLOADED:
            self.load()
        return self

    def __exit__(self, *exc: object) -> None:
        self.unload()

    # ---- hooks ---------------------------------------------------------------------------------
    @abc.abstractmethod
    def _load(self) -> None: ...

    @abc.abstractmethod
    def _allocate(self, bucket: ShapeBucket, plan: dict[str, BufferSpec]) -> None: ...

    @abc.abstractmethod
    def _write(self, name: str, value: Array) -> None: ...

    @abc.abstractmethod
    def _run(self, stream: int | None) -> None: ...

    @abc.abstractmethod
    def _sync(self) -> None: ...

    @abc.abstractmethod
    def _outputs(self) -> dict[str, torch.Tensor]: ...

    @abc.abstractmethod
    def _pointers(self) -> dict[str, int]: ...

    @abc.abstractmethod
    def _release_buffers(self) -> None: ...

    @abc.abstractmethod
    def _unload(self) -> None: ...


# ---- hand-off to the C++ sampling loop ----------------------------------------------------------


def modalities(contract: DiTContract) -> tuple[tuple[str, str], ...]:
    """(input, output) names per modality in the sampler's order (video, then audio if present)."""
    return MODALITY_IO if contract.config.has_audio else MODALITY_IO[:1]


class HostDenoiser:
    """The ``denoiser(inputs, timesteps)`` callback of ``javisrt._sampler.sample`` over an Engine.

    ``static`` (context, rope tables) is written once here; each call writes the CFG latents
    ([2B, ...], cond half first) and the [2B] timesteps into the bound buffers, runs, and returns the
    velocity buffers as float32 numpy arrays (views of the engine's buffers on CPU, valid until the
    next call - what the C++ loop expects).
    """

    def __init__(self, engine: Engine, static: Mapping[str, Array]) -> None:
        if engine.state is not EngineState.ALLOCATED or engine.bucket is None:
            raise ConfigError("HostDenoiser needs an engine allocated for the request's bucket")
        missing = [n for n in STATIC_INPUTS if n not in static]
        if missing:
            raise ShapeError(f"HostDenoiser: static inputs {missing} missing")
        self.engine = engine
        self.io = modalities(engine.contract)
        engine.write_inputs(static)
        self.calls = 0

    def __call__(self, inputs: Sequence[np.ndarray], timesteps: np.ndarray) -> list[np.ndarray]:
        if len(inputs) != len(self.io):
            raise ShapeError(f"denoiser got {len(inputs)} latents for modalities {[i for i, _ in self.io]}")
        feed: dict[str, Array] = {name: x for (name, _), x in zip(self.io, inputs, strict=True)}
        feed[TIMESTEP] = timesteps
        outs = self.engine.infer(feed)
        self.calls += 1
        return [_to_numpy(outs[out_name]) for _, out_name in self.io]


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        t = t.cpu()  # host loop on a GPU engine: one D2H per step (the CUDA path avoids it)
    return t.numpy()


@dataclass(frozen=True)
class LoopBinding:
    """Everything ``javisrt._sampler.sample_cuda`` needs from an engine, as plain ints."""

    inputs: tuple[int, ...]  # per modality: bound [2B, ...] fp32 latent input buffer
    outputs: tuple[int, ...]  # per modality: bound [2B, ...] fp32 velocity buffer
    numels: tuple[int, ...]  # per modality: elements of ONE CFG half [B, ...]
    timesteps: int  # bound [2B] fp32 timestep buffer
    batch: int  # B (the engine runs 2B)
    stream: int  # cudaStream_t the denoiser runs on
    graph_exec: int  # cudaGraphExec_t to replay (0: call enqueue)
    enqueue: Callable[[int, int], None] | None  # enqueue(step, stream)
    device: torch.device

    def sample_cuda_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``_sampler.sample_cuda`` except latents and config."""
        if self.device.type != "cuda":
            raise UnavailableError(
                f"the CUDA sampling loop needs device buffers; this engine's buffers are on {self.device}"
            )
        return {
            "inputs": list(self.inputs),
            "outputs": list(self.outputs),
            "numels": list(self.numels),
            "timesteps": self.timesteps,
            "batch": self.batch,
            "stream": self.stream,
            "graph_exec": self.graph_exec,
            "enqueue": None if self.graph_exec else self.enqueue,
        }


def loop_binding(engine: Engine, use_graph: bool = False) -> LoopBinding:
    """The engine's bound buffers, stream and (optionally) captured graph for the C++ CUDA loop.

    The engine must be allocated for a CFG bucket (even batch 2B) and the static inputs written;
    the loop writes latents and timesteps straight into the bound buffers each step.
    """
    if engine.state is not EngineState.ALLOCATED or engine.bucket is None:
        raise ConfigError("loop_binding needs an engine allocated for the request's bucket")
    batch2 = engine.bucket.batch
    if batch2 % 2:
        raise ShapeError(f"the sampling loop runs the CFG batch [cond; uncond]: engine batch must be even, got {batch2}")
    plan = buffer_plan(engine.contract, engine.bucket.as_dims())
    ptr = engine.buffer_pointers()
    io = modalities(engine.contract)
    graph = engine.capture_graph() if use_graph else 0

    def enqueue(step: int, stream: int) -> None:
        engine.enqueue(stream)

    return LoopBinding(
        inputs=tuple(ptr[i] for i, _ in io),
        outputs=tuple(ptr[o] for _, o in io),
        numels=tuple(plan[i].numel // 2 for i, _ in io),
        timesteps=ptr[TIMESTEP],
        batch=batch2 // 2,
        stream=engine.stream_handle,
        graph_exec=graph,
        enqueue=enqueue,
        device=engine.device,
    )


# ---- adapter to the pipeline's engine seam (runtime/backends/__init__.py) ------------------------


class PipelineEngine:
    """A contract Engine seen through the pipeline's protocol (``runtime/backends/__init__.py``):
    ``allocate(shapes)`` and ``infer(inputs, *, video_latent_frames=None)`` with inputs
    video/audio/timestep/context and no RoPE tables.

    Buckets follow the inputs' shapes; the TA-RoPE tables are built once per bucket from the contract
    and stay bound; ``context`` is zero-padded to the contract's ``text_len``. A compiled graph always
    has every modality of its network, so t2a/t2v requests on a t2av network are not expressible here.
    """

    def __init__(self, engine: EngineBase) -> None:
        self.engine = engine
        self.name = engine.name
        self._rope_bucket: ShapeBucket | None = None

    def load(self) -> None:
        if self.engine.state is EngineState.UNLOADED:
            self.engine.load()

    def _dims(self, shapes: Mapping[str, Sequence[int]]) -> Dims:
        names = [i for i, _ in modalities(self.engine.contract)]
        absent = [n for n in names if n not in shapes]
        if absent:
            raise NotImplementedError(
                f"the {self.name} engine runs the contract's full graph ({', '.join(names)}); inputs {absent} are "
                "absent (t2a/t2v generation on a t2av network): use the torch backend for that mode"
            )
        v = shapes["video"]
        dims = {"batch": int(v[0]), "video_frames": int(v[2]), "video_height": int(v[3]), "video_width": int(v[4])}
        if self.engine.contract.config.has_audio:
            dims["audio_frames"] = int(shapes["audio"][2])
        return dims

    def allocate(self, shapes: Mapping[str, Sequence[int]]) -> None:
        self.engine.allocate(self._dims(shapes))

    def infer(self, inputs: Mapping[str, torch.Tensor], *, video_latent_frames: int | None = None) -> dict[str, torch.Tensor]:
        if video_latent_frames is not None:
            raise NotImplementedError(
                f"the {self.name} engine has no audio-only (t2a) graph; use the torch backend for mode t2a"
            )
        contract = self.engine.contract
        dims = self._dims({k: tuple(v.shape) for k, v in inputs.items()})
        bucket = self.engine.allocate(dims)
        feed: dict[str, Array] = {k: v for k, v in inputs.items() if k != "context"}
        if "context" not in inputs:
            raise ShapeError("engine input 'context' is missing")
        ctx = inputs["context"].float()
        pad = contract.config.text_len - ctx.shape[1]
        if pad < 0:
            raise ShapeError(f"context has {ctx.shape[1]} tokens > text_len {contract.config.text_len}")
        feed["context"] = torch.nn.functional.pad(ctx, (0, 0, 0, pad)) if pad else ctx
        if self._rope_bucket != bucket:
            feed["rope_cos"], feed["rope_sin"] = contract.rope_tables(dims)
            self._rope_bucket = bucket
        return self.engine.infer(feed)

    def unload(self) -> None:
        self.engine.unload()
        self._rope_bucket = None
