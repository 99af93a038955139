"""JavisDiT v0.1 components: peak RSS of building each real-size one on the meta device, and the
per-stage wall time of one tiny end-to-end run.

    python -m javisrt.bench.v01_components --all            # every component, one child process each
    python -m javisrt.bench.v01_components --component t5   # one, in this process
    python -m javisrt.bench.v01_components --tiny-run       # text / prior / denoise / decode times

Meta building allocates no weights, so the RSS is the import + module-construction cost a loader pays
before ``load_state_dict(assign=True)``; the parameter counts come from the same modules.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from collections.abc import Callable

import torch

from javisrt.bench.forward import max_rss_gib


def _dit(name: str) -> Callable[[], torch.nn.Module]:
    def build() -> torch.nn.Module:
        from javisrt.engine.v01_config import V01Config
        from javisrt.engine.v01_model import build_v01_model

        return build_v01_model(V01Config.from_name(name), "meta")

    return build


def _prior() -> torch.nn.Module:
    from javisrt.engine.st_prior import build_st_prior
    from javisrt.engine.v01_config import STPriorConfig

    return build_st_prior(STPriorConfig.from_name("javisdit-v0.1-prior"), "meta")


def _imagebind() -> torch.nn.Module:
    from javisrt.runtime.imagebind_text import ImageBindTextConfig, ImageBindTextTrunk

    with torch.device("meta"):
        return ImageBindTextTrunk(ImageBindTextConfig.from_name("imagebind-huge"))


def _t5() -> torch.nn.Module:
    from transformers import T5Config, T5EncoderModel

    # DeepFloyd/t5-v1_1-xxl: d_model 4096, 64 heads of 64, d_ff 10240 gated-GELU, 24 layers, vocab 32128
    cfg = T5Config(vocab_size=32128, d_model=4096, d_kv=64, d_ff=10240, num_layers=24, num_heads=64,
                   feed_forward_proj="gated-gelu")
    with torch.device("meta"):
        return T5EncoderModel(cfg)


def _vae() -> torch.nn.Module:
    from javisrt.runtime.opensora_vae import build_opensora_vae

    return build_opensora_vae(device="meta")


COMPONENTS: dict[str, Callable[[], torch.nn.Module]] = {
    "dit-jav": _dit("javisdit-v0.1-jav"),
    "dit-audio": _dit("javisdit-v0.1-audio"),
    "prior": _prior,
    "imagebind": _imagebind,
    "t5": _t5,
    "vae": _vae,
}


def measure(name: str) -> dict[str, object]:
    rss0 = max_rss_gib()
    t0 = time.perf_counter()
    module = COMPONENTS[name]()
    seconds = time.perf_counter() - t0
    return {"component": name, "params": sum(p.numel() for p in module.parameters()), "build_s": round(seconds, 2),
            "rss_before_gib": round(rss0, 3), "peak_rss_gib": round(max_rss_gib(), 3)}


def tiny_run(frames: int = 17, size: int = 64, steps: int = 10) -> dict[str, object]:
    from javisrt.runtime.v01_demo import build_tiny_v01_pipeline
    from javisrt.runtime.v01_pipeline import V01GenerationConfig

    t0 = time.perf_counter()
    pipe = build_tiny_v01_pipeline()
    build_s = time.perf_counter() - t0
    result = pipe("a drummer plays on a wooden stage", V01GenerationConfig(num_frames=frames, height=size, width=size,
                                                                           steps=steps))
    return {"frames": frames, "size": size, "steps": steps, "build_s": round(build_s, 3), "sampler": result.sampler,
            **{k: round(v, 3) for k, v in result.timings.items()}}


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--component", choices=sorted(COMPONENTS), help="build one real-size component on meta, here")
    g.add_argument("--all", action="store_true", help="every component, each in a fresh child process")
    g.add_argument("--tiny-run", action="store_true", help="one tiny end-to-end run: per-stage wall time")
    p.add_argument("--only", nargs="*", choices=sorted(COMPONENTS), help="with --all: these components only")
    p.add_argument("--steps", type=int, default=10, help="--tiny-run sampling steps (default 10)")
    args = p.parse_args(argv)
    if args.component:
        rows = [measure(args.component)]
    elif args.tiny_run:
        rows = [tiny_run(steps=args.steps)]
    else:
        rows = []
        for name in args.only or sorted(COMPONENTS):
            out = subprocess.run([sys.executable, "-m", "javisrt.bench.v01_components", "--component", name],
                                 check=True, capture_output=True, text=True).stdout
            rows.append(json.loads(out.strip().splitlines()[-1]))
    for row in rows:
        print(json.dumps(row))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
