"""The sampling loop: C++ extension (javisrt._sampler) vs the Python reference (runtime/sampling.py)
vs independent references (model-spec.md §6.1 numbers, Open-Sora's timestep_transform, diffusers'
FlowMatchEulerDiscreteScheduler and UniPCMultistepScheduler, a float64 oracle).

``diffusers_sample`` below is also the baseline of ``bench/sampler_overhead.py``.
"""

from __future__ import annotations

import logging
import shutil
import subprocess
import time
import types
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from _tolerance import assert_within, noise_floor

from javisrt import _sampler
from javisrt.engine.errors import ConfigError, ShapeError, UnavailableError
from javisrt.runtime import sampling
from javisrt.runtime.sampling import WAN_SIGMA_MAX, SamplerConfig, Solver

CPP_DIR = Path(__file__).resolve().parents[1] / "cpp"
IMPLS = {"python": sampling.sample_ref, "cpp": _sampler.sample}

# ---------------------------------------------------------------------------------------------
# Helpers: a random affine "velocity", independent loops (diffusers, float64 Euler)
# ---------------------------------------------------------------------------------------------


class AffineVelocity:
    """Per modality: v_c = a_c·x + b_c·s, v_u = a_u·x + b_u·(1 - s), s = t/1000, computed in the
    inputs' dtype. a_c in [-1, 0] and a_u = a_c ± 0.1 keep the guided flow contracting, so latents
    stay O(1). Coefficients are float32 values (upcast exactly for float64 runs). Checks the CFG
    contract on every call: both halves equal, one timestep for all 2B samples."""

    def __init__(self, shapes: list[tuple[int, ...]], seed: int = 0) -> None:
        rng = np.random.default_rng(seed)
        self.coef = []
        for shape in shapes:
            a_c = rng.uniform(-1.0, 0.0, shape[1:])
            a_u = a_c + rng.uniform(-0.1, 0.1, shape[1:])
            b_c, b_u = 0.5 * rng.standard_normal((2, *shape[1:]))
            self.coef.append([c.astype(np.float32) for c in (a_c, a_u, b_c, b_u)])
        self.calls = 0

    def __call__(self, inputs: list[np.ndarray], timesteps: np.ndarray) -> list[np.ndarray]:
        self.calls += 1
        assert np.all(timesteps == timesteps[0]), "one timestep per step"
        outs = []
        for k, x in enumerate(inputs):
            b = x.shape[0] // 2
            assert timesteps.shape == (2 * b,)
            assert np.array_equal(x[:b], x[b:]), "cond and uncond halves must see the same latent"
            dt = x.dtype.type
            a_c, a_u, b_c, b_u = (c.astype(x.dtype) for c in self.coef[k])
            s = timesteps[0].astype(x.dtype) / dt(1000)
            outs.append(np.concatenate([a_c * x[:b] + b_c * s, a_u * x[b:] + b_u * (dt(1) - s)]))
        return outs


def recording(denoiser: Callable[..., Any], trajectory: list[list[np.ndarray]]) -> Callable[..., Any]:
    """Wrap a denoiser so that each step's latents (the cond half of its inputs) are recorded."""

    def wrapped(inputs: list[np.ndarray], timesteps: np.ndarray) -> Any:
        trajectory.append([np.array(x[: x.shape[0] // 2]) for x in inputs])
        return denoiser(inputs, timesteps)

    return wrapped


def diffusers_scheduler(config: SamplerConfig) -> Any:
    """The diffusers scheduler of a config, its timesteps set (Euler: our unshifted t_i/1000).
    diffusers is imported here, not at module level, so the GPU tests collect on machines without it."""
    from diffusers import FlowMatchEulerDiscreteScheduler, UniPCMultistepScheduler

    n = config.steps
    if config.solver is Solver.EULER:
        euler = FlowMatchEulerDiscreteScheduler(shift=config.shift)
        euler.set_timesteps(sigmas=[1.0 - i / n for i in range(n)])
        return euler
    unipc = UniPCMultistepScheduler(
        prediction_type="flow_prediction",
        use_flow_sigmas=True,
        flow_shift=config.shift,
        solver_order=2,
        solver_type="bh2",
        predict_x0=True,
    )
    unipc.set_timesteps(sigmas=np.linspace(config.sigma_max, config.sigma_min, n + 1)[:-1])
    return unipc


def exact_unipc_sigmas(config: SamplerConfig) -> np.ndarray:
    """diffusers' flow sigmas in float64, before its float32 cast."""
    s = np.linspace(config.sigma_max, config.sigma_min, config.steps + 1)[:-1]
    s = config.shift * s / (1 + (config.shift - 1) * s)
    if abs(s[0] - 1) < 1e-6:
        s[0] -= 1e-6
    return np.concatenate([s, [0.0]])


def diffusers_sample(
    latents: list[np.ndarray],
    denoiser: Callable[..., Any],
    config: SamplerConfig,
    dtype: type = np.float32,
    exact_sigmas: bool = False,
) -> list[np.ndarray]:
    """A diffusers-style loop (WanPipeline's shape): torch.cat the CFG batch, call the model, CFG,
    one scheduler per modality. Our denoiser returns v = x0 - eps; diffusers' flow_prediction
    expects eps - x0, hence ``-v``. ``dtype=float64, exact_sigmas=True`` makes diffusers' UniPC a
    float64 oracle."""
    xs = [torch.from_numpy(np.asarray(x, dtype=dtype)) for x in latents]
    scheds = [diffusers_scheduler(config) for _ in xs]
    if exact_sigmas:
        for s in scheds:
            s.sigmas = torch.from_numpy(exact_unipc_sigmas(config))
    for t in scheds[0].timesteps:
        inputs = [torch.cat([x, x]).numpy() for x in xs]
        ts = np.full(inputs[0].shape[0], float(t), dtype=dtype)
        outs = denoiser(inputs, ts)
        for k, (out, g) in enumerate(zip(outs, config.guidance)):
            v_c, v_u = torch.as_tensor(out).chunk(2)
            v = v_u + g * (v_c - v_u)
            xs[k] = scheds[k].step(-v, t, xs[k], return_dict=False)[0]
    return [x.numpy() for x in xs]


def euler_f64(latents: list[np.ndarray], denoiser: Callable[..., Any], config: SamplerConfig) -> list[np.ndarray]:
    """Float64 oracle of the rflow Euler loop with the exact (unrounded) shifted schedule."""
    n, r = config.steps, config.shift
    s = [(1 - i / n) for i in range(n)]
    t = [1000 * r * si / (1 + (r - 1) * si) for si in s] + [0.0]
    xs = [np.asarray(x, dtype=np.float64) for x in latents]
    for i in range(n):
        outs = denoiser([np.concatenate([x, x]) for x in xs], np.full(2 * xs[0].shape[0], t[i]))
        for k, (out, g) in enumerate(zip(outs, config.guidance)):
            b = out.shape[0] // 2
            v = out[b:] + g * (out[:b] - out[b:])
            xs[k] = xs[k] + v * (t[i] - t[i + 1]) / 1000
    return xs


def random_latents(shapes: list[tuple[int, ...]], seed: int = 1) -> list[np.ndarray]:
    rng = np.random.default_rng(seed)
    return [rng.standard_normal(s).astype(np.float32) for s in shapes]


def trajectory_of(impl: Callable[..., Any], latents: list[np.ndarray], den: Any, config: SamplerConfig) -> list[list[np.ndarray]]:
    traj: list[list[np.ndarray]] = []
    res = impl(latents, recording(den, traj), config)
    return [*traj, res.latents]


def diffusers_trajectory(latents: list[np.ndarray], den: Any, config: SamplerConfig, **kw: Any) -> list[list[np.ndarray]]:
    traj: list[list[np.ndarray]] = []
    final = diffusers_sample(latents, recording(den, traj), config, **kw)
    return [*traj, final]


def max_err(a: list[list[np.ndarray]], b: list[list[np.ndarray]], k: int) -> float:
    assert len(a) == len(b)
    return max(float(np.abs(x[k].astype(np.float64) - y[k]).max()) for x, y in zip(a, b))


# Odd sizes (nothing a multiple of 4), batch 2, video [B,C,T,H,W] and audio [B,C,T,F].
SHAPES = [(2, 3, 5, 7, 9), (2, 8, 13, 5)]

# ---------------------------------------------------------------------------------------------
# 1. Schedules
# ---------------------------------------------------------------------------------------------

SHIFT_CASES = [  # (H, W, F) -> r as the reference computes it in bf16 (model-spec.md §6.1)
    ((240, 426, 65), 2.421875),
    ((480, 854, 81), 5.59375),
    ((240, 426, 33), 1.3984375),
    ((480, 832, 81), 5.53125),
]


@pytest.mark.parametrize(("hwf", "expected"), SHIFT_CASES)
def test_rflow_shift_is_bf16_rounded(hwf: tuple[int, int, int], expected: float) -> None:
    assert sampling.rflow_shift(*hwf) == expected
    assert _sampler.rflow_shift(*hwf) == expected


SPEC_TIMESTEPS = {  # model-spec.md §6.1: first three and last three of the 50-step schedule
    (240, 426, 65): ([1000.0, 991.64, 983.09], [133.89, 91.66, 47.10]),
    (480, 854, 81): ([1000.0, 996.36, 992.61], [263.11, 189.02, 102.46]),
}


@pytest.mark.parametrize("hwf", list(SPEC_TIMESTEPS))
@pytest.mark.parametrize("impl", ["python", "cpp"])
def test_rflow_timesteps_match_spec(hwf: tuple[int, int, int], impl: str) -> None:
    fn = sampling.rflow_timesteps if impl == "python" else _sampler.rflow_timesteps
    ts = fn(50, *hwf)
    assert ts.dtype == np.float32 and ts.shape == (50,)
    head, tail = SPEC_TIMESTEPS[hwf]
    np.testing.assert_allclose(ts[:3], head, atol=1e-2, rtol=0)
    np.testing.assert_allclose(ts[-3:], tail, atol=1e-2, rtol=0)


def opensora_timestep_transform(t: torch.Tensor, model_kwargs: dict[str, torch.Tensor]) -> torch.Tensor:
    """Open-Sora's timestep_transform as JavisDiT++ calls it (num_timesteps=1000, scale=1)."""
    t = t / 1000
    resolution = model_kwargs["height"] * model_kwargs["width"]
    ratio_space = (resolution / (512 * 512)).sqrt()
    if model_kwargs["num_frames"][0] == 1:
        num_frames = torch.ones_like(model_kwargs["num_frames"])
    else:
        num_frames = model_kwargs["num_frames"] // 17 * 5
    ratio_time = (num_frames / 1).sqrt()
    ratio = ratio_space * ratio_time * 1.0
    new_t = ratio * t / (1 + (ratio - 1) * t)
    return new_t * 1000


BUCKETS = [(h, w, f) for h, w in [(240, 426), (240, 432), (360, 640), (480, 854), (480, 832), (144, 256), (720, 1280)] for f in (1, 17, 33, 49, 65, 81, 129)]


@pytest.mark.parametrize("steps", [50, 30])
def test_rflow_timesteps_equal_reference_code(steps: int) -> None:
    """Bit-exact against the reference code run on bf16 height/width/num_frames, over buckets."""
    for h, w, f in BUCKETS:
        kw = {k: torch.tensor([v], dtype=torch.bfloat16) for k, v in (("height", h), ("width", w), ("num_frames", f))}
        ref = np.array([float(opensora_timestep_transform(torch.tensor([(1.0 - i / steps) * 1000]), kw)) for i in range(steps)], dtype=np.float32)
        np.testing.assert_array_equal(sampling.rflow_timesteps(steps, h, w, f), ref, err_msg=f"python {h}x{w}/{f}")
        np.testing.assert_array_equal(_sampler.rflow_timesteps(steps, h, w, f), ref, err_msg=f"cpp {h}x{w}/{f}")


def test_bf16_round_matches_torch() -> None:
    xs = np.concatenate([np.random.default_rng(0).standard_normal(2000) * 1e3, [0.0, -0.0, 1.00390625, 1.01171875, 854.0, 3e38]])
    for x in xs.astype(np.float32):
        assert _sampler.bf16_round(float(x)) == float(torch.tensor(float(x)).to(torch.bfloat16)), x


@pytest.mark.parametrize("shift", [1.0, 2.421875, 3.0, 7.25])
def test_flow_timesteps_python_equals_cpp(shift: float) -> None:
    for steps in (1, 2, 7, 50):
        np.testing.assert_array_equal(sampling.flow_timesteps(steps, shift), _sampler.flow_timesteps(steps, shift))


@pytest.mark.parametrize("steps", [1, 2, 3, 10, 50])
@pytest.mark.parametrize("shift", [1.0, 3.0, 5.0])
def test_unipc_schedule_equals_diffusers(steps: int, shift: float) -> None:
    """diffusers' own set_timesteps(N) (sigma_max=1, sigma_min=1/1000) and Wan2.1's sigmas."""
    from diffusers import UniPCMultistepScheduler

    sched = UniPCMultistepScheduler(prediction_type="flow_prediction", use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True)
    sched.set_timesteps(steps)
    wan = SamplerConfig(Solver.UNIPC, steps, (5.0,), shift)
    for smax, smin, ref in [(1.0, 0.001, sched), (WAN_SIGMA_MAX, 0.0, diffusers_scheduler(wan))]:
        for mod in (sampling, _sampler):
            np.testing.assert_array_equal(mod.unipc_sigmas(steps, shift, smax, smin), ref.sigmas.numpy())
            np.testing.assert_array_equal(mod.unipc_timesteps(steps, shift, smax, smin), ref.timesteps.numpy().astype(np.float32))


# ---------------------------------------------------------------------------------------------
# 2. The loop: C++ == Python reference
# ---------------------------------------------------------------------------------------------

LOOP_CONFIGS = {
    "euler-240p": SamplerConfig.rflow(240, 426, 65, steps=50, guidance=(5.0, 3.5)),
    "unipc-wan": SamplerConfig(Solver.UNIPC, 50, (5.0, 3.5), 5.0),
    "unipc-diffusers": SamplerConfig(Solver.UNIPC, 50, (6.0, 2.0), 3.0, sigma_max=1.0, sigma_min=0.001),
    "unipc-3steps": SamplerConfig(Solver.UNIPC, 3, (5.0, 3.5), 5.0),
    "unipc-1step": SamplerConfig(Solver.UNIPC, 1, (5.0, 3.5), 5.0),
}


@pytest.mark.parametrize("name", list(LOOP_CONFIGS))
def test_cpp_loop_equals_python_reference(name: str) -> None:
    config = LOOP_CONFIGS[name]
    latents = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    ref = trajectory_of(sampling.sample_ref, latents, den, config)
    out = trajectory_of(_sampler.sample, latents, den, config)
    assert len(out) == len(ref) == config.steps + 1
    for k in range(len(SHAPES)):  # exact: same fp32 op sequence, no FMA contraction (cpp/CMakeLists.txt)
        for i, (x, y) in enumerate(zip(out, ref)):
            assert np.array_equal(x[k], y[k]), f"{name} modality {k} step {i}: max |cpp - python| {max_err([x], [y], k):.2e}"
    assert all(np.array_equal(x, y) for x, y in zip(latents, random_latents(SHAPES))), "inputs modified"


@pytest.mark.parametrize("solver", [Solver.EULER, Solver.UNIPC])
def test_single_modality_and_torch_inputs(solver: Solver) -> None:
    config = SamplerConfig(solver, 12, (4.0,), 3.0)
    shapes = [(1, 4, 3, 6, 10)]
    latents = random_latents(shapes)
    den = AffineVelocity(shapes)
    ref = sampling.sample_ref(latents, den, config)
    out = _sampler.sample([torch.from_numpy(latents[0])], den, config)  # CPU tensors are accepted
    assert out.steps_done == ref.steps_done == 12 and not out.cancelled
    assert out.latents[0].shape == shapes[0] and out.latents[0].dtype == np.float32
    assert np.array_equal(out.latents[0], ref.latents[0])


# ---------------------------------------------------------------------------------------------
# 3. External references: diffusers schedulers and a float64 oracle
# ---------------------------------------------------------------------------------------------


def _check_against_diffusers(config: SamplerConfig, oracle: list[list[np.ndarray]], what: str) -> None:
    """Tolerance (shared/style.md lesson 7): err(ours) <= 2 err(diffusers fp32) + floor, both
    measured against the float64 oracle over the whole trajectory, and |ours - diffusers| within the
    same bound. The floor is the fp32 noise floor of the latents accumulated over the loop as a
    random walk, sqrt(steps) * noise_floor: the two fp32 loops round their schedules differently
    (Open-Sora computes t on the 1000 scale, diffusers sigma on the unit scale), so neither error is
    a fixed multiple of the other. Algorithmic differences (order, corrector, sign) are >= 1e-3."""
    latents = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    d32 = diffusers_trajectory(latents, den, config)
    for impl_name, impl in IMPLS.items():
        ours = trajectory_of(impl, latents, den, config)
        for k in range(len(SHAPES)):
            floor = config.steps**0.5 * max(noise_floor(torch.from_numpy(x[k])) for x in oracle)
            e_ours, e_diff, e_both = max_err(ours, oracle, k), max_err(d32, oracle, k), max_err(ours, d32, k)
            bound = 2 * e_diff + floor
            print(f"{what} {impl_name} modality {k}: |ours-oracle| {e_ours:.2e}, |diffusers-oracle| {e_diff:.2e}, |ours-diffusers| {e_both:.2e}, bound {bound:.2e}")
            assert e_ours <= bound and e_both <= bound


@pytest.mark.parametrize("shift", [1.0, 2.421875])
def test_euler_equals_diffusers_flow_match_euler(shift: float) -> None:
    """shift=1: the unshifted schedule; 2.421875: the released 240p/65f shift."""
    config = SamplerConfig(Solver.EULER, 50, (5.0, 3.5), shift)
    latents = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    traj: list[list[np.ndarray]] = []
    final = euler_f64(latents, recording(den, traj), config)
    _check_against_diffusers(config, [*traj, final], f"euler shift={shift}")


@pytest.mark.parametrize(
    "config",
    [
        SamplerConfig(Solver.UNIPC, 50, (5.0, 3.5), 5.0),  # Wan2.1 t2v sigmas
        SamplerConfig(Solver.UNIPC, 50, (6.0, 2.0), 3.0, sigma_max=1.0, sigma_min=0.001),  # diffusers' own
        SamplerConfig(Solver.UNIPC, 4, (5.0, 3.5), 8.0),
    ],
    ids=["wan-shift5", "diffusers-shift3", "4steps-shift8"],
)
def test_unipc_equals_diffusers_unipc(config: SamplerConfig) -> None:
    latents = random_latents(SHAPES)
    oracle = diffusers_trajectory(latents, AffineVelocity(SHAPES), config, dtype=np.float64, exact_sigmas=True)
    _check_against_diffusers(config, oracle, f"unipc {config.steps} steps shift={config.shift}")


def test_unipc_differs_from_euler() -> None:
    """The UniPC tests above would be vacuous if the solvers agreed: they must not, at this scale."""
    latents = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    a = _sampler.sample(latents, den, SamplerConfig(Solver.EULER, 10, (5.0, 3.5), 3.0)).latents
    b = _sampler.sample(latents, den, SamplerConfig(Solver.UNIPC, 10, (5.0, 3.5), 3.0, 1.0, 0.001)).latents
    assert max(float(np.abs(x - y).max()) for x, y in zip(a, b)) > 1e-3


# ---------------------------------------------------------------------------------------------
# 4. Progress, cancellation, errors, fallback
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", list(IMPLS))
@pytest.mark.parametrize("solver", [Solver.EULER, Solver.UNIPC])
def test_progress_and_cancellation(impl: str, solver: Solver) -> None:
    config = SamplerConfig(solver, 20, (5.0, 3.5), 3.0)
    latents = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    seen: list[tuple[int, int, float, float]] = []
    res = IMPLS[impl](latents, den, config, progress=lambda *a: seen.append(a), cancel=lambda: len(seen) >= 7)
    assert res.cancelled and res.steps_done == 7 and len(res.step_times_s) == 7 and den.calls == 7
    assert [s[:2] for s in seen] == [(i, 20) for i in range(1, 8)]
    schedule = sampling.flow_timesteps(20, 3.0) if solver is Solver.EULER else sampling.unipc_timesteps(20, 3.0)
    np.testing.assert_array_equal(np.array([s[2] for s in seen], dtype=np.float32), schedule[:7])
    assert all(s[3] >= 0 for s in seen)
    # The state after 7 steps is the same in both implementations.
    den2 = AffineVelocity(SHAPES)
    other = IMPLS["cpp" if impl == "python" else "python"](latents, den2, config, cancel=lambda: den2.calls >= 7)
    assert other.steps_done == 7
    for x, y in zip(res.latents, other.latents):
        assert np.array_equal(x, y)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_cancel_before_first_step(impl: str) -> None:
    latents = random_latents(SHAPES)
    res = IMPLS[impl](latents, AffineVelocity(SHAPES), SamplerConfig(steps=5, guidance=(5.0, 5.0)), cancel=lambda: True)
    assert res.cancelled and res.steps_done == 0 and res.step_times_s == []
    assert all(np.array_equal(x, y) for x, y in zip(res.latents, latents))


def _bad_output(kind: str) -> Callable[..., Any]:
    def den(inputs: list[np.ndarray], timesteps: np.ndarray) -> Any:
        good = [np.zeros_like(x) for x in inputs]
        if kind == "not-a-list":
            return good[0]
        if kind == "count":
            return good[:1]
        if kind == "shape":
            return [good[0][:1], good[1]]
        if kind == "dtype":
            return [good[0].astype(np.float64), good[1]]
        return [np.asfortranarray(good[0]) if good[0].ndim > 1 else good[0], good[1]]  # layout

    return den


@pytest.mark.parametrize("impl", list(IMPLS))
def test_bad_arguments_raise_typed_errors(impl: str) -> None:
    fn = IMPLS[impl]
    lat = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    cfg = SamplerConfig(steps=3, guidance=(5.0, 5.0))
    with pytest.raises(ShapeError, match="float32"):
        fn([lat[0].astype(np.float64), lat[1]], den, cfg)
    with pytest.raises(ShapeError, match="C-contiguous"):
        fn([lat[0][:, :, ::2], lat[1]], den, cfg)
    with pytest.raises(ShapeError, match="C-contiguous"):
        fn([torch.from_numpy(lat[0]).transpose(1, 2), lat[1]], den, cfg)
    with pytest.raises(ShapeError, match="batch"):
        fn([lat[0], lat[1][:1]], den, cfg)
    with pytest.raises(ShapeError, match="list of arrays"):
        fn(lat[0], den, cfg)
    with pytest.raises(ShapeError, match="1 or 2 modalities"):
        fn([lat[0], lat[1], lat[1]], den, cfg)
    with pytest.raises(ConfigError, match="guidance"):
        fn(lat[:1], den, cfg)
    for kind, msg in [("not-a-list", "list"), ("count", "modalities"), ("shape", "shape"), ("dtype", "float32"), ("layout", "C-contiguous")]:
        with pytest.raises(ShapeError, match=msg):
            fn(lat, _bad_output(kind), cfg)
    # Config checks: the dataclass validates at construction; the C++ side re-validates anything
    # with the same attributes.
    for bad in [dict(steps=0), dict(steps=-3), dict(solver="heun"), dict(shift=0.0), dict(guidance=())]:
        with pytest.raises(ConfigError):
            SamplerConfig(**bad)  # type: ignore[arg-type]
        ns = types.SimpleNamespace(**{**vars(cfg), **bad})
        with pytest.raises(ConfigError):
            _sampler.sample(lat, den, ns)


@pytest.mark.parametrize("impl", list(IMPLS))
def test_denoiser_errors_propagate_and_inputs_are_read_only(impl: str) -> None:
    lat = random_latents(SHAPES)

    def raising(inputs: list[np.ndarray], timesteps: np.ndarray) -> Any:
        raise KeyError("model exploded")

    with pytest.raises(KeyError, match="model exploded"):
        IMPLS[impl](lat, raising, SamplerConfig(steps=3))

    def writing(inputs: list[np.ndarray], timesteps: np.ndarray) -> Any:
        inputs[0][...] = 0
        return inputs

    with pytest.raises(ValueError, match="read-only"):
        IMPLS[impl](lat, writing, SamplerConfig(steps=3))


@pytest.mark.parametrize("solver", [Solver.EULER, Solver.UNIPC])
def test_denoiser_may_return_its_inputs(solver: Solver) -> None:
    """Outputs aliasing the loop's static input buffers are legal (the C++ update copies them)."""
    config = SamplerConfig(solver, 6, (5.0, 3.5), 3.0)
    lat = random_latents(SHAPES)
    ref = sampling.sample_ref(lat, lambda inputs, t: list(inputs), config)
    out = _sampler.sample(lat, lambda inputs, t: list(inputs), config)
    for x, y in zip(out.latents, ref.latents):
        assert np.array_equal(x, y)


def test_missing_extension_falls_back_loudly(monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    assert sampling.backend() == "cpp", "the extension must be built on dev/CI machines"
    lat = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    cfg = SamplerConfig.rflow(240, 426, 65, steps=4)
    fast = sampling.sample(lat, den, cfg)
    assert not caplog.records
    monkeypatch.setattr(sampling, "_ext", None)
    with caplog.at_level(logging.WARNING, logger="javisrt.runtime.sampling"):
        slow = sampling.sample(lat, den, cfg)
    assert sampling.backend() == "python"
    assert any(r.levelno == logging.WARNING and "not built" in r.getMessage() for r in caplog.records)
    for x, y in zip(fast.latents, slow.latents):
        assert np.array_equal(x, y)


# ---------------------------------------------------------------------------------------------
# 5. CUDA path: compiles here, raises cleanly without a GPU, matches the reference on one
# ---------------------------------------------------------------------------------------------

GENCODE = ["-gencode=arch=compute_90a,code=sm_90a", "-gencode=arch=compute_90,code=[sm_90,compute_90]"]


def test_cuda_sources_compile(tmp_path: Path) -> None:
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        pytest.skip("nvcc is not on PATH; the CUDA path is compiled only where nvcc is present")
    cmd = [nvcc, "-std=c++17", "-O3", *GENCODE, "-Xcompiler=-fPIC", f"-I{CPP_DIR / 'include'}",
           "-c", str(CPP_DIR / "src" / "cuda_loop.cu"), "-o", str(tmp_path / "cuda_loop.o")]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stdout}\n{proc.stderr}"
    assert (tmp_path / "cuda_loop.o").stat().st_size > 0
    assert _sampler.cuda_compiled(), "nvcc is present but javisrt._sampler was built without the CUDA path"


def test_cuda_entry_points_without_gpu() -> None:
    if torch.cuda.is_available():
        pytest.skip("a GPU is present: test_cuda_loop_equals_reference covers the CUDA path")
    cfg = SamplerConfig(steps=3, guidance=(5.0,))
    noop = lambda step, stream: None  # noqa: E731
    # A static CUDA 13 runtime on an older driver reads like "no GPU": the error names both versions.
    with pytest.raises(UnavailableError, match=r"driver: .*static runtime: CUDA \d+\.\d"):
        _sampler.cuda_device_count()
    with pytest.raises(UnavailableError):
        _sampler.sample_cuda([0x1000], [0x2000], [0x3000], [8], 0x4000, 1, cfg, enqueue=noop)
    with pytest.raises(UnavailableError):  # wait_stream (torch's current stream) is accepted, 0 = legacy default
        _sampler.sample_cuda([0x1000], [0x2000], [0x3000], [8], 0x4000, 1, cfg, enqueue=noop, wait_stream=0)
    # Argument checks come before the device check, so they are testable here.
    with pytest.raises(ShapeError, match="multiple of batch"):
        _sampler.sample_cuda([0x1000], [0x2000], [0x3000], [7], 0x4000, 2, cfg, enqueue=noop)
    with pytest.raises(ShapeError, match="null"):
        _sampler.sample_cuda([0], [0x2000], [0x3000], [8], 0x4000, 1, cfg, enqueue=noop)
    with pytest.raises(ConfigError, match="graph_exec"):
        _sampler.sample_cuda([0x1000], [0x2000], [0x3000], [8], 0x4000, 1, cfg)
    with pytest.raises(ConfigError, match="guidance"):
        _sampler.sample_cuda([0x1000] * 2, [0x2000] * 2, [0x3000] * 2, [8] * 2, 0x4000, 1, cfg, enqueue=noop)


def _device_problem(latents: list[np.ndarray], dev: torch.device) -> tuple[list[torch.Tensor], list[torch.Tensor],
                                                                       list[torch.Tensor], torch.Tensor]:
    """Latents and the denoiser's static buffers, made on torch's current stream of ``dev`` (no sync:
    the loop must order itself after that stream through ``wait_stream``)."""
    lat = [torch.from_numpy(x).to(dev, non_blocking=True) for x in latents]
    inp = [torch.zeros((2 * x.shape[0], *x.shape[1:]), device=dev) for x in latents]
    out = [torch.zeros_like(x) for x in inp]
    ts = torch.zeros(2 * latents[0].shape[0], device=dev)
    return lat, inp, out, ts


def _affine_enqueue(den: AffineVelocity, inp: list[torch.Tensor], out: list[torch.Tensor], ts: torch.Tensor,
                    stream: torch.cuda.Stream) -> Callable[[int, int], None]:  # fmt: skip
    """AffineVelocity as torch ops on the loop's stream. s = t / 1000 divides by a *tensor*: a Python
    divisor becomes a reciprocal multiply in torch's CUDA kernel, which is not numpy's t / 1000."""
    dev = ts.device
    coef = [[torch.from_numpy(c).to(dev) for c in cs] for cs in den.coef]
    thousand = torch.full((1,), 1000.0, device=dev)

    def enqueue(step: int, stream_ptr: int) -> None:
        assert stream_ptr == stream.cuda_stream
        with torch.cuda.stream(stream):
            s = ts[:1] / thousand
            for k, x in enumerate(inp):
                b = x.shape[0] // 2
                a_c, a_u, b_c, b_u = coef[k]
                out[k][:b] = a_c * x[:b] + b_c * s
                out[k][b:] = a_u * x[b:] + b_u * (1 - s)

    return enqueue


@pytest.mark.gpu
@pytest.mark.parametrize("solver", [Solver.EULER, Solver.UNIPC])
def test_cuda_loop_equals_reference(solver: Solver) -> None:
    """Device loop with an enqueue-callback denoiser (torch ops on the loop's stream) == the reference
    loop, bit for bit (torch.equal), with no torch.cuda.synchronize() between making the latents on
    torch's current stream and the loop (wait_stream orders them)."""
    config = SamplerConfig(solver, 20, (5.0, 3.5), 3.0)
    latents = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    ref = sampling.sample_ref(latents, den, config)
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    lat, inp, out, ts = _device_problem(latents, dev)
    res = _sampler.sample_cuda(
        [x.data_ptr() for x in lat], [x.data_ptr() for x in inp], [x.data_ptr() for x in out],
        [x.numel() for x in lat], ts.data_ptr(), latents[0].shape[0], config,
        stream=stream.cuda_stream, enqueue=_affine_enqueue(den, inp, out, ts, stream),
        wait_stream=torch.cuda.current_stream().cuda_stream,
    )  # fmt: skip
    assert res.steps_done == 20 and len(res.step_times_s) == 20 and not res.cancelled
    for x, y in zip(lat, ref.latents):
        assert torch.equal(x.cpu(), torch.from_numpy(np.asarray(y))), float((x.cpu() - torch.from_numpy(y)).abs().max())


@pytest.mark.gpu
def test_cuda_loop_selects_the_buffers_device() -> None:
    """Buffers on the last visible GPU while another is current: the loop runs there, restores the
    caller's device, and refuses host pointers and buffers split over devices."""
    n = torch.cuda.device_count()
    dev = torch.device("cuda", n - 1)
    config = SamplerConfig(Solver.EULER, 4, (5.0, 3.5), 3.0)
    latents = random_latents(SHAPES)
    den = AffineVelocity(SHAPES)
    ref = sampling.sample_ref(latents, den, config)
    torch.cuda.set_device(0)
    with torch.cuda.device(dev):
        stream = torch.cuda.Stream(dev)
        lat, inp, out, ts = _device_problem(latents, dev)
        producer = torch.cuda.current_stream(dev).cuda_stream
    args = ([x.data_ptr() for x in lat], [x.data_ptr() for x in inp], [x.data_ptr() for x in out],
            [x.numel() for x in lat], ts.data_ptr(), latents[0].shape[0], config)  # fmt: skip
    _sampler.sample_cuda(*args, stream=stream.cuda_stream, enqueue=_affine_enqueue(den, inp, out, ts, stream),
                         wait_stream=producer)  # fmt: skip
    assert torch.cuda.current_device() == 0
    for x, y in zip(lat, ref.latents):
        assert torch.equal(x.cpu(), torch.from_numpy(np.asarray(y)))
    host = torch.zeros(ts.numel())
    with pytest.raises(ShapeError, match="not CUDA device memory"):
        _sampler.sample_cuda(*args[:4], host.data_ptr(), *args[5:], stream=stream.cuda_stream, enqueue=lambda i, s: None)
    if n > 1:
        other = torch.zeros(ts.numel(), device="cuda:0")
        with pytest.raises(ShapeError, match="one device"):
            _sampler.sample_cuda(*args[:4], other.data_ptr(), *args[5:], stream=stream.cuda_stream,
                                 enqueue=lambda i, s: None)  # fmt: skip


def _sleep_cycles(seconds: float) -> int:
    """GPU clock cycles torch.cuda._sleep needs for ``seconds``, measured with CUDA events."""
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda._sleep(1_000_000)  # warm-up
    start.record()
    torch.cuda._sleep(100_000_000)
    end.record()
    end.synchronize()
    return int(seconds * 1e8 / (start.elapsed_time(end) * 1e-3))


@pytest.mark.gpu
def test_cuda_loop_syncs_when_a_callback_raises() -> None:
    """An Euler enqueue that raises at step 2 after queueing long GPU work: when the exception reaches
    Python, the loop's stream is idle (the resource destructor synchronised it unconditionally)."""
    config = SamplerConfig(Solver.EULER, 5, (5.0, 3.5), 3.0)
    latents = random_latents(SHAPES)
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    lat, inp, out, ts = _device_problem(latents, dev)

    def enqueue(step: int, stream_ptr: int) -> None:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(_sleep_cycles(0.3))
        if step == 2:
            raise RuntimeError("denoiser failed")

    with pytest.raises(RuntimeError, match="denoiser failed"):
        _sampler.sample_cuda(
            [x.data_ptr() for x in lat], [x.data_ptr() for x in inp], [x.data_ptr() for x in out],
            [x.numel() for x in lat], ts.data_ptr(), latents[0].shape[0], config,
            stream=stream.cuda_stream, enqueue=enqueue, max_inflight=0,
            wait_stream=torch.cuda.current_stream().cuda_stream,
        )  # fmt: skip
    assert stream.query(), "kernels of the failed loop were still running after the exception"


@pytest.mark.gpu
def test_cuda_loop_waits_without_spinning() -> None:
    """Blocking-sync events: through 3 steps of ~0.4 s GPU work the host sleeps (CPU time well below
    wall time; a spinning wait would burn a core for the whole run)."""
    config = SamplerConfig(Solver.EULER, 3, (5.0, 3.5), 3.0)
    latents = random_latents(SHAPES)
    dev = torch.device("cuda")
    stream = torch.cuda.Stream()
    lat, inp, out, ts = _device_problem(latents, dev)
    cycles = _sleep_cycles(0.4)

    def enqueue(step: int, stream_ptr: int) -> None:
        with torch.cuda.stream(stream):
            torch.cuda._sleep(cycles)

    torch.cuda.synchronize()
    wall, cpu = time.perf_counter(), time.process_time()
    _sampler.sample_cuda(
        [x.data_ptr() for x in lat], [x.data_ptr() for x in inp], [x.data_ptr() for x in out],
        [x.numel() for x in lat], ts.data_ptr(), latents[0].shape[0], config,
        stream=stream.cuda_stream, enqueue=enqueue, max_inflight=1,
    )  # fmt: skip
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    assert wall > 0.8, f"the GPU work took only {wall:.2f} s: the test cannot tell spinning from sleeping"
    assert cpu < 0.5 * wall, f"host CPU time {cpu:.2f} s over {wall:.2f} s of waiting: busy-wait"


# ---------------------------------------------------------------------------------------------
# 6. The engine hand-off (DenoiseSession.loop_binding -> LoopBinding.run)
# ---------------------------------------------------------------------------------------------

TINY_DIMS = {"batch": 2, "video_frames": 2, "video_height": 4, "video_width": 6, "audio_frames": 4}


def _tiny_session(device: str = "cpu") -> tuple[Any, Any]:
    from javisrt.engine.config import JavisConfig
    from javisrt.engine.model import build_model, init_weights
    from javisrt.export.contract import DiTContract
    from javisrt.runtime.backends import create_engine
    from javisrt.runtime.denoise_session import DenoiseSession

    cfg = JavisConfig.from_name("tiny")
    model = init_weights(build_model(cfg), torch.Generator().manual_seed(0)).eval()
    x = DiTContract.for_config(cfg).sample_inputs(TINY_DIMS, torch.Generator().manual_seed(3))
    eng = create_engine("torch", model=model, device=device)
    shapes = {"video": x["video"].shape[1:], "audio": x["audio"].shape[1:]}
    return eng, DenoiseSession(eng, x["context"].to(device), shapes)


def test_loop_binding_dies_with_its_buffers() -> None:
    """A binding taken before allocate(other dims) / unload() refuses to hand out its dead pointers and
    its enqueue refuses to run (the loop would write freed buffers)."""
    eng, session = _tiny_session()
    lb = session.loop_binding()
    lb.check_live()
    eng.allocate({**TINY_DIMS, "video_frames": 3})
    with pytest.raises(ConfigError, match="released"):
        lb.sample_cuda_kwargs()
    with pytest.raises(ConfigError, match="released"):
        lb.enqueue(0, 0)  # type: ignore[misc]
    eng.allocate(TINY_DIMS)  # the same dims again: new buffers, the old binding stays dead
    with pytest.raises(ConfigError, match="released"):
        lb.check_live()
    eng2, session2 = _tiny_session()
    lb2 = session2.loop_binding()
    eng2.unload()
    with pytest.raises(ConfigError, match="released"):
        lb2.run([], SamplerConfig(steps=2, guidance=(5.0, 5.0)))  # liveness first, before the latents
    eng.unload()


def test_loop_binding_checks_latents() -> None:
    eng, session = _tiny_session()
    lb = session.loop_binding()
    good = [torch.zeros(1, *s) for s in ((16, 2, 4, 6), (8, 4, 16))]
    assert [x.numel() for x in good] == list(lb.numels)
    lb.check_latents(good)
    with pytest.raises(ShapeError, match="modalities"):
        lb.check_latents(good[:1])
    with pytest.raises(ShapeError, match="float32"):
        lb.check_latents([good[0].double(), good[1]])
    with pytest.raises(ShapeError, match="contiguous"):
        lb.check_latents([good[0].transpose(1, 2), good[1]])
    with pytest.raises(ShapeError, match="is on meta"):
        lb.check_latents([good[0].to("meta"), good[1]])
    with pytest.raises(ShapeError, match="elements"):
        lb.check_latents([good[0], torch.zeros(1, 8, 4, 8)])
    with pytest.raises(UnavailableError, match="device buffers"):
        lb.run(good, SamplerConfig(steps=2, guidance=(5.0, 5.0)))
    eng.unload()


@pytest.mark.gpu
def test_loop_binding_run_equals_host_loop() -> None:
    """The CUDA loop through LoopBinding.run (latents from torch.randn on torch's current stream, no
    sync before the loop) == the host loop through host_denoiser on the same engine, bit for bit:
    the same deterministic engine sees the same inputs, and the latent math is bit-exact on both."""
    eng, session = _tiny_session("cuda")
    cfg = sampling.SamplerConfig.rflow(32, 48, 33, 5, (5.0, 4.0))
    gen = torch.Generator("cuda").manual_seed(7)
    latents = [torch.randn(1, *s, device="cuda", generator=gen) for s in ((16, 2, 4, 6), (8, 4, 16))]
    host = sampling.sample([x.cpu().numpy() for x in latents], session.host_denoiser(), cfg)
    res = session.loop_binding().run(latents, cfg)
    assert res.steps_done == 5
    for x, y in zip(latents, host.latents, strict=True):
        assert torch.equal(x.cpu(), torch.from_numpy(np.asarray(y)))
    eng.unload()
