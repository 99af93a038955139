"""JavisDiT v0.1 network configurations (v01-spec.md §3–4): the VASTDiT3 DiT and the ST-prior estimator.

``V01Config.from_name("javisdit-v0.1-jav")`` is ``VASTDiT3-XL/2`` with every branch (the released
``JavisDiT-v0.1-jav`` and ``-jav-240p4s``), ``"javisdit-v0.1-audio"`` the audio-only model
(``only_infer_audio=True``: no video blocks, no ST-prior blocks, no video<->audio blocks), ``"tiny"`` /
``"tiny-audio"`` 2-layer versions for tests. ``STPriorConfig.from_name("javisdit-v0.1-prior")`` is the
``STIBPrior`` head (the ImageBind text tower that feeds it is not part of it).

The JSON round trip (``to_dict`` / ``from_dict``) is :class:`javisrt.engine.config.ConfigDict`, shared
with JavisDiT++'s ``JavisConfig``.
"""

from __future__ import annotations

import dataclasses
import enum
from dataclasses import dataclass, field
from typing import Any

from javisrt.engine.config import ConfigDict
from javisrt.engine.errors import ConfigError


class V01Branches(enum.StrEnum):
    """Which branches the network has: ``jav`` (video + audio + prior + bi-attention) or ``audio``."""

    JAV = "jav"
    AUDIO = "audio"


@dataclass(frozen=True)
class V01Config(ConfigDict):
    """Shapes of ``VASTDiT3`` (v01-spec.md §3). Defaults are the XL/2 sizes used by every release."""

    name: str
    branches: V01Branches = V01Branches.JAV
    hidden_size: int = 1152
    depth: int = 28
    num_heads: int = 16
    mlp_ratio: float = 4.0
    in_channels: int = 4
    audio_in_channels: int = 8
    patch_size: tuple[int, int, int] = (1, 2, 2)
    audio_patch_size: tuple[int, int] = (4, 1)
    caption_channels: int = 4096
    model_max_length: int = 300
    input_sq_size: int = 512
    freq_dim: int = 256
    pred_sigma: bool = True
    spatial_prior_len: int = 32
    temporal_prior_len: int = 32
    st_prior_channel: int = 128
    eps: float = 1e-6
    rope_theta: float = 10000.0

    # Derived in __post_init__.
    head_dim: int = field(init=False)
    mlp_hidden: int = field(init=False)
    out_channels: int = field(init=False)
    audio_out_channels: int = field(init=False)
    bi_dim: int = field(init=False)  # video<->audio attention width: min(C, C_audio) // 2
    bi_heads: int = field(init=False)  # num_heads // 2
    has_video: bool = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: derived fields are written once, here
        set_(self, "branches", V01Branches(self.branches))
        set_(self, "patch_size", tuple(self.patch_size))
        set_(self, "audio_patch_size", tuple(self.audio_patch_size))
        for attr in ("hidden_size", "depth", "num_heads", "caption_channels", "model_max_length", "freq_dim",
                     "spatial_prior_len", "temporal_prior_len", "st_prior_channel"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{attr} must be positive, got {getattr(self, attr)}")
        if self.hidden_size % self.num_heads:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by num_heads {self.num_heads}")
        head_dim = self.hidden_size // self.num_heads
        if head_dim % 2:
            raise ConfigError(f"head_dim {head_dim} must be even (interleaved RoPE pairs)")
        if self.hidden_size % 4:
            raise ConfigError(f"hidden_size {self.hidden_size} must be divisible by 4 (2D sin-cos embedding)")
        if self.num_heads % 2 or (self.hidden_size // 2) % (self.num_heads // 2):
            raise ConfigError(f"num_heads {self.num_heads} must be even and split hidden_size/2 (bi-attention)")
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim must be even, got {self.freq_dim}")
        set_(self, "head_dim", head_dim)
        set_(self, "mlp_hidden", int(self.hidden_size * self.mlp_ratio))
        mult = 2 if self.pred_sigma else 1
        set_(self, "out_channels", self.in_channels * mult)
        set_(self, "audio_out_channels", self.audio_in_channels * mult)
        set_(self, "bi_dim", self.hidden_size // 2)
        set_(self, "bi_heads", self.num_heads // 2)
        set_(self, "has_video", self.branches is V01Branches.JAV)

    @property
    def prior_len(self) -> int:
        return self.spatial_prior_len + self.temporal_prior_len

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> V01Config:
        """A named preset, optionally with fields replaced."""
        try:
            base = V01_PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown v0.1 preset {name!r}; known: {sorted(V01_PRESETS)}") from None
        return dataclasses.replace(base, **overrides) if overrides else base


@dataclass(frozen=True)
class STPriorConfig(ConfigDict):
    """The ``STIBPrior`` head (v01-spec.md §4): ``in_proj``, ``nn.Transformer``-shaped pre-norm
    encoder/decoder, ``out_proj`` to [mean | logvar]."""

    name: str
    text_dim: int = 1024  # ImageBind-huge text width
    text_len: int = 77
    hidden_size: int = 512
    nhead: int = 4
    num_encoder_layers: int = 4
    num_decoder_layers: int = 4
    feedforward_scale: int = 4
    spatial_token_num: int = 32
    temporal_token_num: int = 32
    out_dim: int = 128  # = the DiT's st_prior_channel
    eps: float = 1e-5  # nn.Transformer's layer_norm_eps default

    ff_dim: int = field(init=False)

    def __post_init__(self) -> None:
        for attr in ("text_dim", "hidden_size", "nhead", "num_encoder_layers", "num_decoder_layers",
                     "spatial_token_num", "temporal_token_num", "out_dim"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{attr} must be positive, got {getattr(self, attr)}")
        if self.hidden_size % self.nhead:
            raise ConfigError(f"hidden_size {self.hidden_size} is not divisible by nhead {self.nhead}")
        object.__setattr__(self, "ff_dim", self.hidden_size * self.feedforward_scale)

    @property
    def num_tokens(self) -> int:
        return self.spatial_token_num + self.temporal_token_num

    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> STPriorConfig:
        try:
            base = PRIOR_PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown prior preset {name!r}; known: {sorted(PRIOR_PRESETS)}") from None
        return dataclasses.replace(base, **overrides) if overrides else base


_TINY = dict(
    hidden_size=64, depth=2, num_heads=4, caption_channels=32, model_max_length=12,
    spatial_prior_len=4, temporal_prior_len=3, st_prior_channel=8,
)

V01_PRESETS: dict[str, V01Config] = {
    # JavisDiT/JavisDiT-v0.1-jav and -jav-240p4s: VASTDiT3-XL/2, 3,719,730,948 parameters.
    "javisdit-v0.1-jav": V01Config(name="javisdit-v0.1-jav"),
    # JavisDiT/JavisDiT-v0.1-audio: only_infer_audio, no prior / bi-attention; 1,213,806,084 parameters.
    "javisdit-v0.1-audio": V01Config(name="javisdit-v0.1-audio", branches=V01Branches.AUDIO),
    # Tests: same structure, 2 layers; head_dim 16 (a power of two, so the Triton attention runs too).
    "tiny": V01Config(name="tiny", **_TINY),  # type: ignore[arg-type]
    "tiny-audio": V01Config(name="tiny-audio", branches=V01Branches.AUDIO, **_TINY),  # type: ignore[arg-type]
}

PRIOR_PRESETS: dict[str, STPriorConfig] = {
    # JavisDiT/JavisDiT-v0.1-prior: 30,116,608 parameters (without the ImageBind text tower).
    "javisdit-v0.1-prior": STPriorConfig(name="javisdit-v0.1-prior"),
    # Pairs with the DiT preset "tiny" (4 + 3 prior tokens of 8 channels).
    "tiny": STPriorConfig(
        name="tiny", text_dim=24, text_len=9, hidden_size=32, nhead=2, num_encoder_layers=2,
        num_decoder_layers=2, feedforward_scale=2, spatial_token_num=4, temporal_token_num=3, out_dim=8,
    ),
}
