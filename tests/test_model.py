"""engine/model.py: structure (§5.1), parity with diffusers' Wan (§5.3), token counts (§8), numerics."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import pytest
import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

from _tolerance import rel_err
from javisrt.engine.checkpoint import diffusers_to_wan
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError, ShapeError
from javisrt.engine.model import FP32_MODULES, JavisDiT, build_model, init_weights, num_parameters, random_model
from javisrt.engine.rope import TokenGrid

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
    from diffusers import WanTransformer3DModel  # here, not at the top: the GPU proof collects this file without diffusers

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


# ---- official numerics: the reference's fp32 autocast islands, emulated op by op ------------------------
#
# The reference runs its bf16 model with the time embedding and both heads under
# ``torch.cuda.amp.autocast(dtype=torch.float32)`` (model-spec.md §3.1, §3.3). CPU autocast has no fp32
# mode, so the tests emulate CUDA autocast's op lists with a TorchFunctionMode and run the reference's
# own code for each island on a bf16 copy of the weights.

# CUDA autocast's "lower precision" list (run in the autocast dtype, here fp32) and its fp32 list
# (torch docs, "Autocast Op Reference"), by function name.
AUTOCAST_MATMUL_OPS = {
    "__matmul__", "addbmm", "addmm", "addmv", "addr", "baddbmm", "bmm", "chain_matmul", "multi_dot", "conv1d",
    "conv2d", "conv3d", "conv_transpose1d", "conv_transpose2d", "conv_transpose3d", "linear", "matmul", "mm", "mv",
    "prelu",
}
AUTOCAST_FP32_OPS = {
    "__pow__", "__rdiv__", "__rpow__", "__rtruediv__", "acos", "asin", "cosh", "cdist", "cosine_similarity",
    "cumprod", "cumsum", "dist", "erfinv", "exp", "expm1", "group_norm", "layer_norm", "log", "log_softmax", "log10",
    "log1p", "log2", "norm", "normalize", "pdist", "pow", "prod", "reciprocal", "rsqrt", "sinh", "softmax",
    "softmin", "softplus", "sum", "renorm", "tan",
}


def _name(func: Callable[..., Any]) -> str:
    return getattr(func, "__name__", str(func))


class OpDtypes(TorchFunctionMode):
    """Records ``(island, op name, floating input dtypes, output dtype)`` of every torch call.

    ``autocast_fp32=True`` also applies CUDA ``autocast(dtype=float32)``: the matmul-list and
    fp32-list ops get their floating arguments cast to fp32, except float64, which autocast never
    casts; every other op follows type promotion. ``island`` is the innermost hooked module.
    """

    def __init__(self, autocast_fp32: bool = False) -> None:
        super().__init__()
        self.autocast_fp32 = autocast_fp32
        self.calls: list[tuple[str, str, tuple[torch.dtype, ...], torch.dtype | None]] = []
        self.island: list[str] = [""]

    def hook(self, name: str, module: torch.nn.Module) -> None:
        def enter(*_: Any) -> None:
            self.island.append(name)

        def leave(*_: Any) -> None:  # a hook's return value would replace the module's output
            self.island.pop()

        module.register_forward_pre_hook(enter)
        module.register_forward_hook(leave)

    def __torch_function__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        kwargs = kwargs or {}
        name = _name(func)
        if self.autocast_fp32 and name in AUTOCAST_MATMUL_OPS | AUTOCAST_FP32_OPS:
            def cast(x: Any) -> Any:
                eligible = isinstance(x, torch.Tensor) and x.is_floating_point() and x.dtype != torch.float64
                return x.float() if eligible else x

            args, kwargs = tree_map(cast, (args, kwargs))
        out = func(*args, **kwargs)
        ins = tuple(a.dtype for a in [*args, *kwargs.values()] if isinstance(a, torch.Tensor) and a.is_floating_point())
        self.calls.append((self.island[-1], name, ins, out.dtype if isinstance(out, torch.Tensor) else None))
        return out

    def dtypes(self, island: str, op: str) -> set[torch.dtype]:
        """Every floating dtype the op saw (inputs and output) inside ``island``."""
        seen = {d for i, n, ins, out in self.calls if i == island and n == op for d in (*ins, out) if d is not None}
        assert seen, f"no {op} call recorded in {island!r}"
        return seen


@pytest.fixture
def official(tiny: JavisDiT) -> JavisDiT:
    return tiny.set_numerics("official")


def _bf16(module: torch.nn.Module) -> torch.nn.Module:
    """The reference's copy of an island: the whole model is bf16 there."""
    return copy.deepcopy(module).to(torch.bfloat16)


def test_time_embedding_island_equals_emulated_reference(official: JavisDiT) -> None:
    """Reference (WanModel.forward): ``t.to(bf16)``, then under autocast(fp32) the float64 sinusoid
    ``.float()``, time_embedding, time_projection, audio_time_projection; the blocks cast e0 to bf16."""
    v, a, t, c = _inputs()
    d, half = official.cfg.dim, official.cfg.freq_dim // 2
    ref_te, ref_tp, ref_atp = (_bf16(getattr(official, n)) for n in FP32_MODULES[:3])
    with torch.no_grad(), OpDtypes(autocast_fp32=True):
        position = t.to(torch.bfloat16).type(torch.float64)
        sinusoid = torch.outer(position, torch.pow(10000, -torch.arange(half).to(position).div(half)))
        e = ref_te(torch.cat([torch.cos(sinusoid), torch.sin(sinusoid)], dim=1).float())
        e0 = ref_tp(e).unflatten(1, (6, d))
        ae0 = ref_atp(e).unflatten(1, (3, d))
    ops = OpDtypes()
    for name in FP32_MODULES[:3]:
        ops.hook(name, getattr(official, name))
    with torch.no_grad(), ops:
        emb = official.embed(v, a, t, c)
    assert emb.e.dtype == torch.float32 and torch.equal(emb.e, e)
    assert torch.equal(emb.e0, e0.to(torch.bfloat16)) and torch.equal(emb.ae0, ae0.to(torch.bfloat16))
    # op by op: the sinusoid in float64, every Linear and SiLU of the island in fp32
    assert ops.dtypes("", "cos") == ops.dtypes("", "sin") == {torch.float64}
    for name in FP32_MODULES[:3]:
        assert ops.dtypes(name, "linear") == {torch.float32}, name
        assert ops.dtypes(name, "silu") == {torch.float32}, name


@pytest.mark.parametrize("name", ["head", "audio_head"])
def test_head_island_equals_emulated_reference(official: JavisDiT, name: str) -> None:
    """Reference ``Head.forward`` under autocast(fp32) on bf16 activations: layer_norm is on
    autocast's fp32 list, so the bf16 tokens are normalised in fp32; modulation + e promotes to fp32."""
    head = getattr(official, name)
    ref = _bf16(head)
    x = torch.randn(2, 11, official.cfg.dim).to(torch.bfloat16)
    e = torch.randn(2, official.cfg.dim)
    with torch.no_grad(), OpDtypes(autocast_fp32=True):
        mod = (ref.modulation + e.unsqueeze(1)).chunk(2, dim=1)
        want = ref.head(F.layer_norm(x, (x.shape[-1],), eps=ref.eps) * (1 + mod[1]) + mod[0])
    ops = OpDtypes()
    ops.hook(name, head)
    with torch.no_grad(), ops:
        got = head(x, e)
    assert got.dtype == torch.float32 and torch.equal(got, want)
    assert ops.dtypes(name, "layer_norm") == {torch.float32}
    assert ops.dtypes(name, "linear") == {torch.float32}


def test_official_rope_is_float64_and_equals_complex128(official: JavisDiT) -> None:
    """RoPE: the reference multiplies q/k as complex128 by polar(1, float64 angles), then casts back."""
    grid = TokenGrid((3, 6, 8), (6, 8))
    cos, sin = official.rope(grid, torch.device("cpu"))
    assert cos.dtype == sin.dtype == torch.float64
    ops = OpDtypes()
    q = torch.randn(2, grid.num_tokens, official.cfg.num_heads, official.cfg.head_dim).to(torch.bfloat16)
    with ops:
        rotated = official.ops.attention(q, q, q, (cos, sin))
    assert rotated.dtype == torch.bfloat16
    assert ops.dtypes("", "mul") == {torch.float64}  # the rotation (the only products before SDPA)
    assert official.set_numerics("fp32").rope(grid, torch.device("cpu"))[0].dtype == torch.float32


def _tf32() -> tuple[bool, bool]:
    return torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32


def test_official_numerics_on_cpu_leave_tf32_alone(tiny: JavisDiT) -> None:
    before = _tf32()
    tiny.set_numerics("official")
    assert _tf32() == before


@pytest.mark.gpu
def test_official_numerics_on_cuda_enable_tf32() -> None:
    """The reference's inference script turns TF32 on for matmul and cuDNN (conftest restores it)."""
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    random_model(JavisConfig.from_name("tiny"), "fp32", "cuda")
    assert _tf32() == (False, False)
    random_model(JavisConfig.from_name("tiny"), "official", "cuda")
    assert _tf32() == (True, True)
