"""The torch engine's forward over several ranks: CFG-parallel and/or Ulysses sequence parallel.

``create_engine("torch", model=..., parallel=ctx)`` gives a :class:`TorchEngine` whose forward is
:func:`parallel_contract_forward`. Every rank runs the same pipeline (text, noise, the C++ sampling
loop) and hands its engine the whole CFG batch [cond; uncond] of a step. Here a rank keeps its CFG
half (``cfg=2``), runs the DiT on it (its sequence slice with ``sp>1``: ``engine/sequence_parallel.py``,
which builds each rank's slice of the TA-RoPE tables itself), and the halves are all-gathered, so every
rank's engine returns the whole [2B, ...] velocities to its own sampling loop and the latents never
travel.

Why the ranks stay bit-identical (checked by tests/test_parallel.py with ``torch.equal``):
  1. The initial noise comes from the same seeded CPU generator on every rank (``draw_noise``), and
     the text embeddings from the same weights and prompt.
  2. Each step, the velocities a rank hands to its loop are the same bytes on every rank: the CFG
     halves arrive by all-gather, a copy that does no arithmetic; within an SP group the slices are
     all-gathered the same way and every rank then runs the identical heads (same weights, same
     gathered bytes, same shapes, same kernels and thread count - deterministic on one device type).
  3. The update is elementwise fp32 arithmetic in a fixed order (the C++ loop is built with
     ``-ffp-contract=off``; the Python reference does the same ops), so identical latents and
     velocities give identical new latents. By induction the latents agree at every step.
Heterogeneous ranks (a different CPU/GPU model or library build in one launch) could break point 2's
determinism; such a launch is not supported.
"""

from __future__ import annotations

from collections.abc import Mapping

import torch
import torch.distributed as dist

from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.model import JavisDiT
from javisrt.engine.sequence_parallel import check_degree, sequence_parallel_forward
from javisrt.export.contract import AUDIO, CONTEXT, MODALITY_IO, TIMESTEP, VIDEO
from javisrt.runtime.parallel import ParallelContext


def check_parallel(model: JavisDiT, parallel: ParallelContext) -> None:
    """The plan fits the loaded network and its process groups exist (before any step)."""
    plan = parallel.plan
    if plan.model_parallel == 1:
        raise ConfigError("a parallel torch engine needs a --parallel plan with cfg=2 or sp>1")
    check_degree(plan.sp, model.cfg.num_heads)  # the loaded network's heads (a javisrt file may differ)
    if (plan.cfg > 1) != (parallel.cfg_group is not None) or (plan.sp > 1) != (parallel.sp_group is not None):
        raise ConfigError(f"process groups missing for {plan.describe()}: build them with runtime.parallel.session")


def parallel_contract_forward(
    model: JavisDiT, inputs: Mapping[str, torch.Tensor], video_frames: int, parallel: ParallelContext
) -> dict[str, torch.Tensor]:
    """The contract forward (``torch_engine.contract_forward``) of the CFG batch, split over the ranks:
    this rank's CFG half (its sequence slice with sp>1), then the halves all-gathered."""
    batch = inputs[TIMESTEP].shape[0]
    cfg = parallel.plan.cfg
    if batch % cfg:
        raise ShapeError(f"the CFG batch ({batch}) does not split over cfg={cfg} ranks")
    half = batch // cfg
    rows = slice(parallel.cfg_index * half, (parallel.cfg_index + 1) * half)

    def get(name: str) -> torch.Tensor | None:
        x = inputs.get(name)
        return None if x is None else x[rows]

    video, audio, timestep, context = get(VIDEO), get(AUDIO), get(TIMESTEP), get(CONTEXT)
    assert timestep is not None and context is not None
    frames = None if video is not None else video_frames
    if parallel.sp_group is None:
        v, a = model(video, audio, timestep, context, None, frames)
    else:
        v, a = sequence_parallel_forward(model, parallel.sp_group, video, audio, timestep, context, None, frames)
    if parallel.cfg_group is not None:
        v, a = (None if x is None else _gather_batch(x, cfg, parallel.cfg_group) for x in (v, a))
    return {name: x for (_, name), x in zip(MODALITY_IO, (v, a), strict=True) if x is not None}


def _gather_batch(x: torch.Tensor, degree: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, ...] from each rank of ``group`` -> [degree * b, ...] in group-rank (= CFG half) order."""
    x = x.contiguous()
    out = x.new_empty((degree * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x, group=group)
    return out

