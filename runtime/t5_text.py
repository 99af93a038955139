"""JavisDiT v0.1's text conditioning: T5-XXL (``DeepFloyd/t5-v1_1-xxl``) with the official prompt
processing (v01-spec.md §2; ``scripts/inference.py`` and ``javisdit/models/text_encoder/t5.py``).

Per prompt, in the reference's order:
  1. append the score: ``f"{prompt} aesthetic score: {aes:.1f}."`` with ``aes = 6.5`` (skipped when the
     prompt already says "aesthetic score:") -- ``append_score_to_prompts``;
  2. ``text_preprocessing``: PixArt's ``clean_caption`` applied twice (URL / HTML / handle / CJK removal,
     punctuation and dash normalisation, ftfy, lower case, ...): :func:`clean_caption`;
  3. tokenize with padding to 300 tokens, truncation, ``</s>``; run ``T5EncoderModel`` with the mask.
The DiT gets ``y`` = the last hidden state [B, 300, 4096] and ``mask`` [B, 300] (int64). The same
processed string is what the prior's ImageBind text tower reads.

Tokenizer and encoder come from one local directory (the ``DeepFloyd/t5-v1_1-xxl`` snapshot layout:
``config.json``, the weights -- a full T5 checkpoint loads its encoder -- and the tokenizer files), through
transformers' ``T5EncoderModel`` / ``AutoTokenizer`` with ``local_files_only=True``. Encoding, padding,
masks and the prompt cache are :class:`javisrt.runtime.text.TextEncoder`'s (shared with JavisDiT++).
"""

from __future__ import annotations

import html
import os
import re
import urllib.parse
import warnings
from functools import partial
from pathlib import Path

import torch

from javisrt.engine.errors import CheckpointError
from javisrt.runtime.text import PromptCache, TextEncoder, load_tokenizer

T5_TEXT_LEN = 300  # model_max_length of the v0.1 text encoder
AESTHETIC_SCORE = 6.5  # configs/javisdit-v0-1/inference/*.py: aes = 6.5

# --- clean_caption's rules, in order (PixArt / DeepFloyd IF caption cleaning as JavisDiT v0.1 ships it) ---
_URL_RULES = [
    r"\b((?:https?:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
    r"\b((?:www:(?:\/{1,3}|[a-zA-Z0-9%])|[a-zA-Z0-9.\-]+[.](?:com|co|ru|net|org|edu|gov|it)[\w/-]*\b\/?(?!@)))",
]
_BAD_PUNCT = r"[#®•©™&@·º½¾¿¡§~\)\(\]\[\}\{\|\\/\*]{1,}"
_DASHES = (
    r"[\u002D\u058A\u05BE\u1400\u1806\u2010-\u2015\u2E17\u2E1A\u2E3A\u2E3B\u2E40\u301C\u3030\u30A0\uFE31\uFE32"
    r"\uFE58\uFE63\uFF0D]+"
)
# (pattern, replacement) after the HTML step and before the dash/underscore rule
_MIDDLE_RULES: list[tuple[str, str]] = [
    (r"@[\w\d]+\b", ""),  # @handles
    # CJK strokes, katakana extensions, enclosed CJK, CJK compatibility, ideographs ext. A, hexagrams, ideographs
    (r"[\u31c0-\u31ef]+", ""), (r"[\u31f0-\u31ff]+", ""), (r"[\u3200-\u32ff]+", ""), (r"[\u3300-\u33ff]+", ""),
    (r"[\u3400-\u4dbf]+", ""), (r"[\u4dc0-\u4dff]+", ""), (r"[\u4e00-\u9fff]+", ""),
    (_DASHES, "-"),
    (r"[`´«»“”¨]", '"'), (r"[‘’]", "'"),
    (r"&quot;?", ""), (r"&amp", ""),
    (r"\d{1,3}\.\d{1,3}\.\d{1,3}\.\d{1,3}", " "),  # IP addresses
    (r"\d:\d\d\s+$", ""),  # article ids
    (r"\\n", " "),  # a literal backslash-n
    (r"#\d{1,3}\b", ""), (r"#\d{5,}\b", ""), (r"\b\d{6,}\b", ""),
    (r"[\S]+\.(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)", ""),  # file names
    (r"[\"\']{2,}", '"'), (r"[\.]{2,}", " "),
    (_BAD_PUNCT, " "),
    (r"\s+\.\s+", " "),
]
# after basic_clean (ftfy, html-unescape twice, strip)
_LATE_RULES: list[tuple[str, str]] = [
    (r"\b[a-zA-Z]{1,3}\d{3,15}\b", ""), (r"\b[a-zA-Z]+\d+[a-zA-Z]+\b", ""), (r"\b\d+[a-zA-Z]+\d+\b", ""),
    (r"(worldwide\s+)?(free\s+)?shipping", ""), (r"(free\s)?download(\sfree)?", ""),
    (r"\bclick\b\s(?:for|on)\s\w+", ""), (r"\b(?:png|jpg|jpeg|bmp|webp|eps|pdf|apk|mp4)(\simage[s]?)?", ""),
    (r"\bpage\s+\d+\b", ""),
    (r"\b\d*[a-zA-Z]+\d+[a-zA-Z]+\d+[a-zA-Z\d]*\b", " "),
    (r"\b\d+\.?\d*[xх×]\d+\.?\d*\b", ""),
    (r"\b\s+\:\s+", ": "), (r"(\D[,\./])\b", r"\1 "), (r"\s+", " "),
    # (the reference's ``caption.strip()`` here discards its result: no strip before the anchored rules)
    (r"^[\"\']([\w\W]+)[\"\']$", r"\1"), (r"^[\'\_,\-\:;]", ""), (r"[\'\_,\-\:\-\+]$", ""), (r"^\.\S+$", ""),
]


def _strip_html(text: str) -> str:
    """``BeautifulSoup(text, features="html.parser").text``; its "looks like a URL/file name" hint is
    irrelevant for captions and is silenced."""
    from bs4 import BeautifulSoup, MarkupResemblesLocatorWarning

    with warnings.catch_warnings():
        warnings.simplefilter("ignore", MarkupResemblesLocatorWarning)
        return BeautifulSoup(text, features="html.parser").text


def clean_caption(caption: str) -> str:
    """One pass of the reference's ``clean_caption`` (see the rule tables above for every step)."""
    import ftfy

    caption = urllib.parse.unquote_plus(str(caption)).strip().lower()
    caption = re.sub("<person>", "person", caption)
    for pattern in _URL_RULES:
        caption = re.sub(pattern, "", caption)
    caption = _strip_html(caption)
    for pattern, repl in _MIDDLE_RULES:
        caption = re.sub(pattern, repl, caption)
    if len(re.findall(r"(?:\-|\_)", caption)) > 3:  # this-is-my-cute-cat / this_is_my_cute_cat
        caption = re.sub(r"(?:\-|\_)", " ", caption)
    caption = html.unescape(html.unescape(ftfy.fix_text(caption))).strip()  # basic_clean
    for pattern, repl in _LATE_RULES:
        caption = re.sub(pattern, repl, caption)
    return caption.strip()


def text_preprocessing(text: str) -> str:
    """The reference's ``text_preprocessing(text)``: :func:`clean_caption` twice, as in training."""
    return clean_caption(clean_caption(text))


def append_score(prompt: str, aesthetic_score: float | None = AESTHETIC_SCORE) -> str:
    """``append_score_to_prompts`` for the aesthetic score (v0.1 sets no motion score or camera motion)."""
    if aesthetic_score is None or "aesthetic score:" in prompt:
        return prompt
    return f"{prompt} aesthetic score: {aesthetic_score:.1f}."


def v01_prompt(prompt: str, aesthetic_score: float | None = AESTHETIC_SCORE) -> str:
    """The string JavisDiT v0.1 encodes (T5 and ImageBind alike): score appended, then preprocessed."""
    return text_preprocessing(append_score(prompt, aesthetic_score))


def load_t5_encoder(
    t5_dir: str | os.PathLike[str],
    *,
    dtype: torch.dtype = torch.bfloat16,
    device: torch.device | str = "cpu",
    text_len: int = T5_TEXT_LEN,
    aesthetic_score: float | None = AESTHETIC_SCORE,
    cache: PromptCache | None = None,
) -> TextEncoder:
    """T5 encoder + tokenizer from a local ``t5-v1_1-xxl`` directory, with v0.1's prompt processing."""
    from transformers import T5EncoderModel

    root = Path(t5_dir)
    if not root.is_dir():
        raise CheckpointError(f"T5 directory not found: {root}")
    if not (root / "config.json").is_file():
        raise CheckpointError(f"T5 directory {root} has no config.json (expected a transformers folder)")
    try:
        model = T5EncoderModel.from_pretrained(str(root), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the T5 encoder from {root}: {exc}") from exc
    tokenizer = load_tokenizer(root)
    identity = f"t5:{root.resolve()}:{dtype}"
    return TextEncoder(
        tokenizer, model, identity=identity, text_len=text_len, cache=cache, device=device,
        preprocess=partial(v01_prompt, aesthetic_score=aesthetic_score),
    )
