"""Wall time of one CFG step of the DiT (a [cond; uncond] forward) on one process or on parallel ranks.

    python -m javisrt.bench.parallel_wall --layers 2 --case 240p-33f                # one process
    torchrun --standalone --nproc_per_node 2 -m javisrt.bench.parallel_wall \\
        --parallel sp=2 --layers 2 --case 240p-33f                                  # sp=2 (gloo on CPU)

Random weights (``random_model``) at the preset's width, ``--layers`` blocks, latent shapes from
``bench/forward.py``'s CASES. One untimed warm-up, then ``--repeat`` steps; every step starts after a
barrier and ends when the slowest rank returns (the max over ranks is reported). torchrun gives each
rank OMP_NUM_THREADS=1; run the single process with ``--threads`` equal to the ranks' total to
compare on the same cores. On a CPU this is a correctness figure (the parallel path runs and what it
costs in a shared-core setting), not a speed-up claim: the ranks share the cores and memory bandwidth.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time

import torch
import torch.distributed as dist

from javisrt.bench.forward import CASES
from javisrt.engine.config import JavisConfig
from javisrt.engine.model import Numerics, random_model
from javisrt.runtime.backends import create_engine
from javisrt.runtime.denoise_session import DenoiseSession
from javisrt.runtime.parallel import LaunchEnv, plan_for_launch, session


def step_inputs(cfg: JavisConfig, case: str) -> dict[str, torch.Tensor]:
    (t, h, w), tm4 = CASES[case]
    g = torch.Generator().manual_seed(1)
    return {
        "video": torch.randn((2, cfg.in_channels, t, h, w), generator=g),
        "audio": torch.randn((2, cfg.audio_in_channels, tm4, 16), generator=g),
        "timestep": torch.tensor([937.5, 937.5]),
        "context": torch.randn((2, cfg.text_len, cfg.text_dim), generator=g),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="javisdit-v1.0", help="network preset (default javisdit-v1.0)")
    p.add_argument("--layers", type=int, default=2, help="blocks (default 2; the preset's count is full size)")
    p.add_argument("--case", default="240p-33f", choices=sorted(CASES), help="latent shapes (default 240p-33f)")
    p.add_argument("--numerics", default="fp32", choices=[n.value for n in Numerics], help="default fp32")
    p.add_argument("--parallel", metavar="cfg=C,sp=K", help="degrees, under torchrun (default: one process)")
    p.add_argument("--repeat", type=int, default=3, help="timed steps after one warm-up (default 3)")
    p.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's, 1 per rank under torchrun)")
    args = p.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    cfg = JavisConfig.from_name(args.preset, num_layers=args.layers)
    launch = LaunchEnv.from_environ(os.environ)
    plan = plan_for_launch(args.parallel, launch.world_size, cfg.num_heads)
    if plan.data > 1:
        p.error("under torchrun give --parallel (this benchmark times one step, not a prompt list)")
    model = random_model(cfg, args.numerics)
    inputs = step_inputs(cfg, args.case)
    times = []
    with session(plan, launch, "cpu") as ctx:
        engine = create_engine("torch", model=model, parallel=ctx if ctx.distributed else None)
        latents = [inputs["video"], inputs["audio"]]
        request = DenoiseSession(engine, inputs["context"], {"video": latents[0].shape[1:], "audio": latents[1].shape[1:]})
        for i in range(args.repeat + 1):
            if ctx.distributed:
                dist.barrier()
            start = time.perf_counter()
            request(latents, inputs["timestep"])
            elapsed = torch.tensor([time.perf_counter() - start], dtype=torch.float64)
            if ctx.distributed:
                dist.all_reduce(elapsed, op=dist.ReduceOp.MAX)
            if i:  # the first step is the warm-up
                times.append(float(elapsed))
        if ctx.rank == 0:
            print(json.dumps({
                "preset": cfg.name, "layers": cfg.num_layers, "case": args.case, "numerics": args.numerics,
                "scheme": plan.describe() if ctx.distributed else "1 process", "ranks": ctx.world_size,
                "threads_per_rank": torch.get_num_threads(), "step_s_median": statistics.median(times),
                "step_s": times, "cpu": os.cpu_count(),
            }))  # fmt: skip
    return 0


if __name__ == "__main__":
    sys.exit(main())
