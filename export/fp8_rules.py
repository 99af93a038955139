"""Static checks of an exported graph against TensorRT's rules: FP8 MHA fusion and the op audit.

TensorRT only builds a fused FP8 attention (and FP8 GEMMs) when the Q/DQ placement matches its
patterns (tensorrt-notes §3). Nothing on this machine can build an engine, so these rules are checked
statically on every FP8 graph we export:

  ``dq_before_attention_matmul``  both inputs of each activation x activation MatMul (QK^T and PV)
                                  come straight from a DequantizeLinear fed by a QuantizeLinear;
  ``softmax_fixed_scale``         every Softmax output goes (directly, or through one Cast) through one
                                  Q/DQ pair with scale exactly 1/448 (amax 1) into the PV MatMul;
  ``no_cast_dq_matmul``           no Cast between a DequantizeLinear and the MatMul/Gemm it feeds;
  ``qdq_after_rope``              in self-attention (QK^T operands derived from the RoPE tables), the
                                  tensor entering the QuantizeLinear of q and of k already has RoPE
                                  applied (depends on ``rope_cos``/``rope_sin``).

``audit_ops`` checks that every node is an op TensorRT's ONNX parser implements natively (list below,
from onnx-tensorrt's operator support table for TensorRT 10.15+/11) or one of our plugin ops.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass

import numpy as np
import onnx
from onnx import numpy_helper

from javisrt.export.contract import ROPE_COS, ROPE_SIN
from javisrt.export.plugin_ops import DOMAIN, PLUGIN_OPS

SOFTMAX_SCALE = 1.0 / 448.0
_PASS_THROUGH = ("Unsqueeze", "Reshape", "Expand", "Slice", "Gather", "Cast", "Squeeze", "Transpose", "Identity")
ROPE_INPUTS = (ROPE_COS, ROPE_SIN)

# ONNX ops the TensorRT 11 ONNX parser supports natively (default domain) that a DiT graph may contain.
TRT_NATIVE_OPS = frozenset(
    """Abs Acos Add And ArgMax ArgMin Attention AveragePool BatchNormalization Cast Ceil Clip Concat Constant
    ConstantOfShape Conv ConvTranspose Cos CumSum DequantizeLinear Div Einsum Equal Erf Exp Expand Flatten
    Floor Gather GatherElements GatherND Gelu Gemm GlobalAveragePool Greater GreaterOrEqual GroupNormalization
    Identity If InstanceNormalization LayerNormalization Less LessOrEqual Log MatMul Max Mean Min Mod Mul Neg
    Not Or Pad Pow QuantizeLinear Range Reciprocal ReduceL2 ReduceMax ReduceMean ReduceMin ReduceProd ReduceSum
    Relu Reshape Resize RMSNormalization RotaryEmbedding Round ScatterElements ScatterND Shape Sigmoid Sign Sin
    Size Slice Softmax Split Sqrt Squeeze Sub Sum Tanh Tile TopK Transpose Unsqueeze Where Xor""".split()
)


@dataclass(frozen=True)
class Violation:
    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node}: {self.message}"


class _Graph:
    def __init__(self, model: onnx.ModelProto) -> None:
        g = model.graph
        self.nodes = list(g.node)
        self.producer: dict[str, onnx.NodeProto] = {o: n for n in self.nodes for o in n.output}
        self.consumers: dict[str, list[onnx.NodeProto]] = defaultdict(list)
        for n in self.nodes:
            for i in n.input:
                self.consumers[i].append(n)
        self.consts: dict[str, np.ndarray] = {}
        for init in g.initializer:
            if init.data_type in (onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16):
                self.consts[init.name] = numpy_helper.to_array(init)
            else:
                self.consts[init.name] = np.zeros(0)  # present, values not needed (fp8 weights, ints)
        for n in self.nodes:
            if n.op_type == "Constant":
                for a in n.attribute:
                    if a.name == "value":
                        self.consts[n.output[0]] = numpy_helper.to_array(a.t)
        # RoPE application sites: Muls taking a (reshaped/broadcast) cos or sin table.
        tables = {i.name for i in g.input if i.name in ROPE_INPUTS}
        for n in self.nodes:
            if n.op_type in _PASS_THROUGH and any(i in tables for i in n.input[:1]):
                tables.update(n.output)
        self.rope_muls = {id(n) for n in self.nodes if n.op_type == "Mul" and any(i in tables for i in n.input)}

    def rope_applied(self, name: str, depth: int = 24) -> bool:
        """Whether RoPE is applied on the way to tensor ``name`` since its projection (walking back, not
        crossing a MatMul/Gemm/Softmax: the previous layer's RoPE does not count)."""
        seen, frontier = set(), [name]
        for _ in range(depth):
            nxt = []
            for t in frontier:
                p = self.producer.get(t)
                if p is None or id(p) in seen or p.op_type in ("MatMul", "Gemm", "Softmax", "Conv"):
                    continue
                if id(p) in self.rope_muls:
                    return True
                seen.add(id(p))
                nxt.extend(p.input)
            frontier = nxt
        return False

    def is_const(self, name: str) -> bool:
        """An initializer, a Constant, or a DQ / Cast / Transpose / Reshape of one (a weight)."""
        if name in self.consts:
            return True
        p = self.producer.get(name)
        return p is not None and p.op_type in ("DequantizeLinear", "Cast", "Transpose", "Reshape") and self.is_const(p.input[0])

    def prod_op(self, name: str) -> str | None:
        p = self.producer.get(name)
        return p.op_type if p is not None else None

    def scale(self, node: onnx.NodeProto) -> float | None:
        arr = self.consts.get(node.input[1]) if len(node.input) > 1 else None
        return float(arr.reshape(-1)[0]) if arr is not None and arr.size == 1 else None

    def is_softmax_scale(self, node: onnx.NodeProto) -> bool:
        """The Q/DQ scale is 1/448 as represented in the scale's own dtype (a BF16 graph stores it in
        bf16: 0.0022277..., which is what modelopt writes and TensorRT reads)."""
        arr = self.consts.get(node.input[1]) if len(node.input) > 1 else None
        if arr is None or arr.size != 1:
            return False
        expected = float(np.asarray(SOFTMAX_SCALE, dtype=arr.dtype))
        return bool(np.isclose(float(arr.reshape(-1)[0]), expected, rtol=1e-6, atol=0))


def attention_matmuls(model: onnx.ModelProto) -> list[onnx.NodeProto]:
    """MatMuls of two activations (QK^T and PV); weight GEMMs have a constant operand."""
    g = _Graph(model)
    return [n for n in g.nodes if n.op_type == "MatMul" and not any(g.is_const(i) for i in n.input)]


def check_fp8(model: onnx.ModelProto) -> list[Violation]:
    """All FP8 fusion-rule violations of ``model`` (empty list = passes)."""
    g = _Graph(model)
    out: list[Violation] = []
    mms = [n for n in g.nodes if n.op_type == "MatMul" and not any(g.is_const(i) for i in n.input)]
    if not mms:
        out.append(Violation("dq_before_attention_matmul", "<graph>", "no attention MatMul found"))
    for mm in mms:
        for i in mm.input:
            dq = g.producer.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                out.append(Violation("dq_before_attention_matmul", mm.name, f"input {i} comes from {g.prod_op(i)}, not a DequantizeLinear"))
            elif g.prod_op(dq.input[0]) != "QuantizeLinear":
                out.append(Violation("dq_before_attention_matmul", mm.name, f"DQ {dq.name} is not fed by a QuantizeLinear"))
    softmaxes = [n for n in g.nodes if n.op_type == "Softmax"]
    for sm in softmaxes:
        cons = g.consumers[sm.output[0]]
        if len(cons) == 1 and cons[0].op_type == "Cast":
            # Softmax (fp32) -> Cast (activation dtype) -> Q: the FP8 MHA pattern TensorRT's fusion
            # accepts (demoDiffusion matcher, tensorrt-notes §3.2); the BF16-based FP8 graph has it.
            cons = g.consumers[cons[0].output[0]]
        qs = [c for c in cons if c.op_type == "QuantizeLinear"]
        if len(qs) != 1 or len(cons) != 1:
            out.append(Violation("softmax_fixed_scale", sm.name, f"output goes to {[c.op_type for c in cons]}, not one QuantizeLinear"))
            continue
        q = qs[0]
        if not g.is_softmax_scale(q):
            out.append(Violation("softmax_fixed_scale", q.name, f"softmax Q scale {g.scale(q)} != 1/448"))
        dqs = g.consumers[q.output[0]]
        if len(dqs) != 1 or dqs[0].op_type != "DequantizeLinear":
            out.append(Violation("softmax_fixed_scale", q.name, "softmax Q is not followed by exactly one DQ"))
            continue
        if not g.is_softmax_scale(dqs[0]):
            out.append(Violation("softmax_fixed_scale", dqs[0].name, f"softmax DQ scale {g.scale(dqs[0])} != 1/448"))
        if not any(c.op_type == "MatMul" for c in g.consumers[dqs[0].output[0]]):
            out.append(Violation("softmax_fixed_scale", dqs[0].name, "softmax DQ does not feed a MatMul"))
    for n in g.nodes:
        if n.op_type != "Cast" or g.prod_op(n.input[0]) != "DequantizeLinear":
            continue
        if any(c.op_type in ("MatMul", "Gemm", "Conv") for c in g.consumers[n.output[0]]):
            out.append(Violation("no_cast_dq_matmul", n.name, "Cast between a DequantizeLinear and a MatMul/Gemm"))
    for mm in mms:
        # QK^T: its output reaches a Softmax (through scaling/masking elementwise ops at most)
        reach, frontier = False, [mm.output[0]]
        for _ in range(4):
            nxt = [o for t in frontier for c in g.consumers[t] for o in c.output if c.op_type != "MatMul"]
            if any(c.op_type == "Softmax" for t in frontier for c in g.consumers[t]):
                reach = True
                break
            frontier = nxt
        if not reach:
            continue  # PV
        chains = []
        for i in mm.input:
            dq = g.producer.get(i)
            if dq is None or dq.op_type != "DequantizeLinear":
                continue
            quant = g.producer.get(dq.input[0])
            if quant is not None and quant.op_type == "QuantizeLinear":
                chains.append((i, quant))
        if not any(g.rope_applied(i) for i, _ in chains):
            continue  # cross-attention: no RoPE
        for _, q in chains:
            if not g.rope_applied(q.input[0]):
                out.append(Violation("qdq_after_rope", q.name, "self-attention operand is quantized before RoPE"))
    return out


def audit_ops(model: onnx.ModelProto) -> list[Violation]:
    """Nodes TensorRT's ONNX parser cannot take natively and that are not one of our plugins."""
    out = []
    for n in model.graph.node:
        if n.domain in ("", "ai.onnx"):
            if n.op_type not in TRT_NATIVE_OPS:
                out.append(Violation("op_audit", n.name, f"{n.op_type} is not a TensorRT-native ONNX op"))
        elif n.domain == DOMAIN:
            if n.op_type not in PLUGIN_OPS:
                out.append(Violation("op_audit", n.name, f"{DOMAIN}::{n.op_type} is not a registered plugin op"))
            else:
                allowed = {"plugin_namespace", *PLUGIN_OPS[n.op_type]["attrs"]}
                extra = {a.name for a in n.attribute} - allowed
                if extra:
                    out.append(Violation("op_audit", n.name, f"attributes {sorted(extra)} are not plugin fields"))
        else:
            out.append(Violation("op_audit", n.name, f"unknown domain {n.domain!r} ({n.op_type})"))
    return out


_FLOAT8 = {
    onnx.TensorProto.FLOAT8E4M3FN,
    onnx.TensorProto.FLOAT8E4M3FNUZ,
    onnx.TensorProto.FLOAT8E5M2,
    onnx.TensorProto.FLOAT8E5M2FNUZ,
}


def has_float8_qdq(model: onnx.ModelProto) -> bool:
    """Whether any QuantizeLinear/DequantizeLinear of the graph uses a float8 type."""
    inits = {t.name: t.data_type for t in model.graph.initializer}
    for node in model.graph.node:
        if node.op_type == "QuantizeLinear":
            if len(node.input) > 2 and inits.get(node.input[2]) in _FLOAT8:
                return True
            if any(a.name == "output_dtype" and a.i in _FLOAT8 for a in node.attribute):
                return True
        if node.op_type == "DequantizeLinear" and inits.get(node.input[0]) in _FLOAT8:
            return True
        if node.op_type == "DequantizeLinear" and len(node.input) > 2 and inits.get(node.input[2]) in _FLOAT8:
            return True
    return False
