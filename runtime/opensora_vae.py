"""The Open-Sora 1.2 video VAE (``OpenSoraVAE_V1_2``) that JavisDiT v0.1 decodes with (v01-spec.md §1–2).

Two stages, as Open-Sora's ``VideoAutoencoderPipeline`` (``opensora/models/vae/vae.py``; JavisDiT v0.1
carries the same file as ``javisdit/models/vae/vae.py``):

  pixels [B, 3, F, H, W]
    -- spatial VAE: the SDXL ``AutoencoderKL`` (diffusers; PixArt-Sigma's ``sdxlvae`` folder), frame by
       frame, 4 frames per call (``micro_batch_size``), latents scaled by **0.18215** (Open-Sora's
       constant, not the SDXL config's 0.13025)
  spatial latents [B, 4, F, H/8, W/8]
    -- temporal VAE (``VAE_Temporal_SD``, written here from the Open-Sora facts: causal 3D convs,
       MAGVIT-style res blocks, x4 in time), on micro-frames of **17** frames -> 5 latent frames each
  latents [B, 4, T, H/8, W/8], normalised ``(z - shift) / scale`` with
       shift = (-0.10, 0.34, 0.27, 0.98), scale = (3.85, 2.32, 2.33, 3.06).

Geometry (:func:`latent_frames`): 17 frames -> 5 latent frames; a remainder ``r`` of a micro-frame is
front-padded to a multiple of 4: ``ceil(r / 4)`` latent frames. 102 frames ("4s") -> 6 x 5 = 30.
Decoding walks the latent axis in chunks of 5 and asks each chunk for ``min(17, frames left)`` frames.
The chunks are decoded independently: the temporal VAE's causal convolutions never see across a
micro-frame boundary (that is what the released model was trained with).

Temporal VAE facts (``opensora/models/vae/vae_temporal.py``; our code, their layout):
  * ``CausalConv3d``: zero padding ``(w//2, w//2, h//2, h//2, (kt-1) + 1 - stride_t, 0)`` (front-only
    in time), then ``nn.Conv3d`` with stride ``(stride_t, 1, 1)``; the weight lives at ``<name>.conv``.
  * ``ResBlock``: GroupNorm -> SiLU -> conv3x3x3 (no bias) -> GroupNorm -> SiLU -> conv3x3x3 (no bias),
    plus a 1x1x1 conv (no bias) on the residual when the width changes.
  * Encoder (filters f=128, multipliers (1, 2, 2, 4), 4 res blocks each, ``temporal_downsample``
    (False, True, True)): conv_in (no bias) -> per level res blocks, then a stride-2 (time) conv where
    the level downsamples (an empty Identity slot where it does not) -> 4 res blocks -> GroupNorm ->
    SiLU -> 1x1x1 conv to 2·4 moments. ``quant_conv`` 1x1x1 8 -> 8.
  * Decoder: ``post_quant_conv`` 1x1x1 4 -> 4, conv1 (bias) to 4f, 4 res blocks, then per level from
    the top: res blocks, and where the level below downsampled a conv to 2x the width followed by
    depth-to-time ``B (C ts) T H W -> B C (T ts) H W``; GroupNorm -> SiLU -> conv_out (bias) to 4.
    Output frames are cropped at the front by the encoder's padding.
  * Posterior: ``mean, logvar = moments.chunk(2, dim=1)``, logvar clamped to [-30, 20].

Released checkpoint ``OpenSora-VAE-v1.2``: ``config.json`` (``VideoAutoencoderPipeline``: scale, shift,
micro_frame_size 17, vae_2d / vae_temporal types) and ``model.safetensors`` holding
``spatial_vae.module.<diffusers AutoencoderKL keys>``, ``temporal_vae.<keys above>`` and the ``scale`` /
``shift`` buffers [1, 4, 1, 1, 1]. :class:`OpenSoraVAE` has exactly that state dict (its safetensors
size equals the released file's to the byte, tested), so :func:`load_opensora_vae` is a strict
``load_state_dict``.
"""

from __future__ import annotations

import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, cast

import torch
import torch.nn.functional as F
from torch import nn

from javisrt.engine.checkpoint import check_state_dict
from javisrt.engine.errors import CheckpointError, ConfigError, ShapeError
from javisrt.engine.v01_checkpoint import _read_config_json, read_weights

log = logging.getLogger(__name__)

MICRO_FRAMES = 17  # frames per temporal-VAE call (micro_frame_size)
SPATIAL_MICRO_BATCH = 4  # frames per spatial-VAE call (micro_batch_size)
SPATIAL_SCALING = 0.18215  # VideoAutoencoderKL's scaling_factor (the SDXL config says 0.13025; unused)
LATENT_SHIFT = (-0.10, 0.34, 0.27, 0.98)
LATENT_SCALE = (3.85, 2.32, 2.33, 3.06)

# PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers, subfolder vae (the SDXL VAE): the fields that shape
# the network. OpenSora-VAE-v1.2's config.json names that folder instead of carrying them.
SDXL_VAE_CONFIG: dict[str, Any] = dict(
    in_channels=3,
    out_channels=3,
    down_block_types=("DownEncoderBlock2D",) * 4,
    up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512),
    layers_per_block=2,
    act_fn="silu",
    latent_channels=4,
    norm_num_groups=32,
    sample_size=512,
    scaling_factor=0.13025,
    force_upcast=False,
)

# The SDXL VAE's 4 levels (x8 spatial, mid-block attention kept) at tiny widths: tests and the tiny demo.
TINY_SPATIAL_CONFIG: dict[str, Any] = dict(
    SDXL_VAE_CONFIG,
    block_out_channels=(4, 4, 8, 8),
    layers_per_block=1,
    norm_num_groups=4,
    sample_size=32,
)


# ---------------------------------------------------------------------------------------------------
# Configuration and geometry
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class TemporalVAEConfig:
    """Shapes of ``VAE_Temporal`` (defaults: ``VAE_Temporal_SD``, the released model)."""

    name: str
    channels: int = 4  # in_out_channels = the spatial VAE's latent channels
    latent_channels: int = 4  # latent_embed_dim = embed_dim
    filters: int = 128
    num_res_blocks: int = 4
    channel_multipliers: tuple[int, ...] = (1, 2, 2, 4)
    temporal_downsample: tuple[bool, ...] = (False, True, True)
    num_groups: int = 32

    time_factor: int = field(init=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "channel_multipliers", tuple(self.channel_multipliers))
        object.__setattr__(self, "temporal_downsample", tuple(bool(t) for t in self.temporal_downsample))
        if len(self.temporal_downsample) != len(self.channel_multipliers) - 1:
            raise ConfigError("temporal_downsample needs one entry per level but the last")
        for attr in ("channels", "latent_channels", "filters", "num_res_blocks", "num_groups"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{attr} must be positive, got {getattr(self, attr)}")
        for mult in self.channel_multipliers:
            if (self.filters * mult) % self.num_groups:
                raise ConfigError(f"width {self.filters * mult} is not divisible by num_groups {self.num_groups}")
        object.__setattr__(self, "time_factor", 2 ** sum(self.temporal_downsample))

    @classmethod
    def from_name(cls, name: str) -> TemporalVAEConfig:
        try:
            return TEMPORAL_PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown temporal VAE preset {name!r}; known: {sorted(TEMPORAL_PRESETS)}") from None


TEMPORAL_PRESETS = {
    "opensora-v1.2": TemporalVAEConfig(name="opensora-v1.2"),
    # Tests: the same levels and x4 time factor (so 17 -> 5 holds), 8 filters, 1 res block per level.
    "tiny": TemporalVAEConfig(name="tiny", filters=8, num_res_blocks=1, num_groups=4),
}


def _time_padding(frames: int, factor: int) -> int:
    """Front padding that makes ``frames`` a multiple of the temporal factor."""
    return (factor - frames % factor) % factor


def latent_frames(num_frames: int, micro_frames: int = MICRO_FRAMES, time_factor: int = 4) -> int:
    """Latent frames for ``num_frames`` pixel frames (``VideoAutoencoderPipeline.get_latent_size``):
    ``num_frames // 17 · 5`` plus ``ceil(r / 4)`` for a remainder ``r``. 51 -> 15, 102 -> 30."""
    if num_frames <= 0:
        raise ConfigError(f"num_frames must be positive, got {num_frames}")
    per_micro = (micro_frames + _time_padding(micro_frames, time_factor)) // time_factor
    rest = num_frames % micro_frames
    tail = (rest + _time_padding(rest, time_factor)) // time_factor if rest else 0
    return num_frames // micro_frames * per_micro + tail


# ---------------------------------------------------------------------------------------------------
# Temporal VAE
# ---------------------------------------------------------------------------------------------------


class CausalConv3d(nn.Module):
    """Conv3d that pads time on the front only (zeros) and space symmetrically; weight at ``.conv``."""

    def __init__(self, cin: int, cout: int, kernel: int = 3, stride_t: int = 1, bias: bool = True) -> None:
        super().__init__()
        k = kernel
        pad_t = (k - 1) + (1 - stride_t)
        self.padding = (k // 2, k // 2, k // 2, k // 2, pad_t, 0)  # F.pad order: W, H, T
        self.conv = nn.Conv3d(cin, cout, (k, k, k), stride=(stride_t, 1, 1), bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(F.pad(x, self.padding))


class ResBlock(nn.Module):
    """GN -> SiLU -> conv -> GN -> SiLU -> conv, + (1x1x1 conv of) the input."""

    def __init__(self, cin: int, cout: int, groups: int) -> None:
        super().__init__()
        self.norm1 = nn.GroupNorm(groups, cin)
        self.conv1 = CausalConv3d(cin, cout, 3, bias=False)
        self.norm2 = nn.GroupNorm(groups, cout)
        self.conv2 = CausalConv3d(cout, cout, 3, bias=False)
        self.conv3 = CausalConv3d(cin, cout, 1, bias=False) if cin != cout else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return h + (self.conv3(x) if self.conv3 is not None else x)


class TemporalEncoder(nn.Module):
    """[B, C, F, h, w] (F a multiple of the time factor) -> moments [B, 2·latent, F / factor, h, w]."""

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        self.conv_in = CausalConv3d(cfg.channels, f, 3, bias=False)
        self.block_res_blocks = nn.ModuleList()
        self.conv_blocks = nn.ModuleList()
        prev = f
        levels = len(cfg.channel_multipliers)
        for i, mult in enumerate(cfg.channel_multipliers):
            width = f * mult
            blocks = nn.ModuleList()
            for _ in range(n):
                blocks.append(ResBlock(prev, width, g))
                prev = width
            self.block_res_blocks.append(blocks)
            if i < levels - 1:
                # A level without time downsampling keeps an (empty) Identity slot: the indices of the
                # released keys (conv_blocks.1, conv_blocks.2) depend on it.
                down = cfg.temporal_downsample[i]
                self.conv_blocks.append(CausalConv3d(prev, width, 3, stride_t=2) if down else nn.Identity())
        self.res_blocks = nn.ModuleList(ResBlock(prev, prev, g) for _ in range(n))
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv2 = CausalConv3d(prev, 2 * cfg.latent_channels, 1)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = self.conv_in(x)
        for i, blocks in enumerate(self.block_res_blocks):
            for block in cast(nn.ModuleList, blocks):
                x = block(x)
            if i < len(self.conv_blocks):
                x = self.conv_blocks[i](x)
        for block in self.res_blocks:
            x = block(x)
        return self.conv2(F.silu(self.norm1(x)))


class TemporalDecoder(nn.Module):
    """[B, latent, T, h, w] -> [B, C, T·factor, h, w] (uncropped)."""

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        f, g, n = cfg.filters, cfg.num_groups, cfg.num_res_blocks
        levels = len(cfg.channel_multipliers)
        top = f * cfg.channel_multipliers[-1]
        self.conv1 = CausalConv3d(cfg.latent_channels, top, 3)
        self.res_blocks = nn.ModuleList(ResBlock(top, top, g) for _ in range(n))
        blocks_by_level: list[nn.ModuleList] = [nn.ModuleList()] * levels
        convs_by_level: list[nn.Module] = [nn.Identity()] * (levels - 1)
        self.time_strides = [1] * (levels - 1)
        prev = top
        for i in reversed(range(levels)):
            width = f * cfg.channel_multipliers[i]
            blocks = nn.ModuleList()
            for _ in range(n):
                blocks.append(ResBlock(prev, width, g))
                prev = width
            blocks_by_level[i] = blocks
            if i > 0 and cfg.temporal_downsample[i - 1]:
                convs_by_level[i - 1] = CausalConv3d(prev, prev * 2, 3)  # then depth-to-time x2
                self.time_strides[i - 1] = 2
        self.block_res_blocks = nn.ModuleList(blocks_by_level)
        self.conv_blocks = nn.ModuleList(convs_by_level)
        self.norm1 = nn.GroupNorm(g, prev)
        self.conv_out = CausalConv3d(prev, cfg.channels, 3)

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        x = self.conv1(z)
        for block in self.res_blocks:
            x = block(x)
        for i in reversed(range(len(self.block_res_blocks))):
            for block in cast(nn.ModuleList, self.block_res_blocks[i]):
                x = block(x)
            if i > 0 and self.time_strides[i - 1] > 1:
                x = self.conv_blocks[i - 1](x)
                b, c, t, h, w = x.shape
                ts = self.time_strides[i - 1]
                # "B (C ts) T H W -> B C (T ts) H W": the stride index is the faster one in the channels.
                x = x.view(b, c // ts, ts, t, h, w).permute(0, 1, 3, 2, 4, 5).reshape(b, c // ts, t * ts, h, w)
        return self.conv_out(F.silu(self.norm1(x)))


class TemporalVAE(nn.Module):
    """``VAE_Temporal``: one micro-frame at a time (see :class:`OpenSoraVAE` for the chunking)."""

    def __init__(self, cfg: TemporalVAEConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.encoder = TemporalEncoder(cfg)
        self.quant_conv = CausalConv3d(2 * cfg.latent_channels, 2 * cfg.latent_channels, 1)
        self.post_quant_conv = CausalConv3d(cfg.latent_channels, cfg.latent_channels, 1)
        self.decoder = TemporalDecoder(cfg)

    def encode(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """[B, C, F, h, w] -> (mean, logvar), each [B, latent, ceil(F / factor), h, w]."""
        x = F.pad(x, (0, 0, 0, 0, _time_padding(x.shape[2], self.cfg.time_factor), 0))
        moments = self.quant_conv(self.encoder(x)).to(x.dtype)
        mean, logvar = moments.chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """[B, latent, T, h, w] -> [B, C, num_frames, h, w]; ``num_frames`` sets the front crop."""
        x = self.decoder(self.post_quant_conv(z))
        return x[:, :, _time_padding(num_frames, self.cfg.time_factor) :]


# ---------------------------------------------------------------------------------------------------
# The two-stage pipeline
# ---------------------------------------------------------------------------------------------------


class SpatialVAE(nn.Module):
    """``VideoAutoencoderKL``: a diffusers ``AutoencoderKL`` applied per frame (its weights at ``.module``)."""

    def __init__(self, module: Any, micro_batch: int = SPATIAL_MICRO_BATCH, scaling: float = SPATIAL_SCALING) -> None:
        super().__init__()
        self.module: Any = module  # diffusers AutoencoderKL
        self.micro_batch = micro_batch
        self.scaling = scaling

    def _frames(self, x: torch.Tensor, fn: Any) -> torch.Tensor:
        b = x.shape[0]
        flat = x.transpose(1, 2).flatten(0, 1)  # B C T H W -> (B T) C H W
        out = torch.cat([fn(flat[i : i + self.micro_batch]) for i in range(0, flat.shape[0], self.micro_batch)])
        return out.unflatten(0, (b, -1)).transpose(1, 2)

    def decode(self, z: torch.Tensor) -> torch.Tensor:
        """[B, 4, F, h, w] -> [B, 3, F, 8h, 8w]."""
        return self._frames(z, lambda c: self.module.decode(c / self.scaling).sample)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """[B, 3, F, H, W] -> [B, 4, F, H/8, W/8]; the posterior mean, or a sample drawn from ``generator``."""

        def one(chunk: torch.Tensor) -> torch.Tensor:
            dist = self.module.encode(chunk).latent_dist
            return (dist.sample(generator) if generator is not None else dist.mean) * self.scaling

        return self._frames(x, one)


class OpenSoraVAE(nn.Module):
    """``OpenSoraVAE_V1_2``: spatial SDXL VAE + temporal VAE, micro-frames of 17, latent scale/shift.

    State dict = the released ``model.safetensors`` (``spatial_vae.module.*``, ``temporal_vae.*``,
    ``scale``, ``shift``).
    """

    scale: torch.Tensor
    shift: torch.Tensor

    def __init__(
        self,
        spatial: Any,
        temporal_cfg: TemporalVAEConfig,
        micro_frames: int = MICRO_FRAMES,
        scale: tuple[float, ...] = LATENT_SCALE,
        shift: tuple[float, ...] = LATENT_SHIFT,
    ) -> None:
        super().__init__()
        channels = temporal_cfg.latent_channels
        if len(scale) != channels or len(shift) != channels:
            raise ConfigError(f"scale and shift need {channels} values, got {len(scale)} and {len(shift)}")
        self.spatial_vae = SpatialVAE(spatial)
        self.temporal_vae = TemporalVAE(temporal_cfg)
        self.micro_frames = micro_frames
        # float32 like the reference's torch.tensor(config.scale); cast to the latent's dtype at use
        self.register_buffer("scale", torch.tensor(scale, dtype=torch.float32).view(1, -1, 1, 1, 1))
        self.register_buffer("shift", torch.tensor(shift, dtype=torch.float32).view(1, -1, 1, 1, 1))

    @property
    def micro_latent_frames(self) -> int:
        return latent_frames(self.micro_frames, self.micro_frames, self.temporal_vae.cfg.time_factor)

    def latent_frames(self, num_frames: int) -> int:
        return latent_frames(num_frames, self.micro_frames, self.temporal_vae.cfg.time_factor)

    def decode(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents [B, 4, T, h, w] -> pixels [B, 3, num_frames, 8h, 8w] (about [-1, 1])."""
        return self.spatial_vae.decode(self.decode_temporal(z, num_frames))

    def decode_temporal(self, z: torch.Tensor, num_frames: int) -> torch.Tensor:
        """Normalised latents [B, 4, T, h, w] -> spatial latents [B, 4, num_frames, h, w], micro-frame by
        micro-frame: latent chunks of 5 -> min(17, frames left) frames each."""
        if z.ndim != 5 or z.shape[1] != self.scale.shape[1]:
            raise ShapeError(f"video latent must be [B,{self.scale.shape[1]},T,h,w], got {tuple(z.shape)}")
        if z.shape[2] != self.latent_frames(num_frames):
            raise ShapeError(f"{num_frames} frames take {self.latent_frames(num_frames)} latent frames, got {z.shape[2]}")
        z = z * self.scale.to(z.dtype) + self.shift.to(z.dtype)
        step, left, chunks = self.micro_latent_frames, num_frames, []
        for i in range(0, z.shape[2], step):  # each micro-frame on its own: no state crosses a boundary
            chunks.append(self.temporal_vae.decode(z[:, :, i : i + step], num_frames=min(self.micro_frames, left)))
            left -= self.micro_frames
        return torch.cat(chunks, dim=2)

    def encode(self, x: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Pixels [B, 3, F, H, W] in [-1, 1] -> normalised latents [B, 4, latent_frames(F), H/8, W/8].

        The reference samples both posteriors; here the means are used unless ``generator`` is given
        (then both samples are drawn from it: spatial first, then each temporal micro-frame)."""
        spatial = self.spatial_vae.encode(x, generator)
        parts = []
        for i in range(0, spatial.shape[2], self.micro_frames):
            mean, logvar = self.temporal_vae.encode(spatial[:, :, i : i + self.micro_frames])
            if generator is not None:
                noise = torch.randn(mean.shape, generator=generator, device=mean.device, dtype=mean.dtype)
                mean = mean + torch.exp(0.5 * logvar) * noise
            parts.append(mean)
        z = torch.cat(parts, dim=2)
        return (z - self.shift.to(z.dtype)) / self.scale.to(z.dtype)


# ---------------------------------------------------------------------------------------------------
# Building and loading
# ---------------------------------------------------------------------------------------------------


def build_opensora_vae(
    spatial_config: dict[str, Any] | None = None,
    temporal_cfg: TemporalVAEConfig | str = "opensora-v1.2",
    device: torch.device | str = "cpu",
    **kwargs: Any,
) -> OpenSoraVAE:
    """An :class:`OpenSoraVAE` with freshly initialised weights (``device="meta"``: no memory)."""
    from diffusers import AutoencoderKL

    tcfg = TemporalVAEConfig.from_name(temporal_cfg) if isinstance(temporal_cfg, str) else temporal_cfg
    with torch.device(device):
        spatial = AutoencoderKL(**(spatial_config or SDXL_VAE_CONFIG))
        return OpenSoraVAE(spatial, tcfg, **kwargs)


def _pipeline_settings(data: dict[str, Any], where: Path) -> dict[str, Any]:
    """micro_frames / scale / shift from a ``VideoAutoencoderPipeline`` config.json, with its types checked."""
    if data.get("model_type", "VideoAutoencoderPipeline") != "VideoAutoencoderPipeline":
        raise CheckpointError(f"{where}/config.json model_type {data.get('model_type')!r} is not VideoAutoencoderPipeline")
    kind_2d = (data.get("vae_2d") or {}).get("type", "VideoAutoencoderKL")
    kind_t = (data.get("vae_temporal") or {}).get("type", "VAE_Temporal_SD")
    if kind_2d != "VideoAutoencoderKL" or kind_t != "VAE_Temporal_SD":
        raise NotImplementedError(
            f"{where}: only VideoAutoencoderKL + VAE_Temporal_SD are implemented, got {kind_2d!r} + {kind_t!r}"
        )
    if data.get("cal_loss"):
        raise NotImplementedError(f"{where}: cal_loss=True (the training-time pipeline) is not implemented")
    micro = data.get("micro_frame_size", MICRO_FRAMES)
    if micro is None:
        raise NotImplementedError(f"{where}: micro_frame_size=None (whole-clip temporal VAE) is not implemented")
    scale, shift = data.get("scale", LATENT_SCALE), data.get("shift", LATENT_SHIFT)
    if not isinstance(scale, list | tuple) or not isinstance(shift, list | tuple):
        raise NotImplementedError(f"{where}: scalar scale/shift are not implemented")
    return dict(micro_frames=int(micro), scale=tuple(float(v) for v in scale), shift=tuple(float(v) for v in shift))


def load_opensora_vae(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
    spatial_config: dict[str, Any] | None = None,
    temporal_cfg: TemporalVAEConfig | str = "opensora-v1.2",
) -> OpenSoraVAE:
    """Load a released ``OpenSora-VAE-v1.2`` directory (config.json + model.safetensors) into eval mode.

    ``spatial_config`` / ``temporal_cfg`` give the architecture, which the released config.json does
    not carry (it names the PixArt SDXL VAE folder and ``VAE_Temporal_SD``); the defaults are the
    released sizes. The stored ``scale``/``shift`` buffers are what the reference uses (they overwrite
    the config's values on load); a disagreement with config.json is logged.
    """
    root = Path(path)
    if not root.is_dir():
        raise CheckpointError(f"Open-Sora VAE directory not found: {root}")
    settings = _pipeline_settings(_read_config_json(root), root)
    state = read_weights(root)
    model = build_opensora_vae(spatial_config, temporal_cfg, "meta", **settings)
    for name in ("scale", "shift"):
        if name in state:
            stored = state[name].float().flatten()
            if stored.shape != (len(settings[name]),) or not torch.allclose(stored, torch.tensor(settings[name])):
                log.warning("Open-Sora VAE: stored %s %s differs from config.json %s; using the stored one",
                            name, stored.tolist(), list(settings[name]))
        else:  # an export without the buffers: the config's values, as the reference would build them
            state[name] = torch.tensor(settings[name], dtype=torch.float32).view(1, -1, 1, 1, 1)
    check_state_dict(model, state)
    # scale/shift stay float32 (the reference's buffers); the weights take ``dtype``
    model.load_state_dict({k: v if k in ("scale", "shift") else v.to(dtype) for k, v in state.items()},
                          strict=True, assign=True)
    del state
    return model.requires_grad_(False).eval().to(device)


def save_opensora_vae(vae: OpenSoraVAE, directory: str | os.PathLike[str]) -> Path:
    """Write ``vae`` in the released layout (``config.json`` + ``model.safetensors``), each file atomically."""
    import json

    from safetensors.torch import save_file

    from javisrt.engine.atomic_file import atomic_file

    root = Path(directory)
    root.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().contiguous() for k, v in vae.state_dict().items()}
    with atomic_file(root / "model.safetensors") as tmp:
        save_file(state, tmp, metadata={"format": "pt"})
    config = {
        "architectures": ["VideoAutoencoderPipeline"], "model_type": "VideoAutoencoderPipeline", "cal_loss": False,
        "micro_frame_size": vae.micro_frames, "scale": vae.scale.flatten().tolist(), "shift": vae.shift.flatten().tolist(),
        "vae_2d": {"type": "VideoAutoencoderKL", "micro_batch_size": vae.spatial_vae.micro_batch,
                   "from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers", "subfolder": "vae"},
        "vae_temporal": {"type": "VAE_Temporal_SD", "from_pretrained": None},
    }
    with atomic_file(root / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return root


def random_opensora_vae(
    spatial_config: dict[str, Any] | None = None,
    temporal_cfg: TemporalVAEConfig | str = "tiny",
    seed: int = 0,
    **kwargs: Any,
) -> OpenSoraVAE:
    """Random weights (tiny architecture by default), drawn from one seeded generator: tests and the demo."""
    gen = torch.Generator().manual_seed(seed)
    model = build_opensora_vae(spatial_config or TINY_SPATIAL_CONFIG, temporal_cfg, "cpu", **kwargs)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim == 1:  # norm weights
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.02)
            else:  # 1/sqrt(fan_in): O(1) activations
                p.copy_(torch.randn(p.shape, generator=gen) / p[0].numel() ** 0.5)
    return model.requires_grad_(False).eval()
