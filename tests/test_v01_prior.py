"""JavisDiT v0.1 ST-prior estimator against ``torch.nn.Transformer`` itself, the class the reference uses.

The reference builds ``nn.Transformer(..., activation=nn.GELU(approximate="tanh"), batch_first=True,
norm_first=True)`` and calls it under eval + no_grad, so the activations that really run are PyTorch's:
exact GELU in the encoder (fused fast path) and ReLU in the decoder (deep-copied layers).
"""

from __future__ import annotations

import math
import warnings

import pytest
import torch
from torch import nn

from _tolerance import assert_within, rel_err
from javisrt.engine.errors import ShapeError
from javisrt.engine.st_prior import LOGVAR_MAX, LOGVAR_MIN, random_st_prior
from javisrt.engine.v01_config import STPriorConfig

CFG = STPriorConfig.from_name("tiny")


def _reference_transformer(prior) -> nn.Transformer:
    with warnings.catch_warnings():  # enable_nested_tensor is ignored with norm_first (a UserWarning)
        warnings.simplefilter("ignore", UserWarning)
        ref = nn.Transformer(
            d_model=CFG.hidden_size, nhead=CFG.nhead, num_encoder_layers=CFG.num_encoder_layers,
            num_decoder_layers=CFG.num_decoder_layers, dim_feedforward=CFG.ff_dim, dropout=0.0,
            activation=nn.GELU(approximate="tanh"), batch_first=True, norm_first=True,
        )
    state = {k.removeprefix("prior_extractor."): v for k, v in prior.state_dict().items() if k.startswith("prior_extractor.")}
    ref.load_state_dict(state, strict=True)
    return ref.eval()


def _src_tgt(prior, b: int = 2) -> tuple[torch.Tensor, torch.Tensor]:
    text = torch.randn(b, CFG.text_len, CFG.text_dim, generator=torch.Generator().manual_seed(3))
    src = prior.in_proj(text)
    tgt = torch.cat((prior.spatial_query_emb, prior.temporal_query_emb), dim=1).repeat(b, 1, 1)
    return src, tgt


@torch.no_grad()
def test_transformer_matches_nn_transformer_at_inference() -> None:
    prior = random_st_prior(CFG)
    ref = _reference_transformer(prior)
    src, tgt = _src_tgt(prior)
    out = prior.prior_extractor(src, tgt, prior._ops)
    expected = ref(src, tgt)
    assert_within(out, expected, 1e-5, "prior transformer vs nn.Transformer (eval, no_grad)")
    # The two activation quirks, each would-be "fix" moves the output:
    ref.train()  # grad path of the encoder: tanh GELU (dropout is 0)
    assert rel_err(ref(src, tgt), expected) > 1e-5
    assert all(layer.activation is torch.nn.functional.relu for layer in ref.decoder.layers)


@torch.no_grad()
def test_decoder_activation_is_relu_not_gelu() -> None:
    prior = random_st_prior(CFG)
    ref = _reference_transformer(prior)
    src, tgt = _src_tgt(prior)
    expected = ref(src, tgt)
    for layer in ref.decoder.layers:  # what the spec assumed: the module's tanh GELU
        layer.activation = nn.GELU(approximate="tanh")
    assert rel_err(ref(src, tgt), expected) > 1e-2


@torch.no_grad()
def test_sampling_uses_seeded_cpu_eps_and_clamped_logvar() -> None:
    prior = random_st_prior(CFG)
    text = torch.randn(2, CFG.text_len, CFG.text_dim)
    dist = prior.distribution(text)
    assert dist.mean.shape == (2, CFG.num_tokens, CFG.out_dim)
    assert float(dist.logvar.min()) >= LOGVAR_MIN and float(dist.logvar.max()) <= LOGVAR_MAX
    sampled = prior(text, torch.Generator().manual_seed(42))
    eps = torch.randn(dist.mean.shape, generator=torch.Generator().manual_seed(42))
    expected = dist.mean + torch.exp(0.5 * dist.logvar) * eps
    assert torch.equal(sampled.spatial, expected[:, : CFG.spatial_token_num])
    assert torch.equal(sampled.temporal, expected[:, CFG.spatial_token_num :])
    # independent recomputation of the head: out_proj(transformer(in_proj(text))) split in halves
    src = prior.in_proj(text)
    tgt = torch.cat((prior.spatial_query_emb, prior.temporal_query_emb), 1).repeat(2, 1, 1)
    params = prior.out_proj(_reference_transformer(prior)(src, tgt))
    assert_within(dist.mean, params[..., : CFG.out_dim], 1e-5, "mean")
    assert_within(dist.logvar, params[..., CFG.out_dim :].clamp(-30, 20), 1e-5, "logvar")


def test_logvar_clamp_bounds() -> None:
    assert (LOGVAR_MIN, LOGVAR_MAX) == (-30.0, 20.0)
    assert math.isfinite(math.exp(0.5 * LOGVAR_MAX))


@torch.no_grad()
def test_official_numerics_is_bf16_and_close() -> None:
    text = torch.randn(2, CFG.text_len, CFG.text_dim)
    ref = random_st_prior(CFG).distribution(text)
    out = random_st_prior(CFG, "official").distribution(text)
    assert out.mean.dtype == torch.bfloat16
    assert rel_err(out.mean, ref.mean) < 0.05


def test_bad_text_shape() -> None:
    with pytest.raises(ShapeError):
        random_st_prior(CFG).distribution(torch.randn(2, 9, CFG.text_dim + 1))
