"""JavisDiT v0.1's DiT, ``VASTDiT3`` (v01-spec.md §3, §5, §8), readable top to bottom.

Data flow of one forward (B batch; video grid T x S tokens, S = H' x W'; audio grid R x M tokens):

    video latent [B,4,T,H,W] --Conv3d(1,2,2)--> [B,T,S,C] + 2D sin-cos (W-first halves)  -> v [B,T*S,C]
    audio latent [B,8,Ta,16] --Conv2d(4,1)----> [B,R,M,C] + 1D sin-cos over M            -> a [B,R*M,C]
    timestep [B] --sinusoid--> t_embedder + fps_embedder --> t [B,C]
        t_block(t) -> t_mlp [B,6C] (all STDiT3 blocks), st_t_block(t) -> t_st [B,9C] (prior blocks)
    T5 y [B,1,L,4096] + mask --y_embedder / audio_y_embedder--> packed text per branch
    prior [B,32,128] x 2 --st_prior_embedder--> spatial / temporal prior tokens [B,32,C]
    for each layer i:  v = Vs_i(v); v = Vt_i(v); a = As_i(a); a = At_i(a);
                       v = VP_i(v); a = AP_i(a); (v, a) = VA_i(v, a)
    final_layer(v, t) -> unpatchify -> crop -> [B,8,T,H,W] fp32 (the sampler keeps [:4])
    audio_final_layer(a, t) -> unpatchify -> crop -> [B,16,Ta,16] fp32 (the sampler keeps [:8])

The audio-only preset has no Vs/Vt/VP/AP/VA blocks (the reference replaces them by identities, so its
audio output does not depend on the video latent): its forward takes ``video=None``.

Numerics (``set_numerics``):
  * ``"fp32"``: everything in fp32.
  * ``"official"``: what the reference runs with ``dtype="bf16"`` (whole model ``.to(bf16)``): bf16
    weights, activations, LayerNorms, modulation and residuals; the timestep rounded to bf16 before its
    fp32 sinusoid; RMSNorm statistics in fp32; softmax in fp32 (inside the attention op); ``rope.freqs``
    and the sin-cos ``inv_freq`` rounded to bf16 (RoPE angles computed in bf16, the 2D embedding in fp32
    from the rounded frequencies, the 1D one in bf16 as ``int64 x bf16`` promotes); height/width/fps
    rounded to bf16 (they are bf16 tensors in the reference); the outputs cast to fp32.
    Not bit-exact with the reference in two places, both sub-ulp-level roundings inside attention:
    the seam's attention keeps fp32 accumulation and softmax throughout, where the reference's eager
    ``Attention`` path (taken when a row has N <= B' tokens, e.g. every temporal and audio block)
    rounds ``q·scale``, the logits and the probabilities to bf16; and RoPE is applied in fp32 from the
    bf16 cos/sin tables and rounded once, where ``rotary_embedding_torch`` rounds each product in bf16.

Attention goes through the op seam (``engine/ops.py``): ``ops.attention(q, k, v, rope)`` for the
spatial/temporal self-attention (RoPE tables on temporal blocks), the text cross-attention (per
sample, or batched when all samples keep the same number of text tokens), the whole-batch prior
cross-attention and both directions of the video<->audio attention; ``ops.modulate`` for every adaLN.
The Triton attention kernel needs a power-of-two head_dim: it runs the ``tiny`` presets (16), not
the XL ones (72), where it raises ShapeError.
"""

from __future__ import annotations

import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.model import Numerics, RMSNorm
from javisrt.engine.ops import OpSet, get_ops
from javisrt.engine.v01_config import V01Config

Rope = tuple[torch.Tensor, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Position and time encodings (v01-spec.md §3.3, §5)
# ---------------------------------------------------------------------------------------------------


def timestep_sinusoid(t: torch.Tensor, dim: int) -> torch.Tensor:
    """Open-Sora's sinusoid, **cos first**: ``f_k = exp(-ln(1e4)·k/half)`` in fp32, ``[cos(t f), sin(t f)]``.

    t [N] (any float dtype; used as given, then upcast) -> [N, dim] fp32.
    """
    half = dim // 2
    freqs = torch.exp(-math.log(10000) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t[:, None].float() * freqs[None]
    return torch.cat([torch.cos(args), torch.sin(args)], dim=-1)


def sincos_inv_freq(dim: int, step: int, dtype: torch.dtype, device: torch.device | str | None = None) -> torch.Tensor:
    """``1 / 10000^(arange(0, dim, step) / dim)`` in fp32, then rounded to ``dtype`` (the reference's
    non-persistent ``inv_freq`` buffer, cast with the model)."""
    inv = 1.0 / (10000 ** (torch.arange(0, dim, step, device=device).float() / dim))
    return inv.to(dtype)


def pos_embed_2d(
    dim: int, h: int, w: int, scale: float, base_size: int, freq_dtype: torch.dtype, device: torch.device | str
) -> torch.Tensor:
    """``PositionEmbedding2D``: [1, h*w, dim] (h-major tokens), fp32.

    Coordinates ``gh = arange(h)/scale·base/h``, ``gw = arange(w)/scale·base/w`` (fp32);
    ``emb = [sin(gw f), cos(gw f), sin(gh f), cos(gh f)]`` with ``f_j = 10000^(-2j/(dim/2))``.
    **Quirk (the reference does it; the checkpoint was trained with it):** the *W* coordinate fills the
    first half (its meshgrid names are swapped). ``freq_dtype`` bf16 = official numerics: the
    frequencies are bf16-rounded, the products and sin/cos stay fp32 (fp32 x bf16 promotes to fp32).
    """
    inv = sincos_inv_freq(dim // 2, 2, freq_dtype, device)
    gh = torch.arange(h, device=device) / scale
    gw = torch.arange(w, device=device) / scale
    gh *= base_size / h
    gw *= base_size / w
    coord_w = gw.repeat(h)  # token h*w_count + w -> gw[w]
    coord_h = gh.repeat_interleave(w)  # -> gh[h]

    def sin_cos(c: torch.Tensor) -> torch.Tensor:
        out = torch.einsum("i,d->id", c, inv)
        return torch.cat((torch.sin(out), torch.cos(out)), dim=-1)

    return torch.cat([sin_cos(coord_w), sin_cos(coord_h)], dim=-1).unsqueeze(0)


def pos_embed_1d(dim: int, length: int, freq_dtype: torch.dtype, device: torch.device | str) -> torch.Tensor:
    """``PositionEmbedding`` over the audio frequency tokens: [1, length, dim].

    ``f_j = 10000^(-j/(dim/2))`` (step 1, not 2), ``emb = [sin(m f), cos(m f)]`` for m = 0..length-1.
    The reference multiplies an int64 ``arange`` with the ``inv_freq`` buffer, so under official
    numerics (bf16 buffer) the products and sin/cos are bf16; in fp32 they are fp32.
    """
    inv = sincos_inv_freq(dim // 2, 1, freq_dtype, device)
    out = torch.einsum("i,d->id", torch.arange(length, device=device), inv)
    return torch.cat((torch.sin(out), torch.cos(out)), dim=-1).unsqueeze(0)


def rope_tables(freqs: torch.Tensor, length: int) -> Rope:
    """RoPE (``rotary_embedding_torch`` 0.5.3, interleaved pairs) as the op seam's (cos, sin) [L, D/2] fp32.

    Angle of pair j at position p: ``p·freqs[j]`` computed in ``freqs.dtype`` (bf16 under official
    numerics: positions, angles and cos/sin all bf16 as the reference caches them), pair j = channels
    (2j, 2j+1): ``x'[2j] = x[2j] cos - x[2j+1] sin``, ``x'[2j+1] = x[2j+1] cos + x[2j] sin``.
    """
    pos = torch.arange(length, device=freqs.device, dtype=freqs.dtype)
    angles = torch.einsum("n,f->nf", pos, freqs)
    return angles.cos().float(), angles.sin().float()


# ---------------------------------------------------------------------------------------------------
# Small modules (names match the released state dict)
# ---------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    """timm ``Mlp``: fc1, GELU(tanh), fc2."""

    def __init__(self, in_features: int, hidden: int, out_features: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden)
        self.fc2 = nn.Linear(hidden, out_features)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


class ScalarEmbedder(nn.Module):
    """``TimestepEmbedder`` / ``SizeEmbedder``: sinusoid(freq_dim) -> Linear -> SiLU -> Linear."""

    def __init__(self, hidden: int, freq_dim: int) -> None:
        super().__init__()
        self.freq_dim = freq_dim
        self.mlp = nn.Sequential(nn.Linear(freq_dim, hidden), nn.SiLU(), nn.Linear(hidden, hidden))

    def forward(self, s: torch.Tensor) -> torch.Tensor:
        """s [N] -> [N, hidden] in the weights' dtype (the sinusoid is fp32, then cast)."""
        return self.mlp(timestep_sinusoid(s, self.freq_dim).to(next(self.mlp.parameters()).dtype))


class CaptionEmbedder(nn.Module):
    """``y_proj`` Mlp plus the learned null token(s) ``y_embedding`` (a buffer)."""

    y_embedding: torch.Tensor

    def __init__(self, in_channels: int, hidden: int, tokens: int) -> None:
        super().__init__()
        self.y_proj = Mlp(in_channels, hidden, hidden)
        self.register_buffer("y_embedding", torch.randn(tokens, in_channels) / in_channels**0.5)

    def forward(self, y: torch.Tensor) -> torch.Tensor:
        return self.y_proj(y)


class RotaryFreqs(nn.Module):
    """``rope.freqs`` [head_dim/2]: a *parameter* in the reference, so it is saved and cast with the model."""

    def __init__(self, head_dim: int, theta: float) -> None:
        super().__init__()
        self.freqs = nn.Parameter(rotary_inv_freq(head_dim, theta))


def rotary_inv_freq(head_dim: int, theta: float) -> torch.Tensor:
    """``1 / theta^(arange(0, D, 2)[:D/2] / D)`` fp32 (``RotaryEmbedding(dim=D)``'s initial ``freqs``)."""
    return 1.0 / (theta ** (torch.arange(0, head_dim, 2)[: head_dim // 2].float() / head_dim))


class PatchEmbed(nn.Module):
    """Conv patch embedding (``x_embedder`` 3D / ``ax_embedder`` 2D); the input is zero-padded on the
    right of every axis to a multiple of the patch."""

    def __init__(self, patch: tuple[int, ...], in_channels: int, hidden: int) -> None:
        super().__init__()
        self.patch = patch
        conv = nn.Conv3d if len(patch) == 3 else nn.Conv2d
        self.proj = conv(in_channels, hidden, kernel_size=patch, stride=patch)  # type: ignore[arg-type]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """[B, Cin, *spatial] -> [B, prod(grid), C] (raster order)."""
        pad: list[int] = []
        for size, p in zip(reversed(x.shape[2:]), reversed(self.patch)):
            pad += [0, (-size) % p]
        if any(pad):
            x = F.pad(x, pad)
        return self.proj(x).flatten(2).transpose(1, 2)


class FrameMask(NamedTuple):
    """Per-frame choice between t (True) and t0 (False), applied as ``where(keep, x, x_zero)``.

    ``keep`` [B, T] bool over the T groups of S consecutive tokens (video frames / audio time steps).
    """

    keep: torch.Tensor
    groups: int
    group_size: int

    def select(self, x: torch.Tensor, x_zero: torch.Tensor) -> torch.Tensor:
        shape = (self.groups, self.group_size)
        out = torch.where(self.keep[:, :, None, None], x.unflatten(1, shape), x_zero.unflatten(1, shape))
        return out.flatten(1, 2)


def _chunks(table: torch.Tensor, t: torch.Tensor, n: int) -> tuple[torch.Tensor, ...]:
    """``(scale_shift_table[None] + t.view(B, n, C)).chunk(n, dim=1)``: n tensors [B, 1, C]."""
    return (table[None] + t.view(t.shape[0], n, -1)).chunk(n, dim=1)


def _modulate(
    ops: OpSet, x: torch.Tensor, mod: tuple[torch.Tensor, ...], mod0: tuple[torch.Tensor, ...] | None,
    mask: FrameMask | None, eps: float,
) -> torch.Tensor:
    """``LN(x)*(1+scale)+shift`` with (shift, scale) = mod[:2]; frames marked False use mod0."""
    out = ops.modulate(x, mod[0], mod[1], eps)
    if mask is None:
        return out
    assert mod0 is not None
    return mask.select(out, ops.modulate(x, mod0[0], mod0[1], eps))


def _gate(h: torch.Tensor, gate: torch.Tensor, gate0: torch.Tensor | None, mask: FrameMask | None) -> torch.Tensor:
    out = gate * h
    if mask is None:
        return out
    assert gate0 is not None
    return mask.select(out, gate0 * h)


# ---------------------------------------------------------------------------------------------------
# Attention modules
# ---------------------------------------------------------------------------------------------------


class SelfAttention(nn.Module):
    """Open-Sora ``Attention``: qkv (bias), per-head qk RMSNorm (fp32 statistics), RoPE (temporal only)."""

    def __init__(self, dim: int, num_heads: int, eps: float) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.q_norm = RMSNorm(dim // num_heads, eps)
        self.k_norm = RMSNorm(dim // num_heads, eps)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, rope: Rope | None, ops: OpSet) -> torch.Tensor:
        """x [B', N, C] (B' = B*T spatial, B*S temporal), rope (cos, sin) [N, D/2] | None -> [B', N, C]."""
        b, n, c = x.shape
        q, k, v = self.qkv(x).view(b, n, 3, self.num_heads, -1).unbind(2)
        q, k = self.q_norm(q, ops), self.k_norm(k, ops)  # RoPE after the norm (qk_norm_legacy=False)
        return self.proj(ops.attention(q, k, v, rope).reshape(b, n, c))


class MultiHeadCrossAttention(nn.Module):
    """``MultiHeadCrossAttention``: q_linear, kv_linear (k = first half), proj; no qk-norm."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.q_linear = nn.Linear(dim, dim)
        self.kv_linear = nn.Linear(dim, 2 * dim)
        self.proj = nn.Linear(dim, dim)

    def packed(self, x: torch.Tensor, y: torch.Tensor, y_lens: list[int], ops: OpSet) -> torch.Tensor:
        """Text cross-attention, per sample (xformers' block-diagonal mask): sample b's N queries
        attend to its own y_lens[b] tokens. x [B, N, C], y [sum(y_lens), C] packed -> [B, N, C]."""
        b, n, c = x.shape
        h = self.num_heads
        q = self.q_linear(x).view(b, n, h, -1)
        k, v = self.kv_linear(y).view(-1, 2, h, c // h).unbind(1)
        if len(set(y_lens)) == 1:  # every sample keeps the same number of tokens: one batched call
            kb, vb = k.view(b, y_lens[0], h, -1), v.view(b, y_lens[0], h, -1)
            out = ops.attention(q, kb, vb, None)
        else:
            parts, start = [], 0
            for i, length in enumerate(y_lens):
                kv = slice(start, start + length)
                parts.append(ops.attention(q[i : i + 1], k[None, kv], v[None, kv], None))
                start += length
            out = torch.cat(parts)
        return self.proj(out.reshape(b, n, c))

    def whole_batch(self, x: torch.Tensor, cond: torch.Tensor, ops: OpSet) -> torch.Tensor:
        """Prior cross-attention as the reference runs it (``mask=None`` to xformers): **every** query
        row attends to the prior tokens of **every** sample of the batch.

        x [R, N, C] (R = B*T rows of S tokens, or B*S rows of T tokens), cond [B, P, C] -> [R, N, C].
        The reference repeats each sample's prior once per row (T or S times) before the call; every
        sample is repeated equally often, so the softmax equals attending to the B*P distinct tokens,
        which is what is computed here (one query sequence of R*N tokens, one key sequence of B*P).
        """
        r, n, c = x.shape
        h = self.num_heads
        q = self.q_linear(x).reshape(1, r * n, h, -1)
        k, v = self.kv_linear(cond).reshape(1, -1, 2, h, c // h).unbind(2)
        return self.proj(ops.attention(q, k, v, None).reshape(r, n, c))


class BiMultiHeadAttention(nn.Module):
    """Video<->audio attention ('sdpa' path): one q (video) and one k (audio) projection serve both
    directions, the audio->video direction with transposed logits. num_heads//2 heads over dim//2."""

    def __init__(self, dim: int, embed_dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.embed_dim = embed_dim
        self.m1_proj = nn.Linear(dim, embed_dim)
        self.m2_proj = nn.Linear(dim, embed_dim)
        self.values_m1_proj = nn.Linear(dim, embed_dim)
        self.values_m2_proj = nn.Linear(dim, embed_dim)
        self.out_m1_proj = nn.Linear(embed_dim, dim)
        self.out_m2_proj = nn.Linear(embed_dim, dim)

    def forward(self, v: torch.Tensor, a: torch.Tensor, ops: OpSet) -> tuple[torch.Tensor, torch.Tensor]:
        """v [B, Nv, C] and a [B, Na, C] (already normalised) -> (dv [B, Nv, C], da [B, Na, C])."""
        b, nv, _ = v.shape
        na = a.shape[1]
        heads = (self.num_heads, -1)
        q = self.m1_proj(v).unflatten(-1, heads)
        k = self.m2_proj(a).unflatten(-1, heads)
        v1 = self.values_m1_proj(v).unflatten(-1, heads)
        v2 = self.values_m2_proj(a).unflatten(-1, heads)
        dv = ops.attention(q, k, v2, None).reshape(b, nv, self.embed_dim)  # video <- audio
        da = ops.attention(k, q, v1, None).reshape(b, na, self.embed_dim)  # audio <- video
        return self.out_m1_proj(dv), self.out_m2_proj(da)


# ---------------------------------------------------------------------------------------------------
# Blocks
# ---------------------------------------------------------------------------------------------------


class STDiT3Block(nn.Module):
    """Spatial (attention within a frame / time step) or temporal (across frames, with RoPE) block."""

    def __init__(self, cfg: V01Config, temporal: bool) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.temporal = temporal
        self.eps = cfg.eps
        # 1. self-attention (adaLN chunks 0-2)
        self.attn = SelfAttention(c, cfg.num_heads, cfg.eps)
        # 2. text cross-attention: raw x, no norm, no modulation, no gate
        self.cross_attn = MultiHeadCrossAttention(c, cfg.num_heads)
        # 3. MLP (adaLN chunks 3-5)
        self.mlp = Mlp(c, cfg.mlp_hidden, c)
        self.scale_shift_table = nn.Parameter(torch.randn(6, c) / c**0.5)

    def forward(
        self, x: torch.Tensor, y: torch.Tensor, y_lens: list[int], t_mlp: torch.Tensor, t0_mlp: torch.Tensor | None,
        mask: FrameMask | None, grid: tuple[int, int], rope: Rope | None, ops: OpSet,
    ) -> torch.Tensor:
        """x [B, T*S, C], y packed [sum(y_lens), C], t_mlp/t0_mlp [B, 6C], grid (T, S) -> [B, T*S, C]."""
        b, _, c = x.shape
        frames, tokens = grid
        m = _chunks(self.scale_shift_table, t_mlp, 6)
        m0 = _chunks(self.scale_shift_table, t0_mlp, 6) if mask is not None and t0_mlp is not None else None
        # 1. self-attention
        h = _modulate(ops, x, m[0:2], m0[0:2] if m0 else None, mask, self.eps)
        if self.temporal:  # "B (T S) C -> (B S) T C"
            h = h.view(b, frames, tokens, c).transpose(1, 2).reshape(b * tokens, frames, c)
            h = self.attn(h, rope, ops)
            h = h.view(b, tokens, frames, c).transpose(1, 2).reshape(b, frames * tokens, c)
        else:  # "B (T S) C -> (B T) S C"
            h = self.attn(h.reshape(b * frames, tokens, c), None, ops).reshape(b, frames * tokens, c)
        x = x + _gate(h, m[2], m0[2] if m0 else None, mask)
        # 2. text cross-attention
        x = x + self.cross_attn.packed(x, y, y_lens, ops)
        # 3. MLP
        h = self.mlp(_modulate(ops, x, m[3:5], m0[3:5] if m0 else None, mask, self.eps))
        return x + _gate(h, m[5], m0[5] if m0 else None, mask)


class CrossSTDiT3Block(nn.Module):
    """ST-prior block (``st_prior_utilize='cross_attn'``): spatial prior cross-attn per frame, temporal
    prior cross-attn per location, MLP; 9 adaLN chunks; no self-attention."""

    def __init__(self, cfg: V01Config) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.eps = cfg.eps
        self.spatial_cross_attn = MultiHeadCrossAttention(c, cfg.num_heads)
        self.temporal_cross_attn = MultiHeadCrossAttention(c, cfg.num_heads)
        self.mlp = Mlp(c, cfg.mlp_hidden, c)
        self.scale_shift_table = nn.Parameter(torch.randn(9, c) / c**0.5)

    def forward(
        self, x: torch.Tensor, spatial_prior: torch.Tensor, temporal_prior: torch.Tensor, t_st: torch.Tensor,
        t0_st: torch.Tensor | None, mask: FrameMask | None, grid: tuple[int, int], ops: OpSet,
    ) -> torch.Tensor:
        """x [B, T*S, C], priors [B, P, C], t_st/t0_st [B, 9C] -> [B, T*S, C]."""
        b, _, c = x.shape
        frames, tokens = grid
        m = _chunks(self.scale_shift_table, t_st, 9)
        m0 = _chunks(self.scale_shift_table, t0_st, 9) if mask is not None and t0_st is not None else None
        # 1. spatial prior: rows (B T) of S tokens. Whole-batch attention: the reference passes no mask
        #    (v01-spec §3 quirk); the checkpoint was trained that way.
        h = _modulate(ops, x, m[0:2], m0[0:2] if m0 else None, mask, self.eps)
        h = self.spatial_cross_attn.whole_batch(h.reshape(b * frames, tokens, c), spatial_prior, ops)
        x = x + _gate(h.reshape(b, frames * tokens, c), m[2], m0[2] if m0 else None, mask)
        # 2. temporal prior: rows (B S) of T tokens, same whole-batch attention
        h = _modulate(ops, x, m[3:5], m0[3:5] if m0 else None, mask, self.eps)
        h = h.view(b, frames, tokens, c).transpose(1, 2).reshape(b * tokens, frames, c)
        h = self.temporal_cross_attn.whole_batch(h, temporal_prior, ops)
        h = h.view(b, tokens, frames, c).transpose(1, 2).reshape(b, frames * tokens, c)
        x = x + _gate(h, m[5], m0[5] if m0 else None, mask)
        # 3. MLP
        h = self.mlp(_modulate(ops, x, m[6:8], m0[6:8] if m0 else None, mask, self.eps))
        return x + _gate(h, m[8], m0[8] if m0 else None, mask)


class CrossModalityBiAttentionBlock(nn.Module):
    """VA block: LN (no affine) of both full sequences, bi-attention, per-channel gates ``gamma_m1/m2``
    (constructed as 0; see ``v01_checkpoint`` for what the loader leaves in them). No t-modulation."""

    def __init__(self, cfg: V01Config) -> None:
        super().__init__()
        c = cfg.hidden_size
        self.eps = cfg.eps
        self.cross_attn = BiMultiHeadAttention(c, cfg.bi_dim, cfg.bi_heads)
        self.gamma_m1 = nn.Parameter(torch.zeros(c))
        self.gamma_m2 = nn.Parameter(torch.zeros(c))

    def forward(self, v: torch.Tensor, a: torch.Tensor, ops: OpSet) -> tuple[torch.Tensor, torch.Tensor]:
        """v [B, Nv, C], a [B, Na, C] -> (v, a)."""
        dv, da = self.cross_attn(
            F.layer_norm(v, (v.shape[-1],), eps=self.eps), F.layer_norm(a, (a.shape[-1],), eps=self.eps), ops
        )
        return v + self.gamma_m1 * dv, a + self.gamma_m2 * da


class FinalLayer(nn.Module):
    """``T2IFinalLayer``: (shift, scale) = table + the **un-projected** t; ``linear(LN(x)(1+scale)+shift)``."""

    def __init__(self, hidden: int, patch_out: int, eps: float) -> None:
        super().__init__()
        self.eps = eps
        self.linear = nn.Linear(hidden, patch_out)
        self.scale_shift_table = nn.Parameter(torch.randn(2, hidden) / hidden**0.5)

    def forward(
        self, x: torch.Tensor, t: torch.Tensor, t0: torch.Tensor | None, mask: FrameMask | None, ops: OpSet
    ) -> torch.Tensor:
        """x [B, N, C], t/t0 [B, C] -> [B, N, patch_out]."""
        shift, scale = (self.scale_shift_table[None] + t[:, None]).chunk(2, dim=1)
        x = ops.modulate(x, shift, scale, self.eps)
        if mask is not None and t0 is not None:
            shift0, scale0 = (self.scale_shift_table[None] + t0[:, None]).chunk(2, dim=1)
            # Quirk (the reference does it; the checkpoint was trained with it): the t0 branch
            # normalises the *already modulated* x again: mod(LN(mod(LN(x), t)), t0).
            x = mask.select(x, ops.modulate(x, shift0, scale0, self.eps))
        return self.linear(x)


# ---------------------------------------------------------------------------------------------------
# The model
# ---------------------------------------------------------------------------------------------------


class V01Output(NamedTuple):
    video: torch.Tensor | None  # [B, 2*4, T, H, W] fp32 (pred_sigma: the sampler keeps [:, :4])
    audio: torch.Tensor  # [B, 2*8, Ta, F] fp32 (the sampler keeps [:, :8])


class VASTDiT3(nn.Module):
    """JavisDiT v0.1 DiT (``jav`` preset: all branches; ``audio``: the audio branch only)."""

    def __init__(self, cfg: V01Config, ops: str = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        c = cfg.hidden_size
        # 1. embeddings (time, fps, text, patches; the prior embedder and its 9-chunk projection)
        self.rope = RotaryFreqs(cfg.head_dim, cfg.rope_theta)
        self.x_embedder = PatchEmbed(cfg.patch_size, cfg.in_channels, c)
        self.t_embedder = ScalarEmbedder(c, cfg.freq_dim)
        self.fps_embedder = ScalarEmbedder(c, cfg.freq_dim)
        self.t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 6 * c))
        self.y_embedder = CaptionEmbedder(cfg.caption_channels, c, cfg.model_max_length)
        self.ax_embedder = PatchEmbed(cfg.audio_patch_size, cfg.audio_in_channels, c)
        self.audio_y_embedder = CaptionEmbedder(cfg.caption_channels, c, cfg.model_max_length)
        if cfg.has_video:
            self.st_t_block = nn.Sequential(nn.SiLU(), nn.Linear(c, 9 * c))
            self.st_prior_embedder = CaptionEmbedder(cfg.st_prior_channel, c, cfg.prior_len)
        # 2. blocks, one ModuleList per kind (layer i = Vs_i, Vt_i, As_i, At_i, VP_i, AP_i, VA_i)
        depth = range(cfg.depth)
        if cfg.has_video:
            self.spatial_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=False) for _ in depth)
            self.temporal_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=True) for _ in depth)
        self.audio_spatial_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=False) for _ in depth)
        self.audio_temporal_blocks = nn.ModuleList(STDiT3Block(cfg, temporal=True) for _ in depth)
        if cfg.has_video:
            self.video_st_prior_blocks = nn.ModuleList(CrossSTDiT3Block(cfg) for _ in depth)
            self.audio_st_prior_blocks = nn.ModuleList(CrossSTDiT3Block(cfg) for _ in depth)
            self.va_cross_blocks = nn.ModuleList(CrossModalityBiAttentionBlock(cfg) for _ in depth)
        # 3. final layers (the audio-only model keeps the video one: it is in its state dict)
        self.final_layer = FinalLayer(c, math.prod(cfg.patch_size) * cfg.out_channels, cfg.eps)
        self.audio_final_layer = FinalLayer(c, math.prod(cfg.audio_patch_size) * cfg.audio_out_channels, cfg.eps)
        self.tie_null_caption()
        self.numerics = Numerics.FP32
        self._ops: OpSet = get_ops(ops)

    # ---- shared storage and numerics -------------------------------------------------------------
    def tie_null_caption(self) -> None:
        """``audio_y_embedder.y_embedding`` *is* ``y_embedder.y_embedding`` (the reference assigns one
        ``.data`` to the other); re-tied after every dtype/device move and after loading."""
        self.audio_y_embedder.y_embedding = self.y_embedder.y_embedding

    def _apply(self, fn, recurse=True):  # type: ignore[no-untyped-def]
        super()._apply(fn, recurse)
        self.tie_null_caption()
        return self

    @property
    def ops(self) -> OpSet:
        return self._ops

    def set_ops(self, name: str) -> VASTDiT3:
        self._ops = get_ops(name)
        return self

    @property
    def dtype(self) -> torch.dtype:
        """Parameter/activation dtype (``x_embedder.proj.weight.dtype``, as the reference reads it)."""
        return self.x_embedder.proj.weight.dtype

    def set_numerics(self, mode: Numerics | str) -> VASTDiT3:
        """``"fp32"``: everything fp32. ``"official"``: the whole model in bf16 (the reference's
        ``.to(device, bf16)``, buffers and ``rope.freqs`` included; no fp32 weights anywhere)."""
        mode = Numerics(mode)
        self.to(torch.float32 if mode is Numerics.FP32 else torch.bfloat16)
        self.numerics = mode
        return self

    def _size_scalar(self, value: float) -> float:
        # height/width/fps are bf16 tensors in the official run (prepare_multi_resolution_info(dtype)).
        if self.numerics is Numerics.OFFICIAL:
            return float(torch.tensor(value, dtype=torch.bfloat16))
        return float(value)

    # ---- forward pieces --------------------------------------------------------------------------
    def encode_text(self, embedder: CaptionEmbedder, y: torch.Tensor, mask: torch.Tensor | None) -> tuple[torch.Tensor, list[int]]:
        """``encode_text``: y [B, L, 4096] -> packed [sum(y_lens), C] and y_lens.

        A mask with fewer rows than y is **repeated** (``mask.repeat(B // Bm, 1)``), so in the CFG batch
        the null caption keeps the cond prompt's valid positions (v01-spec §3.4 quirk: the reference
        does it and the checkpoint was trained with it).
        """
        b, length, _ = y.shape
        emb = embedder(y)  # [B, L, C]
        if mask is None:
            return emb.reshape(b * length, -1), [length] * b
        if mask.ndim != 2 or mask.shape[1] != length or b % mask.shape[0]:
            raise ShapeError(f"mask must be [B' dividing {b}, {length}], got {tuple(mask.shape)}")
        if mask.shape[0] != b:
            mask = mask.repeat(b // mask.shape[0], 1)
        keep = mask != 0
        y_lens = [int(n) for n in keep.sum(dim=1).tolist()]
        if min(y_lens) == 0:
            raise ShapeError("a sample has no valid text token (mask row all zero)")
        return emb[keep], y_lens

    def forward(
        self,
        video: torch.Tensor | None,
        audio: torch.Tensor,
        timestep: torch.Tensor,
        y: torch.Tensor,
        mask: torch.Tensor | None,
        fps: float,
        height: float,
        width: float,
        spatial_prior: torch.Tensor | None = None,
        temporal_prior: torch.Tensor | None = None,
        x_mask: torch.Tensor | None = None,
        ax_mask: torch.Tensor | None = None,
    ) -> V01Output:
        """One denoiser evaluation.

        video [B,4,T,H,W] (None for the audio-only preset), audio [B,8,Ta,F], timestep [B] (0..1000),
        y [B,L,4096] or [B,1,L,4096] (T5), mask [B',L] with B' dividing B (int, 1 = token) | None,
        fps / height / width: the clip's frame rate and pixel size (2D embedding scale),
        spatial_prior [B,32,128] / temporal_prior [B,32,128] (jav only),
        x_mask [B,T] bool / ax_mask [B,Ta] bool (False = clean frame, uses t0) | None.
        Returns ``V01Output(video [B,8,T,H,W] | None, audio [B,16,Ta,F])``, fp32.
        """
        cfg, ops = self.cfg, self._ops
        act = self.dtype
        b = audio.shape[0]
        if audio.ndim != 4 or audio.shape[1] != cfg.audio_in_channels:
            raise ShapeError(f"audio latent must be [B,{cfg.audio_in_channels},Ta,F], got {tuple(audio.shape)}")
        if cfg.has_video:
            if video is None or spatial_prior is None or temporal_prior is None:
                raise ShapeError("the jav model needs the video latent and both priors")
            if video.ndim != 5 or video.shape[:2] != (b, cfg.in_channels):
                raise ShapeError(f"video latent must be [{b},{cfg.in_channels},T,H,W], got {tuple(video.shape)}")
            for name, p, n in (("spatial", spatial_prior, cfg.spatial_prior_len),
                               ("temporal", temporal_prior, cfg.temporal_prior_len)):
                if p.shape != (b, n, cfg.st_prior_channel):
                    raise ShapeError(f"{name}_prior must be [{b},{n},{cfg.st_prior_channel}], got {tuple(p.shape)}")
        elif video is not None or spatial_prior is not None or x_mask is not None:
            raise ConfigError(f"preset {cfg.name!r} is audio-only: pass video=None, no priors, no x_mask")
        if timestep.shape != (b,):
            raise ShapeError(f"timestep must be [{b}], got {tuple(timestep.shape)}")
        if y.ndim == 4:
            y = y.squeeze(1)
        if y.ndim != 3 or y.shape[0] != b or y.shape[2] != cfg.caption_channels:
            raise ShapeError(f"y must be [{b},L,{cfg.caption_channels}], got {tuple(y.shape)}")
        if x_mask is not None and ax_mask is None:
            raise ShapeError("x_mask needs ax_mask (the reference asserts it)")

        # 1. embeddings ---------------------------------------------------------------------------
        timestep = timestep.to(act)  # official: t rounded to bf16 (992 for 991.64)
        fps_t = torch.full((b,), self._size_scalar(fps), dtype=act, device=audio.device)
        t = self.t_embedder(timestep) + self.fps_embedder(fps_t)  # [B, C]
        t_mlp = self.t_block(t)
        t0 = t0_mlp = None
        if ax_mask is not None:  # the t0 branch (clean frames), also for all-True masks
            t0 = self.t_embedder(torch.zeros_like(timestep)) + self.fps_embedder(fps_t)
            t0_mlp = self.t_block(t0)
        y = y.to(act)
        ay, ay_lens = self.encode_text(self.audio_y_embedder, y, mask)
        audio_tokens = self.ax_embedder(audio.to(act))
        ta, fa = audio.shape[2:]
        r, m_tokens = -(-ta // cfg.audio_patch_size[0]), -(-fa // cfg.audio_patch_size[1])
        a_pos = pos_embed_1d(cfg.hidden_size, m_tokens, self._freq_dtype(), audio.device).to(act)
        a = (audio_tokens.view(b, r, m_tokens, -1) + a_pos[:, None]).flatten(1, 2)
        a_grid = (r, m_tokens)
        a_mask = None
        if ax_mask is not None:
            a_mask = FrameMask(ax_mask[:, :: cfg.audio_patch_size[0]].bool(), r, m_tokens)
            if a_mask.keep.shape != (b, r):
                raise ShapeError(f"ax_mask must be [{b},{ta}], got {tuple(ax_mask.shape)}")
        rope_a = rope_tables(self.rope.freqs, r)

        if cfg.has_video:
            assert video is not None and spatial_prior is not None and temporal_prior is not None
            t_st = self.st_t_block(t)
            t0_st = self.st_t_block(t0) if t0 is not None else None
            vy, vy_lens = self.encode_text(self.y_embedder, y, mask)
            prior = torch.cat((spatial_prior, temporal_prior), dim=1).to(act)
            sp, tp = self.st_prior_embedder(prior).split([cfg.spatial_prior_len, cfg.temporal_prior_len], dim=1)
            tx, hx, wx = video.shape[2:]
            frames, hp, wp = (-(-s // p) for s, p in zip((tx, hx, wx), cfg.patch_size))
            tokens = hp * wp
            scale = math.sqrt(self._size_scalar(height) * self._size_scalar(width)) / cfg.input_sq_size
            v_pos = pos_embed_2d(cfg.hidden_size, hp, wp, scale, round(tokens**0.5), self._freq_dtype(), video.device)
            v = (self.x_embedder(video.to(act)).view(b, frames, tokens, -1) + v_pos.to(act)[:, None]).flatten(1, 2)
            v_grid = (frames, tokens)
            v_mask = None
            if x_mask is not None:
                if x_mask.shape != (b, frames):
                    raise ShapeError(f"x_mask must be [{b},{frames}], got {tuple(x_mask.shape)}")
                v_mask = FrameMask(x_mask.bool(), frames, tokens)
            rope_v = rope_tables(self.rope.freqs, frames)

        # 2. blocks -------------------------------------------------------------------------------
        for i in range(cfg.depth):
            if cfg.has_video:
                v = self.spatial_blocks[i](v, vy, vy_lens, t_mlp, t0_mlp, v_mask, v_grid, None, ops)
                v = self.temporal_blocks[i](v, vy, vy_lens, t_mlp, t0_mlp, v_mask, v_grid, rope_v, ops)
            a = self.audio_spatial_blocks[i](a, ay, ay_lens, t_mlp, t0_mlp, a_mask, a_grid, None, ops)
            a = self.audio_temporal_blocks[i](a, ay, ay_lens, t_mlp, t0_mlp, a_mask, a_grid, rope_a, ops)
            if cfg.has_video:
                v = self.video_st_prior_blocks[i](v, sp, tp, t_st, t0_st, v_mask, v_grid, ops)
                a = self.audio_st_prior_blocks[i](a, sp, tp, t_st, t0_st, a_mask, a_grid, ops)
                v, a = self.va_cross_blocks[i](v, a, ops)

        # 3. final layers, unpatchify, crop -------------------------------------------------------
        audio_out = self.unpatchify(self.audio_final_layer(a, t, t0, a_mask, ops), a_grid, cfg.audio_patch_size,
                                    cfg.audio_out_channels, (ta, fa))
        video_out = None
        if cfg.has_video:
            video_out = self.unpatchify(self.final_layer(v, t, t0, v_mask, ops), (frames, hp, wp), cfg.patch_size,
                                        cfg.out_channels, (tx, hx, wx))
        return V01Output(video_out, audio_out)

    def _freq_dtype(self) -> torch.dtype:
        return torch.bfloat16 if self.numerics is Numerics.OFFICIAL else torch.float32

    @staticmethod
    def unpatchify(
        x: torch.Tensor, grid: tuple[int, ...], patch: tuple[int, ...], channels: int, size: tuple[int, ...]
    ) -> torch.Tensor:
        """``B (N1 N2 [N3]) (P1 P2 [P3] Co) -> B Co (N1 P1) (N2 P2) [(N3 P3)]`` (channel fastest inside a
        patch), cropped to ``size``, cast to fp32."""
        b, nd = x.shape[0], len(grid)
        u = x.reshape(b, *grid, *patch, channels)
        # [B, N1..Nn, P1..Pn, Co] -> [B, Co, N1, P1, N2, P2, ...]
        order = [0, 2 * nd + 1] + [i for k in range(nd) for i in (1 + k, 1 + nd + k)]
        u = u.permute(order).reshape(b, channels, *(n * p for n, p in zip(grid, patch)))
        crop = (slice(None), slice(None)) + tuple(slice(0, s) for s in size)
        return u[crop].float()


# ---------------------------------------------------------------------------------------------------
# Construction
# ---------------------------------------------------------------------------------------------------


def build_v01_model(cfg: V01Config, device: torch.device | str = "cpu", ops: str = "torch") -> VASTDiT3:
    """Build on ``device``; ``"meta"`` allocates nothing (load with ``assign=True`` afterwards)."""
    with torch.device(device):
        return VASTDiT3(cfg, ops=ops)


def init_v01_weights(model: VASTDiT3, generator: torch.Generator | None = None) -> VASTDiT3:
    """Random weights with O(1) activations, for tests and benchmarks.

    Linear/Conv ~ U(+-1/sqrt(fan_in)); RMSNorm weights 1 + U(+-0.1); adaLN tables and null tokens
    ~ N(0, 1/width); bi-attention gates ~ U(0.5, 1) so that the VA blocks matter (the released
    construction value is 0); ``rope.freqs`` = its deterministic construction value.
    """

    def uniform(p: torch.Tensor, low: float, high: float) -> None:
        p.copy_(low + torch.rand(p.shape, generator=generator) * (high - low))

    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, (nn.Linear, nn.Conv2d, nn.Conv3d)):
                bound = 1.0 / math.sqrt(module.weight[0].numel())
                uniform(module.weight, -bound, bound)
                if module.bias is not None:
                    uniform(module.bias, -bound, bound)
            elif isinstance(module, RMSNorm):
                uniform(module.weight, 0.9, 1.1)
            elif isinstance(module, CaptionEmbedder):
                e = module.y_embedding
                e.copy_(torch.randn(e.shape, generator=generator) / math.sqrt(e.shape[1]))
            elif isinstance(module, CrossModalityBiAttentionBlock):
                uniform(module.gamma_m1, 0.5, 1.0)
                uniform(module.gamma_m2, 0.5, 1.0)
        for name, p in model.named_parameters():
            if name.endswith("scale_shift_table"):
                p.copy_(torch.randn(p.shape, generator=generator) / math.sqrt(p.shape[-1]))
        model.rope.freqs.copy_(rotary_inv_freq(model.cfg.head_dim, model.cfg.rope_theta))
    model.tie_null_caption()
    return model


def random_v01_model(
    cfg: V01Config, numerics: Numerics | str = Numerics.FP32, device: torch.device | str = "cpu", seed: int = 0
) -> VASTDiT3:
    """An eval-mode model with :func:`init_v01_weights` weights, built on meta and materialised once."""
    numerics = Numerics(numerics)
    dtype = torch.float32 if numerics is Numerics.FP32 else torch.bfloat16
    model = build_v01_model(cfg, "meta").to(dtype).to_empty(device=device)
    init_v01_weights(model, torch.Generator().manual_seed(seed))
    return model.set_numerics(numerics).requires_grad_(False).eval()
