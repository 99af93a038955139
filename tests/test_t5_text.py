"""JavisDiT v0.1 text: the aesthetic-score suffix, the official caption cleaning, 300-token T5 inputs."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from javisrt.engine.errors import CheckpointError
from javisrt.runtime.t5_text import (
    _BAD_PUNCT,
    T5_TEXT_LEN,
    append_score,
    clean_caption,
    load_t5_encoder,
    text_preprocessing,
    v01_prompt,
)

# A tiny unigram vocabulary: every piece of "a cat. aesthetic score: 6.5." exists, so the segmentation is unique.
PIECES = ["<pad>", "</s>", "<unk>", "▁a", "▁cat", ".", "▁aesthetic", "▁score", ":", "▁6", "5", "▁dog"]
# "a cat. aesthetic score: 6.5." + </s>, read off PIECES by hand
EXPECTED_IDS = [3, 4, 5, 6, 7, 8, 9, 5, 10, 5, 1]


@pytest.fixture(scope="module")
def t5_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    from transformers import T5Config, T5EncoderModel, T5Tokenizer

    root = tmp_path_factory.mktemp("t5-v1_1-xxl")
    tok = T5Tokenizer(vocab=[(p, 0.0 if i < 3 else -1.0) for i, p in enumerate(PIECES)], extra_ids=0)
    tok.save_pretrained(str(root))
    torch.manual_seed(0)
    cfg = T5Config(vocab_size=len(PIECES), d_model=16, d_kv=4, d_ff=32, num_layers=2, num_heads=4,
                   feed_forward_proj="gated-gelu", decoder_start_token_id=0)
    T5EncoderModel(cfg).save_pretrained(str(root))
    return root


def test_append_score() -> None:
    assert append_score("A cat") == "A cat aesthetic score: 6.5."
    assert append_score("a cat", 7) == "a cat aesthetic score: 7.0."
    assert append_score("a cat aesthetic score: 5.0.") == "a cat aesthetic score: 5.0."
    assert append_score("a cat", None) == "a cat"


def test_suffix_then_preprocessing() -> None:
    assert v01_prompt("A CAT.") == "a cat. aesthetic score: 6.5."
    assert v01_prompt("  A  dog   barks!  https://example.com/x  ") == "a dog barks! aesthetic score: 6.5."


CAPTIONS = [
    "A <b>Bold</b> cat @someone sitting on a chair, 1920x1080 photo.jpg &amp; more",
    "Check www.example.org/page and http://foo.bar/baz for FREE SHIPPING!!!",
    "this-is-my-cute-cat_with_underscores — “quoted” ‘single’ text...",
    "Price: 123456 items #12 #123456 ip 192.168.0.1 jc6640 6640vc231 \\n end",
    "A cat. aesthetic score: 6.5.",
    "熊猫 eating bamboo (in China) [HD] {4k} | *sparkles* ~wow~",
]


@pytest.mark.parametrize("caption", CAPTIONS)
def test_clean_caption_matches_diffusers_pixart(caption: str) -> None:
    """diffusers' PixArt ``_clean_caption`` is the same rule list from the same lineage (DeepFloyd IF);
    it differs only in not stripping after ftfy/html (see the next test), which these captions do not hit."""
    from diffusers import PixArtAlphaPipeline

    def reference(text: str) -> str:  # bad_punct_regex is a class attribute: the class serves as self
        return PixArtAlphaPipeline._clean_caption(PixArtAlphaPipeline, text)  # type: ignore[arg-type]

    assert clean_caption(caption) == reference(caption)
    assert text_preprocessing(caption) == reference(reference(caption))


def test_bad_punctuation_class_matches_the_reference() -> None:
    from diffusers import PixArtAlphaPipeline

    assert _BAD_PUNCT == PixArtAlphaPipeline.bad_punct_regex.pattern


def test_basic_clean_strips_before_the_anchored_rules() -> None:
    """JavisDiT's ``basic_clean`` ends with ``.strip()``: "#" becomes a space, the strip removes it, and
    the quote rule ``^["']...["']$`` then unwraps the caption (diffusers' copy keeps the space and the quotes)."""
    assert clean_caption("#'a cat'") == "a cat"


def test_tokenization_applies_suffix_and_300_token_mask(t5_dir: Path) -> None:
    from transformers import T5EncoderModel

    enc = load_t5_encoder(t5_dir, dtype=torch.float32)
    emb = enc.encode(["A cat.", "a DOG"])
    assert emb.context.shape == (2, T5_TEXT_LEN, 16) and emb.mask.shape == (2, T5_TEXT_LEN)
    assert emb.mask.dtype == torch.int64
    assert emb.mask[0].tolist() == [1] * len(EXPECTED_IDS) + [0] * (T5_TEXT_LEN - len(EXPECTED_IDS))
    # "a dog aesthetic score: 6.5." = a dog aesthetic score : 6 . 5 . </s>
    assert int(emb.mask[1].sum()) == 10
    # the encoder saw exactly the hand-tokenized suffixed prompt, padded with 0 to 300
    ids = torch.zeros(1, T5_TEXT_LEN, dtype=torch.long)
    ids[0, : len(EXPECTED_IDS)] = torch.tensor(EXPECTED_IDS)
    model = T5EncoderModel.from_pretrained(str(t5_dir), dtype=torch.float32, local_files_only=True).eval()
    with torch.no_grad():
        ref = model(input_ids=ids, attention_mask=emb.mask[:1]).last_hidden_state
    torch.testing.assert_close(emb.context[:1], ref, rtol=0, atol=0)


def test_long_prompt_is_truncated_to_300(t5_dir: Path) -> None:
    enc = load_t5_encoder(t5_dir, dtype=torch.float32)
    emb = enc.encode("a cat " * 400)
    assert emb.context.shape == (1, T5_TEXT_LEN, 16) and int(emb.mask.sum()) == T5_TEXT_LEN


def test_missing_directory(tmp_path: Path) -> None:
    with pytest.raises(CheckpointError, match="not found"):
        load_t5_encoder(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="config.json"):
        load_t5_encoder(tmp_path / "empty")
