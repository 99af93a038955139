"""TensorRT Quickly-Deployable-Plugin (``tensorrt.plugin``) registrations of javisrt's custom ONNX ops,
with ahead-of-time implementations from the Triton kernels (tensorrt-notes.md §1).

An engine built with these plugins embeds the kernels' PTX (sm_90a, PTX ISA pinned by
``kernels/aot.PTX_VERSION``) and symbolic launch parameters, so it runs from C++ or trtexec with no
Python. Rules applied (§1.1, §1.3):

* node ``javisrt::<op>`` (domain = plugin namespace, also the ``plugin_namespace`` attribute) maps
  to the plugin ``javisrt::<op>``; registration is eager (``lazy_register=False``) so the ONNX parser
  finds the creator, and :func:`register_all` must run before parsing (``export/trt_build.py`` does);
* kernel calling convention ``(input pointers..., int scalars..., output pointers...)``; floats
  (softmax scale, eps) are constexprs baked into the PTX; the int scalars are ``SymInt32``
  expressions of the I/O shapes; the grid likewise (``trtp.cdiv``);
* one PTX per (I/O dtypes, tactic): shapes are never specialised into the kernel.

Module layout: the launch math (:func:`attention_launch`) is written once over an abstract number
type, so the *same* function yields SymInt32 expressions inside ``aot_impl`` and plain ints in the CPU
tests (tests/test_trt_plugins.py compares those ints with the Triton launcher's own grid and with the
strides of contiguous torch tensors). ``tensorrt`` is imported only inside :func:`register_all`.

Not a plugin: ``javisrt::modality_ffn`` (see :data:`NOT_AOT`): it is two kernel launches with a
[B, L, F] intermediate, and its video/audio split point is the *value* of a shape tensor; a QDP AOT
implementation is one kernel whose extra arguments are expressions of I/O *shapes* only, with no
workspace. The native flavour's Slice -> two expert MLPs -> Concat is what TensorRT builds today; a
C++ IPluginV3 around the same PTX (tensorrt-notes §1.4) is the way to a fused FFN.
"""

# No `from __future__ import annotations` here: tensorrt.plugin reads the decorated functions'
# annotations at registration and needs the real trtp.TensorDesc objects, not strings.
import functools
import logging
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

from javisrt.engine.errors import ConfigError
from javisrt.export import engine_meta

log = logging.getLogger(__name__)

NAMESPACE = "javisrt"

NOT_AOT = {
    "modality_ffn": (
        "javisrt::modality_ffn has no AOT TensorRT plugin: it needs two kernel launches (ffn_up, ffn_down) with a "
        "[B, L, F] intermediate and takes the video/audio split from a shape tensor's value, while a QDP AOT "
        "plugin launches one kernel whose int arguments are expressions of I/O shapes (tensorrt-notes §1.1). "
        "Export with `javisrt export --flavor plugin --ffn native` (attention plugins, TensorRT's GEMMs for the "
        "FFN) or the native flavour, or add a C++ IPluginV3 (§1.4)."
    )
}


@dataclass(frozen=True)
class PluginSpec:
    """One AOT plugin: the ONNX op, the aot.py kernel family, and its I/O type combination."""

    op: str  # ONNX op_type == plugin name
    kernel_kind: str  # kernels/aot.py spec-name prefix
    inputs: tuple[str, ...]
    io_types: str  # AutoTuneCombination type string, inputs then outputs
    has_rope: bool


PLUGINS: dict[str, PluginSpec] = {
    "rope_attention": PluginSpec(
        "rope_attention", "rope_attention", ("q", "k", "v", "cos", "sin"), "BF16, BF16, BF16, FP32, FP32, BF16", True
    ),
    "attention": PluginSpec("attention", "cross_attention", ("q", "k", "v"), "BF16, BF16, BF16, BF16", False),
}


# ---- launch math over an abstract number type ----------------------------------------------------


@dataclass(frozen=True)
class Launch:
    grid: tuple[Any, Any, Any]
    int_args: dict[str, Any]  # name -> value/expression, every runtime int of the kernel


def attention_launch(
    q_shape: Sequence[Any], k_shape: Sequence[Any], block_m: int, cdiv: Callable[[Any, int], Any], one: Any,
    has_rope: bool,
) -> Launch:
    """Grid and int arguments of ``_rope_attention_kernel`` for contiguous q [B, Lq, H, D], k/v
    [B, Lk, H, D], cos/sin [Lq, D/2] (``has_rope``), out like q. ``one`` is the number type's 1 (grid z)."""
    b, lq, h, d = q_shape
    lk = k_shape[1]
    hd = h * d
    q_b, k_b = lq * hd, lk * hd
    ints: dict[str, Any] = {
        "H": h, "Lq": lq, "Lk": lk,
        "stride_qb": q_b, "stride_ql": hd, "stride_qh": d,
        "stride_kb": k_b, "stride_kl": hd, "stride_kh": d,
        "stride_vb": k_b, "stride_vl": hd, "stride_vh": d,
        "stride_cl": d // 2,
        "stride_ob": q_b, "stride_ol": hd, "stride_oh": d,
    }  # fmt: skip
    if not has_rope:
        del ints["stride_cl"]  # a constexpr 0 of the no-RoPE (cross-attention) configuration
    return Launch((cdiv(lq, block_m), b * h, one), ints)


@functools.lru_cache(maxsize=None)
def kernel_for(op: str, dtype: str, head_dim: int) -> tuple[Any, Any]:
    """(aot.KernelSpec, aot.CompiledInfo with PTX) of ``op`` for ``dtype`` ("bf16") and ``head_dim``."""
    from javisrt.kernels import aot

    spec_by_name = {s.name: s for s in aot.kernel_specs((dtype,), (head_dim,))}
    name = f"{PLUGINS[op].kernel_kind}.{dtype}.hd{head_dim}"
    if name not in spec_by_name:
        raise ConfigError(f"kernels/aot.py has no configuration {name!r} (have {sorted(spec_by_name)})")
    spec = spec_by_name[name]
    info, _ = aot.compile_spec(spec)
    check_ptx(info, n_inputs=len(PLUGINS[op].inputs), n_outputs=1)
    return spec, info


def check_ptx(info: Any, n_inputs: int, n_outputs: int) -> None:
    """What a QDP AOT launch can honour (tensorrt-notes §1.3): sm_90a PTX of the pinned ISA, exactly
    inputs + ints + outputs + Triton's 2 implicit scratch pointers (passed as 0), no scratch memory."""
    from javisrt.kernels import aot

    want_version = f"{aot.PTX_VERSION // 10}.{aot.PTX_VERSION % 10}"
    problems = []
    if info.ptx_target != "sm_90a":
        problems.append(f"PTX target {info.ptx_target} != sm_90a")
    if info.ptx_version != want_version:
        problems.append(f"PTX ISA {info.ptx_version} != pinned {want_version}")
    if len(info.pointer_args) != n_inputs + n_outputs:
        problems.append(f"{len(info.pointer_args)} pointer args != {n_inputs} inputs + {n_outputs} outputs")
    if info.ptx_params != len(info.pointer_args) + len(info.int_args) + 2:
        problems.append(f"PTX entry has {info.ptx_params} params, expected pointers + ints + 2 scratch")
    if info.global_scratch_size:
        problems.append(f"global scratch {info.global_scratch_size} B: a QDP cannot provide it")
    if info.shared > aot.H100_SMEM_PER_BLOCK:
        problems.append(f"shared memory {info.shared} B > the H100 per-block maximum")
    if problems:
        raise ConfigError(f"kernel {info.name} cannot be an AOT plugin: " + "; ".join(problems))


def plugin_records(ops: Sequence[str], dtype: str = "bf16", head_dim: int = 128) -> list[engine_meta.PluginRecord]:
    """Provenance of the plugins an engine embeds (for its metadata sidecar)."""
    out = []
    for op in ops:
        if op not in PLUGINS:
            raise ConfigError(NOT_AOT.get(op, f"unknown javisrt op {op!r}"))
        _, info = kernel_for(op, dtype, head_dim)
        out.append(engine_meta.PluginRecord(op, NAMESPACE, info.ptx_target, info.ptx_version,
                                            engine_meta.sha256_bytes(info.ptx.encode())))  # fmt: skip
    return out


# ---- the registrations (GPU machines with TensorRT) ---------------------------------------------

_registered: set[str] = set()


def registered_ops() -> frozenset[str]:
    """Ops registered in this process (registers them on first call)."""
    if not _registered:
        register_all()
    return frozenset(_registered)


def register_all() -> None:
    """Register every AOT plugin with TensorRT's plugin registry (idempotent)."""
    if _registered:
        return
    from javisrt.export.tensorrt_api import import_tensorrt

    trt = import_tensorrt()
    import tensorrt.plugin as trtp

    if not hasattr(trt, "QuickPluginCreationRequest"):
        raise ConfigError(f"TensorRT {trt.__version__} has no AOT Python plugins (needs >= 10.9)")

    def dtype_name(dt: Any) -> str:
        if dt == trt.DataType.BF16:
            return "bf16"
        raise ConfigError(f"javisrt plugins are built for BF16 activations, got {dt}")

    # tensorrt.plugin's ShapeExpr: `is_fake` and `is_constant` are properties, `constant_value()` is a
    # method (NVIDIA/TensorRT python/packaging/bindings_wheel/tensorrt/plugin/_tensor.py, checked for
    # this fix; tests/test_trt_plugins.py's stand-in models exactly that).
    def head_dim_of(q: Any) -> int:
        hd = q.shape_expr[3]
        if hd.is_fake or not hd.is_constant:
            raise ConfigError("javisrt attention plugins need a static head_dim (the last dim of q)")
        return int(hd.constant_value())

    def aot(op: str, q: Any, k: Any) -> tuple[str, str, Any, Any]:
        spec, info = kernel_for(op, dtype_name(q.dtype), head_dim_of(q))
        one = trtp.SymInt32(1)
        launch_math = attention_launch(list(q.shape_expr), list(k.shape_expr), spec.constexprs["BLOCK_M"],
                                       trtp.cdiv, one, PLUGINS[op].has_rope)  # fmt: skip
        params = trtp.KernelLaunchParams()
        params.grid_x, params.grid_y, params.grid_z = launch_math.grid
        params.block_x = info.block
        params.shared_mem = info.shared
        extra = trtp.SymIntExprs(len(spec.int_args))
        for i, name in enumerate(spec.int_args):  # kernel order
            extra[i] = trtp.SymInt32(launch_math.int_args[name])
        return info.entry, info.ptx, params, extra

    @trtp.register(f"{NAMESPACE}::rope_attention")
    def _rope_attention_desc(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc
    ) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(f"{NAMESPACE}::rope_attention")
    def _rope_attention_tune(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc],
    ) -> list[trtp.AutoTuneCombination]:  # fmt: skip
        return [trtp.AutoTuneCombination(PLUGINS["rope_attention"].io_types, "LINEAR")]

    @trtp.aot_impl(f"{NAMESPACE}::rope_attention")
    def _rope_attention_aot(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, cos: trtp.TensorDesc, sin: trtp.TensorDesc,
        outputs: tuple[trtp.TensorDesc], tactic: int,
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:  # fmt: skip
        return aot("rope_attention", q, k)

    @trtp.register(f"{NAMESPACE}::attention")
    def _attention_desc(q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc) -> trtp.TensorDesc:
        return q.like()

    @trtp.autotune(f"{NAMESPACE}::attention")
    def _attention_tune(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc]
    ) -> list[trtp.AutoTuneCombination]:
        return [trtp.AutoTuneCombination(PLUGINS["attention"].io_types, "LINEAR")]

    @trtp.aot_impl(f"{NAMESPACE}::attention")
    def _attention_aot(
        q: trtp.TensorDesc, k: trtp.TensorDesc, v: trtp.TensorDesc, outputs: tuple[trtp.TensorDesc], tactic: int
    ) -> tuple[str | bytes, str | bytes, trtp.KernelLaunchParams, trtp.SymExprs]:
        return aot("attention", q, k)

    _registered.update(PLUGINS)
    log.info("registered TensorRT AOT plugins %s", sorted(f"{NAMESPACE}::{op}" for op in PLUGINS))
