"""Host overhead per denoising step: the C++ loop vs the Python reference vs a diffusers loop.

    python -m javisrt.bench.sampler_overhead [--solver euler|unipc] [--steps 50] [--iterations 7]

Each loop runs a whole sampling pass with a no-op denoiser (it returns preallocated zero velocities),
so what is timed is everything the loop itself does per step: building the CFG batch, CFG, the
solver update, bookkeeping. The three loops run interleaved (rotating order) in one process so that
machine noise hits them alike. Default latent sizes are 240p/65f (model-spec.md §7): video
[1,16,17,30,54], audio [1,8,104,16], CFG batch 2.

A second table repeats the run on tiny latents (video [1,16,1,2,2], audio [1,8,2,2]): there the
update math is negligible and what remains is the per-step dispatch cost of each loop, which is
what the host pays per step when the math runs on a GPU.

The diffusers baseline is ``diffusers_sample`` from tests/test_sampler.py (shared/style.md lesson
12: benchmarks import their baselines from tests/), so this needs the repository checkout.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import importlib.util
import platform
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
import torch

from javisrt import _sampler
from javisrt.runtime import sampling
from javisrt.runtime.sampling import SamplerConfig, Solver

TESTS_DIR = Path(__file__).resolve().parents[1] / "tests"


@dataclass(frozen=True)
class ModelOptions:
    video_shape: tuple[int, ...] = (1, 16, 17, 30, 54)  # 240x426 (-> 240x432), 65 frames
    audio_shape: tuple[int, ...] = (1, 8, 104, 16)  # 4.0625 s of audio


TINY = ModelOptions((1, 16, 1, 2, 2), (1, 8, 2, 2))


@dataclass(frozen=True)
class InferenceOptions:
    solver: Solver = Solver.EULER
    steps: int = 50
    warmup: int = 1
    iterations: int = 7
    torch_threads: int = 1  # the C++ loop is single-threaded; 1 also avoids OpenMP stalls on busy hosts


@dataclass(frozen=True)
class ReportingOptions:
    csv: Path | None = None


def load_baselines() -> ModuleType:
    """tests/test_sampler.py as a module (its helper imports resolve from tests/)."""
    path = TESTS_DIR / "test_sampler.py"
    if not path.exists():
        raise SystemExit(f"{path} not found: run the benchmark from a repository checkout")
    sys.path.insert(0, str(TESTS_DIR))
    spec = importlib.util.spec_from_file_location("javisrt_bench_test_sampler", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def make_loops(model: ModelOptions, inf: InferenceOptions) -> tuple[dict[str, Callable[[], Any]], SamplerConfig]:
    shapes = [model.video_shape, model.audio_shape]
    rng = np.random.default_rng(0)
    latents = [rng.standard_normal(s).astype(np.float32) for s in shapes]
    zeros = [np.zeros((2 * s[0], *s[1:]), np.float32) for s in shapes]

    def noop(inputs: list[np.ndarray], timesteps: np.ndarray) -> list[np.ndarray]:
        return zeros

    if inf.solver is Solver.EULER:
        config = SamplerConfig.rflow(240, 426, 65, steps=inf.steps)
    else:
        config = SamplerConfig(Solver.UNIPC, inf.steps, (5.0, 5.0), 5.0)
    diffusers_sample = load_baselines().diffusers_sample
    loops = {
        "cpp": lambda: _sampler.sample(latents, noop, config),
        "python": lambda: sampling.sample_ref(latents, noop, config),
        "diffusers": lambda: diffusers_sample(latents, noop, config),
    }
    return loops, config


def percentile(xs: list[float], q: float) -> float:
    return float(np.percentile(np.asarray(xs), q))


def run(model: ModelOptions, inf: InferenceOptions, rep: ReportingOptions) -> dict[str, list[float]]:
    torch.set_num_threads(inf.torch_threads)
    loops, config = make_loops(model, inf)
    names = list(loops)
    for _ in range(inf.warmup):
        for name in names:
            loops[name]()
    per_step_us: dict[str, list[float]] = {n: [] for n in names}
    for it in range(inf.iterations):
        order = names[it % len(names) :] + names[: it % len(names)]  # rotate who goes first
        for name in order:
            t0 = time.perf_counter()
            loops[name]()
            per_step_us[name].append((time.perf_counter() - t0) / config.steps * 1e6)

    print(f"sampler host overhead per step, no-op denoiser, solver={inf.solver.value}, steps={inf.steps}")
    print(f"  video {list(model.video_shape)}, audio {list(model.audio_shape)}, CFG batch {2 * model.video_shape[0]}")
    print(f"  host: {platform.processor() or platform.machine()}, {_cpu_count()} CPUs visible, torch threads "
          f"{torch.get_num_threads()}; torch {torch.__version__}, numpy {np.__version__}, python {platform.python_version()}")
    print(f"  {inf.iterations} interleaved iterations after {inf.warmup} warm-up; times in microseconds per step")
    header = f"  {'loop':<10}{'median':>10}{'min':>10}{'mean':>10}{'p90':>10}{'CV':>8}{'vs cpp':>9}"
    print(header)
    base = statistics.median(per_step_us["cpp"])
    for name in names:
        xs = per_step_us[name]
        med, mean = statistics.median(xs), statistics.fmean(xs)
        cv = statistics.pstdev(xs) / mean if mean else 0.0
        print(f"  {name:<10}{med:>10.1f}{min(xs):>10.1f}{mean:>10.1f}{percentile(xs, 90):>10.1f}{cv:>8.2f}{med / base:>8.1f}x")
    print("  median: median over iterations of (wall time of one full loop / steps); CV: stdev/mean;")
    print("  'vs cpp' = median / median of the C++ loop (>1: that loop has more host overhead).")
    print("  The diffusers loop uses FlowMatchEuler/UniPC schedulers on torch CPU tensors (WanPipeline's shape),")
    print("  plus one negation per modality to convert our velocity v = x0 - eps to its eps - x0.")
    if rep.csv is not None:
        _write_csv(rep.csv, model, inf, per_step_us)
    return per_step_us


def _cpu_count() -> int:
    import os

    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)


def _write_csv(path: Path, model: ModelOptions, inf: InferenceOptions, per_step_us: dict[str, list[float]]) -> None:
    new = not path.exists()
    with path.open("a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["timestamp", "host", "torch", "solver", "steps", "video", "audio", "loop", "median_us", "min_us", "iterations"])
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        for name, xs in per_step_us.items():
            w.writerow([stamp, platform.node(), torch.__version__, inf.solver.value, inf.steps, "x".join(map(str, model.video_shape)),
                        "x".join(map(str, model.audio_shape)), name, f"{statistics.median(xs):.1f}", f"{min(xs):.1f}", inf.iterations])


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_argument_group("Model")
    g.add_argument("--video-shape", type=int, nargs="+", default=list(ModelOptions.video_shape))
    g.add_argument("--audio-shape", type=int, nargs="+", default=list(ModelOptions.audio_shape))
    g = p.add_argument_group("Inference")
    g.add_argument("--solver", choices=[s.value for s in Solver], default=Solver.EULER.value)
    g.add_argument("--steps", type=int, default=InferenceOptions.steps)
    g.add_argument("--warmup", type=int, default=InferenceOptions.warmup)
    g.add_argument("--iterations", type=int, default=InferenceOptions.iterations)
    g.add_argument("--torch-threads", type=int, default=InferenceOptions.torch_threads)
    g = p.add_argument_group("Reporting")
    g.add_argument("--csv", type=Path, default=None, help="append one row per loop to this CSV file")
    g.add_argument("--no-dispatch-table", action="store_true", help="skip the tiny-latent (dispatch cost) table")
    a = p.parse_args(argv)
    model = ModelOptions(tuple(a.video_shape), tuple(a.audio_shape))
    inf = InferenceOptions(Solver(a.solver), a.steps, a.warmup, a.iterations, a.torch_threads)
    run(model, inf, ReportingOptions(a.csv))
    if not a.no_dispatch_table:
        print()
        run(TINY, inf, ReportingOptions(a.csv))


if __name__ == "__main__":
    main()
