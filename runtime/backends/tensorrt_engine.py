"""TensorRTEngine: a javisrt-built TensorRT plan behind the Engine interface (TensorRT 11 API).

Thin by design (TensorRT cannot be installed on the dev/CI machines): ``tensorrt`` is imported
lazily inside functions; CUDA streams, device memory and graphs come from cuda-python
(``cuda.bindings.runtime``), so no CUDA torch is needed.

* **Contract**: read from the plan's metadata sidecar when the engine is constructed (no eager model).
* **Load** (:meth:`TensorRTEngine.load`): the plan's metadata sidecar is checked first
  (``export/engine_meta.py``: TensorRT version, GPU SM, precision, profiles/contract, checkpoint
  hash, plan SHA-256), then ``trt.Runtime.deserialize_cuda_engine``; the deserialized engine's
  I/O names, modes, dtypes and profile count are checked against the contract. A weight-stripped plan
  is refitted before first use from its ONNX, which must be the one it was built from (kREFIT_IDENTICAL:
  the recorded ``onnx_sha256``, graph + external data, is checked first).
* **Allocate** (per shape bucket): pick the first free optimisation profile containing the bucket
  (one profile per concurrently used context, NvInferRuntime.h), ``set_optimization_profile_async``,
  ``cudaMalloc`` every I/O buffer, then in TensorRT 11's order ``set_input_shape`` (all inputs) ->
  ``infer_shapes`` / output shapes checked -> ``set_tensor_address`` (all I/O).
* **Infer**: async H2D copies into the bound inputs, ``execute_async_v3(stream)``, or the replay
  of the bucket's CUDA graph (captured after one warm-up enqueue, tensorrt-notes §6). On a caller's
  stream the run first waits (event) for the copies and profile switch queued on the engine's stream,
  and the engine's stream then waits for the run (output copies, next writes); outputs come
  back as host tensors on request, while the C++ loop uses the device buffers directly
  (:meth:`javisrt.runtime.denoise_session.DenoiseSession.loop_binding`).
* **Concurrency**: one execution context + stream per :class:`TensorRTEngine`.
"""

from __future__ import annotations

import logging
import os
import threading
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from javisrt.engine.errors import ConfigError, EngineMismatchError, ShapeError, UnavailableError
from javisrt.export import engine_meta
from javisrt.export.contract import Dims, DiTContract
from javisrt.export.tensorrt_api import cuda_call, cudart, device_compute_capability, import_tensorrt, make_logger
from javisrt.export.tensorrt_api import refit_engine_from_onnx
from javisrt.runtime.engine import (
    Array,
    BufferSpec,
    Engine,
    EngineState,
    ShapeBucket,
    as_torch,
    profile_contains,
    select_profile,
)

if TYPE_CHECKING:  # the stubs (tensorrt-stubs) type every TensorRT call below for mypy
    import tensorrt as trt

log = logging.getLogger(__name__)

# contract dtype name -> the TensorRT DataType member name (the I/O is fp32 in every flavour)
TRT_DTYPES = {"float32": "FLOAT", "float16": "HALF", "bfloat16": "BF16", "int64": "INT64", "int32": "INT32"}

















@dataclass
class LoadedPlan:
    """The deserialized engine and what keeps it alive (runtime, logger), with its metadata."""

    trt: Any
    logger: Any
    runtime: Any
    engine: Any
    meta: engine_meta.EngineMetadata
    profiles_in_use: set[int] = field(default_factory=set)
    lock: threading.Lock = field(default_factory=threading.Lock)
    users: int = 0


def check_engine_io(engine: trt.ICudaEngine, contract: DiTContract) -> None:
    """The deserialized engine's I/O tensors and profile count against the contract."""
    import tensorrt as trt

    names = [engine.get_tensor_name(i) for i in range(engine.num_io_tensors)]
    want = contract.input_names + contract.output_names
    if sorted(names) != sorted(want):
        raise EngineMismatchError(f"engine I/O tensors {names} != contract {want}")
    for name in want:
        mode = engine.get_tensor_mode(name)
        expect_mode = trt.TensorIOMode.INPUT if name in contract.input_names else trt.TensorIOMode.OUTPUT
        if mode != expect_mode:
            raise EngineMismatchError(f"engine tensor {name} is {mode}, the contract says {expect_mode}")
        dt = engine.get_tensor_dtype(name)
        if dt != getattr(trt.DataType, TRT_DTYPES[contract.spec(name).dtype]):
            raise EngineMismatchError(f"engine tensor {name} has dtype {dt}, the contract says {contract.spec(name).dtype}")
    if engine.num_optimization_profiles != len(contract.profiles):
        raise EngineMismatchError(
            f"engine has {engine.num_optimization_profiles} optimisation profiles, the contract {len(contract.profiles)}"
        )


class TensorRTEngine(Engine):
    """One TensorRT execution context with its own stream, buffers and per-bucket CUDA graphs."""

    name = "tensorrt"

    def __init__(
        self,
        plan_path: str | os.PathLike[str],
        *,
        precision: str | None = None,
        checkpoint_sha256: str | None = None,
        device_id: int = 0,
        refit_onnx: str | os.PathLike[str] | None = None,
        cuda_graphs: bool = True,
    ) -> None:
        # The contract (with the profiles the plan was built for) comes from the plan's sidecar; the
        # sidecar is checked in full against this machine by load().
        super().__init__(DiTContract.from_dict(engine_meta.read_metadata(plan_path).contract))
        self.plan_path = Path(plan_path)
        self.precision = precision
        self.checkpoint_sha256 = checkpoint_sha256
        self.device_id = device_id
        self.refit_onnx = None if refit_onnx is None else Path(refit_onnx)
        self.cuda_graphs = cuda_graphs
        self._shared: LoadedPlan | None = None
        self.context: Any = None
        self._stream: Any = None
        self._event: Any = None  # orders the engine's stream and a caller's stream (_run)
        self._device_buffers: dict[str, int] = {}
        self._host_out: dict[str, torch.Tensor] = {}
        self._staging: list[torch.Tensor] = []  # host sources of in-flight H2D copies
        self._graphs: dict[tuple[tuple[str, int], ...], tuple[Any, Any]] = {}  # bucket -> (graph, exec)
        self._profile: int | None = None

    @property
    def device(self) -> torch.device:
        return torch.device("cuda", self.device_id)

    @property
    def meta(self) -> engine_meta.EngineMetadata:
        if self._shared is None:
            raise ConfigError("tensorrt engine: not loaded")
        return self._shared.meta

    def _load(self) -> None:
        import_tensorrt()  # first: the clearest reason on machines without TensorRT
        rt = cudart()
        cuda_call(rt.cudaSetDevice(self.device_id), "cudaSetDevice")
        self._shared = self._deserialize()
        self._shared.users += 1
        self.context = self._shared.engine.create_execution_context()
        if self.context is None:
            raise RuntimeError("TensorRT could not create an execution context (out of device memory?)")
        self._stream = cuda_call(rt.cudaStreamCreateWithFlags(rt.cudaStreamNonBlocking), "cudaStreamCreate")
        self._event = cuda_call(rt.cudaEventCreateWithFlags(rt.cudaEventDisableTiming), "cudaEventCreate")

    def _deserialize(self) -> LoadedPlan:
        import_tensorrt()
        import tensorrt as trt

        expected = engine_meta.Expected(
            tensorrt_version=trt.__version__,
            compute_capability=device_compute_capability(self.device_id),
            precision=self.precision,
            contract=self.contract.to_dict(),
            checkpoint_sha256=self.checkpoint_sha256,
            check_profiles=False,
        )
        plan, meta = engine_meta.load_checked(self.plan_path, expected)  # self.contract came from this sidecar
        logger = make_logger()
        runtime = trt.Runtime(logger)
        engine = runtime.deserialize_cuda_engine(plan)
        if engine is None:
            raise EngineMismatchError(
                f"TensorRT {trt.__version__} could not deserialize {self.plan_path} although its metadata matched "
                "(see the TensorRT log above; plugins missing from the registry?)"
            )
        check_engine_io(engine, self.contract)
        if meta.weights_stripped:
            if self.refit_onnx is None:
                raise ConfigError(f"{self.plan_path} was built weight-stripped: pass refit_onnx= (the ONNX with the weights)")
            engine_meta.check_refit_source(meta, self.refit_onnx, where=str(self.plan_path))
            refit_engine_from_onnx(engine, logger, self.refit_onnx)
        log.info("deserialized %s: TensorRT %s, %s, %s, %d profiles", self.plan_path.name, meta.tensorrt_version,
                 meta.sm, meta.precision, engine.num_optimization_profiles)  # fmt: skip
        return LoadedPlan(trt, logger, runtime, engine, meta)

    # ---- allocate ------------------------------------------------------------------------------
    def _bucket_for(self, dims: Mapping[str, int]) -> ShapeBucket:
        assert self._shared is not None
        bucket = ShapeBucket.of(self.contract, dims)
        full: Dims = bucket.as_dims()
        if self._profile is not None and profile_contains(self.contract, self._profile, full):
            return ShapeBucket(bucket.dims, self._profile)
        with self._shared.lock:
            busy = self._shared.profiles_in_use - ({self._profile} if self._profile is not None else set())
            profile = select_profile(self.contract, full, exclude=sorted(busy))
        return ShapeBucket(bucket.dims, profile)

    def _allocate(self, bucket: ShapeBucket, plan: dict[str, BufferSpec]) -> None:
        assert self._shared is not None and bucket.profile is not None
        rt = cudart()
        ctx: trt.IExecutionContext = self.context
        if bucket.profile != self._profile:
            with self._shared.lock:
                if self._profile is not None:
                    self._shared.profiles_in_use.discard(self._profile)
                self._shared.profiles_in_use.add(bucket.profile)
            if not ctx.set_optimization_profile_async(bucket.profile, int(self._stream)):
                raise RuntimeError(f"set_optimization_profile_async({bucket.profile}) failed")
            self._profile = bucket.profile
        for name, spec in plan.items():
            self._device_buffers[name] = int(cuda_call(rt.cudaMalloc(max(spec.nbytes, 1)), f"cudaMalloc({name})"))
        # TensorRT 11 order: every input shape, then output shapes are known, then addresses.
        for name in self.contract.input_names:
            if not ctx.set_input_shape(name, plan[name].shape):
                raise ShapeError(f"TensorRT rejected input shape {name}={plan[name].shape} for profile {bucket.profile}")
        unresolved = ctx.infer_shapes()
        if unresolved:
            raise ShapeError(f"TensorRT cannot infer shapes of {unresolved} at {bucket}")
        for name in self.contract.output_names:
            dims = ctx.get_tensor_shape(name)
            got = tuple(dims[i] for i in range(len(dims)))
            if got != plan[name].shape:
                raise EngineMismatchError(f"engine output {name} has shape {got} at {bucket}, the contract {plan[name].shape}")
        for name, ptr in self._device_buffers.items():
            if not ctx.set_tensor_address(name, ptr):
                raise RuntimeError(f"set_tensor_address({name}) failed")
        self._host_out = {n: torch.empty(plan[n].shape, dtype=plan[n].dtype) for n in self.contract.output_names}

    # ---- run -----------------------------------------------------------------------------------
    def _write(self, name: str, value: Array) -> None:
        rt = cudart()
        src = as_torch(value).contiguous()
        kind = (
            rt.cudaMemcpyKind.cudaMemcpyDeviceToDevice if src.device.type == "cuda"
            else rt.cudaMemcpyKind.cudaMemcpyHostToDevice
        )  # fmt: skip
        self._staging.append(src)  # keep the source alive until the stream passed the copy
        cuda_call(
            rt.cudaMemcpyAsync(self._device_buffers[name], src.data_ptr(), self._plan[name].nbytes, kind, self._stream),
            f"copy into {name}",
        )

    def _run(self, stream: int | None) -> None:
        own = int(self._stream)
        handle = own if stream is None else int(stream)
        if handle != own:  # the input copies and the profile switch were queued on the engine's stream
            self._stream_wait(handle, own)
        key = self._key()
        if key in self._graphs:
            cuda_call(cudart().cudaGraphLaunch(self._graphs[key][1], handle), "cudaGraphLaunch")
        elif not self.context.execute_async_v3(handle):
            raise RuntimeError(f"execute_async_v3 failed at {self._bucket} (see the TensorRT log)")
        if handle != own:  # output copies and the next writes (engine's stream) come after this run
            self._stream_wait(own, handle)

    def _stream_wait(self, waiter: int, producer: int) -> None:
        """``waiter`` waits for the work queued on ``producer`` so far (one event serves every join:
        cudaStreamWaitEvent waits for the event's latest record at the time of the call)."""
        rt = cudart()
        cuda_call(rt.cudaEventRecord(self._event, producer), "cudaEventRecord")
        cuda_call(rt.cudaStreamWaitEvent(waiter, self._event, 0), "cudaStreamWaitEvent")

    def _key(self) -> tuple[tuple[str, int], ...]:
        assert self._bucket is not None
        return self._bucket.dims

    @property
    def stream_handle(self) -> int:
        return 0 if self._stream is None else int(self._stream)

    @property
    def supports_cuda_graphs(self) -> bool:
        return self.cuda_graphs

    def capture_graph(self) -> int:
        """CUDA graph of one ``execute_async_v3`` at the current bucket (trtexec's recipe: one
        enqueue outside capture flushes lazy initialisation, then a thread-local capture)."""
        if not self.cuda_graphs:
            raise UnavailableError("tensorrt engine: created with cuda_graphs=False")
        self._require(EngineState.ALLOCATED, "capture_graph")
        key = self._key()
        if key not in self._graphs:
            rt = cudart()
            if not self.context.execute_async_v3(int(self._stream)):
                raise RuntimeError("warm-up execute_async_v3 before capture failed")
            cuda_call(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
            mode = rt.cudaStreamCaptureMode.cudaStreamCaptureModeThreadLocal
            cuda_call(rt.cudaStreamBeginCapture(self._stream, mode), "cudaStreamBeginCapture")
            ok = self.context.execute_async_v3(int(self._stream))
            # End the capture before any raise (the stream must leave capture mode), and explain a failed or
            # invalidated capture before cuda_call would report the bare CUDA error.
            err, graph = rt.cudaStreamEndCapture(self._stream)
            if not ok or err == rt.cudaError_t.cudaErrorStreamCaptureInvalidated:
                if err == rt.cudaError_t.cudaSuccess and graph is not None:
                    cuda_call(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
                raise RuntimeError(
                    "execute_async_v3 is not capturable for this engine (weight streaming, data-dependent shapes or a "
                    "JIT plugin?); construct the engine with cuda_graphs=False "
                    f"(execute_async_v3 returned {ok}, cudaStreamEndCapture: {err.name})"
                )
            graph = cuda_call((err, graph), "cudaStreamEndCapture")
            exec_ = cuda_call(rt.cudaGraphInstantiate(graph, 0), "cudaGraphInstantiate")
            self._graphs[key] = (graph, exec_)
            log.info("tensorrt engine: captured a CUDA graph for %s", self._bucket)
        return int(self._graphs[key][1])

    def _sync(self) -> None:
        cuda_call(cudart().cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        self._staging.clear()

    def _outputs(self) -> dict[str, torch.Tensor]:
        """Host copies of the output buffers (D2H on the engine's stream, then a sync)."""
        rt = cudart()
        for name, host in self._host_out.items():
            cuda_call(
                rt.cudaMemcpyAsync(host.data_ptr(), self._device_buffers[name], self._plan[name].nbytes,
                                   rt.cudaMemcpyKind.cudaMemcpyDeviceToHost, self._stream),
                f"copy out of {name}",
            )  # fmt: skip
        self._sync()
        return dict(self._host_out)

    def _pointers(self) -> dict[str, int]:
        return dict(self._device_buffers)

    # ---- release -------------------------------------------------------------------------------
    def _release_buffers(self) -> None:
        rt = cudart()
        if self._stream is not None:
            cuda_call(rt.cudaStreamSynchronize(self._stream), "cudaStreamSynchronize")
        for graph, exec_ in self._graphs.values():
            cuda_call(rt.cudaGraphExecDestroy(exec_), "cudaGraphExecDestroy")
            cuda_call(rt.cudaGraphDestroy(graph), "cudaGraphDestroy")
        self._graphs.clear()
        for ptr in self._device_buffers.values():
            cuda_call(rt.cudaFree(ptr), "cudaFree")
        self._device_buffers, self._host_out, self._staging = {}, {}, []

    def _unload(self) -> None:
        rt = cudart()
        shared = self._shared
        self.context = None  # reverse order: contexts -> engine -> runtime
        if self._event is not None:
            cuda_call(rt.cudaEventDestroy(self._event), "cudaEventDestroy")
            self._event = None
        if self._stream is not None:
            cuda_call(rt.cudaStreamDestroy(self._stream), "cudaStreamDestroy")
            self._stream = None
        if shared is not None:
            with shared.lock:
                if self._profile is not None:
                    shared.profiles_in_use.discard(self._profile)
                shared.users -= 1
                last = shared.users == 0
            if last:
                shared.engine = None
                shared.runtime = None
        self._profile = None
        self._shared = None

