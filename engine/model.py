"""The JavisDiT++ DiT (model-spec.md §3–4), readable top to bottom.

Data flow of one forward (B batch, Lv/La video/audio tokens, L = Lv + La, d model width):

    video latent [B,16,T,H8,W8] --Conv3d(1,2,2)--> [B,Lv,d] --+
    audio latent [B,8,Tm4,16]   --Conv2d(2,2)----> [B,La,d] --+--> x [B,L,d]
    timestep [B] --sinusoid--> time_embedding --> e [B,d] --> e0 [B,6,d] (shared), ae0 [B,3,d] (audio)
    T5 text [B,Lt,4096] --text_embedding--> context [B,text_len,d]
    x --30 x Block(shared self-attn with TA-RoPE, cross-attn, per-modality FFN)--> x
    x[:, :Lv] --head------> unpatchify --> -v  [B,16,T,H8,W8] fp32
    x[:, Lv:] --audio_head-> unpatchify --> -v  [B,8,Tm4,16] fp32

Outputs are **negated** (model-spec.md §3.3): the network keeps Wan's convention (noise - x0), the
returned velocity is Open-Sora's x0 - noise, which the sampler integrates.

Numerics (``set_numerics``):
  * ``"fp32"``: everything in fp32; the clean reference, equal to diffusers' Wan on the video path.
  * ``"official"``: the JavisDiT code's bf16 behaviour, which the checkpoint was trained with
    (model-spec.md §3.4): bf16 weights and activations; the timestep rounded to bf16 before the
    sinusoid; block LayerNorms, modulation, gate and residual in bf16; RMSNorm statistics in fp32;
    RoPE angles and rotation in float64 (the reference's complex128 ``mmrope_apply``) with the result
    cast back to bf16; the time embedding, time projections and both heads in fp32
    (``FP32_MODULES``) with bf16-rounded weights. On CUDA it also turns TF32 on (:func:`enable_tf32`).

The fp32 islands copy what the reference computes under ``torch.cuda.amp.autocast(dtype=float32)``
on its bf16 model, op by op against CUDA autocast's lists:
  * time embedding: the sinusoid is float64 (autocast never casts float64), then ``.float()``;
    ``Linear`` (autocast's matmul list) runs in fp32 on the bf16 weights upcast; SiLU follows type
    promotion, so fp32. ``e`` and ``e0``/``ae0`` leave fp32; the blocks cast ``e0``/``ae0`` to bf16.
  * heads: ``modulation + e`` is bf16 + fp32 -> fp32 (promotion); the head LayerNorm is on
    autocast's fp32 list, so it normalises the bf16 activations *in fp32*; the modulate is fp32 by
    promotion; ``Linear`` fp32.
  * with TF32 on (the reference's inference script sets it), those fp32 matmuls run in TF32.

The per-op implementation ("torch", "triton", or what an exported graph holds: "onnx-native",
"onnx-plugin", "onnx-fp8") is chosen at one seam, ``engine/ops.py``. The stages (``embed``,
``transformer``, ``heads``) take an op set and the RoPE tables explicitly and read every token count
from tensor shapes, so the ONNX export traces this same forward (``export/module.py``).
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.ops import Modulation, OpSet, get_ops
from javisrt.engine.rope import TokenGrid, rope_cos_sin

# Modules that run in fp32 in both numeric modes (Wan/JavisDiT run them under fp32 autocast).
# ``set_numerics("official")`` keeps their parameters fp32 (holding bf16-rounded values) and asserts it.
FP32_MODULES = ("time_embedding", "time_projection", "audio_time_projection", "head", "audio_head")


class Numerics(enum.StrEnum):
    FP32 = "fp32"
    OFFICIAL = "official"


def enable_tf32() -> None:
    """TF32 for fp32 matmuls (cuBLAS) and cuDNN convolutions, process-wide, as the reference's
    inference script sets it (``allow_tf32 = True`` for both). It changes CUDA fp32 math only: on
    Ampere and later the fp32 islands and the LoRA merge of ``official`` numerics then round their
    matmul inputs to TF32 like the reference; CPU computation is unaffected. Nothing turns it off
    again: an ``fp32``-numerics model on CUDA in the same process then runs its matmuls in TF32 too.
    """
    torch.backends.cuda.matmul.allow_tf32 = True
    torch.backends.cudnn.allow_tf32 = True


# ---------------------------------------------------------------------------------------------------
# Building blocks
# ---------------------------------------------------------------------------------------------------


class RMSNorm(nn.Module):
    """RMSNorm over the last dim with a learned weight; statistics in fp32, result in the input dtype."""

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor, ops: OpSet) -> torch.Tensor:
        """x [..., dim] -> [..., dim]."""
        return ops.rms_norm(x, self.weight, self.eps)


class ParameterWrapper(nn.Module):
    """Holds one parameter as ``.param`` (the released key is ``audio_modulation.param``)."""

    def __init__(self, shape: tuple[int, ...], dim: int) -> None:
        super().__init__()
        self.param = nn.Parameter(torch.randn(*shape) / dim**0.5)


def feed_forward(dim: int, hidden: int) -> nn.Sequential:
    """``Linear(d->f)``, GELU-tanh, ``Linear(f->d)`` (keys ``.0`` and ``.2``)."""
    return nn.Sequential(nn.Linear(dim, hidden), nn.GELU(approximate="tanh"), nn.Linear(hidden, dim))


class SelfAttention(nn.Module):
    """Shared self-attention over all tokens: q/k RMSNorm over the full width, TA-RoPE, softmax."""

    def __init__(self, cfg: JavisConfig) -> None:
        super().__init__()
        self.num_heads = cfg.num_heads
        self.q = nn.Linear(cfg.dim, cfg.dim)
        self.k = nn.Linear(cfg.dim, cfg.dim)
        self.v = nn.Linear(cfg.dim, cfg.dim)
        self.o = nn.Linear(cfg.dim, cfg.dim)
        self.norm_q = RMSNorm(cfg.dim, cfg.eps)
        self.norm_k = RMSNorm(cfg.dim, cfg.eps)

    def forward(self, x: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], ops: OpSet) -> torch.Tensor:
        """x [B, L, d], rope (cos, sin) [L, D/2] -> [B, L, d]."""
        ops = ops.for_layer(self)
        heads = (self.num_heads, -1)
        q = self.norm_q(ops.linear(self.q, x), ops).unflatten(-1, heads)
        k = self.norm_k(ops.linear(self.k, x), ops).unflatten(-1, heads)
        v = ops.linear(self.v, x).unflatten(-1, heads)
        return ops.linear(self.o, ops.attention(q, k, v, rope).flatten(2))


class CrossAttention(SelfAttention):
    """Text cross-attention: q from the tokens, k/v from the context; RMSNorm on q and k, no RoPE."""

    def forward(self, x: torch.Tensor, context: torch.Tensor, ops: OpSet) -> torch.Tensor:  # type: ignore[override]
        """x [B, L, d], context [B, text_len, d] -> [B, L, d]."""
        ops = ops.for_layer(self)
        heads = (self.num_heads, -1)
        q = self.norm_q(ops.linear(self.q, x), ops).unflatten(-1, heads)
        k = self.norm_k(ops.linear(self.k, context), ops).unflatten(-1, heads)
        v = ops.linear(self.v, context).unflatten(-1, heads)
        return ops.linear(self.o, ops.attention(q, k, v, None).flatten(2))


class Block(nn.Module):
    """``AudioVideoAttentionBlock``: shared self-attn + cross-attn, then one FFN expert per modality.

    norm1/norm2/audio_norm2 are LayerNorms without parameters; they live inside ``ops.modulate`` /
    ``ops.modality_ffn`` (the fused kernels' prologue) rather than as modules.
    """

    def __init__(self, cfg: JavisConfig) -> None:
        super().__init__()
        self.eps = cfg.eps
        # 1. shared self-attention (video modulation chunks 0-2 for ALL tokens)
        self.self_attn = SelfAttention(cfg)
        # 2. cross-attention, affine LayerNorm, no modulation
        self.norm3 = nn.LayerNorm(cfg.dim, eps=cfg.eps, elementwise_affine=True)
        self.cross_attn = CrossAttention(cfg)
        # 3. per-modality FFN (MS-MoE): Wan's FFN for video, a second expert for audio
        self.ffn = feed_forward(cfg.dim, cfg.ffn_dim)
        self.modulation = nn.Parameter(torch.randn(1, 6, cfg.dim) / cfg.dim**0.5)
        self.has_audio = cfg.has_audio
        if cfg.has_audio:
            self.audio_ffn = feed_forward(cfg.dim, cfg.audio_ffn_dim)
            self.audio_modulation = ParameterWrapper((1, 3, cfg.dim), cfg.dim)

    def forward(
        self,
        x: torch.Tensor,
        e0: torch.Tensor,
        ae0: torch.Tensor | None,
        context: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor],
        num_video_tokens: int,
        ops: OpSet,
    ) -> torch.Tensor:
        """x [B, L, d], e0 [B, 6, d], ae0 [B, 3, d] | None, context [B, text_len, d] -> [B, L, d]."""
        sh1, sc1, g1, sh2, sc2, g2 = (self.modulation + e0).chunk(6, dim=1)
        # 1. self-attention
        x = x + self.self_attn(ops.modulate(x, sh1, sc1, self.eps), rope, ops) * g1
        # 2. cross-attention
        x = x + self.cross_attn(self.norm3(x), context, ops)
        # 3. FFN experts, hard-routed by position: [0, Lv) video, [Lv, L) audio
        audio_ffn = audio_mod = None
        if self.has_audio and ae0 is not None:
            audio_ffn = self.audio_ffn
            audio_mod = Modulation(*(self.audio_modulation.param + ae0).chunk(3, dim=1))
        return ops.modality_ffn(
            x, num_video_tokens, self.ffn, audio_ffn, Modulation(sh2, sc2, g2), audio_mod, self.eps
        )


class Head(nn.Module):
    """Output head: ``Linear(LN(x) * (1 + scale) + shift)`` with (shift, scale) = modulation + e (fp32)."""

    def __init__(self, dim: int, out_dim: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.head = nn.Linear(dim, out_dim)
        self.modulation = nn.Parameter(torch.randn(1, 2, dim) / dim**0.5)

    def forward(self, x: torch.Tensor, e: torch.Tensor) -> torch.Tensor:
        """x [B, N, d] (activation dtype), e [B, d] fp32 -> [B, N, out_dim] fp32."""
        shift, scale = (self.modulation + e[:, None, :]).chunk(2, dim=1)
        # fp32 autocast island: CUDA autocast computes layer_norm in fp32 (float64 is never cast), so
        # the bf16 activations are normalised in fp32, unlike the blocks' bf16 LayerNorms.
        # (The width is the static in_features: a traced x.shape[-1] cannot be a normalized_shape.)
        xf = x.to(torch.promote_types(x.dtype, torch.float32))
        y = F.layer_norm(xf, (self.head.in_features,), eps=self.eps) * (1 + scale) + shift
        return self.head(y)


class Embedded(NamedTuple):
    """Output of :meth:`JavisDiT.embed`: everything the transformer blocks need."""

    x: torch.Tensor  # [B, L, d] joint tokens, video first
    e: torch.Tensor  # [B, d] fp32 time embedding (heads)
    e0: torch.Tensor  # [B, 6, d] block modulation input, activation dtype
    ae0: torch.Tensor | None  # [B, 3, d] audio FFN modulation input, activation dtype
    context: torch.Tensor  # [B, text_len, d]
    grid: TokenGrid


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class JavisDiT(nn.Module):
    """JavisDiT++ (``model_type="t2av"``) or Wan2.1 T2V (``"t2v"``), built from a :class:`JavisConfig`."""

    def __init__(self, cfg: JavisConfig, ops: str = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.dim
        # 1. embeddings
        self.patch_embedding = nn.Conv3d(cfg.in_channels, d, kernel_size=cfg.patch_size, stride=cfg.patch_size)
        self.text_embedding = nn.Sequential(nn.Linear(cfg.text_dim, d), nn.GELU(approximate="tanh"), nn.Linear(d, d))
        self.time_embedding = nn.Sequential(nn.Linear(cfg.freq_dim, d), nn.SiLU(), nn.Linear(d, d))
        self.time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 6 * d))
        if cfg.has_audio:
            self.audio_patch_embedding = nn.Conv2d(
                cfg.audio_in_channels, d, kernel_size=cfg.audio_patch_size, stride=cfg.audio_patch_size
            )
            self.audio_time_projection = nn.Sequential(nn.SiLU(), nn.Linear(d, 3 * d))
        # 2. blocks
        self.blocks = nn.ModuleList(Block(cfg) for _ in range(cfg.num_layers))
        # 3. heads
        self.head = Head(d, cfg.video_patch_out, cfg.eps)
        if cfg.has_audio:
            self.audio_head = Head(d, cfg.audio_patch_out, cfg.eps)
        self.numerics = Numerics.FP32
        self._ops: OpSet = get_ops(ops)
        self._rope_cache: dict[tuple[TokenGrid, str, torch.dtype], tuple[torch.Tensor, torch.Tensor]] = {}

    # ---- configuration -------------------------------------------------------------------------
    @property
    def ops(self) -> OpSet:
        return self._ops

    def set_ops(self, ops: str | OpSet) -> JavisDiT:
        """Choose the op set by name (``engine.ops.OP_SETS``) or give a built one (``triton-fp8``, which
        carries this model's FP8 scales); weights and outputs stay the same."""
        self._ops = get_ops(ops) if isinstance(ops, str) else ops
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Activation dtype: that of the block weights."""
        return self.patch_embedding.weight.dtype

    def set_numerics(self, mode: Numerics | str) -> JavisDiT:
        """``"fp32"``: all fp32. ``"official"``: bf16 with the fp32 islands of ``FP32_MODULES``.

        Official mode first rounds *every* weight to bf16 (the reference runs a bf16 model), then
        upcasts the islands, so their values stay bf16-representable as in the reference. A model
        on CUDA also gets TF32 (:func:`enable_tf32`); move the model before calling this.
        """
        mode = Numerics(mode)
        if mode is Numerics.FP32:
            self.float()
        else:
            self.to(torch.bfloat16)
            for name in FP32_MODULES:
                module = getattr(self, name, None)
                if module is not None:
                    module.float()
            self._assert_fp32_islands()
            if self.patch_embedding.weight.is_cuda:
                enable_tf32()
        self.numerics = mode
        return self

    def _assert_fp32_islands(self) -> None:
        for name in FP32_MODULES:
            module = getattr(self, name, None)
            if module is None:
                continue
            for pname, p in module.named_parameters():
                if p.dtype != torch.float32:
                    raise AssertionError(f"fp32 island {name}.{pname} is {p.dtype}")

    # ---- geometry ------------------------------------------------------------------------------
    def token_grid(
        self, video: torch.Tensor | None, audio: torch.Tensor | None, video_latent_frames: int | None = None
    ) -> TokenGrid:
        """Token grid for the given latents (no compute). t2a needs ``video_latent_frames``."""
        cfg = self.cfg
        if video is not None:
            if video.ndim != 5 or video.shape[1] != cfg.in_channels:
                raise ShapeError(f"video latent must be [B,{cfg.in_channels},T,H,W], got {tuple(video.shape)}")
            pt, ph, pw = cfg.patch_size
            t, h, w = video.shape[2:]
            if t % pt or h % ph or w % pw:
                raise ShapeError(f"video latent (T,H,W)=({t},{h},{w}) is not a multiple of the patch {cfg.patch_size}")
            vgrid = (t // pt, h // ph, w // pw)
        else:
            if video_latent_frames is None:
                raise ShapeError("audio-only forward needs video_latent_frames (the TA-RoPE time axis)")
            vgrid = (int(video_latent_frames), 0, 0)
        if audio is not None:
            if not cfg.has_audio:
                raise ConfigError(f"preset {cfg.name!r} ({cfg.model_type}) has no audio branch")
            if audio.ndim != 4 or audio.shape[1] != cfg.audio_in_channels:
                raise ShapeError(
                    f"audio latent must be [B,{cfg.audio_in_channels},Tm4,F], got {tuple(audio.shape)}"
                )
            pa, pm = cfg.audio_patch_size
            tm, fm = audio.shape[2:]
            if tm % pa or fm % pm:
                raise ShapeError(f"audio latent (T,F)=({tm},{fm}) is not a multiple of the patch {cfg.audio_patch_size}")
            agrid = (tm // pa, fm // pm)
        else:
            agrid = (0, 0)
        if video is None and audio is None:
            raise ShapeError("forward needs a video latent, an audio latent, or both")
        return TokenGrid(vgrid, agrid)

    def rope(self, grid: TokenGrid, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(cos, sin) [L, head_dim/2] for ``grid``, built once per shape, device and dtype.

        fp32 tables in ``fp32`` numerics; float64 in ``official``, where the reference rotates in
        complex128 (float64 positions and frequencies, ``mmrope_apply``).
        """
        dtype = torch.float64 if self.numerics is Numerics.OFFICIAL else torch.float32
        key = (grid, str(device), dtype)
        if key not in self._rope_cache:
            cfg = self.cfg
            self._rope_cache[key] = rope_cos_sin(
                grid, cfg.audio_pos_mode, cfg.rope_axis_dims, cfg.rope_theta, device, dtype
            )
        return self._rope_cache[key]

    # ---- forward, in stages (the export and the benchmark call them separately) ------------------
    def embed(
        self,
        video: torch.Tensor | None,
        audio: torch.Tensor | None,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        video_latent_frames: int | None = None,
        ops: OpSet | None = None,
    ) -> Embedded:
        """Patch, time and text embeddings.

        video [B,16,T,H8,W8] | None, audio [B,8,Tm4,16] | None, timestep [B] in [0, 1000],
        context [B, Lt, text_dim] with Lt <= text_len, context_mask [B, Lt] (1 = token) | None;
        ``ops`` defaults to the model's op set.
        """
        cfg = self.cfg
        ops = ops if ops is not None else self._ops
        grid = self.token_grid(video, audio, video_latent_frames)
        act = self.dtype
        tokens = []
        if video is not None:
            # [B,d,Tv,Hp,Wp] -> [B, Tv*Hp*Wp, d] (f, h, w raster)
            tokens.append(ops.patch_embed(self.patch_embedding, video).flatten(2).transpose(1, 2))
        if audio is not None:
            # [B,d,Ta,M] -> [B, Ta*M, d] (time-major, band-minor)
            tokens.append(ops.patch_embed(self.audio_patch_embedding, audio).flatten(2).transpose(1, 2))
        x = torch.cat(tokens, dim=1) if len(tokens) > 1 else tokens[0]
        batch = x.shape[0]
        if timestep.shape != (batch,):
            raise ShapeError(f"timestep must be [B]=[{batch}], got {tuple(timestep.shape)}")

        # Time embedding, fp32 island. Official: the reference casts t to bf16 before the sinusoid
        # (991.64 -> 992); the checkpoint was trained that way.
        t = timestep.to(torch.bfloat16) if self.numerics is Numerics.OFFICIAL else timestep
        island_dtype = next(self.time_embedding.parameters()).dtype  # fp32 in both numeric modes
        e = self.time_embedding(ops.sinusoid(t, cfg.freq_dim).to(island_dtype))
        e0 = self.time_projection(e).unflatten(1, (6, cfg.dim)).to(act)
        ae0 = None
        if audio is not None:
            ae0 = self.audio_time_projection(e).unflatten(1, (3, cfg.dim)).to(act)

        # Text: zero the padded positions, pad to text_len with zeros, embed all text_len positions
        # (cross-attention attends to every one of them, as the reference does).
        if context.ndim != 3 or context.shape[0] != batch or context.shape[2] != cfg.text_dim:
            raise ShapeError(f"context must be [{batch}, Lt, {cfg.text_dim}], got {tuple(context.shape)}")
        if context.shape[1] > cfg.text_len:
            raise ShapeError(f"context has {context.shape[1]} tokens > text_len {cfg.text_len}")
        y = context.to(act)
        if context_mask is not None:
            if context_mask.shape != context.shape[:2]:
                raise ShapeError(f"context_mask must be {tuple(context.shape[:2])}, got {tuple(context_mask.shape)}")
            y = y * (context_mask != 0).unsqueeze(-1).to(act)
        if y.shape[1] < cfg.text_len:
            y = F.pad(y, (0, 0, 0, cfg.text_len - y.shape[1]))
        return Embedded(x, e, e0, ae0, self.text_embedding(y), grid)

    def transformer(
        self, emb: Embedded, rope: tuple[torch.Tensor, torch.Tensor], ops: OpSet | None = None
    ) -> torch.Tensor:
        """The 30 blocks: ``emb.x`` [B, L, d], rope (cos, sin) [L, head_dim/2] -> [B, L, d].

        ``ops`` replaces the model's op set for this call (default: :attr:`ops`); a wrapper such as
        ``engine/sequence_parallel.py``'s runs the same blocks on one rank's slice of the sequence.
        """
        ops = self._ops if ops is None else ops
        x = emb.x
        for block in self.blocks:
            x = block(x, emb.e0, emb.ae0, emb.context, rope, emb.grid.num_video_tokens, ops)
        return x

    def unpatchify_video(self, out: torch.Tensor, grid: tuple[int, int, int]) -> torch.Tensor:
        """[B, Tv*Hp*Wp, pt*ph*pw*C] ((pt,ph,pw,c), c fastest) -> [B, C, Tv*pt, Hp*ph, Wp*pw]."""
        b = out.shape[0]
        tv, hp, wp = grid
        pt, ph, pw = self.cfg.patch_size
        u = out.reshape(b, tv, hp, wp, pt, ph, pw, self.cfg.out_channels)
        u = torch.einsum("bfhwpqrc->bcfphqwr", u)
        return u.reshape(b, self.cfg.out_channels, tv * pt, hp * ph, wp * pw)

    def unpatchify_audio(self, out: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
        """[B, Ta*M, pa*pm*C] ((p_time, q_freq, c), c fastest) -> [B, C, Ta*pa, M*pm]."""
        b = out.shape[0]
        ta, m = grid
        pa, pm = self.cfg.audio_patch_size
        u = out.reshape(b, ta, m, pa, pm, self.cfg.audio_out_channels)
        u = torch.einsum("bfmpqc->bcfpmq", u)
        return u.reshape(b, self.cfg.audio_out_channels, ta * pa, m * pm)

    def heads(
        self, x: torch.Tensor, e: torch.Tensor, grid: TokenGrid
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Heads + unpatchify + sign flip: x [B, L, d] -> (video velocity, audio velocity), fp32."""
        lv = grid.num_video_tokens
        video = audio = None
        if lv:
            video = -self.unpatchify_video(self.head(x[:, :lv], e), grid.video).float()
        if grid.num_audio_tokens:
            audio = -self.unpatchify_audio(self.audio_head(x[:, lv:], e), grid.audio).float()
        return video, audio

    def forward(
        self,
        video: torch.Tensor | None,
        audio: torch.Tensor | None,
        timestep: torch.Tensor,
        context: torch.Tensor,
        context_mask: torch.Tensor | None = None,
        video_latent_frames: int | None = None,
    ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """Velocity (x0 - noise) for each given latent.

        video [B,16,T,H8,W8] | None, audio [B,8,Tm4,16] | None, timestep [B] (0..1000),
        context [B, Lt<=text_len, text_dim], context_mask [B, Lt] | None
        -> (video velocity [B,16,T,H8,W8] fp32 | None, audio velocity [B,8,Tm4,16] fp32 | None).
        Audio-only (t2a): ``video=None`` and ``video_latent_frames`` = the video's latent frame count.
        """
        emb = self.embed(video, audio, timestep, context, context_mask, video_latent_frames)
        x = self.transformer(emb, self.rope(emb.grid, emb.x.device))
        return self.heads(x, emb.e, emb.grid)


def num_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


def build_model(cfg: JavisConfig, device: torch.device | str = "cpu", ops: str = "torch") -> JavisDiT:
    """Build on ``device``; ``"meta"`` allocates nothing (load weights with ``assign=True`` afterwards)."""
    with torch.device(device):
        return JavisDiT(cfg, ops=ops)


def random_model(
    cfg: JavisConfig, numerics: Numerics | str = Numerics.FP32, device: torch.device | str = "cpu", seed: int = 0
) -> JavisDiT:
    """An eval-mode model with :func:`init_weights` weights, for tests, the demo and benchmarks.

    Built on the meta device and materialised once, in the numerics' dtype, on ``device`` (the full
    preset never exists twice); the random values are drawn on the CPU, so a seed gives the same
    weights on every device.
    """
    numerics = Numerics(numerics)
    dtype = torch.float32 if numerics is Numerics.FP32 else torch.bfloat16
    model = build_model(cfg, "meta").to(dtype).to_empty(device=device)
    init_weights(model, torch.Generator().manual_seed(seed))
    return model.set_numerics(numerics).requires_grad_(False).eval()


def init_weights(model: JavisDiT, generator: torch.Generator | None = None) -> JavisDiT:
    """Random weights with O(1) activations, for tests and the demo.

    Linear/Conv weight and bias ~ U(+-1/sqrt(fan_in)); norm weights ~ 1 + U(+-0.1) (norm3 bias
    ~ U(+-0.1)), so a test notices a norm applied in the wrong place; modulation tables ~ N(0, 1/d).
    """

    def uniform(p: torch.Tensor, bound: float, center: float = 0.0) -> None:
        p.copy_(center + (torch.rand(p.shape, generator=generator) * 2 - 1) * bound)

    d = model.cfg.dim
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                uniform(module.weight, bound)
                if module.bias is not None:
                    uniform(module.bias, bound)
            elif isinstance(module, (RMSNorm, nn.LayerNorm)):
                for pname, p in module.named_parameters(recurse=False):  # weight ~ 1 +- 0.1, bias ~ +-0.1
                    uniform(p, 0.1, center=1.0 if pname == "weight" else 0.0)
        for name, p in model.named_parameters():
            if name.endswith("modulation") or name.endswith("modulation.param"):
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(d))
    return model
