"""javisrt.runtime.backends: the one seam where the DiT implementation is chosen.

Every backend implements the small :class:`PipelineBackend` protocol that the pipeline drives:
``load``, ``allocate(shapes)``, ``infer(inputs) -> outputs``, ``unload``. It is the pipeline-facing
face of the contract-level :class:`javisrt.runtime.engine.Engine` (RoPE tables as inputs, shape
buckets, device buffers, the C++-loop hand-off): every backend but the eager ``torch`` one is a
contract Engine wrapped by ``runtime/engine.py``'s ``PipelineEngine``. Tensor names follow the export
contract (``export/contract.py``): inputs ``video`` [2B,16,T,H8,W8], ``audio`` [2B,8,Tm4,16],
``timestep`` [2B], ``context`` [2B,text_len,text_dim] (zero-padded, masked positions zeroed);
outputs ``video_velocity`` / ``audio_velocity`` (fp32, the RF velocity x0 - noise). A modality that
is not generated is simply absent from both.

Registered names:
  ``torch``        eager :class:`~javisrt.engine.model.JavisDiT` (any mode, t2a included; the default)
  ``torch-engine`` the contract Engine over the same model (``backends/torch_engine.py``: RoPE tables as
                   inputs, optional CUDA graphs), through ``runtime/engine.py``'s ``PipelineEngine``
  ``onnxruntime``  an exported graph (option ``onnx_path``), ``backends/onnxruntime.py``
  ``tensorrt``     a serialized plan (option ``plan_path``, CUDA only), ``backends/tensorrt.py``
  ``torch-parallel`` the eager model over CFG/sequence-parallel ranks (option ``parallel``: a
                   ``runtime.parallel.ParallelContext``), ``backends/torch_parallel.py``
The last four are imported on first use; the compiled ones (their runtimes are optional) run t2av / t2v
graphs only.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Mapping
from typing import Any, Protocol, runtime_checkable

import torch

from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.engine.model import JavisDiT
from javisrt.runtime.backends.torch_backend import TorchEngine

__all__ = ["BACKENDS", "PipelineBackend", "TorchEngine", "create_backend"]


@runtime_checkable
class PipelineBackend(Protocol):
    """A DiT executor with an explicit lifecycle."""

    name: str

    def load(self) -> None: ...

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> None: ...

    def infer(
        self, inputs: Mapping[str, torch.Tensor], *, video_latent_frames: int | None = None
    ) -> dict[str, torch.Tensor]: ...

    def unload(self) -> None: ...


def _lazy(module: str) -> Callable[..., PipelineBackend]:
    """A factory that imports ``module`` on first use and calls its ``create_for_pipeline``."""

    def factory(model: JavisDiT, device: torch.device | str = "cpu", **options: Any) -> PipelineBackend:
        try:
            mod = importlib.import_module(module)
        except ImportError as exc:
            raise UnavailableError(f"backend module {module} cannot be imported: {exc}") from exc
        engine: PipelineBackend = mod.create_for_pipeline(model, device=device, **options)
        return engine

    return factory


# name -> factory(model, device, **options)
BACKENDS: dict[str, Callable[..., PipelineBackend]] = {
    "torch": TorchEngine,
    "torch-engine": _lazy("javisrt.runtime.backends.torch_engine"),
    "onnxruntime": _lazy("javisrt.runtime.backends.onnxruntime"),
    "tensorrt": _lazy("javisrt.runtime.backends.tensorrt"),
    "torch-parallel": _lazy("javisrt.runtime.backends.torch_parallel"),
}


def create_backend(name: str, model: JavisDiT, device: torch.device | str = "cpu", **options: Any) -> PipelineBackend:
    """The engine registered as ``name``, loaded and ready; unknown names raise ConfigError."""
    try:
        factory = BACKENDS[name]
    except KeyError:
        raise ConfigError(f"unknown backend {name!r}; available: {sorted(BACKENDS)}") from None
    engine = factory(model, device=device, **options)
    engine.load()
    return engine
