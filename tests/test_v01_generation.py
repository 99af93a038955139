"""JavisDiT v0.1 sampler defaults, CFG batch and seeded draws, through the project's one sampling loop."""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from javisrt.engine.errors import ConfigError
from javisrt.engine.st_prior import random_st_prior
from javisrt.engine.v01_config import STPriorConfig, V01Config
from javisrt.engine.v01_model import random_v01_model
from javisrt.runtime import sampling
from javisrt.runtime.opensora_vae import random_opensora_vae
from javisrt.runtime.v01_generation import (
    V01Denoiser,
    advance_step_draws,
    draw_v01_noise,
    null_prior,
    sample_prior,
    v01_image_size,
    v01_latent_geometry,
    v01_sampler_config,
)

# v01-spec §7, rounded to 2 decimals there.
SPEC_FP32_RATIO = [
    1000, 990.02, 979.55, 968.54, 956.96, 944.76, 931.89, 918.29, 903.91, 888.66, 872.47, 855.25, 836.89,
    817.29, 796.30, 773.79, 749.56, 723.43, 695.16, 664.47, 631.04, 594.48, 554.34, 510.06, 460.96, 406.22,
    344.80, 275.40, 196.35, 105.51,
]  # fmt: skip
SPEC_BF16_RATIO_HEAD = [1000, 990.02, 979.55, 968.55]
SPEC_BF16_RATIO_TAIL = [344.88, 275.47, 196.41, 105.54]
SPEC_MODEL_SEES = [1000, 992, 980, 968, 956, 944, 932, 920, 904]
SPEC_MODEL_SEES_TAIL = [344, 276, 196, 105.5]


def test_ratio_with_frame_factor_and_bf16_rounding() -> None:
    assert sampling.rflow_shift(240, 426, 102) == 3.421875  # 0.625 * 5.46875, bf16 ops
    exact = math.sqrt(240 * 426 / 512**2) * math.sqrt(102 // 17 * 5)
    assert abs(exact - 3.42059) < 1e-5
    cfg = v01_sampler_config()
    assert (cfg.solver, cfg.steps, cfg.guidance, cfg.shift) == (sampling.Solver.EULER, 30, (7.0, 7.0), 3.421875)
    assert v01_sampler_config(audio_only=True).guidance == (7.0,)


def test_timesteps_match_the_spec_lists() -> None:
    exact = math.sqrt(240 * 426 / 512**2) * math.sqrt(30)
    np.testing.assert_allclose(sampling.flow_timesteps(30, exact), SPEC_FP32_RATIO, atol=0.005 + 1e-4)
    released = sampling.rflow_timesteps(30, 240, 426, 102)
    np.testing.assert_allclose(released[:4], SPEC_BF16_RATIO_HEAD, atol=0.005 + 1e-4)
    np.testing.assert_allclose(released[-4:], SPEC_BF16_RATIO_TAIL, atol=0.005 + 1e-4)
    seen = torch.from_numpy(released).to(torch.bfloat16).float().numpy()
    assert seen[:9].tolist() == SPEC_MODEL_SEES and seen[-4:].tolist() == SPEC_MODEL_SEES_TAIL
    # and the loop's plan uses exactly these
    plan = sampling._plan(v01_sampler_config())
    assert [float(s.t) for s in plan] == released.tolist()


@pytest.mark.parametrize("num_frames", [17, 34, 51, 68, 102, 136, 204])
def test_loop_schedule_is_the_released_transform_for_v01_buckets(num_frames: int) -> None:
    """The loop builds its plan from ``SamplerConfig.shift`` with ``r - 1`` in fp32; the reference
    computes ``r - 1`` on a bf16 tensor. For a bf16 r >= 0.5, ``1 - r`` needs at most 8 significant bits,
    so ``r - 1`` is exact in bf16 and the loop reproduces the reference's transform exactly (r < 0.5,
    i.e. below ~144x144 at 17 frames, would differ)."""
    for height, width in [(144, 256), (240, 426), (360, 640), (480, 854), (720, 1280), (426, 240), (144, 144)]:
        cfg = v01_sampler_config(height, width, num_frames)
        assert cfg.shift >= 0.5
        plan_t = np.array([s.t for s in sampling._plan(cfg)], np.float32)
        assert np.array_equal(plan_t, sampling.rflow_timesteps(30, height, width, num_frames)), (height, width)


def test_geometry_at_240p_4s() -> None:
    g = v01_latent_geometry(102, 240, 426)
    assert g.video == (4, 30, 30, 53) and g.audio == (8, 112, 16)
    assert (g.mel_frames, g.num_samples, g.video_latent_frames) == (448, 68000, 30)
    tokens_v = 30 * math.ceil(30 / 2) * math.ceil(53 / 2)
    assert tokens_v == 12150 and 112 // 4 * 16 == 448


@pytest.mark.parametrize("num_frames", [17, 20, 33, 34, 51, 60])
def test_geometry_is_what_the_vae_makes_for_any_frame_count(num_frames: int) -> None:
    """Frame counts off the micro-frame grid: the latent shape is what the (tiny) Open-Sora VAE's encode
    gives, its decode gives the frames back, and audio, samples and the shift follow the reference."""
    vae = random_opensora_vae(seed=1)
    g = v01_latent_geometry(num_frames, 16, 24)
    with torch.no_grad():
        z = vae.encode(torch.rand(1, 3, num_frames, 16, 24) * 2 - 1)
        assert tuple(z.shape[1:]) == g.video
        assert vae.decode(z, num_frames).shape[2] == num_frames
    # audio: F / 24 s -> int(s / 0.01) mel frames, up to a multiple of 32, / 4; waveform int(F / 24 * 16000)
    seconds = num_frames / 24
    assert g.mel_frames == math.ceil(int(seconds / 0.01) / 32) * 32 and g.audio == (8, g.mel_frames // 4, 16)
    assert g.num_samples == int(seconds * 16000)
    # shift: timestep_transform's F // 17 * 5 (the remainder does not count), on bf16 size tensors
    h, w, f = (torch.tensor([v], dtype=torch.bfloat16) for v in (240.0, 426.0, float(num_frames)))
    ratio = (h * w / (512 * 512)).sqrt() * ((f // 17 * 5) / 1).sqrt()
    assert v01_sampler_config(240, 426, num_frames).shift == float(ratio)


def test_frame_counts_below_one_micro_frame_are_refused() -> None:
    for n in (1, 16):  # the reference's shift would be ratio 0 (2..16) or its untrained image mode (1)
        with pytest.raises(ConfigError, match=">= 17"):
            v01_latent_geometry(n)
    with pytest.raises(ConfigError):
        v01_latent_geometry(True)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("resolution", "ratio", "hw"),
    [("240p", "9:16", (240, 426)), ("240p", "16:9", (426, 240)), ("144p", "3:8", (117, 312)),
     ("360p", "2:1", (678, 340)), ("480p", "0.75", (554, 738)), ("720p", "1:1", (960, 960)),
     ("720p", "9:16", (720, 1280)), ("720p", "50:27", (1386, 666))],
)  # fmt: skip
def test_buckets_are_open_soras_get_image_size(resolution: str, ratio: str, hw: tuple[int, int]) -> None:
    """Numbers read from hpcaitech/Open-Sora opensora/datasets/aspect.py @ 3b6d136d0a7c0941c35ff5edf26cee5c520eba04
    (ASPECT_RATIO_{144P,240P,360P,480P,720P}, ASPECT_RATIO_MAP; get_image_size accepts a map name or a raw key)."""
    assert v01_image_size(resolution, ratio) == hw


def test_unknown_buckets_are_config_errors() -> None:
    with pytest.raises(ConfigError, match="resolution"):
        v01_image_size("1080p", "9:16")
    with pytest.raises(ConfigError, match="aspect ratio"):
        v01_image_size("240p", "7:5")


def test_seeded_draw_order_video_audio_then_prior_eps() -> None:
    g = v01_latent_geometry(51, 48, 56)
    noise = draw_v01_noise(g, seed=42, batch=2)
    eps = torch.randn(2, 7, 8, generator=noise.prior_generator)
    torch.manual_seed(42)  # the reference: set_random_seed(42) then the global CPU generator
    vz = torch.randn(2, *g.video, dtype=torch.bfloat16)
    az = torch.randn(2, *g.audio, dtype=torch.bfloat16)
    ref_eps = torch.randn(2, 7, 8)
    assert torch.equal(noise.video, vz.float()) and torch.equal(noise.audio, az.float())
    assert torch.equal(eps, ref_eps)
    # per-step draws: bf16 at step 0, fp32 after, video then audio
    advance_step_draws(noise.prior_generator, [noise.video, noise.audio], steps=2)
    for dtype in (torch.bfloat16, torch.float32):
        torch.randn(vz.shape, dtype=dtype)
        torch.randn(az.shape, dtype=dtype)
    assert torch.equal(torch.randn(5, generator=noise.prior_generator), torch.randn(5))


class _Recorder:
    def __init__(self, model) -> None:
        self.model = model
        self.calls: list[tuple] = []
        self.cfg = model.cfg
        self.y_embedder = model.y_embedder
        self.st_prior_embedder = model.st_prior_embedder

    def __call__(self, *args, **kwargs):
        self.calls.append((args, kwargs))
        return self.model(*args, **kwargs)


def _setup(frame_masks: bool = False):
    model = random_v01_model(V01Config.from_name("tiny"))
    prior_net = random_st_prior(STPriorConfig.from_name("tiny"))
    g = v01_latent_geometry(51, 48, 56)
    noise = draw_v01_noise(g, seed=42)
    prior = sample_prior(prior_net, torch.randn(1, 9, 24), noise.prior_generator)
    y = torch.randn(1, 1, 12, 32)
    mask = torch.zeros(1, 12, dtype=torch.long)
    mask[:, :5] = 1
    return model, noise, prior, y, mask


def test_cfg_batch_layout() -> None:
    model, noise, prior, y, mask = _setup()
    rec = _Recorder(model)
    den = V01Denoiser(rec, y, mask, prior, height=48, width=56)  # type: ignore[arg-type]
    inputs = [np.concatenate([noise.video.numpy()] * 2), np.concatenate([noise.audio.numpy()] * 2)]
    outs = den(inputs, np.full(2, 990.0, np.float32))
    (args, kwargs), = rec.calls
    video, audio, t, y_in, mask_in, fps, height, width, sp, tp = args
    assert torch.equal(y_in[0], y[0, 0]) and torch.equal(y_in[1], model.y_embedder.y_embedding)  # null caption
    assert torch.equal(mask_in, mask)  # the cond mask only; the model repeats it for the null half
    null = null_prior(model, 1)
    assert torch.equal(sp, torch.cat([prior.spatial, null.spatial]))
    assert torch.equal(tp, torch.cat([prior.temporal, null.temporal]))
    assert torch.equal(null.spatial[0], model.st_prior_embedder.y_embedding[:4])
    assert (fps, height, width) == (24, 48, 56)
    assert outs[0].shape == noise.video.shape[:0] + (2, 4, 15, 6, 7) and outs[1].shape == (2, 8, 56, 16)
    with torch.no_grad():
        full = model(video, audio, t, y_in, mask_in, 24, 48, 56, sp, tp)
    assert np.array_equal(outs[0], full.video[:, :4].numpy())  # pred_sigma: first half of the channels
    assert np.array_equal(outs[1], full.audio[:, :8].numpy())


def test_all_true_masks_of_the_reference_are_a_no_op() -> None:
    model, noise, prior, y, mask = _setup()
    inputs = [np.concatenate([noise.video.numpy()] * 2), np.concatenate([noise.audio.numpy()] * 2)]
    t = np.full(2, 500.0, np.float32)
    a = V01Denoiser(model, y, mask, prior, height=48, width=56)(inputs, t)
    b = V01Denoiser(model, y, mask, prior, height=48, width=56, frame_masks=True)(inputs, t)
    assert all(np.array_equal(x, z) for x, z in zip(a, b))


def test_loop_cpp_equals_python_and_the_spec_update() -> None:
    model, noise, prior, y, mask = _setup()
    den = V01Denoiser(model, y, mask, prior, height=48, width=56)
    cfg = v01_sampler_config(steps=2)  # the 240x426/102f schedule over the tiny latents
    latents = [noise.video.numpy(), noise.audio.numpy()]
    ref = sampling.sample_ref(latents, den, cfg)
    if sampling.backend() == "cpp":
        out = sampling.sample(latents, den, cfg)
        assert all(np.array_equal(a, b) for a, b in zip(out.latents, ref.latents))
    # the spec's update, written out: v = v_u + 7 (v_c - v_u); z += v (t_i - t_{i+1}) / 1000, t_2 = 0
    ts = sampling.rflow_timesteps(2, 240, 426, 102)
    zs = [x.copy() for x in latents]
    for i, t in enumerate(ts):
        nxt = ts[i + 1] if i + 1 < len(ts) else np.float32(0)
        outs = den([np.concatenate([z, z]) for z in zs], np.full(2, t, np.float32))
        dt = (t - nxt) / np.float32(1000)
        zs = [z + (o[1:] + np.float32(7) * (o[:1] - o[1:])) * dt for z, o in zip(zs, outs)]
    assert all(np.array_equal(a, b) for a, b in zip(zs, ref.latents))


def test_audio_only_t2a_through_the_loop() -> None:
    model = random_v01_model(V01Config.from_name("tiny-audio"))
    g = v01_latent_geometry(51, 48, 56)
    noise = draw_v01_noise(g, seed=1, audio_only=True)
    assert noise.video is None
    y = torch.randn(1, 12, 32)
    den = V01Denoiser(model, y, torch.ones(1, 12, dtype=torch.long), None, height=48, width=56)
    res = sampling.sample([noise.audio.numpy()], den, v01_sampler_config(48, 56, 51, steps=2, audio_only=True))
    assert res.steps_done == 2 and res.latents[0].shape == (1, 8, 56, 16)
    assert np.isfinite(res.latents[0]).all()
