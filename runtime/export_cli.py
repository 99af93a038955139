"""``javisrt export``: checkpoint -> ONNX graph (+ external data) + ``manifest.json``.

    javisrt export --checkpoint DIR --precision bf16|fp8 --flavor native|plugin --out DIR
                   [--config PRESET] [--fp32-copy] [--calib-prompts FILE] [--calib-steps N]
                   [--calib-shape FRAMES,HEIGHT,WIDTH] [--device cpu|cuda] [--fp8-scales [--fp8-scales-out PATH]]
    javisrt export --checkpoint DIR --fp8-scales [--fp8-scales-out PATH] [--calib-...] [--device cuda]

Writes ``OUT/dit.onnx`` (weights > 2 GiB in ``OUT/dit.onnx.data``), with ``--fp32-copy`` also
``OUT/dit.fp32.onnx`` (the graph ONNX Runtime can check on CPU), and ``OUT/manifest.json``: the
contract, the checkpoint's hash, flavour/precision, tool versions, and the static checks (op audit;
FP8 rules). FP8 is the modelopt PTQ path (:mod:`javisrt.export.quantize`, calibrated along sampling
trajectories by :mod:`javisrt.runtime.calibration` — why this command lives in runtime/): its graph is the native
attention written out (MatMul/Softmax with Q/DQ), so ``--flavor plugin`` is refused with fp8.
``dit.onnx`` for fp8 is FP8 on the BF16 numerics the engine runs; its ``--fp32-copy`` is FP8 on fp32
numerics calibrated on the same set (ONNX Runtime has no bf16 Q/DQ kernels).

``--fp8-scales`` writes the per-tensor scales of the ``triton-fp8`` op set (``runtime/fp8_scales.py``)
from the same calibration, as a sidecar next to the checkpoint (``--fp8-scales-out`` to put it
elsewhere): with ``--precision fp8`` from the export's own calibration, alone (no ``--precision``) as
the calibration only.
"""

from __future__ import annotations

import argparse
import copy
import hashlib
import importlib.metadata
import json
import logging
import time
from pathlib import Path
from typing import Any

import torch
from tqdm import tqdm

from javisrt.engine.atomic_file import atomic_file
from javisrt.engine.errors import CheckpointError, ConfigError
from javisrt.export.contract import DiTContract, ShapePoint

log = logging.getLogger(__name__)

MANIFEST_VERSION = "1"
VERSIONED = ("javisrt", "torch", "onnx", "onnxruntime", "onnxscript", "nvidia-modelopt", "onnxruntime-extensions")


def register(subparsers: Any) -> argparse.ArgumentParser:
    p = subparsers.add_parser("export", help="export the DiT to ONNX (native/plugin, bf16/fp8) with a manifest")
    p.add_argument("--checkpoint", required=True, type=Path, help="any layout engine.checkpoint.load_model reads")
    p.add_argument("--precision", choices=("bf16", "fp8"),
                   help="graph precision (required unless --fp8-scales alone: the calibration only)")
    p.add_argument("--flavor", default="native", choices=("native", "plugin"))
    p.add_argument("--ffn", default="plugin", choices=("plugin", "native"),
                   help="plugin flavour: the FFN as a javisrt::modality_ffn node (default) or native "
                        "(Slice -> experts -> Concat; TensorRT can build this one today)")
    p.add_argument("--out", type=Path, help="output directory of the graph (required with --precision)")
    p.add_argument("--config", default=None, help="preset name (default: from the checkpoint)")
    p.add_argument("--fp32-copy", action="store_true", help="also write dit.fp32.onnx for ONNX Runtime checks")
    p.add_argument("--calib-prompts", type=Path, default=None,
                   help="fp8: safetensors/pt with 'prompts' [N,Lt,text_dim] (+ 'negative' [1,Lt,text_dim]) T5 embeddings")  # fmt: skip
    p.add_argument("--calib-num-prompts", type=int, default=4, help="fp8 without --calib-prompts: random stand-ins")
    p.add_argument("--calib-steps", type=int, default=10, help="fp8: sampling steps per calibration trajectory")
    p.add_argument("--calib-shape", default="33,240,426", help="fp8: FRAMES,HEIGHT,WIDTH of the calibration runs")
    p.add_argument("--device", default="cpu", help="device for calibration (cuda recommended for real checkpoints)")
    p.add_argument("--fp8-scales", action="store_true",
                   help="write the triton-fp8 op set's scales sidecar from the FP8 calibration (with --precision fp8: "
                        "the export's own; alone: calibrate and write only the sidecar)")
    p.add_argument("--fp8-scales-out", type=Path, default=None,
                   help="where to write the sidecar (default: CHECKPOINT.fp8-scales.safetensors, next to the "
                        "checkpoint, where --ops triton-fp8 looks for it)")
    return p  # type: ignore[no-any-return]


def checkpoint_hash(path: Path) -> str:
    """sha256 over (relative path, bytes) of every file of the checkpoint, in sorted order."""
    files = [path] if path.is_file() else sorted(p for p in path.rglob("*") if p.is_file())
    if not files:
        raise CheckpointError(f"no checkpoint files under {path}")
    digest = hashlib.sha256()
    total = sum(f.stat().st_size for f in files)
    with tqdm(total=total, unit="B", unit_scale=True, desc="hashing checkpoint", leave=False) as bar:
        for f in files:
            digest.update(str(f.relative_to(path) if path.is_dir() else f.name).encode() + b"\0")
            with f.open("rb") as fh:
                while chunk := fh.read(1 << 24):
                    digest.update(chunk)
                    bar.update(len(chunk))
    return "sha256:" + digest.hexdigest()


def versions() -> dict[str, str]:
    out = {}
    for name in VERSIONED:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            out[name] = "not installed"
    return out


def _calibration(args: argparse.Namespace, contract: DiTContract) -> Any:
    from javisrt.runtime.calibration import CalibrationSet

    try:
        frames, height, width = (int(v) for v in args.calib_shape.split(","))
    except ValueError:
        raise ConfigError(f"--calib-shape must be FRAMES,HEIGHT,WIDTH, got {args.calib_shape!r}") from None
    dims = ShapePoint(1, frames, height, width).dims()
    if args.calib_prompts is None:
        log.warning("no --calib-prompts: calibrating on %d Gaussian stand-ins for T5 embeddings", args.calib_num_prompts)
        return CalibrationSet.random(contract, [dims], num_prompts=args.calib_num_prompts, steps=args.calib_steps)
    if args.calib_prompts.suffix == ".safetensors":
        from safetensors.torch import load_file

        data = load_file(str(args.calib_prompts))
    else:
        data = torch.load(args.calib_prompts, map_location="cpu", weights_only=True)
    cfg = contract.config
    prompts = data["prompts"].float()
    if prompts.ndim != 3 or prompts.shape[2] != cfg.text_dim or prompts.shape[1] > cfg.text_len:
        raise ConfigError(f"calibration prompts must be [N, <= {cfg.text_len}, {cfg.text_dim}], got {tuple(prompts.shape)}")
    pad = cfg.text_len - prompts.shape[1]
    prompts = torch.nn.functional.pad(prompts, (0, 0, 0, pad))
    negative = data.get("negative", torch.zeros(1, cfg.text_len, cfg.text_dim)).float()
    negative = torch.nn.functional.pad(negative, (0, 0, 0, cfg.text_len - negative.shape[1]))
    return CalibrationSet(prompts, negative, ({**dims, "batch": 1},), steps=args.calib_steps)


def _write_fp8_scales(args: argparse.Namespace, wrapper: Any, calib: Any) -> Path:
    """The calibrated quantizers' scales as the triton-fp8 sidecar (runtime/fp8_scales.py)."""
    from javisrt.runtime.fp8_scales import default_path, describe_calibration, scales_from_calibration

    shapes = [{k: v for k, v in d.items() if k != "batch"} for d in calib.shapes]
    what = describe_calibration(len(calib.prompts), calib.steps, shapes, args.calib_prompts is None)
    path = args.fp8_scales_out or default_path(args.checkpoint)
    return scales_from_calibration(wrapper, what).save(path)


def run_fp8_scales(args: argparse.Namespace) -> int:
    """``--fp8-scales`` alone: calibrate (BF16 numerics, as the engine runs) and write the sidecar."""
    from javisrt.engine.checkpoint import load_model
    from javisrt.runtime.calibration import calibrate_fp8

    model = load_model(args.checkpoint, args.config, numerics="fp32", device=args.device)
    calib = _calibration(args, DiTContract.for_config(model.cfg))
    wrapper = calibrate_fp8(model, calib, numerics="official")
    path = _write_fp8_scales(args, wrapper, calib)
    log.info("FP8 scales written to %s", path)
    return 0


def run(args: argparse.Namespace) -> int:
    from javisrt.engine.checkpoint import load_model
    from javisrt.export.fp8_rules import audit_ops, check_fp8
    from javisrt.export.onnx import export_dit, save
    from javisrt.export.contract import META_CHECKPOINT

    if args.fp8_scales_out is not None and not args.fp8_scales:
        raise ConfigError("--fp8-scales-out is where --fp8-scales writes: add --fp8-scales")
    if args.precision is None:
        if not args.fp8_scales:
            raise ConfigError("javisrt export needs --precision (and --out), or --fp8-scales alone for the scales sidecar")
        return run_fp8_scales(args)
    if args.out is None:
        raise ConfigError("--precision needs --out (the graph's output directory)")
    if args.fp8_scales and args.precision != "fp8":
        raise ConfigError("--fp8-scales comes from the FP8 calibration: use it with --precision fp8, or alone")
    if args.precision == "fp8" and args.flavor != "native":
        raise ConfigError("fp8 export is the native flavour only (modelopt Q/DQ on MatMul attention)")
    out: Path = args.out
    out.mkdir(parents=True, exist_ok=True)
    started = time.time()
    steps = ["hash", "load", "export", "check", "write"] + (["fp32 copy"] if args.fp32_copy else [])
    with tqdm(total=len(steps), desc="javisrt export", unit="stage") as bar:
        bar.set_postfix_str("hashing checkpoint")
        ckpt_hash = checkpoint_hash(args.checkpoint)
        bar.update()
        bar.set_postfix_str("loading model")
        model = load_model(args.checkpoint, args.config, numerics="fp32", device=args.device)
        contract = DiTContract.for_config(model.cfg)
        bar.update()
        checks: dict[str, Any] = {}
        fp8_scales_path: str | None = None
        if args.precision == "fp8":
            from javisrt.export.quantize import export_fp8
            from javisrt.runtime.calibration import calibrate_fp8

            calib = _calibration(args, contract)
            # fp32 copy first: calibrate_fp8 changes the model in place (numerics + quantizers)
            fp32_model = copy.deepcopy(model) if args.fp32_copy else None
            bar.set_postfix_str("FP8 calibration")
            # FP8 on the BF16 numerics the engine runs (embedders, modulation, norms, heads stay high precision)
            wrapper = calibrate_fp8(model, calib, numerics="official")
            if args.fp8_scales:
                fp8_scales_path = str(_write_fp8_scales(args, wrapper, calib))
            graph = export_fp8(wrapper.to("cpu"), contract)
            checks["fp8_rules"] = [str(v) for v in check_fp8(graph)]
        else:
            bar.set_postfix_str(f"exporting {args.flavor}/bf16")
            graph = export_dit(model.to("cpu"), args.flavor, "bf16", contract, ffn_plugin=args.ffn == "plugin")
        bar.update()
        bar.set_postfix_str("static checks")
        checks["op_audit"] = [str(v) for v in audit_ops(graph)]
        bar.update()
        bar.set_postfix_str("writing")
        # The engine builder records this in the engine's metadata (and a refit updates it), so a
        # TensorRT backend can refuse an engine built from another checkpoint.
        graph.metadata_props.add(key=META_CHECKPOINT, value=ckpt_hash)
        graph_path = save(graph, out / "dit.onnx")
        bar.update()
        files = [graph_path.name] + ([graph_path.name + ".data"] if (out / (graph_path.name + ".data")).exists() else [])
        if args.fp32_copy and args.precision == "bf16":
            bar.set_postfix_str("fp32 copy")
            files.append(save(export_dit(model, args.flavor, "fp32", contract, ffn_plugin=args.ffn == "plugin"),
                              out / "dit.fp32.onnx").name)
            bar.update()
        elif args.fp32_copy:
            # ONNX Runtime has no bf16 Q/DQ kernels: the CPU check graph is FP8 on fp32 numerics,
            # calibrated on the same set (run it with ORT_DISABLE_ALL, feasibility §3).
            bar.set_postfix_str("fp32 FP8 copy")
            assert fp32_model is not None
            wrapper32 = calibrate_fp8(fp32_model, calib, numerics="fp32")
            files.append(save(export_fp8(wrapper32.to("cpu"), contract), out / "dit.fp32.onnx").name)
            bar.update()
    manifest = {
        "manifest_version": MANIFEST_VERSION,
        "module": contract.module,
        "flavor": args.flavor,
        "precision": args.precision,
        "graph_high_precision": "fp32" if args.precision == "fp8" else "bf16",
        "files": files,
        "checkpoint": {"path": str(args.checkpoint), "hash": ckpt_hash},
        "contract": contract.to_dict(),
        "checks": checks,
        **({"fp8_scales": fp8_scales_path} if fp8_scales_path else {}),
        "versions": versions(),
        "export_seconds": round(time.time() - started, 1),
    }
    with atomic_file(out / "manifest.json") as tmp:
        tmp.write_text(json.dumps(manifest, indent=2, sort_keys=True))
    failed = [c for v in checks.values() for c in v]
    for line in failed:
        log.error("%s", line)
    log.info("exported %s/%s to %s in %.0f s", args.flavor, args.precision, out, time.time() - started)
    return 1 if failed else 0
