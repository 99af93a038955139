"""Checkpoint loading and saving (model-spec.md §5).

Layouts read by :func:`load_model`:
  (a) the official JavisDiT++ release, a directory with
        model/   a sharded state dict: ``*.index.json`` (``weight_map``: key -> shard) plus
                 ``.safetensors`` or ``.bin`` shards (ColossalAI's ``GeneralCheckpointIO``)
        lora/    optional PEFT adapter (``adapter_config.json`` + ``adapter_model.safetensors|.bin``),
                 merged as ``W += (alpha / r) * B @ A`` like ``PeftModel.merge_and_unload()``
                 (in ``official`` numerics on the bf16-rounded weight, as the reference merges)
  (b) Wan2.1 ``diffusion_pytorch_model.safetensors`` (single file or sharded with an index; original
      Wan names or diffusers' ``WanTransformer3DModel`` names, which are mapped back, §5.3)
  (c) javisrt's own single-file safetensors (:func:`save_model`), which carries the config.

``.bin`` files are only read with ``torch.load(weights_only=True)``: a pickle that would run code is
refused. The model is built on the meta device and the loaded tensors are assigned into it, so the
full model is never held twice. Key and shape checking is strict; one :class:`CheckpointError` lists
every missing, unexpected and mismatched key.
"""

from __future__ import annotations

import json
import logging
import math
import os
import pickle
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from javisrt.engine.atomic_file import atomic_file
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import CheckpointError, ConfigError
from javisrt.engine.model import JavisDiT, Numerics, build_model, enable_tf32

log = logging.getLogger(__name__)

JAVISRT_FORMAT = "javisrt-dit"
JAVISRT_FORMAT_VERSION = "1"
WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")

StateDict = dict[str, torch.Tensor]


# ---------------------------------------------------------------------------------------------------
# Reading tensor files
# ---------------------------------------------------------------------------------------------------


def read_tensor_file(path: Path) -> StateDict:
    """All tensors of one ``.safetensors`` or pickle (``.bin``/``.pt``) file, on the CPU.

    Pickles are read with ``weights_only=True`` and memory-mapped; anything else is refused.
    """
    if not path.is_file():
        raise CheckpointError(f"checkpoint file not found: {path}")
    if path.suffix == ".safetensors":
        try:
            with safe_open(str(path), framework="pt", device="cpu") as f:
                return {k: f.get_tensor(k) for k in f.keys()}
        except Exception as exc:  # safetensors raises its own SafetensorError and OSError types
            raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors?): {exc}") from exc
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise CheckpointError(
            f"refusing to load {path}: weights_only unpickling rejected it (it holds objects other than "
            f"tensors and could run code). Convert it to safetensors with a trusted tool. Detail: {exc}"
        ) from exc
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} (corrupt or truncated?): {exc}") from exc
    if isinstance(obj, dict) and "state_dict" in obj and isinstance(obj["state_dict"], dict):
        obj = obj["state_dict"]
    if not isinstance(obj, dict) or not all(isinstance(v, torch.Tensor) for v in obj.values()):
        raise CheckpointError(f"{path} does not hold a flat {{name: tensor}} state dict")
    return obj


def read_sharded(directory: Path) -> StateDict:
    """A state dict from ``directory``: through its ``*.index.json``, or its single weights file."""
    if not directory.is_dir():
        raise CheckpointError(f"checkpoint directory not found: {directory}")
    indexes = sorted(directory.glob("*.index.json"))
    if len(indexes) > 1:
        raise CheckpointError(f"{directory} has several index files: {[p.name for p in indexes]}")
    if not indexes:
        files = [p for p in sorted(directory.iterdir()) if p.suffix in WEIGHT_SUFFIXES]
        if len(files) != 1:
            raise CheckpointError(
                f"{directory} has no *.index.json and {len(files)} weight files; expected an index or one file"
            )
        return read_tensor_file(files[0])
    return read_indexed(indexes[0])


def read_indexed(index_path: Path) -> StateDict:
    """A state dict from a ``*.index.json`` (``weight_map``: key -> shard file in the same directory);
    every shard must hold exactly the keys the index lists for it."""
    directory = index_path.parent
    try:
        index = json.loads(index_path.read_text())
        weight_map = index["weight_map"]
        if not isinstance(weight_map, dict) or not all(isinstance(v, str) for v in weight_map.values()):
            raise TypeError("weight_map must map tensor names to shard file names")
    except (json.JSONDecodeError, KeyError, TypeError) as exc:
        raise CheckpointError(f"invalid index {index_path}: {exc}") from exc
    state: StateDict = {}
    by_shard: dict[str, list[str]] = {}
    for key, shard in weight_map.items():
        by_shard.setdefault(shard, []).append(key)
    for shard, keys in sorted(by_shard.items()):
        shard_path = directory / shard
        if Path(shard).name != shard:
            raise CheckpointError(f"invalid index {index_path}: shard name {shard!r} is not a plain file name")
        if not shard_path.is_file():
            raise CheckpointError(f"index {index_path.name} names shard {shard!r}, which does not exist")
        tensors = read_tensor_file(shard_path)
        absent = sorted(set(keys) - tensors.keys())
        unlisted = sorted(tensors.keys() - set(keys))
        if absent or unlisted:
            raise CheckpointError(
                f"index {index_path.name} disagrees with shard {shard}: "
                f"{len(absent)} listed but absent {absent[:5]}, {len(unlisted)} present but unlisted {unlisted[:5]}"
            )
        state.update(tensors)
    return state


# ---------------------------------------------------------------------------------------------------
# Key names: diffusers' WanTransformer3DModel <-> Wan/JavisDiT (model-spec.md §5.3)
# ---------------------------------------------------------------------------------------------------

# (diffusers pattern, Wan replacement); applied in order to each key.
_DIFFUSERS_TO_WAN = [
    (r"^condition_embedder\.time_embedder\.linear_1\.", "time_embedding.0."),
    (r"^condition_embedder\.time_embedder\.linear_2\.", "time_embedding.2."),
    (r"^condition_embedder\.text_embedder\.linear_1\.", "text_embedding.0."),
    (r"^condition_embedder\.text_embedder\.linear_2\.", "text_embedding.2."),
    (r"^condition_embedder\.time_proj\.", "time_projection.1."),
    (r"^scale_shift_table$", "head.modulation"),
    (r"^proj_out\.", "head.head."),
    (r"^(blocks\.\d+)\.scale_shift_table$", r"\1.modulation"),
    (r"^(blocks\.\d+)\.attn1\.to_out\.0\.", r"\1.self_attn.o."),
    (r"^(blocks\.\d+)\.attn2\.to_out\.0\.", r"\1.cross_attn.o."),
    (r"^(blocks\.\d+)\.attn1\.to_([qkv])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.to_([qkv])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.attn1\.(norm_[qk])\.", r"\1.self_attn.\2."),
    (r"^(blocks\.\d+)\.attn2\.(norm_[qk])\.", r"\1.cross_attn.\2."),
    (r"^(blocks\.\d+)\.norm2\.", r"\1.norm3."),  # diffusers' norm2 is the affine cross-attn norm
    (r"^(blocks\.\d+)\.ffn\.net\.0\.proj\.", r"\1.ffn.0."),
    (r"^(blocks\.\d+)\.ffn\.net\.2\.", r"\1.ffn.2."),
]


def diffusers_to_wan(state: StateDict) -> StateDict:
    """Rename a diffusers ``WanTransformer3DModel`` state dict to Wan/JavisDiT names."""
    out: StateDict = {}
    for key, value in state.items():
        new = key
        for pattern, repl in _DIFFUSERS_TO_WAN:
            new, n = re.subn(pattern, repl, new)
            if n:
                break
        out[new] = value
    return out


def _looks_like_diffusers(keys: Iterable[str]) -> bool:
    return any(k.startswith("condition_embedder.") for k in keys)


# ---------------------------------------------------------------------------------------------------
# LoRA (PEFT adapter) merge
# ---------------------------------------------------------------------------------------------------

_LORA_KEY = re.compile(r"^(?:base_model\.model\.)?(?P<module>.+)\.lora_(?P<which>[AB])(?:\.[^.]+)?\.weight$")


@dataclass(frozen=True)
class LoraAdapter:
    """A PEFT LoRA adapter: per target module the (A [r, in], B [out, r]) pair and its scale."""

    pairs: dict[str, tuple[torch.Tensor, torch.Tensor]]
    scales: dict[str, float]


# PEFT's LoraConfig defaults, for keys an adapter_config.json leaves out.
_PEFT_DEFAULT_R = 8
_PEFT_DEFAULT_ALPHA = 8


def _pattern_value(patterns: Mapping[str, float], module: str, default: float) -> tuple[float, str | None]:
    """PEFT's ``rank_pattern`` / ``alpha_pattern`` lookup (``peft.utils.other.get_pattern_key``): the
    first key that matches the end of the module name (regex ``key`` after a dot or at the start);
    else ``default``."""
    for key, value in patterns.items():
        try:
            if re.match(rf"(.*\.)?({key})$", module):
                return value, key
        except re.error as exc:
            raise CheckpointError(f"LoRA adapter_config.json: pattern {key!r} is not a valid regex: {exc}") from exc
    return default, None


def read_lora(directory: Path) -> LoraAdapter:
    """Read ``adapter_config.json`` + ``adapter_model.{safetensors,bin}`` from a PEFT save.

    Each module's rank and alpha are PEFT's: ``rank_pattern`` / ``alpha_pattern`` where a key
    matches, else ``r`` / ``lora_alpha``. A rank the config gives that the tensors do not have is a
    :class:`CheckpointError` naming both (merging with the tensors' rank would silently rescale it).
    """
    config_path = directory / "adapter_config.json"
    try:
        config = json.loads(config_path.read_text())
    except FileNotFoundError as exc:
        raise CheckpointError(f"LoRA directory {directory} has no adapter_config.json") from exc
    except json.JSONDecodeError as exc:
        raise CheckpointError(f"invalid {config_path}: {exc}") from exc
    if not isinstance(config, dict):
        raise CheckpointError(f"invalid {config_path}: not a JSON object")
    unsupported = {
        "use_dora": bool(config.get("use_dora")),
        "modules_to_save": bool(config.get("modules_to_save")),
        "fan_in_fan_out": bool(config.get("fan_in_fan_out")),
        "bias != none": config.get("bias", "none") != "none",
    }
    if any(unsupported.values()):
        names = [k for k, v in unsupported.items() if v]
        raise NotImplementedError(f"LoRA merge does not implement adapter features {names} ({config_path})")
    if config.get("peft_type", "LORA") != "LORA":
        raise CheckpointError(f"{config_path}: peft_type {config.get('peft_type')!r} is not LORA")
    try:
        r = int(config.get("r", _PEFT_DEFAULT_R))
        alpha = float(config.get("lora_alpha", _PEFT_DEFAULT_ALPHA))
        rank_pattern = {str(k): int(v) for k, v in (config.get("rank_pattern") or {}).items()}
        alpha_pattern = {str(k): float(v) for k, v in (config.get("alpha_pattern") or {}).items()}
    except (TypeError, ValueError, AttributeError) as exc:
        raise CheckpointError(f"invalid {config_path}: r, lora_alpha, rank_pattern or alpha_pattern: {exc}") from exc
    use_rslora = bool(config.get("use_rslora", False))
    files = [directory / n for n in ("adapter_model.safetensors", "adapter_model.bin") if (directory / n).is_file()]
    if not files:
        raise CheckpointError(f"LoRA directory {directory} has no adapter_model.safetensors or adapter_model.bin")
    tensors = read_tensor_file(files[0])
    halves: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        match = _LORA_KEY.match(key)
        if match is None:
            raise CheckpointError(f"unexpected tensor {key!r} in LoRA adapter {files[0]}")
        halves.setdefault(match["module"], {})[match["which"]] = value
    pairs, scales = {}, {}
    for module, ab in halves.items():
        if set(ab) != {"A", "B"}:
            raise CheckpointError(f"LoRA adapter has only lora_{''.join(ab)} for {module}")
        a, b = ab["A"], ab["B"]
        if a.ndim != 2 or b.ndim != 2 or a.shape[0] != b.shape[1]:
            raise CheckpointError(f"LoRA {module}: A {tuple(a.shape)} and B {tuple(b.shape)} do not pair")
        rank, rank_key = _pattern_value(rank_pattern, module, r)
        if a.shape[0] != rank:
            source = f"rank_pattern[{rank_key!r}]" if rank_key is not None else "r"
            raise CheckpointError(
                f"LoRA {module}: {config_path.name} gives rank {source} = {int(rank)}, but its tensors in "
                f"{files[0].name} have rank {a.shape[0]} (A {tuple(a.shape)}, B {tuple(b.shape)})"
            )
        module_alpha, _ = _pattern_value(alpha_pattern, module, alpha)
        # PEFT's scaling: alpha / r, or alpha / sqrt(r) with rsLoRA (released: 16 / 64 = 0.25)
        scales[module] = module_alpha / math.sqrt(rank) if use_rslora else module_alpha / rank
        pairs[module] = (a, b)
    return LoraAdapter(pairs, scales)


def merge_lora(
    state: StateDict,
    adapter: LoraAdapter,
    numerics: Numerics | str = Numerics.FP32,
    device: torch.device | str = "cpu",
) -> None:
    """In place: ``W <- W + scale * B @ A`` for every adapted Linear; ``delta = (B @ A) * scale`` in fp32.

    ``fp32`` numerics: one rounding, ``fp32(W + delta)``, kept in fp32.
    ``official``: what the reference computes. Its inference script casts the model to bf16 *before*
    ``PeftModel.from_pretrained(...).merge_and_unload()``; PEFT keeps the adapter in fp32 and adds
    the fp32 delta into the bf16 weight in place, so each merged weight is ``bf16(bf16(W) + delta)``.
    On CUDA the product runs on ``device`` with TF32 on, as the reference's merge does.
    """
    numerics = Numerics(numerics)
    device = torch.device(device)
    official = numerics is Numerics.OFFICIAL
    if official and device.type == "cuda":
        enable_tf32()
    for module, (a, b) in adapter.pairs.items():
        key = f"{module}.weight"
        if key not in state:
            raise CheckpointError(f"LoRA targets {module!r}, which the model state dict does not have")
        w = state[key]
        if tuple(w.shape) != (b.shape[0], a.shape[1]):
            raise CheckpointError(
                f"LoRA {module}: B@A is {(b.shape[0], a.shape[1])}, the weight is {tuple(w.shape)}"
            )
        delta = ((b.to(device, torch.float32) @ a.to(device, torch.float32)) * adapter.scales[module]).cpu()
        if official:
            state[key] = (w.to(torch.bfloat16).float() + delta).to(torch.bfloat16)
        else:
            state[key] = w.float() + delta


# ---------------------------------------------------------------------------------------------------
# Checking and loading
# ---------------------------------------------------------------------------------------------------


def check_state_dict(model: torch.nn.Module, state: StateDict) -> None:
    """Raise one :class:`CheckpointError` listing every missing, unexpected or mis-shaped key."""
    expected = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    missing = sorted(expected.keys() - state.keys())
    unexpected = sorted(state.keys() - expected.keys())
    mismatched = sorted(
        f"{k}: checkpoint {tuple(state[k].shape)} vs model {expected[k]}"
        for k in expected.keys() & state.keys()
        if tuple(state[k].shape) != expected[k]
    )
    if not (missing or unexpected or mismatched):
        return
    lines = [f"checkpoint does not fit the model ({len(expected)} keys expected):"]
    for title, items in (("missing", missing), ("unexpected", unexpected), ("shape mismatch", mismatched)):
        if items:
            shown = ", ".join(items[:20]) + (f", ... (+{len(items) - 20})" if len(items) > 20 else "")
            lines.append(f"  {len(items)} {title}: {shown}")
    if any(".base_layer." in k for k in unexpected):
        lines.append(
            "  hint: keys contain '.base_layer.': this is an unmerged PEFT-wrapped state dict; "
            "save the base model with plain names (merge_and_unload) or put the adapter in lora/"
        )
    raise CheckpointError("\n".join(lines))


def _split_embedded_lora(state: StateDict, have_lora_dir: bool, where: Path) -> StateDict:
    """Drop LoRA tensors saved inside model/ (the reference's strict=False load ignores them)."""
    lora_keys = {k for k in state if ".lora_A." in k or ".lora_B." in k}
    if not lora_keys:
        return state
    if not have_lora_dir:
        raise CheckpointError(
            f"{where} holds {len(lora_keys)} LoRA tensors but there is no lora/ adapter to merge; "
            "refusing to drop them silently"
        )
    log.warning("ignoring %d LoRA tensors inside %s; the adapter in lora/ is merged instead", len(lora_keys), where)
    return {k: v for k, v in state.items() if k not in lora_keys}


def read_checkpoint(
    path: str | os.PathLike[str],
    numerics: Numerics | str = Numerics.FP32,
    device: torch.device | str = "cpu",
) -> tuple[StateDict, JavisConfig | None]:
    """Read any supported layout into a Wan/JavisDiT-named state dict (LoRA merged for ``numerics``
    on ``device``, see :func:`merge_lora`; the state dict stays on the CPU).

    Returns the state dict and the config stored with it (javisrt files only, else None).
    """
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"checkpoint not found: {path}")
    if path.is_dir() and (path / "model").is_dir():
        state = read_sharded(path / "model")
        lora_dir = path / "lora"
        state = _split_embedded_lora(state, lora_dir.is_dir(), path / "model")
        if lora_dir.is_dir():
            adapter = read_lora(lora_dir)
            merge_lora(state, adapter, numerics, device)
            log.info("merged LoRA from %s: %d modules", lora_dir, len(adapter.pairs))
        return state, None
    if path.is_dir():
        candidates = [p for p in (path / "transformer", path) if p.is_dir() and any(p.glob("diffusion_pytorch_model*"))]
        if not candidates:
            from javisrt.engine.v01_checkpoint import is_v01_checkpoint  # it imports this module

            if is_v01_checkpoint(path):
                raise CheckpointError(
                    f"{path} is a JavisDiT v0.1 checkpoint (config.json names VASTDiT3 / STIBPriorExtractor): load it "
                    "with javisrt.runtime.v01_pipeline.V01Pipeline.from_pretrained, or `javisrt generate --model "
                    "javisdit-v0.1` (the CLI picks it from the checkpoint when --model is not given)"
                )
            raise CheckpointError(
                f"{path} is neither an official JavisDiT++ checkpoint (model/ [+ lora/]) nor a Wan2.1 "
                "directory with diffusion_pytorch_model.safetensors"
            )
        weights = candidates[0]
        index = list(weights.glob("diffusion_pytorch_model*.index.json"))
        single = weights / "diffusion_pytorch_model.safetensors"
        state = read_sharded(weights) if index else read_tensor_file(single)
        return (diffusers_to_wan(state) if _looks_like_diffusers(state) else state), None
    if path.suffix == ".safetensors":
        config = _javisrt_config(path)
        state = read_tensor_file(path)
        if config is None and _looks_like_diffusers(state):
            state = diffusers_to_wan(state)
        return state, config
    return read_tensor_file(path), None


def _javisrt_config(path: Path) -> JavisConfig | None:
    try:
        with safe_open(str(path), framework="pt", device="cpu") as f:
            meta = f.metadata() or {}
    except Exception as exc:
        raise CheckpointError(f"cannot read {path} (corrupt or truncated safetensors?): {exc}") from exc
    if meta.get("format") != JAVISRT_FORMAT:
        return None
    if meta.get("format_version") != JAVISRT_FORMAT_VERSION:
        raise CheckpointError(f"{path}: javisrt format version {meta.get('format_version')!r} is not supported")
    try:
        return JavisConfig.from_dict(json.loads(meta["config"]))
    except (KeyError, json.JSONDecodeError, ConfigError, TypeError) as exc:
        raise CheckpointError(f"{path}: invalid javisrt config metadata: {exc}") from exc


def load_model(
    path: str | os.PathLike[str],
    config: JavisConfig | str | None = None,
    numerics: Numerics | str = Numerics.OFFICIAL,
    device: torch.device | str = "cpu",
    ops: str = "torch",
) -> JavisDiT:
    """Load a checkpoint of any supported layout into an eval-mode :class:`JavisDiT`.

    ``config``: a preset name or config; default: the one stored in a javisrt file, else
    ``javisdit-v1.0`` when the weights have an audio branch and ``wan2.1-t2v-1.3b`` when not.
    """
    state, stored = read_checkpoint(path, numerics, device)
    if config is None:
        config = stored or ("javisdit-v1.0" if "audio_patch_embedding.weight" in state else "wan2.1-t2v-1.3b")
    cfg = JavisConfig.from_name(config) if isinstance(config, str) else config
    model = build_model(cfg, "meta", ops=ops)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.set_numerics(numerics)  # before the move: only the final dtypes go to the device
    model.requires_grad_(False).eval().to(device)
    if model.numerics is Numerics.OFFICIAL and model.patch_embedding.weight.is_cuda:
        enable_tf32()
    return model


def save_model(model: JavisDiT, path: str | os.PathLike[str]) -> Path:
    """Write javisrt's single-file safetensors (weights as they are + the config), atomically."""
    path = Path(path)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items()}
    metadata = {"format": JAVISRT_FORMAT, "format_version": JAVISRT_FORMAT_VERSION, "config": model.cfg.to_json()}
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_file(path) as tmp:
        save_file(state, tmp, metadata=metadata)
    return path
