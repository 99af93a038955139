"""One DiT forward with random weights at a spec shape: wall time, peak memory, achieved FLOP/s.

    python -m javisrt.bench.forward --preset javisdit-v1.0 --case 240p-65f --numerics fp32

The model is built on the meta device and materialised once in the target dtype (no second copy).
Peak memory is the process' maximum resident set size (weights + activations + runtime).
"""

from __future__ import annotations

import argparse
import json
import resource
import time

import torch

from javisrt.engine.config import JavisConfig
from javisrt.engine.flops import forward_flops
from javisrt.engine.model import Numerics, random_model

# name -> (video latent [T, H8, W8], audio latent Tm4): model-spec.md §7–8
CASES = {
    "240p-33f": ((9, 30, 54), 56),
    "240p-65f": ((17, 30, 54), 104),
    "480p-81f": ((21, 60, 108), 128),
    "480x832-81f": ((21, 60, 104), 128),
    "tiny": ((3, 8, 8), 12),
}


def max_rss_gib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20  # KiB on Linux


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="javisdit-v1.0", help="JavisConfig preset name")
    p.add_argument("--case", default="240p-65f", choices=sorted(CASES), help="latent shape from model-spec §8")
    p.add_argument("--numerics", default="fp32", choices=[n.value for n in Numerics],
                   help="fp32 = clean fp32 path; official = bf16 with fp32 islands (the reference's numerics)")
    p.add_argument("--batch", type=int, default=1, help="batch (2 = one CFG step)")
    p.add_argument("--layers", type=int, default=None, help="override num_layers (quick runs)")
    p.add_argument("--repeat", type=int, default=1, help="timed forwards after one untimed warm-up (0 = no warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON row instead of text")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    overrides = {"num_layers": args.layers} if args.layers else {}
    cfg = JavisConfig.from_name(args.preset, **overrides)
    (t, h, w), tm4 = CASES[args.case]
    rss0 = max_rss_gib()
    t0 = time.perf_counter()
    model = random_model(cfg, args.numerics)
    build_s = time.perf_counter() - t0
    rss_weights = max_rss_gib()

    g = torch.Generator().manual_seed(1)
    b = args.batch
    video = torch.randn(b, cfg.in_channels, t, h, w, generator=g)
    audio = torch.randn(b, cfg.audio_in_channels, tm4, 16, generator=g) if cfg.has_audio else None
    timestep = torch.full((b,), 991.64)
    context = torch.randn(b, cfg.text_len, cfg.text_dim, generator=g)
    times = []
    with torch.inference_mode():
        if args.repeat > 1:
            model(video, audio, timestep, context)
        for _ in range(max(args.repeat, 1)):
            t1 = time.perf_counter()
            out_v, out_a = model(video, audio, timestep, context)
            times.append(time.perf_counter() - t1)
    grid = model.token_grid(video, audio)
    flops = forward_flops(cfg, grid, batch=b).total
    best = min(times)
    row = {
        "preset": cfg.name, "layers": cfg.num_layers, "case": args.case, "numerics": args.numerics, "batch": b,
        "tokens": [grid.num_video_tokens, grid.num_audio_tokens], "forward_s": round(best, 3),
        "build_s": round(build_s, 2), "tflop": round(flops / 1e12, 3), "gflops": round(flops / best / 1e9, 1),
        "rss_start_gib": round(rss0, 2), "rss_after_weights_gib": round(rss_weights, 2),
        "peak_rss_gib": round(max_rss_gib(), 2), "threads": torch.get_num_threads(),
        "finite": bool(torch.isfinite(out_v).all() and (out_a is None or torch.isfinite(out_a).all())),
    }
    print_row(row, args.json)
    return 0


def print_row(row: dict[str, object], as_json: bool) -> None:
    """The result row: one JSON line, or one aligned ``key: value`` line per field."""
    if as_json:
        print(json.dumps(row))
    else:
        for k, v in row.items():
            print(f"{k:>22}: {v}")


if __name__ == "__main__":
    raise SystemExit(main())
