"""OnnxRuntimeEngine: the Engine interface over an exported ONNX graph in ONNX Runtime.

The contract (names, shapes, mode, network config) comes from the graph's own metadata
(``javisrt.contract``, written by the export): no eager model is built.

CPU by default; the CUDA execution provider where it is installed (``providers=("cuda",)``).
I/O goes through an ``IOBinding`` onto the engine's own persistent torch buffers, so the output
buffers are written in place exactly like the TensorRT engine's (no per-run allocation).

Two ORT facts this backend applies (shared/feasibility.md §3-4):
* ORT's graph optimisations miscompute FP8 Q/DQ graphs: a graph with float8 Q/DQ runs with
  ``ORT_DISABLE_ALL``.
* ORT CPU has no bf16 kernels: a BF16 graph on the CPU provider fails at session creation; the
  error says to run the fp32 (or an fp32/fp16 copy of the FP8) export on CPU.
Custom-domain plugin nodes (``javisrt::*``) need their CPU reference ops registered through
``register_custom_ops`` (e.g. onnxruntime-extensions PyOps, domain ``ai.onnx.contrib``).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import onnx
import torch

from javisrt.engine.errors import ConfigError, EngineMismatchError, UnavailableError
from javisrt.export.fp8_rules import has_float8_qdq
from javisrt.export.onnx import contract_of
from javisrt.runtime.engine import Array, BufferSpec, Engine, ShapeBucket, as_torch

log = logging.getLogger(__name__)

PROVIDERS = {"cpu": "CPUExecutionProvider", "cuda": "CUDAExecutionProvider"}



def _numpy_dtype(dtype: torch.dtype) -> Any:
    return torch.empty((), dtype=dtype).numpy().dtype


class OnnxRuntimeEngine(Engine):
    """ONNX Runtime on CPU (or the CUDA EP) behind the Engine interface."""

    name = "onnxruntime"

    def __init__(
        self,
        onnx_path: str | os.PathLike[str],
        *,
        providers: Sequence[str] = ("cpu",),
        device_id: int = 0,
        intra_op_threads: int = 0,
        register_custom_ops: Callable[[Any], None] | None = None,
        profile_prefix: str | os.PathLike[str] | None = None,
    ) -> None:
        unknown = [p for p in providers if p not in PROVIDERS]
        if not providers or unknown:
            raise ConfigError(f"providers must be a non-empty subset of {sorted(PROVIDERS)}, got {list(providers)}")
        self.onnx_path = Path(onnx_path)
        if not self.onnx_path.is_file():
            raise ConfigError(f"ONNX file {self.onnx_path} does not exist")
        proto = onnx.load(str(self.onnx_path), load_external_data=False)  # not kept: ORT reads the file itself
        super().__init__(contract_of(proto))
        self.fp8 = has_float8_qdq(proto)
        del proto
        self.providers = tuple(providers)
        self.device_id = device_id
        self.intra_op_threads = intra_op_threads
        self._register_custom_ops = register_custom_ops
        # ORT session profiling (a Chrome-trace JSON with one event per node run), for the benchmark's
        # per-layer profile; ``end_profiling()`` returns the file.
        self.profile_prefix = None if profile_prefix is None else str(profile_prefix)
        self._device = torch.device("cuda", device_id) if self.providers[0] == "cuda" else torch.device("cpu")
        self.session: Any = None
        self._binding: Any = None
        self._buffers: dict[str, torch.Tensor] = {}

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- hooks ---------------------------------------------------------------------------------
    def _load(self) -> None:
        import onnxruntime as ort

        available = set(ort.get_available_providers())
        wanted = [PROVIDERS[p] for p in self.providers]
        missing = [p for p in wanted if p not in available]
        if missing:
            raise UnavailableError(
                f"ONNX Runtime providers {missing} are not available here (have {sorted(available)}); "
                "the CUDA provider needs the onnxruntime-gpu build and a GPU"
            )
        opts = ort.SessionOptions()
        if self.fp8:
            # ORT's optimisers fold/fuse float8 Q/DQ wrongly on CPU (feasibility.md §3): run them verbatim.
            opts.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
            log.info("%s has float8 Q/DQ: ORT graph optimisations disabled", self.onnx_path.name)
        if self.intra_op_threads:
            opts.intra_op_num_threads = self.intra_op_threads
        if self.profile_prefix is not None:
            opts.enable_profiling = True
            opts.profile_file_prefix = self.profile_prefix
        if self._register_custom_ops is not None:
            self._register_custom_ops(opts)
        provider_args: list[Any] = [
            (PROVIDERS[p], {"device_id": self.device_id}) if p == "cuda" else PROVIDERS[p] for p in self.providers
        ]
        try:
            self.session = ort.InferenceSession(str(self.onnx_path), sess_options=opts, providers=provider_args)
        except Exception as exc:  # ORT raises its own exception types (Fail, NotImplemented, ...)
            hint = ""
            if "bfloat16" in str(exc).lower() or "NOT_IMPLEMENTED" in str(exc):
                hint = " (ORT CPU has no bf16 kernels: run the fp32 export, or an fp32/fp16 copy of the FP8 one)"
            raise UnavailableError(f"ONNX Runtime cannot create a session for {self.onnx_path}: {exc}{hint}") from exc
        self._check_io()

    def end_profiling(self) -> Path:
        """Stop ORT's session profiling and return its trace file (needs ``profile_prefix``)."""
        if self.session is None or self.profile_prefix is None:
            raise ConfigError("ORT profiling was not enabled: create the engine with profile_prefix=")
        return Path(self.session.end_profiling())

    def _check_io(self) -> None:
        got_in = [i.name for i in self.session.get_inputs()]
        got_out = [o.name for o in self.session.get_outputs()]
        if got_in != self.contract.input_names or got_out != self.contract.output_names:
            raise EngineMismatchError(
                f"{self.onnx_path}: graph I/O {got_in} -> {got_out} does not match the export contract "
                f"{self.contract.input_names} -> {self.contract.output_names} (exported for another model/version?)"
            )
        want = {"float32": "tensor(float)"}
        for arg in (*self.session.get_inputs(), *self.session.get_outputs()):
            dtype = self.contract.spec(arg.name).dtype
            if want.get(dtype) != arg.type:
                raise EngineMismatchError(f"{self.onnx_path}: {arg.name} is {arg.type}, the contract says {dtype}")

    def _allocate(self, bucket: ShapeBucket, plan: dict[str, BufferSpec]) -> None:
        self._buffers = {n: torch.zeros(s.shape, dtype=s.dtype, device=self._device) for n, s in plan.items()}
        binding = self.session.io_binding()
        where = "cuda" if self._device.type == "cuda" else "cpu"
        for name, spec in plan.items():
            t = self._buffers[name]
            bind = binding.bind_input if spec.is_input else binding.bind_output
            bind(name, where, self.device_id if where == "cuda" else 0, _numpy_dtype(spec.dtype), list(spec.shape), t.data_ptr())
        self._binding = binding

    def _write(self, name: str, value: Array) -> None:
        self._buffers[name].copy_(as_torch(value))

    def _run(self, stream: int | None) -> None:
        if stream not in (None, 0):
            raise NotImplementedError(
                "the onnxruntime engine runs on ORT's own stream; enqueue on a caller's CUDA stream is not implemented "
                "(use the torch or tensorrt engine for the CUDA sampling loop)"
            )
        if self._device.type == "cuda":
            torch.cuda.synchronize(self._device)  # inputs were copied on torch's stream
        self.session.run_with_iobinding(self._binding)

    def _sync(self) -> None:
        if self._device.type == "cuda":
            self._binding.synchronize_outputs()

    def _outputs(self) -> dict[str, torch.Tensor]:
        return {n: self._buffers[n] for n in self.contract.output_names}

    def _pointers(self) -> dict[str, int]:
        return {n: int(t.data_ptr()) for n, t in self._buffers.items()}

    def _release_buffers(self) -> None:
        if self._binding is not None:
            self._binding.clear_binding_inputs()
            self._binding.clear_binding_outputs()
        self._binding = None
        self._buffers = {}

    def _unload(self) -> None:
        self.session = None

