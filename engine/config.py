"""The network configuration: one frozen, typed dataclass with derived fields and named presets.

``JavisConfig.from_name("javisdit-v1.0")`` is the released JavisDiT++ t2av model (model-spec.md §2),
``"wan2.1-t2v-1.3b"`` the video-only Wan2.1 T2V 1.3B, ``"tiny"`` a 2-layer model for tests and the demo.
Everything downstream takes this object, never a dict.
"""

from __future__ import annotations

import dataclasses
import enum
import json
from dataclasses import dataclass, field
from typing import Any, Self

from javisrt.engine.errors import ConfigError


class GenerationMode(enum.StrEnum):
    """What is generated: both modalities, audio only, or video only."""

    T2AV = "t2av"
    T2A = "t2a"
    T2V = "t2v"


class AudioPosMode(enum.StrEnum):
    """How audio tokens get 3D RoPE positions (model-spec.md §4.3).

    ``interleave_offset`` is the released setting; the other three are the paper's ablations.
    """

    INTERLEAVE_OFFSET = "interleave_offset"
    VANILLA = "vanilla"
    INTERLEAVE = "interleave"
    INTERPOLATE = "interpolate"


class ConfigDict:
    """JSON round trip of a frozen config dataclass's constructor fields (shared by every network config:
    ``JavisConfig`` here, ``V01Config`` and ``STPriorConfig`` for JavisDiT v0.1)."""

    def to_dict(self) -> dict[str, Any]:
        """Constructor arguments as plain JSON types (for checkpoint and engine metadata)."""
        out: dict[str, Any] = {}
        for f in dataclasses.fields(self):  # type: ignore[arg-type]
            if not f.init:
                continue
            value = getattr(self, f.name)
            out[f.name] = value.value if isinstance(value, enum.Enum) else (
                list(value) if isinstance(value, tuple) else value
            )
        return out

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), sort_keys=True)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> Self:
        names = {f.name for f in dataclasses.fields(cls) if f.init}  # type: ignore[arg-type]
        unknown = set(data) - names
        if unknown:
            raise ConfigError(f"unknown config fields {sorted(unknown)}")
        return cls(**data)


@dataclass(frozen=True)
class JavisConfig(ConfigDict):
    """Shapes of the DiT. ``model_type`` says which branches exist (t2av: video + audio; t2v: video)."""

    name: str
    model_type: GenerationMode = GenerationMode.T2AV
    dim: int = 1536
    num_layers: int = 30
    num_heads: int = 12
    ffn_dim: int = 8960
    audio_ffn_dim: int = 8960
    freq_dim: int = 256
    text_dim: int = 4096
    text_len: int = 512
    in_channels: int = 16
    out_channels: int = 16
    audio_in_channels: int = 8
    audio_out_channels: int = 8
    patch_size: tuple[int, int, int] = (1, 2, 2)
    audio_patch_size: tuple[int, int] = (2, 2)
    eps: float = 1e-6
    rope_theta: float = 10000.0
    audio_pos_mode: AudioPosMode = AudioPosMode.INTERLEAVE_OFFSET

    # Derived in __post_init__ (not constructor arguments).
    head_dim: int = field(init=False)
    rope_axis_dims: tuple[int, int, int] = field(init=False)
    has_audio: bool = field(init=False)

    def __post_init__(self) -> None:
        set_ = object.__setattr__  # frozen dataclass: derived fields are written once, here
        set_(self, "model_type", GenerationMode(self.model_type))
        set_(self, "audio_pos_mode", AudioPosMode(self.audio_pos_mode))
        set_(self, "patch_size", tuple(self.patch_size))
        set_(self, "audio_patch_size", tuple(self.audio_patch_size))
        if self.model_type is GenerationMode.T2A:
            raise ConfigError(
                "model_type t2a is a generation mode of a t2av model, not a network: "
                "build the t2av network and generate with mode=t2a"
            )
        for attr in ("dim", "num_layers", "num_heads", "ffn_dim", "freq_dim", "text_dim", "text_len"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{attr} must be positive, got {getattr(self, attr)}")
        if self.dim % self.num_heads:
            raise ConfigError(f"dim {self.dim} is not divisible by num_heads {self.num_heads}")
        head_dim = self.dim // self.num_heads
        # Wan's 3-axis RoPE split of the head (model-spec.md §4.1): [D - 4*(D//6), 2*(D//6), 2*(D//6)]
        # real channels for (t, h, w); 128 -> [44, 42, 42].
        axes = (head_dim - 4 * (head_dim // 6), 2 * (head_dim // 6), 2 * (head_dim // 6))
        if head_dim % 2 or any(a % 2 or a <= 0 for a in axes):
            raise ConfigError(f"head_dim {head_dim} cannot be split into three even RoPE axes {axes}")
        if self.freq_dim % 2:
            raise ConfigError(f"freq_dim must be even, got {self.freq_dim}")
        set_(self, "head_dim", head_dim)
        set_(self, "rope_axis_dims", axes)
        set_(self, "has_audio", self.model_type is GenerationMode.T2AV)

    # ---- derived sizes -------------------------------------------------------------------------
    @property
    def video_patch_out(self) -> int:
        """Channels of the video head: prod(patch) * out_channels (64 for Wan)."""
        p = self.patch_size
        return p[0] * p[1] * p[2] * self.out_channels

    @property
    def audio_patch_out(self) -> int:
        """Channels of the audio head: prod(audio_patch) * audio_out_channels (32 released)."""
        p = self.audio_patch_size
        return p[0] * p[1] * self.audio_out_channels

    def supports(self, mode: GenerationMode | str) -> bool:
        """Whether this network can generate in ``mode`` (t2a and t2av need the audio branch)."""
        mode = GenerationMode(mode)
        return mode is GenerationMode.T2V or self.has_audio

    # ---- presets ---------------------------------------------------------------------------------
    @classmethod
    def from_name(cls, name: str, **overrides: Any) -> JavisConfig:
        """A named preset, optionally with fields replaced (``from_name("tiny", num_layers=1)``)."""
        try:
            base = PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown preset {name!r}; known: {sorted(PRESETS)}") from None
        return dataclasses.replace(base, **overrides) if overrides else base


PRESETS: dict[str, JavisConfig] = {
    # The released JavisDiT++ (JavisVerse/JavisDiT-v1.0-jav): Wan2.1-T2V-1.3B + audio branch.
    "javisdit-v1.0": JavisConfig(name="javisdit-v1.0"),
    # Upstream Wan2.1-T2V-1.3B, video only (825 state-dict keys).
    "wan2.1-t2v-1.3b": JavisConfig(name="wan2.1-t2v-1.3b", model_type=GenerationMode.T2V),
    # Tests and the demo: same structure, 2 layers, tiny widths (head_dim 32 -> RoPE axes [12, 10, 10]).
    "tiny": JavisConfig(
        name="tiny",
        dim=64,
        num_layers=2,
        num_heads=2,
        ffn_dim=128,
        audio_ffn_dim=128,
        freq_dim=32,
        text_dim=32,
        text_len=16,
    ),
}
