"""CFG-parallel and Ulysses sequence parallel (engine/sequence_parallel.py, runtime/parallel.py,
runtime/backends/torch_parallel.py) against the single-process model, on spawned gloo ranks.

One launch of 4 ranks (tests/_parallel_harness.py) runs every multi-rank case, each with its own
process group: forwards with sp = 2, 3, 4, cfg = 2, cfg = 2 x sp = 2 (torch op set; sp = 2 also with
the triton op set under the interpreter, and with the official bf16 numerics) on a joint sequence of
85 tokens that no K divides, and a 10-step t2av generation with cfg = 2, sp = 2 through JavisPipeline
and the C++ sampling loop.

Tolerance (derived, shared/style.md lesson 7): the reference is the same model in float64
(``fp64``; only RoPE, which the op seam computes in fp32 by design, stays fp32). The single-process
fp32 forward's own error ``e1 = max|fp32 - fp64|`` measures what fp32 rounding does to this forward.
A parallel forward runs the same ops in fp32, only with other reduction orders (GEMMs over fewer rows,
attention over fewer heads per call, the CFG halves as separate batches), so it must satisfy
``max|parallel - fp64| <= 2 * e1 + noise_floor(fp64)``. (The bf16 case: e1 is the single-process
bf16 forward's error against its own weights in float64.) The same rule holds the generation's final
latents (fp32 pipeline vs the fp64-DiT pipeline, both with the fp32 sampling loop). A wrong RoPE
slice, boundary or head split moves outputs by O(1), far beyond this.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
from _parallel_harness import (
    NUM_TOKENS,
    NUM_VIDEO_TOKENS,
    ForwardCase,
    GenerationCase,
    failing_worker,
    generate_latents,
    generation_pipeline,
    parallel_worker,
    run_ranks,
)
from _tolerance import assert_within, max_err, noise_floor

from javisrt.engine.errors import ConfigError, DistributedError, LauncherStopped
from javisrt.engine.model import random_model
from javisrt.engine.ops import FFNWeights, Modulation, TorchOps, modality_ffn_ref
from javisrt.engine.sequence_parallel import SequenceParallelOps, SequenceShard
from javisrt.runtime.parallel import LaunchEnv, ParallelContext, ParallelPlan, plan_for_launch

FORWARD_CASES = [
    ForwardCase("sp2", world=2, spec="sp=2", heads=4),
    ForwardCase("sp4", world=4, spec="sp=4", heads=4),
    ForwardCase("sp3", world=3, spec="sp=3", heads=3),  # boundary 45 inside rank 1's slice [29, 58)
    ForwardCase("cfg2", world=2, spec="cfg=2", heads=4),
    ForwardCase("cfg2_sp2", world=4, spec="cfg=2,sp=2", heads=4),
    ForwardCase("sp2_triton", world=2, spec="sp=2", heads=2, ops="triton", layers=1, batch=1),
    ForwardCase("sp2_official_bf16", world=2, spec="sp=2", heads=4, numerics="official"),
]
GENERATION_CASE = GenerationCase("generation_cfg2_sp2", world=4, spec="cfg=2,sp=2", heads=2)
WORLD = 4
LAUNCH_TIMEOUT_S = 150.0


@pytest.fixture(scope="module", autouse=True)
def one_thread() -> Iterator[None]:
    """The references here are small: one thread is faster, and on shared cores two OpenMP threads
    were measured 10x slower (spinning against the spawned ranks and other load)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def launched(tmp_path_factory: pytest.TempPathFactory) -> dict[str, list[Any]]:
    """case name -> the value of every rank that ran it (rank order)."""
    out_dir = tmp_path_factory.mktemp("ranks")
    results = run_ranks(WORLD, parallel_worker, ([*FORWARD_CASES, GENERATION_CASE],), out_dir, LAUNCH_TIMEOUT_S)
    failed = [f"rank {r.rank} (exit {r.exitcode}): {r.error}" for r in results if r.exitcode != 0]
    assert not failed, "\n".join(failed)
    by_case: dict[str, list[Any]] = {}
    for case in [*FORWARD_CASES, GENERATION_CASE]:
        by_case[case.name] = [results[r].value[case.name] for r in range(case.world)]
    return by_case


@functools.cache  # cases with equal config and inputs share their references
def _single_process(case: ForwardCase, fp64: bool, ops: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The case on one process in its own numerics, or (``fp64``) its weights computed in float64."""
    model = random_model(case.config(), case.numerics, seed=0).set_ops(ops)
    inputs = case.inputs()
    if fp64:
        model = model.to(torch.float64)
        inputs = {k: v.double() if v.is_floating_point() else v for k, v in inputs.items()}
    with torch.inference_mode():
        video, audio = model(inputs["video"], inputs["audio"], inputs["timestep"], inputs["context"])
    assert video is not None and audio is not None
    return video, audio


@pytest.mark.parametrize("case", FORWARD_CASES, ids=lambda c: c.name)
def test_forward_matches_single_process(launched: dict[str, list[Any]], case: ForwardCase) -> None:
    ranks = launched[case.name]
    single = dataclasses.replace(case, name="single", world=1, spec="", ops="torch")  # the cache key
    own = _single_process(single, False, case.ops)  # in the case's own numerics and op set
    fp64 = _single_process(single, True, "torch")
    for i, name in enumerate(("video_velocity", "audio_velocity")):
        for r, out in enumerate(ranks[1:], start=1):
            assert torch.equal(out[name], ranks[0][name]), f"{name}: rank {r} differs from rank 0"
        tol = 2 * max_err(own[i], fp64[i]) + noise_floor(fp64[i])
        print(f"{case.name} {name}: parallel err {max_err(ranks[0][name], fp64[i]):.3e}, single-process err "
              f"{max_err(own[i], fp64[i]):.3e}, atol {tol:.3e}")  # fmt: skip
        assert_within(ranks[0][name], fp64[i], tol, f"{case.name} {name}")


def test_generation_matches_single_process_and_ranks_are_identical(launched: dict[str, list[Any]]) -> None:
    """10 steps t2av, cfg=2 x sp=2: the latents every rank holds are bit-identical (torch.equal), and
    within the derived tolerance of the single-process generation."""
    ranks = launched[GENERATION_CASE.name]
    for r, (video, audio) in enumerate(ranks[1:], start=1):
        assert torch.equal(video, ranks[0][0]) and torch.equal(audio, ranks[0][1]), f"rank {r}'s latents differ"
    cfg = GENERATION_CASE.config()
    fp32 = generate_latents(generation_pipeline(cfg, torch.float32))
    fp64 = generate_latents(generation_pipeline(cfg, torch.float64))
    for par, single, ref, name in zip(ranks[0], fp32, fp64, ("video", "audio"), strict=True):
        tol = 2 * max_err(single, ref) + noise_floor(ref)
        print(f"generation {name}: parallel err {max_err(par, ref):.3e}, single fp32 err {max_err(single, ref):.3e}")
        assert_within(par, ref, tol, f"generation {name} latents")


def test_rank_raising_mid_step_stops_every_rank_naming_it(tmp_path: Path) -> None:
    """Rank 0 raises inside step 1 while rank 1 waits in that step's all-to-all: both exit non-zero
    within seconds, each with an error naming rank 0."""
    results = run_ranks(2, failing_worker, ("sp=2", 0, 1), tmp_path, timeout_s=90.0)
    for r in results:
        assert r.exitcode not in (0, None), f"rank {r.rank}: exit {r.exitcode}"
        assert r.error is not None and r.error.startswith("DistributedError: rank 0 failed (RuntimeError: injected"), r.error
    assert "rank 1 stopped" in (results[1].error or "")


# ---- no processes needed -------------------------------------------------------------------------


@pytest.mark.parametrize("degree", [2, 3, 4, 6])
def test_shards_cover_the_sequence_once(degree: int) -> None:
    shards = [SequenceShard(r, degree, NUM_TOKENS) for r in range(degree)]
    rows = [i for s in shards for i in range(s.start, s.start + s.valid)]
    assert rows == list(range(NUM_TOKENS))
    assert sum(s.local_video_tokens(NUM_VIDEO_TOKENS) for s in shards) == NUM_VIDEO_TOKENS
    assert all(s.length == shards[0].length and s.padded_tokens >= NUM_TOKENS for s in shards)
    straddling = [s.rank for s in shards if 0 < s.local_video_tokens(NUM_VIDEO_TOKENS) < s.valid]
    assert straddling == ([] if NUM_VIDEO_TOKENS % shards[0].length == 0 else [NUM_VIDEO_TOKENS // shards[0].length])


def test_shard_of_padding_only() -> None:
    """L = 5 on 4 ranks: slices of 2, the last holds no real token and still takes part."""
    last = SequenceShard(3, 4, 5)
    assert (last.start, last.valid, last.local_video_tokens(3)) == (6, 0, 0)
    x = torch.randn(1, 5, 8)
    assert last.take(x).shape == (1, 2, 8) and not last.take(x).any()
    cos, sin = last.rope(torch.rand(5, 4), torch.rand(5, 4))
    assert torch.equal(cos, torch.ones(2, 4)) and torch.equal(sin, torch.zeros(2, 4))


@pytest.mark.parametrize("degree", [2, 3, 4])
def test_modality_ffn_boundary_per_slice(degree: int) -> None:
    """Each slice's FFN (all video, all audio, straddling) equals that slice of the whole-sequence FFN
    (within the derived fp32 tolerance: a GEMM over fewer rows may round differently); the padding rows
    pass through untouched."""
    d, f = 16, 32
    g = torch.Generator().manual_seed(0)

    def weights() -> FFNWeights:
        return FFNWeights(*(torch.randn(s, generator=g) / 4 for s in ((f, d), (f,), (d, f), (d,))))

    def mod() -> Modulation:
        return Modulation(*(torch.randn((1, 1, d), generator=g) / 4 for _ in range(3)))

    video, audio, vmod, amod = weights(), weights(), mod(), mod()
    x = torch.randn((1, NUM_TOKENS, d), generator=g)
    whole = modality_ffn_ref(x, NUM_VIDEO_TOKENS, video, audio, vmod, amod, 1e-6)
    as64 = [FFNWeights(*(t.double() for t in w)) for w in (video, audio)] + [
        Modulation(*(t.double() for t in m)) for m in (vmod, amod)
    ]
    whole64 = modality_ffn_ref(x.double(), NUM_VIDEO_TOKENS, *as64, 1e-6)
    tol = 2 * max_err(whole, whole64) + noise_floor(whole64)
    for r in range(degree):
        shard = SequenceShard(r, degree, NUM_TOKENS)
        ops = SequenceParallelOps(TorchOps(), shard, None)
        local = shard.take(x)
        out = ops.modality_ffn(local, NUM_VIDEO_TOKENS, video, audio, vmod, amod, 1e-6)
        assert_within(out[:, : shard.valid], shard.take(whole64)[:, : shard.valid], tol, f"slice {r} of {degree}")
        assert torch.equal(out[:, shard.valid :], local[:, shard.valid :])


def test_plan_parse_and_validation() -> None:
    assert ParallelPlan.parse("cfg=2,sp=4") == ParallelPlan(cfg=2, sp=4)
    assert ParallelPlan.parse(" sp = 3 ") == ParallelPlan(sp=3)
    assert plan_for_launch(None, 5, 12) == ParallelPlan(data=5)
    for bad in ("cfg=3", "sp=0", "tp=2", "cfg=2,cfg=2", "cfg2"):
        with pytest.raises(ConfigError):
            ParallelPlan.parse(bad)
    with pytest.raises(ConfigError, match="cfg x sp = 2 x 2 = 4 processes, but the launch has 2"):
        plan_for_launch("cfg=2,sp=2", 2, 12)
    with pytest.raises(ConfigError, match="sp=8 does not divide the model's 12 attention heads"):
        plan_for_launch("sp=8", 8, 12)
    assert LaunchEnv.from_environ({"RANK": "3", "WORLD_SIZE": "4", "LOCAL_RANK": "1"}) == LaunchEnv(3, 4, 1)
    assert LaunchEnv.from_environ({}) == LaunchEnv(0, 1, 0)


def test_rank_layout_and_data_share() -> None:
    plan = ParallelPlan(cfg=2, sp=3)
    layout = [(ParallelContext(plan, r, 6).cfg_index, ParallelContext(plan, r, 6).sp_index) for r in range(6)]
    assert layout == [(0, 0), (0, 1), (0, 2), (1, 0), (1, 1), (1, 2)]
    dp = ParallelPlan(data=2)
    shares = [ParallelContext(dp, r, 2).share(list(range(5))) for r in range(2)]
    assert shares == [[0, 2, 4], [1, 3]]
    assert all(ParallelContext(dp, r, 2).writes_outputs for r in range(2))
    assert [ParallelContext(plan, r, 6).writes_outputs for r in range(6)] == [True] + [False] * 5


def test_failure_classification() -> None:
    """Own error -> reported to the store; a peer's -> named from the store; nothing reported -> no blame."""
    store = torch.distributed.HashStore()
    plan = ParallelPlan(sp=2)
    rank0, rank1 = ParallelContext(plan, 0, 2, store=store), ParallelContext(plan, 1, 2, store=store)
    with pytest.raises(DistributedError, match=r"rank 1: stopped \(Connection closed by peer .*\) but no rank reported"):
        with rank1.guard():
            raise RuntimeError("Connection closed by peer [127.0.0.1]:1234")
    with pytest.raises(DistributedError, match=r"^rank 0 failed \(ValueError: bad\)$") as own:
        with rank0.guard():
            raise ValueError("bad")
    assert own.value.failed_rank == 0
    with pytest.raises(DistributedError, match=r"rank 0 failed \(ValueError: bad\); rank 1 stopped") as peer:
        with rank1.guard():
            raise LauncherStopped("stopped by the launcher (SIGTERM)")
    assert peer.value.failed_rank == 0


def test_modality_ffn_video_only_never_touches_the_missing_audio_expert() -> None:
    """t2v (a network without audio): every real token is video; the padding must not reach the absent
    audio expert (the reference raises for tokens of a modality whose expert is None)."""
    d, f = 8, 16
    w = FFNWeights(torch.randn(f, d), torch.randn(f), torch.randn(d, f), torch.randn(d))
    mod = Modulation(*(torch.randn(1, 1, d) for _ in range(3)))
    x = torch.randn(1, 7, d)
    for r in range(3):  # 7 tokens on 3 ranks: slices of 3, the last with 1 real token and 2 padding rows
        shard = SequenceShard(r, 3, 7)
        out = SequenceParallelOps(TorchOps(), shard, None).modality_ffn(shard.take(x), 7, w, None, mod, None, 1e-6)
        assert out.shape == (1, 3, d) and torch.isfinite(out).all()
