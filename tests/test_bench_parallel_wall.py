"""bench/parallel_wall.py in its one-process mode (the torchrun mode runs the same engine code that
tests/test_parallel.py checks for correctness)."""

from __future__ import annotations

import json

import pytest
import torch

from javisrt.bench import parallel_wall


def test_one_process_row(capsys: pytest.CaptureFixture[str]) -> None:
    assert parallel_wall.main(["--preset", "tiny", "--case", "tiny", "--layers", "1", "--repeat", "2"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert (row["scheme"], row["ranks"], row["layers"], row["threads_per_rank"]) == ("1 process", 1, 1, torch.get_num_threads())
    assert len(row["step_s"]) == 2 and row["step_s_median"] > 0
