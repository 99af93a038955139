"""``javisrt bench``: trtexec-style benchmark of the DiT (or, with ``--pipeline``, of the whole pipeline).

    javisrt bench --backend torch --preset tiny --frames 33 --height 64 --width 64
    javisrt bench --backend torch --compare ort --preset tiny --iterations 20 --duration 0
    javisrt bench --backend trt --engine dit.plan --resolution 240p --frames 65
    javisrt bench --pipeline --preset tiny

Flags follow trtexec where they apply (shared/tensorrt-notes.md §7); the report is trtexec's
"Performance summary" (bench/report.py) plus achieved FLOP/s from model-spec §8 (engine/flops.py)
and, on a known GPU, the fraction of its dense peak. Each run can append a row with provenance to
CSV/JSON-lines files (bench/results.py).

Timing: every phase of a query is timed on the host clock, with a device synchronize after it on
GPU backends (so "GPU Compute Time" includes the synchronize; trtexec uses CUDA events). On the CPU
there are no transfers: H2D/D2H time the copies into and out of the engine's bound buffers, unless
``--noDataTransfers`` (inputs written once, outputs left in place).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import statistics
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from javisrt.bench.measure import InferenceOptions, Measurement, measure, measure_interleaved, paired_ratio, trace_lines
from javisrt.bench.report import QueryTiming, export_times, format_summary, summarize_queries
from javisrt.bench.results import append_row, device_name
from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.export.contract import AUDIO, TIMESTEP, VIDEO, CONTEXT, VIDEO_FRAMES
from javisrt.runtime.backends import ENGINES, create_engine
from javisrt.runtime.denoise_session import DenoiseSession

log = logging.getLogger(__name__)

BACKENDS = ENGINES  # one vocabulary on every command: torch | onnxruntime | tensorrt
# Dense tensor-core peaks (TFLOP/s) by device-name substring: shared/perf-anchors.md (H100 SXM datasheet;
# the H200 has the H100's arithmetic rates).
DEVICE_PEAK_TFLOPS = {"H100": {"bf16": 989.0, "fp8": 1979.0}, "H200": {"bf16": 989.0, "fp8": 1979.0}}


# ---- options -----------------------------------------------------------------------------------------
def register(subparsers: Any) -> None:
    p = subparsers.add_parser(
        "bench", help="trtexec-style benchmark of the DiT (or the whole pipeline)", description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )  # fmt: skip
    m = p.add_argument_group("Model options")
    m.add_argument("--backend", choices=BACKENDS, default="torch", help="engine backend (default torch)")
    m.add_argument("--checkpoint", type=Path,
                   help="torch: DiT checkpoint (any layout load_model reads); default: random weights")
    m.add_argument("--preset", default="tiny", help="network preset when no checkpoint is given (default tiny)")
    m.add_argument("--layers", type=int, help="override the preset's num_layers (full width, fewer blocks)")
    m.add_argument("--numerics", choices=("fp32", "official"), default="fp32",
                   help="torch: fp32, or the reference's bf16 numerics (default fp32)")
    m.add_argument("--ops", choices=("torch", "triton", "triton-fp8"), default="torch",
                   help="torch: op implementation; triton-fp8 needs its scales (--fp8-scales, or the sidecar next "
                   "to --checkpoint)")
    m.add_argument("--fp8-scales", type=Path, default=None,
                   help="--ops triton-fp8: the scales sidecar (default: CHECKPOINT.fp8-scales.safetensors; "
                   "`javisrt export --checkpoint CHECKPOINT --fp8-scales` makes it)")
    m.add_argument("--fp8-linear", choices=("scaled_mm", "triton"), default=None,
                   help="--ops triton-fp8: the attention Linears' e4m3 GEMM. scaled_mm: a Triton activation-quantization "
                   "launch, then torch._scaled_mm; triton: one Triton FP8 GEMM quantizing the activation in its "
                   "prologue (kernels/fp8_linear.py). Default scaled_mm")
    m.add_argument("--engine-file", type=Path,
                   help="onnxruntime: the .onnx to run (default: export the random model's fp32 native graph); "
                   "tensorrt: the .plan (required). Its metadata gives the network: no eager model is built")
    m.add_argument("--device", default=None, help="torch device (default: cuda when available, else cpu)")
    s = p.add_argument_group("Shape options (one request; batch 2 = one CFG step)")
    s.add_argument("--resolution", default=None, help="bucket: 144p/240p/360p/480p (with --aspect-ratio)")
    s.add_argument("--aspect-ratio", default="9:16", help="bucket aspect ratio (default 9:16, the released landscape)")
    s.add_argument("--height", type=int, help="pixel height (instead of --resolution)")
    s.add_argument("--width", type=int, help="pixel width (instead of --resolution)")
    s.add_argument("--frames", type=int, default=33, help="frames, 4n+1 (default 33)")
    s.add_argument("--batch", type=int, default=2, help="batch (default 2: [cond; uncond])")
    s.add_argument("--dims", help="explicit contract dims, e.g. batch=2,video_frames=17,video_height=30,"
                                  "video_width=54,audio_frames=104 (token counts follow)")
    i = p.add_argument_group("Inference options")
    i.add_argument("--warmUp", type=float, default=200.0, help="warm-up time in ms (default 200)")
    i.add_argument("--iterations", type=int, default=10, help="minimum number of timed queries (default 10)")
    i.add_argument("--duration", type=float, default=3.0, help="minimum timed duration in s (default 3)")
    i.add_argument("--avgRuns", type=int, default=10, help="queries per trace average (default 10)")
    i.add_argument("--percentile", default="90,95,99", help="percentiles to report (default 90,95,99)")
    i.add_argument("--useCudaGraph", action="store_true",
                   help="capture the engine call as a CUDA graph and replay it (torch and tensorrt on a GPU; "
                   "an engine that cannot capture says so)")
    i.add_argument("--noDataTransfers", action="store_true", help="do not copy inputs in / outputs out per query")
    i.add_argument("--compare", choices=BACKENDS, help="also run BACKEND, interleaved, and report the paired ratio")
    i.add_argument("--compare-engine-file", type=Path, help="--engine-file for the compared backend")
    i.add_argument("--pipeline", action="store_true", help="time the whole pipeline per stage instead of the DiT")
    r = p.add_argument_group("Reporting options")
    r.add_argument("--exportTimes", type=Path, help="write per-query timings (trtexec JSON layout)")
    r.add_argument("--exportProfile", type=Path,
                   help="write a per-layer profile: torch (embeddings, blocks, heads) or ort (per graph node)")
    r.add_argument("--separateProfileRun", action="store_true",
                   help="accepted for trtexec compatibility: the profile always has a run of its own, after timing")
    r.add_argument("--results-csv", type=Path, help="append one result row (with provenance) to this CSV")
    r.add_argument("--results-json", type=Path, help="append one result row (with provenance) to this JSON-lines file")
    r.add_argument("--report-verbose", action="store_true", help="print the explanations of the metrics")
    p.set_defaults(func=run)


def _percentiles(text: str) -> tuple[float, ...]:
    try:
        values = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ConfigError(f"--percentile must be comma-separated numbers, got {text!r}") from None
    if not values or any(not 0 <= v <= 100 for v in values):
        raise ConfigError(f"--percentile values must be in [0, 100], got {text!r}")
    return values


def _parse_dims(text: str) -> dict[str, int]:
    out = {}
    for item in text.split(","):
        key, sep, value = item.partition("=")
        if not sep or not value.strip().lstrip("-").isdigit():
            raise ConfigError(f"--dims items must be name=integer, got {item!r}")
        out[key.strip()] = int(value)
    return out


def requested_shape(args: argparse.Namespace) -> dict[str, int] | tuple[int, int]:
    """The shape flags, checked before any engine is built: explicit ``--dims``, or the pixel (H, W)."""
    from javisrt.engine.latents import bucket_size

    if args.dims:
        if args.resolution or args.height or args.width:
            raise ConfigError("give either --dims or a resolution/size, not both")
        return _parse_dims(args.dims)
    if args.batch < 1:
        raise ConfigError(f"--batch must be >= 1, got {args.batch}")
    if args.resolution:
        if args.height or args.width:
            raise ConfigError("give either --resolution or --height/--width, not both")
        return bucket_size(args.resolution, args.aspect_ratio)
    if args.height and args.width:
        return args.height, args.width
    raise ConfigError("give a shape: --resolution, --height and --width, or --dims")


def request_dims(args: argparse.Namespace, contract: Any) -> dict[str, int]:
    """The contract dims of the requested shape (validated by the contract)."""
    from javisrt.engine.latents import latent_geometry

    shape = requested_shape(args)
    if isinstance(shape, dict):
        return contract.resolve(shape)  # type: ignore[no-any-return]
    h, w = shape
    geo = latent_geometry(args.frames, h, w, min_frames=1, max_frames=10_000)
    assert geo.video is not None
    _, t, h8, w8 = geo.video
    dims = {"batch": args.batch, "video_frames": t, "video_height": h8, "video_width": w8}
    if contract.has_audio:
        assert geo.audio is not None
        dims["audio_frames"] = geo.audio[1]
    return contract.resolve(dims)  # type: ignore[no-any-return]


# ---- targets -------------------------------------------------------------------------------------------
def build_model(args: argparse.Namespace, device: torch.device) -> Any:
    from javisrt.engine.checkpoint import load_model
    from javisrt.engine.config import JavisConfig
    from javisrt.engine.model import random_model

    if args.checkpoint is not None:
        if args.layers:
            raise ConfigError("--layers applies to random-weight presets, not to a checkpoint")
        return load_model(args.checkpoint, numerics=args.numerics, device=device)
    cfg = JavisConfig.from_name(args.preset, **({"num_layers": args.layers} if args.layers else {}))
    return random_model(cfg, args.numerics, device)


def _fp8_linear_record(args: argparse.Namespace) -> dict[str, str]:
    """``{"fp8_linear": impl}`` for ``--ops triton-fp8`` (the implementation that ran), else nothing."""
    if args.ops != "triton-fp8":
        return {}
    from javisrt.kernels.ops_triton_fp8 import DEFAULT_LINEAR_IMPL

    return {"fp8_linear": args.fp8_linear if args.fp8_linear is not None else DEFAULT_LINEAR_IMPL}


def make_engine(
    backend: str, model: Any, device: torch.device, args: argparse.Namespace, engine_file: Path | None,
    workdir: Path, profile_prefix: Path | None = None,
) -> Any:  # fmt: skip
    """The engine ``backend`` through the one factory; ``model`` is None when only compiled engines run."""
    if backend == "torch":
        scales = args.fp8_scales
        if args.ops == "triton-fp8" and scales is None and args.checkpoint is not None:
            from javisrt.runtime.fp8_scales import default_path

            scales = default_path(args.checkpoint)
        return create_engine(
            "torch", model=model, ops=args.ops, device=device, cuda_graphs=args.useCudaGraph, fp8_scales=scales,
            fp8_linear=args.fp8_linear,
        )
    if backend == "tensorrt" and engine_file is None:
        raise ConfigError("--backend tensorrt needs --engine-file PLAN (build one with `javisrt build`)")
    if engine_file is None:  # onnxruntime: export the random model's graph once per run
        from javisrt.export.contract import DiTContract
        from javisrt.export.onnx import export_dit, save

        engine_file = workdir / "dit.fp32.onnx"
        if not engine_file.is_file():
            log.info("exporting the model's fp32 native graph for ONNX Runtime (pass --engine-file to reuse one)")
            save(export_dit(model.float().cpu(), "native", "fp32", DiTContract.for_config(model.cfg)), engine_file)
    options: dict[str, Any] = {"profile_prefix": profile_prefix} if profile_prefix is not None else {}
    return create_engine(backend, engine_file=engine_file, device=device, cuda_graphs=args.useCudaGraph, **options)


@dataclass
class EngineTarget:
    """One query = write the per-step inputs (H2D), enqueue + synchronize (compute), read outputs (D2H)."""

    name: str
    engine: Any
    step_inputs: dict[str, torch.Tensor]
    transfers: bool

    def query(self) -> QueryTiming:
        now = time.perf_counter
        s_h2d = now() * 1e3
        if self.transfers:
            self.engine.write_inputs(self.step_inputs)
            self.engine.synchronize()
        e_h2d = now() * 1e3
        self.engine.enqueue()
        e_enq = now() * 1e3
        self.engine.synchronize()
        e_comp = now() * 1e3
        if self.transfers:
            for value in self.engine.outputs().values():
                value.to("cpu", copy=True)
        e_d2h = now() * 1e3
        return QueryTiming(e_h2d, e_enq, s_h2d, e_h2d, e_h2d, e_comp, e_comp, e_d2h)


def prepare_target(
    name: str, engine: Any, dims: dict[str, int], inputs: dict[str, torch.Tensor], transfers: bool, use_graph: bool
) -> EngineTarget:
    """A request on ``engine`` (a :class:`DenoiseSession` binds the static inputs once), the per-step
    inputs written once more, and the CUDA graph captured when asked (an engine that cannot, says so)."""
    latents = {k: v for k, v in inputs.items() if k in (VIDEO, AUDIO)}
    DenoiseSession(engine, inputs[CONTEXT], {k: v.shape for k, v in latents.items()}, video_frames=dims[VIDEO_FRAMES])
    step = {**latents, TIMESTEP: inputs[TIMESTEP]}
    engine.write_inputs(step)
    if use_graph:
        engine.capture_graph()
    return EngineTarget(name, engine, step, transfers)


# ---- profile (torch) -------------------------------------------------------------------------------------
@contextlib.contextmanager
def stage_profile(model: Any, sync: Any) -> Iterator[dict[str, list[float]]]:
    """Per-layer wall times of the torch model: the embeddings, every block, the heads."""
    times: dict[str, list[float]] = {}
    starts: dict[str, float] = {}
    handles = []
    layers = [("embed.patch_embedding", model.patch_embedding), ("embed.text_embedding", model.text_embedding)]
    layers += [(f"block.{i}", b) for i, b in enumerate(model.blocks)]
    layers += [("head.video", model.head)] + ([("head.audio", model.audio_head)] if hasattr(model, "audio_head") else [])
    for name, module in layers:
        def pre(_m: Any, _a: Any, name: str = name) -> None:
            sync()
            starts[name] = time.perf_counter()

        def post(_m: Any, _a: Any, _o: Any, name: str = name) -> None:
            sync()
            times.setdefault(name, []).append((time.perf_counter() - starts[name]) * 1e3)

        handles += [module.register_forward_pre_hook(pre), module.register_forward_hook(post)]
    try:
        yield times
    finally:
        for h in handles:
            h.remove()


def ort_node_times(trace: Path, runs: int) -> dict[str, list[float]]:
    """Per-node kernel times (ms) of the last ``runs`` session runs from an ORT profiling trace."""
    events = json.loads(trace.read_text())
    times: dict[str, list[float]] = {}
    for ev in events:
        if ev.get("cat") == "Node" and str(ev.get("name", "")).endswith("_kernel_time"):
            times.setdefault(ev["name"][: -len("_kernel_time")], []).append(ev["dur"] / 1e3)  # us -> ms
    # the allocate/write of prepare_target ran nothing; every node ran once per query
    return {name: v[-runs:] for name, v in times.items()}


def write_profile(times: dict[str, list[float]], path: Path) -> None:
    """trtexec's --exportProfile layout: [{"count": N}, {"name", "timeMs", "averageMs", "medianMs", "percentage"}...]."""
    if not times:
        raise ConfigError("no profile was recorded")
    total = sum(sum(v) for v in times.values())
    count = max(len(v) for v in times.values())
    rows: list[dict[str, Any]] = [{"count": count}]
    for name, v in times.items():
        rows.append({"name": name, "timeMs": sum(v), "averageMs": sum(v) / len(v), "medianMs": statistics.median(v),
                     "percentage": 100.0 * sum(v) / total})
    path.write_text(json.dumps(rows, indent=1))


# ---- run -------------------------------------------------------------------------------------------------
def _peak(precision: str) -> float | None:
    name = device_name()
    for key, peaks in DEVICE_PEAK_TFLOPS.items():
        if key in name:
            return peaks.get(precision)
    return None


def run(args: argparse.Namespace) -> int:
    opts = InferenceOptions(args.warmUp, args.iterations, args.duration, args.avgRuns)
    percentiles = _percentiles(args.percentile)
    if args.pipeline:
        return run_pipeline(args)
    if args.exportProfile is not None and args.backend == "tensorrt":
        raise NotImplementedError(
            "--exportProfile for TensorRT needs an IProfiler on the execution context (GPU only), not wired yet; "
            "use trtexec --exportProfile on the plan, or --backend torch / onnxruntime"
        )
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    if "tensorrt" in (args.backend, args.compare) and device.type != "cuda":
        raise UnavailableError("the tensorrt engine needs a CUDA GPU; this machine has none")
    requested_shape(args)  # shape flags are checked before any model or engine is built
    if args.useCudaGraph and device.type != "cuda":
        raise UnavailableError(f"--useCudaGraph captures CUDA graphs, which needs a CUDA device (got {device})")
    if args.engine_file is not None and args.backend == "torch":
        raise ConfigError("--engine-file is for --backend onnxruntime / tensorrt; the torch engine runs --checkpoint")
    from javisrt.engine.flops import forward_flops

    # The eager model is built only where it runs or must be exported (torch, or onnxruntime without a file).
    compiled_only = all(
        b != "torch" and f is not None
        for b, f in ((args.backend, args.engine_file), (args.compare, args.compare_engine_file)) if b
    )  # fmt: skip
    model = None if compiled_only else build_model(args, device)
    transfers = not args.noDataTransfers
    with tempfile.TemporaryDirectory(prefix="javisrt-bench-") as tmp:
        engine_a = make_engine(args.backend, model, device, args, args.engine_file, Path(tmp))
        contract = engine_a.contract
        cfg = contract.config
        dims = request_dims(args, contract)
        inputs = contract.sample_inputs(dims, torch.Generator().manual_seed(0), device=device)
        flops = forward_flops(cfg, contract.token_grid(dims), batch=dims["batch"]).total
        sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
        a = prepare_target(args.backend, engine_a, dims, inputs, transfers, args.useCudaGraph)
        b = None
        if args.compare:
            engine_b = make_engine(args.compare, model, device, args, args.compare_engine_file, Path(tmp))
            b = prepare_target(args.compare, engine_b, dims, inputs, transfers, args.useCudaGraph)
        if b is None:
            measurements = [measure(a, opts)]
        else:
            measurements = list(measure_interleaved(a, b, opts))
        profile: dict[str, list[float]] = {}
        if args.exportProfile is not None and args.backend == "torch":
            # Always a run of its own after timing (as trtexec 11 does): the hooks' synchronizes
            # would otherwise distort the timed queries.
            with stage_profile(model, sync) as live:
                for _ in range(opts.iterations):
                    a.query()
                profile = dict(live)
        elif args.exportProfile is not None:  # onnxruntime: a profiled session of its own
            engine = make_engine("onnxruntime", model, device, args, args.engine_file, Path(tmp),
                                 profile_prefix=Path(tmp) / "ort_profile")  # fmt: skip
            target = prepare_target("onnxruntime", engine, dims, inputs, transfers, False)
            for _ in range(opts.iterations):
                target.query()
            profile = ort_node_times(engine.end_profiling(), opts.iterations)
            engine.unload()
        for target in [t for t in (a, b) if t is not None]:
            target.engine.unload()
    print(f"=== Model: {cfg.name} ({cfg.num_layers} layers), numerics {args.numerics}, device {device_name()}")
    print(f"=== Shape: {dims}  ({flops / 1e12:.4g} TFLOP per query, model-spec §8)")
    rows = []
    for m in measurements:
        rows.append(_report(m, args, opts, percentiles, flops, dims, device))
    if b is not None:
        ratio = paired_ratio(measurements[0], measurements[1], "latency_ms")
        print(f"=== Compare: {measurements[1].target} / {measurements[0].target} latency, {ratio.pairs} interleaved pairs: "
              f"median of per-pair ratios {ratio.median_of_ratios:.4g}, ratio of medians {ratio.ratio_of_medians:.4g}")
        rows[1]["ratio_vs_" + measurements[0].target] = ratio.median_of_ratios
    if args.exportTimes is not None:
        export_times(measurements[0].queries, args.exportTimes)
    if args.exportProfile is not None:
        write_profile(profile, args.exportProfile)
    for row in rows:
        if args.results_csv or args.results_json:
            append_row(row, args.results_csv, args.results_json)
    return 0


def _report(m: Measurement, args: argparse.Namespace, opts: InferenceOptions, percentiles: tuple[float, ...],
            flops: float, dims: dict[str, int], device: torch.device) -> dict[str, Any]:  # fmt: skip
    summary = summarize_queries(m.queries, batch=1, percentiles=percentiles)
    print(f"\n##### backend {m.target}")
    print("\n".join(trace_lines(m, opts.avg_runs)))
    print()
    print(format_summary(summary, verbose=args.report_verbose))
    compute_s = summary.compute.median / 1e3
    achieved = flops / compute_s / 1e12 if compute_s > 0 else float("nan")
    precision = "bf16" if args.numerics == "official" else "fp32"
    peak = _peak(precision)
    line = f"Achieved: {achieved:.4g} TFLOP/s at the median GPU Compute Time"
    line += f" ({100 * achieved / peak:.3g}% of the {peak:g} TFLOP/s {precision} peak)" if peak else " (device peak unknown)"
    print(line)
    if device.type == "cpu":
        print("Note: CPU engines are synchronous: Enqueue Time includes the compute, so the enqueue warning is expected.")
    return {
        "backend": m.target, "model": args.preset if args.checkpoint is None else str(args.checkpoint),
        "numerics": args.numerics, "ops": args.ops, **_fp8_linear_record(args), "dims": dims, "queries": len(m.queries),
        "latency_median_ms": summary.latency.median, "compute_median_ms": summary.compute.median,
        "compute_cov_percent": summary.compute.cov_percent, "throughput_qps": summary.throughput_qps,
        "tflops": achieved, "tflop_per_query": flops / 1e12,
    }


def run_pipeline(args: argparse.Namespace) -> int:
    """Per-stage wall times of the whole pipeline (tiny random weights unless weights are given)."""
    from javisrt.runtime.demo import build_tiny_pipeline, demo_config

    if args.checkpoint is not None or args.preset != "tiny":
        raise NotImplementedError("--pipeline runs the tiny demo pipeline; real weights: use `javisrt generate` timings")
    pipe = build_tiny_pipeline()
    config = demo_config()
    runs = max(args.iterations, 1)
    stages: dict[str, list[float]] = {}
    with tempfile.TemporaryDirectory(prefix="javisrt-bench-") as tmp:
        pipe("warm-up", config)
        for k in range(runs):
            result = pipe("a dog barks in the rain", config)
            t0 = time.perf_counter()
            result.save(Path(tmp) / f"{k}.mp4")
            mux_ms = (time.perf_counter() - t0) * 1e3
            for name, secs in (("text encode", result.timings["text_s"]),
                               ("video decode", result.timings["video_decode_s"]),
                               ("audio decode + vocoder", result.timings["audio_decode_s"])):
                stages.setdefault(name, []).append(secs * 1e3)
            stages.setdefault("denoising step", []).extend(t * 1e3 for t in result.step_times_s)
            stages.setdefault("denoise (all steps)", []).append(result.timings["denoise_s"] * 1e3)
            stages.setdefault("mux (MP4 write)", []).append(mux_ms)
    h, w = config.size
    print(f"=== Pipeline stages (tiny preset, {config.num_frames} frames {h}x{w}, "
          f"{config.steps} steps, {runs} runs, {device_name()})")
    print(f"{'stage':<26}{'median ms':>12}{'mean ms':>12}{'n':>6}")
    for name, v in stages.items():
        print(f"{name:<26}{statistics.median(v):>12.3f}{statistics.mean(v):>12.3f}{len(v):>6}")
    if args.results_csv or args.results_json:
        append_row({"mode": "pipeline", "stages_median_ms": {k: statistics.median(v) for k, v in stages.items()}},
                   args.results_csv, args.results_json)
    return 0
