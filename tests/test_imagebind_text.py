"""ImageBind text trunk for the v0.1 prior: CLIP BPE ids, the trunk's math, the imagebind_huge.pth loader."""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path

import pytest
import torch
from torch import nn

from javisrt.engine.errors import CheckpointError, ShapeError
from javisrt.runtime.imagebind_text import (
    CLIPBPETokenizer,
    ImageBindTextConfig,
    ImageBindTextEncoder,
    ImageBindTextTrunk,
    bpe_vocabulary_path,
    causal_mask,
    load_imagebind_text,
    random_imagebind_text,
)

SOT, EOT = 49406, 49407

# Published CLIP BPE ids: elixir-nx/bumblebee, test/bumblebee/text/clip_tokenizer_test.exs
# ("encoding model input", tokenizer of openai/clip-vit-base-patch32).
KNOWN_IDS = {
    "a photo of a cat": [SOT, 320, 1125, 539, 320, 2368, EOT],
    "a photo of a dog": [SOT, 320, 1125, 539, 320, 1929, EOT],
}


@pytest.fixture(scope="module")
def tokenizer() -> CLIPBPETokenizer:
    return CLIPBPETokenizer(77)


def _openai_simple_tokenizer():  # type: ignore[no-untyped-def]
    """OpenAI's own ``SimpleTokenizer`` (clip/simple_tokenizer.py of the installed openai-clip), loaded as a
    file: the package's __init__ imports torchvision. An independent implementation of the same BPE."""
    path = bpe_vocabulary_path().parent / "simple_tokenizer.py"
    spec = importlib.util.spec_from_file_location("openai_clip_simple_tokenizer", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.SimpleTokenizer(str(bpe_vocabulary_path()))


@pytest.mark.parametrize("text", sorted(KNOWN_IDS))
def test_known_clip_ids(tokenizer: CLIPBPETokenizer, text: str) -> None:
    ids = tokenizer(text)
    expected = KNOWN_IDS[text] + [0] * (77 - len(KNOWN_IDS[text]))  # ImageBind pads with 0
    assert ids.shape == (1, 77) and ids.dtype == torch.long
    assert ids[0].tolist() == expected


def test_matches_openai_simple_tokenizer(tokenizer: CLIPBPETokenizer) -> None:
    reference = _openai_simple_tokenizer()
    texts = [
        "A Dog RUNNING on the beach, waves crashing!",
        "Hello,   world!\n  &amp; caf\u00e9 \u2014 it's 4:30pm",
        "the birds' songs (chirp chirp) -- 1234 \U0001f600 \u4f60\u597d",
        "a cat. aesthetic score: 6.5.",
    ]
    ids = tokenizer(texts)
    for row, text in zip(ids.tolist(), texts, strict=True):
        bpe = reference.encode(text)
        assert row[: len(bpe) + 2] == [SOT, *bpe, EOT], text
        assert all(v == 0 for v in row[len(bpe) + 2 :])


def test_long_prompt_keeps_76_tokens_and_the_end_token(tokenizer: CLIPBPETokenizer) -> None:
    text = " ".join(["word"] * 100)
    reference = _openai_simple_tokenizer()
    row = tokenizer(text)[0].tolist()
    assert row == [SOT, *reference.encode(text)[:75], EOT]


def test_trunk_is_a_causal_pre_norm_transformer_without_final_norm() -> None:
    """Against torch's own pre-norm ``nn.TransformerEncoderLayer`` (exact GELU, eps 1e-6) with the same
    weights, on token + position embeddings and the causal mask; float64."""
    cfg = ImageBindTextConfig(name="t", vocab_size=50, context_length=7, width=16, layers=2, heads=2)
    trunk = random_imagebind_text(cfg, seed=1).double()
    layers = []
    for block in trunk.blocks:
        layer = nn.TransformerEncoderLayer(16, 2, 64, dropout=0.0, activation="gelu", layer_norm_eps=1e-6,
                                           batch_first=True, norm_first=True).double()
        layer.self_attn.load_state_dict(block.attn.state_dict())
        layer.linear1.load_state_dict(block.mlp.fc1.state_dict())
        layer.linear2.load_state_dict(block.mlp.fc2.state_dict())
        layer.norm1.load_state_dict(block.norm_1.state_dict())
        layer.norm2.load_state_dict(block.norm_2.state_dict())
        layers.append(layer.train())  # the reference's slow path
    ids = torch.randint(0, 50, (3, 7))
    x = trunk.token_embedding(ids) + trunk.pos_embed
    for layer in layers:
        x = layer(x, src_mask=causal_mask(7).double())
    with torch.no_grad():
        out = trunk(ids)
    torch.testing.assert_close(out, x.detach(), rtol=0, atol=1e-12)
    # causal: changing the last token leaves every earlier position unchanged
    ids2 = ids.clone()
    ids2[:, -1] = (ids[:, -1] + 1) % 50
    with torch.no_grad():
        out2 = trunk(ids2)
    assert torch.equal(out[:, :-1], out2[:, :-1]) and not torch.equal(out[:, -1], out2[:, -1])


def test_trunk_rejects_wrong_length() -> None:
    with pytest.raises(ShapeError):
        random_imagebind_text("tiny")(torch.zeros(1, 5, dtype=torch.long))


def _write_imagebind_pth(trunk: ImageBindTextTrunk, path: Path) -> dict[str, torch.Tensor]:
    """A ``.pth`` in imagebind_huge's key layout: the text preprocessor/trunk/head/postprocessor plus
    (small) vision and audio towers."""
    w = trunk.cfg.width
    state: dict[str, torch.Tensor] = {
        "modality_preprocessors.text.token_embedding.weight": trunk.token_embedding.weight.clone(),
        "modality_preprocessors.text.pos_embed": trunk.pos_embed.clone(),
        "modality_preprocessors.text.mask": causal_mask(trunk.cfg.context_length),
        "modality_heads.text.proj.0.weight": torch.ones(w),
        "modality_heads.text.proj.0.bias": torch.zeros(w),
        "modality_heads.text.proj.1.weight": torch.randn(8, w),
        "modality_postprocessors.text.1.log_logit_scale": torch.tensor(2.0),
        "modality_preprocessors.vision.cls_token": torch.randn(1, 1, 32),
        "modality_trunks.vision.blocks.0.attn.in_proj_weight": torch.randn(96, 32),
        "modality_trunks.audio.blocks.0.attn.bias_k": torch.randn(1, 1, 32),
        "modality_heads.audio.2.weight": torch.randn(8, 32),
    }
    for k, v in trunk.state_dict().items():
        if k.startswith("blocks."):
            state[f"modality_trunks.text.{k}"] = v.clone()
    torch.save(state, path)
    return state


def test_loader_takes_the_text_trunk_and_skips_the_other_towers(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture
) -> None:
    trunk = random_imagebind_text("tiny", seed=4)
    path = tmp_path / "imagebind_huge.pth"
    _write_imagebind_pth(trunk, path)
    calls: list[dict[str, object]] = []
    real_load = torch.load

    def spy(*args: object, **kwargs: object) -> object:
        calls.append(kwargs)
        return real_load(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(torch, "load", spy)
    with caplog.at_level(logging.INFO, logger="javisrt.runtime.imagebind_text"):
        loaded = load_imagebind_text(tmp_path, "tiny")  # a directory holding imagebind_huge.pth
    assert calls == [{"map_location": "cpu", "weights_only": True, "mmap": True}]
    assert set(loaded.state_dict()) == set(trunk.state_dict())
    for k, v in trunk.state_dict().items():
        assert torch.equal(loaded.state_dict()[k], v), k
    assert any("kept" in r.getMessage() and "skipped" in r.getMessage() for r in caplog.records)
    ids = CLIPBPETokenizer(9)("a photo of a cat")
    with torch.no_grad():
        assert torch.equal(loaded(ids), trunk(ids))


def test_loader_errors(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_imagebind_text(tmp_path / "nothing.pth")
    torch.save({"modality_trunks.vision.x": torch.zeros(1)}, tmp_path / "vision_only.pth")
    with pytest.raises(CheckpointError, match="no modality_preprocessors.text"):
        load_imagebind_text(tmp_path / "vision_only.pth", "tiny")
    trunk = random_imagebind_text("tiny")
    _write_imagebind_pth(trunk, tmp_path / "imagebind_huge.pth")
    with pytest.raises(CheckpointError, match="does not fit"):
        load_imagebind_text(tmp_path / "imagebind_huge.pth", "imagebind-huge")
    torch.save({"x": object()}, tmp_path / "pickle.pth")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_imagebind_text(tmp_path / "pickle.pth", "tiny")


def test_encoder_feeds_the_prior_shape() -> None:
    encoder = ImageBindTextEncoder(random_imagebind_text("tiny"))
    hidden = encoder.encode(["a cat", "a dog barking"])
    assert hidden.shape == (2, 9, 24)


def test_huge_preset_on_meta() -> None:
    """24 blocks of width 1024 with 16 heads; 49,408 x 1,024 token table, 77 positions."""
    with torch.device("meta"):
        trunk = ImageBindTextTrunk(ImageBindTextConfig.from_name("imagebind-huge"))
    per_block = 4 * 1024 * 1024 + 4 * 1024 + 2 * 4 * 1024 * 1024 + 4096 + 1024 + 4 * 1024
    assert len(trunk.blocks) == 24
    assert sum(p.numel() for p in trunk.parameters()) == 49408 * 1024 + 77 * 1024 + 24 * per_block
