"""Ahead-of-time compilation of the javisrt kernels for Hopper (sm_90a), and their launch math.

No GPU and no driver needed: ``triton.compile(ASTSource(...), target=GPUTarget("cuda", 90, 32))`` emits
PTX and a cubin with the ptxas Triton ships (feasibility.md §2). ``ptxas -v`` on the PTX gives registers,
spills and stack; Triton's metadata gives shared memory. A later TensorRT-plugin issue builds on this
module, so it never imports tensorrt; what it provides is what an AOT plugin needs
(tensorrt-notes.md §1.3):

- the PTX and its entry name, pinned to PTX ISA ``PTX_VERSION``;
- the block size (``num_warps * 32``) and dynamic shared memory;
- the launch grid as a function of shapes;
- the int-only scalar arguments, in kernel order. Every kernel takes its input pointers, then its
  int scalars, then its output pointers (the QDP calling convention); floats (eps, softmax scale) are
  constexprs baked into the PTX, per-tensor FP8 scales are a device-tensor input.

AOT contract (what the plugin must guarantee, and what lets the PTX use vector loads): contiguous
tensors (innermost strides are the constexpr 1), 16-byte-aligned pointers, and model widths (d, F,
H*D) divisible by 16. Sequence lengths are free.

Kernels decorated under ``TRITON_INTERPRET=1`` are interpreter objects that cannot be compiled; use
:func:`compile_all_subprocess`, which compiles in a child process without that variable.

``python -m javisrt.kernels.aot`` prints a JSON summary of every kernel configuration.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
import tempfile
from dataclasses import asdict, dataclass, field
from typing import Any

import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget

from javisrt.engine.errors import UnavailableError
from javisrt.kernels import adaln_modulate, fp8_linear, is_interpreted, modality_ffn, rope_attention

TARGET = GPUTarget("cuda", 90, 32)  # sm_90a (H100/H200), warp size 32
PTX_VERSION = 87  # PTX ISA 8.7 (CUDA 12.8, Triton 3.7.1's ptxas); any r570+ driver can JIT it
H100_SMEM_PER_BLOCK = 227 * 1024  # opt-in maximum per block (cudaDevAttrMaxSharedMemoryPerBlockOptin)
H100_SMEM_PER_SM = 228 * 1024
H100_MAX_REGS_PER_THREAD = 255

_PTR_TYPES = {"bf16": "*bf16", "fp16": "*fp16", "fp32": "*fp32", "fp8": "*fp8e4nv"}
_TL_DTYPES = {"bf16": tl.bfloat16, "fp16": tl.float16, "fp32": tl.float32}


@dataclass(frozen=True)
class KernelSpec:
    """One compiled configuration of one kernel."""

    name: str  # e.g. "rope_attention.bf16.hd128"
    kernel: Any  # the @triton.jit function
    pointers: dict[str, str]  # pointer arg -> Triton pointer type; args absent here and set to None are constexpr
    constexprs: dict[str, Any]
    num_warps: int
    num_stages: int
    expect_wgmma: bool  # tensor-core kernel: its PTX must contain wgmma

    @property
    def arg_names(self) -> list[str]:
        return list(self.kernel.arg_names)

    @property
    def int_args(self) -> list[str]:
        """The runtime int scalars, in kernel order (the plugin's ``extra_args``)."""
        return [a for a in self.arg_names if a not in self.pointers and a not in self.constexprs]

    def signature(self) -> dict[str, str]:
        sig = {}
        for a in self.arg_names:
            if a in self.constexprs:
                sig[a] = "constexpr"
            elif a in self.pointers:
                sig[a] = self.pointers[a]
            else:
                sig[a] = "i32"
        return sig

    def attrs(self) -> dict[tuple[int, ...], list[list[Any]]]:
        """tt.divisibility 16 on every pointer and on every int except sequence lengths (AOT contract)."""
        free = {"L", "Lq", "Lk", "Lv", "H", "M"}
        return {
            (i,): [["tt.divisibility", 16]]
            for i, a in enumerate(self.arg_names)
            if a not in self.constexprs and a not in free
        }


@dataclass
class CompiledInfo:
    """What the compile produced and what ptxas says about it."""

    name: str
    entry: str
    num_warps: int
    block: int
    shared: int
    registers: int
    spill_stores: int
    spill_loads: int
    stack_frame: int
    wgmma: int
    ptx_target: str
    ptx_version: str
    global_scratch_size: int
    int_args: list[str]
    pointer_args: list[str]  # runtime pointers in kernel order (inputs first, outputs last)
    ptx_params: int  # parameters of the PTX entry: pointers + ints + Triton's implicit scratch pointers
    expect_wgmma: bool
    cubin_bytes: int
    ptx: str = field(repr=False, default="")


# ---------------------------------------------------------------------------------------------------
# The configurations
# ---------------------------------------------------------------------------------------------------


def _inner_strides(kernel: Any) -> dict[str, int]:
    """Innermost strides (names ending in d/f/k with unit stride in contiguous layouts) as constexpr 1."""
    unit = {
        "stride_xd", "stride_sd", "stride_cd", "stride_od", "stride_qd", "stride_kd", "stride_vd",
        "stride_md", "stride_wk", "stride_hf", "stride_xk", "stride_on",
    }  # fmt: skip
    return {a: 1 for a in kernel.arg_names if a in unit}


def kernel_specs(dtypes: tuple[str, ...] = ("bf16", "fp8"), head_dims: tuple[int, ...] = (128, 32),
                 dim: int = 1536, ffn_dim: int = 8960, eps: float = 1e-6) -> list[KernelSpec]:  # fmt: skip
    """Every kernel configuration the engine uses: per activation dtype ("bf16", "fp16") and "fp8"
    (bf16 activations, e4m3 GEMM/attention operands), for each head_dim."""
    specs: list[KernelSpec] = []
    for dt in dtypes:
        fp8 = dt == "fp8"
        act = "bf16" if fp8 else dt
        p = _PTR_TYPES[act]
        if not fp8:
            k = adaln_modulate._adaln_modulate_kernel
            cfg = adaln_modulate.launch_config(1, dim, interpreted=False)
            specs.append(KernelSpec(
                f"adaln_modulate.{dt}.d{dim}", k,
                {"x_ptr": p, "shift_ptr": p, "scale_ptr": p, "out_ptr": p},
                {**_inner_strides(k), "EPS": eps, "BLOCK_M": cfg["BLOCK_M"], "BLOCK_D": cfg["BLOCK_D"]},
                cfg["num_warps"], 1, expect_wgmma=False,
            ))  # fmt: skip
        k = rope_attention._rope_attention_kernel
        for hd in head_dims:
            for has_rope in (True, False):
                if fp8 and (not has_rope or hd < 64):
                    continue  # FP8: self-attention only (cross-attention stays bf16); e4m3 dots need K >= 32
                cfg = rope_attention.launch_config(hd, 1, 1, interpreted=False)
                ptrs = {"q_ptr": p, "k_ptr": p, "v_ptr": p, "out_ptr": p}
                const: dict[str, Any] = {**_inner_strides(k)}
                if has_rope:
                    ptrs |= {"cos_ptr": "*fp32", "sin_ptr": "*fp32"}
                else:
                    const |= {"cos_ptr": None, "sin_ptr": None, "stride_cl": 0, "stride_cd": 0}
                if fp8:
                    ptrs["scales_ptr"] = "*fp32"
                else:
                    const["scales_ptr"] = None
                const |= {
                    "HEAD_DIM": hd, "QK_SCALE": rope_attention.LOG2E / hd**0.5, "HAS_ROPE": has_rope, "FP8": fp8,
                    "SOFT_ROUND": False, "DOT_DTYPE": _TL_DTYPES[act], "PRECISION": "tf32",
                    "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n,
                }  # fmt: skip
                kind = "rope_attention" if has_rope else "cross_attention"
                specs.append(KernelSpec(f"{kind}.{dt}.hd{hd}", k, ptrs, const, cfg.num_warps, cfg.num_stages, True))
        wt = _PTR_TYPES["fp8"] if fp8 else p
        ht = _PTR_TYPES["fp8"] if fp8 else p
        scales: dict[str, str] = {"scales_ptr": "*fp32"} if fp8 else {}
        k = modality_ffn._ffn_up_kernel
        cfg = modality_ffn.launch_config(ffn_dim, dim, fp8, interpreted=False)
        specs.append(KernelSpec(
            f"ffn_up.{dt}.d{dim}.f{ffn_dim}", k,
            {"x_ptr": p, "mod_ptr": p, "w1v_ptr": wt, "w1a_ptr": wt, "b1v_ptr": p, "b1a_ptr": p, "h_ptr": ht, **scales},
            {**_inner_strides(k), **({} if fp8 else {"scales_ptr": None}), "EPS": eps, "FP8": fp8,
             "SOFT_ROUND": False, "DOT_DTYPE": _TL_DTYPES[act], "PRECISION": "tf32", "EVEN_K": dim % cfg.block_k == 0,
             "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m},
            cfg.num_warps, cfg.num_stages, True,
        ))  # fmt: skip
        k = modality_ffn._ffn_down_kernel
        cfg = modality_ffn.launch_config(dim, ffn_dim, fp8, interpreted=False)
        specs.append(KernelSpec(
            f"ffn_down.{dt}.d{dim}.f{ffn_dim}", k,
            {"h_ptr": ht, "mod_ptr": p, "w2v_ptr": wt, "w2a_ptr": wt, "b2v_ptr": p, "b2a_ptr": p, "x_ptr": p,
             "out_ptr": p, **scales},
            {**_inner_strides(k), **({} if fp8 else {"scales_ptr": None}), "FP8": fp8,
             "DOT_DTYPE": _TL_DTYPES[act], "PRECISION": "tf32", "EVEN_K": ffn_dim % cfg.block_k == 0,
             "BLOCK_M": cfg.block_m, "BLOCK_N": cfg.block_n, "BLOCK_K": cfg.block_k, "GROUP_M": cfg.group_m},
            cfg.num_warps, cfg.num_stages, True,
        ))  # fmt: skip
        if fp8:  # the attention Linears (d -> d) through the Triton FP8 GEMM (ops_triton_fp8 linear_impl="triton")
            k = fp8_linear._fp8_linear_kernel
            linear_cfg = modality_ffn.launch_config(dim, dim, fp8, interpreted=False)
            specs.append(KernelSpec(
                f"fp8_linear.{dt}.k{dim}.n{dim}", k,
                {"x_ptr": p, "w_ptr": wt, "bias_ptr": p, "in_scale_ptr": "*fp32", "w_scale_ptr": "*fp32", "out_ptr": p},
                {**_inner_strides(k), "SOFT_ROUND": False, "EVEN_K": dim % linear_cfg.block_k == 0,
                 "BLOCK_M": linear_cfg.block_m, "BLOCK_N": linear_cfg.block_n, "BLOCK_K": linear_cfg.block_k, "GROUP_M": linear_cfg.group_m},
                linear_cfg.num_warps, linear_cfg.num_stages, True,
            ))  # fmt: skip
    return specs


# ---------------------------------------------------------------------------------------------------
# Launch math (grid and int arguments as functions of shapes; contiguous layouts)
# ---------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class LaunchParams:
    grid: tuple[int, int, int]
    block: tuple[int, int, int]
    shared_mem: int
    int_args: list[tuple[str, int]]  # in kernel order


def int_arg_values(spec: KernelSpec, **shape: int) -> dict[str, int]:
    """Values of every runtime int argument for contiguous tensors of the given shape.

    adaln_modulate: B, L, d.  rope/cross_attention: B, Lq, Lk, H, D.  ffn_up/ffn_down: B, Lv, L, d, F.
    fp8_linear: M (tokens, B * L), N, K.
    """
    kind = spec.name.split(".")[0]
    if kind == "adaln_modulate":
        L, d = shape["L"], shape["d"]
        return {"L": L, "D": d, "stride_xb": L * d, "stride_xl": d, "stride_sb": d, "stride_cb": d,
                "stride_ob": L * d, "stride_ol": d}  # fmt: skip
    if kind in ("rope_attention", "cross_attention"):
        lq, lk, h, hd = shape["Lq"], shape["Lk"], shape["H"], shape["D"]
        vals = {"H": h, "Lq": lq, "Lk": lk,
                "stride_qb": lq * h * hd, "stride_ql": h * hd, "stride_qh": hd,
                "stride_kb": lk * h * hd, "stride_kl": h * hd, "stride_kh": hd,
                "stride_vb": lk * h * hd, "stride_vl": h * hd, "stride_vh": hd,
                "stride_cl": hd // 2,
                "stride_ob": lq * h * hd, "stride_ol": h * hd, "stride_oh": hd}  # fmt: skip
        return vals
    if kind in ("ffn_up", "ffn_down"):
        bsz, lv, L, d, f = shape["B"], shape["Lv"], shape["L"], shape["d"], shape["F"]
        mod = {"stride_me": 3 * bsz * d, "stride_mc": bsz * d, "stride_mb": d}  # [2, 3, B, d]
        act = {"stride_xb": L * d, "stride_xl": d, "stride_ob": L * d, "stride_ol": d}
        w = {"stride_wn": d if kind == "ffn_up" else f}  # w1 [F, d]: row stride d; w2 [d, F]: row stride F
        return {"Lv": lv, "L": L, "D": d, "F": f, **mod, **act, **w, "stride_hb": L * f, "stride_hl": f}
    if kind == "fp8_linear":
        m, n, k = shape["M"], shape["N"], shape["K"]
        return {"M": m, "N": n, "K": k, "stride_xm": k, "stride_wn": k, "stride_om": n}
    raise KeyError(kind)


def launch_params(spec: KernelSpec, info: CompiledInfo | None = None, **shape: int) -> LaunchParams:
    """Grid, block, shared memory and ordered int arguments of ``spec`` for ``shape`` (see int_arg_values)."""
    kind = spec.name.split(".")[0]
    c = spec.constexprs
    if kind == "adaln_modulate":
        grid = adaln_modulate.grid(shape["B"], shape["L"], c["BLOCK_M"])
    elif kind in ("rope_attention", "cross_attention"):
        grid = rope_attention.grid(shape["B"], shape["H"], shape["Lq"], c["BLOCK_M"])
    elif kind == "fp8_linear":
        grid = fp8_linear.grid(shape["M"], shape["N"], c["BLOCK_M"], c["BLOCK_N"])
    else:
        n = shape["F"] if kind == "ffn_up" else shape["d"]
        grid = modality_ffn.grid(shape["B"], shape["Lv"], shape["L"], n, c["BLOCK_M"], c["BLOCK_N"])
    values = int_arg_values(spec, **shape)
    return LaunchParams(
        grid=grid,
        block=(spec.num_warps * 32, 1, 1),
        shared_mem=info.shared if info is not None else -1,
        int_args=[(a, values[a]) for a in spec.int_args],
    )


# ---------------------------------------------------------------------------------------------------
# Compilation
# ---------------------------------------------------------------------------------------------------

_PTXAS_RE = {
    "registers": re.compile(r"Used (\d+) registers"),
    "stack_frame": re.compile(r"(\d+) bytes stack frame"),
    "spill_stores": re.compile(r"(\d+) bytes spill stores"),
    "spill_loads": re.compile(r"(\d+) bytes spill loads"),
}


def ptxas_info(ptx: str, arch: str = "sm_90a") -> dict[str, int]:
    """Registers, stack frame and spill bytes reported by ``ptxas -v`` (Triton's bundled ptxas)."""
    from triton.backends.nvidia.compiler import get_ptxas

    ptxas = get_ptxas(TARGET.arch).path
    with tempfile.TemporaryDirectory() as tmp:
        src = os.path.join(tmp, "k.ptx")
        with open(src, "w") as f:
            f.write(ptx)
        res = subprocess.run(
            [ptxas, f"-arch={arch}", "-v", src, "-o", os.path.join(tmp, "k.cubin")],
            capture_output=True, text=True, check=True,
        )  # fmt: skip
    out: dict[str, int] = {}
    for key, rx in _PTXAS_RE.items():
        m = rx.search(res.stderr)
        out[key] = int(m.group(1)) if m else 0
    return out


def _entry_param_count(ptx: str, entry: str) -> int:
    m = re.search(r"\.entry\s+" + re.escape(entry) + r"\s*\((.*?)\)", ptx, re.S)
    return len(re.findall(r"\.param\s", m.group(1))) if m else -1


def compile_spec(spec: KernelSpec) -> tuple[CompiledInfo, Any]:
    """Compile ``spec`` for sm_90a; returns the summary and Triton's CompiledKernel (``.asm`` has ptx/cubin)."""
    if is_interpreted(spec.kernel):
        raise UnavailableError(
            "the kernels were decorated under TRITON_INTERPRET=1 and cannot be compiled; "
            "use compile_all_subprocess() or unset TRITON_INTERPRET"
        )
    src = triton.compiler.ASTSource(fn=spec.kernel, signature=spec.signature(), constexprs=spec.constexprs,
                                    attrs=spec.attrs())  # fmt: skip
    ck = triton.compile(src, target=TARGET, options={"num_warps": spec.num_warps, "num_stages": spec.num_stages,
                                                     "ptx_version": PTX_VERSION})  # fmt: skip
    ptx = ck.asm["ptx"]
    md = ck.metadata
    pinfo = ptxas_info(ptx)
    target = re.search(r"^\.target\s+(\S+)", ptx, re.M)
    version = re.search(r"^\.version\s+(\S+)", ptx, re.M)
    info = CompiledInfo(
        name=spec.name,
        entry=md.name,
        num_warps=md.num_warps,
        block=md.num_warps * 32,
        shared=md.shared,
        registers=pinfo["registers"],
        spill_stores=pinfo["spill_stores"],
        spill_loads=pinfo["spill_loads"],
        stack_frame=pinfo["stack_frame"],
        wgmma=len(re.findall(r"\bwgmma\.mma_async", ptx)),
        ptx_target=target.group(1) if target else "",
        ptx_version=version.group(1) if version else "",
        global_scratch_size=int(getattr(md, "global_scratch_size", 0) or 0),
        int_args=spec.int_args,
        pointer_args=[a for a in spec.arg_names if a in spec.pointers],
        ptx_params=_entry_param_count(ptx, md.name),
        expect_wgmma=spec.expect_wgmma,
        cubin_bytes=len(ck.asm["cubin"]),
        ptx=ptx,
    )
    return info, ck


def compile_all(specs: list[KernelSpec] | None = None, keep_ptx: bool = False) -> list[CompiledInfo]:
    """Compile every configuration in this process (needs the kernels not to be interpreter objects)."""
    out = []
    for spec in specs if specs is not None else kernel_specs():
        info, _ = compile_spec(spec)
        if not keep_ptx:
            info.ptx = ""
        out.append(info)
    return out


def compile_all_subprocess(args: list[str] | None = None, timeout: float = 600) -> list[dict[str, Any]]:
    """:func:`compile_all` in a child Python without ``TRITON_INTERPRET`` (works from interpreter sessions)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    res = subprocess.run(
        [sys.executable, "-m", "javisrt.kernels.aot", *(args or [])],
        capture_output=True, text=True, env=env, timeout=timeout,
    )  # fmt: skip
    if res.returncode != 0:
        raise RuntimeError(f"AOT compile failed (rc {res.returncode}):\n{res.stderr[-4000:]}")
    return json.loads(res.stdout)  # type: ignore[no-any-return]


def main(argv: list[str] | None = None) -> int:
    import argparse

    ap = argparse.ArgumentParser(description="Compile javisrt kernels for sm_90a; print a JSON summary.")
    ap.add_argument("--dtypes", default="bf16,fp8", help="comma list of bf16, fp16, fp8")
    ap.add_argument("--head-dims", default="128,32", help="comma list of head dims")
    ap.add_argument("--only", default="", help="substring filter on kernel names")
    ap.add_argument("--ptx-dir", default="", help="also write <name>.ptx files here")
    a = ap.parse_args(argv)
    specs = kernel_specs(tuple(a.dtypes.split(",")), tuple(int(h) for h in a.head_dims.split(",")))
    specs = [s for s in specs if a.only in s.name]
    infos = compile_all(specs, keep_ptx=bool(a.ptx_dir))
    if a.ptx_dir:
        os.makedirs(a.ptx_dir, exist_ok=True)
        for info in infos:
            with open(os.path.join(a.ptx_dir, info.name + ".ptx"), "w") as f:
                f.write(info.ptx)
            info.ptx = ""
    json.dump([asdict(i) for i in infos], sys.stdout, indent=1)
    return 0


__all__ = [
    "H100_SMEM_PER_BLOCK",
    "H100_SMEM_PER_SM",
    "PTX_VERSION",
    "TARGET",
    "CompiledInfo",
    "KernelSpec",
    "LaunchParams",
    "compile_all",
    "compile_all_subprocess",
    "compile_spec",
    "kernel_specs",
    "launch_params",
    "ptxas_info",
]

if __name__ == "__main__":
    raise SystemExit(main())

