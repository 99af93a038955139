"""The one executor protocol: :class:`Engine`, implemented once per runtime.

    torch        runtime/backends/torch_engine.py        TorchEngine        (eager JavisDiT; op set torch/triton)
    onnxruntime  runtime/backends/onnxruntime_engine.py  OnnxRuntimeEngine  (an exported graph)
    tensorrt     runtime/backends/tensorrt_engine.py     TensorRTEngine     (a javisrt-built plan)

``runtime/backends/__init__.py``'s :func:`create_engine` is the one factory; per-request state (static
inputs, RoPE tables, the hand-off to the C++ loop) lives in :class:`~javisrt.runtime.denoise_session.DenoiseSession`.

Lifecycle (explicit, checked; shared/style.md lesson 10)::

    engine = create_engine(name, ...)      LOADED: weights / session / deserialized plan in memory
    bucket = engine.allocate(dims)         ALLOCATED: persistent I/O buffers for one shape bucket
    out = engine.infer({"video": ..., ...})   copy given inputs into the bound buffers, run, return
                                               the bound output buffers (valid until the next run)
    engine.unload()                        UNLOADED again (also ``with engine: ...``)

* I/O tensors are addressed by the names of the export contract (``export/contract.py``), which is
  the single source of names, dtypes and shapes; buffer sizes come from :func:`buffer_plan`. Every
  engine carries its contract: the torch engine builds it from its model's config and mode, the
  compiled engines read it from their graph's or plan's metadata (no eager model is built for them).
* A **shape bucket** is one concrete set of the contract's free dims (batch, video frames/height/width,
  audio frames). Buffers, TensorRT input shapes and CUDA graphs are per bucket; :func:`select_profile`
  maps a bucket to the first optimisation profile of the contract that contains it (the same rule
  TensorRT applies: min <= shape <= max elementwise for every input).
* Inputs written once stay bound: a request writes ``context`` / ``rope_*`` once and only
  ``video`` / ``audio`` / ``timestep`` per step, or lets the C++ loop write the device buffers itself
  (:meth:`Engine.mark_written`) and replay a CUDA graph (:meth:`Engine.capture_graph`).
"""

from __future__ import annotations

import abc
import enum
import logging
import math
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from javisrt.engine.errors import ConfigError, ShapeError, UnavailableError
from javisrt.export.contract import BATCH, Dims, DiTContract

log = logging.getLogger(__name__)

Array = torch.Tensor | np.ndarray


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


@dataclass(frozen=True)
class ShapeBucket:
    """A concrete shape of the engine's I/O: the contract's free dims, plus the profile serving it."""

    dims: tuple[tuple[str, int], ...]  # sorted (name, value) of the free dims: hashable cache key
    profile: int | None = None  # optimisation profile index (TensorRT); None where profiles do not apply

    @classmethod
    def of(cls, contract: DiTContract, dims: Mapping[str, int], profile: int | None = None) -> ShapeBucket:
        full = contract.resolve(dict(dims))  # validates: every free dim given, patch multiples
        return cls(tuple(sorted((k, full[k]) for k in contract.free_dims)), profile)

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


class Engine(abc.ABC):
    """What the pipeline, the samplers, calibration and the benchmark may call on any runtime.

    Implementations fill in the ``_`` hooks (``_load``, ``_allocate``, ``_write``, ``_run``, ``_sync``,
    ``_outputs``, ``_pointers``, ``_release_buffers``, ``_unload``; CUDA-graph capture where the runtime
    can); this class checks the state machine, the input names/shapes/dtypes and that every input was
    written since the last ``allocate``.
    """

    name = "base"
    contract: DiTContract  # names, shapes and mode of the I/O; the network config is contract.config

    def __init__(self, contract: DiTContract) -> None:
        self.contract = contract
        self._state = EngineState.UNLOADED
        self._bucket: ShapeBucket | None = None
        self._plan: dict[str, BufferSpec] = {}
        self._written: set[str] = set()
        self._generation = 0  # bumped whenever the bound buffers (and graphs over them) are released

    # ---- state ---------------------------------------------------------------------------------
    @property
    def state(self) -> EngineState:
        return self._state

    @property
    def bucket(self) -> ShapeBucket | None:
        return self._bucket

    @property
    def buffer_generation(self) -> int:
        """Changes whenever the bound buffers are released (re-allocate, unload): raw pointers and graph
        handles taken before are dead then (:class:`~javisrt.runtime.denoise_session.LoopBinding` checks)."""
        return self._generation

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
            self._generation += 1
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

    def mark_written(self, names: Sequence[str]) -> None:
        """Declare inputs written by someone else through :meth:`buffer_pointers` (the C++ CUDA loop
        writes latents and timesteps straight into the bound device buffers)."""
        self._require(EngineState.ALLOCATED, "mark_written")
        unknown = [n for n in names if n not in self._plan or not self._plan[n].is_input]
        if unknown:
            raise ShapeError(f"{self.name} engine: {unknown} are not inputs of the allocated bucket")
        self._written.update(names)

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

    @property
    def supports_cuda_graphs(self) -> bool:
        """Whether :meth:`capture_graph` can work here (runtime and device); False: it raises."""
        return False

    def capture_graph(self) -> int:
        """Capture one run of the current bucket as a CUDA graph; returns its cudaGraphExec_t."""
        raise UnavailableError(f"{self.name} engine: CUDA-graph capture is not available for this backend/device")

    def unload(self) -> None:
        if self._state is EngineState.UNLOADED:
            return
        if self._bucket is not None:
            self._release_buffers()
            self._generation += 1
        self._unload()
        self._bucket, self._plan, self._written = None, {}, set()
        self._state = EngineState.UNLOADED
        log.info("%s engine unloaded", self.name)

    def __enter__(self) -> Engine:
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
