"""One command for a GPU machine with TensorRT 11: build, inspect, compare, time, tabulate.

    python -m javisrt.bench.gpu_check --out out/gpu_check [--presets tiny,javisdit-v1.0] [--precisions bf16,fp8]

0. FIRST, before any engine (tensorrt-notes §F, open point 1): does TensorRT raise the 48 KiB dynamic
   shared-memory limit for a QDP AOT plugin whose kernel asks for more? One ``javisrt::rope_attention``
   node (the bf16 head_dim-128 kernel asks ~112 KiB) is parsed from ONNX, built with the AOT plugin,
   run, and compared with ``engine/ops.attention_ref`` (:func:`check_aot_plugin_smem`, ``aot_smem.json``).
   If it fails, every plugin-flavour engine fails the same way: the answer decides whether the attention
   plugins need a C++ IPluginV3 that sets cudaFuncAttributeMaxDynamicSharedMemorySize (§1.4).

For every (preset, precision):
  1. random-weight model (or ``--checkpoint``), exported by ``javisrt.export`` (BF16: ``export_dit``
     native flavour; FP8: modelopt Q/DQ via ``javisrt.export.quantize`` with a random calibration set);
  2. engine built by ``javisrt.export.trt_build.build_engine`` (detailed verbosity, one profile, no
     kREFIT: these engines are timed, and refittable engines may lose fusions);
  3. fusion check from the engine inspector's layer JSON: fused attention layers present, and for FP8
     layers running FP8 tactics;
  4. outputs of the TensorRT backend vs the torch backend on the GPU (fp32 numerics: the reference)
     and, for the tiny preset, vs ONNX Runtime on the CPU fp32 export, via the Engine interface;
  5. latency of the engine's CUDA-graph replay (median of ``--iters``);
and prints one table (also written as JSON). Exit status 1 if any check failed.
Cannot run on the CPU dev/CI machines (no TensorRT): it stops with UnavailableError there.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

log = logging.getLogger("javisrt.gpu_check")

ATTENTION_MARKERS = ("attention", "mha", "fmha", "flash")
FP8_MARKERS = ("fp8", "e4m3")


@dataclasses.dataclass
class Row:
    preset: str
    precision: str
    build_s: float = 0.0
    plan_mib: float = 0.0
    layers: int = 0
    attention_layers: int = 0
    fp8_layers: int = 0
    rel_err_torch: float = float("nan")
    rel_err_ort: float = float("nan")
    latency_ms: float = float("nan")
    ok: bool = False
    note: str = ""


def fusion_counts(info: dict[str, Any]) -> tuple[int, int, int]:
    """(layers, fused-attention layers, FP8 layers) from the inspector's JSON (detailed verbosity)."""
    layers = info.get("Layers", [])
    text = [json.dumps(layer).lower() if isinstance(layer, dict) else str(layer).lower() for layer in layers]
    attn = sum(any(m in t for m in ATTENTION_MARKERS) for t in text)
    fp8 = sum(any(m in t for m in FP8_MARKERS) for t in text)
    return len(layers), attn, fp8


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double().cpu(), ref.double().cpu()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def export_graph(model: Any, contract: Any, precision: str, path: Path, calib_shapes: list[Any]) -> Path:
    from javisrt.export.onnx import export_dit, save

    if precision == "fp8":
        from javisrt.export.quantize import export_fp8
        from javisrt.runtime.calibration import CalibrationSet, calibrate_fp8

        calib = CalibrationSet.random(contract, calib_shapes)
        return save(export_fp8(calibrate_fp8(model, calib), contract), path)
    return save(export_dit(model, "native", precision, contract), path)


def check_one(preset: str, precision: str, args: argparse.Namespace) -> Row:
    from javisrt.engine.config import JavisConfig
    from javisrt.engine.model import random_model
    from javisrt.export import trt_build
    from javisrt.export.contract import DiTContract
    from javisrt.runtime.backends import create_engine

    row = Row(preset, precision)
    cfg = JavisConfig.from_name(preset)
    contract = trt_build.select_profiles(DiTContract.for_config(cfg), [args.profile])
    dims = contract.profiles[0].opt.dims()
    work = args.out / f"{preset}.{precision}"
    work.mkdir(parents=True, exist_ok=True)

    def fresh_model() -> Any:
        if args.checkpoint:
            from javisrt.engine.checkpoint import load_model

            return load_model(args.checkpoint, cfg, "fp32")
        return random_model(cfg)

    # 1. export (the ONNX carries the full contract; the build selects the profile)
    onnx_path = export_graph(fresh_model(), DiTContract.for_config(cfg), precision, work / "model.onnx", [dims])
    # 2. build
    t0 = time.perf_counter()
    plan = work / "engine.plan"
    opts = trt_build.BuildOptions(profiles=(args.profile,), builder_optimization_level=args.opt_level,
                                  timing_cache=args.out / "timing.cache", refit=trt_build.Refit.NONE)  # fmt: skip
    meta = trt_build.build_engine(onnx_path, plan, opts)
    row.build_s = time.perf_counter() - t0
    row.plan_mib = meta.plan_bytes / 2**20
    # 3. fusion
    row.layers, row.attention_layers, row.fp8_layers = fusion_counts(trt_build.layer_info(plan))
    (work / "layers.json").write_text(json.dumps(trt_build.layer_info(plan), indent=1))
    # 4. numerics through the Engine interface
    x = contract.sample_inputs(dims, torch.Generator().manual_seed(1))
    with create_engine("torch", model=fresh_model(), numerics="fp32", device="cuda") as ref_eng:
        ref_eng.allocate(dims)
        ref = {k: v.float().cpu() for k, v in ref_eng.infer(x).items()}
    with create_engine("tensorrt", engine_file=plan, device="cuda", cuda_graphs=True, precision=precision) as trt_eng:
        trt_eng.allocate(dims)
        out = {k: v.clone() for k, v in trt_eng.infer(x).items()}
        row.rel_err_torch = max(rel_err(out[k], ref[k]) for k in ref)
        # 5. latency of the CUDA-graph replay
        trt_eng.capture_graph()
        times = []
        for _ in range(args.warmup + args.iters):
            t = time.perf_counter()
            trt_eng.enqueue()
            trt_eng.synchronize()
            times.append(time.perf_counter() - t)
        row.latency_ms = statistics.median(times[args.warmup :]) * 1e3
    if preset == "tiny":
        fp32 = export_graph(fresh_model(), DiTContract.for_config(cfg), "fp32", work / "model_fp32.onnx", [dims])
        with create_engine("onnxruntime", engine_file=fp32) as ort_eng:
            ort_eng.allocate(dims)
            ort = ort_eng.infer(x)
            row.rel_err_ort = max(rel_err(out[k], ort[k]) for k in ort)
    # verdict: bf16 ~ 8 mantissa bits, fp8 e4m3 ~ 3 (relative L2 error bounds from the format, not tuned)
    bound = {"bf16": 2e-2, "fp8": 1.5e-1}[precision]
    problems = []
    if row.rel_err_torch > bound:
        problems.append(f"rel err {row.rel_err_torch:.3g} > {bound}")
    if row.attention_layers == 0:
        problems.append("no fused attention layer")
    if precision == "fp8" and row.fp8_layers == 0:
        problems.append("no FP8 layer")
    row.ok, row.note = not problems, "; ".join(problems)
    return row


# One self-attention call at head_dim 128 (the released model's), long enough for several query tiles.
SMEM_SHAPE = {"B": 1, "L": 300, "H": 2, "D": 128}
SMEM_LIMIT_DEFAULT = 48 * 1024  # bytes of dynamic shared memory a launch gets without the opt-in attribute


def aot_smem_graph(path: Path) -> Path:
    """ONNX with one ``javisrt::rope_attention`` node (bf16 q/k/v, fp32 cos/sin) at :data:`SMEM_SHAPE`,
    emitted the way the plugin-flavour export emits it (``export/plugin_ops.py``)."""
    import onnx
    from onnx import TensorProto, helper

    from javisrt.export.plugin_ops import DOMAIN, PLUGIN_OPS, VERSION

    b, l, h, d = SMEM_SHAPE["B"], SMEM_SHAPE["L"], SMEM_SHAPE["H"], SMEM_SHAPE["D"]
    io = PLUGIN_OPS["rope_attention"]
    shapes = {"q": [b, l, h, d], "k": [b, l, h, d], "v": [b, l, h, d], "cos": [l, d // 2], "sin": [l, d // 2]}
    types = {n: TensorProto.FLOAT if n in ("cos", "sin") else TensorProto.BFLOAT16 for n in shapes}
    node = helper.make_node("rope_attention", io["inputs"], io["outputs"], domain=DOMAIN, plugin_namespace=DOMAIN)
    graph = helper.make_graph(
        [node], "aot_smem", [helper.make_tensor_value_info(n, types[n], shapes[n]) for n in io["inputs"]],
        [helper.make_tensor_value_info("out", TensorProto.BFLOAT16, [b, l, h, d])],
    )  # fmt: skip
    model = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid(DOMAIN, VERSION)])
    onnx.save(model, str(path))
    return path


def check_aot_plugin_smem(out_dir: Path) -> dict[str, Any]:
    """Build and run one rope_attention AOT plugin whose kernel needs more than 48 KiB of shared memory;
    ``ok`` when it launches and matches the fp32 reference within bf16 error."""
    import tensorrt as trt

    from javisrt.engine.ops import attention_ref
    from javisrt.export import trt_build, trt_plugins
    from javisrt.export.tensorrt_api import make_logger

    trt_plugins.register_all()
    _, info = trt_plugins.kernel_for("rope_attention", "bf16", SMEM_SHAPE["D"])
    result: dict[str, Any] = {"kernel": info.name, "kernel_shared_bytes": int(info.shared),
                              "above_default_limit": int(info.shared) > SMEM_LIMIT_DEFAULT, "built": False,
                              "ran": False, "rel_err": float("nan"), "ok": False, "note": ""}  # fmt: skip
    logger = make_logger()
    builder = trt.Builder(logger)
    network = builder.create_network(trt_build.network_flags("plugin"))
    parser = trt.OnnxParser(network, logger)
    if not parser.parse_from_file(str(aot_smem_graph(out_dir / "aot_smem.onnx"))):
        result["note"] = "; ".join(str(parser.get_error(i)) for i in range(parser.num_errors))
        return result
    plan = builder.build_serialized_network(network, builder.create_builder_config())
    if plan is None:
        result["note"] = "build failed (see the TensorRT log)"
        return result
    result["built"] = True
    engine = trt.Runtime(logger).deserialize_cuda_engine(plan)
    context = engine.create_execution_context()
    b, l, h, d = SMEM_SHAPE["B"], SMEM_SHAPE["L"], SMEM_SHAPE["H"], SMEM_SHAPE["D"]
    gen = torch.Generator("cuda").manual_seed(0)
    q, k, v = (torch.randn(b, l, h, d, device="cuda", generator=gen).bfloat16() for _ in range(3))
    angle = torch.rand(l, d // 2, device="cuda", generator=gen) * 6.28
    cos, sin = angle.cos(), angle.sin()
    out = torch.empty_like(q)
    for name, t in {"q": q, "k": k, "v": v, "cos": cos, "sin": sin, "out": out}.items():
        context.set_tensor_address(name, t.data_ptr())
    stream = torch.cuda.current_stream()
    try:
        ran = context.execute_async_v3(stream.cuda_stream)
        stream.synchronize()
    except RuntimeError as exc:  # a launch past the smem limit surfaces as a CUDA error here
        result["note"] = f"launch failed: {exc}"
        return result
    if not ran:
        result["note"] = "execute_async_v3 returned False (see the TensorRT log)"
        return result
    result["ran"] = True
    ref = attention_ref(q.float(), k.float(), v.float(), (cos, sin))
    bf16_ref = attention_ref(q, k, v, (cos.bfloat16(), sin.bfloat16())).float()
    result["rel_err"] = rel_err(out.float(), ref)
    bound = 2 * rel_err(bf16_ref, ref) + 1e-3  # 2x torch's own bf16 error + a floor (tests/_tolerance's rule)
    result["ok"] = bool(result["rel_err"] <= bound)
    if not result["ok"]:
        result["note"] = f"rel err {result['rel_err']:.3g} > {bound:.3g}: the kernel ran but its output is wrong"
    return result


def print_table(rows: list[Row]) -> None:
    head = ("preset", "prec", "build s", "plan MiB", "layers", "attn", "fp8", "rel err torch", "rel err ORT",
            "latency ms", "ok", "note")  # fmt: skip
    lines = [head] + [
        (r.preset, r.precision, f"{r.build_s:.0f}", f"{r.plan_mib:.1f}", str(r.layers), str(r.attention_layers),
         str(r.fp8_layers), f"{r.rel_err_torch:.3g}", f"{r.rel_err_ort:.3g}", f"{r.latency_ms:.2f}",
         "yes" if r.ok else "NO", r.note)  # fmt: skip
        for r in rows
    ]
    widths = [max(len(line[i]) for line in lines) for i in range(len(head))]
    for line in lines:
        sys.stdout.write("  ".join(c.ljust(w) for c, w in zip(line, widths, strict=True)) + "\n")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=Path("out/gpu_check"))
    ap.add_argument("--presets", default="tiny,javisdit-v1.0")
    ap.add_argument("--precisions", default="bf16,fp8")
    ap.add_argument("--profile", default="240p", help="contract profile to build (one per engine here)")
    ap.add_argument("--opt-level", type=int, default=3)
    ap.add_argument("--checkpoint", default=None, help="real weights instead of random ones")
    ap.add_argument("--warmup", type=int, default=3)
    ap.add_argument("--iters", type=int, default=20)
    args = ap.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    from javisrt.export.tensorrt_api import device_compute_capability, import_tensorrt

    trt = import_tensorrt()  # UnavailableError (with the reason) on machines without TensorRT
    if not torch.cuda.is_available():
        raise SystemExit("gpu_check needs a CUDA GPU")
    log.info("TensorRT %s, GPU %s (sm_%d%d)", trt.__version__, torch.cuda.get_device_name(), *device_compute_capability())
    args.out.mkdir(parents=True, exist_ok=True)
    # 0. the open question every plugin engine depends on: first, before any long build
    try:
        smem = check_aot_plugin_smem(args.out)
    except Exception as exc:  # report it and go on with the native-flavour checks
        log.exception("AOT plugin shared-memory check failed")
        smem = {"ok": False, "note": f"{type(exc).__name__}: {exc}"[:300]}
    (args.out / "aot_smem.json").write_text(json.dumps(smem, indent=1))
    sys.stdout.write(f"AOT plugin > 48 KiB shared memory: {'OK' if smem['ok'] else 'FAILED'} {json.dumps(smem)}\n")
    rows = []
    for preset in args.presets.split(","):
        for precision in args.precisions.split(","):
            try:
                rows.append(check_one(preset, precision, args))
            except Exception as exc:  # report every combination, then fail the run
                log.exception("%s %s failed", preset, precision)
                rows.append(Row(preset, precision, note=f"{type(exc).__name__}: {exc}"[:200]))
    print_table(rows)
    (args.out / "gpu_check.json").write_text(json.dumps([dataclasses.asdict(r) for r in rows], indent=1))
    return 0 if all(r.ok for r in rows) and smem["ok"] else 1


if __name__ == "__main__":
    raise SystemExit(main())
