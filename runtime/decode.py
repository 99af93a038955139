"""Latents -> pixels and waveforms (model-spec.md §6.1, §7).

Video: diffusers ``AutoencoderKLWan``. The DiT works on normalised latents ``(mu - mean) / std``
(§7.1); :class:`VideoDecoder` un-normalises, decodes, clamps to [-1, 1] and converts to uint8 with
``(x + 1) / 2 * 255 + 0.5`` truncated, as the reference's ``save_sample``.

Audio: AudioLDM2's ``AutoencoderKL`` + transformers' ``SpeechT5HifiGan``:
``mel = vae.decode(z / 0.4110932946205139)``, ``wave = vocoder(mel)``, cropped to
``int(F / 16 * 16000)`` samples (§7.2).

Weights come from local directories only: the Wan2.1 dir (``vae/`` in the diffusers layout, or the
original ``Wan2.1_VAE.pth``, converted on load) and the AudioLDM2 dir (``vae/`` and ``vocoder/``).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path
from typing import Any

import numpy as np
import torch

from javisrt.engine.errors import CheckpointError, ShapeError
from javisrt.engine.latents import AUDIO_SCALING_FACTOR, VIDEO_LATENT_MEAN, VIDEO_LATENT_STD

log = logging.getLogger(__name__)


def _place(module: Any, device: torch.device | str, dtype: torch.dtype) -> Any:
    """Move to ``device``; cast only when the dtype differs (diffusers logs a warning on any cast)."""
    first = next(module.parameters(), None)
    if first is not None and first.dtype != dtype:
        module = module.to(dtype=dtype)
    return module.to(device=device).eval().requires_grad_(False)


WAN_VAE_FILE = "Wan2.1_VAE.pth"


def to_uint8_frames(x: torch.Tensor) -> np.ndarray:
    """Decoded pixels [B, 3, F, H, W] in ~[-1, 1] -> uint8 frames [B, F, H, W, 3]: clamp, then
    ``(x + 1) / 2 * 255 + 0.5`` truncated, as the references' ``save_sample`` (Wan and Open-Sora alike)."""
    x = x.float().clamp(-1, 1)
    frames = ((x + 1) / 2 * 255 + 0.5).to(torch.uint8)
    return frames.permute(0, 2, 3, 4, 1).contiguous().cpu().numpy()


def _check_dir(path: Path, what: str) -> Path:
    if not path.is_dir():
        raise CheckpointError(f"{what} not found: {path}")
    if not (path / "config.json").is_file():
        raise CheckpointError(f"{what} {path} has no config.json (expected a diffusers/transformers folder)")
    return path


class VideoDecoder:
    """Wan VAE decoder for normalised latents [B, 16, T, H8, W8] -> uint8 frames [B, F, H, W, 3]."""

    def __init__(self, vae: Any, *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> None:
        self.vae = _place(vae, device, dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        channels = len(VIDEO_LATENT_MEAN)
        z_dim = int(getattr(vae.config, "z_dim", channels))
        if z_dim != channels:
            raise CheckpointError(f"the video VAE has z_dim {z_dim}; JavisDiT++ latents have {channels} channels")
        shape = (1, channels, 1, 1, 1)
        self.mean = torch.tensor(VIDEO_LATENT_MEAN, dtype=torch.float32).view(shape)
        self.std = torch.tensor(VIDEO_LATENT_STD, dtype=torch.float32).view(shape)
        cfg_mean = getattr(vae.config, "latents_mean", None)
        if cfg_mean is not None and not np.allclose(cfg_mean, VIDEO_LATENT_MEAN, atol=1e-4):
            log.warning("the video VAE config's latents_mean differs from Wan's; using Wan's (model-spec §7.1)")

    @torch.no_grad()
    def decode(self, latent: torch.Tensor) -> np.ndarray:
        if latent.ndim != 5 or latent.shape[1] != self.mean.shape[1]:
            raise ShapeError(f"video latent must be [B,16,T,H8,W8], got {tuple(latent.shape)}")
        z = latent.float().cpu() * self.std + self.mean
        x = self.vae.decode(z.to(self.device, self.dtype)).sample  # [B, 3, F, H, W] in ~[-1, 1]
        return to_uint8_frames(x)

    @classmethod
    def from_pretrained(
        cls, wan_dir: str | os.PathLike[str], *, device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32
    ) -> VideoDecoder:
        from diffusers import AutoencoderKLWan

        root = Path(wan_dir)
        if not root.is_dir():
            raise CheckpointError(f"Wan2.1 directory not found: {root}")
        if (root / "vae").is_dir():
            path = _check_dir(root / "vae", "Wan VAE")
            try:
                vae = AutoencoderKLWan.from_pretrained(str(path), torch_dtype=dtype, local_files_only=True)
            except (OSError, ValueError) as exc:
                raise CheckpointError(f"cannot load the Wan VAE from {path}: {exc}") from exc
            return cls(vae, device=device, dtype=dtype)
        if (root / WAN_VAE_FILE).is_file():
            return cls(load_wan_vae(root / WAN_VAE_FILE, dtype), device=device, dtype=dtype)
        raise CheckpointError(f"{root} has no video VAE: expected vae/ (diffusers layout) or {WAN_VAE_FILE}")


def load_wan_vae(path: Path, dtype: torch.dtype = torch.float32) -> Any:
    """Wan's original ``Wan2.1_VAE.pth`` as a diffusers ``AutoencoderKLWan``.

    Keys are renamed by diffusers' own ``convert_wan_vae_to_diffusers`` (what
    ``AutoencoderKLWan.from_single_file`` uses, without its hub config lookup). The architecture is
    the Wan2.1 VAE (diffusers' default config: dim_mult [1, 2, 4, 4], 2 res blocks); ``base_dim`` and
    ``z_dim`` are read off the weights, so smaller test checkpoints of the same layout load too.
    """
    from diffusers import AutoencoderKLWan
    from diffusers.loaders.single_file_utils import convert_wan_vae_to_diffusers

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt file or a pickle that needs code: refuse either way
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(state, dict) or "encoder.conv1.weight" not in state or "conv1.weight" not in state:
        raise CheckpointError(f"{path} is not a Wan2.1 VAE state dict (no encoder.conv1 / conv1 weights)")
    converted = convert_wan_vae_to_diffusers(state)
    base_dim = int(state["encoder.conv1.weight"].shape[0])
    z_dim = int(state["conv1.weight"].shape[0]) // 2
    with torch.device("meta"):
        vae: Any = AutoencoderKLWan(base_dim=base_dim, z_dim=z_dim)
    expected = set(vae.state_dict())
    missing, unexpected = sorted(expected - set(converted)), sorted(set(converted) - expected)
    if missing or unexpected:
        raise CheckpointError(
            f"{path} does not match the Wan2.1 VAE layout: missing {missing[:6]}, unexpected {unexpected[:6]}"
        )
    vae.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    return vae.eval().requires_grad_(False)


class AudioDecoder:
    """AudioLDM2 VAE + HiFi-GAN: latents [B, 8, mel/4, 16] -> waveforms [B, N] float32 at 16 kHz."""

    def __init__(
        self,
        vae: Any,
        vocoder: Any,
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
        scaling_factor: float = AUDIO_SCALING_FACTOR,
    ) -> None:
        self.vae = _place(vae, device, dtype)
        self.vocoder = _place(vocoder, device, dtype)
        self.device = torch.device(device)
        self.dtype = dtype
        self.scaling_factor = scaling_factor
        cfg_scale = getattr(vae.config, "scaling_factor", scaling_factor)
        if abs(cfg_scale - scaling_factor) > 1e-9:
            log.warning("audio VAE config scaling_factor %s != %s; using %s", cfg_scale, scaling_factor, scaling_factor)
        self.sample_rate = int(getattr(vocoder.config, "sampling_rate", 16000))

    @torch.no_grad()
    def decode(self, latent: torch.Tensor, num_samples: int) -> np.ndarray:
        if latent.ndim != 4:
            raise ShapeError(f"audio latent must be [B,8,Tm4,16], got {tuple(latent.shape)}")
        z = (latent.float() / self.scaling_factor).to(self.device, self.dtype)
        mel = self.vae.decode(z).sample  # [B, 1, T_mel, 64]
        wave = self.vocoder(mel.squeeze(1))  # [B, N]
        if wave.ndim == 1:
            wave = wave[None]
        if wave.shape[-1] < num_samples:
            raise ShapeError(f"the vocoder produced {wave.shape[-1]} samples, fewer than the {num_samples} needed")
        return wave[:, :num_samples].float().cpu().numpy()

    @classmethod
    def from_pretrained(
        cls,
        audioldm2_dir: str | os.PathLike[str],
        *,
        device: torch.device | str = "cpu",
        dtype: torch.dtype = torch.float32,
    ) -> AudioDecoder:
        from diffusers import AutoencoderKL
        from transformers import SpeechT5HifiGan

        root = Path(audioldm2_dir)
        if not root.is_dir():
            raise CheckpointError(f"AudioLDM2 directory not found: {root}")
        vae_dir = _check_dir(root / "vae", "AudioLDM2 VAE")
        voc_dir = _check_dir(root / "vocoder", "AudioLDM2 vocoder")
        try:
            vae = AutoencoderKL.from_pretrained(str(vae_dir), torch_dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the AudioLDM2 VAE from {vae_dir}: {exc}") from exc
        try:
            vocoder = SpeechT5HifiGan.from_pretrained(str(voc_dir), dtype=dtype, local_files_only=True)
        except (OSError, ValueError) as exc:
            raise CheckpointError(f"cannot load the vocoder from {voc_dir}: {exc}") from exc
        return cls(vae, vocoder, device=device, dtype=dtype)
