"""engine/model.py: structure (§5.1), parity with diffusers' Wan (§5.3), token counts (§8), numerics."""

from __future__ import annotations

import pytest
import torch
from diffusers import WanTransformer3DModel

from _tolerance import rel_err
from javisrt.engine.checkpoint import diffusers_to_wan
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.model import FP32_MODULES, JavisDiT, build_model, init_weights, num_parameters

# model-spec.md §5.1: shapes of the released state dict (block 7 stands for every block).
SPEC_SHAPES = {
    "patch_embedding.weight": (1536, 16, 1, 2, 2),
    "text_embedding.0.weight": (1536, 4096),
    "text_embedding.2.weight": (1536, 1536),
    "time_embedding.0.weight": (1536, 256),
    "time_embedding.2.weight": (1536, 1536),
    "time_projection.1.weight": (9216, 1536),
    "time_projection.1.bias": (9216,),
    "blocks.7.self_attn.q.weight": (1536, 1536),
    "blocks.7.self_attn.o.bias": (1536,),
    "blocks.7.self_attn.norm_q.weight": (1536,),
    "blocks.7.cross_attn.k.weight": (1536, 1536),
    "blocks.7.cross_attn.norm_k.weight": (1536,),
    "blocks.7.norm3.weight": (1536,),
    "blocks.7.norm3.bias": (1536,),
    "blocks.7.ffn.0.weight": (8960, 1536),
    "blocks.7.ffn.0.bias": (8960,),
    "blocks.7.ffn.2.weight": (1536, 8960),
    "blocks.7.modulation": (1, 6, 1536),
    "head.modulation": (1, 2, 1536),
    "head.head.weight": (64, 1536),
    "head.head.bias": (64,),
    "audio_patch_embedding.weight": (1536, 8, 2, 2),
    "audio_patch_embedding.bias": (1536,),
    "audio_time_projection.1.weight": (4608, 1536),
    "audio_time_projection.1.bias": (4608,),
    "blocks.29.audio_ffn.0.weight": (8960, 1536),
    "blocks.29.audio_ffn.2.weight": (1536, 8960),
    "blocks.29.audio_modulation.param": (1, 3, 1536),
    "audio_head.modulation": (1, 2, 1536),
    "audio_head.head.weight": (32, 1536),
    "audio_head.head.bias": (32,),
}


def test_released_preset_structure_on_meta() -> None:
    model = build_model(JavisConfig.from_name("javisdit-v1.0"), "meta")
    state = model.state_dict()
    assert len(state) == 982
    assert num_parameters(model) == 2_252_388_960
    for key, shape in SPEC_SHAPES.items():
        assert tuple(state[key].shape) == shape, key
    per_block = [k for k in state if k.startswith("blocks.3.")]
    assert len(per_block) == 27 + 5
    assert not any("norm1" in k or "norm2" in k for k in state)


def test_wan_preset_structure_on_meta() -> None:
    model = build_model(JavisConfig.from_name("wan2.1-t2v-1.3b"), "meta")
    assert len(model.state_dict()) == 825
    assert num_parameters(model) == 1_418_996_800
    assert not any("audio" in k for k in model.state_dict())


# (frames, video latent [T, H8, W8], audio latent Tm4) -> (Lv, La): model-spec.md §7–8
TOKEN_CASES = [
    ("240p/33f", (9, 30, 54), 56, 3645, 224),
    ("240p/65f", (17, 30, 54), 104, 6885, 416),
    ("480p/81f", (21, 60, 108), 128, 34020, 512),
]


@pytest.mark.parametrize(("name", "video_thw", "tm4", "lv", "la"), TOKEN_CASES, ids=[c[0] for c in TOKEN_CASES])
def test_embed_token_counts_full_preset(name: str, video_thw: tuple, tm4: int, lv: int, la: int) -> None:
    model = build_model(JavisConfig.from_name("javisdit-v1.0"), "meta")
    video = torch.empty(2, 16, *video_thw, device="meta")
    audio = torch.empty(2, 8, tm4, 16, device="meta")
    emb = model.embed(video, audio, torch.empty(2, device="meta"), torch.empty(2, 512, 4096, device="meta"))
    assert emb.grid.num_video_tokens == lv and emb.grid.num_audio_tokens == la
    assert tuple(emb.x.shape) == (2, lv + la, 1536)
    assert tuple(emb.e0.shape) == (2, 6, 1536) and tuple(emb.ae0.shape) == (2, 3, 1536)
    assert tuple(emb.context.shape) == (2, 512, 1536)


def _randomize(module: torch.nn.Module) -> None:
    """Every parameter random and O(1)/sqrt(fan_in): nothing left at a default that hides a bug."""
    with torch.no_grad():
        for name, p in module.named_parameters():
            fan_in = p[0].numel() if p.ndim > 1 else p.numel()
            if "norm" in name and p.ndim == 1:
                p.copy_(1 + 0.1 * torch.randn_like(p))
            else:
                p.copy_(torch.randn_like(p) / fan_in**0.5)


def test_t2v_equals_diffusers_wan() -> None:
    """External reference: diffusers' WanTransformer3DModel with the same weights (§5.3 names), fp32."""
    cfg = JavisConfig.from_name("tiny", model_type="t2v")
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim,
        in_channels=16, out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim,
        num_layers=cfg.num_layers, cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
        rope_max_seq_len=1024,
    ).eval()
    _randomize(ref)
    ours = JavisDiT(cfg).eval()
    ours.load_state_dict(diffusers_to_wan(ref.state_dict()), strict=True)
    video = torch.randn(2, 16, 3, 10, 14)
    t = torch.tensor([937.0, 120.0])
    text = torch.randn(2, cfg.text_len, cfg.text_dim)
    with torch.no_grad():
        expect = ref(video, t, text, return_dict=False)[0]
        got, audio = ours(video, None, t, text)
    assert audio is None
    # ours returns the negated (Open-Sora velocity) output
    err = rel_err(got, -expect)
    assert err < 1e-5, f"relative error vs diffusers {err:.2e}"


@pytest.fixture
def tiny() -> JavisDiT:
    return init_weights(JavisDiT(JavisConfig.from_name("tiny")).eval(), torch.Generator().manual_seed(1))


def _inputs(batch: int = 2) -> tuple[torch.Tensor, ...]:
    return (torch.randn(batch, 16, 3, 6, 8), torch.randn(batch, 8, 12, 16),
            torch.tensor([980.0, 431.5])[:batch], torch.randn(batch, 10, 32))


def test_batch_rows_are_independent(tiny: JavisDiT) -> None:
    """CFG batches [cond; uncond]: row b of a batch-2 forward equals a batch-1 forward of row b."""
    v, a, t, c = _inputs()
    with torch.no_grad():
        ov, oa = tiny(v, a, t, c)
        for b in range(2):
            sv, sa = tiny(v[b:b + 1], a[b:b + 1], t[b:b + 1], c[b:b + 1])
            assert rel_err(sv, ov[b:b + 1]) < 1e-6 and rel_err(sa, oa[b:b + 1]) < 1e-6


def test_context_mask_equals_zeroed_padding(tiny: JavisDiT) -> None:
    v, a, t, c = _inputs()
    mask = torch.ones(2, 10)
    mask[:, 6:] = 0
    zeroed = c.clone()
    zeroed[:, 6:] = 0
    with torch.no_grad():
        masked = tiny(v, a, t, c, mask)
        ref = tiny(v, a, t, zeroed[:, :6])  # the rest is zero padding up to text_len anyway
    assert torch.equal(masked[0], ref[0]) and torch.equal(masked[1], ref[1])


def test_audio_and_video_interact(tiny: JavisDiT) -> None:
    """Shared attention: changing the video changes the audio velocity, and the t2a path runs alone."""
    v, a, t, c = _inputs()
    with torch.no_grad():
        _, oa = tiny(v, a, t, c)
        _, oa2 = tiny(v + 1.0, a, t, c)
        none, only = tiny(None, a, t, c, video_latent_frames=3)
    assert none is None and only.shape == a.shape
    assert rel_err(oa2, oa) > 1e-3 and rel_err(only, oa) > 1e-3


def test_official_numerics(tiny: JavisDiT) -> None:
    v, a, t, c = _inputs()
    with torch.no_grad():
        ref_v, ref_a = tiny(v, a, t, c)
        tiny.set_numerics("official")
        assert tiny.dtype == torch.bfloat16 and tiny.blocks[0].ffn[0].weight.dtype == torch.bfloat16
        for name in FP32_MODULES:
            for p in getattr(tiny, name).parameters():
                assert p.dtype == torch.float32 and torch.equal(p, p.bfloat16().float()), name
        ov, oa = tiny(v, a, t, c)
        # the reference rounds timesteps to bf16 first: 980 and 431.5 are not bf16 values (980 -> 980,
        # 431.5 -> 432), so t=432 must give the identical result
        ov2, oa2 = tiny(v, a, torch.tensor([980.0, 432.0]), c)
    assert ov.dtype == torch.float32 and oa.dtype == torch.float32
    assert torch.equal(ov, ov2) and torch.equal(oa, oa2)
    # bf16 everywhere over 2 blocks: a few bf16 ulps (2^-8) of relative error, far from fp32 noise
    for got, ref in ((ov, ref_v), (oa, ref_a)):
        assert 1e-5 < rel_err(got, ref) < 5e-2


def test_bad_inputs_raise_typed_errors(tiny: JavisDiT) -> None:
    v, a, t, c = _inputs()
    with pytest.raises(ShapeError, match="video latent"):
        tiny(v[:, :4], a, t, c)
    with pytest.raises(ShapeError, match="patch"):
        tiny(v[..., :7], a, t, c)
    with pytest.raises(ShapeError, match="audio latent"):
        tiny(v, a[..., :15], t, c)
    with pytest.raises(ShapeError, match="timestep"):
        tiny(v, a, t[:1], c)
    with pytest.raises(ShapeError, match="text_len"):
        tiny(v, a, t, torch.randn(2, 17, 32))
    with pytest.raises(ShapeError, match="video_latent_frames"):
        tiny(None, a, t, c)
    wan = JavisDiT(JavisConfig.from_name("tiny", model_type="t2v"))
    with pytest.raises(ConfigError, match="no audio branch"):
        wan(v, a, t, c)
