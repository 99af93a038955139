"""TorchEngine: the Engine interface over the eager :class:`~javisrt.engine.model.JavisDiT`.

The CPU reference of every compiled engine: same contract I/O (the RoPE tables are inputs, as in
the exported graph), op sets ``"torch"`` (any device), ``"triton"`` or ``"triton-fp8"`` (CUDA; the latter
with its calibrated scales, prepared on load), any generation mode the
network supports (t2av, t2a, t2v: one contract per mode, :meth:`TorchEngine.for_mode` shares the
model), and, on a GPU, optional CUDA-graph capture per shape bucket (captured on the first run of a
bucket after one warm-up run; :meth:`TorchEngine.capture_graph` also hands the ``cudaGraphExec_t`` to
the C++ loop).
"""

from __future__ import annotations

import logging
import os
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from javisrt.engine.config import GenerationMode
from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.engine.model import JavisDiT, Numerics
from javisrt.export.contract import (
    AUDIO,
    CONTEXT,
    MODALITY_IO,
    ROPE_COS,
    ROPE_SIN,
    TIMESTEP,
    VIDEO,
    VIDEO_FRAMES,
    DiTContract,
)
from javisrt.runtime.engine import Array, BufferSpec, Engine, ShapeBucket, as_torch

log = logging.getLogger(__name__)

TRITON_FP8_OPS = "triton-fp8"  # the op set built from calibrated scales (kernels/ops_triton_fp8.py)


def velocity_outputs(video: torch.Tensor | None, audio: torch.Tensor | None) -> dict[str, torch.Tensor]:
    """The model's (video, audio) velocities under the contract's output names; absent modalities omitted."""
    return {name: v for (_, name), v in zip(MODALITY_IO, (video, audio), strict=True) if v is not None}


def contract_forward(model: JavisDiT, inputs: Mapping[str, torch.Tensor], video_frames: int) -> dict[str, torch.Tensor]:
    """One denoiser call with the export contract's I/O names (fp32 in, fp32 out).

    The stages of :meth:`JavisDiT.forward`, with the TA-RoPE tables taken from the inputs
    (``rope_cos`` / ``rope_sin``) exactly as in the exported graph; ``video_frames`` is the video's
    latent frame count (read by the audio-only forward for the TA-RoPE time axis).
    """
    video = inputs.get(VIDEO)
    emb = model.embed(
        video, inputs.get(AUDIO), inputs[TIMESTEP], inputs[CONTEXT],
        video_latent_frames=None if video is not None else video_frames,
    )  # fmt: skip
    x = model.transformer(emb, (inputs[ROPE_COS], inputs[ROPE_SIN]))
    return velocity_outputs(*model.heads(x, emb.e, emb.grid))


class TorchEngine(Engine):
    """Eager torch (optionally with the Triton kernels and per-bucket CUDA graphs).

    ``model``: a built :class:`JavisDiT` (``create_engine("torch", checkpoint=...)`` loads one);
    ``load`` moves it to ``device`` with the op set ``ops`` (and ``numerics`` when given). ``mode``: what
    the engine generates (default: every modality of the network). ``fp8_scales``: the per-tensor scales
    of ``ops="triton-fp8"`` (``runtime/fp8_scales.Fp8Scales.scales``), required by it and by it only; the
    op set is prepared from them and the model's weights on load, after the move and the numerics.
    ``fp8_linear``: that op set's attention-Linear implementation (``kernels/ops_triton_fp8.LINEAR_IMPLS``:
    scaled_mm or triton; None: its default), ``ops="triton-fp8"`` only.
    """

    name = "torch"

    def __init__(
        self,
        model: JavisDiT,
        *,
        mode: GenerationMode | str | None = None,
        ops: str = "torch",
        numerics: Numerics | str | None = None,
        device: torch.device | str = "cpu",
        cuda_graphs: bool = False,
        parallel: Any = None,
        fp8_scales: Mapping[str, torch.Tensor] | None = None,
        fp8_linear: str | None = None,
    ) -> None:
        super().__init__(DiTContract.for_config(model.cfg, mode=mode))
        if (ops == TRITON_FP8_OPS) != (fp8_scales is not None):
            raise ConfigError(
                f"the {TRITON_FP8_OPS} op set needs its FP8 scales (fp8_scales=, --fp8-scales)" if ops == TRITON_FP8_OPS
                else f"FP8 scales apply to the {TRITON_FP8_OPS} op set only, not {ops!r}"
            )
        if fp8_linear is not None:
            if ops != TRITON_FP8_OPS:
                raise ConfigError(f"the FP8 Linear implementation (--fp8-linear) applies to the {TRITON_FP8_OPS} op set only, not {ops!r}")
            from javisrt.kernels.ops_triton_fp8 import check_linear_impl

            check_linear_impl(fp8_linear)
        self._fp8_scales = fp8_scales
        self._fp8_linear = fp8_linear
        self._fp8_ops: Any = None  # the prepared triton-fp8 op set (shared with for_mode's engines: one e4m3 copy)
        # A runtime.parallel.ParallelContext with cfg=2 and/or sp>1: the forward runs over the ranks
        # (runtime/backends/torch_parallel.py); None: this process alone.
        self.parallel = parallel
        if parallel is not None:
            from javisrt.runtime.backends.torch_parallel import check_parallel

            check_parallel(model, parallel)
        self._device = torch.device(device)
        if cuda_graphs and self._device.type != "cuda":
            raise ConfigError(f"cuda_graphs=True needs a CUDA device, got {self._device}")
        # ops "triton" on a CPU device runs only under Triton's interpreter (TRITON_INTERPRET=1, as the tests
        # set it); otherwise Triton itself refuses the CPU tensors.
        self._model_arg = model
        self._ops = ops
        # None: the model keeps its numerics.
        self._numerics = None if numerics is None else Numerics(numerics)
        self.cuda_graphs = cuda_graphs
        self.model: JavisDiT | None = None
        self._buffers: dict[str, torch.Tensor] = {}
        self._stream: Any = None  # torch.cuda.Stream on CUDA
        self._graphs: dict[tuple[tuple[str, int], ...], Any] = {}  # bucket dims -> torch.cuda.CUDAGraph
        self._warm: set[tuple[tuple[str, int], ...]] = set()

    @property
    def device(self) -> torch.device:
        return self._device

    # ---- hooks ---------------------------------------------------------------------------------
    def _load(self) -> None:
        if self._device.type == "cuda" and not torch.cuda.is_available():
            raise UnavailableError(f"torch engine on {self._device}: no CUDA device is available")
        model = self._model_arg.to(self._device)
        if self._numerics is not None and model.numerics is not self._numerics:
            model.set_numerics(self._numerics)
        if self._fp8_scales is not None:
            from javisrt.kernels.ops_triton_fp8 import DEFAULT_LINEAR_IMPL, TritonFp8Ops

            if self._fp8_ops is None:  # e4m3 weights on the device
                impl = self._fp8_linear if self._fp8_linear is not None else DEFAULT_LINEAR_IMPL
                self._fp8_ops = TritonFp8Ops.prepare(model, self._fp8_scales, linear_impl=impl)
            model.set_ops(self._fp8_ops)
        else:
            model.set_ops(self._ops)
        self.model = model.requires_grad_(False).eval()
        if self._device.type == "cuda":
            self._stream = torch.cuda.Stream(self._device)

    def _allocate(self, bucket: ShapeBucket, plan: dict[str, BufferSpec]) -> None:
        self._buffers = {n: torch.zeros(s.shape, dtype=s.dtype, device=self._device) for n, s in plan.items()}

    def _write(self, name: str, value: Array) -> None:
        src = as_torch(value)
        if self._stream is not None:
            with torch.cuda.stream(self._stream):
                self._buffers[name].copy_(src, non_blocking=True)
        else:
            self._buffers[name].copy_(src)

    def _forward_into_outputs(self) -> None:
        assert self.model is not None and self.bucket is not None
        with torch.inference_mode():
            inputs = {n: self._buffers[n] for n in self.contract.input_names}
            frames = self.bucket.as_dims()[VIDEO_FRAMES]
            if self.parallel is None:
                out = contract_forward(self.model, inputs, frames)
            else:
                from javisrt.runtime.backends.torch_parallel import parallel_contract_forward

                out = parallel_contract_forward(self.model, inputs, frames, self.parallel)
            for name in self.contract.output_names:
                self._buffers[name].copy_(out[name])

    def _run(self, stream: int | None) -> None:
        if self._stream is None:
            self._forward_into_outputs()
            return
        run_stream = self._stream if stream is None else torch.cuda.ExternalStream(stream, device=self._device)
        key = self._current_key()
        with torch.cuda.stream(run_stream):
            graph = self._graphs.get(key)
            if graph is not None:
                graph.replay()
            elif self.cuda_graphs and key in self._warm:
                self.capture_graph()
                self._graphs[key].replay()
            else:
                self._forward_into_outputs()
                self._warm.add(key)

    def _current_key(self) -> tuple[tuple[str, int], ...]:
        assert self._bucket is not None
        return self._bucket.dims

    @property
    def supports_cuda_graphs(self) -> bool:
        return self.cuda_graphs and self._device.type == "cuda"

    def for_mode(self, mode: GenerationMode | str) -> TorchEngine:
        """Another torch engine on the same model (same device, ops, numerics) generating ``mode``."""
        if GenerationMode(mode) is self.contract.mode:
            return self
        other = TorchEngine(
            self._model_arg, mode=mode, ops=self._ops, numerics=self._numerics, device=self._device,
            cuda_graphs=self.cuda_graphs, parallel=self.parallel, fp8_scales=self._fp8_scales,
            fp8_linear=self._fp8_linear,
        )  # fmt: skip
        other._fp8_ops = self._fp8_ops
        if self.state is not self.state.UNLOADED:
            other.load()
        return other

    def capture_graph(self) -> int:
        """Capture the current bucket's forward as a CUDA graph (after a warm-up run); its exec handle."""
        if not self.cuda_graphs or self._stream is None:
            raise UnavailableError("torch engine: CUDA-graph capture needs device='cuda' and cuda_graphs=True")
        self._require_allocated()
        key = self._current_key()
        if key not in self._graphs:
            with torch.cuda.stream(self._stream):
                if key not in self._warm:  # lazy init (cuBLAS handles, Triton JIT) must not be captured
                    self._forward_into_outputs()
                    self._warm.add(key)
            self._stream.synchronize()
            graph = torch.cuda.CUDAGraph(keep_graph=True)
            with torch.cuda.graph(graph, stream=self._stream):
                self._forward_into_outputs()
            graph.instantiate()
            self._graphs[key] = graph
            log.info("torch engine: captured a CUDA graph for %s", self._bucket)
        return int(self._graphs[key].raw_cuda_graph_exec())

    def _require_allocated(self) -> None:
        if self._bucket is None:
            raise ConfigError("torch engine: capture_graph() before allocate(dims)")

    @property
    def stream_handle(self) -> int:
        return 0 if self._stream is None else int(self._stream.cuda_stream)

    def _sync(self) -> None:
        if self._stream is not None:
            self._stream.synchronize()

    def _outputs(self) -> dict[str, torch.Tensor]:
        return {n: self._buffers[n] for n in self.contract.output_names}

    def _pointers(self) -> dict[str, int]:
        return {n: int(t.data_ptr()) for n, t in self._buffers.items()}

    def _release_buffers(self) -> None:
        # Graphs hold the buffers' addresses: they die with them.
        self._graphs.clear()
        self._warm.clear()
        self._buffers = {}

    def _unload(self) -> None:
        self.model = None
        self._stream = None
        if self._device.type == "cuda":
            torch.cuda.empty_cache()

