"""engine/checkpoint.py: official sharded layout + PEFT LoRA, Wan2.1 files, javisrt files, corrupt inputs."""

from __future__ import annotations

import copy
import json
import os
from pathlib import Path

import pytest
import torch
from peft import LoraConfig, get_peft_model
from safetensors.torch import save_file

from _tolerance import rel_err
from javisrt.engine.checkpoint import load_model, read_checkpoint, save_model
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import CheckpointError
from javisrt.engine.model import JavisDiT, init_weights

# The released adapter's targets (model-spec.md §5.2), as PEFT suffixes.
LORA_TARGETS = ["self_attn.q", "self_attn.k", "self_attn.v", "self_attn.o", "cross_attn.q", "cross_attn.k",
                "cross_attn.v", "cross_attn.o", "ffn.0", "ffn.2", "audio_ffn.0", "audio_ffn.2"]


def tiny_model(seed: int = 3, **overrides: object) -> JavisDiT:
    model = JavisDiT(JavisConfig.from_name("tiny", **overrides)).eval()
    return init_weights(model, torch.Generator().manual_seed(seed))


def write_sharded(directory: Path, state: dict[str, torch.Tensor], shards: int = 2, fmt: str = "safetensors") -> None:
    """ColossalAI-style sharded state dict: shard files + ``*.index.json`` with a weight_map."""
    directory.mkdir(parents=True)
    keys = sorted(state)
    weight_map = {}
    for s in range(shards):
        name = f"pytorch_model-{s + 1:05d}-of-{shards:05d}.{'safetensors' if fmt == 'safetensors' else 'bin'}"
        part = {k: state[k].contiguous() for k in keys[s::shards]}
        if fmt == "safetensors":
            save_file(part, directory / name)
        else:
            torch.save(part, directory / name)
        weight_map.update({k: name for k in part})
    index = "model.safetensors.index.json" if fmt == "safetensors" else "pytorch_model.bin.index.json"
    (directory / index).write_text(json.dumps({"metadata": {"total_size": 0}, "weight_map": weight_map}))


def inputs() -> tuple[torch.Tensor, ...]:
    g = torch.Generator().manual_seed(7)
    return (torch.randn(2, 16, 3, 6, 8, generator=g), torch.randn(2, 8, 12, 16, generator=g),
            torch.tensor([900.0, 30.0]), torch.randn(2, 12, 32, generator=g))


@pytest.fixture
def official(tmp_path: Path) -> tuple[Path, JavisDiT]:
    """An official-layout checkpoint written with PEFT itself, and PEFT's merge_and_unload() result."""
    base = tiny_model()
    write_sharded(tmp_path / "ckpt" / "model", base.state_dict())
    peft_model = get_peft_model(base, LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():  # PEFT initialises B to zero; make the adapter do something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(tmp_path / "ckpt" / "lora")
    merged = peft_model.merge_and_unload()
    return tmp_path / "ckpt", merged


def test_lora_merge_equals_peft(official: tuple[Path, JavisDiT]) -> None:
    path, merged = official
    state, _ = read_checkpoint(path)
    expect = merged.state_dict()
    assert state.keys() == expect.keys()
    adapted = [k for k in expect if any(k.endswith(t + ".weight") for t in LORA_TARGETS)]
    assert len(adapted) == 12 * 2  # 12 wrapped Linears per block, 2 blocks, none cross-matched
    for k in expect:  # fp32 numerics: one rounding, fp32(W + scale * B @ A), the same ops as PEFT's
        assert torch.equal(state[k], expect[k]), k
    # the adapter is not a no-op: merged weights differ from the base shards
    base = tiny_model().state_dict()
    assert all(not torch.allclose(base[k], state[k]) for k in adapted)


def _peft_adapter(base: JavisDiT, path: Path, config: LoraConfig) -> JavisDiT:
    """Save ``base`` (sharded) and a random PEFT adapter for it under ``path``; return PEFT's merge."""
    write_sharded(path / "model", base.state_dict())
    peft_model = get_peft_model(base, config)
    with torch.no_grad():  # PEFT initialises B to zero; make the adapter do something
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(path / "lora")
    return peft_model.merge_and_unload()


def test_official_lora_merge_order_equals_peft_on_a_bf16_model(tmp_path: Path) -> None:
    """The reference casts the model to bf16, then PEFT merges: bf16(bf16(W) + scale * B @ A).

    PEFT itself on a bf16 copy of the model is the reference (it keeps the adapter in fp32 and adds
    the fp32 delta into the bf16 weight in place); the shards on disk stay fp32.
    """
    base = tiny_model()
    write_sharded(tmp_path / "model", base.state_dict())
    bf16 = copy.deepcopy(base).to(torch.bfloat16)
    peft_model = get_peft_model(bf16, LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                assert p.dtype == torch.float32  # PEFT's autocast_adapter_dtype
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(tmp_path / "lora")
    merged = peft_model.merge_and_unload()
    expect = merged.state_dict()
    state, _ = read_checkpoint(tmp_path, numerics="official")
    single, _ = read_checkpoint(tmp_path, numerics="fp32")
    adapted = [k for k in expect if any(k.endswith(t + ".weight") for t in LORA_TARGETS)]
    assert len(adapted) == 24
    for k in adapted:
        assert state[k].dtype == torch.bfloat16 and torch.equal(state[k], expect[k]), k
    # the order matters: rounding W + delta once gives other bf16 weights (the test can fail)
    differ = sum(int((single[k].bfloat16() != expect[k]).sum()) for k in adapted)
    total = sum(expect[k].numel() for k in adapted)
    assert single["blocks.0.ffn.0.weight"].dtype == torch.float32
    assert differ > 0.01 * total, f"{differ}/{total} merged weights differ between the two orders"
    # and the whole official model equals PEFT's merged bf16 model in official numerics
    loaded = load_model(tmp_path, config="tiny")
    merged.set_numerics("official")
    with torch.no_grad():
        got, want = loaded(*inputs()), merged(*inputs())
    assert torch.equal(got[0], want[0]) and torch.equal(got[1], want[1])


@pytest.mark.gpu
def test_official_lora_merge_on_cuda_equals_peft_with_tf32(tmp_path: Path) -> None:
    """On CUDA the reference merges on the device with TF32 on; load_model(device="cuda") does the same."""
    base = tiny_model()
    write_sharded(tmp_path / "model", base.state_dict())
    torch.backends.cuda.matmul.allow_tf32 = True  # the reference's inference script (conftest restores it)
    peft_model = get_peft_model(copy.deepcopy(base).to("cuda", torch.bfloat16),
                                LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0))
    with torch.no_grad():
        for name, p in peft_model.named_parameters():
            if "lora_B" in name:
                p.copy_(torch.randn_like(p) * 0.2)
    peft_model.save_pretrained(tmp_path / "lora")
    expect = peft_model.merge_and_unload().state_dict()
    loaded = load_model(tmp_path, config="tiny", device="cuda").state_dict()
    for k in (k for k in expect if any(k.endswith(t + ".weight") for t in LORA_TARGETS)):
        assert torch.equal(loaded[k], expect[k]), k


def test_lora_rank_and_alpha_patterns_equal_peft(tmp_path: Path) -> None:
    """PEFT's per-module rank_pattern / alpha_pattern (regex on the module name's end) are honoured."""
    config = LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS, lora_dropout=0.0,
                        rank_pattern={r"ffn\.0": 2, "blocks.1.self_attn.q": 6}, alpha_pattern={"ffn.2": 3})
    merged = _peft_adapter(tiny_model(), tmp_path, config)
    saved = json.loads((tmp_path / "lora" / "adapter_config.json").read_text())
    assert saved["rank_pattern"] and saved["alpha_pattern"]
    state, _ = read_checkpoint(tmp_path)
    for k, v in merged.state_dict().items():
        assert torch.equal(state[k], v), k


def _rewrite_adapter_config(path: Path, **changes: object) -> None:
    config_path = path / "lora" / "adapter_config.json"
    config = json.loads(config_path.read_text())
    config.update(changes)
    config_path.write_text(json.dumps(config))


def test_lora_rank_disagreeing_with_the_tensors(tmp_path: Path) -> None:
    _peft_adapter(tiny_model(), tmp_path, LoraConfig(r=4, lora_alpha=16, target_modules=LORA_TARGETS))
    _rewrite_adapter_config(tmp_path, r=8)
    with pytest.raises(CheckpointError, match=r"rank r = 8, but its tensors .* have rank 4"):
        load_model(tmp_path, config="tiny")
    # a rank_pattern entry is checked the same way, and named
    _rewrite_adapter_config(tmp_path, r=4, rank_pattern={"audio_ffn.2": 16})
    with pytest.raises(CheckpointError, match=r"blocks\.0\.audio_ffn\.2: .*rank_pattern\['audio_ffn\.2'\] = 16, .* rank 4"):
        load_model(tmp_path, config="tiny")
    _rewrite_adapter_config(tmp_path, rank_pattern={"ffn.(0": 4})
    with pytest.raises(CheckpointError, match="not a valid regex"):
        load_model(tmp_path, config="tiny")


def test_official_layout_reproduces_in_memory_outputs(official: tuple[Path, JavisDiT]) -> None:
    path, merged = official
    loaded = load_model(path, config="tiny", numerics="fp32")
    assert all(p.device.type == "cpu" and not p.requires_grad for p in loaded.parameters())
    with torch.no_grad():
        got = loaded(*inputs())
        expect = merged(*inputs())
    assert torch.equal(got[0], expect[0]) and torch.equal(got[1], expect[1])


def test_official_layout_with_bin_shards_and_official_numerics(tmp_path: Path) -> None:
    base = tiny_model()
    write_sharded(tmp_path / "model", base.state_dict(), shards=3, fmt="bin")
    loaded = load_model(tmp_path, config="tiny")  # default numerics: official
    assert loaded.dtype == torch.bfloat16
    ref = tiny_model().set_numerics("official")
    with torch.no_grad():
        assert torch.equal(loaded(*inputs())[1], ref(*inputs())[1])


def test_wan_single_file_original_and_diffusers_names(tmp_path: Path) -> None:
    from diffusers import WanTransformer3DModel

    wan = tiny_model(model_type="t2v")
    (tmp_path / "orig").mkdir()
    save_file(wan.state_dict(), tmp_path / "orig" / "diffusion_pytorch_model.safetensors")
    loaded = load_model(tmp_path / "orig", config=JavisConfig.from_name("tiny", model_type="t2v"), numerics="fp32")
    v, _, t, c = inputs()
    with torch.no_grad():
        assert torch.equal(loaded(v, None, t, c)[0], wan(v, None, t, c)[0])
    # diffusers layout: <dir>/transformer/diffusion_pytorch_model.safetensors with diffusers names
    cfg = wan.cfg
    ref = WanTransformer3DModel(
        patch_size=(1, 2, 2), num_attention_heads=cfg.num_heads, attention_head_dim=cfg.head_dim, in_channels=16,
        out_channels=16, text_dim=cfg.text_dim, freq_dim=cfg.freq_dim, ffn_dim=cfg.ffn_dim, num_layers=cfg.num_layers,
        cross_attn_norm=True, qk_norm="rms_norm_across_heads", eps=1e-6,
    ).eval()
    (tmp_path / "diff" / "transformer").mkdir(parents=True)
    save_file({k: v.contiguous() for k, v in ref.state_dict().items()},
              tmp_path / "diff" / "transformer" / "diffusion_pytorch_model.safetensors")
    from_diffusers = load_model(tmp_path / "diff", config=cfg, numerics="fp32")
    # full text_len context: JavisDiT/Wan attend to all text_len positions (zero-padded ones too),
    # diffusers only to the tokens given
    c = torch.randn(2, cfg.text_len, cfg.text_dim)
    with torch.no_grad():
        assert rel_err(from_diffusers(v, None, t, c)[0], -ref(v, t, c, return_dict=False)[0]) < 1e-5


def test_javisrt_file_round_trip_keeps_config(tmp_path: Path) -> None:
    model = tiny_model(num_layers=1, audio_pos_mode="interleave")
    path = save_model(model, tmp_path / "out" / "dit.safetensors")
    assert [p.name for p in path.parent.iterdir()] == ["dit.safetensors"]  # no temp file left
    umask = os.umask(0o022)
    os.umask(umask)
    assert path.stat().st_mode & 0o777 == 0o666 & ~umask  # the mode any user file gets, not mkstemp's 0600
    loaded = load_model(path, numerics="fp32")
    assert loaded.cfg == model.cfg
    with torch.no_grad():
        assert torch.equal(loaded(*inputs())[0], model(*inputs())[0])


# ---- corrupt and wrong inputs: each a clear CheckpointError -------------------------------------------


@pytest.fixture
def sharded(tmp_path: Path) -> Path:
    write_sharded(tmp_path / "model", tiny_model().state_dict())
    return tmp_path


def _edit_shard(root: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    shard = sorted((root / "model").glob("*.safetensors"))[0]
    state = load_file(shard)
    edit(state)
    save_file(state, shard)


def test_missing_key(sharded: Path) -> None:
    index = sharded / "model" / "model.safetensors.index.json"
    data = json.loads(index.read_text())
    victim = "blocks.1.audio_ffn.0.bias"
    shard = data["weight_map"].pop(victim)
    index.write_text(json.dumps(data))
    _edit_shard_named(sharded / "model" / shard, lambda s: s.pop(victim))
    with pytest.raises(CheckpointError, match=r"1 missing: blocks\.1\.audio_ffn\.0\.bias"):
        load_model(sharded, config="tiny")


def _edit_shard_named(shard: Path, edit) -> None:  # type: ignore[no-untyped-def]
    from safetensors.torch import load_file

    state = load_file(shard)
    edit(state)
    save_file(state, shard)


def test_wrong_shape_and_wrong_preset(sharded: Path) -> None:
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_model(sharded, config=JavisConfig.from_name("tiny", ffn_dim=96))
    with pytest.raises(CheckpointError, match="unexpected"):
        load_model(sharded, config=JavisConfig.from_name("tiny", model_type="t2v"))


def test_truncated_shard(sharded: Path) -> None:
    shard = sorted((sharded / "model").glob("*.safetensors"))[1]
    data = shard.read_bytes()
    shard.write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_model(sharded, config="tiny")


class _Exploit:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):  # type: ignore[no-untyped-def]
        return (os.mkdir, (str(self.marker),))


def test_code_executing_pickle_is_refused(tmp_path: Path) -> None:
    marker = tmp_path / "pwned"
    (tmp_path / "model").mkdir()
    torch.save({"patch_embedding.weight": torch.zeros(1), "x": _Exploit(marker)}, tmp_path / "model" / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="refusing to load"):
        load_model(tmp_path, config="tiny")
    assert not marker.exists()


@pytest.mark.parametrize(
    ("corrupt", "message"),
    [
        (lambda d: "{not json", "invalid index"),
        (lambda d: json.dumps({"metadata": {}}), "invalid index"),
        (lambda d: json.dumps({"weight_map": {**d["weight_map"], "extra.weight": "nope.safetensors"}}), "does not exist"),
        (lambda d: json.dumps({"weight_map": {k: v for i, (k, v) in enumerate(d["weight_map"].items()) if i}}),
         "disagrees with shard"),
        (lambda d: json.dumps({"weight_map": {k: "../" + v for k, v in d["weight_map"].items()}}), "plain file name"),
    ],
    ids=["not-json", "no-weight-map", "missing-shard", "unlisted-key", "path-escape"],
)
def test_wrong_index(sharded: Path, corrupt, message: str) -> None:  # type: ignore[no-untyped-def]
    index = sharded / "model" / "model.safetensors.index.json"
    index.write_text(corrupt(json.loads(index.read_text())))
    with pytest.raises(CheckpointError, match=message):
        load_model(sharded, config="tiny")


def test_peft_wrapped_names_get_a_hint(tmp_path: Path) -> None:
    state = tiny_model().state_dict()
    state = {k.replace("self_attn.q.weight", "self_attn.q.base_layer.weight"): v for k, v in state.items()}
    write_sharded(tmp_path / "model", state)
    with pytest.raises(CheckpointError, match="base_layer") as info:
        load_model(tmp_path, config="tiny")
    assert "hint" in str(info.value) and "missing" in str(info.value)


def test_lora_tensors_inside_model_dir(tmp_path: Path, official: tuple[Path, JavisDiT]) -> None:
    state = tiny_model().state_dict()
    state["blocks.0.self_attn.q.lora_A.default.weight"] = torch.zeros(4, 64)
    write_sharded(tmp_path / "bare" / "model", state)
    with pytest.raises(CheckpointError, match="no lora/ adapter"):
        load_model(tmp_path / "bare", config="tiny")


def test_not_a_checkpoint(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_model(tmp_path / "nothing")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="neither"):
        load_model(tmp_path / "empty")
