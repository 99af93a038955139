"""``javisrt`` command line: ``demo``, ``generate``, ``export``, ``build``, ``bench``.

This module is the only place that reads argv; it builds a :class:`GenerationConfig` from the flags
and hands it to the library. Typed javisrt errors become one-line messages and exit code 2.

    javisrt demo [--out demo.mp4]                       tiny random weights, no files needed
    javisrt generate --checkpoint DIR --wan-dir DIR --audioldm2-dir DIR --prompt "..." [-o samples]
    javisrt generate --tiny --prompt-file prompts.csv   (csv: column ``text``, optional ``audio_text``, ``id``)
    torchrun --nproc_per_node N -m javisrt.runtime.cli generate ... [--parallel cfg=2,sp=K]   (runtime/parallel.py)
    javisrt generate --checkpoint JavisDiT-v0.1-jav/ --prior JavisDiT-v0.1-prior/ \
        --t5-dir t5-v1_1-xxl/ --imagebind imagebind_huge.pth --vae-dir OpenSora-VAE-v1.2/ \
        --audioldm2-dir audioldm2/ --num-frames 4s --prompt "..."   (v0.1: from the checkpoint's config.json)
    javisrt demo --model javisdit-v0.1                  tiny random JavisDiT v0.1 components
    javisrt export --checkpoint DIR --precision bf16|fp8 --flavor native|plugin --out DIR
    javisrt build --onnx DIR --out engine.plan          (TensorRT, GPU only)
    javisrt bench --backend torch|ort|trt [--compare BACKEND] [--pipeline]
    javisrt serve --tiny | --checkpoint DIR --wan-dir DIR ...   OpenAI Videos API (runtime/serve/)
"""

from __future__ import annotations

import argparse
import csv
import importlib
import importlib.util
import logging
import os
import re
import signal
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from javisrt.engine.config import GenerationMode
from javisrt.engine.errors import ConfigError, JavisError, LauncherStopped, UnavailableError

log = logging.getLogger("javisrt")

EXIT_ERROR = 2
EXIT_INTERRUPTED = 130


# ---- prompts ----------------------------------------------------------------------------------------
@dataclass(frozen=True)
class PromptItem:
    name: str  # output file stem
    text: str  # video / joint prompt (csv column ``text``)
    audio_text: str | None = None  # csv column ``audio_text`` (used in t2a, like JavisBench)

    def prompt_for(self, mode: GenerationMode) -> str:
        if mode is GenerationMode.T2A and self.audio_text:
            return self.audio_text
        return self.text


def _safe_stem(value: str) -> str:
    stem = re.sub(r"[^A-Za-z0-9._-]+", "_", value).strip("._")
    return stem[:100] or "sample"


def _read_prompt_csv(path: Path) -> list[tuple[str | None, str, str | None]]:
    """(id, text, audio_text) rows of a prompt csv; malformed csv (strict parsing) fails with the line."""
    rows: list[tuple[str | None, str, str | None]] = []
    header: list[str] | None = None
    with path.open(newline="", encoding="utf-8") as f:
        reader = csv.reader(f, strict=True)
        start = 1  # first line of the record being read
        try:
            for record in reader:
                if not record:  # blank line
                    pass
                elif header is None:
                    header = record
                    if "text" not in header:
                        raise ConfigError(f"{path}: a prompt csv needs a 'text' column, got {header}")
                else:
                    row = dict(zip(header, record))
                    rows.append((row.get("id") or None, row.get("text") or "", row.get("audio_text") or None))
                start = reader.line_num + 1
        except csv.Error as exc:
            reason = str(exc)
            if reason == "unexpected end of data":  # EOF inside a quoted field
                reason = "unterminated quote: a '\"' in the record starting on this line is never closed"
            raise ConfigError(f"{path}, line {start}: {reason}") from exc
    if header is None:
        raise ConfigError(f"{path}: a prompt csv needs a 'text' column, got an empty file")
    return rows


def read_prompts(prompts: Sequence[str], prompt_file: str | None, prefix: str = "sample") -> list[PromptItem]:
    """Prompts from ``--prompt`` (repeatable) or a .txt (one per line) / .csv (``text``[, ``audio_text``, ``id``]) file."""
    texts: list[tuple[str | None, str, str | None]] = [(None, p, None) for p in prompts]
    if prompt_file is not None:
        path = Path(prompt_file)
        if not path.is_file():
            raise ConfigError(f"prompt file not found: {path}")
        if path.suffix.lower() == ".csv":
            texts.extend(_read_prompt_csv(path))
        else:
            for line in path.read_text(encoding="utf-8").splitlines():
                if line.strip():
                    texts.append((None, line.strip(), None))
    if not texts:
        raise ConfigError("no prompts: give --prompt or --prompt-file")
    items = []
    for i, (ident, text, audio_text) in enumerate(texts):
        if not text.strip():
            raise ConfigError(f"prompt {i} is empty")
        items.append(PromptItem(_safe_stem(ident) if ident else f"{prefix}_{i:04d}", text, audio_text))
    names = [it.name for it in items]
    if len(set(names)) != len(names):
        raise ConfigError("prompt ids are not unique; output files would overwrite each other")
    return items


# ---- progress bars --------------------------------------------------------------------------------
class ProgressBars:
    """A tqdm bar per pipeline stage ("denoise" steps, "decode" modalities); silent when quiet."""

    def __init__(self, quiet: bool, label: str = "") -> None:
        self.quiet = quiet
        self.label = label
        self._bars: dict[str, Any] = {}

    def __call__(self, stage: str, done: int, total: int) -> None:
        if self.quiet or stage == "text":
            return
        from tqdm import tqdm

        bar = self._bars.get(stage)
        if bar is None:
            desc = f"{self.label} {stage}".strip()
            bar = self._bars[stage] = tqdm(total=total, desc=desc, unit="step" if stage == "denoise" else "stream",
                                           leave=False, file=sys.stderr)  # fmt: skip
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    def close(self) -> None:
        for bar in self._bars.values():
            bar.close()
        self._bars.clear()


# ---- argument parsing -----------------------------------------------------------------------------------
def _add_weights(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("weights (local directories; nothing is downloaded)")
    g.add_argument(
        "--checkpoint",
        help="DiT for --backend torch: official JavisDiT++ dir (model/ [+ lora/]), a Wan2.1 dir or a javisrt file",
    )
    g.add_argument("--wan-dir", help="Wan2.1 dir: vae/, text_encoder/, tokenizer/ (diffusers layout) or the original .pth files")
    g.add_argument("--audioldm2-dir", help="AudioLDM2 dir: vae/, vocoder/")
    g.add_argument("--config", help="network preset when the checkpoint does not say (e.g. javisdit-v1.0)")
    g.add_argument("--device", default="cpu", help="torch device for every component (default: cpu)")


MODELS = ("javisdit++", "javisdit-v0.1")


def add_model_flag(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--model", choices=MODELS, default=None,
        help="which family: javisdit++ (Wan2.1-based) or javisdit-v0.1 (Open-Sora-based VASTDiT3 + ST-prior); "
             "default: javisdit-v0.1 when --checkpoint is a v0.1 directory (its config.json names VASTDiT3), "
             "else javisdit++",
    )  # fmt: skip


def resolve_model(args: argparse.Namespace) -> str:
    """``args.model``, chosen from the checkpoint when not given; a JavisDiT++ run on a v0.1 checkpoint is
    refused here, before anything is loaded. Sets and returns ``args.model``."""
    from javisrt.engine.v01_checkpoint import is_v01_checkpoint

    checkpoint = getattr(args, "checkpoint", None)
    v01_dir = bool(checkpoint) and is_v01_checkpoint(checkpoint)
    if args.model is None:
        args.model = "javisdit-v0.1" if v01_dir else "javisdit++"
        if v01_dir:
            log.info("%s is a JavisDiT v0.1 checkpoint: --model javisdit-v0.1", checkpoint)
    elif args.model == "javisdit++" and v01_dir:
        raise ConfigError(f"--model javisdit++ but {checkpoint} is a JavisDiT v0.1 checkpoint (VASTDiT3): "
                          "drop --model or pass --model javisdit-v0.1")  # fmt: skip
    return str(args.model)


def add_v01_weight_flags(p: argparse.ArgumentParser, *, num_frames: bool = True) -> None:
    """The v0.1 component directories (``generate`` and ``serve``); ``num_frames``: also the clip length."""
    g = p.add_argument_group("JavisDiT v0.1 (--model javisdit-v0.1; --checkpoint and --audioldm2-dir as above)")
    g.add_argument("--prior", help="JavisDiT-v0.1-prior dir (config.json + model.safetensors); jav checkpoints")
    g.add_argument("--t5-dir", help="t5-v1_1-xxl dir: config.json, weights and tokenizer files")
    g.add_argument("--imagebind", help="imagebind_huge.pth (or its folder); only its text trunk is read; jav checkpoints")
    g.add_argument("--vae-dir", help="OpenSora-VAE-v1.2 dir (config.json + model.safetensors); jav checkpoints")
    if num_frames:
        g.add_argument("--num-frames", default="4s",
                       help="v0.1 clip length: 2s=51, 4s=102, 8s=204, 16s=408, 32s=816 (official names) or a frame "
                       "count at 24 fps (default 4s)")  # fmt: skip
    g.add_argument("--trained-gates", action="store_true",
                   help="load the checkpoint's trained video<->audio gates (the official inference leaves them at 0)")


def add_fp8_flags(g: argparse._ActionsContainer) -> None:
    """``--fp8-scales`` and ``--fp8-linear`` of the ``triton-fp8`` op set (generate, demo and serve)."""
    g.add_argument(
        "--fp8-scales", type=Path, default=None,
        help="--ops triton-fp8: the scales sidecar (default: CHECKPOINT.fp8-scales.safetensors next to the "
        "checkpoint; `javisrt export --checkpoint CHECKPOINT --fp8-scales` makes it)",
    )  # fmt: skip
    g.add_argument(
        "--fp8-linear", choices=["scaled_mm", "triton"], default=None,
        help="--ops triton-fp8: how the attention q/k/v/o Linears run in e4m3. scaled_mm: a Triton activation-"
        "quantization launch, then torch._scaled_mm (cuBLASLt); triton: one Triton FP8 GEMM that quantizes the "
        "activation in its prologue (kernels/fp8_linear.py). Default scaled_mm (bench/gpu_proof.py part 2 times both)",
    )  # fmt: skip


def check_v01_engine_flags(args: argparse.Namespace) -> None:
    """v0.1 runs the eager torch engine with the torch op set and reads its own component flags (generate
    and serve): the engine and JavisDiT++ flags are refused rather than ignored."""
    if args.backend != "torch" or args.engine_file or args.ops != "torch" or args.fp8_scales or args.fp8_linear:
        raise NotImplementedError("javisdit-v0.1 runs on the eager torch engine with the torch op set only "
                                  "(no compiled v0.1 graph, no triton op set for VASTDiT3 yet)")  # fmt: skip
    if args.wan_dir or args.config:
        raise ConfigError("--wan-dir and --config are JavisDiT++ flags; javisdit-v0.1 reads --t5-dir, --vae-dir, ...")


def check_tiny_fp8(args: argparse.Namespace) -> None:
    """The tiny random preset cannot run ``triton-fp8``: refuse its flags rather than ignore them."""
    if args.ops == "triton-fp8" or args.fp8_scales is not None or args.fp8_linear is not None:
        raise ConfigError("--ops triton-fp8 runs a calibrated checkpoint: the tiny preset's head_dim 32 is below "
                          "the e4m3 attention kernel's 64 (bench/fp8_fidelity.py measures FP8 on small configs)")


def _add_engine(p: argparse.ArgumentParser) -> None:
    # Imported here, not at the top: it imports torch, which a torchrun rank must only do once its
    # SIGTERM handler is installed (see main); the parser is built after that.
    from javisrt.runtime.backends import ENGINES

    g = p.add_argument_group("DiT engine")
    g.add_argument(
        "--backend", choices=ENGINES, default="torch",
        help="torch: the eager network from --checkpoint (every mode); onnxruntime / tensorrt: the compiled "
        "--engine-file, whose metadata gives the network and the one mode it was exported for (default: torch)",
    )  # fmt: skip
    g.add_argument(
        "--engine-file",
        help="compiled DiT for --backend onnxruntime (.onnx from `javisrt export`) or tensorrt (.plan from `javisrt build`)",
    )
    g.add_argument(
        "--ops", default="torch",
        help="op set of the torch engine: torch (any device), triton (CUDA) or triton-fp8 (CUDA: the e4m3 kernels "
        "with calibrated scales, see --fp8-scales; head_dim >= 64, so not the tiny preset)",
    )  # fmt: skip
    add_fp8_flags(g)
    g.add_argument(
        "--loop", choices=["auto", "host", "device"], default="auto",
        help="sampling loop: device (CUDA: latents stay in the engine's device buffers, one CUDA graph per "
        "shape bucket replayed each step), host (numpy hand-off each step; the CPU path) or auto (device on "
        "a CUDA --device, host elsewhere; default)",
    )  # fmt: skip
    g.add_argument(
        "--no-cuda-graphs", dest="cuda_graphs", action="store_false", default=None,
        help="on CUDA, run the DiT step eagerly (the device loop enqueues it each step) instead of replaying "
        "a captured CUDA graph",
    )  # fmt: skip


def _add_request(p: argparse.ArgumentParser, *, frames: int, steps: int, seed: int) -> None:
    g = p.add_argument_group("request")
    g.add_argument("--frames", type=int, default=frames, help=f"frames at 16 fps, 4n+1 in 33..81 (default {frames})")
    g.add_argument("--resolution", default="240p", help="bucket: 144p, 240p, 360p, 480p; javisdit-v0.1 also 720p (default 240p)")
    g.add_argument("--aspect-ratio", default="9:16", help="bucket H:W key, reference naming: 9:16 = landscape (default)")
    g.add_argument("--height", type=int, help="explicit height (with --width; overrides the bucket)")
    g.add_argument("--width", type=int, help="explicit width (with --height)")
    g.add_argument("--steps", type=int, help=f"sampling steps (default {steps}; javisdit-v0.1: 30)")
    g.add_argument("--guidance", type=float, help="CFG scale, both modalities (default 5.0; javisdit-v0.1: 7.0)")
    g.add_argument("--audio-guidance", type=float, help="CFG scale for audio (default: --guidance)")
    g.add_argument("--seed", type=int, default=seed, help=f"noise seed; prompt i of a file uses seed + i (default {seed})")
    g.add_argument("--mode", choices=[m.value for m in GenerationMode], default="t2av", help="what to generate (default t2av)")
    g.add_argument("--negative-prompt", help="unconditional text (default: the released negative prompt)")
    _add_solver(g)


def _add_solver(g: Any) -> None:
    from javisrt.runtime.sampling import Solver  # imports torch: see _add_engine

    g.add_argument(
        "--solver", choices=[s.value for s in Solver],
        help="sampling loop: euler (JavisDiT++'s released rflow sampler) or unipc (Wan2.1's flow UniPC); "
        "default: the model's own (euler for JavisDiT++, unipc for the Wan2.1 T2V preset)",
    )  # fmt: skip


def _add_output(p: argparse.ArgumentParser) -> None:
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bars, warnings and errors only")
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="javisrt", description="JavisDiT++ inference: text -> video with audio")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    sub.required = True

    demo = sub.add_parser("demo", help="run the whole pipeline with tiny random weights and write demo.mp4")
    demo.add_argument("--out", default="demo.mp4", help="output MP4 (default ./demo.mp4)")
    demo.add_argument("--prompt", help="prompt (default: a fixed demo prompt)")
    demo.add_argument("--seed", type=int, default=42, help="noise seed (default 42)")
    demo.add_argument("--steps", type=int, help="sampling steps (default: 20 tiny, 50 with real weights)")
    demo.add_argument("--frames", type=int, help="frames, 4n+1 in 33..81 (default: 33 tiny, 65 with real weights)")
    demo.add_argument("--mode", choices=[m.value for m in GenerationMode], default="t2av", help="what to generate (default t2av)")
    add_model_flag(demo)
    _add_solver(demo)
    _add_weights(demo)
    _add_engine(demo)
    _add_output(demo)
    demo.set_defaults(func=cmd_demo)

    gen = sub.add_parser("generate", help="generate MP4s for prompts")
    src = gen.add_mutually_exclusive_group(required=True)
    src.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    src.add_argument("--prompt-file", help=".txt (one prompt per line) or .csv (text[, audio_text, id])")
    gen.add_argument("-o", "--output-dir", default="samples", help="output directory (default ./samples)")
    gen.add_argument("--name-prefix", default="sample", help="file names: PREFIX_0000.mp4 ... (csv 'id' wins)")
    gen.add_argument("--skip-existing", action="store_true", help="skip prompts whose MP4 already exists")
    gen.add_argument("--tiny", action="store_true", help="use the tiny random-weight pipeline (no weights needed)")
    par = gen.add_argument_group("several processes (launch with torchrun --nproc_per_node N)")
    par.add_argument(
        "--parallel", metavar="cfg=C,sp=K",
        help="compute each video on C*K ranks (must equal the world size): cfg=2 splits the CFG batch, sp=K "
        "(dividing the head count) splits the token sequence; torch backend only. Without it, torchrun's "
        "ranks split the prompt list (data parallel)",
    )  # fmt: skip
    par.add_argument(
        "--dist-timeout", type=float, default=600.0, metavar="SECONDS",
        help="longest wait of a rank in a collective before it gives up with an error (default 600)",
    )  # fmt: skip
    add_model_flag(gen)
    _add_weights(gen)
    add_v01_weight_flags(gen)
    _add_engine(gen)
    _add_request(gen, frames=65, steps=50, seed=42)
    _add_output(gen)
    gen.set_defaults(func=cmd_generate)

    _register_subcommands(sub)
    return parser


# Subcommands that live with their subsystem: each module has register(subparsers) and run(args).
SUBCOMMAND_MODULES = (
    "javisrt.runtime.export_cli", "javisrt.export.trt_cli", "javisrt.bench.cli", "javisrt.runtime.serve.cli",
)  # fmt: skip


def _register_subcommands(sub: Any) -> None:
    """Add ``export`` / ``build`` / ``bench``; a parser without its own ``func`` runs its module's ``run``."""
    for name in SUBCOMMAND_MODULES:
        module = importlib.import_module(name)
        before = set(sub.choices)
        module.register(sub)
        for command in set(sub.choices) - before:
            parser = sub.choices[command]
            if parser.get_default("func") is None:
                parser.set_defaults(func=module.run)


# ---- commands --------------------------------------------------------------------------------------------
def generation_config(args: argparse.Namespace) -> Any:
    """The frozen GenerationConfig for the request flags."""
    from javisrt.runtime.pipeline import GenerationConfig
    from javisrt.runtime.text import NEGATIVE_PROMPT

    video_guidance = 5.0 if args.guidance is None else args.guidance
    guidance = video_guidance if args.audio_guidance is None else (video_guidance, args.audio_guidance)
    return GenerationConfig(
        num_frames=args.frames,
        resolution=args.resolution,
        aspect_ratio=args.aspect_ratio,
        height=args.height,
        width=args.width,
        steps=50 if args.steps is None else args.steps,
        guidance=guidance,
        seed=args.seed,
        mode=args.mode,
        negative_prompt=NEGATIVE_PROMPT if args.negative_prompt is None else args.negative_prompt,
        solver=args.solver,
    )


def _load_pipeline(args: argparse.Namespace, tiny: bool, device: Any = None, parallel: Any = None) -> Any:
    """The pipeline of the flags; ``device`` overrides --device and ``parallel`` (a ParallelContext of a
    --parallel launch) runs the torch engine's forward over the ranks."""
    from javisrt.runtime.demo import build_tiny_pipeline
    from javisrt.runtime.pipeline import JavisPipeline

    device = args.device if device is None else device
    if args.backend == "torch" and args.engine_file:
        raise ConfigError("--engine-file is for --backend onnxruntime or tensorrt; the torch engine runs --checkpoint")
    if args.backend != "torch" and args.checkpoint:
        raise ConfigError(f"--backend {args.backend} runs --engine-file, which carries its weights; drop --checkpoint")
    if tiny:
        if args.checkpoint or args.wan_dir or args.audioldm2_dir:
            raise ConfigError("--tiny uses random weights; do not combine it with --checkpoint/--wan-dir/--audioldm2-dir")
        check_tiny_fp8(args)
        return build_tiny_pipeline(
            backend=args.backend, engine_file=args.engine_file, ops=args.ops, device=device, parallel=parallel,
            loop=args.loop, cuda_graphs=args.cuda_graphs,
        )  # fmt: skip
    if args.backend == "torch" and not args.checkpoint:
        raise ConfigError("real weights need --checkpoint (or --engine-file with a compiled backend), or use --tiny")
    if not args.wan_dir:
        raise ConfigError("real weights need --wan-dir (and --audioldm2-dir for audio); or use --tiny")
    return JavisPipeline.from_pretrained(
        args.checkpoint,
        args.wan_dir,
        args.audioldm2_dir,
        config=args.config,
        device=device,
        backend=args.backend,
        engine_file=args.engine_file,
        ops=args.ops,
        fp8_scales=args.fp8_scales,
        fp8_linear=args.fp8_linear,
        parallel=parallel,
        loop=args.loop,
        cuda_graphs=args.cuda_graphs,
    )


def _num_heads(args: argparse.Namespace) -> int:
    """Attention heads of the network the flags name, known before any weights are read: the tiny preset,
    --config, else the presets the loader picks from (12 heads; a javisrt file's own config is checked
    again once loaded, by the parallel backend)."""
    from javisrt.engine.config import JavisConfig
    from javisrt.runtime.demo import TINY_PRESET

    return JavisConfig.from_name(TINY_PRESET if args.tiny else args.config or "javisdit-v1.0").num_heads
def v01_generation_config(args: argparse.Namespace) -> Any:
    """The v0.1 request for the flags (official defaults: 240p 9:16 = 240x426, "4s", 30 steps, CFG 7, seed 42)."""
    from javisrt.runtime.v01_generation import v01_image_size
    from javisrt.runtime.v01_pipeline import V01GenerationConfig, parse_num_frames

    if args.audio_guidance is not None or args.negative_prompt is not None or args.solver is not None:
        raise ConfigError("javisdit-v0.1 has one CFG scale, no negative prompt (learned null caption) and the rflow loop: "
                          "drop --audio-guidance/--negative-prompt/--solver")
    if (args.height is None) != (args.width is None):
        raise ConfigError("give both --height and --width, or neither (the --resolution/--aspect-ratio bucket)")
    height, width = (args.height, args.width) if args.height is not None else v01_image_size(args.resolution, args.aspect_ratio)
    given = {k: v for k, v in (("steps", args.steps), ("guidance", args.guidance)) if v is not None}
    return V01GenerationConfig(num_frames=parse_num_frames(args.num_frames), height=height, width=width,
                               seed=args.seed, **given)  # fmt: skip


def load_v01_pipeline(
    args: argparse.Namespace, *, tiny: bool, device: Any, mode: GenerationMode | None = None, text_cache: Any = None
) -> Any:
    """The v0.1 pipeline of the weight flags (``generate`` and ``serve``); ``mode`` None: the checkpoint's
    (tiny: t2av), else it must be the checkpoint's."""
    from javisrt.runtime.v01_demo import build_tiny_v01_pipeline
    from javisrt.runtime.v01_pipeline import V01Pipeline

    check_v01_engine_flags(args)
    if mode is GenerationMode.T2V:
        raise ConfigError("javisdit-v0.1 has no video-only model: use --mode t2av (-jav) or t2a (-audio)")
    if tiny:
        if any((args.checkpoint, args.prior, args.t5_dir, args.imagebind, args.vae_dir, args.audioldm2_dir)):
            raise ConfigError("--tiny uses random weights; do not combine it with weight directories")
        if str(device) != "cpu":
            raise ConfigError("the tiny v0.1 pipeline is built on the CPU; use --device cpu")
        return build_tiny_v01_pipeline(audio_only=mode is GenerationMode.T2A, text_cache=text_cache)
    for flag, value in (("--checkpoint", args.checkpoint), ("--t5-dir", args.t5_dir), ("--audioldm2-dir", args.audioldm2_dir)):
        if not value:
            raise ConfigError(f"javisdit-v0.1 with real weights needs {flag} (or use --tiny)")
    pipe = V01Pipeline.from_pretrained(
        args.checkpoint, t5_dir=args.t5_dir, audioldm2_dir=args.audioldm2_dir, prior=args.prior,
        imagebind=args.imagebind, vae_dir=args.vae_dir, device=device, trained_gates=args.trained_gates,
        text_cache=text_cache,
    )  # fmt: skip
    if mode is not None and mode is not pipe.mode:
        kind = "video+audio (t2av)" if pipe.has_video else "audio-only (t2a)"
        raise ConfigError(f"--mode {mode.value} does not fit the {kind} checkpoint {args.checkpoint}")
    return pipe


def _generate_v01(args: argparse.Namespace, items: list[Any], out_dir: Path) -> int:
    from dataclasses import replace

    config = v01_generation_config(args)
    pipe = load_v01_pipeline(args, tiny=args.tiny, device=args.device, mode=GenerationMode(args.mode))
    mode = pipe.mode
    for n, (i, item, path) in enumerate(items):
        bars = ProgressBars(args.quiet, label=f"[{n + 1}/{len(items)}]")
        try:
            result = pipe(item.prompt_for(mode), replace(config, seed=config.seed + i), progress=bars)
        finally:
            bars.close()
        result.save(path)
        log.info("[%d/%d] %s", n + 1, len(items), path)
    return 0


def cmd_generate(args: argparse.Namespace) -> int:
    from javisrt.runtime import parallel
    from javisrt.runtime.media import check_writable_dir

    if resolve_model(args) == "javisdit-v0.1":
        v01_generation_config(args)  # bad flags fail before any file is touched
    else:
        config = generation_config(args)
    items = read_prompts(args.prompt, args.prompt_file, args.name_prefix)
    launch = parallel.LaunchEnv.from_environ(os.environ)  # torchrun's RANK / WORLD_SIZE / LOCAL_RANK
    plan = parallel.plan_for_launch(args.parallel, launch.world_size, _num_heads(args))  # before any model
    if plan.model_parallel > 1 and args.backend != "torch":
        raise ConfigError(f"--parallel runs the eager torch backend (op-set wrappers), not --backend {args.backend}")
    out_dir = Path(args.output_dir)
    check_writable_dir(out_dir)
    with parallel.session(plan, launch, args.device, args.dist_timeout) as ctx:
        todo = []
        for i, item in ctx.share(list(enumerate(items))):  # data parallel: every world_size-th prompt
            path = out_dir / f"{item.name}.mp4"
            if args.skip_existing and path.exists():
                log.info("skip %s (exists)", path)
                continue
            todo.append((i, item, path))
        if not todo:
            log.info("nothing to do: all %d outputs exist", len(items))
            return 0
        if args.model == "javisdit-v0.1":
            if ctx.distributed:
                raise NotImplementedError("javisdit-v0.1 under torchrun (data or model parallel) is not implemented")
            return _generate_v01(args, todo, out_dir)
        pipe = _load_pipeline(args, args.tiny, ctx.device, ctx if plan.model_parallel > 1 else None)
        pipe.check(config)  # mode vs checkpoint before any work
        mode = GenerationMode(config.mode)
        rank = f"rank {ctx.rank}: " if ctx.distributed else ""
        for n, (i, item, path) in enumerate(todo):
            bars = ProgressBars(args.quiet or not ctx.writes_outputs, label=f"{rank}[{n + 1}/{len(todo)}]")
            try:
                result = pipe(item.prompt_for(mode), config, progress=bars, seed=config.seed + i)
            finally:
                bars.close()
            if ctx.writes_outputs:  # model parallel: every rank holds the same result, rank 0 writes it
                result.save(path)
                log.info("%s[%d/%d] wrote %s", rank, n + 1, len(todo), path)
    return 0


def _demo_v01(args: argparse.Namespace) -> int:
    from javisrt.runtime.demo import DEMO_PROMPT
    from javisrt.runtime.media import check_writable_dir
    from javisrt.runtime.v01_demo import build_tiny_v01_pipeline, v01_demo_config

    if args.checkpoint or args.wan_dir or args.audioldm2_dir or args.engine_file:
        raise ConfigError("`demo --model javisdit-v0.1` runs tiny random components; for real weights use "
                          "`javisrt generate --model javisdit-v0.1 ...`")
    if args.solver is not None:
        raise ConfigError("javisdit-v0.1 samples with its rflow loop: drop --solver")
    out = Path(args.out)
    check_writable_dir(out.parent if str(out.parent) else Path("."))
    given = {k: v for k, v in (("steps", args.steps), ("num_frames", args.frames)) if v is not None}
    config = v01_demo_config(seed=args.seed, **given)
    pipe = build_tiny_v01_pipeline(audio_only=GenerationMode(args.mode) is GenerationMode.T2A)
    if GenerationMode(args.mode) is GenerationMode.T2V:
        raise ConfigError("javisdit-v0.1 has no video-only model: use --mode t2av or t2a")
    bars = ProgressBars(args.quiet, label="demo")
    try:
        result = pipe(args.prompt or DEMO_PROMPT, config, progress=bars)
    finally:
        bars.close()
    path = result.save(out)
    stages = ", ".join(f"{k[:-2]} {v:.2f} s" for k, v in result.timings.items())
    print(f"wrote {path.resolve()}\n  JavisDiT v0.1 (tiny random weights), {config.num_frames} frames at 24 fps; {stages}")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from javisrt.runtime.demo import DEMO_PROMPT, demo_config, run_demo
    from javisrt.runtime.pipeline import GenerationConfig

    if resolve_model(args) == "javisdit-v0.1":
        return _demo_v01(args)
    real = bool(args.checkpoint or args.wan_dir or args.audioldm2_dir or (args.engine_file and args.wan_dir))
    given = {k: v for k, v in (("steps", args.steps), ("num_frames", args.frames)) if v is not None}
    if real:  # the released defaults (240p 9:16, 65 frames, 50 steps) unless overridden
        pipe = _load_pipeline(args, tiny=False)
        config = GenerationConfig(seed=args.seed, mode=args.mode, solver=args.solver, **given)
    else:
        pipe = _load_pipeline(args, tiny=True)
        config = demo_config(seed=args.seed, mode=args.mode, solver=args.solver, **given)
    bars = ProgressBars(args.quiet, label="demo")
    try:
        report = run_demo(args.out, pipeline=pipe, config=config, prompt=args.prompt or DEMO_PROMPT, progress=bars)
    finally:
        bars.close()
    print(report.describe(real_weights=real))  # the command's user-facing output, not a log line
    return 0


# ---- entry ---------------------------------------------------------------------------------------------
def _setup_logging(quiet: bool, verbose: bool) -> None:
    level = logging.DEBUG if verbose else logging.WARNING if quiet else logging.INFO
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("%(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("javisrt")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
    if quiet:  # third-party "Loading weights" bars
        import diffusers.utils.logging as diffusers_logging
        import transformers.utils.logging as transformers_logging

        diffusers_logging.disable_progress_bar()
        transformers_logging.disable_progress_bar()


_STOPPED_BY_LAUNCHER = "stopped by the launcher (SIGTERM): another rank exited first"


_launcher_stop = {"seen": False}  # this process got the launcher's SIGTERM


def _stop_on_sigterm(signum: int, frame: Any) -> None:
    """torchrun's agent sends SIGTERM to every rank once one exits: raise, so the rank reports why."""
    _launcher_stop["seen"] = True
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    raise LauncherStopped(_STOPPED_BY_LAUNCHER)


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    """After this rank's error is logged, a (further) SIGTERM exits with the error code at once."""
    _exit_rank(EXIT_ERROR)


def _exit_rank(code: int) -> None:
    """A failed rank leaves at once: Python handlers do not run during interpreter teardown, so
    torchrun's SIGTERM (sent once another rank has exited) would end it with -15 instead of ``code``."""
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # one of several ranks (torchrun)
        signal.signal(signal.SIGTERM, _stop_on_sigterm)
        barrier = None
        try:
            from javisrt.runtime.parallel import STARTUP_WAIT_S, StartupBarrier  # imports torch: after the handler

            barrier = StartupBarrier.join(os.environ)
            code = _main(argv)
        except Exception:
            # The launcher's SIGTERM can land inside an import (torch registering its ops), where the
            # LauncherStopped it raises resurfaces as another exception type: still this rank's stop.
            if signal.getsignal(signal.SIGTERM) is not _exit_on_sigterm:
                raise
            log.debug("traceback", exc_info=True)
            log.error("%s", _STOPPED_BY_LAUNCHER)
            code = EXIT_ERROR
        if code:
            if barrier is not None and not _launcher_stop["seen"] and not barrier.wait():
                log.warning("exiting before every peer rank finished starting (waited %.0f s)", STARTUP_WAIT_S)
            _exit_rank(code)
        return code
    return _main(argv)


def _main(argv: list[str]) -> int:
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("-q", "--quiet", action="store_true")
    pre.add_argument("-v", "--verbose", action="store_true")
    known, _ = pre.parse_known_args(argv)
    _setup_logging(known.quiet, known.verbose)
    try:  # parsing too: building the parser imports torch, during which a rank may get the launcher's SIGTERM
        args = build_parser().parse_args(argv)
        func: Callable[[argparse.Namespace], int] = args.func
        return int(func(args) or 0)
    except (JavisError, NotImplementedError) as exc:
        if signal.getsignal(signal.SIGTERM) is _stop_on_sigterm:
            signal.signal(signal.SIGTERM, _exit_on_sigterm)
        log.debug("traceback", exc_info=True)
        log.error("%s", exc)
        return EXIT_ERROR
    except KeyboardInterrupt:
        log.error("interrupted")
        return EXIT_INTERRUPTED


if __name__ == "__main__":
    sys.exit(main())
