"""``ExportableDiT``: ``JavisDiT``'s own stages with the graph's inputs, for ``torch.onnx.export``.

The exported graph is a trace of the model's stages (``embed`` -> ``transformer`` -> ``heads``); this
wrapper only adapts the graph interface:

* the TA-RoPE cos/sin tables are graph inputs, built once per shape on the host
  (:meth:`DiTContract.rope_tables`) instead of the model's per-shape cache;
* the text context arrives already zero-padded to ``text_len`` with masked positions zeroed (the
  runtime does that, as the reference does), so the graph takes no mask;
* the op set is the graph flavour's (``engine/ops.py`` seam, implemented in ``export/op_sets.py``).

Token counts are read from tensor shapes by the stages themselves, so one graph serves every shape under
both exporters (dynamo for the native/plugin flavours, TorchScript for modelopt's FP8 path). The wrapper
holds no weights: a checkpoint loaded into ``JavisDiT`` is what gets exported, and modelopt's module
replacement (``nn.Linear`` -> ``QuantLinear``, the attention modules' MHA slots) is seen.
"""

from __future__ import annotations

import enum

import torch
from torch import nn

from javisrt.engine.model import JavisDiT
from javisrt.engine.ops import get_ops


class Flavor(enum.StrEnum):
    """The graph flavours (recorded in the graph's metadata) and the op set each one traces with."""

    NATIVE = "native"
    PLUGIN = "plugin"
    MATH = "math"  # the FP8 Q/DQ graph (export/quantize.py)


def op_set_name(flavor: Flavor | str, ffn_plugin: bool = True) -> str:
    """The op set of ``flavor``; ``ffn_plugin`` (plugin flavour): the FFN as a plugin node or native."""
    flavor = Flavor(flavor)
    if flavor is Flavor.PLUGIN:
        return "onnx-plugin" if ffn_plugin else "onnx-plugin-native-ffn"
    return "onnx-native" if flavor is Flavor.NATIVE else "onnx-fp8"


class ExportableDiT(nn.Module):
    """``forward(video, audio, timestep, context, rope_cos, rope_sin) -> (video_velocity, audio_velocity)``.

    Shapes and names: :class:`javisrt.export.contract.DiTContract`. A t2v network takes no ``audio``
    and returns only the video velocity.
    """

    def __init__(self, model: JavisDiT, flavor: Flavor | str = Flavor.NATIVE, ffn_plugin: bool = True) -> None:
        super().__init__()
        self.model = model
        self.flavor = Flavor(flavor)
        self.ops = get_ops(op_set_name(self.flavor, ffn_plugin))

    def forward(
        self, video: torch.Tensor, audio: torch.Tensor | None, timestep: torch.Tensor, context: torch.Tensor,
        rope_cos: torch.Tensor, rope_sin: torch.Tensor,
    ) -> tuple[torch.Tensor, ...]:  # fmt: skip
        """Contract inputs (``audio`` None for a t2v network) -> (video_velocity[, audio_velocity]) fp32."""
        m = self.model
        emb = m.embed(video, audio, timestep, context, ops=self.ops)
        x = m.transformer(emb, (rope_cos, rope_sin), ops=self.ops)
        video_velocity, audio_velocity = m.heads(x, emb.e, emb.grid)
        assert video_velocity is not None  # every exported graph has video tokens
        return (video_velocity,) if audio_velocity is None else (video_velocity, audio_velocity)
