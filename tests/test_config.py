"""engine/config.py: presets, derived fields, enums, validation."""

from __future__ import annotations

import dataclasses

import pytest

from javisrt.engine.config import AudioPosMode, GenerationMode, JavisConfig
from javisrt.engine.errors import ConfigError


def test_released_preset_matches_spec_table() -> None:
    cfg = JavisConfig.from_name("javisdit-v1.0")  # model-spec.md §2
    assert (cfg.dim, cfg.num_layers, cfg.num_heads, cfg.head_dim) == (1536, 30, 12, 128)
    assert (cfg.ffn_dim, cfg.audio_ffn_dim, cfg.freq_dim, cfg.text_dim, cfg.text_len) == (8960, 8960, 256, 4096, 512)
    assert cfg.rope_axis_dims == (44, 42, 42)
    assert cfg.model_type is GenerationMode.T2AV and cfg.has_audio
    assert cfg.audio_pos_mode is AudioPosMode.INTERLEAVE_OFFSET
    assert (cfg.video_patch_out, cfg.audio_patch_out) == (64, 32)
    assert cfg.eps == 1e-6


def test_wan_preset_is_video_only() -> None:
    cfg = JavisConfig.from_name("wan2.1-t2v-1.3b")
    assert not cfg.has_audio and cfg.supports("t2v") and not cfg.supports(GenerationMode.T2AV)
    assert not cfg.supports("t2a")


def test_frozen_and_overrides() -> None:
    cfg = JavisConfig.from_name("tiny")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.dim = 3  # type: ignore[misc]
    one = JavisConfig.from_name("tiny", num_layers=1, audio_pos_mode="vanilla")
    assert one.num_layers == 1 and one.audio_pos_mode is AudioPosMode.VANILLA
    assert JavisConfig.from_dict(one.to_dict()) == one


@pytest.mark.parametrize(
    "overrides",
    [{"dim": 100, "num_heads": 3}, {"num_heads": 5}, {"model_type": "t2a"}, {"num_layers": 0}, {"audio_pos_mode": "round"}],
)
def test_bad_configs_raise_config_error(overrides: dict) -> None:
    with pytest.raises((ConfigError, ValueError)):
        JavisConfig.from_name("tiny", **overrides)


def test_unknown_preset_lists_known() -> None:
    with pytest.raises(ConfigError, match="tiny"):
        JavisConfig.from_name("javisdit-v9")
