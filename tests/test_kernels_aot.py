"""kernels/aot.py: every kernel compiles ahead of time for Hopper (sm_90a) on a machine without a GPU.

The compile runs in a child process without TRITON_INTERPRET (conftest.py sets it on machines without a
GPU, and kernels decorated under it are interpreter objects). Checks per configuration (bf16 and fp8): PTX targets
sm_90a at the pinned PTX ISA, no local-memory spills, shared memory within the H100 per-block limit,
wgmma in the attention and GEMM kernels (the FFN and the FP8 Linear), no global scratch (a TensorRT AOT plugin cannot provide it),
and a PTX entry whose parameters are exactly pointers + int scalars + Triton's two implicit scratch
pointers. The launch math is checked against torch's strides of contiguous tensors.
"""

from __future__ import annotations

import pytest
import torch

from javisrt.kernels import aot

EXPECTED = {
    "adaln_modulate.bf16.d1536",
    "rope_attention.bf16.hd128",
    "cross_attention.bf16.hd128",
    "rope_attention.bf16.hd32",
    "cross_attention.bf16.hd32",
    "ffn_up.bf16.d1536.f8960",
    "ffn_down.bf16.d1536.f8960",
    "rope_attention.fp8.hd128",
    "ffn_up.fp8.d1536.f8960",
    "ffn_down.fp8.d1536.f8960",
    "fp8_linear.fp8.k1536.n1536",
}


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict]:  # type: ignore[type-arg]
    infos = aot.compile_all_subprocess(["--dtypes", "bf16,fp8", "--head-dims", "128,32"])
    for i in infos:
        print(
            f"{i['name']:30s} regs {i['registers']:3d} smem {i['shared'] / 1024:6.1f} KiB spills "
            f"{i['spill_stores']}/{i['spill_loads']} B wgmma {i['wgmma']:2d} {i['ptx_target']} PTX {i['ptx_version']}"
        )
    return {i["name"]: i for i in infos}


def test_every_kernel_compiles(compiled) -> None:  # type: ignore[no-untyped-def]
    assert set(compiled) == EXPECTED


@pytest.mark.parametrize("name", sorted(EXPECTED))
def test_sm90a_ptx_resources(compiled, name: str) -> None:  # type: ignore[no-untyped-def]
    i = compiled[name]
    assert i["ptx_target"] == "sm_90a"
    assert i["ptx_version"] == f"{aot.PTX_VERSION // 10}.{aot.PTX_VERSION % 10}"
    assert i["spill_stores"] == 0 and i["spill_loads"] == 0, f"{name}: local-memory spills"
    assert i["stack_frame"] == 0, f"{name}: stack frame {i['stack_frame']} B"
    assert 0 < i["registers"] <= aot.H100_MAX_REGS_PER_THREAD
    assert i["registers"] * i["block"] <= 65536, f"{name}: one CTA does not fit the register file"
    assert i["shared"] <= aot.H100_SMEM_PER_BLOCK, f"{name}: {i['shared']} B shared memory"
    assert i["global_scratch_size"] == 0, f"{name}: needs global scratch, which a TensorRT AOT plugin cannot give"
    if i["expect_wgmma"]:
        assert i["wgmma"] > 0, f"{name}: no wgmma in the PTX"
    # QDP calling convention: pointers and ints are the kernel's parameters, plus 2 implicit scratch pointers.
    assert i["ptx_params"] == len(i["pointer_args"]) + len(i["int_args"]) + 2
    assert i["cubin_bytes"] > 0


def test_calling_convention_inputs_ints_outputs() -> None:
    """Every spec lists its input pointers, then its int scalars, then its output pointers."""
    for spec in aot.kernel_specs():
        outputs = {"out_ptr"} | ({"h_ptr"} if spec.name.startswith("ffn_up") else set())
        runtime = [a for a in spec.arg_names if a not in spec.constexprs]
        kinds = ["out" if a in outputs else "ptr" if a in spec.pointers else "int" for a in runtime]
        assert kinds == sorted(kinds, key=["ptr", "int", "out"].index), f"{spec.name}: {list(zip(runtime, kinds))}"


def _spec(prefix: str) -> aot.KernelSpec:
    return next(s for s in aot.kernel_specs() if s.name.startswith(prefix))


def _strides(*shape: int) -> tuple[int, ...]:
    return torch.empty(*shape, device="meta").stride()


def test_launch_math_240p() -> None:
    """Grid and int arguments for the 240p / 4 s case with CFG (Lv 6885, La 416, B 2)."""
    b, lv, la, d, f, h, hd = 2, 6885, 416, 1536, 8960, 12, 128
    L = lv + la
    up = aot.launch_params(_spec("ffn_up.bf16"), B=b, Lv=lv, L=L, d=d, F=f)
    assert up.grid == ((54 + 4) * 70, b, 1)  # video M tiles + audio M tiles (never straddling Lv), x N tiles
    assert up.block == (256, 1, 1)
    args = dict(up.int_args)
    assert (args["stride_xb"], args["stride_xl"]) == _strides(b, L, d)[:2]
    assert (args["stride_me"], args["stride_mc"], args["stride_mb"]) == _strides(2, 3, b, d)[:3]
    assert args["stride_wn"] == _strides(f, d)[0] and (args["stride_hb"], args["stride_hl"]) == _strides(b, L, f)[:2]
    down = aot.launch_params(_spec("ffn_down.bf16"), B=b, Lv=lv, L=L, d=d, F=f)
    assert down.grid == ((54 + 4) * 12, b, 1) and dict(down.int_args)["stride_wn"] == _strides(d, f)[0]
    att = aot.launch_params(_spec("rope_attention.bf16.hd128"), B=b, Lq=L, Lk=L, H=h, D=hd)
    assert att.grid == (58, b * h, 1)
    a = dict(att.int_args)
    assert (a["stride_qb"], a["stride_ql"], a["stride_qh"]) == _strides(b, L, h, hd)[:3]
    assert a["stride_cl"] == _strides(L, hd // 2)[0]
    cross = aot.launch_params(_spec("cross_attention.bf16.hd128"), B=b, Lq=L, Lk=512, H=h, D=hd)
    assert "stride_cl" not in dict(cross.int_args) and dict(cross.int_args)["stride_kb"] == _strides(b, 512, h, hd)[0]
    mod = aot.launch_params(_spec("adaln_modulate"), B=b, L=L, d=d)
    assert mod.grid == (-(-L // 4), b, 1)
    lin = aot.launch_params(_spec("fp8_linear.fp8"), M=b * L, N=d, K=d)  # an attention Linear on B*L tokens
    assert lin.grid == (115 * 12, 1, 1) and lin.block == (256, 1, 1)  # cdiv(14602, 128) M tiles x 1536/128 N tiles
    la = dict(lin.int_args)
    assert (la["M"], la["N"], la["K"]) == (b * L, d, d)
    assert la["stride_xm"] == _strides(b * L, d)[0] and la["stride_wn"] == _strides(d, d)[0]
    assert la["stride_om"] == _strides(b * L, d)[0]
    for p in (up, down, att, cross, mod, lin):
        assert all(isinstance(v, int) and 0 <= v < 2**31 for _, v in p.int_args)  # i32 scalars
