"""The CPU/GPU fallback backend: eager :class:`~javisrt.engine.model.JavisDiT` behind the Engine API."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from javisrt.engine.errors import ShapeError
from javisrt.engine.model import JavisDiT
from javisrt.runtime.engine import velocity_outputs


class TorchEngine:
    """Runs the reference model eagerly; ``allocate`` is a no-op (PyTorch allocates per call)."""

    name = "torch"

    def __init__(self, model: JavisDiT, device: torch.device | str = "cpu") -> None:
        self.model: JavisDiT | None = model
        self.device = torch.device(device)

    def load(self) -> None:
        if self.model is None:
            raise RuntimeError("TorchEngine was unloaded")
        self.model = self.model.to(self.device).eval().requires_grad_(False)

    def allocate(self, shapes: Mapping[str, tuple[int, ...]]) -> None:
        del shapes

    @torch.inference_mode()
    def infer(
        self, inputs: Mapping[str, torch.Tensor], *, video_latent_frames: int | None = None
    ) -> dict[str, torch.Tensor]:
        if self.model is None:
            raise RuntimeError("TorchEngine was unloaded")
        for name in ("timestep", "context"):
            if name not in inputs:
                raise ShapeError(f"engine input {name!r} is missing")

        def get(name: str) -> torch.Tensor | None:
            x = inputs.get(name)
            return None if x is None else x.to(self.device)

        video, audio = self.model(
            get("video"),
            get("audio"),
            get("timestep"),
            get("context"),
            None,
            video_latent_frames=video_latent_frames,
        )
        return velocity_outputs(video, audio)

    def unload(self) -> None:
        self.model = None
