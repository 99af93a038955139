"""FP8 (E4M3) post-training quantization with nvidia-modelopt and the Q/DQ ONNX export.

What is quantized (per-tensor E4M3, "max" calibration):
  * every block's self- and cross-attention q/k/v/o Linears (input and weight quantizers);
  * both FFN experts' Linears (``ffn.0/2`` and ``audio_ffn.0/2``): separate modules, so separate scales;
  * the attention (MHA) quantizers of every self- and cross-attention, the slots of the ``onnx-fp8`` op
    set (:class:`~javisrt.export.op_sets.Fp8Ops`): q after RoPE and the 1/sqrt(D) scale, K^T, V, and the
    softmax output with amax fixed to 1 (scale 1/448, tensorrt-notes §3); so TensorRT sees a DQ directly
    before both attention MatMuls. modelopt creates them on the model's attention modules (registered
    below), which hand them to the op set.
Everything else (patch/time/text embeddings, modulation tables, heads) is left unquantized.

Calibration is modelopt's ``forward_loop``, given by the caller: ``runtime/calibration.py`` runs the
*unquantized* model along real sampling trajectories (the project's sampler and a DenoiseSession over
the torch engine with the ``onnx-fp8`` op set) so every step's forward feeds the calibrators, and checks
the fidelity the same way. Keeping the loop there keeps imports one way (engine <- export <- runtime).

Export: modelopt's ``get_onnx_bytes_and_metadata`` (TorchScript exporter, the only one its FP8
quantizers export through, feasibility §5) at opset 20, then the fixes ONNX Runtime and TensorRT need:
Q/DQ moved from modelopt's ``trt`` domain to the default domain, stale value_info dropped, dims named
from the contract. ONNX Runtime must run the result with ``ORT_DISABLE_ALL`` (feasibility §3).

CPU notes (modelopt 0.47): FP8 PTQ (max calibration), fake-quant forward and the Q/DQ export all run
on CPU. Not used because they need CUDA or do not fit: NVFP4 (dynamic block quant asserts CUDA amax),
the dynamo export path (``torch.export`` fails on the quantizers), ``dq_only`` for non-weight tensors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from unittest import mock
from collections.abc import Callable
from pathlib import Path
from typing import Any

import onnx
import torch

from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.engine.model import CrossAttention, JavisDiT, SelfAttention
from javisrt.export.contract import DiTContract
from javisrt.export.module import ExportableDiT, Flavor
from javisrt.export.op_sets import MHA_SLOTS, Fp8Ops
from javisrt.export.onnx import Precision, example_args, finalize, legacy_dynamic_axes

log = logging.getLogger(__name__)

FP8_OPSET = 20  # the TorchScript exporter's highest supported opset; FLOAT8 Q/DQ needs >= 19
FP8_E4M3 = {"num_bits": (4, 3), "axis": None}
SOFTMAX_AMAX = 1.0  # softmax output <= 1: fixed scale 1/448, no calibration (TensorRT MHA fusion rule)

# modelopt quant_cfg (fnmatch patterns on the wrapper's module names; later entries win).
QUANTIZED_LINEARS = (
    "*blocks.*.self_attn.[qkvo]",
    "*blocks.*.cross_attn.[qkvo]",
    "*blocks.*.ffn.[02]",
    "*blocks.*.audio_ffn.[02]",
)
QUANT_CFG: list[dict[str, Any]] = [
    {"quantizer_name": "*", "enable": False},
    *(
        {"quantizer_name": f"{linear}.{q}_quantizer", "cfg": FP8_E4M3}
        for linear in QUANTIZED_LINEARS
        for q in ("input", "weight")
    ),
    *({"quantizer_name": f"*blocks.*.{attn}.{slot}", "cfg": FP8_E4M3}
      for attn in ("self_attn", "cross_attn") for slot in MHA_SLOTS),
]


def _mtq():  # type: ignore[no-untyped-def]
    """modelopt's quantization module, with the model's attention modules registered as quantizable:
    their quantized versions carry the :data:`MHA_SLOTS` and run the ``onnx-fp8`` op set bound to them."""
    try:
        with warnings.catch_warnings():
            # modelopt 0.47 uses torch.jit.script(_method) at import time, deprecated in torch 2.13;
            # under -W error its plugins would fail to import. Harmless for what we do with it.
            warnings.filterwarnings("ignore", message="`torch.jit.script", category=DeprecationWarning)
            import modelopt.torch.quantization as mtq
            from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
    except ImportError as exc:  # modelopt or one of its undeclared deps (requests, huggingface_hub, lief)
        raise UnavailableError(f"nvidia-modelopt is not usable here: {exc}") from exc

    class MHASlots(torch.nn.Module):
        """Mixin of the quantized attention modules: the MHA slots as modelopt ``TensorQuantizer``s (created
        by modelopt's module conversion, so ``mtq.quantize`` configures and calibrates them like its own).
        The attention forward hands its module to the op set (``ops.for_layer(self)``, the op seam's one
        per-layer hook), which is how the ``onnx-fp8`` op set finds them; this mixin only refuses other op
        sets (the op set is the last argument of the attention forward), which would skip the slots."""

        def _setup(self) -> None:
            for slot in MHA_SLOTS:
                setattr(self, slot, TensorQuantizer())

        def forward(self, *args: Any) -> torch.Tensor:
            *inputs, ops = args
            if not isinstance(ops, Fp8Ops):
                raise ConfigError(f"an FP8-quantized attention runs with the onnx-fp8 op set, not {ops.name!r}")
            return super().forward(*inputs, ops)  # type: ignore[no-any-return]

    for cls in (SelfAttention, CrossAttention):
        if cls not in QuantModuleRegistry:
            quantized = type(f"Quant{cls.__name__}", (MHASlots, cls), {})
            mtq.register(original_cls=cls, quantized_cls=quantized)
    return mtq, TensorQuantizer


# ---------------------------------------------------------------------------------------------------
# Quantize
# ---------------------------------------------------------------------------------------------------


def quantize_fp8(model: JavisDiT, forward_loop: Callable[[JavisDiT], None], numerics: str = "fp32") -> ExportableDiT:
    """The math-flavour wrapper of ``model`` with FP8 fake-quant, calibrated by ``forward_loop(model)``
    (modelopt's calibration loop: it runs the model, whose quantizers collect their ranges; it must run
    the ``onnx-fp8`` op set, which the quantized attention modules require).

    ``numerics`` (set on ``model`` in place): ``"fp32"`` gives the fake-quant reference and the graph ONNX
    Runtime can check; ``"official"`` is FP8 on top of the BF16 numerics (what the TensorRT engine runs).
    """
    mtq, tensor_quantizer = _mtq()
    model.set_numerics(numerics)
    model.requires_grad_(False).eval()
    wrapper = ExportableDiT(model, Flavor.MATH).eval()
    config = {"quant_cfg": QUANT_CFG, "algorithm": "max"}
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # modelopt prints a summary table
        mtq.quantize(wrapper, config, lambda _: forward_loop(model))
    for module in wrapper.model.modules():
        if isinstance(module, SelfAttention):  # and CrossAttention, its subclass
            getattr(module, "softmax_quantizer").amax = torch.tensor(SOFTMAX_AMAX)
    n = sum(1 for _, m in wrapper.named_modules() if isinstance(m, tensor_quantizer) and m.is_enabled)
    log.info("FP8: %d quantizers enabled", n)
    return wrapper


def _fix_qdq_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """modelopt leaves the converted Q/DQ in the ``trt`` domain: move them to the default domain."""
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain:
            node.domain = ""
    if any(n.domain == "trt" for n in model.graph.node):
        raise ValueError("unconverted trt-domain nodes remain in the FP8 graph")
    opsets = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model


def export_fp8(wrapper: ExportableDiT, contract: DiTContract | None = None) -> onnx.ModelProto:
    """The calibrated wrapper as an FP8 Q/DQ ONNX graph (fp32 high precision, opset 20)."""
    _mtq()
    from modelopt.torch._deploy.utils.torch_onnx import get_onnx_bytes_and_metadata

    contract = contract or DiTContract.for_config(wrapper.model.cfg)
    args = tuple(a for a in example_args(contract))
    axes = {k: v for k, v in legacy_dynamic_axes(contract).items() if k in contract.input_names}
    from modelopt.onnx.export.fp8_exporter import FP8QuantExporter

    # modelopt 0.47's FP8 post-processing re-quantizes the weight of *every* Conv to FP8, ignoring the
    # quant config (``_quantize_conv_weights_to_fp8``); our Convs are the patch embedders, which stay
    # high precision. Disable that one step for this export.
    keep_convs = mock.patch.object(FP8QuantExporter, "_quantize_conv_weights_to_fp8", staticmethod(lambda graph: 0))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), keep_convs:
        # The TorchScript exporter is deprecated in torch 2.13 but is the only one modelopt's FP8
        # quantizers export through (feasibility §5); its trace warnings concern shape arithmetic that
        # the dynamic axes keep symbolic (checked by the multi-shape ORT test).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)
        blob, _meta = get_onnx_bytes_and_metadata(wrapper, args, dynamic_axes=axes, onnx_opset=FP8_OPSET)
    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes

    # modelopt hands the graph (and any external-data file) back as base64 JSON; unpack to a temp dir.
    # For the full-size model this holds ~3x the weights in host memory (a modelopt API limitation).
    packed = OnnxBytes.from_bytes(blob)
    with tempfile.TemporaryDirectory(prefix="javisrt_fp8_") as tmp, contextlib.redirect_stdout(io.StringIO()):
        packed.write_to_disk(tmp, clean_dir=False)
        model = onnx.load(str(Path(tmp) / f"{packed.model_name}.onnx"), load_external_data=True)
    for out, name in zip(model.graph.output, contract.output_names):
        old = out.name
        for node in model.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        out.name = name
    model = _fix_qdq_domain(model)
    return finalize(model, contract, Flavor.MATH.value, Precision.FP8.value)
