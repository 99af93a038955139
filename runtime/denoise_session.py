"""DenoiseSession: the per-request state of one denoising run on an :class:`~javisrt.runtime.engine.Engine`.

One object owns what stays constant over the steps of a request and how the sampling loop reaches
the engine; the pipeline, FP8 calibration, the benchmark and the tests all use it::

    session = DenoiseSession(engine, context, latent_shapes, mask=mask, video_frames=T)
    velocities = session(latents, timesteps)           # torch in, torch out (views of the engine's buffers)
    _sampler.sample(latents, session.host_denoiser(), config)              # host loop (numpy hand-off)
    result = session.sample(noise, sampler_config, progress, cancel)   # host or CUDA loop, by choose_loop
    session.loop_binding().run(latents, config)       # the CUDA loop itself (javisrt._sampler.sample_cuda)


On construction it allocates the engine's shape bucket for the CFG batch and writes the static inputs
once: the text ``context`` ([2B, Lt, D], cond half first) with masked positions zeroed and zero-padded to
the contract's ``text_len`` (model-spec §3.1), and the TA-RoPE tables of the bucket (one cache for the
whole process, :func:`rope_tables`). Each step then writes only the latents and the timesteps.

:meth:`DenoiseSession.sample` runs a whole denoising pass on the loop :func:`choose_loop` picks: on a
CUDA engine the **device loop** (``_sampler.sample_cuda``: latents, CFG batch and velocities stay in
the engine's static device buffers; the whole CFG step -- the DiT over both halves -- is one CUDA graph
per shape bucket replayed by the loop, or, where the engine cannot capture
(``engine.supports_cuda_graphs`` False), an enqueue callback on the loop's stream; no host sync or copy
inside a step), elsewhere the **host loop** (``_sampler.sample``, numpy hand-off).
"""

from __future__ import annotations

import enum
import functools
import logging
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from javisrt.engine.errors import ConfigError, ShapeError, UnavailableError
from javisrt.export.contract import BATCH, CONTEXT, ROPE_COS, ROPE_SIN, TIMESTEP, Dims, DiTContract
from javisrt.runtime import sampling
from javisrt.runtime.engine import Array, Engine, EngineState, buffer_plan

log = logging.getLogger(__name__)


class DenoiseLoop(enum.StrEnum):
    """Which sampling loop runs a request: ``auto`` (device on a CUDA engine, else host), ``host``
    (``_sampler.sample``: numpy hand-off each step; the CPU path), ``device`` (``_sampler.sample_cuda``)."""

    AUTO = "auto"
    HOST = "host"
    DEVICE = "device"


def choose_loop(engine: Engine, loop: DenoiseLoop | str = DenoiseLoop.AUTO) -> DenoiseLoop:
    """The loop (HOST or DEVICE) that runs a request on ``engine``.

    ``auto``: DEVICE on a CUDA engine when the extension was built with nvcc; on a CUDA engine without
    it, HOST with a warning naming the reason; HOST elsewhere. ``device`` raises where it cannot run
    (:class:`ConfigError` for a non-CUDA engine, :class:`UnavailableError` without a CUDA-built loop).
    """
    try:
        loop = DenoiseLoop(loop)
    except ValueError:
        raise ConfigError(f"unknown sampling loop {loop!r}; choose one of {[m.value for m in DenoiseLoop]}") from None
    if loop is DenoiseLoop.HOST:
        return loop
    on_cuda = engine.device.type == "cuda"
    if loop is DenoiseLoop.DEVICE and not on_cuda:
        raise ConfigError(f"the device sampling loop runs on a CUDA engine; the {engine.name} engine is on {engine.device}")
    if not on_cuda:
        return DenoiseLoop.HOST
    reason = sampling.device_loop_error()
    if reason and loop is DenoiseLoop.DEVICE:
        raise UnavailableError(f"the device sampling loop cannot run: {reason}")
    if reason:
        log.warning("CUDA engine, but the device sampling loop cannot run (%s): using the host loop, one "
                    "device<->host copy per step", reason)  # fmt: skip
        return DenoiseLoop.HOST
    return DenoiseLoop.DEVICE


@dataclass(frozen=True)
class DenoiseResult:
    """One denoising pass: the final latents ([B, ...] fp32 torch tensors, video first; on the engine's
    device for the device loop, on the CPU for the host loop), which loop ran and whether a CUDA graph
    was replayed, per-step wall times (the loop's own), and ``cancelled``."""

    latents: list[torch.Tensor]
    steps_done: int
    step_times_s: list[float]
    cancelled: bool
    loop: DenoiseLoop
    graph: bool
    seconds: float


@functools.lru_cache(maxsize=16)
def _rope_tables(contract: DiTContract, dims: tuple[tuple[str, int], ...]) -> tuple[torch.Tensor, torch.Tensor]:
    return contract.rope_tables(dict(dims))


def rope_tables(contract: DiTContract, dims: Mapping[str, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """TA-RoPE (cos, sin) of ``dims`` on the CPU, built once per (contract, shape) for the process."""
    key = tuple(sorted((k, int(dims[k])) for k in contract.free_dims))
    return _rope_tables(contract, key)


def padded_context(contract: DiTContract, context: torch.Tensor, mask: torch.Tensor | None = None) -> torch.Tensor:
    """``context`` [N, Lt, D] as the contract's fp32 [N, text_len, D]: masked positions zeroed, zero-padded."""
    cfg = contract.config
    if context.ndim != 3 or context.shape[2] != cfg.text_dim:
        raise ShapeError(f"context must be [batch, tokens, {cfg.text_dim}], got {tuple(context.shape)}")
    ctx = context.float()
    if mask is not None:
        if tuple(mask.shape) != tuple(ctx.shape[:2]):
            raise ShapeError(f"context mask {tuple(mask.shape)} != context tokens {tuple(ctx.shape[:2])}")
        ctx = ctx * mask.to(device=ctx.device, dtype=ctx.dtype).unsqueeze(-1)
    pad = cfg.text_len - ctx.shape[1]
    if pad < 0:
        raise ShapeError(f"context has {ctx.shape[1]} tokens > text_len {cfg.text_len}")
    return torch.nn.functional.pad(ctx, (0, 0, 0, pad)) if pad else ctx


def request_dims(
    contract: DiTContract, batch: int, latent_shapes: Mapping[str, Sequence[int]], video_frames: int | None = None
) -> Dims:
    """The contract dims of a request: ``latent_shapes`` are per-sample ([C, ...], no batch) or batched
    shapes of the generated modalities; ``batch`` is the engine batch (2B with CFG)."""
    missing = [name for name, _ in contract.modality_io if name not in latent_shapes]
    extra = [name for name in latent_shapes if name not in dict(contract.modality_io)]
    if missing or extra:
        raise ShapeError(
            f"the {contract.mode.value} engine generates {[n for n, _ in contract.modality_io]}; "
            f"got latents {sorted(latent_shapes)}"
        )
    batched: dict[str, tuple[int, ...]] = {}
    for name, shape in latent_shapes.items():
        full = tuple(int(s) for s in shape)
        rank = len(contract.spec(name).shape)
        if len(full) == rank - 1:
            full = (batch, *full)
        elif len(full) != rank:
            raise ShapeError(f"latent {name}: shape {full} has neither rank {rank - 1} nor {rank}")
        batched[name] = full
    dims = contract.dims_of(batched, video_frames=video_frames)
    dims[BATCH] = int(batch)
    return dims


class DenoiseSession:
    """One request on an engine: static inputs bound once, latents and timesteps per step."""

    def __init__(
        self,
        engine: Engine,
        context: torch.Tensor,
        latent_shapes: Mapping[str, Sequence[int]],
        *,
        mask: torch.Tensor | None = None,
        video_frames: int | None = None,
    ) -> None:
        if engine.state is EngineState.UNLOADED:
            raise ConfigError(f"{engine.name} engine: load() it (create_engine does) before a request")
        self.engine = engine
        contract = engine.contract
        self.io = contract.modality_io
        self.dims = request_dims(contract, context.shape[0], latent_shapes, video_frames)
        self.bucket = engine.allocate(self.dims)
        cos, sin = rope_tables(contract, self.dims)
        engine.write_inputs({CONTEXT: padded_context(contract, context, mask), ROPE_COS: cos, ROPE_SIN: sin})
        self.calls = 0

    @property
    def latent_names(self) -> list[str]:
        return [name for name, _ in self.io]

    # ---- torch hand-off ------------------------------------------------------------------------
    def __call__(self, latents: Sequence[Array], timesteps: Array) -> list[torch.Tensor]:
        """Velocities for the CFG batch ``latents`` (one [2B, ...] per modality, video first) at
        ``timesteps`` [2B]; views of the engine's output buffers, valid until the next call."""
        if len(latents) != len(self.io):
            raise ShapeError(f"got {len(latents)} latents for modalities {self.latent_names}")
        feed: dict[str, Array] = {name: x for (name, _), x in zip(self.io, latents, strict=True)}
        feed[TIMESTEP] = timesteps
        outs = self.engine.infer(feed)
        self.calls += 1
        return [outs[out_name] for _, out_name in self.io]

    # ---- host sampling loop (javisrt._sampler.sample) ------------------------------------------
    def host_denoiser(self) -> Callable[[Sequence[np.ndarray], np.ndarray], list[np.ndarray]]:
        """The ``denoiser(inputs, timesteps)`` callback of ``javisrt._sampler.sample``: float32 numpy
        in and out (on CPU the outputs are views of the engine's buffers, valid until the next call —
        what the loop expects; a GPU engine pays one device-to-host copy per step here, which the
        CUDA loop avoids)."""

        def denoiser(inputs: Sequence[np.ndarray], timesteps: np.ndarray) -> list[np.ndarray]:
            return [_to_numpy(v) for v in self(inputs, timesteps)]

        return denoiser

    # ---- a whole denoising pass ----------------------------------------------------------------
    def sample(
        self,
        latents: Sequence[Array],
        config: sampling.SamplerConfig,
        progress: sampling.Progress | None = None,
        cancel: sampling.Cancel | None = None,
        loop: DenoiseLoop | str = DenoiseLoop.AUTO,
    ) -> DenoiseResult:
        """Denoise ``latents`` (one [B, ...] noise tensor per modality, video first; not modified) with
        ``config`` on the loop :func:`choose_loop` picks. ``progress(done, total, t, seconds)`` after
        each step and ``cancel()`` before each step, on both loops."""
        chosen = choose_loop(self.engine, loop)
        if len(latents) != len(self.io):
            raise ShapeError(f"got {len(latents)} latents for modalities {self.latent_names}")
        t0 = time.perf_counter()
        if chosen is DenoiseLoop.HOST:
            arrays = [_to_numpy(torch.as_tensor(x).detach().float().contiguous()) for x in latents]
            res = sampling.sample(arrays, self.host_denoiser(), config, progress, cancel)
            final = [torch.from_numpy(np.asarray(x)) for x in res.latents]
            graph = False
        else:
            final, res, graph = self._sample_on_device(latents, config, progress, cancel)
        return DenoiseResult(
            final, res.steps_done, list(res.step_times_s), res.cancelled, chosen, graph, time.perf_counter() - t0
        )

    def _sample_on_device(
        self,
        latents: Sequence[Array],
        config: sampling.SamplerConfig,
        progress: sampling.Progress | None,
        cancel: sampling.Cancel | None,
    ) -> tuple[list[torch.Tensor], sampling.SampleResult, bool]:
        engine = self.engine
        dev = engine.device
        plan = buffer_plan(engine.contract, self.bucket.as_dims())
        half = self.bucket.batch // 2
        xs = []
        for (name, _), x in zip(self.io, latents, strict=True):
            want = (half, *plan[name].shape[1:])
            if tuple(x.shape) != want:
                raise ShapeError(f"latent {name}: shape {tuple(x.shape)} != the session's {want} (one CFG half)")
            # fp32, contiguous, on the engine's device, and a copy: the loop updates it in place.
            xs.append(torch.as_tensor(x).detach().to(device=dev, dtype=torch.float32).clone(memory_format=torch.contiguous_format))
        binding = self.loop_binding(use_graph=engine.supports_cuda_graphs)
        # run() makes the loop's stream wait on torch's current stream (the noise copies and buffer
        # writes queued there) and synchronizes its own stream before returning.
        res = binding.run(xs, config, progress, cancel)
        return xs, res, bool(binding.graph_exec)

    # ---- CUDA sampling loop (javisrt._sampler.sample_cuda) -------------------------------------
    def loop_binding(self, use_graph: bool = False) -> LoopBinding:
        """The engine's bound buffers, stream and (optionally) captured graph for the C++ CUDA loop,
        which writes latents and timesteps straight into the bound device buffers each step."""
        engine = self.engine
        if engine.bucket != self.bucket:
            raise ConfigError("the engine was re-allocated for another request since this session started")
        batch2 = self.bucket.batch
        if batch2 % 2:
            raise ShapeError(f"the sampling loop runs the CFG batch [cond; uncond]: engine batch must be even, got {batch2}")
        plan = buffer_plan(engine.contract, self.bucket.as_dims())
        ptr = engine.buffer_pointers()
        engine.mark_written([*self.latent_names, TIMESTEP])
        graph = engine.capture_graph() if use_graph else 0
        generation = engine.buffer_generation

        def enqueue(step: int, stream: int) -> None:
            _check_live(engine, generation)  # a hook may have re-allocated the engine mid-loop
            engine.enqueue(stream)

        return LoopBinding(
            inputs=tuple(ptr[i] for i, _ in self.io),
            outputs=tuple(ptr[o] for _, o in self.io),
            numels=tuple(plan[i].numel // 2 for i, _ in self.io),
            timesteps=ptr[TIMESTEP],
            batch=batch2 // 2,
            stream=engine.stream_handle,
            graph_exec=graph,
            enqueue=enqueue,
            device=engine.device,
            engine=engine,
            generation=generation,
        )


def _check_live(engine: Engine, generation: int) -> None:
    if engine.buffer_generation != generation or engine.state is not EngineState.ALLOCATED:
        raise ConfigError(
            "this loop binding's buffers and graph were released (the engine was re-allocated or unloaded); "
            "take a new binding"
        )


def _to_numpy(t: torch.Tensor) -> np.ndarray:
    if t.device.type != "cpu":
        t = t.cpu()
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
    engine: Engine
    generation: int  # the engine's buffer_generation when the pointers were taken

    def check_live(self) -> None:
        """ConfigError when the engine released the buffers and graph this binding points at
        (``allocate`` of other dims, ``unload``): its raw pointers and graph handle are dead then."""
        _check_live(self.engine, self.generation)

    def check_latents(self, latents: Sequence[torch.Tensor]) -> None:
        """The latents ``sample_cuda`` updates in place by pointer: one [B, ...] float32 contiguous tensor
        per modality on the engine's device with the binding's element count (ShapeError otherwise)."""
        if len(latents) != len(self.numels):
            raise ShapeError(f"got {len(latents)} latents for {len(self.numels)} modalities")
        for k, (x, numel) in enumerate(zip(latents, self.numels, strict=True)):
            if not isinstance(x, torch.Tensor):
                raise ShapeError(f"latent {k}: expected a torch.Tensor, got {type(x).__name__}")
            if x.dtype != torch.float32:
                raise ShapeError(f"latent {k}: dtype {x.dtype}, the loop updates float32 latents in place")
            if not x.is_contiguous():
                raise ShapeError(f"latent {k}: not contiguous (the loop addresses it as one flat buffer)")
            if x.device != self.device:
                raise ShapeError(f"latent {k} is on {x.device}, the engine's buffers on {self.device}")
            if x.numel() != numel:
                raise ShapeError(f"latent {k}: {x.numel()} elements, the bound buffers hold {numel} per CFG half")

    def sample_cuda_kwargs(self) -> dict[str, Any]:
        """Keyword arguments of ``_sampler.sample_cuda`` except latents and config; ``wait_stream`` is
        torch's current stream on the engine's device, so the loop starts after the work queued there
        (``torch.randn`` latents, buffer zeroing, copies)."""
        self.check_live()
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
            "wait_stream": int(torch.cuda.current_stream(self.device).cuda_stream),
        }

    def run(
        self,
        latents: Sequence[torch.Tensor],
        config: Any,
        progress: Callable[[int, int, float, float], None] | None = None,
        cancel: Callable[[], bool] | None = None,
        max_inflight: int = 2,
    ) -> Any:
        """``_sampler.sample_cuda`` over this binding: ``latents`` (checked by :meth:`check_latents`) are
        updated in place; returns the loop's SampleResult. The hooks are followed by a liveness check, so
        a hook that re-allocates or unloads the engine stops the loop with ConfigError instead of letting
        it write freed buffers."""
        self.check_live()
        self.check_latents(latents)
        kwargs = self.sample_cuda_kwargs()

        def progress_checked(done: int, total: int, t: float, secs: float) -> None:
            if progress is not None:
                progress(done, total, t, secs)
            self.check_live()

        def cancel_checked() -> bool:
            stop = bool(cancel()) if cancel is not None else False
            self.check_live()
            return stop

        return sampling.sample_cuda(
            [int(x.data_ptr()) for x in latents], config,
            progress=progress_checked, cancel=cancel_checked, max_inflight=max_inflight, **kwargs,
        )  # fmt: skip
