"""The ``javisrt`` CLI: the README's first command (``javisrt demo``), ``generate`` and its errors."""

from __future__ import annotations

import argparse
import importlib.machinery
import os
import re
import subprocess
import sys
import types
from pathlib import Path

import pytest

from javisrt.engine.checkpoint import save_model
from javisrt.engine.config import JavisConfig
from javisrt.engine.errors import ConfigError
from javisrt.runtime import cli
from javisrt.runtime.demo import tiny_dit, tiny_tokenizer, tiny_umt5, tiny_video_vae
from javisrt.runtime.media import probe_mp4

SMALL = ["--frames", "33", "--height", "32", "--width", "32", "--steps", "2", "--quiet"]


def test_demo_readme_command(tmp_path: Path) -> None:
    """`javisrt demo` from a fresh process (what `make demo` runs), checked with av."""
    out = tmp_path / "sub" / "demo.mp4"
    proc = subprocess.run(
        [sys.executable, "-m", "javisrt.runtime.cli", "demo", "--out", str(out)],
        cwd=tmp_path, capture_output=True, text=True, timeout=300,
        env={**os.environ, "PYTHONWARNINGS": "error::DeprecationWarning:javisrt"},
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert f"wrote {out.resolve()}" in proc.stdout
    assert "the pipeline, not the art" in proc.stdout
    assert "INFO" not in proc.stdout  # logs go to stderr; stdout is the user-facing report
    info = probe_mp4(out)
    assert (info.video_streams, info.audio_streams) == (1, 1)
    assert info.num_frames == 33 and info.fps == 16 and (info.height, info.width) == (64, 64)
    assert abs(info.audio_seconds - 33 / 16) <= 1 / 16
    assert sorted(p.name for p in out.parent.iterdir()) == ["demo.mp4"]


def test_generate_csv_and_skip_existing(tmp_path: Path) -> None:
    prompts = tmp_path / "bench.csv"
    prompts.write_text('id,text,audio_text\nclip/1,"a dog barks, then a door slams",a dog barks\nclip2,rain on a tin roof,\n')
    out = tmp_path / "out"
    assert cli.main(["generate", "--tiny", "--prompt-file", str(prompts), "-o", str(out), *SMALL]) == 0
    files = sorted(p.name for p in out.iterdir())
    assert files == ["clip2.mp4", "clip_1.mp4"]
    for name in files:
        info = probe_mp4(out / name)
        assert (info.video_streams, info.audio_streams, info.num_frames) == (1, 1, 33)
    stamps = {p.name: p.stat().st_mtime_ns for p in out.iterdir()}
    assert cli.main(["generate", "--tiny", "--prompt-file", str(prompts), "-o", str(out), "--skip-existing", *SMALL]) == 0
    assert {p.name: p.stat().st_mtime_ns for p in out.iterdir()} == stamps


def test_read_prompts(tmp_path: Path) -> None:
    txt = tmp_path / "p.txt"
    txt.write_text("first\n\n  second  \n")
    items = cli.read_prompts([], str(txt), prefix="jb")
    assert [(i.name, i.text) for i in items] == [("jb_0000", "first"), ("jb_0001", "second")]
    csv_file = tmp_path / "p.csv"
    csv_file.write_text("text,audio_text\nvideo words,audio words\n")
    (item,) = cli.read_prompts([], str(csv_file))
    assert item.prompt_for(cli.GenerationMode.T2A) == "audio words"
    assert item.prompt_for(cli.GenerationMode.T2AV) == "video words"
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt\nx\n")
    with pytest.raises(ConfigError, match="'text' column"):
        cli.read_prompts([], str(bad))


@pytest.mark.parametrize(
    ("content", "line", "reason"),
    [
        ('text,id\n"fine, quoted",a\n\n"never closed,b\nthird,c\n', 4, "unterminated quote"),
        ('text\n"multi\nline"\n"x"y\n', 4, "',' expected after '\"'"),
    ],
    ids=["unterminated-quote", "text-after-quote"],
)
def test_read_prompts_malformed_csv(tmp_path: Path, content: str, line: int, reason: str) -> None:
    """Malformed csv is an error naming the file, the line and the reason, not a mangled prompt."""
    bad = tmp_path / "prompts.csv"
    bad.write_text(content)
    with pytest.raises(ConfigError) as info:
        cli.read_prompts([], str(bad))
    assert str(info.value).startswith(f"{bad}, line {line}: ") and reason in str(info.value)
    out = tmp_path / "out"
    assert cli.main(["generate", "--tiny", "--prompt-file", str(bad), "-o", str(out)]) == cli.EXIT_ERROR
    assert not out.exists() or not any(out.iterdir())  # nothing generated, nothing half-written


def _write_t2v_weights(root: Path) -> tuple[Path, Path]:
    """A t2v (video-only) tiny checkpoint + a diffusers-layout Wan dir."""
    ckpt = save_model(tiny_dit(0, JavisConfig.from_name("tiny", model_type="t2v")), root / "t2v.safetensors")
    wan = root / "wan"
    tiny_video_vae(0).save_pretrained(wan / "vae")
    tiny_umt5(0).save_pretrained(wan / "text_encoder")
    tiny_tokenizer(16).save_pretrained(wan / "tokenizer")
    return ckpt, wan


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--tiny", "--prompt", "x", "--frames", "64"], "4n\\+1"),
        (["--tiny", "--prompt", "x", "--frames", "85"], "outside 33..81"),
        (["--tiny", "--prompt", "x", "--resolution", "999p"], "unknown resolution"),
        (["--tiny", "--prompt", "x", "--aspect-ratio", "7:3"], "unknown aspect ratio"),
        (["--tiny", "--prompt", ""], "prompt 0 is empty"),
        (["--prompt", "x", "--checkpoint", "/nonexistent/ckpt", "--wan-dir", "/nonexistent/wan"], "not found"),
        (["--prompt", "x"], "need --checkpoint"),
        (["--prompt", "x", "--checkpoint", "{t2v}"], "need --wan-dir"),
        (["--tiny", "--prompt", "x", "--backend", "onnxruntime"], "needs engine_file"),
        (["--prompt", "x", "--backend", "onnxruntime", "--engine-file", "d.onnx", "--checkpoint", "c"], "drop --checkpoint"),
        (["--tiny", "--prompt-file", "/nonexistent/prompts.csv"], "prompt file not found"),
        (["--tiny", "--prompt", "x", "--engine-file", "dit.onnx"], "--engine-file is for --backend onnxruntime"),
        (["--tiny", "--prompt", "x", "--output-dir", "{blocker}/sub"], "cannot create output directory"),
        (["--tiny", "--prompt", "x", "--mode", "t2av", "--checkpoint", "{t2v}", "--wan-dir", "{wan}"], "t2v model"),
    ],
)
def test_generate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    blocker = tmp_path / "blocker"
    blocker.write_text("a file, not a directory")
    subs = {"blocker": str(blocker)}
    if any("{t2v}" in a for a in argv):
        ckpt, wan = _write_t2v_weights(tmp_path / "weights")
        subs.update(t2v=str(ckpt), wan=str(wan))
        argv = [a for a in argv if a != "--tiny"]
    out = tmp_path / "out"
    argv = [a.format(**subs) for a in argv]
    if "--output-dir" not in argv:
        argv += ["--output-dir", str(out)]
    assert cli.main(["generate", *argv, "--steps", "1", "--quiet"]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert "ERROR" in err and err.count("\n") <= 3, err  # one clear line, no traceback
    assert re.search(message, err), err
    assert not out.exists() or list(out.iterdir()) == []  # nothing written


@pytest.mark.parametrize(
    ("flag", "value"), [("--backend", "warp-drive"), ("--backend", "ort"), ("--solver", "ddim")]
)
def test_engine_and_solver_vocabulary(flag: str, value: str, capsys: pytest.CaptureFixture[str]) -> None:
    """One vocabulary: --backend torch|onnxruntime|tensorrt and --solver euler|unipc, checked by argparse."""
    with pytest.raises(SystemExit) as exc:
        cli.main(["generate", "--tiny", "--prompt", "x", flag, value])
    assert exc.value.code == 2
    assert f"invalid choice: '{value}'" in capsys.readouterr().err


def test_subsystem_subcommands_are_registered(monkeypatch: pytest.MonkeyPatch) -> None:
    """export / build / bench come from their subsystems' register(); their parsers run that module's run()."""
    choices = cli.build_parser()._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    assert {"demo", "generate", "export", "build", "bench"} <= set(choices)

    fake = types.ModuleType("javisrt.bench.cli")

    def register(sub: argparse._SubParsersAction) -> None:
        sub.add_parser("bench").add_argument("--onnx")

    fake.register = register  # type: ignore[attr-defined]
    fake.run = lambda args: 0 if args.onnx == "x.onnx" else 1  # type: ignore[attr-defined]
    monkeypatch.setitem(sys.modules, "javisrt.bench.cli", fake)
    assert cli.main(["bench", "--onnx", "x.onnx"]) == 0
    assert cli.main(["bench", "--onnx", "y.onnx"]) == 1


def test_v01_demo_and_generate_tiny(tmp_path: Path) -> None:
    """`javisrt demo --model javisdit-v0.1` and `generate --model javisdit-v0.1 --tiny` write 24 fps MP4s."""
    out = tmp_path / "v01.mp4"
    assert cli.main(["demo", "--model", "javisdit-v0.1", "--out", str(out), "--steps", "2", "--quiet"]) == 0
    info = probe_mp4(out)
    assert (info.video_streams, info.audio_streams) == (1, 1) and info.fps == 24 and info.num_frames == 17
    argv = ["generate", "--model", "javisdit-v0.1", "--tiny", "--prompt", "a bird sings", "-o", str(tmp_path / "s"),
            "--num-frames", "17", "--height", "32", "--width", "32", "--steps", "2", "--quiet"]
    assert cli.main(argv) == 0
    info = probe_mp4(tmp_path / "s" / "sample_0000.mp4")
    assert info.fps == 24 and info.num_frames == 17 and (info.height, info.width) == (32, 32)


@pytest.mark.parametrize(
    ("flags", "size"),
    [([], (240, 426)), (["--resolution", "720p"], (720, 1280)), (["--resolution", "144p", "--aspect-ratio", "1:1"],
     (192, 192)), (["--aspect-ratio", "16:9"], (426, 240)), (["--height", "64", "--width", "96"], (64, 96))],
)  # fmt: skip
def test_v01_resolution_buckets(flags: list[str], size: tuple[int, int]) -> None:
    """--resolution/--aspect-ratio pick Open-Sora 1.2's bucket (numbers as in tests/test_v01_generation.py)."""
    args = cli.build_parser().parse_args(["generate", "--model", "javisdit-v0.1", "--prompt", "x", "--num-frames",
                                          "60", *flags])  # fmt: skip
    config = cli.v01_generation_config(args)
    assert (config.height, config.width, config.num_frames) == (*size, 60)


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--num-frames", "16", "--tiny"], ">= 17"),
        (["--resolution", "1080p", "--tiny"], "unknown v0.1 resolution"),
        (["--mode", "t2v", "--tiny"], "no video-only model"),
        (["--num-frames", "3s", "--tiny"], "unknown v0.1 frame count"),
        (["--negative-prompt", "x", "--tiny"], "no negative prompt"),
        (["--checkpoint", "/nonexistent/dit", "--t5-dir", "/x", "--audioldm2-dir", "/y"], "not found"),
        (["--t5-dir", "/x"], "needs --checkpoint"),
    ],
)
def test_v01_generate_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], message: str) -> None:
    base = ["generate", "--model", "javisdit-v0.1", "--prompt", "x", "-o", str(tmp_path), "--steps", "1", "--quiet"]
    assert cli.main([*base, *argv]) == cli.EXIT_ERROR
    assert message in capsys.readouterr().err
