"""FP8 (E4M3) post-training quantization with nvidia-modelopt and the Q/DQ ONNX export.

What is quantized (per-tensor E4M3, "max" calibration):
  * every block's self- and cross-attention q/k/v/o Linears (input and weight quantizers);
  * both FFN experts' Linears (``ffn.0/2`` and ``audio_ffn.0/2``): separate modules, so separate scales;
  * the attention (MHA) quantizers of every self- and cross-attention, the slots of the ``onnx-fp8`` op
    set (:class:`~javisrt.export.op_sets.Fp8Ops`): q after RoPE and the 1/sqrt(D) scale, K^T, V, and the
    softmax output with amax fixed to 1 (scale 1/448, tensorrt-notes §3); so TensorRT sees a DQ directly
    before both attention MatMuls. modelopt creates them on the model's attention modules (registered
    below), which hand them to the op set.
Everything else (patch/time/text embeddings, modulation tables, heads) is left unquantized.

Calibration runs the *unquantized* model along real sampling trajectories: for each calibration
prompt, a CFG Euler rectified-flow loop (model-spec §6.1: shifted timesteps, ``v = v_u + g (v_c - v_u)``,
``z <- z + v (t_i - t_{i+1}) / 1000``) from seeded noise; every step's forward feeds the calibrators.
The loop is the project's own sampler (``runtime/sampling.sample``, the C++ loop when built) with the
released schedule (:func:`calibration_sampler`); the fidelity check runs the same.

Export: modelopt's ``get_onnx_bytes_and_metadata`` (TorchScript exporter, the only one its FP8
quantizers export through, feasibility §5) at opset 20, then the fixes ONNX Runtime and TensorRT need:
Q/DQ moved from modelopt's ``trt`` domain to the default domain, stale value_info dropped, dims named
from the contract. ONNX Runtime must run the result with ``ORT_DISABLE_ALL`` (feasibility §3).

CPU notes (modelopt 0.47): FP8 PTQ (max calibration), fake-quant forward and the Q/DQ export all run
on CPU. Not used because they need CUDA or do not fit: NVFP4 (dynamic block quant asserts CUDA amax),
the dynamo export path (``torch.export`` fails on the quantizers), ``dq_only`` for non-weight tensors.
"""

from __future__ import annotations

import contextlib
import io
import logging
import tempfile
import warnings
from unittest import mock
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import onnx
import torch
from tqdm import tqdm

from javisrt.engine.errors import ConfigError, UnavailableError
from javisrt.engine.model import CrossAttention, JavisDiT, SelfAttention
from javisrt.export.contract import DiTContract, Dims
from javisrt.export.module import ExportableDiT, Flavor
from javisrt.export.op_sets import MHA_SLOTS, Fp8Ops
from javisrt.export.onnx import Precision, example_args, finalize, legacy_dynamic_axes
from javisrt.runtime import sampling

log = logging.getLogger(__name__)

FP8_OPSET = 20  # the TorchScript exporter's highest supported opset; FLOAT8 Q/DQ needs >= 19
FP8_E4M3 = {"num_bits": (4, 3), "axis": None}
SOFTMAX_AMAX = 1.0  # softmax output <= 1: fixed scale 1/448, no calibration (TensorRT MHA fusion rule)

# modelopt quant_cfg (fnmatch patterns on the wrapper's module names; later entries win).
QUANTIZED_LINEARS = (
    "*blocks.*.self_attn.[qkvo]",
    "*blocks.*.cross_attn.[qkvo]",
    "*blocks.*.ffn.[02]",
    "*blocks.*.audio_ffn.[02]",
)
QUANT_CFG: list[dict[str, Any]] = [
    {"quantizer_name": "*", "enable": False},
    *(
        {"quantizer_name": f"{linear}.{q}_quantizer", "cfg": FP8_E4M3}
        for linear in QUANTIZED_LINEARS
        for q in ("input", "weight")
    ),
    *({"quantizer_name": f"*blocks.*.{attn}.{slot}", "cfg": FP8_E4M3}
      for attn in ("self_attn", "cross_attn") for slot in MHA_SLOTS),
]


def _mtq():  # type: ignore[no-untyped-def]
    """modelopt's quantization module, with the model's attention modules registered as quantizable:
    their quantized versions carry the :data:`MHA_SLOTS` and run the ``onnx-fp8`` op set bound to them."""
    try:
        with warnings.catch_warnings():
            # modelopt 0.47 uses torch.jit.script(_method) at import time, deprecated in torch 2.13;
            # under -W error its plugins would fail to import. Harmless for what we do with it.
            warnings.filterwarnings("ignore", message="`torch.jit.script", category=DeprecationWarning)
            import modelopt.torch.quantization as mtq
            from modelopt.torch.quantization.nn import QuantModuleRegistry, TensorQuantizer
    except ImportError as exc:  # modelopt or one of its undeclared deps (requests, huggingface_hub, lief)
        raise UnavailableError(f"nvidia-modelopt is not usable here: {exc}") from exc

    class MHASlots(torch.nn.Module):
        """Mixin of the quantized attention modules: the MHA slots as modelopt ``TensorQuantizer``s (created
        by modelopt's module conversion, so ``mtq.quantize`` configures and calibrates them like its own),
        handed to the op set on every call (the op set is the last argument of the attention forward)."""

        def _setup(self) -> None:
            for slot in MHA_SLOTS:
                setattr(self, slot, TensorQuantizer())

        def forward(self, *args: Any) -> torch.Tensor:
            *inputs, ops = args
            if not isinstance(ops, Fp8Ops):
                raise ConfigError(f"an FP8-quantized attention runs with the onnx-fp8 op set, not {ops.name!r}")
            return super().forward(*inputs, ops.bind(self))  # type: ignore[no-any-return]

    for cls in (SelfAttention, CrossAttention):
        if cls not in QuantModuleRegistry:
            quantized = type(f"Quant{cls.__name__}", (MHASlots, cls), {})
            mtq.register(original_cls=cls, quantized_cls=quantized)
    return mtq, TensorQuantizer


# ---------------------------------------------------------------------------------------------------
# Sampling trajectory (calibration and the fidelity check)
# ---------------------------------------------------------------------------------------------------


Denoiser = Callable[[torch.Tensor, torch.Tensor | None, torch.Tensor, torch.Tensor], tuple[torch.Tensor, ...]]
"""``denoise(video[2B], audio[2B] | None, t[2B], context[2B]) -> velocities``, on ``[cond; uncond]``."""


def calibration_sampler(dims: Dims, steps: int, guidance: float, has_audio: bool) -> sampling.SamplerConfig:
    """The released sampler (Euler, Open-Sora shift with its bf16-rounded ratio) for a contract shape.

    Clips shorter than 17 frames (the tests' tiny shapes) give ``F // 17 = 0``, so ratio 0 and a
    degenerate schedule the release never samples: those run unshifted (ratio 1).
    """
    frames = (dims["video_frames"] - 1) * 4 + 1
    shift = 1.0
    if frames >= 17:  # rflow_shift refuses the degenerate range; small pixel sizes can still give r < 1
        shift = max(sampling.rflow_shift(dims["video_height"] * 8, dims["video_width"] * 8, frames), 1.0)
    return sampling.SamplerConfig(sampling.Solver.EULER, steps, (guidance,) * (2 if has_audio else 1), shift)


def sample_trajectory(
    denoise: Denoiser, video: torch.Tensor, audio: torch.Tensor | None, cond: torch.Tensor, uncond: torch.Tensor,
    config: sampling.SamplerConfig,
) -> tuple[torch.Tensor, torch.Tensor | None]:  # fmt: skip
    """One CFG sampling run of ``denoise`` from (video, audio) noise through the project's sampling loop
    (``runtime/sampling.sample``: the C++ loop when built)."""
    context = torch.cat((cond, uncond))
    latents = [video.float().contiguous().numpy()] + ([audio.float().contiguous().numpy()] if audio is not None else [])

    def denoiser(inputs: list[np.ndarray], timesteps: np.ndarray) -> list[np.ndarray]:
        v = torch.tensor(inputs[0])  # a copy: the loop's buffers are read-only and valid only in the call
        a = torch.tensor(inputs[1]) if len(inputs) > 1 else None
        out = denoise(v, a, torch.tensor(timesteps), context)
        return [np.ascontiguousarray(o.float().numpy()) for o in out]

    result = sampling.sample(latents, denoiser, config)
    final = [torch.from_numpy(np.array(x)) for x in result.latents]
    return final[0], (final[1] if len(final) > 1 else None)


def contract_denoiser(wrapper: torch.nn.Module, contract: DiTContract) -> Denoiser:
    """A :data:`Denoiser` over an :class:`ExportableDiT`, with RoPE tables cached per shape."""
    cache: dict[tuple[int, ...], tuple[torch.Tensor, torch.Tensor]] = {}

    def denoise(video, audio, t, context):  # type: ignore[no-untyped-def]
        dims = contract.dims_of({"video": video, **({"audio": audio} if audio is not None else {})})
        key = tuple(dims.values())[1:]
        if key not in cache:
            cache[key] = contract.rope_tables(dims)
        return wrapper(video, audio, t, context, *cache[key])

    return denoise


@dataclass(frozen=True)
class CalibrationSet:
    """Calibration inputs: prompt embeddings [N, text_len, text_dim], the negative one [1, ...], shapes."""

    prompts: torch.Tensor
    negative: torch.Tensor
    shapes: tuple[Dims, ...]
    steps: int = 10
    guidance: float = 5.0
    seed: int = 0

    @classmethod
    def random(cls, contract: DiTContract, shapes: Sequence[Dims], num_prompts: int = 4, **kw: object) -> CalibrationSet:
        """Gaussian stand-ins for T5 embeddings (no text encoder here); say so in any report."""
        cfg = contract.config
        g = torch.Generator().manual_seed(1234)
        prompts = torch.randn(num_prompts, cfg.text_len, cfg.text_dim, generator=g)
        negative = torch.randn(1, cfg.text_len, cfg.text_dim, generator=g)
        return cls(prompts, negative, tuple({**s, "batch": 1} for s in shapes), **kw)  # type: ignore[arg-type]

    def trajectories(
        self,
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None, torch.Tensor, sampling.SamplerConfig, Dims]]:
        """(video noise, audio noise, prompt, sampler config, dims) per (prompt, shape), seeded."""
        g = torch.Generator().manual_seed(self.seed)
        for dims in self.shapes:
            config = calibration_sampler(dims, self.steps, self.guidance, "audio_frames" in dims)
            for p in self.prompts:
                video = torch.randn(1, 16, dims["video_frames"], dims["video_height"], dims["video_width"], generator=g)
                audio = torch.randn(1, 8, dims["audio_frames"], 16, generator=g) if "audio_frames" in dims else None
                yield video, audio, p[None], config, dims


# ---------------------------------------------------------------------------------------------------
# Quantize
# ---------------------------------------------------------------------------------------------------


def quantize_fp8(
    model: JavisDiT, calib: CalibrationSet, contract: DiTContract | None = None, numerics: str = "fp32"
) -> ExportableDiT:
    """The math-flavour wrapper of ``model`` with FP8 fake-quant, calibrated on ``calib``'s trajectories.

    ``numerics`` (set on ``model`` in place): ``"fp32"`` gives the fake-quant reference and the graph ONNX
    Runtime can check; ``"official"`` is FP8 on top of the BF16 numerics (what the TensorRT engine runs).
    """
    mtq, tensor_quantizer = _mtq()
    contract = contract or DiTContract.for_config(model.cfg)
    model.set_numerics(numerics)
    model.requires_grad_(False).eval()
    wrapper = ExportableDiT(model, Flavor.MATH).eval()
    denoise = contract_denoiser(wrapper, contract)
    runs = list(calib.trajectories())

    def forward_loop(_: torch.nn.Module) -> None:
        for video, audio, prompt, config, _dims in tqdm(runs, desc="FP8 calibration", unit="trajectory", leave=False):
            sample_trajectory(denoise, video, audio, prompt, calib.negative, config)

    config = {"quant_cfg": QUANT_CFG, "algorithm": "max"}
    with torch.no_grad(), contextlib.redirect_stdout(io.StringIO()):  # modelopt prints a summary table
        mtq.quantize(wrapper, config, forward_loop)
    for module in wrapper.model.modules():
        if isinstance(module, SelfAttention):  # and CrossAttention, its subclass
            getattr(module, "softmax_quantizer").amax = torch.tensor(SOFTMAX_AMAX)
    n = sum(1 for _, m in wrapper.named_modules() if isinstance(m, tensor_quantizer) and m.is_enabled)
    log.info("FP8: %d quantizers enabled, calibrated on %d trajectories x %d steps", n, len(runs), calib.steps)
    return wrapper


def _fix_qdq_domain(model: onnx.ModelProto) -> onnx.ModelProto:
    """modelopt leaves the converted Q/DQ in the ``trt`` domain: move them to the default domain."""
    for node in model.graph.node:
        if node.op_type in ("QuantizeLinear", "DequantizeLinear") and node.domain:
            node.domain = ""
    if any(n.domain == "trt" for n in model.graph.node):
        raise ValueError("unconverted trt-domain nodes remain in the FP8 graph")
    opsets = [o for o in model.opset_import if o.domain != "trt"]
    del model.opset_import[:]
    model.opset_import.extend(opsets)
    return model


def export_fp8(wrapper: ExportableDiT, contract: DiTContract | None = None) -> onnx.ModelProto:
    """The calibrated wrapper as an FP8 Q/DQ ONNX graph (fp32 high precision, opset 20)."""
    _mtq()
    from modelopt.torch._deploy.utils.torch_onnx import get_onnx_bytes_and_metadata

    contract = contract or DiTContract.for_config(wrapper.model.cfg)
    args = tuple(a for a in example_args(contract))
    axes = {k: v for k, v in legacy_dynamic_axes(contract).items() if k in contract.input_names}
    from modelopt.onnx.export.fp8_exporter import FP8QuantExporter

    # modelopt 0.47's FP8 post-processing re-quantizes the weight of *every* Conv to FP8, ignoring the
    # quant config (``_quantize_conv_weights_to_fp8``); our Convs are the patch embedders, which stay
    # high precision. Disable that one step for this export.
    keep_convs = mock.patch.object(FP8QuantExporter, "_quantize_conv_weights_to_fp8", staticmethod(lambda graph: 0))
    with warnings.catch_warnings(), contextlib.redirect_stdout(io.StringIO()), keep_convs:
        # The TorchScript exporter is deprecated in torch 2.13 but is the only one modelopt's FP8
        # quantizers export through (feasibility §5); its trace warnings concern shape arithmetic that
        # the dynamic axes keep symbolic (checked by the multi-shape ORT test).
        warnings.filterwarnings("ignore", category=DeprecationWarning)
        warnings.filterwarnings("ignore", category=torch.jit.TracerWarning)
        warnings.filterwarnings("ignore", message=".*isinstance\\(treespec, LeafSpec\\).*", category=FutureWarning)
        blob, _meta = get_onnx_bytes_and_metadata(wrapper, args, dynamic_axes=axes, onnx_opset=FP8_OPSET)
    from modelopt.torch._deploy.utils.torch_onnx import OnnxBytes

    # modelopt hands the graph (and any external-data file) back as base64 JSON; unpack to a temp dir.
    # For the full-size model this holds ~3x the weights in host memory (a modelopt API limitation).
    packed = OnnxBytes.from_bytes(blob)
    with tempfile.TemporaryDirectory(prefix="javisrt_fp8_") as tmp, contextlib.redirect_stdout(io.StringIO()):
        packed.write_to_disk(tmp, clean_dir=False)
        model = onnx.load(str(Path(tmp) / f"{packed.model_name}.onnx"), load_external_data=True)
    for out, name in zip(model.graph.output, contract.output_names):
        old = out.name
        for node in model.graph.node:
            node.output[:] = [name if o == old else o for o in node.output]
            node.input[:] = [name if i == old else i for i in node.input]
        out.name = name
    model = _fix_qdq_domain(model)
    return finalize(model, contract, Flavor.MATH.value, Precision.FP8.value)


# ---------------------------------------------------------------------------------------------------
# Fidelity (fake-quant, CPU)
# ---------------------------------------------------------------------------------------------------


def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()).clamp_min(1e-30))


def psnr(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``20 log10(max|ref| / rmse)`` in dB (peak = the reference's largest magnitude)."""
    rmse = (out.double() - ref.double()).pow(2).mean().sqrt()
    return float(20 * torch.log10(ref.double().abs().max() / rmse.clamp_min(1e-30)))


@dataclass(frozen=True)
class Fidelity:
    """FP8 vs a reference, per modality: worst per-step velocity cosine (on the reference trajectory)
    and the final-latent PSNR after the full run from the same noise."""

    velocity_cosine: tuple[float, float]  # (video, audio)
    latent_psnr_db: tuple[float, float]

    def __str__(self) -> str:
        (cv, ca), (pv, pa) = self.velocity_cosine, self.latent_psnr_db
        return f"video: cos {cv:.5f}, PSNR {pv:.1f} dB; audio: cos {ca:.5f}, PSNR {pa:.1f} dB"


def fp8_fidelity(
    fp8: Denoiser, reference: Denoiser, video: torch.Tensor, audio: torch.Tensor, cond: torch.Tensor,
    uncond: torch.Tensor, config: sampling.SamplerConfig,
) -> Fidelity:  # fmt: skip
    """Run the reference trajectory, comparing the FP8 velocity at each of its steps, then the FP8 run."""
    worst = [1.0, 1.0]

    def compare(v: torch.Tensor, a: torch.Tensor | None, t: torch.Tensor, c: torch.Tensor) -> tuple[torch.Tensor, ...]:
        ref = reference(v, a, t, c)
        got = fp8(v, a, t, c)
        for j, (g_, r_) in enumerate(zip(got, ref)):
            worst[j] = min(worst[j], cosine(g_, r_))
        return ref

    with torch.no_grad():
        ref_v, ref_a = sample_trajectory(compare, video, audio, cond, uncond, config)
        q_v, q_a = sample_trajectory(fp8, video, audio, cond, uncond, config)
    assert ref_a is not None and q_a is not None
    return Fidelity((worst[0], worst[1]), (psnr(q_v, ref_v), psnr(q_a, ref_a)))
