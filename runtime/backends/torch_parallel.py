"""The eager torch backend over several ranks: CFG-parallel and/or Ulysses sequence parallel.

Every rank runs the same pipeline (text, noise, the C++ sampling loop) and calls :meth:`infer` with
the whole CFG batch [cond; uncond] of a step. Here a rank keeps its CFG half (``cfg=2``), runs the DiT
on it (its sequence slice with ``sp>1``: ``engine/sequence_parallel.py``), and the halves are
all-gathered, so every rank returns the whole [2B, ...] velocities to its own sampling loop and the
latents never travel.

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
from javisrt.runtime.engine import velocity_outputs
from javisrt.runtime.parallel import ParallelContext


class ParallelTorchEngine:
    """The :class:`~javisrt.runtime.backends.PipelineBackend` for ``--parallel cfg=C,sp=K`` ranks."""

    name = "torch-parallel"

    def __init__(self, model: JavisDiT, device: torch.device | str = "cpu", *, parallel: ParallelContext) -> None:
        plan = parallel.plan
        if plan.model_parallel == 1:
            raise ConfigError("torch-parallel needs a --parallel plan with cfg=2 or sp>1")
        check_degree(plan.sp, model.cfg.num_heads)  # the loaded network's heads (a javisrt file may differ)
        if (plan.cfg > 1) != (parallel.cfg_group is not None) or (plan.sp > 1) != (parallel.sp_group is not None):
            raise ConfigError(f"process groups missing for {plan.describe()}: build them with runtime.parallel.session")
        self.model: JavisDiT | None = model
        self.device = torch.device(device)
        self.parallel = parallel

    def load(self) -> None:
        if self.model is None:
            raise RuntimeError("ParallelTorchEngine was unloaded")
        self.model = self.model.to(self.device).eval().requires_grad_(False)

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        del shapes

    def _forward(
        self, inputs: Mapping[str, torch.Tensor], rows: slice, video_latent_frames: int | None
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        assert self.model is not None

        def get(name: str) -> torch.Tensor | None:
            x = inputs.get(name)
            return None if x is None else x[rows].to(self.device)

        video, audio, timestep, context = get("video"), get("audio"), get("timestep"), get("context")
        assert timestep is not None and context is not None  # checked by infer
        if self.parallel.sp_group is None:
            return self.model(video, audio, timestep, context, None, video_latent_frames)  # type: ignore[no-any-return]
        return sequence_parallel_forward(
            self.model, self.parallel.sp_group, video, audio, timestep, context, None, video_latent_frames
        )

    @torch.inference_mode()
    def infer(
        self, inputs: Mapping[str, torch.Tensor], *, video_latent_frames: int | None = None
    ) -> dict[str, torch.Tensor]:
        """inputs as the torch backend's, batch [cond; uncond] -> whole velocities on every rank."""
        if self.model is None:
            raise RuntimeError("ParallelTorchEngine was unloaded")
        for name in ("timestep", "context"):
            if name not in inputs:
                raise ShapeError(f"engine input {name!r} is missing")
        batch = inputs["timestep"].shape[0]
        cfg = self.parallel.plan.cfg
        if batch % cfg:
            raise ShapeError(f"the CFG batch ({batch}) does not split over cfg={cfg} ranks")
        half = batch // cfg
        c = self.parallel.cfg_index
        video, audio = self._forward(inputs, slice(c * half, (c + 1) * half), video_latent_frames)
        if self.parallel.cfg_group is not None:
            video, audio = (None if v is None else _gather_batch(v, cfg, self.parallel.cfg_group) for v in (video, audio))
        return velocity_outputs(video, audio)

    def unload(self) -> None:
        self.model = None


def _gather_batch(x: torch.Tensor, degree: int, group: dist.ProcessGroup) -> torch.Tensor:
    """[b, ...] from each rank of ``group`` -> [degree * b, ...] in group-rank (= CFG half) order."""
    x = x.contiguous()
    out = x.new_empty((degree * x.shape[0], *x.shape[1:]))
    dist.all_gather_single(out, x, group=group)
    return out


def create_for_pipeline(
    model: JavisDiT, device: torch.device | str = "cpu", *, parallel: ParallelContext
) -> ParallelTorchEngine:
    """Factory with the signature of ``runtime/backends/__init__.py``'s BACKENDS entries."""
    return ParallelTorchEngine(model, device, parallel=parallel)
