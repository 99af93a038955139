"""Text conditioning: tokenize, run the umT5 encoder, cache prompt embeddings (model-spec.md §3.1).

As Wan2.1's ``T5EncoderModel`` (which JavisDiT++ uses unchanged): whitespace-clean the prompt,
tokenize with padding to ``text_len`` (512) tokens, truncation and ``</s>``; run the encoder with the
attention mask; hand the DiT the full ``[B, text_len, dim]`` output plus the mask. The DiT zeroes the
padded positions and cross-attends to all ``text_len`` of them (§3.1 step 6).

Weights come from a local Wan2.1 directory, in either layout:
  diffusers  ``text_encoder/`` (``UMT5EncoderModel``, config.json + safetensors) and ``tokenizer/``
             (as in Wan2.1-T2V-1.3B-Diffusers)
  original   ``models_t5_umt5-xxl-enc-bf16.pth`` (Wan's own T5 module names, converted here by
             :func:`wan_t5_to_umt5`) and the ``google/umt5-xxl/`` tokenizer folder
Nothing is fetched from a hub: every ``from_pretrained`` runs with ``local_files_only=True``.
"""

from __future__ import annotations

import html
import logging
import os
import re
from collections import OrderedDict
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from javisrt.engine.errors import CheckpointError, ConfigError, ShapeError

log = logging.getLogger(__name__)

TEXT_LEN = 512
WAN_T5_FILE = "models_t5_umt5-xxl-enc-bf16.pth"
WAN_TOKENIZER_DIR = "google/umt5-xxl"

# The released default negative prompt (model-spec.md §6.1): Wan2.1's plus audio terms.
NEGATIVE_PROMPT = (
    "色调艳丽，过曝，静态，细节模糊不清，字幕，风格，作品，画作，画面，静止，整体发灰，最差质量，低质量，"
    "JPEG压缩残留，丑陋的，残缺的，多余的手指，画得不好的手部，画得不好的脸部，畸形的，毁容的，形态畸形的肢体，"
    "手指融合，静止不动的画面，杂乱的背景，三条腿，背景人很多，倒着走，低音质，差音质，最差音质，噪音，失真的，"
    "破音，削波失真，数字瑕疵，声音故障，不自然的，刺耳的，尖锐的，底噪，过多混响，过多回声，突兀的剪辑，"
    "不自然的淡出，录音质量差，业余录音"
)

# umT5-XXL encoder (Wan's ``umt5_xxl``): vocab 256384, dim 4096, ffn 10240, 64 heads, 24 layers.
UMT5_XXL = dict(
    vocab_size=256384,
    d_model=4096,
    d_kv=64,
    d_ff=10240,
    num_layers=24,
    num_heads=64,
    relative_attention_num_buckets=32,
    relative_attention_max_distance=128,
    feed_forward_proj="gated-gelu",
    dropout_rate=0.0,
    is_encoder_decoder=False,
)


def clean_text(text: str) -> str:
    """Wan's ``clean='whitespace'``: ftfy + html-unescape twice, collapse whitespace."""
    import ftfy  # pinned in requirements.txt: the reference always runs it

    text = ftfy.fix_text(text)
    text = html.unescape(html.unescape(text)).strip()
    return re.sub(r"\s+", " ", text).strip()


@dataclass(frozen=True)
class TextEmbedding:
    """Encoder output for a batch: ``context`` [B, text_len, dim] fp32, ``mask`` [B, text_len] int64."""

    context: torch.Tensor
    mask: torch.Tensor

    def __post_init__(self) -> None:
        if self.context.ndim != 3 or self.mask.shape != self.context.shape[:2]:
            raise ShapeError(f"context {tuple(self.context.shape)} and mask {tuple(self.mask.shape)} do not match")

    @staticmethod
    def cat(parts: Sequence[TextEmbedding]) -> TextEmbedding:
        return TextEmbedding(torch.cat([p.context for p in parts]), torch.cat([p.mask for p in parts]))


class PromptCache:
    """LRU cache of single-prompt embeddings keyed by (encoder identity, cleaned text).

    Shareable between encoders: the identity keeps their entries apart.
    """

    def __init__(self, max_entries: int = 64) -> None:
        if max_entries < 0:
            raise ConfigError(f"max_entries must be >= 0, got {max_entries}")
        self.max_entries = max_entries
        self._items: OrderedDict[tuple[str, str], TextEmbedding] = OrderedDict()
        self.hits = 0
        self.misses = 0

    def get(self, key: tuple[str, str]) -> TextEmbedding | None:
        item = self._items.get(key)
        if item is None:
            self.misses += 1
            return None
        self._items.move_to_end(key)
        self.hits += 1
        return item

    def put(self, key: tuple[str, str], value: TextEmbedding) -> None:
        if self.max_entries == 0:
            return
        self._items[key] = value
        self._items.move_to_end(key)
        while len(self._items) > self.max_entries:
            self._items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)

    def clear(self) -> None:
        self._items.clear()


class TextEncoder:
    """A tokenizer + ``UMT5EncoderModel`` pair producing :class:`TextEmbedding` with an LRU cache.

    ``identity`` names the weights (path or builder + seed) and keys the cache; ``encoder_calls``
    counts encoder forwards (a cached prompt does not add one). ``preprocess`` turns a prompt into the
    text that is tokenized (Wan's :func:`clean_text` by default; JavisDiT v0.1's T5 uses its own).
    """

    def __init__(
        self,
        tokenizer: Any,
        model: torch.nn.Module,
        *,
        identity: str,
        text_len: int = TEXT_LEN,
        cache: PromptCache | None = None,
        device: torch.device | str = "cpu",
        preprocess: Callable[[str], str] = clean_text,
    ) -> None:
        if text_len <= 0:
            raise ConfigError(f"text_len must be positive, got {text_len}")
        self.tokenizer = tokenizer
        self.model = model.to(device).eval().requires_grad_(False)
        self.identity = identity
        self.text_len = text_len
        self.cache = cache if cache is not None else PromptCache()
        self.device = torch.device(device)
        self.encoder_calls = 0
        self.preprocess = preprocess

    @property
    def dim(self) -> int:
        return int(getattr(self.model, "config").d_model)

    def encode(self, texts: Sequence[str] | str) -> TextEmbedding:
        """Embeddings of ``texts`` (batch in order); cached prompts skip the encoder."""
        if isinstance(texts, str):
            texts = [texts]
        cleaned = [self.preprocess(t) for t in texts]
        found: dict[str, TextEmbedding] = {}
        for text in cleaned:
            hit = self.cache.get((self.identity, text))
            if hit is not None:
                found[text] = hit
        missing = list(dict.fromkeys(t for t in cleaned if t not in found))
        if missing:
            batch = self._run(missing)
            for i, text in enumerate(missing):
                item = TextEmbedding(batch.context[i : i + 1], batch.mask[i : i + 1])
                self.cache.put((self.identity, text), item)
                found[text] = item
        return TextEmbedding.cat([found[t] for t in cleaned])

    @torch.no_grad()
    def _run(self, texts: list[str]) -> TextEmbedding:
        tokens = self.tokenizer(
            texts,
            padding="max_length",
            truncation=True,
            max_length=self.text_len,
            add_special_tokens=True,
            return_tensors="pt",
        )
        ids = tokens["input_ids"].to(self.device)
        mask = tokens["attention_mask"].to(self.device)
        self.encoder_calls += 1
        log.debug("text encoder: %d prompt(s), %s tokens", len(texts), mask.sum(1).tolist())
        out = self.model(input_ids=ids, attention_mask=mask).last_hidden_state
        return TextEmbedding(out.float(), mask.long())

    # ---- loading ---------------------------------------------------------------------------------
    @classmethod
    def from_pretrained(
        cls,
        wan_dir: str | os.PathLike[str],
        *,
        dtype: torch.dtype = torch.bfloat16,
        device: torch.device | str = "cpu",
        text_len: int = TEXT_LEN,
        cache: PromptCache | None = None,
    ) -> TextEncoder:
        """The umT5 encoder and tokenizer of a local Wan2.1 directory (diffusers or original layout)."""
        root = Path(wan_dir)
        if not root.is_dir():
            raise CheckpointError(f"Wan2.1 directory not found: {root}")
        if (root / "text_encoder").is_dir():
            model = _load_diffusers_umt5(root / "text_encoder", dtype)
            weights = root / "text_encoder"
        elif (root / WAN_T5_FILE).is_file():
            model = load_wan_t5(root / WAN_T5_FILE, dtype)
            weights = root / WAN_T5_FILE
        else:
            raise CheckpointError(
                f"{root} has no text encoder: expected text_encoder/ (diffusers layout) or {WAN_T5_FILE}"
            )
        tok_dir = next((p for p in (root / "tokenizer", root / WAN_TOKENIZER_DIR) if p.is_dir()), None)
        if tok_dir is None:
            raise CheckpointError(f"{root} has no tokenizer: expected tokenizer/ or {WAN_TOKENIZER_DIR}/")
        tokenizer = load_tokenizer(tok_dir)
        identity = f"umt5:{weights.resolve()}:{dtype}"
        return cls(tokenizer, model, identity=identity, text_len=text_len, cache=cache, device=device)


def load_tokenizer(path: Path) -> Any:
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(str(path), local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the tokenizer from {path}: {exc}") from exc


def _load_diffusers_umt5(path: Path, dtype: torch.dtype) -> torch.nn.Module:
    from transformers import UMT5EncoderModel

    try:
        return UMT5EncoderModel.from_pretrained(str(path), dtype=dtype, local_files_only=True)
    except (OSError, ValueError) as exc:
        raise CheckpointError(f"cannot load the umT5 encoder from {path}: {exc}") from exc


# ---- Wan's original T5 layout -> transformers' UMT5 ---------------------------------------------------
# Wan (wan/modules/t5.py, encoder only)        transformers UMT5EncoderModel
#   token_embedding.weight                      shared.weight (= encoder.embed_tokens.weight, tied)
#   blocks.i.norm1.weight                       encoder.block.i.layer.0.layer_norm.weight
#   blocks.i.attn.{q,k,v,o}.weight              encoder.block.i.layer.0.SelfAttention.{q,k,v,o}.weight
#   blocks.i.pos_embedding.embedding.weight     encoder.block.i.layer.0.SelfAttention.relative_attention_bias.weight
#   blocks.i.norm2.weight                       encoder.block.i.layer.1.layer_norm.weight
#   blocks.i.ffn.gate.0.weight                  encoder.block.i.layer.1.DenseReluDense.wi_0.weight  (GELU-tanh branch)
#   blocks.i.ffn.fc1.weight                     encoder.block.i.layer.1.DenseReluDense.wi_1.weight  (linear branch)
#   blocks.i.ffn.fc2.weight                     encoder.block.i.layer.1.DenseReluDense.wo.weight
#   norm.weight                                 encoder.final_layer_norm.weight
_WAN_T5_RULES = [
    (re.compile(r"^token_embedding\.weight$"), "shared.weight"),
    (re.compile(r"^blocks\.(\d+)\.norm1\.weight$"), r"encoder.block.\1.layer.0.layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.attn\.([qkvo])\.weight$"), r"encoder.block.\1.layer.0.SelfAttention.\2.weight"),
    (
        re.compile(r"^blocks\.(\d+)\.pos_embedding\.embedding\.weight$"),
        r"encoder.block.\1.layer.0.SelfAttention.relative_attention_bias.weight",
    ),
    (re.compile(r"^blocks\.(\d+)\.norm2\.weight$"), r"encoder.block.\1.layer.1.layer_norm.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.gate\.0\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wi_0.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc1\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wi_1.weight"),
    (re.compile(r"^blocks\.(\d+)\.ffn\.fc2\.weight$"), r"encoder.block.\1.layer.1.DenseReluDense.wo.weight"),
    (re.compile(r"^norm\.weight$"), "encoder.final_layer_norm.weight"),
]


def wan_t5_to_umt5(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Rename a Wan T5 *encoder* state dict to ``UMT5EncoderModel`` keys; unknown keys raise."""
    out: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in state.items():
        for pattern, repl in _WAN_T5_RULES:
            if pattern.match(key):
                out[pattern.sub(repl, key)] = value
                break
        else:
            unknown.append(key)
    if unknown:
        raise CheckpointError(f"unexpected keys in the Wan T5 checkpoint (not an encoder?): {unknown[:8]}")
    if "shared.weight" in out:
        out["encoder.embed_tokens.weight"] = out["shared.weight"]
    return out


def umt5_config_from_wan_state(state: dict[str, torch.Tensor]) -> dict[str, Any]:
    """UMT5Config kwargs read off a Wan T5 state dict's shapes (so small test checkpoints load too)."""
    try:
        vocab, dim = state["token_embedding.weight"].shape
        d_ff = state["blocks.0.ffn.fc1.weight"].shape[0]
        buckets, heads = state["blocks.0.pos_embedding.embedding.weight"].shape
        inner = state["blocks.0.attn.q.weight"].shape[0]
    except KeyError as exc:
        raise CheckpointError(f"not a Wan umT5 encoder checkpoint: missing {exc}") from None
    layers = 1 + max(int(k.split(".")[1]) for k in state if k.startswith("blocks."))
    cfg = dict(UMT5_XXL)
    cfg.update(
        vocab_size=int(vocab), d_model=int(dim), d_ff=int(d_ff), num_heads=int(heads),
        d_kv=int(inner) // int(heads), num_layers=layers, relative_attention_num_buckets=int(buckets),
    )  # fmt: skip
    return cfg


def load_wan_t5(path: Path, dtype: torch.dtype = torch.bfloat16) -> torch.nn.Module:
    """Wan's ``models_t5_umt5-xxl-enc-bf16.pth`` as a transformers ``UMT5EncoderModel``."""
    from transformers import UMT5Config, UMT5EncoderModel

    try:
        state = torch.load(str(path), map_location="cpu", weights_only=True, mmap=True)
    except Exception as exc:  # corrupt file or a pickle that needs code: refuse either way
        raise CheckpointError(f"cannot read {path}: {exc}") from exc
    if not isinstance(state, dict):
        raise CheckpointError(f"{path} does not hold a state dict")
    config = UMT5Config(**umt5_config_from_wan_state(state))
    with torch.device("meta"):
        model = UMT5EncoderModel(config)
    converted = wan_t5_to_umt5(state)
    expected = set(model.state_dict())
    missing, unexpected = expected - set(converted), set(converted) - expected
    if missing or unexpected:
        raise CheckpointError(f"{path}: missing keys {sorted(missing)[:8]}, unexpected {sorted(unexpected)[:8]}")
    model.load_state_dict({k: v.to(dtype) for k, v in converted.items()}, strict=True, assign=True)
    model.tie_weights()
    return model.eval().requires_grad_(False)
