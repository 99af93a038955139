"""The FP8 scales sidecar: the per-tensor e4m3 scales of the ``triton-fp8`` op set, calibrated once.

The scales are read off the SAME modelopt calibration as the Q/DQ export (``export/quantize.py``, driven
along sampling trajectories by :func:`~javisrt.runtime.calibration.calibrate_fp8`): every enabled
``TensorQuantizer``'s amax becomes ``scale = amax / 448``. They are written once, next to the checkpoint
(:func:`default_path`), as a small safetensors file of fp32 scalars keyed by module name
(``kernels/ops_triton_fp8.linear_scale_keys`` / ``attention_scale_keys``), with metadata: format
version, the checkpoint config's name and hash, and how the calibration was done. Loading checks the
format and the config; :func:`~javisrt.kernels.ops_triton_fp8.TritonFp8Ops.prepare` turns the scales and
the model's weights into the op set.
"""

from __future__ import annotations

import dataclasses
import hashlib
import json
import logging
import math
import os
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import nn

from javisrt.engine.atomic_file import atomic_file
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import CheckpointError, ConfigError
from javisrt.engine.model import Block, JavisDiT, SelfAttention
from javisrt.engine.ops import Expert, Modulation, TorchOps, apply_rope_ref, attention_ref, modality_ffn_ref
from javisrt.export.module import ExportableDiT
from javisrt.export.op_sets import MHA_SLOTS
from javisrt.kernels.fp8 import FP8_MAX
from javisrt.kernels.ops_triton_fp8 import ATTENTION_LINEARS, EXPERT_LINEARS, attention_scale_keys, linear_scale_keys

log = logging.getLogger(__name__)

__all__ = [
    "FORMAT",
    "FORMAT_VERSION",
    "SUFFIX",
    "AmaxObserverOps",
    "Fp8Scales",
    "config_hash",
    "default_path",
    "scales_from_calibration",
    "scales_from_forward",
]

FORMAT = "javisrt-fp8-scales"
FORMAT_VERSION = "1"
SUFFIX = ".fp8-scales.safetensors"
MAKE_COMMAND = "javisrt export --checkpoint CKPT --fp8-scales"  # how a missing sidecar is made


def config_hash(cfg: JavisConfig) -> str:
    """sha256 of the config's JSON (the checkpoint's network): scales fit only the network they came from."""
    return hashlib.sha256(cfg.to_json().encode()).hexdigest()


def default_path(checkpoint: str | os.PathLike[str]) -> Path:
    """``<checkpoint>.fp8-scales.safetensors``, beside the checkpoint file or directory."""
    return Path(str(Path(checkpoint)) + SUFFIX)


@dataclass(frozen=True)
class Fp8Scales:
    """Per-tensor fp32 scales keyed by module name, the config they fit and the calibration's description."""

    scales: Mapping[str, torch.Tensor]
    config_name: str
    config_hash: str
    calibration: str  # prompts, steps, shapes, "random stand-in embeddings" when so

    def save(self, path: str | os.PathLike[str]) -> Path:
        """Write the sidecar atomically (a crash leaves no half-written file)."""
        path = Path(path)
        tensors = {k: v.detach().to("cpu", torch.float32).reshape(()).contiguous() for k, v in self.scales.items()}
        meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "config_name": self.config_name,
                "config_hash": self.config_hash, "calibration": self.calibration}  # fmt: skip
        path.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(path) as tmp:
            save_file(tensors, tmp, metadata=meta)
        log.info("FP8 scales: %d tensors -> %s", len(tensors), path)
        return path

    @classmethod
    def load(cls, path: str | os.PathLike[str], cfg: JavisConfig) -> Fp8Scales:
        """Read a sidecar made for ``cfg``; :class:`ConfigError` when it is missing (naming the command
        that makes it) or made for another network, :class:`CheckpointError` when it is not one."""
        path = Path(path)
        if not path.is_file():
            raise ConfigError(
                f"no FP8 scales at {path}: the triton-fp8 op set needs them; make them with "
                f"`{MAKE_COMMAND} [--fp8-scales-out {path}]` or pass --fp8-scales PATH"
            )
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                meta = f.metadata() or {}
                scales = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 (safe_open has no iteration)
        except Exception as exc:
            raise CheckpointError(f"cannot read the FP8 scales {path}: {exc}") from exc
        if meta.get("format") != FORMAT or meta.get("format_version") != FORMAT_VERSION:
            raise CheckpointError(
                f"{path} is not a javisrt FP8 scales file of version {FORMAT_VERSION} "
                f"(format {meta.get('format')!r}, version {meta.get('format_version')!r})"
            )
        if meta.get("config_hash") != config_hash(cfg):
            raise ConfigError(
                f"the FP8 scales {path} were calibrated for config {meta.get('config_name')!r} "
                f"(hash {str(meta.get('config_hash'))[:12]}), not this checkpoint's {cfg.name!r} "
                f"(hash {config_hash(cfg)[:12]}): recalibrate with `{MAKE_COMMAND}`"
            )
        return cls(scales, meta["config_name"], meta["config_hash"], meta.get("calibration", ""))


def _amax_scale(quantizer: torch.nn.Module, name: str) -> torch.Tensor:
    amax = getattr(quantizer, "amax", None)
    if amax is None or not quantizer.is_enabled:
        raise ConfigError(f"FP8 scales: quantizer {name} is not calibrated (disabled or no amax)")
    amax = amax.detach().float().cpu().reshape(())
    if not bool(torch.isfinite(amax)) or float(amax) <= 0:
        raise ConfigError(f"FP8 scales: quantizer {name} has amax {float(amax)} (never saw data?)")
    return amax / FP8_MAX


def scales_from_calibration(wrapper: ExportableDiT, calibration: str) -> Fp8Scales:
    """The calibrated wrapper's quantizer ranges (``calibrate_fp8``) as the ``triton-fp8`` scales.

    Linears: input and weight quantizer amax / 448. Attention: k and v from the ``k_bmm`` / ``v_bmm``
    slots (amax / 448). The ``q_bmm`` slot sees q after RoPE *and* the 1/sqrt(D) scale (the Q/DQ graph's
    placement, ``export/op_sets.Fp8Ops``), while the kernel quantizes the rotated q before folding
    1/sqrt(D) into the QK^T scale; so its q scale is ``amax * sqrt(D) / 448`` (the same tensor
    range, in the kernel's units). The softmax slot's fixed amax 1 is not needed: the kernel quantizes
    P as ``P * 256`` (``kernels/rope_attention.P_SCALE``).
    """
    model = wrapper.model
    head_dim = model.cfg.head_dim
    scales: dict[str, torch.Tensor] = {}
    for name, module in model.named_modules():
        if isinstance(module, SelfAttention):  # and CrossAttention
            linears = [f"{name}.{lin}" for lin in ATTENTION_LINEARS]
            q, k, v = (_amax_scale(getattr(module, s), f"{name}.{s}") for s in MHA_SLOTS[:3])
            for key, value in zip(attention_scale_keys(name), (q * math.sqrt(head_dim), k, v), strict=True):
                scales[key] = value
        elif isinstance(module, Block):
            linears = [f"{name}.{e}.{i}" for e in ("ffn", "audio_ffn") if hasattr(module, e) for i in EXPERT_LINEARS]
        else:
            continue
        for lin in linears:
            layer = model.get_submodule(lin)
            for key, quantizer in zip(linear_scale_keys(lin), ("input_quantizer", "weight_quantizer"), strict=True):
                scales[key] = _amax_scale(getattr(layer, quantizer), f"{lin}.{quantizer}")
    return Fp8Scales(scales, model.cfg.name, config_hash(model.cfg), calibration)


def describe_calibration(num_prompts: int, steps: int, shapes: object, random_embeddings: bool) -> str:
    """The sidecar's calibration description (JSON): what the scales were measured on."""
    return json.dumps({"method": "modelopt max calibration along CFG Euler sampling trajectories",
                       "prompts": num_prompts, "steps": steps, "shapes": shapes,
                       "embeddings": "random stand-in embeddings" if random_embeddings else "text encoder"})  # fmt: skip


# ---- a quick stand-in: amax of plain forwards, without modelopt ---------------------------------------


@dataclass(frozen=True, eq=False)
class AmaxObserverOps(TorchOps):
    """The torch reference, recording the running amax of every tensor the ``triton-fp8`` op set
    quantizes, under the sidecar's keys: each quantized Linear's input and weight, the rotated q and k and
    the v of each attention. For machines without modelopt (the GPU proof): "max" calibration of the same
    tensors over whatever forwards run, not along a sampling trajectory unless the caller samples."""

    name: str = "amax-observer"
    names: Mapping[nn.Module, str] = field(default_factory=dict, repr=False)
    amax: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    layer: str | None = None

    def _record(self, key: str, x: torch.Tensor) -> None:
        value = x.detach().abs().amax().float()
        self.amax[key] = torch.maximum(self.amax[key], value) if key in self.amax else value

    def for_layer(self, module: nn.Module) -> AmaxObserverOps:
        return dataclasses.replace(self, layer=self.names[module])

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        key_in, key_w = linear_scale_keys(self.names[layer])
        self._record(key_in, x)
        self._record(key_w, layer.weight)
        return layer(x)  # type: ignore[no-any-return]

    def attention(
        self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor] | None
    ) -> torch.Tensor:
        assert self.layer is not None, "the model binds its attention layer first (ops.for_layer)"
        qr, kr = (q, k) if rope is None else (apply_rope_ref(q, *rope), apply_rope_ref(k, *rope))
        for key, t in zip(attention_scale_keys(self.layer), (qr, kr, v), strict=True):
            self._record(key, t)
        return attention_ref(q, k, v, rope)

    def modality_ffn(
        self, x: torch.Tensor, num_video_tokens: int, video: Expert | None, audio: Expert | None,
        video_mod: Modulation | None, audio_mod: Modulation | None, eps: float,
    ) -> torch.Tensor:  # fmt: skip
        return modality_ffn_ref(x, num_video_tokens, self._observed(video), self._observed(audio), video_mod, audio_mod, eps)

    def _observed(self, expert: Expert | None) -> Expert | None:
        """The expert's own modules, its two Linears through :meth:`linear` (recorded)."""
        if expert is None:
            return None
        up, act, down = expert[0], expert[1], expert[2]  # type: ignore[index]
        return lambda a: self.linear(down, act(self.linear(up, a)))


def scales_from_forward(model: JavisDiT, run: Callable[[], None], calibration: str) -> Fp8Scales:
    """Scales from the amax of whatever forwards ``run()`` makes ``model`` do (its op set is the observer
    meanwhile, then put back): ``amax / 448`` per tensor, the keys of :func:`scales_from_calibration`."""
    observer = AmaxObserverOps(names={m: n for n, m in model.named_modules()})
    own = model.ops
    model.set_ops(observer)
    try:
        with torch.no_grad():
            run()
    finally:
        model.set_ops(own)
    if not observer.amax:
        raise ConfigError("FP8 scales: the calibration run made no forward")
    scales = {k: (v / FP8_MAX).clamp_min(1e-12).cpu() for k, v in observer.amax.items()}
    return Fp8Scales(scales, model.cfg.name, config_hash(model.cfg), calibration)
