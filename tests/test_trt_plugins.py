"""The TensorRT plugin side without TensorRT: PTX for every plugin kernel, and the launch math.

References: the Triton launcher's own grid (``kernels/*.grid`` via ``kernels/aot.launch_params``),
and the strides torch gives contiguous tensors of the same shapes (independent of both).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

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


# ---- a stand-in for tensorrt.plugin that models the real API -----------------------------------------
# Modelled on NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/plugin/_tensor.py (ShapeExpr,
# SymInt32, SymIntExprs, TensorDesc, KernelLaunchParams) and _top_level.py (cdiv), read for this test:
# ShapeExpr.is_constant / is_fake and TensorDesc.shape_expr / dtype are properties, constant_value() is a
# method, KernelLaunchParams only accepts grid_*/block_*/shared_mem (each wrapped in SymInt32),
# SymIntExprs items must be SymIntExpr or int, cdiv refuses two ints. Expressions carry a concrete value
# here (the shape the test asks about) so the symbolic launch can be evaluated.


class _SymInt32:
    def __init__(self, value: object = None, constant: bool = True) -> None:
        if isinstance(value, _SymInt32):
            self._v, self._const = value._v, value._const
        elif isinstance(value, int) and not isinstance(value, bool):
            self._v, self._const = value, constant
        else:
            raise TypeError(f"SymInt32({value!r}): needs int or a symbolic int")

    def _op(self, other: object, fn: Any) -> _ShapeExpr:
        o = other if isinstance(other, _SymInt32) else _SymInt32(other)
        return _ShapeExpr(fn(self._v, o._v), self._const and o._const)

    def __add__(self, o: object) -> _ShapeExpr:
        return self._op(o, lambda a, b: a + b)

    def __sub__(self, o: object) -> _ShapeExpr:
        return self._op(o, lambda a, b: a - b)

    def __mul__(self, o: object) -> _ShapeExpr:
        return self._op(o, lambda a, b: a * b)

    def __floordiv__(self, o: object) -> _ShapeExpr:
        return self._op(o, lambda a, b: a // b)

    def __int__(self) -> int:  # the real expressions have no __int__: evaluation is for the test only
        raise TypeError("symbolic expressions have no int(); use constant_value()")

    @property
    def is_constant(self) -> bool:
        return self._const

    def constant_value(self) -> int:
        if not self._const:
            raise RuntimeError("Not accessible for non-constant shape expressions")
        return self._v


class _ShapeExpr(_SymInt32):
    @property
    def is_fake(self) -> bool:
        return False


class _SymExprs:
    def __init__(self, length: int) -> None:
        self._exprs: list[Any] = [None] * length

    def __setitem__(self, i: int, value: object) -> None:
        if i >= len(self._exprs):
            raise IndexError("Index out of range")
        if not isinstance(value, _SymInt32):
            if not isinstance(value, int):
                raise ValueError(f"Value should be int or SymIntExpr. Got '{type(value)}'")
            value = _SymInt32(value)
        self._exprs[i] = value

    def __iter__(self) -> Any:
        return iter(self._exprs)


class _KernelLaunchParams:
    _FIELDS = ("grid_x", "grid_y", "grid_z", "block_x", "block_y", "block_z", "shared_mem")

    def __init__(self) -> None:
        for f in self._FIELDS:
            self.__dict__[f] = _SymInt32(0 if f == "shared_mem" else 1)

    def __setattr__(self, name: str, value: object) -> None:
        if name not in self._FIELDS:
            raise AttributeError(f"KernelLaunchParams object has no attribute '{name}'")
        self.__dict__[name] = _SymInt32(value)


class _TensorDesc:
    def __init__(self, shape: list[_ShapeExpr], dtype: str) -> None:
        self._shape_expr, self._dtype = shape, dtype

    @property
    def shape_expr(self) -> list[_ShapeExpr]:
        return self._shape_expr

    @property
    def dtype(self) -> str:
        return self._dtype

    def like(self) -> _TensorDesc:
        return _TensorDesc(self._shape_expr, self._dtype)


def _cdiv(first: object, second: object) -> _ShapeExpr:
    if isinstance(first, int) and isinstance(second, int):
        raise ValueError("Both arguments cannot be 'int's")
    a = first if isinstance(first, _SymInt32) else _SymInt32(first)
    return a._op(second, lambda x, y: -(-x // y))


@pytest.fixture
def fake_trtp(monkeypatch: pytest.MonkeyPatch) -> dict[str, dict[str, Any]]:
    """``tensorrt`` + ``tensorrt.plugin`` stand-ins; returns the registry {kind: {plugin id: function}}."""
    import sys
    import types

    registry: dict[str, dict[str, Any]] = {"register": {}, "autotune": {}, "aot_impl": {}}

    def decorator(kind: str) -> Any:
        def make(plugin_id: str, lazy_register: bool = False) -> Any:
            def wrap(fn: Any) -> Any:
                registry[kind][plugin_id] = fn
                return fn

            return wrap

        return make

    trt = types.ModuleType("tensorrt")
    trt.__version__ = "11.1.0.0"  # type: ignore[attr-defined]
    trt.Runtime = object  # type: ignore[attr-defined]
    trt.QuickPluginCreationRequest = object  # type: ignore[attr-defined]
    trt.DataType = types.SimpleNamespace(BF16="BF16", FLOAT="FLOAT")  # type: ignore[attr-defined]
    trtp = types.ModuleType("tensorrt.plugin")
    for name, value in {
        "SymInt32": _SymInt32, "SymExprs": _SymExprs, "SymIntExprs": _SymExprs, "ShapeExpr": _ShapeExpr,
        "KernelLaunchParams": _KernelLaunchParams, "TensorDesc": _TensorDesc, "cdiv": _cdiv,
        "AutoTuneCombination": lambda io_types, formats="LINEAR": (io_types, formats),
        "register": decorator("register"), "autotune": decorator("autotune"), "aot_impl": decorator("aot_impl"),
    }.items():  # fmt: skip
        setattr(trtp, name, value)
    trt.plugin = trtp  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "tensorrt", trt)
    monkeypatch.setitem(sys.modules, "tensorrt.plugin", trtp)
    monkeypatch.setattr(trt_plugins, "_registered", set())
    return registry


@pytest.mark.parametrize("op", sorted(trt_plugins.PLUGINS))
def test_aot_impl_against_the_plugin_api(op: str, fake_trtp: dict[str, dict[str, Any]],
                                         monkeypatch: pytest.MonkeyPatch) -> None:  # fmt: skip
    """register_all() + the registered aot_impl called the way TensorRT calls it (dynamic batch and
    length, static heads and head_dim): its launch parameters and extra int args, evaluated, equal the
    Triton launcher's. Catches API misuse such as ``int(hd.constant_value)`` (a method in tensorrt.plugin)."""
    import types

    b, lq, lk, h, d = 2, 1000, 1000 if op == "rope_attention" else 512, 12, 128
    spec = _spec(op, d)
    info = types.SimpleNamespace(entry=f"{op}_kernel", ptx="// ptx", block=spec.num_warps * 32, shared=112 * 1024)
    monkeypatch.setattr(trt_plugins, "kernel_for", lambda op_, dtype, head_dim: (spec, info))
    trt_plugins.register_all()
    plugin_id = f"{trt_plugins.NAMESPACE}::{op}"
    assert set(fake_trtp["register"]) == set(fake_trtp["aot_impl"]) == {f"javisrt::{o}" for o in trt_plugins.PLUGINS}

    def desc(*dims: tuple[int, bool]) -> _TensorDesc:
        return _TensorDesc([_ShapeExpr(v, constant=c) for v, c in dims], "BF16")

    q = desc((b, False), (lq, False), (h, True), (d, True))
    k = desc((b, False), (lk, False), (h, True), (d, True))
    inputs = [q, k, k] + ([desc((lq, False), (d // 2, True))] * 2 if trt_plugins.PLUGINS[op].has_rope else [])
    out = fake_trtp["register"][plugin_id](*inputs)
    name, ptx, params, extra = fake_trtp["aot_impl"][plugin_id](*inputs, (out,), 0)
    assert (name, ptx) == (info.entry, info.ptx)
    theirs = aot.launch_params(spec, B=b, Lq=lq, Lk=lk, H=h, D=d)
    assert (params.grid_x._v, params.grid_y._v, params.grid_z._v) == theirs.grid
    assert params.block_x._v == spec.num_warps * 32 and params.shared_mem._v == 112 * 1024
    assert [(n, e._v) for n, e in zip(spec.int_args, extra, strict=True)] == theirs.int_args
    # a dynamic head_dim is refused with the reason, not a TypeError
    q_dyn = desc((b, False), (lq, False), (h, True), (d, False))
    with pytest.raises(ConfigError, match="static head_dim"):
        fake_trtp["aot_impl"][plugin_id](q_dyn, *inputs[1:], (out,), 0)


# ---- the first GPU check: shared memory above 48 KiB in an AOT plugin (bench/gpu_check.py) ---------


def test_gpu_check_asks_the_smem_question_first(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """gpu_check runs check_aot_plugin_smem before any engine build, and its graph is the plugin-flavour
    rope_attention node at head_dim 128 (the kernel whose shared memory exceeds 48 KiB)."""
    import types

    import onnx

    from javisrt.bench import gpu_check
    from javisrt.export import tensorrt_api

    model = onnx.load(str(gpu_check.aot_smem_graph(tmp_path / "g.onnx")))
    (node,) = model.graph.node
    assert (node.domain, node.op_type) == (plugin_ops.DOMAIN, "rope_attention")
    assert list(node.input) == plugin_ops.PLUGIN_OPS["rope_attention"]["inputs"]
    assert {a.name: a.s.decode() for a in node.attribute} == {"plugin_namespace": "javisrt"}
    assert model.graph.input[0].type.tensor_type.shape.dim[3].dim_value == 128
    order: list[str] = []
    monkeypatch.setattr(tensorrt_api, "import_tensorrt", lambda: types.SimpleNamespace(__version__="11.4.0.106"))
    monkeypatch.setattr(tensorrt_api, "device_compute_capability", lambda device_id=0: (9, 0))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "get_device_name", lambda *a: "stand-in")
    monkeypatch.setattr(gpu_check, "check_aot_plugin_smem", lambda out: order.append("smem") or {"ok": True})
    monkeypatch.setattr(gpu_check, "check_one", lambda p, prec, args: order.append(f"{p}.{prec}") or gpu_check.Row(p, prec, ok=True))
    assert gpu_check.main(["--out", str(tmp_path / "out"), "--presets", "tiny", "--precisions", "bf16"]) == 0
    assert order == ["smem", "tiny.bf16"]
    assert json.loads((tmp_path / "out" / "aot_smem.json").read_text()) == {"ok": True}


@pytest.mark.gpu
@pytest.mark.tensorrt
def test_aot_plugin_above_48k_shared_memory(tmp_path: Path) -> None:  # pragma: no cover - GPU + TensorRT
    from javisrt.bench import gpu_check

    result = gpu_check.check_aot_plugin_smem(tmp_path)
    assert result["above_default_limit"], result  # the question is only asked by a kernel above 48 KiB
    assert result["ok"], result
