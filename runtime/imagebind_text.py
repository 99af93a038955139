"""The frozen ImageBind-huge text trunk that feeds JavisDiT v0.1's ST-prior estimator (v01-spec.md §4).

What the reference runs (``STIBPriorExtractor.encode_text``: ImageBind's ``load_and_transform_text``, then
the text preprocessor and trunk, taking the trunk's hidden states):

    ids [B, 77]   CLIP BPE: <|startoftext|> + BPE(clean(text).lower()) + <|endoftext|>, zero-padded,
                  truncated to 76 tokens + <|endoftext|>
    x = token_embedding(ids) + pos_embed                  # [B, 77, 1024]
    24 x  x = x + MHA(LN1(x), causal mask)                # nn.MultiheadAttention, 16 heads, LN eps 1e-6
          x = x + fc2(GELU(fc1(LN2(x))))                  # exact GELU, 4096 hidden
    -> x  [B, 77, 1024]                                    # no final LN: that is in the text head

The tokenizer is CLIP's byte-level BPE built by transformers' ``CLIPTokenizer`` (the ``tokenizers``
library) from OpenAI's vocabulary file ``bpe_simple_vocab_16e6.txt.gz``, read from the ``openai-clip``
PyPI package (pinned in requirements.txt; only the data file is used -- its ``clip`` package imports
torchvision, which is not installed). The prompt is cleaned as ImageBind's ``SimpleTokenizer``
(ftfy, html-unescape twice, whitespace collapse: :func:`javisrt.runtime.text.clean_text`), then
lower-cased by the tokenizer.

Weights: the ``modality_preprocessors.text.*`` and ``modality_trunks.text.*`` tensors of
``imagebind_huge.pth``, read with ``torch.load(weights_only=True, mmap=True)``: the vision, audio, depth,
thermal and IMU towers (and the text head) stay unread pages of the memory map and are dropped.
"""

from __future__ import annotations

import gzip
import importlib.util
import logging
import os
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, cast

import torch
from torch import nn

from javisrt.engine.errors import CheckpointError, ConfigError, ShapeError, UnavailableError
from javisrt.runtime.text import clean_text

log = logging.getLogger(__name__)

BPE_PACKAGE = "clip"  # import name of the openai-clip distribution
BPE_FILE = "bpe_simple_vocab_16e6.txt.gz"
SOT, EOT = "<|startoftext|>", "<|endoftext|>"
TEXT_PREFIXES = ("modality_preprocessors.text.", "modality_trunks.text.")
IMAGEBIND_FILE = "imagebind_huge.pth"


@dataclass(frozen=True)
class ImageBindTextConfig:
    """Shapes of the ImageBind text preprocessor + trunk (``imagebind_huge``: 24 x 1024, 16 heads)."""

    name: str
    vocab_size: int = 49408
    context_length: int = 77
    width: int = 1024
    layers: int = 24
    heads: int = 16
    mlp_ratio: int = 4
    eps: float = 1e-6

    def __post_init__(self) -> None:
        for attr in ("vocab_size", "context_length", "width", "layers", "heads", "mlp_ratio"):
            if getattr(self, attr) <= 0:
                raise ConfigError(f"{attr} must be positive, got {getattr(self, attr)}")
        if self.width % self.heads:
            raise ConfigError(f"width {self.width} is not divisible by heads {self.heads}")
        if self.context_length < 2:
            raise ConfigError("context_length must hold at least the start and end tokens")

    @classmethod
    def from_name(cls, name: str) -> ImageBindTextConfig:
        try:
            return IMAGEBIND_PRESETS[name]
        except KeyError:
            raise ConfigError(f"unknown ImageBind text preset {name!r}; known: {sorted(IMAGEBIND_PRESETS)}") from None


IMAGEBIND_PRESETS = {
    "imagebind-huge": ImageBindTextConfig(name="imagebind-huge"),
    # Pairs with the prior preset "tiny" (text_len 9, text_dim 24); the real vocabulary.
    "tiny": ImageBindTextConfig(name="tiny", context_length=9, width=24, layers=2, heads=2),
}


# ---------------------------------------------------------------------------------------------------
# Tokenizer
# ---------------------------------------------------------------------------------------------------


def bpe_vocabulary_path() -> Path:
    """OpenAI's CLIP BPE file inside the installed ``openai-clip`` package (found without importing it)."""
    spec = importlib.util.find_spec(BPE_PACKAGE)
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    for location in locations:
        path = Path(location) / BPE_FILE
        if path.is_file():
            return path
    raise UnavailableError(
        f"the CLIP BPE vocabulary {BPE_FILE} was not found: install the pinned openai-clip package (requirements.txt)"
    )


def clip_vocabulary(path: Path) -> tuple[dict[str, int], list[tuple[str, str]]]:
    """CLIP's vocabulary and merges as ``SimpleTokenizer`` builds them: 256 byte symbols, the same with
    ``</w>``, the first 48,894 merges, then the two special tokens (49,408 entries)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    try:
        lines = gzip.open(path).read().decode("utf-8").split("\n")
    except (OSError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"cannot read the CLIP BPE file {path}: {exc}") from exc
    pairs = [line.split() for line in lines[1 : 49152 - 256 - 2 + 1]]
    if len(pairs) != 48894 or any(len(p) != 2 for p in pairs):
        raise CheckpointError(f"{path} is not CLIP's BPE merges file (bad merge lines)")
    merges = [(a, b) for a, b in pairs]
    symbols = list(bytes_to_unicode().values())
    tokens = symbols + [s + "</w>" for s in symbols] + ["".join(m) for m in merges] + [SOT, EOT]
    return {t: i for i, t in enumerate(tokens)}, merges


class CLIPBPETokenizer:
    """ImageBind's text tokenization: ids [B, context_length] int64, zero-padded (see module docstring)."""

    def __init__(self, context_length: int = 77, bpe_path: Path | None = None) -> None:
        from transformers import CLIPTokenizer

        vocab, merges = clip_vocabulary(bpe_path or bpe_vocabulary_path())
        self.tokenizer = CLIPTokenizer(vocab=vocab, merges=cast(Any, merges))  # tokenizers takes pairs
        self.context_length = context_length
        self.vocab_size = len(vocab)

    def __call__(self, texts: Sequence[str] | str) -> torch.Tensor:
        if isinstance(texts, str):
            texts = [texts]
        cleaned = [clean_text(t) for t in texts]
        encoded = self.tokenizer(cleaned, truncation=True, max_length=self.context_length, add_special_tokens=True)
        ids = torch.zeros(len(cleaned), self.context_length, dtype=torch.long)  # pad id 0, as ImageBind
        for i, row in enumerate(encoded["input_ids"]):
            ids[i, : len(row)] = torch.tensor(row, dtype=torch.long)
        return ids


# ---------------------------------------------------------------------------------------------------
# Trunk
# ---------------------------------------------------------------------------------------------------


class Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(nn.functional.gelu(self.fc1(x)))  # exact GELU (nn.GELU() in ImageBind)


class TextBlock(nn.Module):
    """``BlockWithMasking`` without layer scale or drop path: pre-norm attention and MLP."""

    def __init__(self, cfg: ImageBindTextConfig) -> None:
        super().__init__()
        self.attn = nn.MultiheadAttention(cfg.width, cfg.heads, bias=True, batch_first=True)
        self.norm_1 = nn.LayerNorm(cfg.width, eps=cfg.eps)
        self.mlp = Mlp(cfg.width, cfg.width * cfg.mlp_ratio)
        self.norm_2 = nn.LayerNorm(cfg.width, eps=cfg.eps)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        h = self.norm_1(x)
        x = x + self.attn(h, h, h, need_weights=False, attn_mask=mask)[0]
        return x + self.mlp(self.norm_2(x))


def causal_mask(length: int) -> torch.Tensor:
    """ImageBind's additive mask: -inf above the diagonal, 0 elsewhere."""
    return torch.full((length, length), float("-inf")).triu_(1)


class ImageBindTextTrunk(nn.Module):
    """Token + position embedding and the causal trunk; ids [B, L] -> hidden states [B, L, width]."""

    def __init__(self, cfg: ImageBindTextConfig) -> None:
        super().__init__()
        self.cfg = cfg
        self.token_embedding = nn.Embedding(cfg.vocab_size, cfg.width)
        self.pos_embed = nn.Parameter(torch.zeros(1, cfg.context_length, cfg.width))
        self.blocks = nn.ModuleList(TextBlock(cfg) for _ in range(cfg.layers))
        self.register_buffer("mask", causal_mask(cfg.context_length), persistent=False)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        if ids.ndim != 2 or ids.shape[1] != self.cfg.context_length:
            raise ShapeError(f"ids must be [B, {self.cfg.context_length}], got {tuple(ids.shape)}")
        x = self.token_embedding(ids) + self.pos_embed
        mask = self.mask.to(x.dtype)
        for block in self.blocks:
            x = block(x, mask)
        return x


def _text_state(state: dict[str, torch.Tensor], where: Path) -> dict[str, torch.Tensor]:
    """The trunk's tensors under our names; everything else (other towers, the text head) is dropped."""
    out: dict[str, torch.Tensor] = {}
    for key, value in state.items():
        for prefix in TEXT_PREFIXES:
            if key.startswith(prefix):
                out[key[len(prefix) :]] = value
    if not out:
        raise CheckpointError(f"{where} has no {TEXT_PREFIXES[0]}* tensors: not an ImageBind checkpoint")
    log.info("ImageBind: kept %d text-trunk tensors of %d, skipped the rest unread", len(out), len(state))
    return out


def load_imagebind_text(
    path: str | os.PathLike[str],
    config: ImageBindTextConfig | str = "imagebind-huge",
    *,
    dtype: torch.dtype = torch.float32,
    device: torch.device | str = "cpu",
) -> ImageBindTextTrunk:
    """The text trunk from ``imagebind_huge.pth`` (a file, or a directory holding it), in eval mode."""
    cfg = ImageBindTextConfig.from_name(config) if isinstance(config, str) else config
    path = Path(path)
    if path.is_dir():
        path = path / IMAGEBIND_FILE
    if not path.is_file():
        raise CheckpointError(f"ImageBind checkpoint not found: {path}")
    try:  # mmap: the other towers' storages are never read; weights_only: no code runs
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt, legacy (non-zip) format, or a pickle that needs code: refuse
        raise CheckpointError(f"cannot read {path} with weights_only=True, mmap=True: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    text = _text_state(state, path)
    del state
    stored_mask = text.pop("mask", None)
    if stored_mask is not None and not torch.equal(stored_mask.float(), causal_mask(stored_mask.shape[-1])):
        raise CheckpointError(f"{path}: the stored text mask is not ImageBind's causal mask")
    with torch.device("meta"):
        model = ImageBindTextTrunk(cfg)
    expected = {k: v.shape for k, v in model.state_dict().items()}
    problems = [f"missing {k}" for k in expected if k not in text]
    problems += [f"unexpected {k}" for k in text if k not in expected]
    problems += [f"{k}: {tuple(v.shape)} != {tuple(expected[k])}" for k, v in text.items() if k in expected and v.shape != expected[k]]
    if problems:
        raise CheckpointError(f"{path} does not fit the {cfg.name} text trunk: {problems[:8]}")
    model.load_state_dict({k: v.to(dtype) for k, v in text.items()}, strict=True, assign=True)
    model.mask = causal_mask(cfg.context_length)  # non-persistent buffer: rebuilt off the meta device
    return model.requires_grad_(False).eval().to(device)


def save_imagebind_text(trunk: ImageBindTextTrunk, path: str | os.PathLike[str]) -> Path:
    """Write ``trunk`` as an ``imagebind_huge.pth``-layout file (text preprocessor + trunk keys only;
    for tests and conversions), atomically."""
    from javisrt.engine.atomic_file import atomic_file

    state: dict[str, torch.Tensor] = {}
    for key, value in trunk.state_dict().items():
        prefix = TEXT_PREFIXES[1] if key.startswith("blocks.") else TEXT_PREFIXES[0]
        state[prefix + key] = value.detach().clone()
    state[TEXT_PREFIXES[0] + "mask"] = causal_mask(trunk.cfg.context_length)
    with atomic_file(path) as tmp:
        torch.save(state, tmp)
    return Path(path)


class ImageBindTextEncoder:
    """Prompts -> ImageBind text hidden states [B, 77, 1024] for the ST-prior estimator."""

    def __init__(self, trunk: ImageBindTextTrunk, tokenizer: CLIPBPETokenizer | None = None) -> None:
        self.trunk = trunk
        self.tokenizer = tokenizer or CLIPBPETokenizer(trunk.cfg.context_length)
        if self.tokenizer.context_length != trunk.cfg.context_length:
            raise ConfigError("the tokenizer's context length differs from the trunk's")
        if self.tokenizer.vocab_size != trunk.cfg.vocab_size:
            raise ConfigError(f"the tokenizer has {self.tokenizer.vocab_size} tokens, the trunk {trunk.cfg.vocab_size}")

    @property
    def device(self) -> torch.device:
        return self.trunk.pos_embed.device

    @torch.no_grad()
    def encode(self, texts: Sequence[str] | str) -> torch.Tensor:
        return self.trunk(self.tokenizer(texts).to(self.device))

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike[str], **kwargs: Any) -> ImageBindTextEncoder:
        return cls(load_imagebind_text(path, **kwargs))


def random_imagebind_text(config: ImageBindTextConfig | str = "tiny", seed: int = 0) -> ImageBindTextTrunk:
    """Random weights (1/sqrt(fan_in) scaled, so activations stay O(1)) for tests and the tiny demo."""
    cfg = ImageBindTextConfig.from_name(config) if isinstance(config, str) else config
    gen = torch.Generator().manual_seed(seed)
    model = ImageBindTextTrunk(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.copy_(torch.randn(p.shape, generator=gen) * 0.02)
            elif "norm" in name:
                p.copy_(1.0 + torch.randn(p.shape, generator=gen) * 0.02)
            elif p.ndim == 2 and "embedding" not in name:
                p.copy_(torch.randn(p.shape, generator=gen) / p.shape[1] ** 0.5)
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.5)
    return model.requires_grad_(False).eval()
