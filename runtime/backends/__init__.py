"""javisrt.runtime.backends: the one place an engine is chosen by name.

:func:`create_engine` builds and loads one :class:`~javisrt.runtime.engine.Engine` implementation:

  ``torch``        :class:`~javisrt.runtime.backends.torch_engine.TorchEngine`: the eager DiT
                   (``model=`` or ``checkpoint=``), op set ``ops`` (torch | triton | triton-fp8, the last
                   with ``fp8_scales=``, default the sidecar next to the checkpoint), any generation mode;
                   with ``parallel=`` (a ``runtime.parallel.ParallelContext``) its forward runs over
                   CFG-parallel / sequence-parallel ranks (``backends/torch_parallel.py``)
  ``onnxruntime``  :class:`~javisrt.runtime.backends.onnxruntime_engine.OnnxRuntimeEngine`: an exported
                   graph (``engine_file=`` .onnx); CPU, or the CUDA execution provider on a CUDA device
  ``tensorrt``     :class:`~javisrt.runtime.backends.tensorrt_engine.TensorRTEngine`: a plan built by
                   ``javisrt build`` (``engine_file=`` .plan), CUDA only

Every command (``generate``, ``demo``, ``bench``, ``export``'s calibration, the GPU scripts) takes the
same names and one flag for the compiled file (``--engine-file``). The compiled engines read their
network config and contract (including the generation mode the graph was exported for) from the
file's metadata: no eager model is built for them. Their runtimes are imported on first use.
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

import torch

from javisrt.engine.config import GenerationMode, JavisConfig
from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.engine.model import JavisDiT, Numerics
from javisrt.runtime.engine import Engine

if TYPE_CHECKING:
    from javisrt.runtime.fp8_scales import Fp8Scales

__all__ = ["ENGINES", "create_engine"]

ENGINES = ("torch", "onnxruntime", "tensorrt")


def create_engine(
    name: str,
    *,
    model: JavisDiT | None = None,
    checkpoint: str | os.PathLike[str] | None = None,
    config: JavisConfig | str | None = None,
    engine_file: str | os.PathLike[str] | None = None,
    mode: GenerationMode | str | None = None,
    device: torch.device | str = "cpu",
    ops: str = "torch",
    numerics: Numerics | str | None = None,
    cuda_graphs: bool = False,
    parallel: Any = None,
    fp8_scales: str | os.PathLike[str] | Fp8Scales | None = None,
    fp8_linear: str | None = None,
    **options: Any,
) -> Engine:
    """The engine ``name``, loaded and ready.

    torch: exactly one of ``model`` / ``checkpoint`` (``config``: the preset when the checkpoint does
    not say; ``numerics`` default: the model's own, official for a checkpoint), ``mode`` (default:
    every modality of the network), ``ops``, ``cuda_graphs``, ``parallel`` (a ParallelContext of a
    --parallel launch), ``fp8_scales`` (ops triton-fp8 only: the scales sidecar, default
    ``<checkpoint>.fp8-scales.safetensors``; a missing one is a ConfigError naming the command that makes
    it; or the loaded :class:`~javisrt.runtime.fp8_scales.Fp8Scales`), ``fp8_linear`` (ops triton-fp8 only:
    its attention-Linear implementation, scaled_mm or triton; None: the op set's default). onnxruntime / tensorrt: ``engine_file``;
    ``options`` go to the engine's constructor (e.g. ``intra_op_threads``, ``refit_onnx``). A mode the
    compiled file was not exported for is refused by the caller through ``engine.contract.mode``.
    """
    if name not in ENGINES:
        raise ConfigError(f"unknown engine {name!r}; choose one of {', '.join(ENGINES)}")
    dev = torch.device(device)
    if name == "torch":
        if engine_file is not None:
            raise ConfigError("--engine-file is for the onnxruntime and tensorrt engines; the torch engine runs a checkpoint")
        if options:
            raise ConfigError(f"options {sorted(options)} do not apply to the torch engine")
        if (model is None) == (checkpoint is None):
            raise ConfigError("the torch engine needs exactly one of model= or checkpoint=")
        if model is None:
            from javisrt.engine.checkpoint import load_model

            assert checkpoint is not None
            # triton-fp8 is built from its scales by the engine on load (the model starts on the torch ops)
            load_ops = "torch" if ops == "triton-fp8" else ops
            model = load_model(checkpoint, config, Numerics.OFFICIAL if numerics is None else numerics, dev, load_ops)
        from javisrt.runtime.backends.torch_engine import TRITON_FP8_OPS, TorchEngine

        scales = None
        if ops == TRITON_FP8_OPS:
            from javisrt.runtime.fp8_scales import Fp8Scales, config_hash, default_path

            if fp8_scales is None and checkpoint is None:
                raise ConfigError(f"--ops {TRITON_FP8_OPS} on a model without a checkpoint needs --fp8-scales PATH")
            if isinstance(fp8_scales, Fp8Scales):
                if fp8_scales.config_hash != config_hash(model.cfg):
                    raise ConfigError(f"the FP8 scales were made for config {fp8_scales.config_name!r}, not {model.cfg.name!r}")
                scales = fp8_scales.scales
            else:
                path = fp8_scales if fp8_scales is not None else default_path(checkpoint)  # type: ignore[arg-type]
                scales = Fp8Scales.load(path, model.cfg).scales
        elif fp8_scales is not None:
            raise ConfigError(f"--fp8-scales applies to --ops {TRITON_FP8_OPS}, not --ops {ops}")
        engine: Engine = TorchEngine(
            model, mode=mode, ops=ops, numerics=numerics, device=dev, cuda_graphs=cuda_graphs, parallel=parallel,
            fp8_scales=scales, fp8_linear=fp8_linear,
        )
    else:
        if model is not None or checkpoint is not None:
            raise ConfigError(
                f"the {name} engine runs its compiled file (engine_file=), which carries its weights; "
                "model=/checkpoint= do not apply"
            )
        if engine_file is None:
            raise ConfigError(f"the {name} engine needs engine_file= (--engine-file): the compiled DiT to run")
        if ops != "torch" or fp8_scales is not None or fp8_linear is not None:
            raise ConfigError(f"op sets (--ops {ops}, --fp8-scales, --fp8-linear) apply to the torch engine; the {name} engine "
                              "runs its compiled graph")
        if parallel is not None:
            raise ConfigError(f"--parallel runs the torch engine (op-set wrappers over ranks), not the {name} engine")
        engine = _compiled(name, engine_file, dev, cuda_graphs, options)
    engine.load()
    return engine


def _compiled(name: str, path: str | os.PathLike[str], dev: torch.device, cuda_graphs: bool, options: dict[str, Any]) -> Engine:
    try:
        if name == "onnxruntime":
            from javisrt.runtime.backends.onnxruntime_engine import OnnxRuntimeEngine

            if cuda_graphs:
                raise UnavailableError("the onnxruntime engine cannot capture CUDA graphs; use torch or tensorrt")
            options.setdefault("providers", ("cuda",) if dev.type == "cuda" else ("cpu",))
            return OnnxRuntimeEngine(path, device_id=dev.index or 0, **options)
        from javisrt.runtime.backends.tensorrt_engine import TensorRTEngine

        if dev.type != "cuda":
            raise ConfigError(f"the tensorrt engine runs on a CUDA device, got {dev}")
        return TensorRTEngine(path, device_id=dev.index or 0, cuda_graphs=cuda_graphs, **options)
    except ImportError as exc:
        raise UnavailableError(f"the {name} engine cannot be imported: {exc}") from exc
