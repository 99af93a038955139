"""One-command proof of the GPU fast path without TensorRT, in parts under one global deadline.

    bench/gpu_proof.sh OUT_DIR                       # on a bare CUDA machine: build the loop, run all parts
    python -m javisrt.bench.gpu_proof --out DIR      # the parts alone (javisrt importable, _sampler built)
    python -m javisrt.bench.gpu_proof --device cpu --tiny --out DIR   # the same logic on the CPU (CI)

Parts (``--parts 0,2`` reruns a selection; each writes its JSON into ``--out`` the moment it ends):

  0 env          versions, device properties, measured ceilings: 8192^3 bf16 matmul TFLOP/s and
                 device-to-device copy GB/s (bytes read + written)              -> part0_env.json
  1 correctness  the gpu-marked tests + the tiny model's triton vs torch, one pytest run with explicit
                 node ids and a junit xml; full-size FP8 attention and FFN kernels vs their emulation
                                                                                 -> part1_correctness.json,
                                                                                    part1_junit.xml
  2 kernels      released shapes (B=2, L=7301 = 6885 video + 416 audio tokens, 12 heads x 128, text 512),
                 timed with triton.testing.do_bench (median): our attention vs RoPE + SDPA (flash, cuDNN),
                 the FFN vs torch and bare cuBLAS GEMMs, the FP8 kernels vs the FFN GEMMs in torch._scaled_mm, the
                 attention Linears in bf16 / torch._scaled_mm / our Triton FP8 GEMM (which FP8 one is faster), adaLN
                 vs torch; ms, TFLOP/s and % of the measured matmul ceiling     -> part2_kernels.json
  3 forward      one DiT forward, released preset, random weights, bf16, 240p/65 f (CFG batch 2):
                 each op set x eager / CUDA-graph replay: ms, TFLOP/s, % ceiling, rel. diff vs torch
                                                                                 -> part3_forward.json
  4 sampling     sample_cuda == the reference loop (bit-exact check); per-step host overhead of the
                 device loop with a trivial captured graph; a real 50-step CFG 240p/4 s DiT run through
                 the pipeline's device path (DenoiseSession.sample): total s and ms/step
                                                                                 -> part4_sampling.json
  summary.md     a table of every part, printed last                            -> summary.md

At most 7 files, all directly in ``--out``. A part whose estimated time would pass the deadline is
skipped with a note (its JSON says so); a part that raises is recorded as ``error`` and the next part
runs. Exit status 0 when no part errored or failed.

``--device cpu --tiny`` runs every part's logic on the tiny preset and tiny shapes (Triton kernels under
TRITON_INTERPRET=1, perf_counter timings instead of do_bench, the host loop where the device loop needs
CUDA): its figures say nothing about speed.

``--ops`` names op sets (passed as given to ``create_engine(ops=...)``); one that
``engine.ops.get_ops`` does not know is recorded as "skipped: op set not available". ``triton-fp8``
needs scales: parts 3 and 4 make them on the spot from the amax of one CFG forward of the random-weight
proof model (no modelopt on the GPU machine; each row says so in ``fp8_scales``), and run every step in
FP8; part 4's row compares its final latents with the torch op set's (cosine, PSNR: goal >= 30 dB).
"""

from __future__ import annotations

import argparse
import ast
import contextlib
import functools
import importlib.util
import json
import logging
import math
import os
import platform
import statistics
import subprocess
import sys
import time
import traceback
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import torch

from javisrt.export.contract import AUDIO, TIMESTEP, VIDEO
from javisrt.runtime.backends.torch_engine import TRITON_FP8_OPS

log = logging.getLogger("javisrt.bench.gpu_proof")

REPO = Path(__file__).resolve().parents[1]
TESTS_DIR = REPO / "tests"
PART_FILES = {0: "part0_env.json", 1: "part1_correctness.json", 2: "part2_kernels.json",
              3: "part3_forward.json", 4: "part4_sampling.json"}  # fmt: skip
PART_NAMES = {0: "env", 1: "correctness", 2: "kernels", 3: "forward", 4: "sampling"}
JUNIT = "part1_junit.xml"
SUMMARY = "summary.md"
# Seconds each part is expected to take (full size on an H100/H200; tiny on 2 CPU cores): a part starts
# only if elapsed + estimate <= deadline.
ESTIMATE_S = {False: {0: 10, 1: 100, 2: 60, 3: 70, 4: 50}, True: {0: 1, 1: 40, 2: 4, 3: 4, 4: 4}}
# Part 1 runs every gpu-marked test of tests/test_*.py, plus the tiny-model triton-vs-torch tests (not
# gpu-marked: they also run under the interpreter in CI).
TRITON_VS_TORCH = ("test_ops_triton.py::test_tiny_forward_triton_equals_torch",
                   "test_ops_triton.py::test_tiny_forward_official_bf16")  # fmt: skip
TRITON_VS_TORCH_TINY = ("test_ops_triton.py::test_tiny_forward_audio_only",)
DEFAULT_OPS = ("torch", "triton", "triton-fp8")
EPS = 1e-6


@dataclass(frozen=True)
class Shapes:
    """The shapes a proof run uses (released or tiny)."""

    batch: int
    video_tokens: int
    audio_tokens: int
    heads: int
    head_dim: int
    text_len: int
    ffn_dim: int
    audio_ffn_dim: int
    matmul_n: int  # ceiling: n x n x n matmul
    copy_bytes: int  # ceiling: device-to-device copy size

    @property
    def tokens(self) -> int:
        return self.video_tokens + self.audio_tokens

    @property
    def dim(self) -> int:
        return self.heads * self.head_dim


RELEASED = Shapes(2, 6885, 416, 12, 128, 512, 8960, 8960, 8192, 2**30)
TINY = Shapes(2, 16, 8, 2, 64, 8, 64, 64, 128, 2**22)  # the kernels take one FFN width for both experts


@dataclass(frozen=True)
class ProofOptions:
    out: Path
    device: torch.device
    tiny: bool
    deadline_s: float
    parts: tuple[int, ...]
    ops: tuple[str, ...]
    steps: int

    @property
    def shapes(self) -> Shapes:
        return TINY if self.tiny else RELEASED

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


class Deadline:
    """One global deadline for the whole run."""

    def __init__(self, seconds: float) -> None:
        self.t0 = time.perf_counter()
        self.seconds = seconds

    def elapsed(self) -> float:
        return time.perf_counter() - self.t0

    def left(self) -> float:
        return self.seconds - self.elapsed()

    def fits(self, need_s: float) -> bool:
        return self.left() >= need_s


# ---- helpers -----------------------------------------------------------------------------------


def write_json_atomic(path: Path, data: dict[str, Any]) -> None:
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(data, indent=1, sort_keys=True, default=str) + "\n")
    os.replace(tmp, path)


def load_tests_module(name: str) -> ModuleType:
    """A helper module of tests/ (the tolerances are defined once, there)."""
    spec = importlib.util.spec_from_file_location(f"_javisrt_tests_{name}", TESTS_DIR / f"{name}.py")
    if spec is None or spec.loader is None:
        raise FileNotFoundError(f"{TESTS_DIR / name}.py (run from a repository checkout)")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def bench_ms(fn: Callable[[], Any], device: torch.device, warmup_ms: float = 25, rep_ms: float = 100) -> float:
    """Median ms of ``fn``: ``triton.testing.do_bench`` (CUDA events, L2 flushed) on CUDA; on the CPU
    (the logic run) the mean of two perf_counter timings after one warm-up call."""
    if device.type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=warmup_ms, rep=rep_ms, return_mode="median"))
    fn()
    times = []
    for _ in range(2):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return statistics.median(times)


def figures(ms: float, flop: float | None, ceiling_tflops: float | None, nbytes: float | None = None,
            copy_gbps: float | None = None) -> dict[str, Any]:  # fmt: skip
    """ms -> TFLOP/s and % of the matmul ceiling (and GB/s, % of the copy ceiling for memory-bound ops)."""
    row: dict[str, Any] = {"status": "ok", "ms": round(ms, 4)}
    if flop is not None:
        tflops = flop / (ms * 1e-3) / 1e12
        row["tflop"] = round(flop / 1e12, 4)
        row["tflops"] = round(tflops, 2)
        row["pct_matmul_ceiling"] = None if not ceiling_tflops else round(100 * tflops / ceiling_tflops, 1)
    if nbytes is not None:
        gbps = nbytes / (ms * 1e-3) / 1e9
        row["gbps"] = round(gbps, 1)
        row["pct_copy_ceiling"] = None if not copy_gbps else round(100 * gbps / copy_gbps, 1)
    return row


def item(results: dict[str, Any], name: str, deadline: Deadline, fn: Callable[[], dict[str, Any]],
         need_s: float = 2.0) -> None:  # fmt: skip
    """Run one measurement of a part into ``results[name]``: skipped near the deadline, errors recorded."""
    if not deadline.fits(need_s):
        results[name] = {"status": f"skipped: {deadline.left():.0f} s left of the deadline, needs ~{need_s:.0f} s"}
        return
    try:
        results[name] = fn()
    except Exception as exc:  # recorded, and the part goes on
        log.exception("%s failed", name)
        results[name] = {"status": f"error: {type(exc).__name__}: {exc}"}


def op_set_available(name: str) -> str:
    """"" when ``engine.ops.get_ops(name)`` knows the op set (triton-fp8: when its module imports), else
    the reason."""
    import importlib

    from javisrt.engine.errors import ConfigError
    from javisrt.engine.ops import OP_SETS, get_ops

    try:
        if name == TRITON_FP8_OPS:
            importlib.import_module(OP_SETS[name].split(":")[0])
        else:
            get_ops(name)
    except (ConfigError, ImportError, KeyError) as exc:
        return f"skipped: op set not available ({exc})"
    return ""


def rel(out: torch.Tensor, ref: torch.Tensor) -> float:
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))


def synchronize(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


# ---- ceilings (part 0, reused by 2-4) ----------------------------------------------------------


def measure_ceilings(opts: ProofOptions) -> dict[str, Any]:
    s, dev = opts.shapes, opts.device
    n = s.matmul_n
    dtype = torch.bfloat16 if opts.cuda else torch.float32
    a = torch.randn(n, n, device=dev, dtype=dtype)  # random data: zeros run faster than real data
    b = torch.randn(n, n, device=dev, dtype=dtype)
    c = torch.empty(n, n, device=dev, dtype=dtype)
    ms = bench_ms(lambda: torch.mm(a, b, out=c), dev)
    src = torch.randn(s.copy_bytes // 4, device=dev)
    dst = torch.empty_like(src)
    copy_ms = bench_ms(lambda: dst.copy_(src), dev)
    return {
        "matmul": {"n": n, "dtype": str(dtype), "ms": round(ms, 4), "tflops": round(2 * n**3 / (ms * 1e-3) / 1e12, 2)},
        "copy": {"bytes": s.copy_bytes, "ms": round(copy_ms, 4),
                 "gbps": round(2 * s.copy_bytes / (copy_ms * 1e-3) / 1e9, 1)},  # fmt: skip
    }


def ceilings(opts: ProofOptions) -> tuple[float | None, float | None]:
    """(matmul TFLOP/s, copy GB/s): part 0's JSON of this --out when it holds them, else measured now."""
    path = opts.out / PART_FILES[0]
    try:
        ceil = json.loads(path.read_text())["results"]["ceilings"]
        return float(ceil["matmul"]["tflops"]), float(ceil["copy"]["gbps"])
    except (OSError, KeyError, TypeError, ValueError):
        ceil = measure_ceilings(opts)
        return ceil["matmul"]["tflops"], ceil["copy"]["gbps"]


# ---- part 0 ------------------------------------------------------------------------------------


def part_env(opts: ProofOptions, deadline: Deadline) -> dict[str, Any]:
    from javisrt.bench.results import versions

    vers: dict[str, str | None] = dict(versions())
    vers["torch_cuda"] = str(torch.version.cuda)
    vers["cudnn"] = str(torch.backends.cudnn.version()) if opts.cuda else None
    props: dict[str, Any] = {"name": platform.processor() or platform.machine(), "cpu_count": os.cpu_count()}
    if opts.cuda:
        p = torch.cuda.get_device_properties(opts.device)
        props = {"name": p.name, "capability": f"{p.major}.{p.minor}", "multiprocessors": p.multi_processor_count,
                 "memory_gib": round(p.total_memory / 2**30, 1), "l2_mib": round(getattr(p, "L2_cache_size", 0) / 2**20, 1)}  # fmt: skip
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            smi = subprocess.run(["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                                 capture_output=True, text=True, timeout=20, check=True)  # fmt: skip
            props["nvidia_smi"] = smi.stdout.strip()
    from javisrt.runtime import sampling

    loop: dict[str, Any] = {"backend": sampling.backend(), "device_loop_error": sampling.device_loop_error()}
    if sampling._ext is not None:
        loop["cuda_compiled"] = bool(sampling._ext.cuda_compiled())
    return {"versions": vers, "device": props, "sampler": loop, "ceilings": measure_ceilings(opts)}


# ---- part 1 ------------------------------------------------------------------------------------


def gpu_marked_tests(path: Path) -> list[str]:
    """Names of the module-level test functions of ``path`` marked ``pytest.mark.gpu`` (decorator or
    module ``pytestmark``), read with ast: no import, and no ``-m``/``-k`` expression that could also
    match test or directory names."""
    tree = ast.parse(path.read_text())
    module_gpu = any(
        isinstance(node, ast.Assign) and any(ast.unparse(t) == "pytestmark" for t in node.targets)
        and "pytest.mark.gpu" in ast.unparse(node.value)
        for node in tree.body
    )  # fmt: skip
    names = []
    for node in tree.body:
        if isinstance(node, ast.FunctionDef) and node.name.startswith("test"):
            marks = {ast.unparse(dec.func if isinstance(dec, ast.Call) else dec) for dec in node.decorator_list}
            if module_gpu or "pytest.mark.gpu" in marks:
                names.append(node.name)
    return names


def pytest_node_ids(tiny: bool) -> list[str]:
    ids = [f"tests/{f.name}::{name}" for f in sorted(TESTS_DIR.glob("test_*.py")) for name in gpu_marked_tests(f)]
    return ids + [f"tests/{t}" for t in (TRITON_VS_TORCH_TINY if tiny else TRITON_VS_TORCH)]


def junit_counts(path: Path) -> dict[str, Any]:
    root = ET.parse(path).getroot()
    suites = [root] if root.tag == "testsuite" else list(root.iter("testsuite"))
    counts: dict[str, Any] = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname')}::{case.get('name')}")
    counts["failed_ids"] = failed
    return counts


def run_pytest(opts: ProofOptions, deadline: Deadline, budget_s: float) -> dict[str, Any]:
    ids = pytest_node_ids(opts.tiny)
    junit = opts.out / JUNIT
    cmd = [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", f"--junitxml={junit}", *ids]
    timeout = max(5.0, min(budget_s, deadline.left() - 5))
    t0 = time.perf_counter()
    try:
        proc = subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired as exc:
        tail = (exc.stdout or b"")[-3000:]
        return {"status": f"error: pytest passed its {timeout:.0f} s budget", "node_ids": ids,
                "tail": tail.decode() if isinstance(tail, bytes) else tail}  # fmt: skip
    row: dict[str, Any] = {"returncode": proc.returncode, "seconds": round(time.perf_counter() - t0, 1), "node_ids": ids,
                           "junit": junit.name, "tail": (proc.stdout + proc.stderr)[-3000:]}  # fmt: skip
    if junit.exists():
        row.update(junit_counts(junit))
    row["status"] = "ok" if proc.returncode == 0 else f"failed: pytest exit {proc.returncode}"
    return row


def fp8_attention_check(opts: ProofOptions) -> dict[str, Any]:
    """Full-size (tiny on CPU) FP8 attention vs its fp32 emulation: err <= 2 x P-rounding error + floor
    (fp32 inputs, as tests/test_rope_attention.py; the kernel quantizes them to e4m3 itself)."""
    from javisrt.kernels.rope_attention import rope_attention_fp8, rope_attention_fp8_ref

    tol = load_tests_module("_tolerance")
    s, dev = opts.shapes, opts.device
    dtype = torch.float32
    q, k, v = (torch.randn(s.batch, s.tokens, s.heads, s.head_dim, device=dev) for _ in range(3))
    cos, sin = rope_table(s, dev)
    scales = torch.stack([q.float().abs().amax() * 2**0.5, k.float().abs().amax() * 2**0.5, v.float().abs().amax()]) / 448
    out = rope_attention_fp8(q, k, v, (cos, sin), scales.float())
    emu = rope_attention_fp8_ref(q, k, v, (cos, sin), scales.float())
    emu_p = rope_attention_fp8_ref(q, k, v, (cos, sin), scales.float(), quantize_p=True)
    p_err = tol.max_err(emu_p, emu)
    atol = 2 * p_err + tol.noise_floor(emu)
    err = tol.max_err(out.float(), emu)
    del emu_p
    return {"status": "ok" if err <= atol else "failed", "shape": list(q.shape), "dtype": str(dtype),
            "max_err": err, "atol": atol, "p_rounding_err": p_err, "rel_err": rel(out.float(), emu)}  # fmt: skip


def fp8_ffn_check(opts: ProofOptions) -> dict[str, Any]:
    """Full-size FP8 modality FFN vs its float64 emulation: err <= 2 x (fp32 emulation's error) + floor
    (fp32 activations and biases, as tests/test_modality_ffn.py)."""
    from javisrt.engine.ops import modulate_ref
    from javisrt.kernels.fp8 import amax_scale
    from javisrt.kernels.modality_ffn import modality_ffn_fp8, modality_ffn_fp8_ref, quantize_ffn_weights

    tol = load_tests_module("_tolerance")
    s, dev = opts.shapes, opts.device
    x, vw, aw, vm, am = ffn_problem(s, dev, torch.float32)
    experts = []
    for seg, w, mod in ((x[:, : s.video_tokens], vw, vm), (x[:, s.video_tokens :], aw, am)):
        a = modulate_ref(seg, mod.shift, mod.scale, EPS)
        h = torch.nn.functional.gelu(a @ w.w1.T + w.b1, approximate="tanh")
        experts.append(quantize_ffn_weights(w, amax_scale(a), amax_scale(h)))
    vq, aq = experts
    act = torch.float32
    out = modality_ffn_fp8(x, s.video_tokens, vq, aq, vm, am, EPS)
    x_in = x
    emu = modality_ffn_fp8_ref(x_in, s.video_tokens, vq, aq, vm, am, EPS)

    def f64(w: Any) -> Any:
        return type(w)(w.w1, w.b1.double(), w.w2, w.b2.double(), w.scales.double())

    emu64 = modality_ffn_fp8_ref(x_in.double(), s.video_tokens, f64(vq), f64(aq), _cast(vm, torch.float64),
                                 _cast(am, torch.float64), EPS)  # fmt: skip
    torch_err = tol.max_err(emu, emu64)
    atol = 2 * torch_err + tol.noise_floor(emu64)
    err = tol.max_err(out, emu64)
    return {"status": "ok" if err <= atol else "failed", "shape": list(x.shape), "activations": str(act),
            "max_err": err, "atol": atol, "torch_fp32_err": torch_err, "rel_err": rel(out.float(), emu64)}  # fmt: skip


def part_correctness(opts: ProofOptions, deadline: Deadline) -> dict[str, Any]:
    results: dict[str, Any] = {}
    # In-process FP8 checks first (they must not wait behind a slow pytest run), then pytest.
    item(results, "fp8_attention", deadline, lambda: fp8_attention_check(opts), need_s=3 if opts.tiny else 20)
    item(results, "fp8_ffn", deadline, lambda: fp8_ffn_check(opts), need_s=3 if opts.tiny else 15)
    budget = ESTIMATE_S[opts.tiny][1] - 10
    item(results, "pytest", deadline, lambda: run_pytest(opts, deadline, budget), need_s=10)
    return results


# ---- part 2 ------------------------------------------------------------------------------------


def rope_table(s: Shapes, dev: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    angles = torch.rand(s.tokens, s.head_dim // 2, device=dev, dtype=torch.float64) * 50
    return angles.cos().float(), angles.sin().float()


def _cast(t: Any, dtype: torch.dtype) -> Any:
    return None if t is None else type(t)(*(u.to(dtype) for u in t))


def ffn_problem(s: Shapes, dev: torch.device, dtype: torch.dtype) -> tuple[Any, ...]:
    from javisrt.engine.ops import FFNWeights, Modulation

    def expert(d: int, f: int) -> FFNWeights:
        r = lambda *shape, fan: (torch.randn(*shape, device=dev) / fan**0.5).to(dtype)  # noqa: E731
        return FFNWeights(r(f, d, fan=d), r(f, fan=d), r(d, f, fan=f), r(d, fan=f))

    def mod() -> Modulation:
        return Modulation(*((torch.randn(s.batch, 1, s.dim, device=dev) * 0.3).to(dtype) for _ in range(3)))

    x = (torch.randn(s.batch, s.tokens, s.dim, device=dev) * 2 + 0.5).to(dtype)
    return x, expert(s.dim, s.ffn_dim), expert(s.dim, s.audio_ffn_dim), mod(), mod()


def attention_flop(batch: int, lq: int, lk: int, dim: int) -> float:
    """QK^T and PV: 2 x (2 * Lq * Lk * d) per sample (engine/flops.py's attention-core term)."""
    return 4.0 * batch * lq * lk * dim


def ffn_flop(s: Shapes) -> float:
    """Both projections of each token's expert: 4 * L_m * d * f_m per sample (engine/flops.py's FFN term)."""
    return 4.0 * s.batch * s.dim * (s.video_tokens * s.ffn_dim + s.audio_tokens * s.audio_ffn_dim)


def faster_row(rows: dict[str, Any], candidates: dict[str, str]) -> dict[str, Any]:
    """Which of ``candidates`` (label -> row name in ``rows``) measured the fewest ms, and by how much
    (``speedup``: the slower's ms / the faster's); skipped unless every candidate's row is ok."""
    missing = {label: _get(rows, name, "status") for label, name in candidates.items() if _get(rows, name, "status") != "ok"}
    if missing:
        return {"status": "skipped: needs every candidate timed (" + "; ".join(f"{k}: {v}" for k, v in missing.items()) + ")"}
    ms = {label: float(rows[name]["ms"]) for label, name in candidates.items()}
    order = sorted(ms, key=ms.__getitem__)
    return {"status": "ok", "faster": order[0], "ms": ms, "speedup": round(ms[order[-1]] / ms[order[0]], 3)}


def part_kernels(opts: ProofOptions, deadline: Deadline) -> dict[str, Any]:
    import torch.nn.functional as F
    from torch.nn.attention import SDPBackend, sdpa_kernel

    from javisrt.engine.ops import apply_rope_ref, modality_ffn_ref, modulate_ref
    from javisrt.kernels.adaln_modulate import adaln_modulate
    from javisrt.kernels.fp8 import amax_scale, to_e4m3
    from javisrt.kernels.modality_ffn import modality_ffn, modality_ffn_fp8, quantize_ffn_weights
    from javisrt.kernels.rope_attention import rope_attention, rope_attention_fp8
    from javisrt.kernels.ops_triton_fp8 import Fp8Linear, scaled_mm_linear, triton_fp8_linear

    s, dev = opts.shapes, opts.device
    ceil, copy_gbps = ceilings(opts)
    dtype = torch.bfloat16 if opts.cuda else torch.float32  # the interpreter's bf16 is wrong
    res: dict[str, Any] = {"shapes": s.__dict__, "dtype": str(dtype), "ceiling_tflops": ceil, "copy_gbps": copy_gbps,
                           "timer": "triton.testing.do_bench (median)" if opts.cuda else "perf_counter (CPU logic run)"}  # fmt: skip

    # -- self-attention at L = 7301 with TA-RoPE --
    L = s.tokens
    q, k, v = (torch.randn(s.batch, L, s.heads, s.head_dim, device=dev, dtype=dtype) for _ in range(3))
    rope = rope_table(s, dev)
    flop = attention_flop(s.batch, L, L, s.dim)
    attn: dict[str, Any] = {}

    def torch_attention(backend: Any) -> Callable[[], Any]:
        def run() -> Any:
            qr, kr = apply_rope_ref(q, *rope), apply_rope_ref(k, *rope)
            with sdpa_kernel(backend):
                return F.scaled_dot_product_attention(qr.transpose(1, 2), kr.transpose(1, 2), v.transpose(1, 2))

        return run

    item(attn, "ours", deadline, lambda: figures(bench_ms(lambda: rope_attention(q, k, v, rope), dev), flop, ceil))
    backends = {"rope+sdpa_flash": SDPBackend.FLASH_ATTENTION, "rope+sdpa_cudnn": SDPBackend.CUDNN_ATTENTION}
    if not opts.cuda:
        backends = {"rope+sdpa_math": SDPBackend.MATH}
    for name, backend in backends.items():
        item(attn, name, deadline, functools.partial(lambda b: figures(bench_ms(torch_attention(b), dev), flop, ceil), backend))
    res["self_attention"] = attn

    # -- cross-attention: L queries x 512 text keys, no RoPE --
    kt, vt = (torch.randn(s.batch, s.text_len, s.heads, s.head_dim, device=dev, dtype=dtype) for _ in range(2))
    cflop = attention_flop(s.batch, L, s.text_len, s.dim)
    cross: dict[str, Any] = {}
    item(cross, "ours", deadline, lambda: figures(bench_ms(lambda: rope_attention(q, kt, vt, None), dev), cflop, ceil))
    for name, backend in backends.items():
        def sdpa(b: Any = backend) -> Any:
            with sdpa_kernel(b):
                return F.scaled_dot_product_attention(q.transpose(1, 2), kt.transpose(1, 2), vt.transpose(1, 2))

        item(cross, name.removeprefix("rope+"), deadline, functools.partial(lambda f: figures(bench_ms(f, dev), cflop, ceil), sdpa))
    res["cross_attention"] = cross

    # -- the per-modality FFN (adaLN modulate + up + GELU-tanh + down + gated residual) --
    x, vw, aw, vm, am = ffn_problem(s, dev, dtype)
    fflop = ffn_flop(s)
    ffn: dict[str, Any] = {}
    lv = s.video_tokens
    item(ffn, "ours", deadline, lambda: figures(bench_ms(lambda: modality_ffn(x, lv, vw, aw, vm, am, EPS), dev), fflop, ceil))
    item(ffn, "torch", deadline, lambda: figures(bench_ms(lambda: modality_ffn_ref(x, lv, vw, aw, vm, am, EPS), dev), fflop, ceil))
    xv, xa = x[:, :lv].reshape(-1, s.dim), x[:, lv:].reshape(-1, s.dim)
    hv = torch.randn(xv.shape[0], s.ffn_dim, device=dev, dtype=dtype)
    ha = torch.randn(xa.shape[0], s.audio_ffn_dim, device=dev, dtype=dtype)

    def gemms() -> None:  # the four bare GEMMs of the FFN (cuBLAS), no epilogues
        torch.mm(xv, vw.w1.T)
        torch.mm(hv, vw.w2.T)
        torch.mm(xa, aw.w1.T)
        torch.mm(ha, aw.w2.T)

    item(ffn, "cublas_gemms", deadline, lambda: figures(bench_ms(gemms, dev), fflop, ceil))
    res["ffn"] = ffn

    # -- FP8 e4m3: our attention and fused FFN kernels; the FFN's GEMMs through torch._scaled_mm --
    fp8: dict[str, Any] = {}
    scales = torch.stack([q.float().abs().amax() * 2**0.5, k.float().abs().amax() * 2**0.5, v.float().abs().amax()]).float() / 448
    item(fp8, "attention_fp8", deadline, lambda: figures(bench_ms(lambda: rope_attention_fp8(q, k, v, rope, scales), dev), flop, ceil))
    h_scale = torch.tensor(0.05, device=dev)  # timing only: any static activation scale
    qv = quantize_ffn_weights(vw, amax_scale(x), h_scale)
    qa = quantize_ffn_weights(aw, amax_scale(x), h_scale)
    item(fp8, "ffn_fp8", deadline, lambda: figures(bench_ms(lambda: modality_ffn_fp8(x, lv, qv, qa, vm, am, EPS), dev), fflop, ceil))
    # The FFN's four GEMMs as torch._scaled_mm (per-tensor scales, no epilogues): A [M, K] e4m3 row-major,
    # B = W.T, the column-major [K, N] view of the e4m3 weight [N, K]; same FLOP as the fused FFN.
    operands = []
    for a, w in ((xv, vw.w1), (hv, vw.w2), (xa, aw.w1), (ha, aw.w2)):
        sa, sw = amax_scale(a), amax_scale(w)
        operands.append((to_e4m3(a, sa), to_e4m3(w, sw), sa, sw))

    def scaled_mm_gemms() -> None:
        for a8, w8, sa, sw in operands:
            torch._scaled_mm(a8, w8.T, scale_a=sa, scale_b=sw, out_dtype=torch.bfloat16)

    if opts.cuda:
        item(fp8, "scaled_mm_ffn_gemms", deadline, lambda: figures(bench_ms(scaled_mm_gemms, dev), fflop, ceil))
    else:
        fp8["scaled_mm_ffn_gemms"] = {"status": "skipped: torch._scaled_mm is timed on an FP8 GPU only"}
    # The attention Linears of one block (self-attn q/k/v/o and cross-attn q/o on L tokens, cross-attn k/v
    # on the text), as the triton-fp8 op set runs them with either linear_impl, activation quantization
    # included in both: "scaled_mm" (kernels/ops_triton_fp8.scaled_mm_linear: a Triton quantization launch +
    # torch._scaled_mm + bias) and "triton" (kernels/fp8_linear.fp8_linear: one GEMM quantizing x in its
    # prologue), vs the activation-dtype F.linear. attention_linears_faster says which FP8 one won: the
    # op set's default (ops_triton_fp8.DEFAULT_LINEAR_IMPL) should follow it.
    lin_x = torch.randn(s.batch, L, s.dim, device=dev, dtype=dtype)
    lin_t = torch.randn(s.batch, s.text_len, s.dim, device=dev, dtype=dtype)
    lin_w = torch.randn(s.dim, s.dim, device=dev, dtype=dtype) / s.dim**0.5
    lin_b = torch.zeros(s.dim, device=dev, dtype=dtype)
    lin_flop = 2.0 * s.batch * s.dim * s.dim * (6 * L + 2 * s.text_len)
    fp8_lin = Fp8Linear(to_e4m3(lin_w, amax_scale(lin_w)), amax_scale(lin_w), amax_scale(lin_x))

    def linears(f: Callable[[torch.Tensor], Any]) -> Callable[[], None]:
        def run() -> None:
            for _ in range(6):
                f(lin_x)
            for _ in range(2):
                f(lin_t)

        return run

    item(fp8, "attention_linears_bf16", deadline,
         lambda: figures(bench_ms(linears(lambda a: F.linear(a, lin_w, lin_b)), dev), lin_flop, ceil))  # fmt: skip
    if opts.cuda:
        item(fp8, "attention_linears_scaled_mm", deadline,
             lambda: figures(bench_ms(linears(lambda a: scaled_mm_linear(a, fp8_lin, lin_b)), dev), lin_flop, ceil))  # fmt: skip
    else:
        fp8["attention_linears_scaled_mm"] = {"status": "skipped: torch._scaled_mm is timed on an FP8 GPU only"}
    item(fp8, "attention_linears_triton_fp8_gemm", deadline,
         lambda: figures(bench_ms(linears(lambda a: triton_fp8_linear(a, fp8_lin, lin_b)), dev), lin_flop, ceil))  # fmt: skip
    fp8["attention_linears_faster"] = faster_row(fp8, {"scaled_mm": "attention_linears_scaled_mm",
                                                       "triton": "attention_linears_triton_fp8_gemm"})  # fmt: skip
    res["fp8"] = fp8

    # -- adaLN modulate (memory-bound: read x, write y) --
    ada: dict[str, Any] = {}
    nbytes = 2.0 * x.numel() * x.element_size()
    item(ada, "ours", deadline, lambda: figures(bench_ms(lambda: adaln_modulate(x, vm.shift, vm.scale, EPS), dev), None, ceil, nbytes, copy_gbps))
    item(ada, "torch", deadline, lambda: figures(bench_ms(lambda: modulate_ref(x, vm.shift, vm.scale, EPS), dev), None, ceil, nbytes, copy_gbps))
    res["adaln"] = ada
    return res


# ---- parts 3 and 4: the model --------------------------------------------------------------------

_MODEL: dict[str, Any] = {}


def proof_model(opts: ProofOptions) -> Any:
    """The released preset (tiny with --tiny) with random weights, bf16 official numerics on CUDA (fp32
    on the CPU: the interpreter's bf16 is wrong), built once for parts 3 and 4."""
    from javisrt.engine.config import JavisConfig
    from javisrt.engine.model import random_model

    if "model" not in _MODEL:
        cfg = JavisConfig.from_name("tiny" if opts.tiny else "javisdit-v1.0")
        t0 = time.perf_counter()
        _MODEL["model"] = random_model(cfg, "official" if opts.cuda else "fp32", device=opts.device)
        log.info("random %s model built in %.1f s", cfg.name, time.perf_counter() - t0)
    return _MODEL["model"]


FP8_SCALES_NOTE = ("amax of one CFG forward (runtime/fp8_scales.scales_from_forward: no modelopt on the GPU machine) "
                   "at t=991.64 on the random-weight proof model and random inputs; amax / 448 per tensor")


def proof_fp8_scales(opts: ProofOptions) -> Any:
    """The proof model's FP8 scales, made once on the spot (:data:`FP8_SCALES_NOTE`)."""
    from javisrt.runtime.backends import create_engine
    from javisrt.runtime.fp8_scales import scales_from_forward

    if "fp8_scales" not in _MODEL:
        model = proof_model(opts)
        _, geo = request_geometry(opts)
        engine = create_engine("torch", model=model, device=opts.device)
        try:
            session, _ = proof_session(engine, opts)
            g = torch.Generator().manual_seed(5)
            step = {VIDEO: torch.randn(2, *geo.video, generator=g), AUDIO: torch.randn(2, *geo.audio, generator=g),
                    TIMESTEP: torch.full((2,), 991.64)}  # fmt: skip
            engine.write_inputs(step)

            def forward() -> None:
                engine.enqueue(None)
                engine.synchronize()  # the amax values were computed on the engine's stream

            _MODEL["fp8_scales"] = scales_from_forward(model, forward, FP8_SCALES_NOTE)
            del session
        finally:
            engine.unload()
    return _MODEL["fp8_scales"]


def proof_engine(opts: ProofOptions, ops: str, cuda_graphs: bool) -> Any:
    """The torch engine on the proof model with op set ``ops`` (triton-fp8 with :func:`proof_fp8_scales`)."""
    from javisrt.runtime.backends import create_engine

    scales = proof_fp8_scales(opts) if ops == TRITON_FP8_OPS else None
    return create_engine("torch", model=proof_model(opts), device=opts.device, ops=ops, cuda_graphs=cuda_graphs,
                         fp8_scales=scales)  # fmt: skip


def request_geometry(opts: ProofOptions) -> Any:
    """240p / 65 frames (4 s) for the released model; 33 frames at 32x48 for the tiny one."""
    from javisrt.runtime.pipeline import GenerationConfig

    gen = GenerationConfig(num_frames=33, height=32, width=48) if opts.tiny else GenerationConfig(num_frames=65)
    return gen, gen.geometry()


def proof_session(engine: Any, opts: ProofOptions, seed: int = 0) -> tuple[Any, list[torch.Tensor]]:
    from javisrt.engine.latents import draw_noise
    from javisrt.runtime.denoise_session import DenoiseSession

    cfg = engine.contract.config
    _, geo = request_geometry(opts)
    g = torch.Generator().manual_seed(seed)
    context = torch.randn(2, cfg.text_len, cfg.text_dim, generator=g).to(opts.device)
    noise = [x for x in draw_noise(geo, seed, device=opts.device) if x is not None]
    shapes = {VIDEO: noise[0].shape[1:], AUDIO: noise[1].shape[1:]}
    return DenoiseSession(engine, context, shapes, video_frames=geo.video_latent_frames), noise


def part_forward(opts: ProofOptions, deadline: Deadline) -> dict[str, Any]:
    from javisrt.engine.flops import forward_flops

    model = proof_model(opts)
    ceil, _ = ceilings(opts)
    gen, geo = request_geometry(opts)
    grid = model.token_grid(torch.empty(1, *geo.video, device="meta"), torch.empty(1, *geo.audio, device="meta"))
    flop = forward_flops(model.cfg, grid, batch=2).total
    res: dict[str, Any] = {"preset": model.cfg.name, "numerics": model.numerics.value, "frames": gen.num_frames,
                           "size": list(gen.size), "tokens": [grid.num_video_tokens, grid.num_audio_tokens],
                           "tflop": round(flop / 1e12, 3), "ceiling_tflops": ceil, "runs": {}}  # fmt: skip
    g = torch.Generator().manual_seed(3)
    step = {VIDEO: torch.randn(2, *geo.video, generator=g), AUDIO: torch.randn(2, *geo.audio, generator=g),
            TIMESTEP: torch.full((2,), 991.64)}  # fmt: skip
    ref: dict[str, torch.Tensor] = {}
    for ops in opts.ops:
        for mode in ("eager", "graph"):
            key = f"{ops}/{mode}"

            def run(ops: str = ops, mode: str = mode) -> dict[str, Any]:
                reason = op_set_available(ops)
                if reason:
                    return {"status": reason}
                if not opts.cuda and (mode == "graph" or ops != "torch"):
                    return {"status": "skipped: needs CUDA (CUDA graphs; the Triton op sets on the torch engine)"}
                engine = proof_engine(opts, ops, cuda_graphs=mode == "graph")
                try:
                    session, _ = proof_session(engine, opts)
                    engine.write_inputs(step)
                    stream = torch.cuda.current_stream(opts.device).cuda_stream if opts.cuda else None
                    for _ in range(2):  # warm-up; the graph engine captures on its second run
                        engine.enqueue(stream)
                    synchronize(opts.device)
                    out = {k: t.float().cpu().clone() for k, t in engine.outputs().items()}
                    ms = bench_ms(lambda: engine.enqueue(stream), opts.device)
                    row = figures(ms, flop, ceil)
                    if ops == "torch" and mode == "eager":
                        ref.update(out)
                    if ref:
                        row["rel_diff_vs_torch"] = {k: rel(out[k], ref[k]) for k in ref}
                    row["finite"] = all(bool(torch.isfinite(t).all()) for t in out.values())
                    if ops == TRITON_FP8_OPS:
                        row["fp8_scales"] = FP8_SCALES_NOTE
                    del session
                    return row
                finally:
                    engine.unload()

            item(res["runs"], key, deadline, run, need_s=2 if opts.tiny else 10)
    return res


# ---- part 4 ------------------------------------------------------------------------------------


def _trivial_step(numel: int, dev: torch.device) -> tuple[list[torch.Tensor], Callable[[list[Any], Any], list[Any]]]:
    """A denoiser with exact float32 arithmetic on both sides: v = c * x, c = 0.5 (cond) / 0.25 (uncond)."""
    coef = torch.tensor([0.5, 0.25], device=dev).repeat_interleave(numel).reshape(2, numel)

    def host(inputs: list[Any], t: Any) -> list[Any]:
        import numpy as np

        return [np.ascontiguousarray(x * coef.cpu().numpy().reshape(x.shape)) for x in inputs]

    return [coef], host


def loop_equals_reference(opts: ProofOptions) -> dict[str, Any]:
    """sample_cuda (or, on the CPU, the host C++ loop) vs the Python reference loop, both solvers, with
    a denoiser whose float32 arithmetic is exact on both sides (one multiply): bit-exact expected."""
    import numpy as np

    from javisrt.runtime import sampling

    numel = 4096
    out: dict[str, Any] = {"numel_per_half": numel}
    for config in (sampling.SamplerConfig(sampling.Solver.EULER, 30, (5.0,), 3.0),
                   sampling.SamplerConfig(sampling.Solver.UNIPC, 30, (5.0,), 3.0)):  # fmt: skip
        x0 = np.random.default_rng(0).standard_normal((1, numel)).astype(np.float32)
        (coef,), host = _trivial_step(numel, opts.device)
        ref = sampling.sample_ref([x0], host, config)
        if opts.cuda and not sampling.device_loop_error():
            dev = opts.device
            stream = torch.cuda.Stream(dev)
            lat = torch.from_numpy(x0).to(dev)
            inp = torch.empty(2, numel, device=dev)
            vel = torch.empty_like(inp)
            ts = torch.empty(2, device=dev)
            torch.cuda.synchronize(dev)
            graph = torch.cuda.CUDAGraph(keep_graph=True)
            with torch.cuda.graph(graph, stream=stream):
                torch.mul(inp, coef, out=vel)
            graph.instantiate()
            res = sampling.sample_cuda([lat.data_ptr()], config, inputs=[inp.data_ptr()], outputs=[vel.data_ptr()],
                                       numels=[numel], timesteps=ts.data_ptr(), batch=1, stream=stream.cuda_stream,
                                       graph_exec=int(graph.raw_cuda_graph_exec()))  # fmt: skip
            got, loop = lat.cpu().numpy(), "sample_cuda (graph replay)"
        else:
            res = sampling.sample([x0], host, config)
            got, loop = np.asarray(res.latents[0]), f"host ({sampling.backend()}): the device loop needs CUDA"
        out[config.solver.value] = {"loop": loop, "steps": res.steps_done, "bit_exact": bool(np.array_equal(got, ref.latents[0])),
                                    "max_abs_diff": float(np.abs(got - ref.latents[0]).max())}  # fmt: skip
    out["status"] = "ok" if all(out[s]["bit_exact"] for s in ("euler", "unipc")) else "failed: not bit-exact"
    return out


def host_overhead(opts: ProofOptions) -> dict[str, Any]:
    """Per-step host cost of the loop: a trivial captured graph (one tiny kernel) per step, many steps;
    wall time / steps, with max_inflight 2 (the default) and 0 (never wait)."""
    import numpy as np

    from javisrt.runtime import sampling

    steps = 2000 if opts.cuda else 200
    numel = 64
    config = sampling.SamplerConfig(sampling.Solver.EULER, steps, (5.0,), 3.0)
    (coef,), host = _trivial_step(numel, opts.device)
    x0 = np.zeros((1, numel), np.float32) + 0.5
    row: dict[str, Any] = {"steps": steps, "numel_per_half": numel}
    if opts.cuda and not sampling.device_loop_error():
        dev = opts.device
        stream = torch.cuda.Stream(dev)
        lat = torch.from_numpy(x0).to(dev)
        inp, ts = torch.empty(2, numel, device=dev), torch.empty(2, device=dev)
        vel = torch.empty_like(inp)
        torch.cuda.synchronize(dev)
        graph = torch.cuda.CUDAGraph(keep_graph=True)
        with torch.cuda.graph(graph, stream=stream):
            torch.mul(inp, coef, out=vel)
        graph.instantiate()
        kw = dict(inputs=[inp.data_ptr()], outputs=[vel.data_ptr()], numels=[numel], timesteps=ts.data_ptr(), batch=1,
                  stream=stream.cuda_stream, graph_exec=int(graph.raw_cuda_graph_exec()))  # fmt: skip
        for inflight in (2, 0):
            sampling.sample_cuda([lat.data_ptr()], config, max_inflight=inflight, **kw)  # warm-up
            t0 = time.perf_counter()
            res = sampling.sample_cuda([lat.data_ptr()], config, max_inflight=inflight, **kw)
            wall = time.perf_counter() - t0
            row[f"max_inflight_{inflight}"] = {"us_per_step": round(wall / steps * 1e6, 2),
                                               "gpu_us_per_step_median": round(statistics.median(res.step_times_s) * 1e6, 2)}  # fmt: skip
        row["loop"] = "sample_cuda (graph replay)"
        row["goal_us_per_step"] = 20
    else:
        sampling.sample([x0], host, config)
        t0 = time.perf_counter()
        sampling.sample([x0], host, config)
        row["host_loop"] = {"us_per_step": round((time.perf_counter() - t0) / steps * 1e6, 2)}
        row["loop"] = f"host ({sampling.backend()}): the device loop needs CUDA"
    row["status"] = "ok"
    return row


def latent_fidelity(out: torch.Tensor, ref: torch.Tensor) -> dict[str, float]:
    """Cosine similarity and PSNR (data range of ``ref``) of final latents against the torch op set's:
    a latent-space proxy (the VAEs need diffusers, absent on the GPU machine)."""
    o, r = out.double().flatten(), ref.double().flatten()
    mse = float(((o - r) ** 2).mean())
    peak = float(r.max() - r.min())
    return {"cosine": float(torch.nn.functional.cosine_similarity(o, r, dim=0)),
            "psnr_db": math.inf if mse == 0 else 10 * math.log10(peak**2 / mse), "rel_err": rel(out, ref)}  # fmt: skip


def denoise_run(opts: ProofOptions, ops: str, finals: dict[str, list[torch.Tensor]]) -> dict[str, Any]:
    """A real CFG denoising pass (50 steps, 240p/4 s) through DenoiseSession.sample, the pipeline's
    path: the device loop replaying the whole-step CUDA graph on CUDA. Two passes: the first includes
    the graph capture, the second is steady state. Final latents go to ``finals[ops]``; against the
    torch op set's (when it ran first) the row gets latent cosine / PSNR."""
    from javisrt.runtime.pipeline import default_cuda_graphs

    reason = op_set_available(ops)
    if reason:
        return {"status": reason}
    if not opts.cuda and ops != "torch":
        return {"status": "skipped: the Triton op sets on the torch engine need CUDA"}
    model = proof_model(opts)
    gen, _ = request_geometry(opts)
    engine = proof_engine(opts, ops, cuda_graphs=default_cuda_graphs("torch", opts.device))
    try:
        session, noise = proof_session(engine, opts)
        config = gen.sampler_config(model.cfg, (5.0, 5.0))
        from dataclasses import replace

        config = replace(config, steps=opts.steps)
        runs = []
        for _ in range(2):
            res = session.sample(noise, config)
            runs.append(res)
        last = runs[-1]
        finals[ops] = [x.float().cpu() for x in last.latents]
        vs_torch = {}
        if ops != "torch" and "torch" in finals:
            vs_torch = {name: latent_fidelity(x, r) for name, x, r in zip((VIDEO, AUDIO), finals[ops], finals["torch"], strict=True)}
        return {
            "vs_torch_latents": vs_torch,
            "status": "ok", "ops": ops, "loop": last.loop.value, "cuda_graph": last.graph, "steps": last.steps_done,
            "first_total_s": round(runs[0].seconds, 3), "total_s": round(last.seconds, 3),
            "ms_per_step_median": round(statistics.median(last.step_times_s) * 1e3, 3),
            "ms_per_step_mean": round(last.seconds / max(last.steps_done, 1) * 1e3, 3),
            "finite": all(bool(torch.isfinite(x).all()) for x in last.latents),
            "goals": {"bf16_ms_per_step": 90, "bf16_total_s": 4.5, "fp8_ms_per_step": 70, "fp8_psnr_db_vs_bf16": 30},
            **({"fp8_scales": FP8_SCALES_NOTE, "step_policy": "all steps FP8"} if ops == TRITON_FP8_OPS else {}),
        }  # fmt: skip
    finally:
        engine.unload()


def part_sampling(opts: ProofOptions, deadline: Deadline) -> dict[str, Any]:
    res: dict[str, Any] = {}
    item(res, "loop_equals_reference", deadline, lambda: loop_equals_reference(opts), need_s=2)
    item(res, "host_overhead", deadline, lambda: host_overhead(opts), need_s=2)
    runs: dict[str, Any] = {}
    finals: dict[str, list[torch.Tensor]] = {}
    for ops in opts.ops:
        item(runs, ops, deadline, functools.partial(denoise_run, opts, ops, finals), need_s=2 if opts.tiny else 15)
    res["denoise"] = runs
    return res


# ---- driver ------------------------------------------------------------------------------------

PARTS: dict[int, Callable[[ProofOptions, Deadline], dict[str, Any]]] = {
    0: part_env, 1: part_correctness, 2: part_kernels, 3: part_forward, 4: part_sampling,
}  # fmt: skip


def _statuses(tree: Any) -> Iterator[str]:
    if isinstance(tree, dict):
        if isinstance(tree.get("status"), str):
            yield tree["status"]
        for v in tree.values():
            yield from _statuses(v)


def run_part(index: int, opts: ProofOptions, deadline: Deadline) -> dict[str, Any]:
    """Run (or skip) one part and write its JSON at once."""
    from javisrt.bench.results import provenance

    need = ESTIMATE_S[opts.tiny][index]
    record: dict[str, Any] = {"part": index, "name": PART_NAMES[index], "device": str(opts.device), "tiny": opts.tiny,
                              "estimate_s": need, "provenance": provenance(), "results": {}}  # fmt: skip
    t0 = time.perf_counter()
    if not deadline.fits(need):
        record.update(status="skipped", note=f"{deadline.left():.0f} s left of the {deadline.seconds:.0f} s deadline; "
                      f"this part needs ~{need} s: rerun it with --parts {index}")  # fmt: skip
    else:
        try:
            record["results"] = PARTS[index](opts, deadline)
            bad = [s for s in _statuses(record["results"]) if s.startswith(("error", "failed"))]
            record.update(status="failed" if bad else "ok", note="; ".join(bad[:5]))
        except Exception as exc:
            log.exception("part %d failed", index)
            record.update(status="error", note=f"{type(exc).__name__}: {exc}", traceback=traceback.format_exc()[-4000:])
    if opts.cuda:  # hand cached blocks back: the next part (or part 1's pytest process) needs the memory
        torch.cuda.empty_cache()
    record["seconds"] = round(time.perf_counter() - t0, 2)
    write_json_atomic(opts.out / PART_FILES[index], record)
    log.info("part %d (%s): %s in %.1f s", index, PART_NAMES[index], record["status"], record["seconds"])
    return record


def _fmt(row: dict[str, Any]) -> str:
    if not isinstance(row, dict):
        return str(row)
    st = row.get("status", "")
    if st != "ok":
        return st
    bits = [f"{row['ms']:.3f} ms"] if "ms" in row else []
    if row.get("tflops") is not None:
        bits.append(f"{row['tflops']:.1f} TFLOP/s")
    if row.get("pct_matmul_ceiling") is not None:
        bits.append(f"{row['pct_matmul_ceiling']:.0f}% of matmul")
    if row.get("gbps") is not None:
        bits.append(f"{row['gbps']:.0f} GB/s ({row.get('pct_copy_ceiling')}% of copy)")
    if row.get("faster") is not None:
        bits.append(f"faster: {row['faster']} ({row['speedup']:.2f}x)")
    rd = row.get("rel_diff_vs_torch")
    if rd:
        bits.append("rel diff " + ", ".join(f"{k} {v:.1e}" for k, v in rd.items()))
    return ", ".join(bits) or "ok"


def summary_markdown(records: list[dict[str, Any]], opts: ProofOptions, total_s: float) -> str:
    lines = [f"# javisrt GPU proof ({opts.device}{', tiny' if opts.tiny else ''}; {total_s:.0f} s of a "
             f"{opts.deadline_s:.0f} s deadline)", "",
             "| part | status | s | note |", "| --- | --- | --- | --- |"]  # fmt: skip
    for r in records:
        lines.append(f"| {r['part']} {r['name']} | {r['status']} | {r['seconds']} | {r.get('note', '')[:200]} |")
    lines += ["", "| part | measurement | result |", "| --- | --- | --- |"]
    for r in records:
        res = r.get("results") or {}
        name = r["name"]
        if name == "env" and "ceilings" in res:
            c = res["ceilings"]
            dev = res.get("device", {}).get("name", "")
            lines.append(f"| env | device | {dev}; torch {res['versions'].get('torch')}, triton {res['versions'].get('triton')} |")
            lines.append(f"| env | matmul ceiling | {c['matmul']['tflops']} TFLOP/s ({c['matmul']['n']}^3 {c['matmul']['dtype']}) |")
            lines.append(f"| env | copy ceiling | {c['copy']['gbps']} GB/s |")
        elif name == "correctness":
            for k, v in res.items():
                detail = v.get("status", "") if isinstance(v, dict) else v
                if k == "pytest" and isinstance(v, dict) and "tests" in v:
                    detail += f" ({v['tests']} tests, {v['failures']} failures, {v['errors']} errors, {v['skipped']} skipped)"
                elif isinstance(v, dict) and "max_err" in v:
                    detail += f" (max err {v['max_err']:.2e} <= atol {v['atol']:.2e}?)"
                lines.append(f"| correctness | {k} | {detail} |")
        elif name == "kernels":
            for group in ("self_attention", "cross_attention", "ffn", "fp8", "adaln"):
                for k, v in (res.get(group) or {}).items():
                    lines.append(f"| kernels | {group}: {k} | {_fmt(v)} |")
        elif name == "forward":
            for k, v in (res.get("runs") or {}).items():
                lines.append(f"| forward ({res.get('tflop')} TFLOP) | {k} | {_fmt(v)} |")
        elif name == "sampling":
            le = res.get("loop_equals_reference", {})
            for s in ("euler", "unipc"):
                if s in le:
                    lines.append(f"| sampling | {s} loop == reference | bit-exact {le[s]['bit_exact']} ({le[s]['loop']}) |")
            ho = res.get("host_overhead", {})
            for k, v in ho.items():
                if isinstance(v, dict) and "us_per_step" in v:
                    lines.append(f"| sampling | host overhead {k} | {v['us_per_step']} us/step |")
            for k, v in (res.get("denoise") or {}).items():
                if v.get("status") == "ok":
                    fid = "".join(f", {m} latent PSNR {f['psnr_db']:.1f} dB (cos {f['cosine']:.5f})"
                                  for m, f in (v.get("vs_torch_latents") or {}).items())  # fmt: skip
                    lines.append(f"| sampling | {v['steps']}-step CFG run, ops {k} ({v['loop']} loop, graph {v['cuda_graph']}) "
                                 f"| {v['total_s']} s, {v['ms_per_step_median']} ms/step{fid} |")  # fmt: skip
                else:
                    lines.append(f"| sampling | denoise ops {k} | {v.get('status')} |")
    lines += ["", *goal_lines(records)]
    return "\n".join(lines) + "\n"


def _get(tree: Any, *path: str) -> Any:
    for key in path:
        if not isinstance(tree, dict) or key not in tree:
            return None
        tree = tree[key]
    return tree


def goal_lines(records: list[dict[str, Any]]) -> list[str]:
    """The issue's goals against what this run measured (absent figures: "not measured")."""
    by_name = {r["name"]: r.get("results") or {} for r in records}
    rows = ["| goal | target | measured | met |", "| --- | --- | --- | --- |"]

    def row(goal: str, target: str, value: float | None, ok: Callable[[float], bool], unit: str) -> None:
        if value is None:
            rows.append(f"| {goal} | {target} | not measured | - |")
        else:
            rows.append(f"| {goal} | {target} | {value:.4g} {unit} | {'yes' if ok(value) else 'NO'} |")

    denoise = _get(by_name, "sampling", "denoise") or {}
    bf16 = [v for k, v in denoise.items() if k in ("torch", "triton") and _get(v, "status") == "ok" and v.get("loop") == "device"]
    best = min(bf16, key=lambda v: v["ms_per_step_median"]) if bf16 else None
    row("BF16 50-step CFG, ms/step (device loop)", "<= 90", best and best["ms_per_step_median"], lambda x: x <= 90, "ms")
    row("BF16 50-step CFG, total", "<= 4.5 s", best and best["total_s"], lambda x: x <= 4.5, "s")
    fp8 = _get(denoise, "triton-fp8")
    fp8_ms = fp8["ms_per_step_median"] if _get(fp8, "status") == "ok" else None
    row("FP8 50-step CFG, ms/step", "<= 70", fp8_ms, lambda x: x <= 70, "ms")
    for name, label in ((VIDEO, "video"), (AUDIO, "audio")):
        psnr = _get(fp8, "vs_torch_latents", name, "psnr_db") if _get(fp8, "status") == "ok" else None
        row(f"FP8 vs BF16 final {label} latents, PSNR", ">= 30 dB", psnr, lambda x: x >= 30, "dB")
    runs = _get(by_name, "forward", "runs") or {}
    pcts = [v["pct_matmul_ceiling"] for k, v in runs.items() if k.endswith("/graph") and not k.startswith("triton-fp8")
            and _get(v, "status") == "ok" and v.get("pct_matmul_ceiling") is not None]  # fmt: skip
    row("BF16 forward (graph), % of the matmul ceiling", ">= 65%", max(pcts) if pcts else None, lambda x: x >= 65, "%")
    ho = _get(by_name, "sampling", "host_overhead", "max_inflight_2", "us_per_step")
    row("device-loop host overhead per step", "< 20 us", ho, lambda x: x < 20, "us")
    ours = _get(by_name, "kernels", "self_attention", "ours", "ms")
    flash = _get(by_name, "kernels", "self_attention", "rope+sdpa_flash", "ms")
    row("attention: SDPA-flash ms / ours ms", ">= 1", flash / ours if ours and flash else None, lambda x: x >= 1, "x")
    return rows


def parse_args(argv: list[str] | None) -> ProofOptions:
    p = argparse.ArgumentParser(prog="python -m javisrt.bench.gpu_proof", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)  # fmt: skip
    p.add_argument("--out", required=True, help="directory for the part JSONs, the junit xml and summary.md (created)")
    p.add_argument("--device", default="cuda", help="cuda (default; cuda:N for another GPU) or cpu (the logic run)")
    p.add_argument("--tiny", action="store_true", help="tiny preset and tiny shapes (with --device cpu: the CI run)")
    p.add_argument("--deadline", type=float, default=300.0,
                   help="global deadline in seconds (default 300); a part that would pass it is skipped with a note")
    p.add_argument("--parts", default="0,1,2,3,4", help="comma-separated parts to run, e.g. 2,3 (default: all)")
    p.add_argument("--ops", default=",".join(DEFAULT_OPS),
                   help="op sets for parts 3 and 4, passed to create_engine(ops=...) as given; unknown ones are "
                   "recorded as skipped (default: torch,triton,triton-fp8)")  # fmt: skip
    p.add_argument("--steps", type=int, default=50, help="sampling steps of part 4's CFG run (default 50)")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    args = p.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    try:
        parts = tuple(sorted({int(x) for x in args.parts.split(",") if x.strip()}))
    except ValueError:
        p.error(f"--parts must be comma-separated part numbers, got {args.parts!r}")
    if not parts or any(i not in PARTS for i in parts):
        p.error(f"--parts takes numbers from {sorted(PARTS)}, got {args.parts!r}")
    ops = tuple(o.strip() for o in args.ops.split(",") if o.strip())
    if not ops:
        p.error("--ops needs at least one op set")
    if args.steps < 1:
        p.error("--steps must be >= 1")
    return ProofOptions(Path(args.out), torch.device(args.device), args.tiny, args.deadline, parts, ops, args.steps)


def main(argv: list[str] | None = None) -> int:
    opts = parse_args(argv)
    deadline = Deadline(opts.deadline_s)
    if opts.cuda:
        if not torch.cuda.is_available():
            log.error("no CUDA device is visible to torch %s (CUDA %s); use --device cpu --tiny for the logic run",
                      torch.__version__, torch.version.cuda)  # fmt: skip
            return 2
        if opts.device.index is not None:
            torch.cuda.set_device(opts.device)
    else:
        # The Triton kernels run under the interpreter; set before anything imports triton.
        os.environ.setdefault("TRITON_INTERPRET", "1")
    opts.out.mkdir(parents=True, exist_ok=True)
    records = [run_part(i, opts, deadline) for i in opts.parts]
    text = summary_markdown(records, opts, deadline.elapsed())
    tmp = opts.out / (SUMMARY + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, opts.out / SUMMARY)
    print(text)
    return 1 if any(r["status"] in ("error", "failed") for r in records) else 0


if __name__ == "__main__":
    raise SystemExit(main())
