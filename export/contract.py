"""The export contract of the DiT: the one object that names and shapes every graph input and output.

``torch.onnx.export`` (dynamic shapes, input/output names), the TensorRT engine build (one
optimisation profile per entry of ``profiles``), the runtime's buffer allocation (``input_shapes`` /
``output_shapes`` for a concrete request) and the benchmark all read this object; nothing else
spells a tensor name or a dynamic axis (shared/style.md lesson 9).

Graph I/O (B batch, CFG doubles it; d-free shapes only, so one graph serves every request)::

    video           [batch, 16, video_frames, video_height, video_width]  fp32  latent (T, H8, W8)
    audio           [batch, 8, audio_frames, 16]                          fp32  latent (Tm4, 16)
    timestep        [batch]                                               fp32  0..1000
    context         [batch, text_len, text_dim]                           fp32  T5 output, zero-padded
    rope_cos        [num_tokens, head_dim/2]                              fp32  TA-RoPE tables
    rope_sin        [num_tokens, head_dim/2]                              fp32
 -> video_velocity  [batch, 16, video_frames, video_height, video_width]  fp32
    audio_velocity  [batch, 8, audio_frames, 16]                          fp32

``num_tokens = video_frames * video_height/2 * video_width/2 + audio_frames/2 * 8``. The RoPE
tables are graph inputs computed **once per shape** on the host (:func:`rope_tables`, the exact
float64 ``linspace`` + ceil of TA-RoPE) and kept in device buffers across the sampling steps; the
graph never rebuilds them. The I/O is fp32 in every precision flavour (the BF16 graph casts inside),
so one set of runtime buffers fits every engine. The text length is static (``text_len``): the
runtime zero-pads the T5 output and zeroes masked positions, as the reference does (model-spec §3.1).

Profiles (model-spec §7–8): 240p–480p landscape buckets x 2–5 s (33–81 frames at 16 fps), batch 1–2
(1 = no CFG, 2 = one prompt with CFG). ``"240p"`` / ``"480p"`` are single-resolution profiles (tighter
tactics); ``"all"`` spans both.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from javisrt.engine.config import GenerationMode, JavisConfig
from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.latents import bucket_size, latent_geometry
from javisrt.engine.rope import TokenGrid, rope_cos_sin

CONTRACT_VERSION = "2"  # 2: per-mode I/O (``mode``)

# Tensor names: the only place they are spelled (export, engines, buffers, benchmark and tests import these).
VIDEO = "video"
AUDIO = "audio"
TIMESTEP = "timestep"
CONTEXT = "context"
ROPE_COS = "rope_cos"
ROPE_SIN = "rope_sin"
VIDEO_VELOCITY = "video_velocity"
AUDIO_VELOCITY = "audio_velocity"
# (input latent, output velocity) per modality, in the sampling loop's order: video first, then audio.
MODALITY_IO: tuple[tuple[str, str], ...] = ((VIDEO, VIDEO_VELOCITY), (AUDIO, AUDIO_VELOCITY))
# Inputs that stay constant over the steps of one request (written once, kept bound).
STATIC_INPUTS = (CONTEXT, ROPE_COS, ROPE_SIN)

# ONNX ``metadata_props`` keys of an exported graph (read back by the engines and the TensorRT builder).
META_CONTRACT = "javisrt.contract"
META_FLAVOR = "javisrt.flavor"
META_PRECISION = "javisrt.precision"
META_CHECKPOINT = "javisrt.checkpoint_sha256"

# Named dynamic dimensions (the ONNX dim_param strings and the keys of a ``Dims``).
BATCH = "batch"
VIDEO_FRAMES = "video_frames"
VIDEO_HEIGHT = "video_height"
VIDEO_WIDTH = "video_width"
AUDIO_FRAMES = "audio_frames"
NUM_TOKENS = "num_tokens"
AUDIO_BINS = 16  # AudioLDM2 latent frequency bins (64 mel / 4)
DIM_NAMES = (BATCH, VIDEO_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH, AUDIO_FRAMES)

Dims = dict[str, int]
"""Concrete values of the free dynamic dims (``num_tokens`` is derived)."""


@dataclass(frozen=True)
class TensorSpec:
    """One graph input or output: name, dtype name (torch spelling) and shape (int or dim name)."""

    name: str
    dtype: str
    shape: tuple[int | str, ...]

    @property
    def torch_dtype(self) -> torch.dtype:
        return getattr(torch, self.dtype)  # type: ignore[no-any-return]

    def concrete(self, dims: Dims) -> tuple[int, ...]:
        return tuple(d if isinstance(d, int) else dims[d] for d in self.shape)


@dataclass(frozen=True)
class ShapePoint:
    """A request shape: batch, frames and pixel size; ``dims`` turns it into the contract's dims."""

    batch: int
    num_frames: int
    height: int
    width: int

    def dims(self) -> Dims:
        geo = latent_geometry(self.num_frames, self.height, self.width)
        assert geo.video is not None and geo.audio is not None
        _, t, h8, w8 = geo.video
        return {BATCH: self.batch, VIDEO_FRAMES: t, VIDEO_HEIGHT: h8, VIDEO_WIDTH: w8, AUDIO_FRAMES: geo.audio[1]}


@dataclass(frozen=True)
class Profile:
    """A TensorRT optimisation profile: min/opt/max request shapes."""

    name: str
    min: ShapePoint
    opt: ShapePoint
    max: ShapePoint


def _bucket_point(batch: int, frames: int, resolution: str) -> ShapePoint:
    h, w = bucket_size(resolution, "9:16")  # the released buckets are landscape (H:W ~ 0.56)
    return ShapePoint(batch, frames, h, w)


DEFAULT_PROFILES: tuple[Profile, ...] = (
    Profile("240p", _bucket_point(1, 33, "240p"), _bucket_point(2, 65, "240p"), _bucket_point(2, 81, "240p")),
    Profile("480p", _bucket_point(1, 33, "480p"), _bucket_point(2, 81, "480p"), _bucket_point(2, 81, "480p")),
    Profile("all", _bucket_point(1, 33, "240p"), _bucket_point(2, 65, "360p"), _bucket_point(2, 81, "480p")),
)


@dataclass(frozen=True)
class DiTContract:
    """Export contract of :class:`javisrt.engine.model.JavisDiT` (t2av or t2v network)."""

    module: str
    config: JavisConfig
    mode: GenerationMode  # which modalities the graph generates: its latent inputs and velocity outputs
    inputs: tuple[TensorSpec, ...]
    outputs: tuple[TensorSpec, ...]
    profiles: tuple[Profile, ...] = DEFAULT_PROFILES
    version: str = field(default=CONTRACT_VERSION)

    # ---- construction --------------------------------------------------------------------------
    @classmethod
    def for_config(
        cls,
        cfg: JavisConfig,
        profiles: tuple[Profile, ...] = DEFAULT_PROFILES,
        mode: GenerationMode | str | None = None,
    ) -> DiTContract:
        """The contract of ``cfg`` generating ``mode`` (default: every modality of the network).

        t2a keeps ``video_frames`` as a dim without video tensors: it sets the audio's TA-RoPE time axis.
        """
        if cfg.patch_size[0] != 1:
            raise ConfigError(f"the contract assumes a temporal patch of 1, got {cfg.patch_size}")
        generated = GenerationMode(cfg.model_type if mode is None else mode)
        if not cfg.supports(generated):
            raise ConfigError(f"the {cfg.name} network ({cfg.model_type.value}) cannot generate {generated.value}")
        video = (BATCH, cfg.in_channels, VIDEO_FRAMES, VIDEO_HEIGHT, VIDEO_WIDTH)
        audio = (BATCH, cfg.audio_in_channels, AUDIO_FRAMES, AUDIO_BINS)
        inputs: list[TensorSpec] = []
        outputs: list[TensorSpec] = []
        if generated is not GenerationMode.T2A:
            inputs.append(TensorSpec(VIDEO, "float32", video))
            outputs.append(TensorSpec(VIDEO_VELOCITY, "float32", (BATCH, cfg.out_channels, *video[2:])))
        if generated is not GenerationMode.T2V:
            inputs.append(TensorSpec(AUDIO, "float32", audio))
            outputs.append(TensorSpec(AUDIO_VELOCITY, "float32", (BATCH, cfg.audio_out_channels, *audio[2:])))
        half = cfg.head_dim // 2
        inputs += [
            TensorSpec(TIMESTEP, "float32", (BATCH,)),
            TensorSpec(CONTEXT, "float32", (BATCH, cfg.text_len, cfg.text_dim)),
            TensorSpec(ROPE_COS, "float32", (NUM_TOKENS, half)),
            TensorSpec(ROPE_SIN, "float32", (NUM_TOKENS, half)),
        ]
        return cls("dit", cfg, generated, tuple(inputs), tuple(outputs), profiles)

    @property
    def has_video(self) -> bool:
        return self.mode is not GenerationMode.T2A

    @property
    def has_audio(self) -> bool:
        return self.mode is not GenerationMode.T2V

    @property
    def modality_io(self) -> tuple[tuple[str, str], ...]:
        """(input, output) names of the generated modalities, in the sampling loop's order."""
        return tuple(io for io, on in zip(MODALITY_IO, (self.has_video, self.has_audio), strict=True) if on)

    @property
    def free_dims(self) -> tuple[str, ...]:
        """The dims a request must give: video height/width only with video, audio frames only with audio."""
        skip = ({VIDEO_HEIGHT, VIDEO_WIDTH} if not self.has_video else set()) | (
            {AUDIO_FRAMES} if not self.has_audio else set()
        )
        return tuple(d for d in DIM_NAMES if d not in skip)

    # ---- names ---------------------------------------------------------------------------------
    @property
    def input_names(self) -> list[str]:
        return [t.name for t in self.inputs]

    @property
    def output_names(self) -> list[str]:
        return [t.name for t in self.outputs]

    def spec(self, name: str) -> TensorSpec:
        for t in (*self.inputs, *self.outputs):
            if t.name == name:
                return t
        raise ShapeError(f"{self.module} contract has no tensor {name!r}")

    # ---- geometry ------------------------------------------------------------------------------
    def token_grid(self, dims: Dims) -> TokenGrid:
        pt, ph, pw = self.config.patch_size
        pa, pm = self.config.audio_patch_size
        for key, p in ((VIDEO_HEIGHT, ph), (VIDEO_WIDTH, pw), (AUDIO_FRAMES, pa)):
            if key in dims and dims[key] % p:
                raise ShapeError(f"{key}={dims[key]} is not a multiple of the patch size {p}")
        t = dims[VIDEO_FRAMES] // pt
        video = (t, dims[VIDEO_HEIGHT] // ph, dims[VIDEO_WIDTH] // pw) if self.has_video else (t, 0, 0)
        audio = (dims[AUDIO_FRAMES] // pa, AUDIO_BINS // pm) if self.has_audio else (0, 0)
        return TokenGrid(video, audio)

    def resolve(self, dims: Dims) -> Dims:
        """``dims`` plus the derived ``num_tokens``; checks that every free dim is given."""
        needed = self.free_dims
        missing = [d for d in needed if d not in dims]
        if missing:
            raise ShapeError(f"missing dims {missing} for the {self.module} contract")
        out = {k: int(dims[k]) for k in needed}
        out[NUM_TOKENS] = self.token_grid(out).num_tokens
        return out

    def input_shapes(self, dims: Dims) -> dict[str, tuple[int, ...]]:
        full = self.resolve(dims)
        return {t.name: t.concrete(full) for t in self.inputs}

    def output_shapes(self, dims: Dims) -> dict[str, tuple[int, ...]]:
        full = self.resolve(dims)
        return {t.name: t.concrete(full) for t in self.outputs}

    def dims_of(self, shapes: Mapping[str, Sequence[int]], video_frames: int | None = None) -> Dims:
        """Read the free dims back from the shapes of concrete inputs (validating each one given).

        t2a has no video tensor: ``video_frames`` (the video's latent frame count) must be given.
        """
        missing = [name for name, _ in self.modality_io if name not in shapes]
        if missing:
            raise ShapeError(f"inputs {missing} of the {self.mode.value} contract are missing")
        dims: Dims = {}
        if self.has_video:
            v = shapes[VIDEO]
            dims.update({BATCH: v[0], VIDEO_FRAMES: v[2], VIDEO_HEIGHT: v[3], VIDEO_WIDTH: v[4]})
        elif video_frames is None:
            raise ShapeError("an audio-only (t2a) request needs video_frames, the TA-RoPE time axis")
        else:
            dims.update({BATCH: shapes[AUDIO][0], VIDEO_FRAMES: int(video_frames)})
        if self.has_audio:
            dims[AUDIO_FRAMES] = shapes[AUDIO][2]
        expected = self.input_shapes(dims)
        for name, shape in expected.items():
            if name in shapes and tuple(shapes[name]) != shape:
                raise ShapeError(f"input {name}: shape {tuple(shapes[name])} != contract {shape}")
        return {k: int(v) for k, v in dims.items()}

    def trt_profiles(self) -> list[dict[str, tuple[tuple[int, ...], tuple[int, ...], tuple[int, ...]]]]:
        """Per profile: input name -> (min, opt, max) shapes, ready for ``IOptimizationProfile.set_shape``."""
        out = []
        for p in self.profiles:
            lo, mid, hi = (self.input_shapes(pt.dims()) for pt in (p.min, p.opt, p.max))
            out.append({name: (lo[name], mid[name], hi[name]) for name in self.input_names})
        return out

    def dim_ranges(self) -> dict[str, tuple[int, int]]:
        """Overall (min, max) of every free dim across the profiles (the export's dynamic ranges)."""
        points = [pt.dims() for p in self.profiles for pt in (p.min, p.opt, p.max)]
        keys = self.free_dims
        return {k: (min(pt[k] for pt in points), max(pt[k] for pt in points)) for k in keys}

    # ---- tensors -------------------------------------------------------------------------------
    def rope_tables(self, dims: Dims, device: torch.device | str = "cpu") -> tuple[torch.Tensor, torch.Tensor]:
        """TA-RoPE (cos, sin) [num_tokens, head_dim/2] fp32 for ``dims``: build once per shape."""
        cfg = self.config
        return rope_cos_sin(self.token_grid(self.resolve(dims)), cfg.audio_pos_mode, cfg.rope_axis_dims, cfg.rope_theta, device)

    def sample_inputs(
        self, dims: Dims, generator: torch.Generator | None = None, device: torch.device | str = "cpu"
    ) -> dict[str, torch.Tensor]:
        """Random inputs of the right shapes (latents and context ~ N(0,1), timesteps in [0, 1000])."""
        shapes = self.input_shapes(dims)
        out: dict[str, torch.Tensor] = {}
        for spec in self.inputs:
            shape = shapes[spec.name]
            if spec.name == TIMESTEP:
                out[spec.name] = torch.rand(shape, generator=generator) * 1000.0
            elif spec.name not in (ROPE_COS, ROPE_SIN):
                out[spec.name] = torch.randn(shape, generator=generator)
        out[ROPE_COS], out[ROPE_SIN] = self.rope_tables(dims)
        return {k: out[k].to(device=device, dtype=self.spec(k).torch_dtype) for k in self.input_names}

    # ---- serialisation -------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        def tensors(ts: tuple[TensorSpec, ...]) -> list[dict[str, Any]]:
            return [{"name": t.name, "dtype": t.dtype, "shape": list(t.shape)} for t in ts]

        return {
            "module": self.module,
            "version": self.version,
            "mode": self.mode.value,
            "config": self.config.to_dict(),
            "inputs": tensors(self.inputs),
            "outputs": tensors(self.outputs),
            "profiles": [
                {"name": p.name, **{k: dataclasses.asdict(getattr(p, k)) for k in ("min", "opt", "max")}}
                for p in self.profiles
            ],
            "trt_profiles": [
                {name: [list(s) for s in shapes] for name, shapes in prof.items()} for prof in self.trt_profiles()
            ],
        }

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DiTContract:
        if data.get("module") != "dit" or data.get("version") != CONTRACT_VERSION:
            raise ConfigError(f"unsupported contract {data.get('module')!r} version {data.get('version')!r}")
        profiles = tuple(
            Profile(p["name"], *(ShapePoint(**p[k]) for k in ("min", "opt", "max"))) for p in data["profiles"]
        )
        contract = cls.for_config(JavisConfig.from_dict(data["config"]), profiles, data.get("mode"))
        if contract.to_dict()["inputs"] != data["inputs"] or contract.to_dict()["outputs"] != data["outputs"]:
            raise ConfigError("contract I/O in the manifest does not match this javisrt version")
        return contract

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)
