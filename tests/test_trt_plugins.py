"""The TensorRT plugin side without TensorRT: PTX for every plugin kernel, and the launch math.

References: the Triton launcher's own grid (``kernels/*.grid`` via ``kernels/aot.launch_params``),
and the strides torch gives contiguous tensors of the same shapes (independent of both).
"""

from __future__ import annotations

import os

import pytest
import torch
import triton

from javisrt.engine.errors import ConfigError
from javisrt.export import plugin_ops, trt_plugins
from javisrt.kernels import aot, is_interpreted

# (B, Lq, Lk, H, D): tile multiples, ragged lengths (not multiples of BLOCK_M=128 / BLOCK_N=64),
# a single token, cross-attention to the 512 text tokens, the tiny preset's head_dim 32.
SHAPES = [(2, 1024, 1024, 12, 128), (2, 1000, 1000, 12, 128), (1, 1, 1, 12, 128), (2, 4097, 512, 12, 128),
          (1, 129, 7, 2, 32)]  # fmt: skip


def _spec(op: str, head_dim: int) -> aot.KernelSpec:
    name = f"{trt_plugins.PLUGINS[op].kernel_kind}.bf16.hd{head_dim}"
    return {s.name: s for s in aot.kernel_specs(("bf16",), (head_dim,))}[name]


@pytest.mark.parametrize("op", sorted(trt_plugins.PLUGINS))
@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: "x".join(map(str, s)))
def test_launch_math_matches_triton_launcher(op: str, shape: tuple[int, ...]) -> None:
    b, lq, lk, h, d = shape
    if op == "rope_attention" and lq != lk:
        lk = lq  # self-attention
    spec = _spec(op, d)
    ours = trt_plugins.attention_launch([b, lq, h, d], [b, lk, h, d], spec.constexprs["BLOCK_M"], triton.cdiv, 1,
                                          trt_plugins.PLUGINS[op].has_rope)
    theirs = aot.launch_params(spec, B=b, Lq=lq, Lk=lk, H=h, D=d)
    assert ours.grid == theirs.grid
    assert ours.grid[0] * spec.constexprs["BLOCK_M"] >= lq > (ours.grid[0] - 1) * spec.constexprs["BLOCK_M"]
    # every runtime int of the kernel, in kernel order (the plugin's extra_args order)
    assert set(ours.int_args) == set(spec.int_args)
    assert [(n, ours.int_args[n]) for n in spec.int_args] == theirs.int_args
    # strides = what the Triton launcher would pass for contiguous torch tensors
    meta = {"q": torch.empty(b, lq, h, d, device="meta"), "k": torch.empty(b, lk, h, d, device="meta"),
            "c": torch.empty(lq, d // 2, device="meta")}  # fmt: skip
    meta["v"], meta["o"] = meta["k"], meta["q"]
    for t in "qkvo":
        for axis, suffix in enumerate("blh"):
            assert ours.int_args[f"stride_{t}{suffix}"] == meta[t].stride(axis), (t, suffix)
    if trt_plugins.PLUGINS[op].has_rope:
        assert ours.int_args["stride_cl"] == meta["c"].stride(0)


def test_plugin_io_matches_the_exported_nodes() -> None:
    """Plugin inputs = the export's node inputs; no attributes beyond the reserved ones."""
    for op, plugin in trt_plugins.PLUGINS.items():
        node = plugin_ops.PLUGIN_OPS[op]
        assert list(plugin.inputs) == node["inputs"] and node["outputs"] == ["out"]
        assert set(node["attrs"]) <= set(plugin_ops.RESERVED_ATTRS)  # register() takes no attributes
        n_types = len([t for t in plugin.io_types.split(",") if t.strip()])
        assert n_types == len(plugin.inputs) + 1
    assert set(plugin_ops.PLUGIN_OPS) == set(trt_plugins.PLUGINS) | set(trt_plugins.NOT_AOT)


def test_modality_ffn_is_refused_with_the_reason() -> None:
    with pytest.raises(ConfigError, match="two kernel launches"):
        trt_plugins.plugin_records(["modality_ffn"])


@pytest.fixture(scope="module")
def compiled() -> dict[str, dict[str, object]]:
    """PTX of every plugin kernel for sm_90a (in a child process if the kernels are interpreted)."""
    specs = [_spec(op, 128) for op in sorted(trt_plugins.PLUGINS)]
    if any(is_interpreted(s.kernel) for s in specs) or os.environ.get("TRITON_INTERPRET"):
        names = [s.name for s in specs]
        out = {}
        for name in names:
            (info,) = [i for i in aot.compile_all_subprocess(["--dtypes", "bf16", "--head-dims", "128", "--only", name])
                       if i["name"] == name]  # fmt: skip
            out[name] = info
        return out
    return {s.name: vars(trt_plugins.kernel_for(op, "bf16", 128)[1]) for op, s in zip(sorted(trt_plugins.PLUGINS), specs)}


@pytest.mark.parametrize("op", sorted(trt_plugins.PLUGINS))
def test_plugin_ptx_for_sm90a(op: str, compiled: dict[str, dict[str, object]]) -> None:
    spec = _spec(op, 128)
    info = compiled[spec.name]
    plugin = trt_plugins.PLUGINS[op]
    assert info["ptx_target"] == "sm_90a"
    assert info["ptx_version"] == f"{aot.PTX_VERSION // 10}.{aot.PTX_VERSION % 10}"
    # QDP order: inputs (node order), int scalars, outputs; + Triton's two implicit scratch pointers
    pointer_args = info["pointer_args"]
    assert isinstance(pointer_args, list) and len(pointer_args) == len(plugin.inputs) + 1
    assert [p.removesuffix("_ptr") for p in pointer_args[:-1]] == list(plugin.inputs)
    assert pointer_args[-1] == "out_ptr"
    assert info["ptx_params"] == len(pointer_args) + len(spec.int_args) + 2
    assert info["global_scratch_size"] == 0
    assert 0 < int(info["shared"]) <= aot.H100_SMEM_PER_BLOCK  # type: ignore[call-overload]
    assert info["block"] == spec.num_warps * 32
    assert int(info["wgmma"]) > 0  # type: ignore[call-overload]


@pytest.mark.tensorrt
def test_register_all_with_tensorrt() -> None:  # pragma: no cover - GPU machines with TensorRT
    import tensorrt as trt

    trt_plugins.register_all()
    creators = {(c.name, c.plugin_namespace) for c in trt.get_plugin_registry().all_creators}
    for op in trt_plugins.PLUGINS:
        assert (op, trt_plugins.NAMESPACE) in creators
