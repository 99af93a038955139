"""runtime/text.py: 512-token padding/masking, the prompt cache, and loading from local Wan dirs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from javisrt.engine.errors import CheckpointError
from javisrt.runtime.demo import tiny_tokenizer, tiny_umt5
from javisrt.runtime.text import (
    NEGATIVE_PROMPT,
    WAN_T5_FILE,
    PromptCache,
    TextEncoder,
    clean_text,
)


def make_encoder(text_len: int = 16, cache: PromptCache | None = None, identity: str = "tiny") -> TextEncoder:
    return TextEncoder(tiny_tokenizer(text_len), tiny_umt5(1), identity=identity, text_len=text_len, cache=cache)


def test_padding_and_mask_512() -> None:
    enc = make_encoder(text_len=512)
    emb = enc.encode(["a cat", "héllo wörld"])
    assert emb.context.shape == (2, 512, 32) and emb.context.dtype == torch.float32
    # byte-level ids + </s>: "a cat" = 5 bytes + 1, "héllo wörld" = 13 bytes + 1
    assert emb.mask.sum(1).tolist() == [6, 14]
    assert emb.mask[0, :6].all() and not emb.mask[0, 6:].any()


def test_truncation_to_text_len() -> None:
    emb = make_encoder(text_len=16).encode("x" * 100)
    assert emb.context.shape == (1, 16, 32) and emb.mask.sum().item() == 16


def test_batch_equals_single() -> None:
    enc = make_encoder()
    both = enc.encode(["first prompt", "second"])
    enc2 = make_encoder()
    one = enc2.encode("second")
    torch.testing.assert_close(both.context[1:], one.context, rtol=1e-5, atol=1e-6)


def test_cache_skips_the_encoder(monkeypatch: pytest.MonkeyPatch) -> None:
    enc = make_encoder()
    calls = {"n": 0}
    real = enc.model.forward

    def counting(*args, **kwargs):
        calls["n"] += 1
        return real(*args, **kwargs)

    monkeypatch.setattr(enc.model, "forward", counting)
    first = enc.encode(["a prompt", NEGATIVE_PROMPT])
    assert calls["n"] == 1 and enc.encoder_calls == 1
    again = enc.encode(["a  prompt ", NEGATIVE_PROMPT])  # same after whitespace cleaning
    assert calls["n"] == 1 and enc.encoder_calls == 1
    assert torch.equal(first.context, again.context)
    enc.encode(["another prompt", NEGATIVE_PROMPT])  # only the new prompt is encoded
    assert calls["n"] == 2 and enc.cache.hits == 3


def test_cache_is_keyed_by_encoder_identity() -> None:
    shared = PromptCache()
    a = make_encoder(cache=shared, identity="enc-a")
    b = make_encoder(cache=shared, identity="enc-b")
    a.encode("same text")
    b.encode("same text")
    assert a.encoder_calls == 1 and b.encoder_calls == 1 and len(shared) == 2


def test_cache_is_lru() -> None:
    enc = make_encoder(cache=PromptCache(max_entries=2))
    for p in ("one", "two", "one", "three"):  # "two" is least recently used when "three" arrives
        enc.encode(p)
    calls = enc.encoder_calls
    enc.encode("one")
    assert enc.encoder_calls == calls
    enc.encode("two")
    assert enc.encoder_calls == calls + 1


def test_clean_text() -> None:
    assert clean_text("  a\n\tb  &amp;amp; c ") == "a b & c"


def test_negative_prompt_is_the_released_one() -> None:
    # model-spec.md §6.1, first and last terms and one audio term
    assert NEGATIVE_PROMPT.startswith("色调艳丽，过曝，静态，细节模糊不清")
    assert "低音质，差音质，最差音质" in NEGATIVE_PROMPT
    assert NEGATIVE_PROMPT.endswith("录音质量差，业余录音")


# ---- loading from a local Wan2.1 directory ---------------------------------------------------------


def _umt5_to_wan(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Write a transformers UMT5 encoder in Wan's original T5 names (wan/modules/t5.py), for the test."""
    out = {"token_embedding.weight": state["shared.weight"], "norm.weight": state["encoder.final_layer_norm.weight"]}
    n = 1 + max(int(k.split(".")[2]) for k in state if k.startswith("encoder.block."))
    for i in range(n):
        p = f"encoder.block.{i}.layer"
        out[f"blocks.{i}.norm1.weight"] = state[f"{p}.0.layer_norm.weight"]
        for x in "qkvo":
            out[f"blocks.{i}.attn.{x}.weight"] = state[f"{p}.0.SelfAttention.{x}.weight"]
        out[f"blocks.{i}.pos_embedding.embedding.weight"] = state[f"{p}.0.SelfAttention.relative_attention_bias.weight"]
        out[f"blocks.{i}.norm2.weight"] = state[f"{p}.1.layer_norm.weight"]
        out[f"blocks.{i}.ffn.gate.0.weight"] = state[f"{p}.1.DenseReluDense.wi_0.weight"]
        out[f"blocks.{i}.ffn.fc1.weight"] = state[f"{p}.1.DenseReluDense.wi_1.weight"]
        out[f"blocks.{i}.ffn.fc2.weight"] = state[f"{p}.1.DenseReluDense.wo.weight"]
    return out


@pytest.mark.parametrize("layout", ["diffusers", "original"])
def test_from_pretrained_layouts(tmp_path: Path, layout: str) -> None:
    reference = make_encoder(text_len=512)
    if layout == "diffusers":
        reference.model.save_pretrained(tmp_path / "text_encoder")
        reference.tokenizer.save_pretrained(tmp_path / "tokenizer")
    else:
        torch.save(_umt5_to_wan(reference.model.state_dict()), tmp_path / WAN_T5_FILE)
        reference.tokenizer.save_pretrained(tmp_path / "google" / "umt5-xxl")
    loaded = TextEncoder.from_pretrained(tmp_path, dtype=torch.float32)
    assert loaded.text_len == 512 and str(tmp_path) in loaded.identity
    prompts = ["a dog barks twice", NEGATIVE_PROMPT]
    ref, got = reference.encode(prompts), loaded.encode(prompts)
    assert torch.equal(ref.mask, got.mask)
    torch.testing.assert_close(got.context, ref.context, rtol=0, atol=0)


def test_from_pretrained_missing(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        TextEncoder.from_pretrained(tmp_path / "nope")
    with pytest.raises(CheckpointError, match="no text encoder"):
        TextEncoder.from_pretrained(tmp_path)
    make_encoder().model.save_pretrained(tmp_path / "text_encoder")
    with pytest.raises(CheckpointError, match="no tokenizer"):
        TextEncoder.from_pretrained(tmp_path)


def test_negative_prompt_is_the_released_one() -> None:
    """Independent reference: the exact text in model-spec.md §6.1 (shared/, beside the checkout)."""
    import re
    from pathlib import Path

    spec = Path(__file__).resolve().parents[2] / "shared" / "model-spec.md"
    if not spec.is_file():
        pytest.skip(f"{spec} not present (the shared specs live beside the checkout)")
    m = re.search(r"negative prompt plus audio terms, exactly: `([^`]+)`", spec.read_text(encoding="utf-8"))
    assert m is not None and m.group(1) == NEGATIVE_PROMPT


def test_clean_text_like_wan() -> None:
    """Wan's clean='whitespace': ftfy (mojibake), html-unescape twice, whitespace collapsed."""
    from javisrt.runtime.text import clean_text

    assert clean_text("  schÃ¶n \n\t &amp;amp; gut ") == "schön & gut"
