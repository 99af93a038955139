"""bench/parallel_model.py: its byte counts against what the sequence-parallel forward actually sends,
and its compute against model-spec.md §8."""

from __future__ import annotations

from typing import Any

import pytest
import torch
from _parallel_harness import AUDIO_SHAPE, NUM_TOKENS, VIDEO_SHAPE, hd128_config

from javisrt.bench import parallel_model
from javisrt.engine import sequence_parallel
from javisrt.engine.config import JavisConfig
from javisrt.engine.flops import forward_flops
from javisrt.engine.model import random_model


class CountingCollectives:
    """Stands in for torch.distributed as seen by rank 0 of ``degree``: the collectives copy their input
    (shapes right, values not) and count the bytes rank 0 would send."""

    def __init__(self, degree: int) -> None:
        self.degree = degree
        self.sent = 0.0
        self.calls = 0

    def get_world_size(self, group: Any) -> int:
        return self.degree

    def get_rank(self, group: Any) -> int:
        return 0

    def all_to_all_single(self, out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
        out.copy_(inp)
        self.sent += inp.numel() * inp.element_size() * (self.degree - 1) / self.degree  # all chunks but its own
        self.calls += 1

    def all_gather_single(self, out: torch.Tensor, inp: torch.Tensor, group: Any) -> None:
        out.copy_(inp.repeat(self.degree, *([1] * (inp.dim() - 1))))
        self.sent += (self.degree - 1) * inp.numel() * inp.element_size()  # ring: every chunk but its last
        self.calls += 1


@pytest.mark.parametrize("degree", [2, 3])
def test_traffic_formula_matches_the_forward(monkeypatch: pytest.MonkeyPatch, degree: int) -> None:
    cfg = hd128_config(6, num_layers=2)
    fake = CountingCollectives(degree)
    monkeypatch.setattr(sequence_parallel, "dist", fake)
    g = torch.Generator().manual_seed(0)
    video, audio = torch.randn((2, *VIDEO_SHAPE), generator=g), torch.randn((2, *AUDIO_SHAPE), generator=g)
    context = torch.randn((2, cfg.text_len, cfg.text_dim), generator=g)
    with torch.inference_mode():
        group: Any = object()  # the fake collectives ignore it
        sequence_parallel.sequence_parallel_forward(random_model(cfg), group, video, audio, torch.tensor([1.0, 2.0]), context)
    model = parallel_model.sequence_parallel_traffic(cfg, NUM_TOKENS, batch=2, sp=degree, act_bytes=4)
    assert (fake.calls, fake.sent) == (model.collectives, pytest.approx(model.bytes_sent, rel=1e-12))


def test_compute_is_model_spec_per_step() -> None:
    """Per step with CFG: 57.9 TFLOP at 240p/4 s and 619 TFLOP at 480p/5 s (model-spec.md §8)."""
    cfg = JavisConfig.from_name("javisdit-v1.0")
    steps = [forward_flops(cfg, case.grid(cfg)[0], batch=2).total for case in parallel_model.CASES]
    assert steps[0] == pytest.approx(57.9e12, rel=2e-3) and steps[1] == pytest.approx(619e12, rel=2e-3)
    assert [case.grid(cfg)[0].num_tokens for case in parallel_model.CASES] == [7301, 34532]


def test_table_and_threshold(capsys: pytest.CaptureFixture[str], tmp_path: Any) -> None:
    assert parallel_model.main(["--csv", str(tmp_path / "rows.csv")]) == 0
    out = capsys.readouterr().out
    assert out.count("| 240p 4 s") == 12 and out.count("| 480p 5 s") == 12
    assert "Smallest sp (cfg=1) at which communication exceeds 10% of the step" in out
    # cfg=2 sends one half of the fp32 velocities per step: 240p latents 16x17x30x54 + 8x104x16 floats
    cfg = JavisConfig.from_name("javisdit-v1.0")
    grid, numel = parallel_model.CASES[0].grid(cfg)
    assert numel == 16 * 17 * 30 * 54 + 8 * 104 * 16
    assert parallel_model.step_traffic(cfg, grid, numel, 2, 1).bytes_sent == numel * 4
