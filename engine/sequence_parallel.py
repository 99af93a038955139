"""Ulysses sequence parallelism for the joint [video; audio] sequence: a layer around the op seam.

The network's math stays in ``engine/model.py`` and the op set of ``engine/ops.py``. Sequence
parallelism over a process group of K ranks only changes *which tokens a rank holds* and wraps the
op set's ``attention`` with two all-to-alls (DeepSpeed-Ulysses, as in xDiT/USP and LightX2V)::

    embed (every rank, whole sequence; cheap)            x [B, L, d], L = Lv + La
    pad to Lp = K*ceil(L/K), rank r keeps rows [r*Ls, (r+1)*Ls), Ls = Lp/K
    for each block (the model's own Block.forward, with SequenceParallelOps):
      modulate                      per token: the inner op set on the slice
      self-attention   q, k, v [B, Ls, H, D] --RoPE with this slice's rows of the TA-RoPE table
                       --all-to-all--> [B, Lp, H/K, D] (whole sequence, H/K heads)
                       --inner attention over the L real keys (padding excluded)--
                       --all-to-all--> [B, Ls, H, D]
      cross-attention  local: queries are this slice's tokens, keys/values the whole text
      modality FFN     per token: the video/audio boundary mapped into this slice (all video, all
                       audio, or straddling it), the padding rows passed through untouched
    all-gather the slices -> [B, L, d]; heads + unpatchify on every rank (the model's ``heads``)

Why RoPE is applied before the all-to-all: the rotation of a token depends only on its position, not
on the head, so it commutes with the head split, and each rank needs only its own slice of the table
(the issue's design; USP does the same). It is the op seam's own rotation (``apply_rope_ref``: fp32,
cast back to the activation dtype, as JavisDiT's ``mmrope_apply``); the inner attention then runs
without RoPE, so the torch and triton op sets both work unchanged (the fused triton kernel's
in-register RoPE is not used on this path).

Padding: the padded rows sit after the last audio token (zeros in, finite values throughout). Keys and
values are cut to the L real tokens before the inner attention, which is exact masking: a padded key
gets no weight in any softmax. Padded queries get a zero output and are dropped at the gather.

Communication per block and rank: one all-to-all of q, k, v stacked (3*B*Ls*d elements) and one of the
attention output (B*Ls*d); (K-1)/K of each leaves the rank. ``bench/parallel_model.py`` turns this into
bytes and time per step.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn

from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.model import JavisDiT
from javisrt.engine.ops import Expert, Modulation, OpSet, apply_rope_ref

__all__ = [
    "SequenceParallelOps",
    "SequenceShard",
    "check_degree",
    "gather_sequence",
    "sequence_parallel_forward",
]


def check_degree(degree: int, num_heads: int) -> None:
    """Ulysses splits the heads K ways for attention: K must divide the head count (12 released)."""
    if degree < 1:
        raise ConfigError(f"sequence-parallel degree must be >= 1, got {degree}")
    if num_heads % degree:
        divisors = [k for k in range(1, num_heads + 1) if num_heads % k == 0]
        raise ConfigError(
            f"sequence-parallel degree sp={degree} does not divide the model's {num_heads} attention heads; "
            f"use one of {divisors}"
        )


@dataclass(frozen=True)
class SequenceShard:
    """Rank ``rank`` of ``degree``'s contiguous slice of a joint sequence of ``num_tokens`` tokens.

    The sequence is padded to ``degree * length`` tokens; the slice is rows [start, start + length),
    of which the first ``valid`` are real tokens (a slice may hold no real token when L is tiny).
    """

    rank: int
    degree: int
    num_tokens: int

    def __post_init__(self) -> None:
        if not 0 <= self.rank < self.degree:
            raise ConfigError(f"shard rank {self.rank} outside 0..{self.degree - 1}")
        if self.num_tokens < 1:
            raise ShapeError("sequence parallelism needs at least one token")

    @property
    def length(self) -> int:
        """Ls = ceil(L / K): rows per rank, padding included."""
        return math.ceil(self.num_tokens / self.degree)

    @property
    def padded_tokens(self) -> int:
        return self.length * self.degree

    @property
    def start(self) -> int:
        return self.rank * self.length

    @property
    def valid(self) -> int:
        """Real (unpadded) tokens in this slice."""
        return max(0, min(self.num_tokens - self.start, self.length))

    def local_video_tokens(self, num_video_tokens: int) -> int:
        """The video/audio boundary inside this slice: its first n rows are video tokens."""
        return max(0, min(num_video_tokens - self.start, self.valid))

    def take(self, x: torch.Tensor) -> torch.Tensor:
        """This slice of the token dim (dim 1) of x [B, L, ...] -> [B, Ls, ...], zero-padded."""
        if x.shape[1] != self.num_tokens:
            raise ShapeError(f"shard of a {self.num_tokens}-token sequence given {x.shape[1]} tokens")
        part = x[:, self.start : self.start + self.valid]
        pad = self.length - self.valid
        if pad == 0:
            return part
        return torch.cat((part, part.new_zeros((part.shape[0], pad, *part.shape[2:]))), dim=1)

    def rope(self, cos: torch.Tensor, sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """This slice's rows of the TA-RoPE tables [L, D/2]; padded rows are the identity rotation."""
        if cos.shape[0] != self.num_tokens or sin.shape != cos.shape:
            raise ShapeError(f"RoPE tables {tuple(cos.shape)} do not cover the {self.num_tokens}-token sequence")
        rows = slice(self.start, self.start + self.valid)
        pad = (0, 0, 0, self.length - self.valid)
        return F.pad(cos[rows], pad, value=1.0), F.pad(sin[rows], pad, value=0.0)


def _seq_to_heads(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """[n, B, Ls, H, D] (my tokens, all heads) -> [n, B, K*Ls, H/K, D] (all tokens, my heads)."""
    n, b, ls, h, d = x.shape
    # chunk j of dim 0 goes to rank j: my tokens of rank j's head group
    send = x.reshape(n, b, ls, degree, h // degree, d).permute(3, 0, 1, 2, 4, 5).contiguous()
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: rank j's tokens of my heads
    return recv.permute(1, 2, 0, 3, 4, 5).reshape(n, b, degree * ls, h // degree, d)


def _heads_to_seq(x: torch.Tensor, group: dist.ProcessGroup, degree: int) -> torch.Tensor:
    """[B, K*Ls, H/K, D] (all tokens, my heads) -> [B, Ls, H, D] (my tokens, all heads)."""
    b, lp, hk, d = x.shape
    send = x.reshape(b, degree, lp // degree, hk, d).transpose(0, 1).contiguous()  # chunk j: rank j's tokens
    recv = torch.empty_like(send)
    dist.all_to_all_single(recv, send, group=group)  # recv[j]: my tokens of rank j's heads
    return recv.permute(1, 2, 0, 3, 4).reshape(b, lp // degree, degree * hk, d)


class SequenceParallelOps:
    """An :class:`~javisrt.engine.ops.OpSet` over one rank's slice of the sequence, around ``inner``.

    ``modulate`` and cross-attention are per token and run ``inner`` on the slice. Self-attention
    (called with RoPE tables, which are this slice's rows) does the Ulysses all-to-all around
    ``inner.attention``. ``modality_ffn`` receives the boundary of the *whole* sequence (what the
    model's Block passes) and maps it into the slice.
    """

    def __init__(self, inner: OpSet, shard: SequenceShard, group: dist.ProcessGroup | None) -> None:
        self.inner = inner
        self.shard = shard
        self.group = group

    @property
    def name(self) -> str:
        return f"{self.inner.name}+sp{self.shard.degree}"

    def for_layer(self, module: nn.Module) -> SequenceParallelOps:
        return SequenceParallelOps(self.inner.for_layer(module), self.shard, self.group)

    def linear(self, layer: nn.Linear, x: torch.Tensor) -> torch.Tensor:
        """Per token: local to the slice."""
        return self.inner.linear(layer, x)

    def sinusoid(self, t: torch.Tensor, dim: int) -> torch.Tensor:
        return self.inner.sinusoid(t, dim)

    def patch_embed(self, conv: nn.Conv2d | nn.Conv3d, x: torch.Tensor) -> torch.Tensor:
        return self.inner.patch_embed(conv, x)

    def modulate(self, x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor, eps: float) -> torch.Tensor:
        return self.inner.modulate(x, shift, scale, eps)

    def rms_norm(self, x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
        """Per token (the q/k norm spans all heads of one token): local to the slice."""
        return self.inner.rms_norm(x, weight, eps)

    def attention(
        self,
        q: torch.Tensor,
        k: torch.Tensor,
        v: torch.Tensor,
        rope: tuple[torch.Tensor, torch.Tensor] | None,
    ) -> torch.Tensor:
        """Self-attention (``rope`` given): q/k/v [B, Ls, H, D] of this slice -> [B, Ls, H, D].
        Cross-attention (``rope`` None): local, q [B, Ls, H, D], k/v [B, text_len, H, D]."""
        if rope is None:
            return self.inner.attention(q, k, v, None)
        shard, degree = self.shard, self.shard.degree
        if self.group is None:
            raise ConfigError("sequence-parallel self-attention needs a process group")
        if q.shape[2] % degree:
            raise ConfigError(f"{q.shape[2]} heads cannot be split over sp={degree} ranks")
        cos, sin = rope
        qkv = torch.stack((apply_rope_ref(q, cos, sin), apply_rope_ref(k, cos, sin), v))
        qh, kh, vh = _seq_to_heads(qkv, self.group, degree).unbind(0)
        n = shard.num_tokens  # keys/values cut to the real tokens: the padding is masked out exactly
        out = self.inner.attention(qh[:, :n], kh[:, :n], vh[:, :n], None)
        out = F.pad(out, (0, 0, 0, 0, 0, shard.padded_tokens - n))
        return _heads_to_seq(out, self.group, degree)

    def modality_ffn(
        self,
        x: torch.Tensor,
        num_video_tokens: int,
        video: Expert | None,
        audio: Expert | None,
        video_mod: Modulation | None,
        audio_mod: Modulation | None,
        eps: float,
    ) -> torch.Tensor:
        """x [B, Ls, d] of this slice; ``num_video_tokens``: Lv of the whole sequence."""
        valid = self.shard.valid
        local_lv = self.shard.local_video_tokens(num_video_tokens)
        if valid == 0:  # a slice of padding only (L < K * Ls - Ls): nothing to route
            return x
        out = self.inner.modality_ffn(x[:, :valid], local_lv, video, audio, video_mod, audio_mod, eps)
        if valid == x.shape[1]:
            return out
        return torch.cat((out, x[:, valid:]), dim=1)  # padding rows pass through unchanged


def gather_sequence(x: torch.Tensor, shard: SequenceShard, group: dist.ProcessGroup) -> torch.Tensor:
    """All-gather the slices [B, Ls, d] of every rank -> the whole sequence [B, L, d] (padding dropped)."""
    x = x.contiguous()
    b, ls = x.shape[:2]
    out = x.new_empty((shard.degree * b, *x.shape[1:]))  # concatenated form (gloo has no stacked form)
    dist.all_gather_single(out, x, group=group)  # group-rank order = sequence order
    out = out.unflatten(0, (shard.degree, b)).transpose(0, 1)
    return out.reshape(b, shard.degree * ls, *x.shape[2:])[:, : shard.num_tokens]


def sequence_parallel_forward(
    model: JavisDiT,
    group: dist.ProcessGroup,
    video: torch.Tensor | None,
    audio: torch.Tensor | None,
    timestep: torch.Tensor,
    context: torch.Tensor,
    context_mask: torch.Tensor | None = None,
    video_latent_frames: int | None = None,
) -> tuple[torch.Tensor | None, torch.Tensor | None]:
    """``model(...)`` with the sequence split over ``group``.

    Same arguments and result as ``JavisDiT.forward``; every rank of ``group`` passes the same inputs
    and gets the whole velocities. Its stages are the model's own ``embed``, ``transformer`` (with
    :class:`SequenceParallelOps` around the model's op set) and ``heads``.
    """
    degree = dist.get_world_size(group)
    check_degree(degree, model.cfg.num_heads)
    emb = model.embed(video, audio, timestep, context, context_mask, video_latent_frames)
    shard = SequenceShard(dist.get_rank(group), degree, emb.grid.num_tokens)
    cos, sin = model.rope(emb.grid, emb.x.device)
    ops = SequenceParallelOps(model.ops, shard, group)
    x = model.transformer(emb._replace(x=shard.take(emb.x)), shard.rope(cos, sin), ops)
    x = gather_sequence(x, shard, group)
    return model.heads(x, emb.e, emb.grid)
