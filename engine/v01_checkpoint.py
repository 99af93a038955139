"""Loading and saving JavisDiT v0.1 checkpoints in the released (Hugging Face ``from_pretrained``) layout.

A checkpoint directory holds ``config.json`` and the weights, looked up in this order:
``model.safetensors.index.json`` (sharded), ``model.safetensors``, ``pytorch_model.bin.index.json``,
``pytorch_model.bin``. Safetensors is read first; ``.bin`` only through
``torch.load(weights_only=True)`` (a pickle that would run code is refused). A single ``.safetensors``
file may also be given with an explicit config. The tensor reading, the shard index and the strict
key/shape check (one :class:`CheckpointError` listing every problem) are ``engine/checkpoint.py``'s.

What the released files need beyond a plain load (v01-spec.md §6):
  * ``audio_y_embedder.y_embedding`` shares storage with ``y_embedder.y_embedding`` (so
    ``save_pretrained`` drops it): absent is fine, present must be equal; the model re-ties them.
  * The prior file may carry ``text_encoder.*`` (ImageBind) and training-only VA-encoder tensors:
    they are not part of the estimator and are skipped (logged).
  * The video<->audio gates ``va_cross_blocks.*.gamma_m{1,2}``: the official inference loads with
    transformers 4.39.3, which renames every key containing "gamma" to "weight", so the trained
    gates are dropped as "unexpected" and stay 0 -- the bi-attention is switched off. **Decision
    (v01-spec.md, end):** by default we do the same (zeros, logged once at load);
    ``trained_gates=True`` loads the stored values.
"""

from __future__ import annotations

import json
import logging
import os
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file

from javisrt.engine.atomic_file import atomic_file
from javisrt.engine.checkpoint import StateDict, check_state_dict, read_indexed, read_tensor_file
from javisrt.engine.errors import CheckpointError, ConfigError
from javisrt.engine.model import Numerics
from javisrt.engine.st_prior import STPriorEstimator, build_st_prior
from javisrt.engine.v01_config import V01_PRESETS, STPriorConfig, V01Branches, V01Config
from javisrt.engine.v01_model import VASTDiT3, build_v01_model

log = logging.getLogger(__name__)

WEIGHT_FILES = ("model.safetensors.index.json", "model.safetensors", "pytorch_model.bin.index.json", "pytorch_model.bin")
SHARED_NULL_CAPTION = "audio_y_embedder.y_embedding"
GATE_SUFFIXES = (".gamma_m1", ".gamma_m2")
TRAINED_GATES_OPTION = "load_v01_model(..., trained_gates=True)"
PRIOR_IGNORED_PREFIXES = (
    "text_encoder.",  # ImageBind, registered inside STIBPriorExtractor
    # encode_va=True training parts (v01-spec §4)
    "video_embedder.", "audio_embedder.", "va_spatial_encoder.", "va_temporal_encoder.", "discriminator.",
)

# config.json key -> V01Config field (the VASTDiT3Config / STDiT3Config names).
_DIT_KEYS = {
    "hidden_size": "hidden_size", "depth": "depth", "num_heads": "num_heads", "mlp_ratio": "mlp_ratio",
    "in_channels": "in_channels", "audio_in_channels": "audio_in_channels", "patch_size": "patch_size",
    "audio_patch_size": "audio_patch_size", "caption_channels": "caption_channels",
    "model_max_length": "model_max_length", "input_sq_size": "input_sq_size", "pred_sigma": "pred_sigma",
    "spatial_prior_len": "spatial_prior_len", "temporal_prior_len": "temporal_prior_len",
    "st_prior_channel": "st_prior_channel",
}
_PRIOR_KEYS = {
    "text_emb_dim": "text_dim", "hidden_size": "hidden_size", "nhead": "nhead",
    "num_encoder_layers": "num_encoder_layers", "num_decoder_layers": "num_decoder_layers",
    "feedforward_scale": "feedforward_scale", "spatial_token_num": "spatial_token_num",
    "temporal_token_num": "temporal_token_num", "out_dim": "out_dim",
}


# ---------------------------------------------------------------------------------------------------
# config.json <-> typed configs
# ---------------------------------------------------------------------------------------------------


V01_MODEL_TYPES = ("VASTDiT3", "STIBPriorExtractor")  # the config.json model_type of v0.1's DiT and prior


def is_v01_checkpoint(path: str | os.PathLike[str]) -> bool:
    """Whether ``path`` is a v0.1 directory in the released layout: its config.json names VASTDiT3 (the DiT)
    or STIBPriorExtractor (the prior) as ``model_type`` or in ``architectures``. Reads only config.json."""
    config = Path(path) / "config.json"
    if not config.is_file():
        return False
    try:
        data = json.loads(config.read_text())
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return False
    if not isinstance(data, dict):
        return False
    names = [data.get("model_type"), *(data.get("architectures") or [])]
    return any(n in V01_MODEL_TYPES for n in names if isinstance(n, str))


def _read_config_json(directory: Path) -> dict[str, Any]:
    path = directory / "config.json"
    try:
        data = json.loads(path.read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{directory} has no config.json (expected the released from_pretrained layout)") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as exc:
        raise CheckpointError(f"invalid {path}: {exc}") from exc
    if not isinstance(data, dict):
        raise CheckpointError(f"invalid {path}: not a JSON object")
    return data


def dit_config_from_json(data: dict[str, Any], name: str = "checkpoint") -> V01Config:
    """A :class:`V01Config` from a ``VASTDiT3`` ``config.json`` (fields it does not name keep the XL defaults)."""
    if data.get("model_type", "VASTDiT3") != "VASTDiT3":
        raise CheckpointError(f"config.json model_type {data.get('model_type')!r} is not VASTDiT3")
    unsupported = {
        "qk_norm=False": data.get("qk_norm", True) is False,
        "st_prior_utilize != cross_attn": data.get("st_prior_utilize", "cross_attn") != "cross_attn",
        "require_onset": bool(data.get("require_onset", False)),
        "skip_y_embedder": bool(data.get("skip_y_embedder", False)),
    }
    audio_only = bool(data.get("only_infer_audio", False))
    if not audio_only:
        unsupported["train_st_prior_attn=False"] = data.get("train_st_prior_attn", True) is False
        unsupported["train_va_cross_attn=False"] = data.get("train_va_cross_attn", True) is False
    if any(unsupported.values()):
        raise NotImplementedError(f"VASTDiT3 variants not implemented: {[k for k, v in unsupported.items() if v]}")
    fields: dict[str, Any] = {f: data[k] for k, f in _DIT_KEYS.items() if k in data}
    fields["branches"] = V01Branches.AUDIO if audio_only else V01Branches.JAV
    try:
        return V01Config(name=name, **fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"config.json does not describe a valid VASTDiT3: {exc}") from exc


def dit_config_to_json(cfg: V01Config) -> dict[str, Any]:
    """The ``config.json`` of :func:`dit_config_from_json` (the fields that file format carries)."""
    fixed = V01_PRESETS["javisdit-v0.1-jav"]
    for attr in ("freq_dim", "eps", "rope_theta"):  # constants in the reference code, not config fields
        if getattr(cfg, attr) != getattr(fixed, attr):
            raise ConfigError(f"{attr}={getattr(cfg, attr)} cannot be stored in a VASTDiT3 config.json")
    out: dict[str, Any] = {"architectures": ["VASTDiT3"], "model_type": "VASTDiT3"}
    for key, attr in _DIT_KEYS.items():
        value = getattr(cfg, attr)
        out[key] = list(value) if isinstance(value, tuple) else value
    audio_only = cfg.branches is V01Branches.AUDIO
    out.update(qk_norm=True, st_prior_utilize="cross_attn", only_infer_audio=audio_only,
               train_st_prior_attn=not audio_only, train_va_cross_attn=not audio_only)
    return out


def prior_config_from_json(data: dict[str, Any], name: str = "checkpoint") -> STPriorConfig:
    if not data.get("apply_sampling", True) or data.get("pred_onset", False):
        raise NotImplementedError("STIBPrior with apply_sampling=False or pred_onset=True is not implemented")
    fields = {f: data[k] for k, f in _PRIOR_KEYS.items() if k in data}
    try:
        return STPriorConfig(name=name, **fields)
    except (ConfigError, TypeError) as exc:
        raise CheckpointError(f"config.json does not describe a valid STIBPrior: {exc}") from exc


def prior_config_to_json(cfg: STPriorConfig) -> dict[str, Any]:
    out: dict[str, Any] = {"architectures": ["STIBPriorExtractor"], "model_type": "STIBPriorExtractor"}
    out.update({key: getattr(cfg, attr) for key, attr in _PRIOR_KEYS.items()})
    out.update(apply_sampling=True, pred_onset=False, encode_va=False, dropout=0.0)
    return out


# ---------------------------------------------------------------------------------------------------
# Reading
# ---------------------------------------------------------------------------------------------------


def read_weights(path: Path) -> StateDict:
    """The tensors of a released checkpoint directory (first of :data:`WEIGHT_FILES`), or of one file."""
    if path.is_file():
        return read_tensor_file(path)
    if not path.is_dir():
        raise CheckpointError(f"checkpoint not found: {path}")
    for name in WEIGHT_FILES:
        candidate = path / name
        if candidate.is_file():
            return read_indexed(candidate) if name.endswith(".index.json") else read_tensor_file(candidate)
    raise CheckpointError(f"{path} has none of {list(WEIGHT_FILES)}")


def _resolve_config(path: Path, config: Any, from_json: Any, kind: str) -> Any:
    stored = from_json(_read_config_json(path), name=path.name) if path.is_dir() else None
    if config is None:
        if stored is None:
            raise CheckpointError(f"{path} is a single weights file: pass the {kind} config (a preset name)")
        return stored
    if stored is not None:
        given = {k: v for k, v in config.to_dict().items() if k != "name"}
        found = {k: v for k, v in stored.to_dict().items() if k != "name"}
        diff = sorted(k for k in given if given[k] != found.get(k))
        if diff:
            raise CheckpointError(
                f"{path}/config.json disagrees with the requested {kind} config {config.name!r} on {diff}: "
                + ", ".join(f"{k}: file {found.get(k)!r} vs {given[k]!r}" for k in diff)
            )
    return config


def load_v01_model(
    path: str | os.PathLike[str],
    config: V01Config | str | None = None,
    numerics: Numerics | str = Numerics.OFFICIAL,
    device: torch.device | str = "cpu",
    ops: str = "torch",
    trained_gates: bool = False,
) -> VASTDiT3:
    """Load a released ``JavisDiT-v0.1-{jav,jav-240p4s,audio}`` checkpoint into an eval-mode model.

    ``config``: default: from ``config.json``; a preset name or config is checked against it.
    ``trained_gates``: load ``va_cross_blocks.*.gamma_m{1,2}`` as stored instead of the official
    inference's zeros (see the module docstring).
    """
    path = Path(path)
    cfg = V01Config.from_name(config) if isinstance(config, str) else config
    cfg = _resolve_config(path, cfg, dit_config_from_json, "DiT")
    state = read_weights(path)
    model = build_v01_model(cfg, "meta", ops=ops)
    shared = state.get(SHARED_NULL_CAPTION)
    if shared is None:
        if "y_embedder.y_embedding" in state:
            state[SHARED_NULL_CAPTION] = state["y_embedder.y_embedding"]
    elif "y_embedder.y_embedding" in state and not torch.equal(shared, state["y_embedder.y_embedding"]):
        raise CheckpointError(f"{SHARED_NULL_CAPTION} differs from y_embedder.y_embedding; the model shares one tensor")
    check_state_dict(model, state)
    gates = sorted(k for k in state if k.startswith("va_cross_blocks.") and k.endswith(GATE_SUFFIXES))
    if gates and not trained_gates:
        nonzero = sum(int(bool(state[k].count_nonzero())) for k in gates)
        log.warning(
            "JavisDiT v0.1: ignoring the checkpoint's %d trained video<->audio gates (%d non-zero) and using 0, "
            "as the official inference does (its transformers 4.39.3 loader drops keys containing 'gamma'); "
            "load them with %s",
            len(gates), nonzero, TRAINED_GATES_OPTION,
        )
        for k in gates:
            state[k] = torch.zeros_like(state[k])
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.tie_null_caption()
    model.set_numerics(numerics)
    return model.requires_grad_(False).eval().to(device)


def load_st_prior(
    path: str | os.PathLike[str],
    config: STPriorConfig | str | None = None,
    numerics: Numerics | str = Numerics.OFFICIAL,
    device: torch.device | str = "cpu",
    ops: str = "torch",
) -> STPriorEstimator:
    """Load a released ``JavisDiT-v0.1-prior`` checkpoint (the ``STIBPrior`` head) into eval mode."""
    path = Path(path)
    cfg = STPriorConfig.from_name(config) if isinstance(config, str) else config
    cfg = _resolve_config(path, cfg, prior_config_from_json, "prior")
    state = read_weights(path)
    skipped = [k for k in state if k.startswith(PRIOR_IGNORED_PREFIXES)]
    if skipped:
        log.info("prior checkpoint: skipping %d tensors that are not the estimator (%s...)", len(skipped), skipped[0])
        state = {k: v for k, v in state.items() if not k.startswith(PRIOR_IGNORED_PREFIXES)}
    model = build_st_prior(cfg, "meta", ops=ops)
    check_state_dict(model, state)
    model.load_state_dict(state, strict=True, assign=True)
    del state
    model.set_numerics(numerics)
    return model.requires_grad_(False).eval().to(device)


# ---------------------------------------------------------------------------------------------------
# Writing (the same layout, for tests and conversions)
# ---------------------------------------------------------------------------------------------------


def save_pretrained(
    model: VASTDiT3 | STPriorEstimator, directory: str | os.PathLike[str], max_shard_bytes: int | None = None
) -> Path:
    """Write ``config.json`` + ``model.safetensors`` (or shards + ``model.safetensors.index.json`` when
    ``max_shard_bytes`` is given), each file atomically. Like ``save_pretrained``, the shared
    ``audio_y_embedder.y_embedding`` is written once (as ``y_embedder.y_embedding``)."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    if isinstance(model, VASTDiT3):
        config = dit_config_to_json(model.cfg)
    else:
        config = prior_config_to_json(model.cfg)
    state = {k: v.detach().contiguous() for k, v in model.state_dict().items() if k != SHARED_NULL_CAPTION}
    shards: list[dict[str, torch.Tensor]] = [{}]
    size = 0
    for key, value in state.items():
        nbytes = value.numel() * value.element_size()
        if max_shard_bytes is not None and shards[-1] and size + nbytes > max_shard_bytes:
            shards.append({})
            size = 0
        shards[-1][key] = value
        size += nbytes
    meta = {"format": "pt"}
    if len(shards) == 1:
        with atomic_file(directory / "model.safetensors") as tmp:
            save_file(shards[0], tmp, metadata=meta)
    else:
        weight_map = {}
        for i, shard in enumerate(shards):
            name = f"model-{i + 1:05d}-of-{len(shards):05d}.safetensors"
            with atomic_file(directory / name) as tmp:
                save_file(shard, tmp, metadata=meta)
            weight_map.update(dict.fromkeys(shard, name))
        index = {"metadata": {"total_size": sum(v.numel() * v.element_size() for v in state.values())},
                 "weight_map": weight_map}
        with atomic_file(directory / "model.safetensors.index.json") as tmp:
            tmp.write_text(json.dumps(index, indent=2))
    with atomic_file(directory / "config.json") as tmp:
        tmp.write_text(json.dumps(config, indent=2))
    return directory
