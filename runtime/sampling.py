"""The denoising loop: typed config, schedules, and the pure-Python reference of the C++ loop.

The production loop is the C++ extension ``javisrt._sampler`` (``cpp/``); this module holds its
reference implementation with the same signatures, and :func:`sample` picks the extension when it is
built, falling back to :func:`sample_ref` with a logged warning when it is not.

Conventions (model-spec.md §6):
  * noise ``x_t = (1 - t/1000)·x0 + (t/1000)·ε``, ``t`` in [0, 1000];
  * the denoiser returns the rectified-flow velocity ``v = x0 - ε`` (the JavisDiT model's negated
    output). diffusers' ``flow_prediction`` model output is ``ε - x0 = -v``: to drive a diffusers
    scheduler with our denoiser, pass ``-v``;
  * one forward per step on the CFG batch ``[cond; uncond]`` (2B samples per modality), then
    ``v = v_u + g·(v_c - v_u)`` with a separate scale ``g`` per modality (released: 5.0 for both).

Solvers:
  * ``Solver.EULER`` — Open-Sora / JavisDiT++ ``RFlow.sample``: ``t_i = (1 - i/N)·1000`` shifted by
    ``r·s/(1+(r-1)·s)``, ``z <- z + v·(t_i - t_{i+1})/1000`` (last step to 0). The released sampler.
  * ``Solver.UNIPC`` — diffusers ``UniPCMultistepScheduler(prediction_type="flow_prediction",
    use_flow_sigmas=True, flow_shift=shift, solver_order=2, solver_type="bh2", predict_x0=True)``,
    the Wan2.1 t2v sampler. Its scalar coefficients are computed in float64 from the float32 sigmas
    (diffusers computes them on float32 0-dim tensors); the latent arithmetic is diffusers' fp32 op
    sequence.

All latent math is float32 with one fixed operation order, shared with ``cpp/src/host_loop.cpp``
and the CUDA kernels: the C++ host loop equals this reference exactly (tests/test_sampler.py checks
every step with ``np.array_equal``); the CUDA loop is tested against it to 1e-6 relative.
"""

from __future__ import annotations

import enum
import importlib
import logging
import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from javisrt.engine.errors import ConfigError, ShapeError, UnavailableError

logger = logging.getLogger(__name__)

__all__ = [
    "WAN_SIGMA_MAX",
    "Denoiser",
    "SampleResult",
    "SamplerConfig",
    "Solver",
    "backend",
    "flow_timesteps",
    "rflow_shift",
    "rflow_timesteps",
    "sample",
    "sample_ref",
    "unipc_sigmas",
    "unipc_timesteps",
]

# Wan2.1's FlowUniPCMultistepScheduler takes sigma_max from its float32 training sigmas:
# float32(1 - 1/1000) = 0.9990000128746033, not 0.999.
WAN_SIGMA_MAX = float(np.float32(0.999))

Denoiser = Callable[[list[np.ndarray], np.ndarray], Sequence[Any]]
"""``denoiser(inputs, timesteps) -> velocities``: inputs are read-only float32 ``[2B, ...]`` arrays
(cond half first), valid only during the call; timesteps a float32 ``[2B]`` array; it returns one
float32 C-contiguous ``[2B, ...]`` array (or CPU tensor) per modality holding ``v = x0 - ε``."""

Progress = Callable[[int, int, float, float], None]
"""``progress(steps_done, steps, t, step_seconds)``, called after each step."""

Cancel = Callable[[], bool]
"""Polled before each step; returning True stops the loop cleanly."""


class Solver(enum.Enum):
    EULER = "euler"
    UNIPC = "unipc"


@dataclass(frozen=True)
class SamplerConfig:
    """Everything the loop needs besides the latents and the denoiser.

    ``shift`` is the rflow ratio ``r`` for Euler (use :meth:`rflow` to get the released value for a
    resolution) and diffusers' ``flow_shift`` for UniPC. ``sigma_max``/``sigma_min`` are used by
    UniPC only: its unshifted sigmas are ``linspace(sigma_max, sigma_min, steps + 1)[:-1]`` (Wan2.1:
    ``WAN_SIGMA_MAX``, 0; diffusers' own ``set_timesteps(N)``: 1.0, 0.001).
    """

    solver: Solver = Solver.EULER
    steps: int = 50
    guidance: tuple[float, ...] = (5.0, 5.0)  # one CFG scale per modality, video first
    shift: float = 1.0
    sigma_max: float = WAN_SIGMA_MAX
    sigma_min: float = 0.0

    def __post_init__(self) -> None:
        if not isinstance(self.solver, Solver):
            try:
                object.__setattr__(self, "solver", Solver(self.solver))
            except ValueError:
                raise ConfigError(f"unknown solver {self.solver!r} (expected 'euler' or 'unipc')") from None
        if isinstance(self.steps, bool) or not isinstance(self.steps, int) or self.steps <= 0:
            raise ConfigError(f"steps must be an int >= 1, got {self.steps!r}")
        guidance = tuple(float(g) for g in self.guidance)
        if not 1 <= len(guidance) <= 2 or not all(math.isfinite(g) for g in guidance):
            raise ConfigError(f"guidance needs 1 or 2 finite scales (one per modality), got {self.guidance!r}")
        object.__setattr__(self, "guidance", guidance)
        if not (math.isfinite(self.shift) and self.shift > 0):
            raise ConfigError(f"shift must be a finite number > 0, got {self.shift!r}")
        if self.solver is Solver.UNIPC and not 0.0 <= self.sigma_min < self.sigma_max <= 1.0:
            raise ConfigError(
                f"UniPC needs 0 <= sigma_min < sigma_max <= 1, got {self.sigma_min!r}, {self.sigma_max!r}"
            )

    @classmethod
    def rflow(
        cls,
        height: int,
        width: int,
        num_frames: int,
        steps: int = 50,
        guidance: tuple[float, ...] = (5.0, 5.0),
        scale: float = 1.0,
    ) -> SamplerConfig:
        """The released JavisDiT++ sampler for a bucket: Euler, shift = :func:`rflow_shift`."""
        return cls(Solver.EULER, steps, guidance, rflow_shift(height, width, num_frames, scale))

    @classmethod
    def wan_unipc(cls, steps: int = 50, shift: float = 5.0, guidance: tuple[float, ...] = (5.0,)) -> SamplerConfig:
        """Wan2.1 T2V's sampler (model-spec.md §6.2): flow UniPC, sigma_max = WAN_SIGMA_MAX, sigma_min = 0."""
        return cls(Solver.UNIPC, steps, guidance, shift)


@dataclass(frozen=True)
class SampleResult:
    """``latents``: host loop — new float32 arrays shaped like the inputs; CUDA loop — the device
    pointers, which now hold the result. ``steps_done`` < ``steps`` only when ``cancelled``."""

    latents: list[Any]
    steps_done: int
    step_times_s: list[float] = field(default_factory=list)
    cancelled: bool = False


# ---------------------------------------------------------------------------------------------
# 1. Schedules
# ---------------------------------------------------------------------------------------------


def rflow_shift(height: float, width: float, num_frames: float, scale: float = 1.0) -> float:
    """Open-Sora's shift ratio ``r = sqrt(H·W/512²)·sqrt((F // 17)·5)·scale``, computed as the
    reference computes it: height, width and num_frames are bf16 tensors at inference, so each op
    rounds to bf16. The released checkpoint was sampled with that r (240×426/65f: 2.421875, not the
    exact 2.4187; 480×854/81f: 5.59375, because 854 rounds to 856 in bf16)."""
    if not (height > 0 and width > 0):
        raise ConfigError(f"height and width must be > 0, got {height}x{width}")
    if not (num_frames == 1 or num_frames >= 17):
        raise ConfigError(f"num_frames must be 1 or >= 17 (the reference uses (F // 17) * 5), got {num_frames}")
    h = torch.tensor([height], dtype=torch.bfloat16)
    w = torch.tensor([width], dtype=torch.bfloat16)
    f = torch.tensor([num_frames], dtype=torch.bfloat16)
    ratio_space = (h * w / (512 * 512)).sqrt()
    frames = torch.ones_like(f) if num_frames == 1 else f // 17 * 5
    ratio_time = (frames / 1).sqrt()
    return float(ratio_space * ratio_time * scale)


def _shifted_timesteps(steps: int, r: float, r_minus_1: float) -> np.ndarray:
    if steps <= 0:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    t = np.array([(1.0 - i / steps) * 1000 for i in range(steps)], dtype=np.float32)
    s = t / np.float32(1000)
    shifted = (np.float32(r) * s) / (np.float32(1) + np.float32(r_minus_1) * s)
    return shifted * np.float32(1000)


def flow_timesteps(steps: int, shift: float) -> np.ndarray:
    """Euler timesteps, float32 ``[steps]`` on the 1000 scale: ``t_i = float32((1 - i/steps)·1000)``,
    ``s = t_i/1000``, ``t'_i = r·s/(1 + (r-1)·s)·1000`` in fp32 (``shift = 1``: unshifted)."""
    if not shift > 0:
        raise ConfigError(f"shift must be > 0, got {shift}")
    r = np.float32(shift)
    return _shifted_timesteps(steps, float(r), float(r - np.float32(1)))


def rflow_timesteps(steps: int, height: float, width: float, num_frames: float, scale: float = 1.0) -> np.ndarray:
    """The released JavisDiT++ Euler timesteps for a bucket (model-spec.md §6.1)."""
    r = rflow_shift(height, width, num_frames, scale)
    r_minus_1 = float(torch.tensor([r], dtype=torch.bfloat16) - 1)  # a bf16 op in the reference
    return _shifted_timesteps(steps, r, r_minus_1)


def _unipc_sigmas64(steps: int, shift: float, sigma_max: float, sigma_min: float) -> np.ndarray:
    # diffusers UniPCMultistepScheduler.set_timesteps with use_flow_sigmas (float64 numpy).
    if steps <= 0:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    sigmas = np.linspace(sigma_max, sigma_min, steps + 1)[:-1]
    sigmas = shift * sigmas / (1 + (shift - 1) * sigmas)
    if np.fabs(sigmas[0] - 1) < 1e-6:  # diffusers: avoids log(0) for alpha in the first update
        sigmas[0] -= 1e-6
    return sigmas


def unipc_sigmas(steps: int, shift: float, sigma_max: float = WAN_SIGMA_MAX, sigma_min: float = 0.0) -> np.ndarray:
    """UniPC flow sigmas, float32 ``[steps + 1]`` ending in 0 (diffusers / Wan2.1 store float32)."""
    sigmas = _unipc_sigmas64(steps, shift, sigma_max, sigma_min)
    return np.concatenate([sigmas, [0.0]]).astype(np.float32)


def unipc_timesteps(steps: int, shift: float, sigma_max: float = WAN_SIGMA_MAX, sigma_min: float = 0.0) -> np.ndarray:
    """What the model sees under UniPC: ``int64(sigma·1000)`` of the float64 sigmas, as float32."""
    sigmas = _unipc_sigmas64(steps, shift, sigma_max, sigma_min)
    return (sigmas * 1000).astype(np.int64).astype(np.float32)


# ---------------------------------------------------------------------------------------------
# 2. Per-step plan: every scalar a step needs (the twin of make_plan in cpp/src/schedule.cpp)
# ---------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class _Step:
    t: np.float32  # timestep given to the denoiser
    dt: np.float32 = np.float32(0)  # Euler
    sigma: np.float32 = np.float32(0)  # UniPC: x0 prediction m = x + sigma·v
    corr_order: int = 0  # UniC order this step (0: none)
    cc: tuple[np.float32, ...] = ()  # c1, c2, c3, rk, rho0, rho1
    pred_order: int = 1
    pc: tuple[np.float32, ...] = ()  # c1, c2, c3, rk


def _lambda(sigma: float) -> float:  # log(alpha) - log(sigma) with alpha = 1 - sigma
    return math.log(1.0 - sigma) - math.log(sigma)


def _f32(*xs: float) -> tuple[np.float32, ...]:
    return tuple(np.float32(x) for x in xs)


def _plan(config: SamplerConfig) -> list[_Step]:
    n = config.steps
    if config.solver is Solver.EULER:
        ts = flow_timesteps(n, config.shift)
        ends = np.concatenate([ts[1:], np.zeros(1, np.float32)])
        dts = (ts - ends) / np.float32(1000)  # RFlow.sample: (t_i - t_{i+1}) / num_timesteps, fp32
        return [_Step(t=ts[i], dt=dts[i]) for i in range(n)]

    sig = [float(s) for s in unipc_sigmas(n, config.shift, config.sigma_max, config.sigma_min)]
    tmodel = unipc_timesteps(n, config.shift, config.sigma_max, config.sigma_min)
    plan: list[_Step] = []
    lower_order_nums = 0
    prev_order = 0
    for i in range(n):
        corr_order, cc = 0, _f32()
        if i > 0:  # UniC from sigma_{i-1} to sigma_i with the previous predictor's order
            corr_order = prev_order
            st, ss = sig[i], sig[i - 1]
            h = _lambda(st) - _lambda(ss)
            hh = -h
            h_phi_1 = math.expm1(hh)
            b_h = math.expm1(hh)  # bh2
            rk, rho0, rho1 = 1.0, 0.0, 0.5
            if corr_order == 2:
                rk = (_lambda(sig[i - 2]) - _lambda(ss)) / h
                h_phi_k1 = h_phi_1 / hh - 1.0
                b1 = h_phi_k1 * 1.0 / b_h
                h_phi_k2 = h_phi_k1 / hh - 1.0 / 2.0
                b2 = h_phi_k2 * 2.0 / b_h
                rho0 = (b1 - b2) / (1.0 - rk)  # solve [[1, 1], [rk, 1]] rho = [b1, b2]
                rho1 = b1 - rho0
            cc = _f32(st / ss, (1.0 - st) * h_phi_1, (1.0 - st) * b_h, rk, rho0, rho1)
        order = min(2, n - i, lower_order_nums + 1)  # lower_order_final, warm-up
        st, ss = sig[i + 1], sig[i]
        if st == 0.0:  # to sigma 0: lambda = +inf, expm1(-inf) = -1, so x = m
            pc = _f32(0.0, -1.0, -1.0, 1.0)
        else:
            h = _lambda(st) - _lambda(ss)
            hh = -h
            h_phi_1 = math.expm1(hh)
            b_h = math.expm1(hh)
            rk = (_lambda(sig[i - 1]) - _lambda(ss)) / h if order == 2 else 1.0
            pc = _f32(st / ss, (1.0 - st) * h_phi_1, (1.0 - st) * b_h, rk)
        plan.append(_Step(t=tmodel[i], sigma=np.float32(sig[i]), corr_order=corr_order, cc=cc, pred_order=order, pc=pc))
        lower_order_nums = min(lower_order_nums + 1, 2)
        prev_order = order
    return plan


# ---------------------------------------------------------------------------------------------
# 3. Step math (float32; the op order of cpp/src/host_loop.cpp)
# ---------------------------------------------------------------------------------------------


def _cfg(out: np.ndarray, g: np.float32) -> np.ndarray:
    b = out.shape[0] // 2
    v_c, v_u = out[:b], out[b:]
    return v_u + g * (v_c - v_u)


def _euler_update(x: np.ndarray, v: np.ndarray, step: _Step) -> np.ndarray:
    return x + v * step.dt


@dataclass
class _UniPCState:  # zeros until written, as in the C++ loop
    x_last: np.ndarray  # the sample the last predictor started from (corrected)
    m_prev: np.ndarray  # x0 prediction of step i-1
    m_prev2: np.ndarray  # ... of step i-2


def _unipc_update(x: np.ndarray, v: np.ndarray, step: _Step, state: _UniPCState) -> np.ndarray:
    m = x + step.sigma * v  # diffusers: x0 = x - sigma * (eps - x0 prediction) with model_output = -v
    if step.corr_order > 0:  # UniC
        c1, c2, c3, rk, rho0, rho1 = step.cc
        inner = rho1 * (m - state.m_prev)
        if step.corr_order == 2:
            inner = rho0 * ((state.m_prev2 - state.m_prev) / rk) + inner
        x = (c1 * state.x_last - c2 * state.m_prev) - c3 * inner
    state.x_last = x
    c1, c2, c3, rk = step.pc  # UniP
    x_next = c1 * x - c2 * m
    if step.pred_order == 2:
        x_next = x_next - c3 * (np.float32(0.5) * ((state.m_prev - m) / rk))
    state.m_prev2, state.m_prev = state.m_prev, m
    return x_next


# ---------------------------------------------------------------------------------------------
# 4. The loop
# ---------------------------------------------------------------------------------------------


def _checked(a: Any, what: str) -> np.ndarray:
    try:
        arr = np.asarray(a)
    except Exception as exc:
        raise ShapeError(f"{what}: expected a float32 array, got {type(a).__name__}") from exc
    if arr.dtype != np.float32:
        raise ShapeError(f"{what}: dtype {arr.dtype}, expected float32")
    if not arr.flags.c_contiguous:
        raise ShapeError(f"{what}: array is not C-contiguous (pass np.ascontiguousarray(x))")
    if arr.ndim < 1 or arr.size == 0:
        raise ShapeError(f"{what}: expected a non-empty array with a batch dimension, got shape {arr.shape}")
    return arr


def _check_latents(latents: Sequence[Any], config: SamplerConfig) -> list[np.ndarray]:
    if not isinstance(latents, (list, tuple)):
        raise ShapeError(f"latents must be a list of arrays, one per modality, got {type(latents).__name__}")
    if not 1 <= len(latents) <= 2:
        raise ShapeError(f"latents: expected 1 or 2 modalities, got {len(latents)}")
    if len(latents) != len(config.guidance):
        raise ConfigError(
            f"config.guidance has {len(config.guidance)} scales but {len(latents)} modalities were given"
        )
    arrays = [_checked(x, f"latents[{k}]") for k, x in enumerate(latents)]
    for k, a in enumerate(arrays):
        if a.shape[0] != arrays[0].shape[0]:
            raise ShapeError(f"latents[{k}]: batch {a.shape[0]} != batch {arrays[0].shape[0]} of latents[0]")
    return arrays


def _call_denoiser(denoiser: Denoiser, xs: list[np.ndarray], t: np.float32) -> list[np.ndarray]:
    inputs = []
    for x in xs:
        cfg_batch = np.concatenate([x, x])  # [cond; uncond] see the same latent
        cfg_batch.flags.writeable = False
        inputs.append(cfg_batch)
    timesteps = np.full(2 * xs[0].shape[0], t, dtype=np.float32)
    timesteps.flags.writeable = False
    res = denoiser(inputs, timesteps)
    if not isinstance(res, (list, tuple)):
        raise ShapeError(f"denoiser must return a list of velocity arrays, got {type(res).__name__}")
    if len(res) != len(xs):
        raise ShapeError(f"denoiser returned {len(res)} arrays for {len(xs)} modalities")
    outs = []
    for k, (o, inp) in enumerate(zip(res, inputs)):
        arr = _checked(o, f"denoiser output[{k}]")
        if arr.shape != inp.shape:
            raise ShapeError(f"denoiser output[{k}]: shape {arr.shape}, expected the CFG batch shape {inp.shape}")
        outs.append(arr)
    return outs


def sample_ref(
    latents: Sequence[Any],
    denoiser: Denoiser,
    config: SamplerConfig,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> SampleResult:
    """Pure-Python reference of ``javisrt._sampler.sample`` (same signature, same results)."""
    xs = [x.copy() for x in _check_latents(latents, config)]
    plan = _plan(config)
    guidance = [np.float32(g) for g in config.guidance]
    states = [_UniPCState(*(np.zeros_like(x) for _ in range(3))) for x in xs]
    times: list[float] = []
    cancelled = False
    for i, step in enumerate(plan):
        if cancel is not None and cancel():
            cancelled = True
            break
        t0 = time.perf_counter()
        outs = _call_denoiser(denoiser, xs, step.t)
        for k, out in enumerate(outs):
            v = _cfg(out, guidance[k])
            if config.solver is Solver.EULER:
                xs[k] = _euler_update(xs[k], v, step)
            else:
                xs[k] = _unipc_update(xs[k], v, step, states[k])
        times.append(time.perf_counter() - t0)
        if progress is not None:
            progress(i + 1, len(plan), float(step.t), times[-1])
    return SampleResult(latents=xs, steps_done=len(times), step_times_s=times, cancelled=cancelled)


# ---------------------------------------------------------------------------------------------
# 5. Backend selection (once, at import): the C++ extension, or the reference with a warning
# ---------------------------------------------------------------------------------------------

_ext: Any
_EXT_ERROR = ""
try:
    _ext = importlib.import_module("javisrt._sampler")
except ImportError as _exc:  # not built (e.g. pip install without a compiler)
    _ext = None
    _EXT_ERROR = f"{type(_exc).__name__}: {_exc}"


def backend() -> str:
    """``"cpp"`` when ``javisrt._sampler`` is importable, else ``"python"``."""
    return "cpp" if _ext is not None else "python"


def sample(
    latents: Sequence[Any],
    denoiser: Denoiser,
    config: SamplerConfig,
    progress: Progress | None = None,
    cancel: Cancel | None = None,
) -> SampleResult:
    """Run the sampling loop with the C++ extension; without it, warn and run :func:`sample_ref`.

    ``latents``: 1 or 2 float32 C-contiguous ``[B, ...]`` arrays (video first), not modified.
    See :data:`Denoiser`, :data:`Progress` and :data:`Cancel` for the callbacks.
    """
    if _ext is None:
        logger.warning(
            "javisrt._sampler (the C++ sampling loop) is not built (%s); running the slow pure-Python "
            "reference loop instead. Rebuild with `pip install --no-build-isolation -e .`.",
            _EXT_ERROR,
        )
        return sample_ref(latents, denoiser, config, progress, cancel)
    result: SampleResult = _ext.sample(latents, denoiser, config, progress, cancel)
    return result


def device_loop_error() -> str:
    """Why :func:`sample_cuda` cannot run in this process ("" when it can): the extension is not
    built, or was built without nvcc (``javisrt._sampler.cuda_compiled()`` False)."""
    if _ext is None:
        return f"javisrt._sampler (the C++ sampling loop) is not built ({_EXT_ERROR})"
    if not _ext.cuda_compiled():
        return "javisrt._sampler was built without nvcc (cuda_compiled() is False); rebuild it on a machine with the CUDA toolkit"
    return ""


def sample_cuda(latents: Sequence[int], config: SamplerConfig, **kwargs: Any) -> SampleResult:
    """``javisrt._sampler.sample_cuda`` (the loop on a CUDA stream over device buffers; see
    ``_sampler.pyi`` for the keyword arguments); raises :class:`UnavailableError` when
    :func:`device_loop_error` says it cannot run."""
    reason = device_loop_error()
    if reason:
        raise UnavailableError(reason)
    result: SampleResult = _ext.sample_cuda(list(latents), **kwargs, config=config)
    return result
