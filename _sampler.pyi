"""javisrt._sampler: the C++ sampling loop (private; use javisrt.runtime.sampling).

Same signatures as the pure-Python reference in javisrt.runtime.sampling. Errors are
javisrt.engine.errors.ConfigError / ShapeError / UnavailableError; CUDA runtime failures raise
RuntimeError.
"""

from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
import numpy.typing as npt

from javisrt.runtime.sampling import SampleResult, SamplerConfig

__version__: str

def bf16_round(x: float) -> float:
    """Round a float to the nearest bfloat16 (ties to even), as c10::BFloat16 does."""

def rflow_shift(height: float, width: float, num_frames: float, scale: float = 1.0) -> float:
    """Open-Sora rflow shift ratio with the reference's bf16 rounding (240x426/65f -> 2.421875)."""

def rflow_timesteps(
    steps: int, height: float, width: float, num_frames: float, scale: float = 1.0
) -> npt.NDArray[np.float32]:
    """The released JavisDiT++ Euler timesteps, float32 [steps] on the 1000 scale."""

def flow_timesteps(steps: int, shift: float) -> npt.NDArray[np.float32]:
    """Euler timesteps (1 - i/steps)*1000 shifted by r*s/(1+(r-1)*s), float32 [steps]."""

def unipc_sigmas(
    steps: int, shift: float, sigma_max: float = 0.9990000128746033, sigma_min: float = 0.0
) -> npt.NDArray[np.float32]:
    """UniPC flow sigmas, float32 [steps + 1] ending in 0."""

def unipc_timesteps(
    steps: int, shift: float, sigma_max: float = 0.9990000128746033, sigma_min: float = 0.0
) -> npt.NDArray[np.float32]:
    """Timesteps the model sees under UniPC: int64(sigma * 1000), as float32 [steps]."""

def sample(
    latents: Sequence[Any],
    denoiser: Callable[[list[npt.NDArray[np.float32]], npt.NDArray[np.float32]], Sequence[Any]],
    config: SamplerConfig,
    progress: Callable[[int, int, float, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
) -> SampleResult:
    """Run the sampling loop on the host (GIL released during the math).

    latents: 1 or 2 float32 C-contiguous [B, ...] arrays (or CPU tensors), video first; not modified.
    denoiser(inputs, timesteps): inputs are read-only float32 [2B, ...] arrays, cond half first (the
    loop's static buffers, valid only during the call); timesteps float32 [2B]. Returns one float32
    C-contiguous [2B, ...] velocity v = x0 - eps per modality.
    progress(steps_done, steps, t, step_seconds) after each step; cancel() polled before each step.
    """

def sample_cuda(
    latents: Sequence[int],
    inputs: Sequence[int],
    outputs: Sequence[int],
    numels: Sequence[int],
    timesteps: int,
    batch: int,
    config: SamplerConfig,
    *,
    stream: int = 0,
    graph_exec: int = 0,
    enqueue: Callable[[int, int], None] | None = None,
    progress: Callable[[int, int, float, float], None] | None = None,
    cancel: Callable[[], bool] | None = None,
    max_inflight: int = 2,
    wait_stream: int | None = None,
) -> SampleResult:
    """Run the sampling loop on a CUDA stream over device buffers (pointers as ints).

    latents[k]: float32 [B, ...] (numels[k] elements), noise in, result out (in place).
    inputs[k] / outputs[k]: the denoiser's static float32 [2B, ...] input / velocity buffers;
    timesteps: its float32 [2B] buffer. The denoiser is graph_exec (a cudaGraphExec_t, replayed) or
    enqueue(step, stream), which must enqueue its work on `stream`. No host sync inside a step; the
    host waits for step i - max_inflight before enqueueing step i (0: never).
    wait_stream: a cudaStream_t whose queued work `stream` waits for first (e.g. torch's current
    stream, which produced the latents); None: no wait. Runs on the buffers' device (checked: one
    device, device memory), restores the caller's device, returns only after its kernels finished
    (also when a callback raises); host waits use blocking-sync events.
    Raises UnavailableError without a GPU/driver or when built without nvcc.
    """

def cuda_compiled() -> bool:
    """True when the extension was built with nvcc."""

def cuda_device_count() -> int:
    """Visible CUDA devices; raises UnavailableError without a usable GPU, driver or CUDA build."""
