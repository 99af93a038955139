"""bench/fp8_fidelity.py on a tiny one-head network (Triton under the interpreter, fp32): the step policy
switches op sets per step, and a policy with every step on BF16 reproduces the reference run exactly."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from javisrt.bench import fp8_fidelity
from javisrt.engine.errors import ConfigError


def test_policies_and_report(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "fid.json"
    fp8_fidelity.main(["--steps", "2", "--seeds", "1", "--calibration", "amax-forward", "--calib-prompts", "1",
                       "--calib-steps", "2", "--policies", "all-fp8,bf16-first,bf16-first-last", "--out", str(out)])  # fmt: skip
    report = json.loads(out.read_text())
    assert "cos min" in capsys.readouterr().out
    pol = report["policies"]
    assert pol["bf16-first-last"]["bf16_steps"] == [0, 1] and pol["bf16-first"]["bf16_steps"] == [0]
    for m in ("video", "audio"):
        # 2 steps, both on the reference op set: the same computation as the reference run (PSNR > 300 dB: RMSE < 1e-14)
        assert pol["bf16-first-last"][m]["cosine_min"] == pytest.approx(1.0, abs=1e-12) and pol["bf16-first-last"][m]["psnr_db_min"] > 300
        # FP8 on some steps: close to, but not, the reference; more FP8 steps, further away
        assert 0.99 < pol["all-fp8"][m]["cosine_min"] < 1.0 and 20 < pol["all-fp8"][m]["psnr_db_min"] < 300
        assert pol["bf16-first"][m]["psnr_db_min"] > pol["all-fp8"][m]["psnr_db_min"]
    assert report["calibration"]["description"]["embeddings"] == "random stand-in embeddings"


def test_unknown_policy() -> None:
    with pytest.raises(ConfigError, match="unknown policy"):
        fp8_fidelity.parse_args(["--policies", "all-fp8,bf16-middle"])
