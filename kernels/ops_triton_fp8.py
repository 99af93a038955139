"""``TritonFp8Ops``: the "triton-fp8" op set, the Triton kernels in FP8 e4m3 with calibrated scales.

What runs in e4m3 (per-tensor scales, ``x_fp8 = sat(x / scale)``, fp32 accumulation):

  * self- and cross-attention: :func:`~javisrt.kernels.rope_attention.rope_attention_fp8` (Q and K
    quantized after the in-kernel RoPE, V, and P as ``P * 256``);
  * the per-modality FFN: :func:`~javisrt.kernels.modality_ffn.modality_ffn_fp8` (modulated input and
    GELU output quantized with their calibrated scales, e4m3 weights);
  * the attention q/k/v/o Linears (the activation quantized with its static calibrated scale, the e4m3
    weight with its per-tensor scale, output in the activation dtype), by ``linear_impl``:
    ``"scaled_mm"`` (default): :func:`scaled_mm_linear`, a Triton quantization launch then
    ``torch._scaled_mm``; ``"triton"``: :func:`~javisrt.kernels.fp8_linear.fp8_linear`, one Triton GEMM
    quantizing x in its prologue. The default is not a measured choice (there is no GPU where this was
    written): ``bench/gpu_proof.py`` part 2 times both on these shapes (rows ``attention_linears_*``,
    ``attention_linears_faster``), and that measurement decides.

Everything else (embeddings, modulation tables, RMSNorm, heads) is the ``triton`` op set's.

The scales come from the modelopt calibration of ``export/quantize.py`` (``runtime/fp8_scales.py``
reads them off the calibrated quantizers and keeps them in a sidecar file); :meth:`TritonFp8Ops.prepare`
turns them and the model's weights into a :class:`Fp8Plan`. The plan lives in the op set, not on the
modules: ``Module.to(dtype)`` would cast float8 buffers, and the BF16 weights stay on the modules for
BF16 steps and the reference. The plan is keyed by module object; the model names its layer through
the op seam's hook (``ops.for_layer(self)`` in each attention, ``ops.linear(self.q, x)`` for the
Linears, the expert modules themselves for the FFN). A layer the plan has no scales for is an error,
never a silent BF16 fallback.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass, field

import torch
from torch import nn

from javisrt.engine.errors import ConfigError
from javisrt.engine.ops import Expert, Modulation, OpSet
from javisrt.kernels.fp8 import quantize_e4m3, to_e4m3
from javisrt.kernels.fp8_linear import fp8_linear
from javisrt.kernels.modality_ffn import FP8FFNWeights, modality_ffn_fp8
from javisrt.kernels.ops_triton import TritonOps
from javisrt.kernels.rope_attention import rope_attention_fp8

__all__ = [
    "ATTENTION_LINEARS",
    "DEFAULT_LINEAR_IMPL",
    "LINEAR_IMPLS",
    "Fp8Linear",
    "Fp8Plan",
    "TritonFp8Ops",
    "attention_scale_keys",
    "check_linear_impl",
    "linear_scale_keys",
    "scaled_mm_linear",
    "triton_fp8_linear",
]

ATTENTION_LINEARS = ("q", "k", "v", "o")  # the quantized Linears of every self- and cross-attention
EXPERT_LINEARS = (0, 2)  # the two Linears of an FFN expert (nn.Sequential: Linear, GELU, Linear)
MIN_HEAD_DIM = 64  # kernels/rope_attention.rope_attention_fp8's limit


def linear_scale_keys(name: str) -> tuple[str, str]:
    """Sidecar keys of one quantized Linear ``name``: (input activation scale, weight scale)."""
    return f"{name}.input", f"{name}.weight"


def attention_scale_keys(name: str) -> tuple[str, str, str]:
    """Sidecar keys of one attention module ``name``: the kernel's (q, k, v) scales."""
    return f"{name}.attn_q", f"{name}.attn_k", f"{name}.attn_v"


@dataclass(frozen=True)
class Fp8Linear:
    """One Linear in e4m3: weight [out, in] float8_e4m3fn, its scale and the static input scale (fp32 [])."""

    weight: torch.Tensor
    weight_scale: torch.Tensor
    input_scale: torch.Tensor


def scaled_mm_linear(x: torch.Tensor, fp8: Fp8Linear, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + b`` with x quantized to e4m3 by its static scale (:func:`~javisrt.kernels.fp8.quantize_e4m3`,
    one fused launch), through ``torch._scaled_mm``.

    x [..., in] (fp32/fp16/bf16) -> [..., out] in x's dtype. The bias is added by ``_scaled_mm`` for 16-bit
    outputs; for fp32 it is added after (cuBLASLt takes no bias with an fp32 output).
    """
    lead = x.shape[:-1]
    xq = quantize_e4m3(x.reshape(-1, x.shape[-1]), fp8.input_scale)  # one Triton launch
    fused = bias if bias is not None and x.dtype != torch.float32 else None
    out = torch._scaled_mm(
        xq, fp8.weight.t(), scale_a=fp8.input_scale, scale_b=fp8.weight_scale, bias=fused, out_dtype=x.dtype
    )
    if bias is not None and fused is None:
        out = out + bias
    return out.reshape(*lead, out.shape[-1])


def triton_fp8_linear(x: torch.Tensor, fp8: Fp8Linear, bias: torch.Tensor | None) -> torch.Tensor:
    """``x @ W^T + b`` through the Triton FP8 GEMM (:func:`~javisrt.kernels.fp8_linear.fp8_linear`: x
    quantized to e4m3 by its static scale in the GEMM's prologue); same contract as :func:`scaled_mm_linear`."""
    return fp8_linear(x, fp8.weight, fp8.weight_scale, fp8.input_scale, bias)


LINEAR_IMPLS = {"scaled_mm": scaled_mm_linear, "triton": triton_fp8_linear}  # TritonFp8Ops.linear_impl
DEFAULT_LINEAR_IMPL = "scaled_mm"  # not measured yet: bench/gpu_proof.py part 2 decides (module docstring)


def check_linear_impl(linear_impl: str) -> str:
    """``linear_impl`` when it names an FP8 Linear implementation (:data:`LINEAR_IMPLS`), else ConfigError."""
    if linear_impl not in LINEAR_IMPLS:
        raise ConfigError(
            f"triton-fp8: unknown FP8 Linear implementation {linear_impl!r}; choose one of "
            f"{', '.join(LINEAR_IMPLS)} (--fp8-linear)"
        )
    return linear_impl


@dataclass(frozen=True, eq=False)
class Fp8Plan:
    """The prepared FP8 state of one model: e4m3 weights and scales, keyed by the model's modules."""

    linears: Mapping[nn.Module, Fp8Linear]
    attention: Mapping[nn.Module, torch.Tensor]  # attention module -> fp32 [3] (q, k, v) kernel scales
    experts: Mapping[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]]  # expert -> (w1, w2 e4m3, scales [4])
    names: Mapping[nn.Module, str] = field(default_factory=dict)  # for error messages


def _scale(scales: Mapping[str, torch.Tensor], key: str, device: torch.device) -> torch.Tensor:
    if key not in scales:
        raise ConfigError(f"the FP8 scales have no entry {key!r}: they were calibrated for another model")
    value = scales[key].detach().to(device=device, dtype=torch.float32).reshape(())
    if not bool(torch.isfinite(value)) or float(value) <= 0:
        raise ConfigError(f"FP8 scale {key!r} is {float(value)}: not a positive finite number")
    return value


def _fp8_linear(layer: nn.Linear, scales: Mapping[str, torch.Tensor], name: str) -> Fp8Linear:
    dev = layer.weight.device
    s_in, s_w = (_scale(scales, k, dev) for k in linear_scale_keys(name))
    return Fp8Linear(to_e4m3(layer.weight.detach(), s_w), s_w, s_in)


@dataclass(frozen=True, eq=False)
class TritonFp8Ops(TritonOps):
    """The Triton kernels in e4m3 with calibrated per-tensor scales (module docstring); build it with
    :meth:`prepare`. ``layer`` is the attention module bound by :meth:`for_layer`. ``linear_impl``: the
    attention Linears' implementation, a key of :data:`LINEAR_IMPLS` (module docstring)."""

    name: str = "triton-fp8"
    plan: Fp8Plan | None = field(default=None, repr=False)
    layer: nn.Module | None = field(default=None, repr=False)
    linear_impl: str = DEFAULT_LINEAR_IMPL

    def __post_init__(self) -> None:
        check_linear_impl(self.linear_impl)
        if self.plan is None:
            raise ConfigError(
                "the triton-fp8 op set needs the model's FP8 scales: make the sidecar with "
                "`javisrt export --fp8-scales` and pass it (--fp8-scales PATH), or build the op set with "
                "TritonFp8Ops.prepare(model, scales)"
            )

    @classmethod
    def prepare(cls, model: nn.Module, scales: Mapping[str, torch.Tensor], linear_impl: str = DEFAULT_LINEAR_IMPL) -> TritonFp8Ops:
        """The op set for ``model`` (its weights quantized to e4m3 now, on their device) with ``scales``:
        per-tensor fp32 scales keyed as :func:`linear_scale_keys` / :func:`attention_scale_keys` by the
        model's module names (``blocks.3.self_attn.q``). Every quantized layer must have its scales.
        ``linear_impl``: the attention Linears' implementation (a key of :data:`LINEAR_IMPLS`)."""
        check_linear_impl(linear_impl)  # before quantizing the weights
        from javisrt.engine.model import Block, SelfAttention  # CrossAttention derives from SelfAttention

        head_dim = getattr(getattr(model, "cfg", None), "head_dim", None)
        if head_dim is not None and head_dim < MIN_HEAD_DIM:
            raise ConfigError(f"triton-fp8: head_dim {head_dim} < {MIN_HEAD_DIM} (the e4m3 QK^T dots have depth head_dim/2)")

        linears: dict[nn.Module, Fp8Linear] = {}
        attention: dict[nn.Module, torch.Tensor] = {}
        experts: dict[nn.Module, tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = {}
        names: dict[nn.Module, str] = {}
        for name, module in model.named_modules():
            names[module] = name
            if isinstance(module, SelfAttention):
                for lin in ATTENTION_LINEARS:
                    linears[getattr(module, lin)] = _fp8_linear(getattr(module, lin), scales, f"{name}.{lin}")
                dev = module.q.weight.device
                attention[module] = torch.stack([_scale(scales, k, dev) for k in attention_scale_keys(name)])
            elif isinstance(module, Block):
                for expert_name in ("ffn", "audio_ffn"):
                    expert = getattr(module, expert_name, None)
                    if expert is None:
                        continue
                    up, down = (_fp8_linear(expert[i], scales, f"{name}.{expert_name}.{i}") for i in EXPERT_LINEARS)
                    # the FFN kernel's [4] scales: modulated input, w1, GELU output (= down's input), w2
                    s = torch.stack([up.input_scale, up.weight_scale, down.input_scale, down.weight_scale])
                    experts[expert] = (up.weight, down.weight, s)
        if not attention:
            raise ConfigError("triton-fp8: the model has no attention modules to quantize")
        return cls(plan=Fp8Plan(linears, attention, experts, names), linear_impl=linear_impl)

    def _plan(self) -> Fp8Plan:
        assert self.plan is not None  # __post_init__
        return self.plan

    def _missing(self, module: nn.Module, what: str) -> ConfigError:
        name = self._plan().names.get(module, type(module).__name__)
        return ConfigError(f"triton-fp8: no FP8 {what} for {name!r} (the op set was prepared for another model)")

    def for_layer(self, module: nn.Module) -> OpSet:
        if module not in self._plan().attention:
            raise self._missing(module, "attention scales")
        return dataclasses.replace(self, layer=module)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        fp8 = self._plan().linears.get(layer)
        if fp8 is None:
            raise self._missing(layer, "weights")
        return LINEAR_IMPLS[self.linear_impl](x, fp8, layer.bias)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        if self.layer is None:
            raise ConfigError("triton-fp8: attention outside a layer (the model calls ops.for_layer(self) first)")
        if rope is not None and rope[0].dtype != torch.float32:  # as TritonOps: the kernel rotates in fp32
            rope = (rope[0].float(), rope[1].float())
        return rope_attention_fp8(q, k, v, rope, self._plan().attention[self.layer])

    def modality_ffn(
        self,
        x: torch.Tensor,
        num_video_tokens: int,
        video: Expert | None,
        audio: Expert | None,
        video_mod: Modulation | None,
        audio_mod: Modulation | None,
        eps: float,
    ) -> torch.Tensor:
        return modality_ffn_fp8(
            x, num_video_tokens, self._expert(video), self._expert(audio), video_mod, audio_mod, eps
        )

    def _expert(self, expert: Expert | None) -> FP8FFNWeights | None:
        if expert is None:
            return None
        state = self._plan().experts.get(expert) if isinstance(expert, nn.Module) else None
        if state is None:
            raise self._missing(expert, "expert weights") if isinstance(expert, nn.Module) else ConfigError(
                "triton-fp8: an FFN expert given as bare weights has no FP8 scales"
            )
        w1, w2, scales = state
        up, down = expert[0], expert[2]  # type: ignore[index]
        return FP8FFNWeights(w1, up.bias, w2, down.bias, scales)
