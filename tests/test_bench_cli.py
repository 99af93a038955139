"""``javisrt bench``: short CPU runs of each available backend, --compare, exports, pipeline mode, bad flags."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest

from javisrt.runtime import cli

TINY = ["bench", "--preset", "tiny", "--height", "32", "--width", "32", "--frames", "33", "--warmUp", "0",
        "--duration", "0"]


def test_torch_run_with_exports(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    argv = [*TINY, "--iterations", "4", "--exportTimes", str(tmp_path / "t.json"), "--exportProfile",
            str(tmp_path / "p.json"), "--results-csv", str(tmp_path / "r.csv"), "--results-json", str(tmp_path / "r.jsonl")]
    assert cli.main(argv) == 0
    out = capsys.readouterr().out
    assert "=== Performance summary ===" in out and "Timing trace has 4 queries" in out
    assert re.search(r"^Latency: min = [\d.e+-]+ ms, max = .* percentile\(99%\) = [\d.e+-]+ ms$", out, re.M)
    assert re.search(r"Achieved: [\d.e+-]+ TFLOP/s", out)
    times = json.loads((tmp_path / "t.json").read_text())
    assert len(times) == 4 and {"computeMs", "latencyMs", "h2dMs"} <= times[0].keys()
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile[0] == {"count": 4}  # the profile run has exactly --iterations queries, no warm-up
    names = [row["name"] for row in profile[1:]]
    assert names[:2] == ["embed.patch_embedding", "embed.text_embedding"] and "block.1" in names
    assert sum(row["percentage"] for row in profile[1:]) == pytest.approx(100.0)
    row = json.loads((tmp_path / "r.jsonl").read_text().splitlines()[0])
    assert row["backend"] == "torch" and row["dims"]["batch"] == 2 and row["git_commit"]
    assert (tmp_path / "r.csv").read_text().count("\n") == 2


def test_compare_torch_vs_onnxruntime(capsys: pytest.CaptureFixture[str]) -> None:
    """ORT runs the model's exported graph; the interleaved pair gives a ratio."""
    assert cli.main([*TINY, "--iterations", "3", "--backend", "torch", "--compare", "onnxruntime"]) == 0
    out = capsys.readouterr().out
    assert "##### backend torch" in out and "##### backend onnxruntime" in out
    m = re.search(r"=== Compare: onnxruntime / torch latency, (\d+) interleaved pairs: median of per-pair ratios ([\d.e+-]+)", out)
    assert m is not None and int(m.group(1)) == 3 and float(m.group(2)) > 0


def test_onnxruntime_profile(tmp_path: Path) -> None:
    """--exportProfile on ORT: per-node kernel times from a profiled session, trtexec's layout."""
    assert cli.main([*TINY, "--iterations", "2", "--backend", "onnxruntime", "--exportProfile", str(tmp_path / "p.json")]) == 0
    profile = json.loads((tmp_path / "p.json").read_text())
    assert profile[0] == {"count": 2}
    names = [row["name"] for row in profile[1:]]
    assert any("attention" in n.lower() for n in names) and len(names) > 20
    assert sum(row["percentage"] for row in profile[1:]) == pytest.approx(100.0)


def test_pipeline_stages(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--pipeline", "--iterations", "1"]) == 0
    out = capsys.readouterr().out
    for stage in ("text encode", "denoising step", "video decode", "audio decode + vocoder", "mux (MP4 write)"):
        assert re.search(rf"^{re.escape(stage)}\s+[\d.]+\s+[\d.]+\s+\d+$", out, re.M), stage


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--percentile", "90,x"], "--percentile"),
        (["--percentile", "120"], r"\[0, 100\]"),
        (["--resolution", "240p"], "not both"),
        (["--backend", "tensorrt", "--engine-file", "x.plan"], "CUDA GPU"),
        (["--backend", "tensorrt", "--engine-file", "x.plan", "--exportProfile", "p.json"], "IProfiler"),
        (["--backend", "torch", "--engine-file", "x.onnx"], "--engine-file is for"),
        (["--useCudaGraph"], "needs a CUDA device"),
        (["--backend", "onnxruntime", "--useCudaGraph"], "needs a CUDA device"),
        (["--iterations", "0"], "iterations"),
    ],
)
def test_bad_flags_give_one_clear_error(extra: list[str], message: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main([*TINY, *extra]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert re.search(message, err) and err.count("\n") == 1, err


def test_bad_dims(capsys: pytest.CaptureFixture[str]) -> None:
    assert cli.main(["bench", "--preset", "tiny", "--dims", "batch=two"]) == cli.EXIT_ERROR
    assert "name=integer" in capsys.readouterr().err
