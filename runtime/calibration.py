"""FP8 calibration and the fidelity check, along real sampling trajectories.

Calibration runs the model along the released sampler's trajectories: for each calibration prompt a
CFG Euler rectified-flow loop (model-spec §6.1: shifted timesteps, ``v = v_u + g (v_c - v_u)``,
``z <- z + v (t_i - t_{i+1}) / 1000``) from seeded noise, every step's forward feeding modelopt's
calibrators. The loop is the project's own sampler (``runtime/sampling.sample``, the C++ loop when
built) driving a :class:`~javisrt.runtime.denoise_session.DenoiseSession` over the torch engine with
the ``onnx-fp8`` op set (the one a quantized attention runs); the fidelity check runs the same.
The quantizer placement, modelopt's configuration and the Q/DQ export live in ``export/quantize.py``,
which takes the calibration loop from here (modelopt's ``forward_loop``).
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
from tqdm import tqdm

from javisrt.engine.model import JavisDiT
from javisrt.export.contract import AUDIO, VIDEO, Dims, DiTContract
from javisrt.export.module import ExportableDiT
from javisrt.export.quantize import quantize_fp8
from javisrt.runtime import sampling
from javisrt.runtime.backends.torch_engine import TorchEngine
from javisrt.runtime.denoise_session import DenoiseSession
from javisrt.runtime.engine import Engine

log = logging.getLogger(__name__)

CALIBRATION_OPS = "onnx-fp8"  # the op set whose attention carries the MHA quantizer slots


def calibration_sampler(dims: Dims, steps: int, guidance: float, has_audio: bool) -> sampling.SamplerConfig:
    """The released sampler (Euler, Open-Sora shift with its bf16-rounded ratio) for a contract shape.

    Clips shorter than 17 frames (the tests' tiny shapes) give ``F // 17 = 0``, so ratio 0 and a
    degenerate schedule the release never samples: those run unshifted (ratio 1).
    """
    frames = (dims["video_frames"] - 1) * 4 + 1
    shift = 1.0
    if frames >= 17:  # rflow_shift refuses the degenerate range; small pixel sizes can still give r < 1
        shift = max(sampling.rflow_shift(dims["video_height"] * 8, dims["video_width"] * 8, frames), 1.0)
    return sampling.SamplerConfig(sampling.Solver.EULER, steps, (guidance,) * (2 if has_audio else 1), shift)


def sample_trajectory(
    engine: Engine, video: torch.Tensor, audio: torch.Tensor | None, cond: torch.Tensor, uncond: torch.Tensor,
    config: sampling.SamplerConfig,
) -> list[torch.Tensor]:  # fmt: skip
    """One CFG sampling run on ``engine`` from (video, audio) noise [1, ...]: the final latents, video first."""
    noise = {name: x for name, x in ((VIDEO, video), (AUDIO, audio)) if x is not None}
    session = DenoiseSession(engine, torch.cat((cond, uncond)), {k: v.shape[1:] for k, v in noise.items()})
    result = sampling.sample([x.float().contiguous().numpy() for x in noise.values()], session.host_denoiser(), config)
    return [torch.from_numpy(np.array(x)) for x in result.latents]


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration inputs: prompt embeddings [N, text_len, text_dim], the negative one [1, ...], shapes."""

    prompts: torch.Tensor
    negative: torch.Tensor
    shapes: tuple[Dims, ...]
    steps: int = 10
    guidance: float = 5.0
    seed: int = 0

    @classmethod
    def random(cls, contract: DiTContract, shapes: Sequence[Dims], num_prompts: int = 4, **kw: object) -> CalibrationSet:
        """Gaussian stand-ins for T5 embeddings (no text encoder here); say so in any report."""
        cfg = contract.config
        g = torch.Generator().manual_seed(1234)
        prompts = torch.randn(num_prompts, cfg.text_len, cfg.text_dim, generator=g)
        negative = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
        return cls(prompts, negative, tuple({**s, "batch": 1} for s in shapes), **kw)  # type: ignore[arg-type]

    def trajectories(
        self,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, sampling.SamplerConfig, Dims]]:
        """(video noise, audio noise, prompt, sampler config, dims) per (prompt, shape), seeded."""
        g = torch.Generator().manual_seed(self.seed)
        for dims in self.shapes:
            config = calibration_sampler(dims, self.steps, self.guidance, "audio_frames" in dims)
            for p in self.prompts:
                video = torch.randn(1, 16, dims["video_frames"], dims["video_height"], dims["video_width"], generator=g)
                audio = torch.randn(1, 8, dims["audio_frames"], 16, generator=g) if "audio_frames" in dims else None
                yield video, audio, p[None], config, dims


def fp8_engine(model: JavisDiT) -> Engine:
    """The torch engine running ``model`` (FP8-quantized or being calibrated) with the onnx-fp8 op set."""
    engine = TorchEngine(model, ops=CALIBRATION_OPS, device=next(model.parameters()).device)
    engine.load()
    return engine


def calibrate_fp8(model: JavisDiT, calib: CalibrationSet, numerics: str = "fp32") -> ExportableDiT:
    """``model`` FP8-quantized (in place) and calibrated on ``calib``'s trajectories; the math-flavour
    wrapper that ``export/quantize.export_fp8`` turns into the Q/DQ graph. ``numerics``: see
    :func:`~javisrt.export.quantize.quantize_fp8`."""
    runs = list(calib.trajectories())

    def forward_loop(m: JavisDiT) -> None:
        own_ops = m.ops  # the engine sets onnx-fp8 on the model; the model keeps its own afterwards
        engine = fp8_engine(m)
        try:
            for video, audio, prompt, config, _dims in tqdm(runs, desc="FP8 calibration", unit="trajectory", leave=False):
                sample_trajectory(engine, video, audio, prompt, calib.negative, config)
        finally:
            engine.unload()
            m.set_ops(own_ops)

    wrapper = quantize_fp8(model, forward_loop, numerics)
    log.info("FP8 calibrated on %d trajectories x %d steps", len(runs), calib.steps)
    return wrapper


# ---- fidelity (fake-quant, CPU) -------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``20 log10(max|ref| / rmse)`` in dB (peak = the reference's largest magnitude)."""
    rmse = (out.double() - ref.double()).pow(2).mean().sqrt()
    return float(20 * torch.log10(ref.double().abs().max() / rmse.clamp_min(1e-30)))


@dataclass(frozen=True)
class Fidelity:
    """FP8 vs a reference, per modality: worst per-step velocity cosine (on the reference trajectory)
    and the final-latent PSNR after the full run from the same noise."""

    velocity_cosine: tuple[float, float]  # (video, audio)
    latent_psnr_db: tuple[float, float]

    def __str__(self) -> str:
        (cv, ca), (pv, pa) = self.velocity_cosine, self.latent_psnr_db
        return f"video: cos {cv:.5f}, PSNR {pv:.1f} dB; audio: cos {ca:.5f}, PSNR {pa:.1f} dB"


def fp8_fidelity(
    fp8: Engine, reference: Engine, video: torch.Tensor, audio: torch.Tensor, cond: torch.Tensor,
    uncond: torch.Tensor, config: sampling.SamplerConfig,
) -> Fidelity:  # fmt: skip
    """Run the reference trajectory, comparing the FP8 engine's velocity at each of its steps, then the
    FP8 engine's own run from the same noise."""
    context = torch.cat((cond, uncond))
    shapes = {VIDEO: video.shape[1:], AUDIO: audio.shape[1:]}
    ref_session = DenoiseSession(reference, context, shapes)
    fp8_session = DenoiseSession(fp8, context, shapes)
    worst = [1.0, 1.0]

    def compare(inputs: Sequence[np.ndarray], timesteps: np.ndarray) -> list[np.ndarray]:
        ref = [v.clone() for v in ref_session(inputs, timesteps)]
        for j, (got, want) in enumerate(zip(fp8_session(inputs, timesteps), ref, strict=True)):
            worst[j] = min(worst[j], cosine(got, want))
        return [v.numpy() for v in ref]

    latents = [video.float().contiguous().numpy(), audio.float().contiguous().numpy()]
    with torch.no_grad():
        ref_v, ref_a = (torch.from_numpy(np.array(x)) for x in sampling.sample(latents, compare, config).latents)
    q_v, q_a = sample_trajectory(fp8, video, audio, cond, uncond, config)
    return Fidelity((worst[0], worst[1]), (psnr(q_v, ref_v), psnr(q_a, ref_a)))
