"""Spawned gloo ranks on loopback for tests/test_parallel*.py, and the work they run.

:func:`run_ranks` starts ``world_size`` fresh Python processes (``spawn``), hosts the rendezvous store
in the test process (as torchrun's agent does, so a failing rank 0 takes no store down), waits at most
``timeout_s`` and kills whatever is left. Each rank runs ``target(rank, world_size, store_port, *args)``;
what it returns is saved to ``out_dir/rank{r}.pt``, an exception's message to ``out_dir/rank{r}.err``
(exit code 1). The workers below are module-level functions so that ``spawn`` can import them.
"""

from __future__ import annotations

import multiprocessing
import os
import time
import traceback
import zlib
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from javisrt.engine.config import JavisConfig

HOST = "127.0.0.1"
COLLECTIVE_TIMEOUT_S = 60.0  # far above any step here; the failure cases end by closed sockets, not by this


@dataclass(frozen=True)
class RankResult:
    rank: int
    exitcode: int | None  # None: killed after the time limit
    value: Any  # what the target returned (None on failure)
    error: str | None  # the exception's "Type: message" on failure


def _rank_main(target: Callable[..., Any], rank: int, world_size: int, port: int, out_dir: str, args: tuple) -> None:
    torch.set_num_threads(1)  # as torchrun sets OMP_NUM_THREADS=1: ranks share the cores
    try:
        value = target(rank, world_size, port, *args)
    except BaseException as exc:  # noqa: BLE001 - reported to the parent, then a non-zero exit
        Path(out_dir, f"rank{rank}.err").write_text(f"{type(exc).__name__}: {exc}\n\n{traceback.format_exc()}")
        os._exit(1)
    torch.save(value, Path(out_dir, f"rank{rank}.pt"))
    os._exit(0)  # skip interpreter teardown (and its process-group destructors): the result is saved


def run_ranks(
    world_size: int, target: Callable[..., Any], args: Sequence[Any], out_dir: Path, timeout_s: float = 120.0
) -> list[RankResult]:
    """Run ``target`` on ``world_size`` spawned ranks; returns every rank's result (never hangs)."""
    store = torch.distributed.TCPStore(HOST, 0, world_size, is_master=True, wait_for_workers=False)
    ctx = multiprocessing.get_context("spawn")
    procs = [
        ctx.Process(target=_rank_main, args=(target, r, world_size, store.port, str(out_dir), tuple(args)), daemon=True)
        for r in range(world_size)
    ]
    for p in procs:
        p.start()
    start = time.monotonic()
    for p in procs:
        p.join(max(0.0, timeout_s - (time.monotonic() - start)))
    results = []
    for r, p in enumerate(procs):
        if p.is_alive():
            p.kill()
            p.join()
            results.append(RankResult(r, None, None, "killed after the time limit"))
            continue
        err = Path(out_dir, f"rank{r}.err")
        res = Path(out_dir, f"rank{r}.pt")
        value = torch.load(res, weights_only=False) if res.exists() else None
        results.append(RankResult(r, p.exitcode, value, err.read_text() if err.exists() else None))
    del store
    return results


# ---- configs and inputs -------------------------------------------------------------------------


def hd128_config(num_heads: int, **overrides: Any) -> JavisConfig:
    """head_dim 128 (RoPE axes [44, 42, 42] as released), few heads and layers, small FFN/text."""
    fields: dict[str, Any] = dict(
        name=f"hd128x{num_heads}", dim=128 * num_heads, num_layers=2, num_heads=num_heads, ffn_dim=256,
        audio_ffn_dim=256, freq_dim=64, text_dim=32, text_len=16,
    )  # fmt: skip
    fields.update(overrides)
    return JavisConfig(**fields)


# Video latent [16, 3, 6, 10] -> grid 3x3x5 = 45 tokens; audio latent [8, 10, 16] -> grid 5x8 = 40 tokens.
# L = 85 is divisible by none of 2, 3, 4; the boundary (45) falls inside a slice for every K here.
VIDEO_SHAPE = (16, 3, 6, 10)
AUDIO_SHAPE = (8, 10, 16)
NUM_VIDEO_TOKENS, NUM_TOKENS = 45, 85


@dataclass(frozen=True)
class ForwardCase:
    """One forward on ranks 0..world-1 with ``--parallel spec`` (the other ranks sit it out)."""

    name: str
    world: int
    spec: str
    heads: int
    ops: str = "torch"
    layers: int = 2
    batch: int = 2
    numerics: str = "fp32"  # or "official": bf16 with fp32 islands

    def config(self) -> JavisConfig:
        return hd128_config(self.heads, num_layers=self.layers)

    def inputs(self) -> dict[str, torch.Tensor]:
        """Seeded engine inputs, the same on every rank; batch 2 stands for [cond; uncond]."""
        cfg = self.config()
        g = torch.Generator().manual_seed(1)
        return {
            "video": torch.randn((self.batch, *VIDEO_SHAPE), generator=g),
            "audio": torch.randn((self.batch, *AUDIO_SHAPE), generator=g),
            "timestep": torch.tensor([937.5, 412.25][: self.batch]),
            "context": torch.randn((self.batch, cfg.text_len, cfg.text_dim), generator=g),
        }


@dataclass(frozen=True)
class GenerationCase:
    """The 10-step t2av generation through JavisPipeline + the sampling loop on ranks 0..world-1."""

    name: str
    world: int
    spec: str
    heads: int

    def config(self) -> JavisConfig:
        return hd128_config(self.heads)


# ---- workers ------------------------------------------------------------------------------------


def parallel_worker(rank: int, world_size: int, port: int, cases: Sequence[ForwardCase | GenerationCase]) -> dict[str, Any]:
    """Every case this rank takes part in, one process group each (built, used, destroyed)."""
    from javisrt.engine.model import random_model
    from javisrt.runtime.backends import create_engine
    from javisrt.runtime.parallel import LaunchEnv, plan_for_launch, session

    base = torch.distributed.TCPStore(HOST, port, world_size, is_master=False)
    out: dict[str, Any] = {}
    for case in cases:
        if rank >= case.world:
            continue
        cfg = case.config()
        plan = plan_for_launch(case.spec, case.world, cfg.num_heads)
        store = torch.distributed.PrefixStore(case.name, base)
        with session(plan, LaunchEnv(rank, case.world, rank), "cpu", COLLECTIVE_TIMEOUT_S, store) as ctx:
            if isinstance(case, GenerationCase):
                pipe = generation_pipeline(cfg, torch.float32, ctx)
                out[case.name] = generate_latents(pipe)
            else:
                model = random_model(cfg, case.numerics, seed=0)
                engine = create_engine("torch", model=model, ops=case.ops, parallel=ctx)
                out[case.name] = engine_velocities(engine, case.inputs())
    return out


def failing_worker(rank: int, world_size: int, port: int, spec: str, failing_rank: int, fail_at: int) -> int:
    """Steps of the parallel torch engine; ``failing_rank`` raises at step ``fail_at`` while the others
    are inside that step's collectives, waiting for it."""
    from javisrt.engine.model import random_model
    from javisrt.runtime.backends import create_engine
    from javisrt.runtime.parallel import LaunchEnv, plan_for_launch, session

    case = ForwardCase("fail", world_size, spec, heads=2, layers=1, batch=2)
    cfg = case.config()
    plan = plan_for_launch(spec, world_size, cfg.num_heads)
    store = torch.distributed.TCPStore(HOST, port, world_size, is_master=False)
    with session(plan, LaunchEnv(rank, world_size, rank), "cpu", COLLECTIVE_TIMEOUT_S, store) as ctx:
        engine = create_engine("torch", model=random_model(cfg, seed=0), parallel=ctx)
        for step in range(fail_at + 2):
            if rank == failing_rank and step == fail_at:
                raise RuntimeError(f"injected failure at step {step}")
            engine_velocities(engine, case.inputs())
    return fail_at


class StubTextEncoder:
    """Seeded text embeddings per prompt (crc32-keyed): the pipeline's text stage without umT5."""

    def __init__(self, cfg: JavisConfig) -> None:
        self.dim, self.text_len = cfg.text_dim, cfg.text_len

    def encode(self, texts: Sequence[str]) -> Any:
        from javisrt.runtime.text import TextEmbedding

        rows = [torch.randn((1, self.text_len, self.dim), generator=torch.Generator().manual_seed(zlib.crc32(t.encode())))
                for t in texts]  # fmt: skip
        mask = torch.ones((len(texts), self.text_len), dtype=torch.long)
        mask[:, self.text_len - 3 :] = 0  # some padding, as real prompts have
        return TextEmbedding(torch.cat(rows), mask)


class LatentTap:
    """Stands in for both decoders: returns the final latents themselves (``result.frames`` / ``.waveform``)."""

    def decode(self, latent: torch.Tensor, num_samples: int | None = None) -> np.ndarray:
        return latent.numpy().copy()


GENERATION = dict(num_frames=33, height=48, width=80, steps=10, seed=7)  # 9x3x5 = 135 video + 224 audio = 359 tokens
PROMPT = "a dog barks twice at a passing train"


def generation_pipeline(cfg: JavisConfig, dtype: torch.dtype, parallel: Any = None) -> Any:
    from javisrt.engine.model import random_model
    from javisrt.runtime.backends import create_engine
    from javisrt.runtime.pipeline import JavisPipeline

    engine = create_engine("torch", model=random_model(cfg, seed=0).to(dtype), parallel=parallel)
    tap = LatentTap()
    return JavisPipeline(engine, StubTextEncoder(cfg), tap, tap)  # type: ignore[arg-type]


def engine_velocities(engine: Any, inputs: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """One CFG step of ``engine`` through a DenoiseSession (static inputs bound once), as copies."""
    from javisrt.runtime.denoise_session import DenoiseSession

    latents = {k: inputs[k] for k in ("video", "audio")}
    session = DenoiseSession(engine, inputs["context"], {k: v.shape[1:] for k, v in latents.items()})
    v, a = session([latents["video"], latents["audio"]], inputs["timestep"])
    return {"video_velocity": v.clone(), "audio_velocity": a.clone()}


def generate_latents(pipe: Any) -> tuple[torch.Tensor, torch.Tensor]:
    from javisrt.runtime.pipeline import GenerationConfig

    result = pipe(PROMPT, GenerationConfig(**GENERATION))
    return torch.from_numpy(result.frames), torch.from_numpy(result.waveform)
