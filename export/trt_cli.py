"""``javisrt build``: ONNX export -> TensorRT engine (+ metadata sidecar), with progress.

Wired by ``runtime/cli.py``::

    from javisrt.export import trt_cli
    trt_cli.register(subparsers)          # adds the "build" subcommand
    ...
    if args.command == "build": return trt_cli.run(args)

Examples::

    javisrt build --onnx out/onnx_bf16 --out out/dit_bf16.plan --profiles 240p,480p --timing-cache out/trt.cache
    javisrt build --refit-from out/onnx_bf16_lora --out out/dit_bf16.plan          # swap weights, no rebuild
    javisrt build --layers out/dit_bf16.plan > layers.json                         # engine inspector dump
"""

from __future__ import annotations

import argparse
import json
import logging
import sys
from pathlib import Path
from typing import Any

from javisrt.export.trt_build import BuildOptions, Refit, build_engine, layer_info, refit_plan

log = logging.getLogger(__name__)


def register(subparsers: Any) -> argparse.ArgumentParser:
    p: argparse.ArgumentParser = subparsers.add_parser(
        "build",
        help="build a TensorRT engine from an exported ONNX (GPU machine with TensorRT 11)",
        description=(
            "Build a strongly typed TensorRT engine: BF16/FP8 come from the ONNX's types and Q/DQ nodes, one "
            "optimisation profile per contract profile. Writes PLAN and PLAN.json (metadata checked at load)."
        ),
    )
    p.add_argument("--onnx", type=Path, help="exported ONNX file or directory holding one")
    p.add_argument("--out", type=Path, required=True, help="engine plan to write (or to refit / inspect)")
    p.add_argument("--profiles", default="", help="comma list of contract profile names (default: all)")
    p.add_argument("--opt-level", type=int, default=3, help="builder optimisation level 0..5 (default 3)")
    p.add_argument("--workspace-mib", type=int, default=0, help="workspace pool limit in MiB (0: TensorRT default)")
    p.add_argument("--timing-cache", type=Path, default=None, help="timing cache file to read and update")
    p.add_argument("--refit", choices=[r.value for r in Refit], default=Refit.REFIT.value,
                   help="refit: weights swappable (default); strip: weight-less plan refitted at load; none")  # fmt: skip
    p.add_argument("--no-detailed-profiling", action="store_true", help="omit layer details from the plan")
    p.add_argument("--checkpoint-sha256", default=None, help="record this checkpoint fingerprint")
    p.add_argument("--refit-from", type=Path, default=None, help="refit --out in place from this ONNX (no rebuild)")
    p.add_argument("--layers", action="store_true", help="print the engine inspector's layer JSON of --out")
    return p


def _progress(phase: str, step: int, steps: int) -> None:
    if steps:
        sys.stderr.write(f"\r[build] {phase}: {step}/{steps}  ")
        if step >= steps:
            sys.stderr.write("\n")
    else:
        sys.stderr.write(f"[build] {phase}\n")
    sys.stderr.flush()


def options_from_args(args: argparse.Namespace) -> BuildOptions:
    return BuildOptions(
        profiles=tuple(p for p in args.profiles.split(",") if p),
        builder_optimization_level=args.opt_level,
        workspace_mib=args.workspace_mib,
        timing_cache=args.timing_cache,
        refit=Refit(args.refit),
        detailed_profiling=not args.no_detailed_profiling,
        checkpoint_sha256=args.checkpoint_sha256,
    )


def run(args: argparse.Namespace) -> int:
    if args.layers:
        json.dump(layer_info(args.out), sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    if args.refit_from is not None:
        meta = refit_plan(args.out, args.refit_from, checkpoint_sha256=args.checkpoint_sha256)
        sys.stderr.write(f"refitted {args.out} from {args.refit_from} (checkpoint {meta.checkpoint_sha256})\n")
        return 0
    if args.onnx is None:
        raise SystemExit("javisrt build: --onnx is required (or --refit-from / --layers)")
    meta = build_engine(args.onnx, args.out, options_from_args(args), progress=_progress)
    sys.stderr.write(
        f"built {args.out}: {meta.precision}, TensorRT {meta.tensorrt_version}, {meta.sm}, "
        f"{len(meta.contract['profiles'])} profiles, {meta.plan_bytes / 2**20:.1f} MiB, "
        f"{'refittable' if meta.refittable else 'frozen'}{', weights stripped' if meta.weights_stripped else ''}\n"
    )
    return 0
