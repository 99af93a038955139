"""One JavisDiT v0.1 DiT forward with random weights: wall time and peak memory.

    python -m javisrt.bench.forward_v01 --preset javisdit-v0.1-jav --case 240p-102f --numerics fp32

The model is built on the meta device and materialised once in the target dtype (no second copy);
the inputs follow v01-spec §2 (video latent [B,4,30,30,53], audio [B,8,112,16], T5 [B,300,4096],
priors [B,32,128] x 2). Peak memory is the process' maximum resident set size (weights + activations +
runtime). The sibling of ``bench/forward.py`` (JavisDiT++), whose RSS helper it uses.
"""

from __future__ import annotations

import argparse
import time

import torch

from javisrt.bench.forward import max_rss_gib, print_row
from javisrt.engine.model import Numerics
from javisrt.engine.v01_config import V01_PRESETS, V01Config
from javisrt.engine.v01_model import random_v01_model

# name -> (video latent (T, H, W), audio latent (Ta, F), pixel (height, width)): v01-spec §2
CASES = {
    "240p-102f": ((30, 30, 53), (112, 16), (240, 426)),  # the released 240p / "4s" setting
    "240p-51f": ((15, 30, 53), (56, 16), (240, 426)),  # "2s"
    "tiny": ((3, 6, 7), (8, 16), (48, 56)),
}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="javisdit-v0.1-jav", choices=sorted(V01_PRESETS), help="V01Config preset name")
    p.add_argument("--case", default="240p-102f", choices=sorted(CASES), help="latent shapes (v01-spec §2)")
    p.add_argument("--numerics", default="fp32", choices=[n.value for n in Numerics],
                   help="fp32 = everything fp32; official = the reference's whole-model bf16")
    p.add_argument("--batch", type=int, default=1, help="batch (2 = one CFG step)")
    p.add_argument("--text-tokens", type=int, default=None,
                   help="valid T5 tokens per sample (default: all model_max_length)")
    p.add_argument("--layers", type=int, default=None, help="override depth (quick, smaller runs)")
    p.add_argument("--repeat", type=int, default=1, help="timed forwards after one untimed warm-up (1 = no warm-up)")
    p.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    p.add_argument("--json", action="store_true", help="print one JSON row instead of text")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)

    cfg = V01Config.from_name(args.preset, **({"depth": args.layers} if args.layers else {}))
    (t, h, w), (ta, fa), (height, width) = CASES[args.case]
    rss0 = max_rss_gib()
    t0 = time.perf_counter()
    model = random_v01_model(cfg, args.numerics)
    build_s = time.perf_counter() - t0
    rss_weights = max_rss_gib()

    g = torch.Generator().manual_seed(1)
    b = args.batch
    video = torch.randn(b, cfg.in_channels, t, h, w, generator=g) if cfg.has_video else None
    audio = torch.randn(b, cfg.audio_in_channels, ta, fa, generator=g)
    y = torch.randn(b, cfg.model_max_length, cfg.caption_channels, generator=g)
    mask = torch.zeros(b, cfg.model_max_length, dtype=torch.long)
    mask[:, : args.text_tokens or cfg.model_max_length] = 1
    priors = (torch.randn(b, cfg.spatial_prior_len, cfg.st_prior_channel, generator=g),
              torch.randn(b, cfg.temporal_prior_len, cfg.st_prior_channel, generator=g)) if cfg.has_video else (None, None)
    timestep = torch.full((b,), 990.02)
    times = []
    with torch.inference_mode():
        if args.repeat > 1:
            model(video, audio, timestep, y, mask, 24, height, width, *priors)
        for _ in range(max(args.repeat, 1)):
            t1 = time.perf_counter()
            out = model(video, audio, timestep, y, mask, 24, height, width, *priors)
            times.append(time.perf_counter() - t1)
    tokens_v = 0 if video is None else t * -(-h // cfg.patch_size[1]) * -(-w // cfg.patch_size[2])
    tokens_a = ta // cfg.audio_patch_size[0] * fa // cfg.audio_patch_size[1]
    row = {
        "preset": cfg.name, "layers": cfg.depth, "case": args.case, "numerics": args.numerics, "batch": b,
        "tokens": [tokens_v, tokens_a], "forward_s": round(min(times), 3), "build_s": round(build_s, 2),
        "params": sum(p.numel() for p in model.parameters()),
        "rss_start_gib": round(rss0, 2), "rss_after_weights_gib": round(rss_weights, 2),
        "peak_rss_gib": round(max_rss_gib(), 2), "threads": torch.get_num_threads(),
        "finite": bool(torch.isfinite(out.audio).all() and (out.video is None or torch.isfinite(out.video).all())),
    }
    print_row(row, args.json)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
