"""bench/gpu_proof.py on the CPU: every part's logic (tiny shapes, kernels under the interpreter), the
files it writes, the deadline, and that it runs and collects without the packages the borrowed GPU
machine's image lacks (diffusers, av, modelopt, ...: :data:`MISSING_ON_GPU_IMAGE`)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from javisrt.bench import gpu_proof

REPO = Path(__file__).resolve().parents[1]
ENV_KEYS = {"part", "name", "status", "note", "seconds", "provenance", "results", "device", "tiny", "estimate_s"}
RESULT_KEYS = {
    0: {"versions", "device", "sampler", "ceilings"},
    1: {"fp8_attention", "fp8_ffn", "pytest"},
    2: {"self_attention", "cross_attention", "ffn", "fp8", "adaln", "ceiling_tflops", "timer"},
    3: {"runs", "tflop", "tokens", "preset"},
    4: {"loop_equals_reference", "host_overhead", "denoise"},
}


# Import names of our requirements that the borrowed GPU machine's image lacks (its package list:
# .library/device/KINDS.md, read 2026-11-17): diffusers, av, nvidia-modelopt, the TensorRT-side ONNX
# tools, the serving stack and the v0.1 text tools.
MISSING_ON_GPU_IMAGE = frozenset({
    "diffusers", "av", "modelopt", "onnx_graphsurgeon", "polygraphy", "onnxslim", "onnxconverter_common",
    "onnxruntime_extensions", "lief", "ftfy", "fastapi", "uvicorn", "multipart", "python_multipart", "clip",
    "bs4", "soupsieve", "openai", "tensorrt",
})

# ``None`` in sys.modules is what an absent package looks like to both ``import`` (ModuleNotFoundError)
# and ``importlib.util.find_spec`` (None), which the lazy-import probes use.
BLOCKER = f"import sys\nfor name in {sorted(MISSING_ON_GPU_IMAGE)!r}:\n    sys.modules[name] = None\n"


def _env(extra_path: Path | None = None) -> dict[str, str]:
    env = dict(os.environ)
    paths = [str(extra_path)] if extra_path else []
    env["PYTHONPATH"] = os.pathsep.join([*paths, env.get("PYTHONPATH", "")])
    env["TRITON_INTERPRET"] = "1"
    return env


def test_cpu_tiny_run_writes_every_part(tmp_path: Path) -> None:
    """The CI run of the proof: each part runs its logic and writes its JSON; at most 7 files, all in
    --out; summary.md is printed last. Run without the packages the GPU machine's image lacks."""
    (tmp_path / "sitecustomize.py").write_text(BLOCKER)
    out = tmp_path / "proof"
    cmd = [sys.executable, "-m", "javisrt.bench.gpu_proof", "--device", "cpu", "--tiny", "--out", str(out),
           "--deadline", "150", "--steps", "2", "--ops", "torch,triton,triton-fp8"]  # fmt: skip
    proc = subprocess.run(cmd, cwd=REPO, env=_env(tmp_path), capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    files = sorted(p.name for p in out.iterdir())
    assert len(files) <= 7 and all(p.is_file() for p in out.iterdir())
    assert set(files) == {*gpu_proof.PART_FILES.values(), gpu_proof.JUNIT, gpu_proof.SUMMARY}
    for index, name in gpu_proof.PART_FILES.items():
        record = json.loads((out / name).read_text())
        assert ENV_KEYS <= set(record), name
        assert record["part"] == index and record["status"] == "ok", (name, record["status"], record["note"])
        assert RESULT_KEYS[index] <= set(record["results"]), name
    assert proc.stdout.rstrip().endswith((out / gpu_proof.SUMMARY).read_text().rstrip().splitlines()[-1])
    kernels = json.loads((out / gpu_proof.PART_FILES[2]).read_text())["results"]
    assert kernels["self_attention"]["ours"]["status"] == "ok" and kernels["self_attention"]["ours"]["ms"] > 0
    sampling = json.loads((out / gpu_proof.PART_FILES[4]).read_text())["results"]
    assert sampling["loop_equals_reference"]["euler"]["bit_exact"]
    assert sampling["denoise"]["torch"]["steps"] == 2
    assert sampling["denoise"]["triton-fp8"]["status"].startswith("skipped") or "ms_per_step_median" in sampling["denoise"]["triton-fp8"]
    correctness = json.loads((out / gpu_proof.PART_FILES[1]).read_text())["results"]
    assert correctness["pytest"]["failures"] == 0 and correctness["pytest"]["tests"] >= 1


def test_parts_past_the_deadline_are_skipped_with_a_note(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """A part that would pass the deadline does not start; its JSON says so and how to rerun it."""
    out = tmp_path / "late"
    assert gpu_proof.main(["--device", "cpu", "--tiny", "--out", str(out), "--deadline", "0", "--parts", "1,3"]) == 0
    assert sorted(p.name for p in out.iterdir()) == ["part1_correctness.json", "part3_forward.json", "summary.md"]
    for name in ("part1_correctness.json", "part3_forward.json"):
        record = json.loads((out / name).read_text())
        assert record["status"] == "skipped" and "--parts" in record["note"] and record["results"] == {}
    assert "skipped" in capsys.readouterr().out


def test_bad_arguments_exit() -> None:
    for argv in (["--parts", "7"], ["--parts", "x"], ["--ops", ","], ["--steps", "0"]):
        with pytest.raises(SystemExit):
            gpu_proof.parse_args(["--out", "x", *argv])


def test_gpu_marked_tests_are_found_statically() -> None:
    ids = gpu_proof.pytest_node_ids(tiny=False)
    assert "tests/test_sampler.py::test_cuda_loop_equals_reference" in ids
    assert "tests/test_device_path.py::test_device_loop_equals_host_loop" in ids
    assert "tests/test_sampler.py::test_cuda_entry_points_without_gpu" not in ids  # its name says gpu; no marker
    assert all((REPO / i.split("::")[0]).exists() for i in ids)


def test_proof_imports_and_gpu_tests_collect_without_what_the_gpu_image_lacks(tmp_path: Path) -> None:
    """The borrowed machine lacks diffusers, av, modelopt and the rest of :data:`MISSING_ON_GPU_IMAGE`:
    the proof's modules import and every test file it runs collects (a sitecustomize hides them)."""
    (tmp_path / "sitecustomize.py").write_text(textwrap.dedent(BLOCKER))
    env = _env(tmp_path)
    check = "import javisrt.bench.gpu_proof, javisrt.runtime.pipeline, javisrt.runtime.cli\ntry:\n    import diffusers\nexcept ImportError:\n    print('blocked')"
    proc = subprocess.run([sys.executable, "-c", check], cwd=REPO, env=env, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0 and "blocked" in proc.stdout, proc.stderr[-3000:]
    ids = gpu_proof.pytest_node_ids(tiny=False)
    cmd = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", *ids]
    proc = subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    assert "error" not in proc.stdout.lower()


def test_summary_of_a_gpu_shaped_run() -> None:
    """The summary and the goal table from records shaped like a CUDA run's (which CI cannot produce)."""
    ok = {"status": "ok"}
    records = [
        {"part": 0, "name": "env", "status": "ok", "seconds": 3, "note": "", "results": {
            "device": {"name": "NVIDIA H200"}, "versions": {"torch": "2.11.0", "triton": "3.6.0"},
            "ceilings": {"matmul": {"n": 8192, "dtype": "torch.bfloat16", "tflops": 780.0}, "copy": {"gbps": 4300.0}}}},
        {"part": 1, "name": "correctness", "status": "failed", "seconds": 90, "note": "failed: pytest exit 1", "results": {
            "fp8_attention": {**ok, "max_err": 1e-3, "atol": 2e-3},
            "pytest": {"status": "failed: pytest exit 1", "tests": 20, "failures": 1, "errors": 0, "skipped": 2}}},
        {"part": 2, "name": "kernels", "status": "ok", "seconds": 50, "note": "", "results": {
            "self_attention": {"ours": {**ok, "ms": 1.2, "tflops": 540.0, "pct_matmul_ceiling": 69.2},
                               "rope+sdpa_flash": {**ok, "ms": 1.5, "tflops": 432.0, "pct_matmul_ceiling": 55.4}},
            "adaln": {"ours": {**ok, "ms": 0.02, "gbps": 3000.0, "pct_copy_ceiling": 70.0}}}},
        {"part": 3, "name": "forward", "status": "ok", "seconds": 40, "note": "", "results": {"tflop": 57.8, "runs": {
            "torch/graph": {**ok, "ms": 120.0, "tflops": 481.0, "pct_matmul_ceiling": 61.7},
            "triton/graph": {**ok, "ms": 100.0, "tflops": 578.0, "pct_matmul_ceiling": 74.1,
                             "rel_diff_vs_torch": {"video_velocity": 3e-3}},
            "triton-fp8/eager": {"status": "skipped: op set not available"}}}},
        {"part": 4, "name": "sampling", "status": "ok", "seconds": 30, "note": "", "results": {
            "loop_equals_reference": {"euler": {"bit_exact": True, "loop": "sample_cuda (graph replay)"}},
            "host_overhead": {"max_inflight_2": {"us_per_step": 12.5}},
            "denoise": {"triton": {**ok, "loop": "device", "cuda_graph": True, "steps": 50, "total_s": 5.1,
                                   "ms_per_step_median": 101.0},
                        "triton-fp8": {"status": "skipped: op set not available"}}}},
    ]
    opts = gpu_proof.parse_args(["--out", "x"])
    text = gpu_proof.summary_markdown(records, opts, 213.0)
    assert "| kernels | self_attention: ours | 1.200 ms, 540.0 TFLOP/s, 69% of matmul |" in text
    assert "| BF16 50-step CFG, ms/step (device loop) | <= 90 | 101 ms | NO |" in text
    assert "| BF16 forward (graph), % of the matmul ceiling | >= 65% | 74.1 % | yes |" in text
    assert "| device-loop host overhead per step | < 20 us | 12.5 us | yes |" in text
    assert "| attention: SDPA-flash ms / ours ms | >= 1 | 1.25 x | yes |" in text
    assert "| FP8 50-step CFG, ms/step | <= 70 | not measured | - |" in text
    assert "20 tests, 1 failures" in text


def test_latent_fidelity() -> None:
    import math

    import torch

    ref = torch.tensor([0.0, 1.0, 2.0, 3.0])
    same = gpu_proof.latent_fidelity(ref, ref)
    assert same["psnr_db"] == math.inf and same["cosine"] == pytest.approx(1.0) and same["rel_err"] == 0
    noisy = gpu_proof.latent_fidelity(ref + torch.tensor([0.3, -0.3, 0.3, -0.3]), ref)
    assert noisy["psnr_db"] == pytest.approx(10 * math.log10(3.0**2 / 0.09))  # range 3, mse 0.09


def test_gpu_marks_read_statically(tmp_path: Path) -> None:
    marked = tmp_path / "test_marked.py"
    marked.write_text(textwrap.dedent("""
        import pytest

        @pytest.mark.gpu
        def test_a(): ...

        @pytest.mark.gpu
        @pytest.mark.parametrize("x", [1])
        def test_b(x): ...

        @pytest.mark.slow
        def test_gpu_named_but_unmarked(): ...
    """))
    assert gpu_proof.gpu_marked_tests(marked) == ["test_a", "test_b"]
    module = tmp_path / "test_module.py"
    module.write_text("import pytest\npytestmark = [pytest.mark.gpu]\ndef test_c(): ...\ndef helper(): ...\n")
    assert gpu_proof.gpu_marked_tests(module) == ["test_c"]
