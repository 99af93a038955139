"""Communication model of CFG-parallel and Ulysses sequence parallel, per denoising step and rank.

    python -m javisrt.bench.parallel_model [--efficiency 0.4] [--csv rows.csv]

What moves (the code in engine/sequence_parallel.py and runtime/backends/torch_parallel.py), with
L = Lv + La tokens, Ls = ceil(L / sp), d = 1536, N = 30 blocks, b samples per rank and forward
(2 with cfg = 1: the [cond; uncond] batch; 1 with cfg = 2), activations bf16 (2 bytes):
  * sp: per block one all-to-all of q, k, v stacked (3*b*Ls*d) and one of the attention output
    (b*Ls*d); a rank keeps 1/sp of each and sends the rest: 4*b*Ls*d*2 B * (sp-1)/sp per block.
    After the blocks one all-gather of the hidden slices: each rank sends (sp-1)*b*Ls*d*2 B (ring).
  * cfg = 2: one all-gather of the velocities per step: a rank sends its half, b*(16*T*H8*W8 +
    8*Tm4*16)*4 B (fp32), to its one peer.
Time per collective = latency + bytes / link bandwidth (per direction; one link per GPU, NCCL
saturating it); communication does not overlap compute in this implementation, so the step is
compute + communication. Compute per rank = the step's FLOPs (model-spec.md §8, 2 forwards) / ranks,
at the H100 SXM dense BF16 peak (the floor, where communication weighs most) and at ``--efficiency``
of it (perf-anchors: SGLang's 137.5 ms/step on a ~0.9x-size case is ~42% of peak).
"""

from __future__ import annotations

import argparse
import csv
import math
import sys
from collections.abc import Iterator
from dataclasses import asdict, dataclass

from javisrt.engine.config import JavisConfig
from javisrt.engine.flops import forward_flops
from javisrt.engine.rope import TokenGrid
from javisrt.engine.latents import latent_geometry

H100_BF16_PEAK = 989e12  # FLOP/s, dense (perf-anchors.md)
ACT_BYTES = 2  # bf16 activations on the wire
VELOCITY_BYTES = 4  # fp32 velocities


@dataclass(frozen=True)
class Link:
    name: str
    bandwidth: float  # bytes/s per direction
    latency: float  # s per collective (assumed)


LINKS = (
    Link("NVLink (H100 SXM, 450 GB/s)", 450e9, 10e-6),
    Link("PCIe Gen5 x16 (64 GB/s)", 64e9, 25e-6),
)


@dataclass(frozen=True)
class Case:
    name: str
    num_frames: int
    height: int
    width: int

    def grid(self, cfg: JavisConfig) -> tuple[TokenGrid, int]:
        """Token grid and the per-sample velocity elements (video + audio latents) of this request."""
        geo = latent_geometry(self.num_frames, self.height, self.width)
        assert geo.video is not None and geo.audio is not None
        _, t, h, w = geo.video
        _, tm4, f = geo.audio
        pt, ph, pw = cfg.patch_size
        pa, pm = cfg.audio_patch_size
        grid = TokenGrid((t // pt, h // ph, w // pw), (tm4 // pa, f // pm))
        return grid, math.prod(geo.video) + math.prod(geo.audio)


CASES = (Case("240p 4 s (65 f, 240x426)", 65, 240, 426), Case("480p 5 s (81 f, 480x854)", 81, 480, 854))


@dataclass(frozen=True)
class Traffic:
    """Bytes one rank sends per denoising step, and the number of collectives it takes part in."""

    bytes_sent: float
    collectives: int

    def seconds(self, link: Link) -> float:
        return self.collectives * link.latency + self.bytes_sent / link.bandwidth


def sequence_parallel_traffic(
    cfg: JavisConfig, num_tokens: int, batch: int, sp: int, act_bytes: int = ACT_BYTES
) -> Traffic:
    """One forward of ``batch`` samples over ``sp`` ranks: the all-to-alls of every block + the final gather."""
    if sp == 1:
        return Traffic(0.0, 0)
    ls = math.ceil(num_tokens / sp)
    slice_bytes = batch * ls * cfg.dim * act_bytes
    per_block = 4 * slice_bytes * (sp - 1) / sp  # q, k, v out and the attention output back
    gather = (sp - 1) * slice_bytes
    return Traffic(cfg.num_layers * per_block + gather, 2 * cfg.num_layers + 1)


def step_traffic(cfg: JavisConfig, grid: TokenGrid, velocity_numel: int, cfg_degree: int, sp: int) -> Traffic:
    """One denoising step (the CFG batch of 2 samples) on ``cfg_degree * sp`` ranks."""
    batch = 2 // cfg_degree  # samples per rank and forward
    seq = sequence_parallel_traffic(cfg, grid.num_tokens, batch, sp)
    if cfg_degree == 1:
        return seq
    halves = Traffic(batch * velocity_numel * VELOCITY_BYTES * (cfg_degree - 1), 2)  # video and audio gathers
    return Traffic(seq.bytes_sent + halves.bytes_sent, seq.collectives + halves.collectives)


@dataclass(frozen=True)
class Row:
    case: str
    scheme: str
    ranks: int
    tokens: int
    mbytes_sent_per_step_rank: float
    collectives_per_step: int
    link: str
    comm_ms: float
    compute_ms_peak: float
    compute_ms_eff: float
    comm_share_peak: float
    comm_share_eff: float
    runnable: bool  # sp divides the 12 heads


def rows(cfg: JavisConfig, efficiency: float, schemes: tuple[tuple[int, int], ...]) -> Iterator[Row]:
    for case in CASES:
        grid, vel = case.grid(cfg)
        step_flops = forward_flops(cfg, grid, batch=2).total
        for cfg_degree, sp in schemes:
            ranks = cfg_degree * sp
            traffic = step_traffic(cfg, grid, vel, cfg_degree, sp)
            peak = step_flops / ranks / H100_BF16_PEAK
            eff = peak / efficiency
            for link in LINKS:
                comm = traffic.seconds(link)
                yield Row(
                    case.name, f"cfg={cfg_degree},sp={sp}", ranks, grid.num_tokens, traffic.bytes_sent / 1e6,
                    traffic.collectives, link.name, comm * 1e3, peak * 1e3, eff * 1e3,
                    comm / (comm + peak), comm / (comm + eff), cfg.num_heads % sp == 0,
                )  # fmt: skip


def threshold_degree(cfg: JavisConfig, case: Case, link: Link, efficiency: float, share: float = 0.10) -> int | None:
    """Smallest sp (cfg = 1) at which communication exceeds ``share`` of the step, up to sp = 64."""
    grid, vel = case.grid(cfg)
    step_flops = forward_flops(cfg, grid, batch=2).total
    for sp in range(2, 65):
        comm = step_traffic(cfg, grid, vel, 1, sp).seconds(link)
        compute = step_flops / sp / (H100_BF16_PEAK * efficiency)
        if comm / (comm + compute) > share:
            return sp
    return None


SCHEMES = ((1, 2), (1, 4), (1, 8), (2, 1), (2, 2), (2, 4))


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--preset", default="javisdit-v1.0", help="network preset (default javisdit-v1.0)")
    p.add_argument("--efficiency", type=float, default=0.4, help="achieved fraction of the BF16 peak (default 0.4)")
    p.add_argument("--csv", help="also write the rows to this CSV file")
    args = p.parse_args(argv)
    if not 0 < args.efficiency <= 1:
        p.error("--efficiency must be in (0, 1]")
    cfg = JavisConfig.from_name(args.preset)
    table = list(rows(cfg, args.efficiency, SCHEMES))
    eff = f"{args.efficiency:.0%}"
    out = sys.stdout
    out.write(
        f"Communication per denoising step and rank, {cfg.name} (d={cfg.dim}, {cfg.num_layers} blocks, "
        f"{cfg.num_heads} heads), bf16 activations, CFG batch 2.\n"
        "comm = collectives x latency + bytes / bandwidth (no overlap); compute = step FLOPs / ranks at the "
        f"H100 BF16 peak (989 TFLOP/s) and at {eff} of it. share = comm / (comm + compute).\n\n"
    )
    out.write(f"| case | scheme | ranks | MB sent/step/rank | collectives | link | comm ms | compute ms (peak / {eff}) "
              f"| comm share (peak / {eff}) |\n|---|---|---|---|---|---|---|---|---|\n")  # fmt: skip
    for r in table:
        note = "" if r.runnable else " (sp does not divide 12 heads: model only)"
        out.write(
            f"| {r.case} | {r.scheme}{note} | {r.ranks} | {r.mbytes_sent_per_step_rank:,.1f} | {r.collectives_per_step} "
            f"| {r.link} | {r.comm_ms:.2f} | {r.compute_ms_peak:.1f} / {r.compute_ms_eff:.1f} "
            f"| {r.comm_share_peak:.1%} / {r.comm_share_eff:.1%} |\n"
        )
    out.write("\nSmallest sp (cfg=1) at which communication exceeds 10% of the step:\n")
    for case in CASES:
        for link in LINKS:
            found = [threshold_degree(cfg, case, link, e) for e in (1.0, args.efficiency)]
            text = ", ".join(f"{'none up to 64' if k is None else f'sp={k}'} ({label})"
                             for k, label in zip(found, ("at peak", f"at {eff}"), strict=True))  # fmt: skip
            out.write(f"  {case.name}, {link.name}: {text}\n")
    if args.csv:
        with open(args.csv, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(asdict(table[0])))
            writer.writeheader()
            writer.writerows(asdict(r) for r in table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
