"""bench/forward_v01.py on the tiny presets (the full-size run is a manual measurement)."""

from __future__ import annotations

import json

import pytest

from javisrt.bench import forward_v01


@pytest.mark.parametrize("preset", ["tiny", "tiny-audio"])
def test_forward_v01_tiny_case(preset: str, capsys: pytest.CaptureFixture[str]) -> None:
    assert forward_v01.main(["--preset", preset, "--case", "tiny", "--batch", "2", "--text-tokens", "5", "--json"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert row["preset"] == preset and row["finite"] and row["forward_s"] > 0
    assert row["tokens"] == ([3 * 3 * 4, 2 * 16] if preset == "tiny" else [0, 2 * 16])
    assert row["peak_rss_gib"] >= row["rss_after_weights_gib"] > 0


def test_forward_v01_full_case_shapes() -> None:
    (t, h, w), (ta, fa), (height, width) = forward_v01.CASES["240p-102f"]
    assert (t, h, w, ta, fa, height, width) == (30, 30, 53, 112, 16, 240, 426)


def test_v01_components_meta_rss(capsys: pytest.CaptureFixture[str]) -> None:
    from javisrt.bench import v01_components

    assert v01_components.main(["--all", "--only", "prior", "vae"]) == 0
    rows = {r["component"]: r for r in map(json.loads, capsys.readouterr().out.strip().splitlines())}
    assert rows["prior"]["params"] == 30_116_608  # v01-spec §1
    assert rows["vae"]["params"] == 393_341_007  # the released OpenSora-VAE-v1.2 weights (+ 8 buffer values)
    assert all(r["peak_rss_gib"] >= r["rss_before_gib"] > 0 for r in rows.values())


def test_v01_tiny_run_stages(capsys: pytest.CaptureFixture[str]) -> None:
    from javisrt.bench import v01_components

    assert v01_components.main(["--tiny-run", "--steps", "2"]) == 0
    row = json.loads(capsys.readouterr().out)
    assert {"text_s", "prior_s", "denoise_s", "video_decode_s", "audio_decode_s"} <= set(row)
