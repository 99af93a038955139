"""JavisDiT v0.1's spatio-temporal prior estimator, the ``STIBPrior`` head (v01-spec.md §4).

    h_txt [B, 77, 1024]  (ImageBind-huge text trunk output; the tower itself is not in this module)
      --in_proj--> [B, 77, 512] = src
    queries = cat(spatial_query_emb [1,32,512], temporal_query_emb [1,32,512]) repeated B times = tgt
    pre-norm Transformer (4 encoder + 4 decoder layers, 4 heads, ff 2048, final encoder/decoder norms)
      --out_proj--> [B, 64, 256] = [mean 128 | logvar 128]
    prior = mean + exp(0.5 clamp(logvar, -30, 20)) * eps,   eps = randn(mean.shape) on a CPU generator
    spatial_prior = prior[:, :32], temporal_prior = prior[:, 32:]

Parameter names follow ``nn.Transformer`` (``prior_extractor.encoder.layers.i.self_attn.in_proj_weight``,
...), so the released file loads as it is; the layers are written here, with attention through the op
seam. The reference builds ``nn.Transformer(..., activation=nn.GELU(approximate="tanh"))``, and two
PyTorch behaviours decide which activation actually runs (both kept: the reference does this, and the
checkpoint was trained with the same classes):

* **Encoder: exact GELU at inference.** Under ``eval()`` + ``no_grad`` ``nn.TransformerEncoderLayer``
  takes the fused fast path, which applies the *exact* GELU for any ``nn.GELU`` (v01-spec §4); the grad
  path (training) applies the module's tanh GELU.
* **Decoder: ReLU, always.** ``nn.TransformerDecoder`` clones its layer with ``copy.deepcopy``, and
  ``TransformerDecoderLayer.__setstate__`` sets ``activation = F.relu`` when ``"activation"`` is not in
  the instance ``__dict__`` -- which it never is, since the GELU module lives in ``_modules``. So every
  decoder layer runs ReLU (the spec's "tanh-GELU in the decoder" is not what the class computes; the
  test compares against ``nn.Transformer`` itself).
"""

from __future__ import annotations

from typing import NamedTuple

import torch
import torch.nn.functional as F
from torch import nn

from javisrt.engine.errors import ShapeError
from javisrt.engine.model import Numerics
from javisrt.engine.ops import OpSet, get_ops
from javisrt.engine.v01_config import STPriorConfig

LOGVAR_MIN, LOGVAR_MAX = -30.0, 20.0  # DiagonalGaussianDistribution's clamp


class PackedAttention(nn.Module):
    """``nn.MultiheadAttention`` parameters (packed ``in_proj_weight`` [3d, d], ``out_proj``), batch first."""

    def __init__(self, dim: int, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.in_proj_weight = nn.Parameter(torch.empty(3 * dim, dim))
        self.in_proj_bias = nn.Parameter(torch.zeros(3 * dim))
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, ops: OpSet) -> torch.Tensor:
        """x [B, Lq, d] queries, memory [B, Lk, d] keys/values -> [B, Lq, d]."""
        wq, wk, wv = self.in_proj_weight.chunk(3)
        bq, bk, bv = self.in_proj_bias.chunk(3)
        heads = (self.num_heads, -1)
        q = F.linear(x, wq, bq).unflatten(-1, heads)
        k = F.linear(memory, wk, bk).unflatten(-1, heads)
        v = F.linear(memory, wv, bv).unflatten(-1, heads)
        return self.out_proj(ops.attention(q, k, v, None).flatten(2))


class EncoderLayer(nn.Module):
    """Pre-norm ``nn.TransformerEncoderLayer``: ``x += SA(norm1 x)``; ``x += FF(norm2 x)``, exact GELU."""

    def __init__(self, cfg: STPriorConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = PackedAttention(d, cfg.nhead)
        self.linear1 = nn.Linear(d, cfg.ff_dim)
        self.linear2 = nn.Linear(cfg.ff_dim, d)
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)

    def forward(self, x: torch.Tensor, ops: OpSet) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, ops)
        # exact GELU: the reference's inference fast path (see the module docstring)
        return x + self.linear2(F.gelu(self.linear1(self.norm2(x))))


class DecoderLayer(nn.Module):
    """Pre-norm ``nn.TransformerDecoderLayer`` (no masks): self-attn, cross-attn to memory, FF with ReLU
    (the deep-copied reference layer's activation; see the module docstring)."""

    def __init__(self, cfg: STPriorConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.self_attn = PackedAttention(d, cfg.nhead)
        self.multihead_attn = PackedAttention(d, cfg.nhead)
        self.linear1 = nn.Linear(d, cfg.ff_dim)
        self.linear2 = nn.Linear(cfg.ff_dim, d)
        self.norm1 = nn.LayerNorm(d, eps=cfg.eps)
        self.norm2 = nn.LayerNorm(d, eps=cfg.eps)
        self.norm3 = nn.LayerNorm(d, eps=cfg.eps)

    def forward(self, x: torch.Tensor, memory: torch.Tensor, ops: OpSet) -> torch.Tensor:
        h = self.norm1(x)
        x = x + self.self_attn(h, h, ops)
        x = x + self.multihead_attn(self.norm2(x), memory, ops)
        return x + self.linear2(F.relu(self.linear1(self.norm3(x))))


class Stack(nn.Module):
    """``layers`` + the final ``norm`` (``nn.Transformer``'s encoder/decoder with ``norm_first``)."""

    def __init__(self, layers: list[nn.Module], dim: int, eps: float) -> None:
        super().__init__()
        self.layers = nn.ModuleList(layers)
        self.norm = nn.LayerNorm(dim, eps=eps)


class PriorTransformer(nn.Module):
    """``prior_extractor``: encoder over the text, decoder over the 64 queries."""

    def __init__(self, cfg: STPriorConfig) -> None:
        super().__init__()
        d = cfg.hidden_size
        self.encoder = Stack([EncoderLayer(cfg) for _ in range(cfg.num_encoder_layers)], d, cfg.eps)
        self.decoder = Stack([DecoderLayer(cfg) for _ in range(cfg.num_decoder_layers)], d, cfg.eps)

    def forward(self, src: torch.Tensor, tgt: torch.Tensor, ops: OpSet) -> torch.Tensor:
        """src [B, Ls, d], tgt [B, Lt, d] -> [B, Lt, d]."""
        memory = src
        for layer in self.encoder.layers:
            memory = layer(memory, ops)
        memory = self.encoder.norm(memory)
        x = tgt
        for layer in self.decoder.layers:
            x = layer(x, memory, ops)
        return self.decoder.norm(x)


class PriorDistribution(NamedTuple):
    mean: torch.Tensor  # [B, 64, 128]
    logvar: torch.Tensor  # [B, 64, 128], clamped to [-30, 20]


class STPrior(NamedTuple):
    spatial: torch.Tensor  # [B, 32, 128]
    temporal: torch.Tensor  # [B, 32, 128]


class STPriorEstimator(nn.Module):
    """The ``STIBPrior`` head: ImageBind text hidden states -> (spatial, temporal) prior tokens."""

    def __init__(self, cfg: STPriorConfig, ops: str = "torch") -> None:
        super().__init__()
        self.cfg = cfg
        d = cfg.hidden_size
        self.spatial_query_emb = nn.Parameter(torch.randn(1, cfg.spatial_token_num, d))
        self.temporal_query_emb = nn.Parameter(torch.randn(1, cfg.temporal_token_num, d))
        self.in_proj = nn.Linear(cfg.text_dim, d)
        self.prior_extractor = PriorTransformer(cfg)
        self.out_proj = nn.Linear(d, 2 * cfg.out_dim)
        self.numerics = Numerics.FP32
        self._ops: OpSet = get_ops(ops)

    @property
    def dtype(self) -> torch.dtype:
        return self.in_proj.weight.dtype

    def set_numerics(self, mode: Numerics | str) -> STPriorEstimator:
        """``"fp32"`` or ``"official"`` (the reference's ``prior_encoder.to(device, bf16)``)."""
        mode = Numerics(mode)
        self.to(torch.float32 if mode is Numerics.FP32 else torch.bfloat16)
        self.numerics = mode
        return self

    def distribution(self, text_hidden: torch.Tensor) -> PriorDistribution:
        """text_hidden [B, text_len, text_dim] -> mean, clamped logvar [B, 64, out_dim]."""
        cfg = self.cfg
        if text_hidden.ndim != 3 or text_hidden.shape[2] != cfg.text_dim:
            raise ShapeError(f"text hidden states must be [B, L, {cfg.text_dim}], got {tuple(text_hidden.shape)}")
        b = text_hidden.shape[0]
        src = self.in_proj(text_hidden.to(self.dtype))
        queries = torch.cat((self.spatial_query_emb, self.temporal_query_emb), dim=1).repeat(b, 1, 1)
        params = self.out_proj(self.prior_extractor(src, queries, self._ops))
        mean, logvar = params.chunk(2, dim=-1)
        return PriorDistribution(mean, logvar.clamp(LOGVAR_MIN, LOGVAR_MAX))

    def forward(self, text_hidden: torch.Tensor, generator: torch.Generator | None = None) -> STPrior:
        """Sample the prior once: ``mean + exp(0.5 logvar) * eps`` with ``eps = randn(mean.shape)`` drawn in
        fp32 on the CPU from ``generator`` (the reference draws from the global CPU generator), then moved
        to the activation device and dtype."""
        dist = self.distribution(text_hidden)
        eps = torch.randn(dist.mean.shape, generator=generator).to(device=dist.mean.device, dtype=dist.mean.dtype)
        prior = dist.mean + torch.exp(0.5 * dist.logvar) * eps
        return split_prior(prior, self.cfg.spatial_token_num)


def split_prior(prior: torch.Tensor, spatial_tokens: int) -> STPrior:
    """[B, S+T, C] -> (spatial [B, S, C], temporal [B, T, C])."""
    return STPrior(prior[:, :spatial_tokens], prior[:, spatial_tokens:])


def build_st_prior(cfg: STPriorConfig, device: torch.device | str = "cpu", ops: str = "torch") -> STPriorEstimator:
    with torch.device(device):
        return STPriorEstimator(cfg, ops=ops)


def random_st_prior(
    cfg: STPriorConfig, numerics: Numerics | str = Numerics.FP32, seed: int = 0
) -> STPriorEstimator:
    """Eval-mode estimator with random weights (Linear ~ U(+-1/sqrt(fan_in)), LayerNorm 1 +- 0.1 / +-0.1,
    queries ~ N(0, 1)), for tests and benchmarks."""
    g = torch.Generator().manual_seed(seed)
    model = build_st_prior(cfg, "meta").to_empty(device="cpu")
    with torch.no_grad():
        for name, p in model.named_parameters():
            fan_in = p.shape[-1]
            if name.endswith("query_emb"):
                p.copy_(torch.randn(p.shape, generator=g))
            elif ".norm" in name:
                center = 1.0 if name.endswith("weight") else 0.0
                p.copy_(center + (torch.rand(p.shape, generator=g) * 2 - 1) * 0.1)
            else:
                bound = 1.0 / fan_in**0.5 if p.ndim == 2 else 1.0 / cfg.hidden_size**0.5
                p.copy_((torch.rand(p.shape, generator=g) * 2 - 1) * bound)
    return model.set_numerics(numerics).requires_grad_(False).eval()
