"""The plugin-flavour custom ONNX ops: their I/O and attributes, how they are emitted, and CPU references.

These nodes are what the TensorRT plugin registrations (``export/trt_plugins.py``, tensorrt-notes §1.2)
must accept: node ``domain`` = plugin namespace ``javisrt``, ``op_type`` = plugin name, and the node
attributes are exactly the ``@trtp.register`` attributes plus the reserved ``plugin_namespace`` (the
parser also reads the namespace from the domain since TRT 10.10; we emit both) and
``tensorrt_plugin_shape_input_indices`` where a shape tensor is passed.

``javisrt::rope_attention(q, k, v, cos, sin) -> out``   (self-attention, TA-RoPE inside the kernel)
    q/k/v [B, L, H, D] activation dtype; cos/sin [L, D/2] fp32; out [B, L, H, D]. No attributes:
    H and D come from the shapes, the softmax scale is 1/sqrt(D) (a constexpr of the kernel).
``javisrt::attention(q, k, v) -> out``                   (cross-attention, no RoPE)
    q [B, Lq, H, D], k/v [B, Lk, H, D] -> [B, Lq, H, D].
``javisrt::modality_ffn(x, mod, w1, b1, w2, b2, num_video_tokens) -> out``   (MS-MoE FFN)
    x [B, L, d]; mod [2, 3, B, d] = (video, audio) x (shift, scale, gate); experts stacked on a leading
    axis of 2 (video, audio): w1 [2, f, d], b1 [2, f], w2 [2, d, f], b2 [2, d] (nn.Linear layout);
    num_video_tokens int64 [1], a **shape tensor** computed from the video latent's shape (declared by
    ``tensorrt_plugin_shape_input_indices = [6]``); out [B, L, d] = x + FFN_e(LN(x)(1+scale)+shift)*gate.
    Attribute ``eps`` (float; the kernel's EPS constexpr).

ONNX Runtime cannot know these ops; :func:`ort_session` runs a plugin graph on CPU by registering
onnxruntime-extensions Python ops (implemented with the ``engine/ops.py`` torch references) and
rewriting the ``javisrt`` domain of a copy of the model to ``ai.onnx.contrib``, the only domain
PyOps live in (tensorrt-notes §8).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import onnx
import torch

from javisrt.engine.ops import FFNWeights, Modulation, attention_ref, modality_ffn_ref

DOMAIN = "javisrt"
ORT_DOMAIN = "ai.onnx.contrib"
VERSION = 1

# op_type -> (inputs, outputs, attributes other than plugin_namespace): the registration contract.
PLUGIN_OPS: dict[str, dict[str, Any]] = {
    "rope_attention": {"inputs": ["q", "k", "v", "cos", "sin"], "outputs": ["out"], "attrs": {}},
    "attention": {"inputs": ["q", "k", "v"], "outputs": ["out"], "attrs": {}},
    "modality_ffn": {
        "inputs": ["x", "mod", "w1", "b1", "w2", "b2", "num_video_tokens"],
        "outputs": ["out"],
        "attrs": {"eps": "float", "tensorrt_plugin_shape_input_indices": "ints"},
    },
}
# TensorRT-parser metadata, not op semantics: stripped from the ONNX Runtime copy (PyOps cannot declare
# list attributes, and the torch references do not need them).
RESERVED_ATTRS = ("plugin_namespace", "tensorrt_plugin_shape_input_indices")


# ---------------------------------------------------------------------------------------------------
# Emitting the nodes (dynamo exporter; only called while exporting)
# ---------------------------------------------------------------------------------------------------


def rope_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::rope_attention", (q, k, v, cos, sin), {"plugin_namespace": DOMAIN},
        dtype=q.dtype, shape=q.shape, version=VERSION,
    )  # fmt: skip


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::attention", (q, k, v), {"plugin_namespace": DOMAIN}, dtype=q.dtype, shape=q.shape, version=VERSION
    )


def modality_ffn(
    x: torch.Tensor, mod: torch.Tensor, w1: torch.Tensor, b1: torch.Tensor, w2: torch.Tensor, b2: torch.Tensor,
    num_video_tokens: torch.SymInt | int, eps: float,
) -> torch.Tensor:  # fmt: skip
    nvt = torch.full((1,), num_video_tokens, dtype=torch.int64, device=x.device)  # type: ignore[arg-type]  # SymInt when traced
    attrs: dict[str, Any] = {
        "plugin_namespace": DOMAIN, "eps": float(eps), "tensorrt_plugin_shape_input_indices": [6],
    }
    return torch.onnx.ops.symbolic(
        f"{DOMAIN}::modality_ffn", (x, mod, w1, b1, w2, b2, nvt), attrs, dtype=x.dtype, shape=x.shape, version=VERSION
    )


# ---------------------------------------------------------------------------------------------------
# CPU references for ONNX Runtime (onnxruntime-extensions PyOps)
# ---------------------------------------------------------------------------------------------------

_registered = False


def _t(a: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(np.ascontiguousarray(a))


def register_ort_reference_ops() -> None:
    """Register the torch-reference PyOps once per process (``onnx_op`` keeps a global registry)."""
    global _registered
    if _registered:
        return
    from onnxruntime_extensions import PyCustomOpDef, onnx_op

    f32, i64 = PyCustomOpDef.dt_float, PyCustomOpDef.dt_int64

    @onnx_op(op_type="rope_attention", inputs=[f32] * 5, outputs=[f32])
    def _rope_attention(q, k, v, cos, sin):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return attention_ref(_t(q), _t(k), _t(v), (_t(cos), _t(sin))).numpy()

    @onnx_op(op_type="attention", inputs=[f32] * 3, outputs=[f32])
    def _attention(q, k, v):  # type: ignore[no-untyped-def]
        with torch.no_grad():
            return attention_ref(_t(q), _t(k), _t(v), None).numpy()

    @onnx_op(
        op_type="modality_ffn", inputs=[f32] * 6 + [i64], outputs=[f32], attrs={"eps": PyCustomOpDef.dt_float}
    )
    def _modality_ffn(x, mod, w1, b1, w2, b2, nvt, **attrs):  # type: ignore[no-untyped-def]
        w1, b1, w2, b2, mod = (_t(a) for a in (w1, b1, w2, b2, mod))
        experts = [FFNWeights(w1[j], b1[j], w2[j], b2[j]) for j in range(2)]
        mods = [Modulation(*(mod[j, c][:, None, :] for c in range(3))) for j in range(2)]
        with torch.no_grad():
            out = modality_ffn_ref(_t(x), int(nvt[0]), experts[0], experts[1], mods[0], mods[1], float(attrs["eps"]))
        return out.numpy()

    _registered = True


def to_ort_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """A copy of ``model`` with the ``javisrt`` nodes moved to ``ai.onnx.contrib`` (PyOps' domain) and
    the TensorRT-only reserved attributes removed."""
    out = onnx.ModelProto()
    out.CopyFrom(model)
    for node in out.graph.node:
        if node.domain == DOMAIN:
            node.domain = ORT_DOMAIN
            kept = [a for a in node.attribute if a.name not in RESERVED_ATTRS]
            del node.attribute[:]
            node.attribute.extend(kept)
    opsets = [o for o in out.opset_import if o.domain not in (DOMAIN, ORT_DOMAIN)]
    del out.opset_import[:]
    out.opset_import.extend(opsets)
    out.opset_import.append(onnx.helper.make_opsetid(ORT_DOMAIN, VERSION))
    return out


def ort_session(model: onnx.ModelProto | str, disable_optimizations: bool = False) -> Any:
    """An ONNX Runtime CPU session for a plugin-flavour graph (custom nodes run the torch references)."""
    import onnxruntime as ort
    from onnxruntime_extensions import get_library_path

    register_ort_reference_ops()
    proto = onnx.load(model) if isinstance(model, str) else model
    so = ort.SessionOptions()
    so.register_custom_ops_library(get_library_path())
    if disable_optimizations:
        so.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    return ort.InferenceSession(to_ort_domain(proto).SerializeToString(), so, providers=["CPUExecutionProvider"])
