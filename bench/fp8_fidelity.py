"""FP8 vs BF16 fidelity of whole CFG sampling runs, per step policy: which steps need BF16?

    python -m javisrt.bench.fp8_fidelity [--preset tiny --heads 1] [--layers N] [--shape 33,32,48]
        [--steps 10] [--policies all-fp8,bf16-first-last] [--calibration modelopt|amax-forward]
        [--reference torch|triton] [--numerics fp32|official] [--device cpu|cuda] [--out fp8_fidelity.json]

A random-weight network (a preset, optionally narrower/shallower) is calibrated for FP8 (modelopt's max
calibration along sampling trajectories, ``runtime/calibration.py``, or, where modelopt is not
installed, the amax of plain forwards along the same trajectories, ``runtime/fp8_scales.scales_from_forward``),
then every evaluation noise is sampled once with the reference op set (BF16 or fp32 ``torch`` /
``triton``) and once per policy with the ``triton-fp8`` op set on the FP8 steps and the reference op set
on the others. Reported per policy and modality: cosine and PSNR (peak = max |reference|) of the final
latents against the reference run from the same noise, over ``--seeds`` noises (worst and mean).

Policies: ``all-fp8``; ``bf16-first`` / ``bf16-last`` / ``bf16-first-last`` (BF16 = the reference op set
on that step). The sampler is the release's (Euler, CFG on both modalities, Open-Sora shift); Euler
makes one denoiser call per step, which is how the step index is known (checked).

On CPU the Triton kernels run under ``TRITON_INTERPRET=1`` (slow: use the tiny preset with one head,
head_dim 64, the e4m3 attention's minimum) and in fp32/fp16 (the interpreter's bf16 is wrong); those
are the figures a CPU gives. The released size is for a GPU: ``--preset javisdit-v1.0 --shape 65,240,426
--numerics official --reference triton --device cuda --calibration amax-forward``.
"""

from __future__ import annotations

import argparse
import copy
import datetime
import json
import logging
import platform
import statistics
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from tqdm import tqdm

from javisrt.engine.atomic_file import atomic_file
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.engine.model import JavisDiT, random_model
from javisrt.engine.ops import OpSet
from javisrt.export.contract import DiTContract, ShapePoint
from javisrt.runtime import sampling
from javisrt.runtime.backends.torch_engine import TorchEngine
from javisrt.runtime.calibration import CalibrationSet, calibration_sampler, cosine, psnr, sample_trajectory
from javisrt.runtime.denoise_session import DenoiseSession
from javisrt.runtime.fp8_scales import Fp8Scales, describe_calibration, scales_from_forward

log = logging.getLogger("javisrt.bench.fp8_fidelity")

POLICIES = ("all-fp8", "bf16-first", "bf16-last", "bf16-first-last")
CALIBRATIONS = ("modelopt", "amax-forward")


def bf16_steps(policy: str, steps: int) -> frozenset[int]:
    """The step indices a policy runs on the reference (BF16) op set."""
    if policy not in POLICIES:
        raise ConfigError(f"unknown policy {policy!r}; choose from {', '.join(POLICIES)}")
    first = {0} if policy in ("bf16-first", "bf16-first-last") else set()
    last = {steps - 1} if policy in ("bf16-last", "bf16-first-last") else set()
    return frozenset(first | last)


@dataclass(frozen=True)
class FidelityOptions:
    cfg: JavisConfig
    dims: dict[str, int]
    steps: int
    guidance: float
    seeds: int
    policies: tuple[str, ...]
    calibration: str
    calib_prompts: int
    calib_steps: int
    reference: str
    numerics: str
    device: torch.device


def calibrate(model: JavisDiT, calib: CalibrationSet, how: str, numerics: str) -> Fp8Scales:
    """The model's FP8 scales by ``how`` (``model`` itself is left as it was)."""
    what = describe_calibration(len(calib.prompts), calib.steps, list(calib.shapes), random_embeddings=True)
    if how == "modelopt":
        from javisrt.runtime.calibration import calibrate_fp8
        from javisrt.runtime.fp8_scales import scales_from_calibration

        wrapper = calibrate_fp8(copy.deepcopy(model), calib, numerics=numerics)  # quantizes its copy in place
        return scales_from_calibration(wrapper, what)
    engine = TorchEngine(model, device=next(model.parameters()).device)
    engine.load()

    def run() -> None:
        for video, audio, prompt, config, _ in calib.trajectories():
            sample_trajectory(engine, video, audio, prompt, calib.negative, config)

    return scales_from_forward(model, run, what.replace("modelopt max calibration", "amax of plain forwards"))


def sample_with_policy(
    engine: TorchEngine, fp8: OpSet | None, reference: OpSet, bf16: frozenset[int], noise: list[torch.Tensor],
    context: torch.Tensor, config: sampling.SamplerConfig,
) -> list[torch.Tensor]:  # fmt: skip
    """One CFG run: step i on ``reference`` if i in ``bf16`` (or ``fp8`` is None), else on ``fp8``."""
    assert engine.model is not None
    model = engine.model
    session = DenoiseSession(engine, context, {name: x.shape[1:] for name, x in zip(("video", "audio"), noise)})
    call = session.host_denoiser()
    step = 0

    def denoiser(inputs: Any, timesteps: np.ndarray) -> list[np.ndarray]:
        nonlocal step
        model.set_ops(reference if fp8 is None or step in bf16 else fp8)
        step += 1
        return call(inputs, timesteps)

    try:
        result = sampling.sample([x.float().contiguous().cpu().numpy() for x in noise], denoiser, config)
    finally:
        model.set_ops(reference)
    if step != config.steps:
        raise AssertionError(f"the sampler made {step} denoiser calls for {config.steps} steps: the policy needs one per step")
    return [torch.from_numpy(np.array(x)) for x in result.latents]


def run(opts: FidelityOptions) -> dict[str, Any]:
    from javisrt.kernels.ops_triton_fp8 import TritonFp8Ops

    cfg = opts.cfg
    model = random_model(cfg, opts.numerics, opts.device)
    contract = DiTContract.for_config(cfg)
    calib = CalibrationSet.random(contract, [opts.dims], num_prompts=opts.calib_prompts, steps=opts.calib_steps,
                                  guidance=opts.guidance, seed=1)  # fmt: skip
    t0 = time.perf_counter()
    scales = calibrate(model, calib, opts.calibration, opts.numerics)
    calib_s = time.perf_counter() - t0
    engine = TorchEngine(model, ops=opts.reference, device=opts.device)
    engine.load()
    reference = model.ops
    fp8 = TritonFp8Ops.prepare(model, scales.scales)
    has_audio = "audio_frames" in opts.dims
    config = calibration_sampler(opts.dims, opts.steps, opts.guidance, has_audio)
    g = torch.Generator().manual_seed(1000)  # evaluation noise and prompts: not the calibration's
    per: dict[str, list[list[tuple[float, float]]]] = {p: [] for p in opts.policies}
    seconds: dict[str, float] = {p: 0.0 for p in ("reference", *opts.policies)}
    for _ in tqdm(range(opts.seeds), desc="FP8 fidelity", unit="noise"):
        d = opts.dims
        noise = [torch.randn(1, 16, d["video_frames"], d["video_height"], d["video_width"], generator=g)]
        if has_audio:
            noise.append(torch.randn(1, 8, d["audio_frames"], 16, generator=g))
        context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g).to(opts.device)
        t = time.perf_counter()
        ref = sample_with_policy(engine, None, reference, frozenset(), noise, context, config)
        seconds["reference"] += time.perf_counter() - t
        for policy in opts.policies:
            t = time.perf_counter()
            got = sample_with_policy(engine, fp8, reference, bf16_steps(policy, opts.steps), noise, context, config)
            seconds[policy] += time.perf_counter() - t
            per[policy].append([(cosine(a, b), psnr(a, b)) for a, b in zip(got, ref, strict=True)])
    modalities = ("video", "audio")[: len(noise)]
    results = {
        policy: {
            "bf16_steps": sorted(bf16_steps(policy, opts.steps)),
            **{m: {"cosine_min": min(r[j][0] for r in runs), "cosine_mean": statistics.fmean(r[j][0] for r in runs),
                   "psnr_db_min": min(r[j][1] for r in runs), "psnr_db_mean": statistics.fmean(r[j][1] for r in runs)}
               for j, m in enumerate(modalities)},  # fmt: skip
            "seconds_per_run": seconds[policy] / opts.seeds,
        }
        for policy, runs in per.items()
    }
    return {
        "what": "final latents of CFG sampling, triton-fp8 (per step policy) vs the reference op set, same noise",
        "config": {"preset": cfg.name, "dim": cfg.dim, "num_layers": cfg.num_layers, "num_heads": cfg.num_heads,
                   "head_dim": cfg.head_dim, "random_weights": True},  # fmt: skip
        "dims": opts.dims, "steps": opts.steps, "guidance": opts.guidance, "seeds": opts.seeds,
        "reference": opts.reference, "numerics": opts.numerics, "device": str(opts.device),
        "calibration": {"how": opts.calibration, "description": json.loads(scales.calibration), "seconds": calib_s},
        "reference_seconds_per_run": seconds["reference"] / opts.seeds,
        "policies": results,
        "provenance": {"torch": torch.__version__, "python": platform.python_version(),
                       "gpu": torch.cuda.get_device_name(opts.device) if opts.device.type == "cuda" else None,
                       "utc": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},  # fmt: skip
    }  # fmt: skip


def format_table(report: dict[str, Any]) -> str:
    lines = [f"FP8 fidelity: {report['config']['preset']} (dim {report['config']['dim']}, {report['config']['num_layers']} layers, "
             f"head_dim {report['config']['head_dim']}), dims {report['dims']}, {report['steps']} steps, {report['seeds']} noise(s), "
             f"reference {report['reference']}/{report['numerics']} on {report['device']}, calibration {report['calibration']['how']}",
             f"{'policy':<16} {'modality':<6} {'cos min':>10} {'cos mean':>10} {'PSNR min':>9} {'PSNR mean':>9}"]  # fmt: skip
    for policy, r in report["policies"].items():
        for m in ("video", "audio"):
            if m in r:
                v = r[m]
                lines.append(f"{policy:<16} {m:<6} {v['cosine_min']:>10.6f} {v['cosine_mean']:>10.6f} "
                             f"{v['psnr_db_min']:>8.2f}  {v['psnr_db_mean']:>8.2f}")  # fmt: skip
    lines.append("cos: cosine of the flattened final latents; PSNR: 20 log10(max|ref| / RMSE) in dB, vs the reference run")
    return "\n".join(lines)


def parse_args(argv: list[str] | None = None) -> tuple[FidelityOptions, Path | None]:
    p = argparse.ArgumentParser(prog="python -m javisrt.bench.fp8_fidelity", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    m = p.add_argument_group("Model options")
    m.add_argument("--preset", default="tiny", help="network preset, random weights (default tiny)")
    m.add_argument("--heads", type=int, default=None, help="override num_heads (tiny: 1, for head_dim 64; default: 1 "
                   "for tiny, the preset's otherwise)")  # fmt: skip
    m.add_argument("--layers", type=int, default=None, help="override num_layers (fewer blocks, same width)")
    m.add_argument("--dim", type=int, default=None, help="override the model width")
    m.add_argument("--numerics", choices=("fp32", "official"), default="fp32",
                   help="fp32, or official bf16 (a GPU: the interpreter's bf16 is wrong); default fp32")
    m.add_argument("--device", default="cpu", help="cpu (Triton under TRITON_INTERPRET=1) or cuda (default cpu)")
    s = p.add_argument_group("Sampling options")
    s.add_argument("--shape", default="33,32,48", help="FRAMES,HEIGHT,WIDTH in pixels (default 33,32,48; 240p/4 s: 65,240,426)")
    s.add_argument("--steps", type=int, default=10, help="sampling steps (default 10)")
    s.add_argument("--guidance", type=float, default=5.0, help="CFG scale, both modalities (default 5.0)")
    s.add_argument("--seeds", type=int, default=2, help="evaluation noises (default 2)")
    s.add_argument("--policies", default="all-fp8,bf16-first-last",
                   help=f"comma-separated, from {', '.join(POLICIES)} (default all-fp8,bf16-first-last)")
    s.add_argument("--reference", choices=("torch", "triton"), default="torch",
                   help="the BF16/fp32 op set of the reference run and of the BF16 steps (default torch)")
    c = p.add_argument_group("Calibration options")
    c.add_argument("--calibration", choices=CALIBRATIONS, default="modelopt",
                   help="modelopt: max calibration, as `javisrt export --fp8-scales`; amax-forward: amax of plain "
                   "forwards along the same trajectories (no modelopt needed; GPU machine). Default modelopt")
    c.add_argument("--calib-prompts", type=int, default=2, help="random stand-in prompts (default 2)")
    c.add_argument("--calib-steps", type=int, default=10, help="steps per calibration trajectory (default 10)")
    r = p.add_argument_group("Reporting options")
    r.add_argument("--out", type=Path, default=None, help="write the report as JSON here (atomically)")
    a = p.parse_args(argv)
    overrides = {k: v for k, v in (("num_layers", a.layers), ("dim", a.dim)) if v is not None}
    heads = a.heads if a.heads is not None else (1 if a.preset == "tiny" else None)
    if heads is not None:
        overrides["num_heads"] = heads
    cfg = JavisConfig.from_name(a.preset, **overrides)
    try:
        frames, height, width = (int(v) for v in a.shape.split(","))
    except ValueError:
        raise ConfigError(f"--shape must be FRAMES,HEIGHT,WIDTH, got {a.shape!r}") from None
    dims = {k: v for k, v in ShapePoint(1, frames, height, width).dims().items() if k != "batch"}
    if not cfg.has_audio:
        dims.pop("audio_frames", None)
    policies = tuple(x for x in a.policies.split(",") if x)
    for x in policies:
        bf16_steps(x, a.steps)
    device = torch.device(a.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UnavailableError("--device cuda: no CUDA device is visible")
    opts = FidelityOptions(cfg, dims, a.steps, a.guidance, a.seeds, policies, a.calibration, a.calib_prompts,
                           a.calib_steps, a.reference, a.numerics, device)  # fmt: skip
    return opts, a.out


def main(argv: list[str] | None = None) -> None:
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    opts, out = parse_args(argv)
    report = run(opts)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out) as tmp:
            tmp.write_text(json.dumps(report, indent=2))
    print(format_table(report))


if __name__ == "__main__":
    main()
