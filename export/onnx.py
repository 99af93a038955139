"""ONNX export of the DiT: native and plugin flavours (dynamo exporter, opset 23), fp32 or bf16.

One graph serves every shape of the contract: the dynamic dims are declared to ``torch.export`` from
:class:`~javisrt.export.contract.DiTContract`, traced at small distinct sizes (so no dim is
specialised), and renamed to the contract's names afterwards (the exporter writes expressions such
as ``2*Hp``). The contract is stored in the model's ``metadata_props`` (key ``javisrt.contract``).

Precision (``Precision``):
  ``fp32``  every tensor fp32: the copy ONNX Runtime checks on CPU (ORT CPU has no bf16 kernels).
  ``bf16``  the model in its ``official`` numerics (bf16 weights and activations; time embedding,
            projections and heads fp32; RMSNorm statistics, softmax and RoPE in fp32): the TensorRT graph.
The FP8 graph is produced by :mod:`javisrt.export.quantize` (modelopt, TorchScript exporter).
"""

from __future__ import annotations

import enum
import json
import logging
import warnings
from pathlib import Path
from typing import Any

import onnx
import torch
from torch.export import Dim

from javisrt.engine.errors import ShapeError
from javisrt.engine.model import JavisDiT
from javisrt.export.contract import (
    AUDIO_FRAMES,
    BATCH,
    META_CONTRACT,
    META_FLAVOR,
    META_PRECISION,
    NUM_TOKENS,
    VIDEO_FRAMES,
    VIDEO_HEIGHT,
    VIDEO_WIDTH,
    DiTContract,
    Dims,
)
from javisrt.export.module import ExportableDiT, Flavor

log = logging.getLogger(__name__)

OPSET = 23
IR_VERSION = 10  # what torch writes; ORT 1.31 reads <= 13 (tensorrt-notes §8)
EXTERNAL_DATA_THRESHOLD = 1 << 30  # bytes of initializers above which weights go to <name>.onnx.data (protobuf: 2 GiB)

# Trace at small, pairwise distinct sizes (>= 2): torch.export specialises dims of size 0/1 and could
# relate equal ones. B=2, T=3, Hp=4, Wp=5, Ta=6.
TRACE_DIMS: Dims = {BATCH: 2, VIDEO_FRAMES: 3, VIDEO_HEIGHT: 8, VIDEO_WIDTH: 10, AUDIO_FRAMES: 12}
_MAX = 1 << 14  # upper bound of every symbolic dim at trace time (the profiles bound them for TensorRT)


class Precision(enum.StrEnum):
    FP32 = "fp32"
    BF16 = "bf16"
    FP8 = "fp8"


def example_args(contract: DiTContract, dims: Dims = TRACE_DIMS) -> tuple[torch.Tensor | None, ...]:
    """Positional arguments of :meth:`ExportableDiT.forward` (``audio`` None for t2v)."""
    inputs = contract.sample_inputs(dims, torch.Generator().manual_seed(0))
    order = ["video", "audio", "timestep", "context", "rope_cos", "rope_sin"]
    return tuple(inputs.get(name) for name in order)


def dynamic_shapes(contract: DiTContract) -> dict[str, Any]:
    """``torch.export`` dynamic shapes: H8/W8/Tm4 are 2x a token dim (patch 2), T is one."""
    b = Dim(BATCH, min=1, max=_MAX)
    t = Dim("T", min=1, max=_MAX)
    hp, wp = Dim("Hp", min=1, max=_MAX), Dim("Wp", min=1, max=_MAX)
    ph, pw = contract.config.patch_size[1:]
    shapes: dict[str, Any] = {
        "video": {0: b, 2: t, 3: ph * hp, 4: pw * wp},
        "audio": None,
        "timestep": {0: b},
        "context": {0: b},
        "rope_cos": {0: Dim(NUM_TOKENS, min=1, max=_MAX * 64)},
        "rope_sin": {0: Dim(NUM_TOKENS, min=1, max=_MAX * 64)},
    }
    if contract.config.has_audio:
        shapes["audio"] = {0: b, 2: contract.config.audio_patch_size[0] * Dim("Ta", min=1, max=_MAX)}
    return shapes


def legacy_dynamic_axes(contract: DiTContract) -> dict[str, dict[int, str]]:
    """The same axes for the TorchScript exporter (``dynamic_axes``), named as in the contract."""
    return {
        t.name: {i: d for i, d in enumerate(t.shape) if isinstance(d, str)}
        for t in (*contract.inputs, *contract.outputs)
    }


def finalize(model: onnx.ModelProto, contract: DiTContract, flavor: str, precision: str) -> onnx.ModelProto:
    """Name every dynamic dim as the contract does, drop stale value_info, attach the contract."""
    graph = model.graph
    for value in (*graph.input, *graph.output):
        spec = contract.spec(value.name)
        dims = value.type.tensor_type.shape.dim
        if len(dims) != len(spec.shape):
            raise ShapeError(f"{value.name}: exported rank {len(dims)} != contract rank {len(spec.shape)}")
        for dim, want in zip(dims, spec.shape):
            if isinstance(want, str):
                dim.Clear()
                dim.dim_param = want
            elif dim.HasField("dim_value") and dim.dim_value != want:
                raise ShapeError(f"{value.name}: exported dim {dim.dim_value} != contract {want}")
            else:  # static in the contract; the TorchScript exporter may have left a symbol
                dim.Clear()
                dim.dim_value = want
    # Intermediate shapes carry the exporter's symbol expressions; consumers re-infer them.
    del graph.value_info[:]
    meta = {META_CONTRACT: contract.to_json(), META_FLAVOR: flavor, META_PRECISION: precision}
    kept = [p for p in model.metadata_props if p.key not in meta]
    del model.metadata_props[:]
    model.metadata_props.extend(kept)
    for key, value in meta.items():
        model.metadata_props.add(key=key, value=value)
    model.ir_version = min(model.ir_version, IR_VERSION) if model.ir_version else IR_VERSION
    return model


def save(model: onnx.ModelProto, path: Path) -> Path:
    """Write ``path``; initializers go to ``<name>.data`` beside it when they would exceed protobuf's 2 GiB."""
    path.parent.mkdir(parents=True, exist_ok=True)
    size = sum(len(t.raw_data) for t in model.graph.initializer)
    external = size > EXTERNAL_DATA_THRESHOLD
    onnx.save_model(
        model, str(path), save_as_external_data=external, all_tensors_to_one_file=True,
        location=path.name + ".data", size_threshold=1024,
    )  # fmt: skip
    log.info("wrote %s (%.1f MB of weights%s)", path, size / 1e6, ", external data" if external else "")
    return path


def _dynamo_export(wrapper: ExportableDiT, contract: DiTContract) -> onnx.ModelProto:
    args = example_args(contract)
    with warnings.catch_warnings():
        # Third-party noise of torch 2.13's exporter that says nothing about our graph: pytree's
        # LeafSpec deprecation (raised inside torch.export) and the note that two axes share the
        # name "batch" (intended: every input's batch is the same dim).
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)
        warnings.filterwarnings("ignore", message="# The axis name: .* will not be used", category=UserWarning)
        program = torch.onnx.export(
            wrapper,
            args,
            dynamic_shapes=dynamic_shapes(contract),
            input_names=contract.input_names,
            output_names=contract.output_names,
            opset_version=OPSET,
            dynamo=True,
            external_data=False,
            verbose=False,
        )
    assert program is not None
    _fold_weight_stacks(program.model)
    return program.model_proto


def _fold_weight_stacks(model: Any) -> None:
    """Fold Unsqueeze/Concat nodes whose inputs are all constants, whatever their size (in place).

    The plugin op set stacks the two FFN experts' weights for ``javisrt::modality_ffn`` inside the traced
    forward; the exporter folds that into one initializer only below its size limit (8192 elements), so at
    the released width the graph would concatenate the weights on every call. ``model``: an onnx_ir Model.
    """
    import onnxscript.optimizer

    def constant_stack(node: Any) -> bool | None:
        if node.op_type in ("Unsqueeze", "Concat") and all(
            v is not None and v.const_value is not None for v in node.inputs
        ):
            return True
        return None

    onnxscript.optimizer.fold_constants(model, should_fold=constant_stack)
    onnxscript.optimizer.remove_unused_nodes(model)


def export_dit(
    model: JavisDiT,
    flavor: Flavor | str,
    precision: Precision | str,
    contract: DiTContract | None = None,
    ffn_plugin: bool = True,
) -> onnx.ModelProto:
    """The DiT as an ONNX model of ``flavor`` (native | plugin) in ``precision`` (fp32 | bf16).

    ``ffn_plugin`` (plugin flavour): the FFN as a ``javisrt::modality_ffn`` node, or native (False).
    Sets the model's numerics (fp32 -> ``"fp32"``, bf16 -> ``"official"``) in place.
    """
    flavor, precision = Flavor(flavor), Precision(precision)
    if flavor is Flavor.MATH or precision is Precision.FP8:
        raise ValueError("the FP8 / math-flavour graph comes from javisrt.export.quantize.export_fp8")
    contract = contract or DiTContract.for_config(model.cfg)
    model.set_numerics("fp32" if precision is Precision.FP32 else "official")
    model.requires_grad_(False).eval()
    wrapper = ExportableDiT(model, flavor, ffn_plugin=ffn_plugin).eval()
    with torch.no_grad():
        proto = _dynamo_export(wrapper, contract)
    return finalize(proto, contract, flavor.value, precision.value)


def contract_of(model: onnx.ModelProto) -> DiTContract:
    """The contract stored in an exported graph."""
    for prop in model.metadata_props:
        if prop.key == META_CONTRACT:
            return DiTContract.from_dict(json.loads(prop.value))
    raise ShapeError("graph carries no javisrt contract metadata")
