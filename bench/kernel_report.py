"""Static resource report of the Triton kernels compiled for sm_90a (no GPU needed).

    python -m javisrt.bench.kernel_report [--dtypes bf16,fp16,fp8] [--head-dims 128,32] [--csv out.csv]

For every kernel configuration in ``kernels/aot.py``: registers per thread and spills (``ptxas -v`` of
the PTX, Triton's bundled ptxas), shared memory per block (Triton's compiled metadata), wgmma count in
the PTX, and the occupancy those limits allow on an H100 (CTAs per SM). These are compile-time facts,
not timings: they say whether a tile configuration is viable, not how fast it is.
"""

from __future__ import annotations

import argparse
import csv
import datetime
import os
import platform
import sys
from dataclasses import dataclass
from typing import Any

import triton

from javisrt.kernels import aot

EXPLANATION = """\
Columns:
  regs      registers per thread (ptxas); a CTA needs regs * threads of the 64 Ki-register file per SM
  threads   threads per CTA (num_warps * 32)
  smem      shared memory per CTA in KiB (Triton metadata); H100 limit 227 KiB per block, 228 KiB per SM
  spill     bytes of local-memory spill stores / loads (ptxas); anything non-zero costs HBM/L1 traffic
  wgmma     wgmma.mma_async instructions in the PTX (Hopper tensor-core path); 0 for non-GEMM kernels
  CTA/SM    resident CTAs per SM allowed by registers and shared memory (min of the two, max 32)
"""


@dataclass(frozen=True)
class ReportingOptions:
    dtypes: tuple[str, ...]
    head_dims: tuple[int, ...]
    csv_path: str


def _parse(argv: list[str] | None) -> ReportingOptions:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--dtypes", default="bf16,fp8", help="comma list of bf16, fp16, fp8")
    ap.add_argument("--head-dims", default="128,32", help="comma list of attention head dims")
    ap.add_argument("--csv", default="", help="append one row per kernel configuration to this CSV")
    a = ap.parse_args(argv)
    return ReportingOptions(tuple(a.dtypes.split(",")), tuple(int(h) for h in a.head_dims.split(",")), a.csv)


def _ctas_per_sm(regs: int, threads: int, smem: int) -> int:
    regs = -(-regs // 8) * 8  # registers are allocated per thread in units of 8
    by_regs = 65536 // max(1, regs * threads)
    by_smem = aot.H100_SMEM_PER_SM // smem if smem else 32
    return min(by_regs, by_smem, 32)


def collect(opts: ReportingOptions) -> list[dict[str, Any]]:
    args = ["--dtypes", ",".join(opts.dtypes), "--head-dims", ",".join(map(str, opts.head_dims))]
    # A child process: kernels imported under TRITON_INTERPRET=1 cannot be compiled.
    return aot.compile_all_subprocess(args)


def main(argv: list[str] | None = None) -> int:
    opts = _parse(argv)
    rows = collect(opts)
    print(f"javisrt kernels for {aot.TARGET.backend} sm_{aot.TARGET.arch}a, PTX ISA "
          f"{aot.PTX_VERSION // 10}.{aot.PTX_VERSION % 10}, triton {triton.__version__} (static, no GPU)\n")  # fmt: skip
    header = f"{'kernel':32s} {'regs':>5s} {'threads':>7s} {'smem KiB':>9s} {'spill B':>9s} {'wgmma':>6s} {'CTA/SM':>6s}"
    print(header)
    print("-" * len(header))
    for r in rows:
        occ = _ctas_per_sm(r["registers"], r["block"], r["shared"])
        spill = f"{r['spill_stores']}/{r['spill_loads']}"
        print(f"{r['name']:32s} {r['registers']:5d} {r['block']:7d} {r['shared'] / 1024:9.1f} {spill:>9s} "
              f"{r['wgmma']:6d} {occ:6d}")  # fmt: skip
    print()
    print(EXPLANATION)
    if opts.csv_path:
        stamp = datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")
        new = not os.path.exists(opts.csv_path)
        with open(opts.csv_path, "a", newline="") as f:
            w = csv.writer(f)
            if new:
                w.writerow(["timestamp", "target", "triton", "python", "kernel", "registers", "threads",
                            "shared_bytes", "spill_stores", "spill_loads", "wgmma", "ctas_per_sm"])  # fmt: skip
            for r in rows:
                w.writerow([stamp, f"sm_{aot.TARGET.arch}a", triton.__version__, platform.python_version(),
                            r["name"], r["registers"], r["block"], r["shared"], r["spill_stores"],
                            r["spill_loads"], r["wgmma"], _ctas_per_sm(r["registers"], r["block"], r["shared"])])  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
