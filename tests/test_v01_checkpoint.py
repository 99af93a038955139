"""JavisDiT v0.1 checkpoints in the released from_pretrained layout: round trip, gates, bad files."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from javisrt.engine.errors import CheckpointError
from javisrt.engine.st_prior import random_st_prior
from javisrt.engine.v01_checkpoint import load_st_prior, load_v01_model, save_pretrained
from javisrt.engine.v01_config import STPriorConfig, V01Config
from javisrt.engine.v01_model import random_v01_model


@pytest.fixture(scope="module")
def tiny() -> torch.nn.Module:
    return random_v01_model(V01Config.from_name("tiny"), seed=7)


def _assert_same_state(a: torch.nn.Module, b: torch.nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert sa[k].dtype == sb[k].dtype and torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize("max_shard_bytes", [None, 60_000])
def test_round_trip_is_bit_exact(tiny, tmp_path: Path, max_shard_bytes: int | None) -> None:
    save_pretrained(tiny, tmp_path, max_shard_bytes=max_shard_bytes)
    sharded = (tmp_path / "model.safetensors.index.json").is_file()
    assert sharded == (max_shard_bytes is not None)
    loaded = load_v01_model(tmp_path, numerics="fp32", trained_gates=True)
    _assert_same_state(tiny, loaded)
    assert loaded.audio_y_embedder.y_embedding is loaded.y_embedder.y_embedding
    inp = dict(video=torch.randn(1, 4, 2, 4, 4), audio=torch.randn(1, 8, 8, 16), timestep=torch.tensor([500.0]),
               y=torch.randn(1, 12, 32), mask=torch.ones(1, 12, dtype=torch.long), fps=24, height=32, width=32,
               spatial_prior=torch.randn(1, 4, 8), temporal_prior=torch.randn(1, 3, 8))
    with torch.no_grad():
        assert torch.equal(tiny(**inp).video, loaded(**inp).video)


def test_saved_file_drops_the_shared_null_caption(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    keys = load_file(tmp_path / "model.safetensors").keys()
    assert "y_embedder.y_embedding" in keys and "audio_y_embedder.y_embedding" not in keys
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["model_type"] == "VASTDiT3" and config["depth"] == 2 and config["only_infer_audio"] is False


def test_gates_are_zero_by_default_and_logged(tiny, tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    save_pretrained(tiny, tmp_path)
    with caplog.at_level(logging.WARNING, logger="javisrt.engine.v01_checkpoint"):
        model = load_v01_model(tmp_path, numerics="fp32")
    warnings = [r for r in caplog.records if "gates" in r.getMessage()]
    assert len(warnings) == 1 and "trained_gates=True" in warnings[0].getMessage()
    for blk in model.va_cross_blocks:
        assert not blk.gamma_m1.any() and not blk.gamma_m2.any()
    trained = load_v01_model(tmp_path, numerics="fp32", trained_gates=True)
    assert torch.equal(trained.va_cross_blocks[0].gamma_m1, tiny.va_cross_blocks[0].gamma_m1)
    assert trained.va_cross_blocks[0].gamma_m1.abs().min() > 0


def test_official_numerics_after_load(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    model = load_v01_model(tmp_path)  # default: official
    assert all(p.dtype == torch.bfloat16 for p in model.parameters())


def _state(path: Path) -> dict[str, torch.Tensor]:
    return load_file(path / "model.safetensors")


def test_missing_key(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    state = _state(tmp_path)
    del state["spatial_blocks.1.attn.qkv.weight"]
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="1 missing: spatial_blocks.1.attn.qkv.weight"):
        load_v01_model(tmp_path)


def test_wrong_shape(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    state = _state(tmp_path)
    state["final_layer.linear.weight"] = torch.zeros(31, 64)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="shape mismatch: final_layer.linear.weight"):
        load_v01_model(tmp_path)


def test_truncated_file(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(CheckpointError, match="corrupt or truncated"):
        load_v01_model(tmp_path)


class _RunsCode:
    def __reduce__(self):  # a pickle that would call a function on load
        return (print, ("this must never run",))


def test_pickle_that_would_run_code_is_refused(tiny, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    save_pretrained(tiny, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    state = dict(tiny.state_dict())
    state["evil"] = _RunsCode()  # type: ignore[assignment]
    torch.save(state, tmp_path / "pytorch_model.bin")
    with pytest.raises(CheckpointError, match="weights_only"):
        load_v01_model(tmp_path)
    assert "must never run" not in capsys.readouterr().out


def test_plain_bin_loads_with_weights_only(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    (tmp_path / "model.safetensors").unlink()
    torch.save(tiny.state_dict(), tmp_path / "pytorch_model.bin")  # includes the shared key: must be equal
    _assert_same_state(tiny, load_v01_model(tmp_path, numerics="fp32", trained_gates=True))


def test_config_json_that_disagrees_with_the_tensors(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["depth"] = 3
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(CheckpointError, match="missing"):
        load_v01_model(tmp_path)
    with pytest.raises(CheckpointError, match="disagrees"):
        load_v01_model(tmp_path, config="tiny")


def test_missing_config_json_and_unsupported_variant(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "st_prior_utilize": "modulate"}))
    with pytest.raises(NotImplementedError, match="st_prior_utilize"):
        load_v01_model(tmp_path)
    (tmp_path / "config.json").unlink()
    with pytest.raises(CheckpointError, match="no config.json"):
        load_v01_model(tmp_path)
    # a single weights file needs an explicit config
    single = tmp_path / "model.safetensors"
    assert load_v01_model(single, config="tiny").cfg.name == "tiny"


def test_different_shared_null_captions_are_refused(tiny, tmp_path: Path) -> None:
    save_pretrained(tiny, tmp_path)
    state = _state(tmp_path)
    state["audio_y_embedder.y_embedding"] = state["y_embedder.y_embedding"] + 1
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="differs"):
        load_v01_model(tmp_path)


def test_audio_only_round_trip(tmp_path: Path) -> None:
    model = random_v01_model(V01Config.from_name("tiny-audio"))
    save_pretrained(model, tmp_path)
    assert json.loads((tmp_path / "config.json").read_text())["only_infer_audio"] is True
    loaded = load_v01_model(tmp_path, numerics="fp32")
    assert loaded.cfg.branches == "audio"
    _assert_same_state(model, loaded)


def test_prior_round_trip_ignores_text_encoder_keys(tmp_path: Path) -> None:
    prior = random_st_prior(STPriorConfig.from_name("tiny"))
    save_pretrained(prior, tmp_path)
    state = _state(tmp_path)
    state["text_encoder.modality_trunks.text.blocks.0.attn.in_proj_weight"] = torch.zeros(3, 3)
    save_file(state, tmp_path / "model.safetensors")
    loaded = load_st_prior(tmp_path, numerics="fp32")
    _assert_same_state(prior, loaded)
    state["unknown.weight"] = torch.zeros(1)
    save_file(state, tmp_path / "model.safetensors")
    with pytest.raises(CheckpointError, match="unexpected: unknown.weight"):
        load_st_prior(tmp_path)


def test_v01_checkpoint_is_recognised_and_refused_by_the_javisdit_loader(tiny, tmp_path: Path) -> None:
    """A released-layout v0.1 directory is told apart by its config.json; the JavisDiT++ loader names the
    v0.1 entry points instead of a generic layout error; the CLI picks --model from it."""
    import argparse

    from javisrt.engine.checkpoint import read_checkpoint
    from javisrt.engine.errors import ConfigError
    from javisrt.engine.v01_checkpoint import is_v01_checkpoint
    from javisrt.runtime.cli import build_parser, resolve_model

    save_pretrained(tiny, tmp_path / "jav")
    prior = random_st_prior(STPriorConfig.from_name("tiny"), seed=0)
    save_pretrained(prior, tmp_path / "prior")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "config.json").write_text(json.dumps({"model_type": "t5"}))
    assert is_v01_checkpoint(tmp_path / "jav") and is_v01_checkpoint(tmp_path / "prior")
    assert not is_v01_checkpoint(tmp_path / "other") and not is_v01_checkpoint(tmp_path / "missing")
    with pytest.raises(CheckpointError, match="JavisDiT v0.1 checkpoint.*V01Pipeline.from_pretrained"):
        read_checkpoint(tmp_path / "jav")

    def model_for(*argv: str) -> str:
        args: argparse.Namespace = build_parser().parse_args(["generate", "--prompt", "x", *argv])
        return resolve_model(args)

    assert model_for("--checkpoint", str(tmp_path / "jav")) == "javisdit-v0.1"
    assert model_for("--checkpoint", str(tmp_path / "other")) == "javisdit++"
    assert model_for("--tiny") == "javisdit++"
    assert model_for("--tiny", "--model", "javisdit-v0.1") == "javisdit-v0.1"
    with pytest.raises(ConfigError, match="is a JavisDiT v0.1 checkpoint"):
        model_for("--checkpoint", str(tmp_path / "jav"), "--model", "javisdit++")
