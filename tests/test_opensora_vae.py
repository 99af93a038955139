"""Open-Sora 1.2 video VAE: geometry, causal convolutions, micro-frame chunking, released layout, loader."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from javisrt.engine.errors import CheckpointError, ShapeError
from javisrt.runtime.opensora_vae import (
    LATENT_SCALE,
    LATENT_SHIFT,
    SPATIAL_SCALING,
    TINY_SPATIAL_CONFIG,
    CausalConv3d,
    OpenSoraVAE,
    build_opensora_vae,
    latent_frames,
    load_opensora_vae,
    random_opensora_vae,
)

# hpcai-tech/OpenSora-VAE-v1.2, commit 291a6d2 "Upload VideoAutoencoderPipeline": the LFS pointer of
# model.safetensors gives its size in bytes.
RELEASED_FILE_BYTES = 1_573_430_548

# The released config.json (same commit), verbatim in content.
RELEASED_CONFIG = {
    "architectures": ["VideoAutoencoderPipeline"], "cal_loss": False, "freeze_vae_2d": False,
    "from_pretrained": None, "micro_frame_size": 17, "model_type": "VideoAutoencoderPipeline",
    "scale": [3.85, 2.32, 2.33, 3.06], "shift": [-0.1, 0.34, 0.27, 0.98], "torch_dtype": "float32",
    "transformers_version": "4.36.2",
    "vae_2d": {"from_pretrained": "PixArt-alpha/pixart_sigma_sdxlvae_T5_diffusers", "local_files_only": False,
               "micro_batch_size": 4, "subfolder": "vae", "type": "VideoAutoencoderKL"},
    "vae_temporal": {"from_pretrained": None, "type": "VAE_Temporal_SD"},
}


@pytest.fixture(scope="module")
def tiny() -> OpenSoraVAE:
    return random_opensora_vae(seed=3)


@pytest.mark.parametrize(("frames", "latent"), [(17, 5), (51, 15), (102, 30), (204, 60), (1, 1), (20, 6), (40, 12)])
def test_latent_frames(frames: int, latent: int) -> None:
    """``get_latent_size``: 17 -> 5 per micro-frame, a remainder r -> ceil(r/4); "2s"/"4s" = 51/102."""
    assert latent_frames(frames) == latent


def _safetensors_bytes(state: dict[str, torch.Tensor]) -> int:
    """Size of the file ``save_file(state, metadata={"format": "pt"})`` writes for fp32 tensors: an 8-byte
    length, the compact JSON header (tensors in name order) padded with spaces to 8, then the data."""
    header: dict[str, object] = {"__metadata__": {"format": "pt"}}
    offset = 0
    for key in sorted(state):
        nbytes = state[key].numel() * 4
        header[key] = {"dtype": "F32", "shape": list(state[key].shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    text = json.dumps(header, separators=(",", ":"))
    return 8 + len(text) + (-len(text)) % 8 + offset


def test_safetensors_size_formula_matches_the_library(tiny: OpenSoraVAE, tmp_path: Path) -> None:
    state = {k: v.float().contiguous() for k, v in tiny.state_dict().items()}
    save_file(state, str(tmp_path / "m.safetensors"), metadata={"format": "pt"})
    assert (tmp_path / "m.safetensors").stat().st_size == _safetensors_bytes(state)


def test_released_layout_matches_the_released_file_size() -> None:
    """Every key name and shape of the full-size model (on meta), written as safetensors, gives exactly
    the released file's byte count: names enter through the header, shapes through header and data."""
    state = build_opensora_vae(device="meta").state_dict()
    assert _safetensors_bytes(state) == RELEASED_FILE_BYTES
    assert state["scale"].shape == (1, 4, 1, 1, 1)
    assert "temporal_vae.decoder.conv_blocks.2.conv.weight" in state
    assert "temporal_vae.decoder.conv_blocks.0.conv.weight" not in state  # the Identity slot
    assert sum(v.numel() for k, v in state.items() if k.startswith("temporal_vae.")) == 309_687_144


@pytest.mark.parametrize("stride", [1, 2])
def test_causal_conv_sees_only_the_past(stride: int) -> None:
    conv = CausalConv3d(3, 5, 3, stride_t=stride).double()
    x = torch.randn(1, 3, 8, 5, 6, dtype=torch.float64)
    y = conv(x)
    assert y.shape == (1, 5, 8 // stride, 5, 6)
    x2 = x.clone()
    x2[:, :, 5:] += 1.0  # change the future from frame 5 on
    y2 = conv(x2)
    # output t reads input frames t-2..t (stride 1) or 2t-1..2t+1 (stride 2, one frame of front padding)
    unchanged = 5 if stride == 1 else 2
    assert torch.equal(y[:, :, :unchanged], y2[:, :, :unchanged])
    assert not torch.equal(y[:, :, unchanged], y2[:, :, unchanged])


def test_temporal_decode_crops_to_the_requested_frames(tiny: OpenSoraVAE) -> None:
    z = torch.randn(1, 4, 5, 3, 4)
    assert tiny.temporal_vae.decode(z, num_frames=17).shape == (1, 4, 17, 3, 4)
    assert tiny.temporal_vae.decode(z[:, :, :2], num_frames=6).shape == (1, 4, 6, 3, 4)
    mean, logvar = tiny.temporal_vae.encode(torch.randn(1, 4, 17, 3, 4))
    assert mean.shape == logvar.shape == (1, 4, 5, 3, 4)


def _direct_decode(vae: OpenSoraVAE, z: torch.Tensor, num_frames: int) -> torch.Tensor:
    """The reference written out: un-normalise with the released constants, temporal-decode each
    5-latent micro-frame to min(17, left) frames, then the AutoencoderKL on all frames in one call."""
    # float32 constants, as the reference's buffers (torch.tensor(config.scale)), cast to z's dtype
    scale = torch.tensor(LATENT_SCALE).view(1, 4, 1, 1, 1).to(z.dtype)
    shift = torch.tensor(LATENT_SHIFT).view(1, 4, 1, 1, 1).to(z.dtype)
    z = z * scale + shift
    parts, left = [], num_frames
    for i in range(0, z.shape[2], 5):
        parts.append(vae.temporal_vae.decode(z[:, :, i : i + 5], num_frames=min(17, left)))
        left -= 17
    spatial = torch.cat(parts, dim=2)  # [1, 4, F, h, w]
    frames = vae.spatial_vae.module.decode(spatial[0].transpose(0, 1) / SPATIAL_SCALING).sample  # [F, 3, H, W]
    return frames.transpose(0, 1)[None]


def test_chunked_decode_matches_the_direct_computation() -> None:
    """Two full micro-frames and a 6-frame remainder (40 frames, 12 latent frames), in float64; the
    spatial VAE's 4-frame micro-batches against one call over every frame."""
    vae = random_opensora_vae(seed=3).double()
    z = torch.randn(1, 4, latent_frames(40), 2, 3, dtype=torch.float64)
    with torch.no_grad():
        out = vae.decode(z, 40)
        ref = _direct_decode(vae, z, 40)
    assert out.shape == (1, 3, 40, 16, 24)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-12)


def test_micro_frames_are_decoded_independently(tiny: OpenSoraVAE) -> None:
    """Changing the first micro-frame's latents leaves every later frame bit-identical; decoding the
    whole latent in one temporal call (no chunking) would not."""
    z = torch.randn(1, 4, 12, 2, 2)
    z2 = z.clone()
    z2[:, :, :5] += 0.5
    with torch.no_grad():
        a, b = tiny.decode_temporal(z, 40), tiny.decode_temporal(z2, 40)
        assert not torch.equal(a[:, :, :17], b[:, :, :17])
        assert torch.equal(a[:, :, 17:], b[:, :, 17:])
        zs = z * tiny.scale + tiny.shift
        zs2 = z2 * tiny.scale + tiny.shift
        whole = tiny.temporal_vae.decode(zs, 48), tiny.temporal_vae.decode(zs2, 48)
    assert not torch.equal(whole[0][:, :, 20:], whole[1][:, :, 20:])


def test_encode_geometry_and_normalisation(tiny: OpenSoraVAE) -> None:
    x = torch.rand(1, 3, 20, 16, 24) * 2 - 1
    with torch.no_grad():
        z = tiny.encode(x)
        spatial = tiny.spatial_vae.encode(x)
        mean, _ = tiny.temporal_vae.encode(spatial[:, :, :17])
    assert z.shape == (1, 4, 6, 2, 3)
    expected = (mean - tiny.shift) / tiny.scale
    torch.testing.assert_close(z[:, :, :5], expected, rtol=0, atol=0)


def test_decode_rejects_a_wrong_latent_length(tiny: OpenSoraVAE) -> None:
    with pytest.raises(ShapeError, match="latent frames"):
        tiny.decode(torch.randn(1, 4, 6, 2, 2), 17)


def _write_released_layout(vae: OpenSoraVAE, directory: Path, drop: str | None = None, **config: object) -> Path:
    directory.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in vae.state_dict().items() if k != drop}
    save_file(state, str(directory / "model.safetensors"), metadata={"format": "pt"})
    (directory / "config.json").write_text(json.dumps({**RELEASED_CONFIG, **config}))
    return directory


def test_loader_reads_the_released_layout(tiny: OpenSoraVAE, tmp_path: Path) -> None:
    root = _write_released_layout(tiny, tmp_path / "OpenSora-VAE-v1.2")
    keys = set(tiny.state_dict())
    assert any(k.startswith("spatial_vae.module.decoder.") for k in keys)
    assert "temporal_vae.decoder.conv_out.conv.weight" in keys and "shift" in keys
    loaded = load_opensora_vae(root, spatial_config=TINY_SPATIAL_CONFIG, temporal_cfg="tiny")
    for k, v in tiny.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    z = torch.randn(1, 4, 5, 2, 3)
    with torch.no_grad():
        assert torch.equal(loaded.decode(z, 17), tiny.decode(z, 17))


def test_loader_uses_the_config_when_the_buffers_are_absent(tiny: OpenSoraVAE, tmp_path: Path) -> None:
    root = _write_released_layout(tiny, tmp_path / "vae", drop="scale", scale=[1.0, 2.0, 3.0, 4.0])
    loaded = load_opensora_vae(root, spatial_config=TINY_SPATIAL_CONFIG, temporal_cfg="tiny")
    assert loaded.scale.flatten().tolist() == [1.0, 2.0, 3.0, 4.0]


def test_loader_errors(tiny: OpenSoraVAE, tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_opensora_vae(tmp_path / "absent")
    root = _write_released_layout(tiny, tmp_path / "partial", drop="temporal_vae.decoder.conv_out.conv.weight")
    with pytest.raises(CheckpointError, match="conv_out"):
        load_opensora_vae(root, spatial_config=TINY_SPATIAL_CONFIG, temporal_cfg="tiny")
    root = _write_released_layout(tiny, tmp_path / "full", vae_temporal={"type": "VAE_Temporal"})
    with pytest.raises(NotImplementedError, match="VAE_Temporal_SD"):
        load_opensora_vae(root, spatial_config=TINY_SPATIAL_CONFIG, temporal_cfg="tiny")
    root = _write_released_layout(tiny, tmp_path / "tiny-as-full")
    with pytest.raises(CheckpointError):  # the tiny weights do not fit the released architecture
        load_opensora_vae(root)
