"""``javisrt generate`` under torchrun (gloo, loopback): data parallel over a prompt file, and the bad
setups, each of which must end every rank with one clear error and a non-zero exit (never a hang).

torchrun runs with ``--standalone`` (a free port: other test runs may hold 29500) and ``--tee 3``, so
every line a rank writes reaches torchrun's stderr prefixed ``[default<rank>]:``; the exit code of
each failed rank is read from torchrun's failure summary.
"""

from __future__ import annotations

import re
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

TINY_REQUEST = ["--tiny", "--mode", "t2v", "--frames", "33", "--height", "16", "--width", "16", "--steps", "2"]
FAULTY_GENERATE = Path(__file__).with_name("_faulty_generate.py")
SLOW_START = Path(__file__).with_name("_slow_start.py")
TIMEOUT_S = 150.0


@dataclass
class Launch:
    returncode: int
    lines: dict[int, list[str]]  # rank -> its output lines (prefix removed)
    exitcodes: dict[int, int]  # rank -> exit code, for the ranks torchrun reports as failed
    stderr: str


def torchrun(nproc: int, entry: list[str], cwd: Path) -> Launch:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(nproc), "--tee", "3", *entry]
    proc = subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=TIMEOUT_S)
    out = proc.stdout + proc.stderr
    lines: dict[int, list[str]] = {r: [] for r in range(nproc)}
    for m in re.finditer(r"^\[default(\d+)\]:(.*)$", out, re.MULTILINE):
        lines[int(m.group(1))].append(m.group(2))
    exitcodes = {
        int(m.group(1)): int(m.group(2))
        for m in re.finditer(r"rank\s*:\s*(\d+) \(local_rank: \d+\)\s*\n\s*exitcode\s*:\s*(-?\d+)", proc.stderr)
    }
    return Launch(proc.returncode, lines, exitcodes, proc.stderr)


def errors(launch: Launch, rank: int) -> list[str]:
    return [line for line in launch.lines[rank] if line.startswith("ERROR javisrt: ")]


def generate(*args: str) -> list[str]:
    return ["-m", "javisrt.runtime.cli", "generate", *args]


def assert_every_rank_failed(launch: Launch, nproc: int, expected: str) -> None:
    """Each rank exited with code 2 after exactly one ERROR line: ``expected``, or (a rank still starting
    when another exited) the launcher's SIGTERM; at least one rank gives ``expected`` itself."""
    assert launch.returncode != 0, launch.stderr[-3000:]
    assert launch.exitcodes == {r: 2 for r in range(nproc)}, launch.stderr[-3000:]
    said = []
    for r in range(nproc):
        errs = errors(launch, r)
        assert len(errs) == 1, f"rank {r}: {errs}\n{launch.stderr[-3000:]}"
        assert expected in errs[0] or "stopped by the launcher (SIGTERM)" in errs[0], errs[0]
        said.append(expected in errs[0])
    assert any(said), launch.stderr[-3000:]


def test_data_parallel_five_prompts_on_two_ranks(tmp_path: Path) -> None:
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(5)))
    out = tmp_path / "out"
    launch = torchrun(2, generate("--prompt-file", str(prompts), "-o", str(out), *TINY_REQUEST), tmp_path)
    assert launch.returncode == 0, launch.stderr[-3000:]
    wrote: dict[str, list[int]] = {}
    for r in range(2):
        for line in launch.lines[r]:
            m = re.search(r"rank (\d+): \[\d+/\d+\] wrote (\S+)", line)
            if m:
                assert int(m.group(1)) == r
                wrote.setdefault(Path(m.group(2)).name, []).append(r)
    expected = [f"sample_{i:04d}.mp4" for i in range(5)]
    assert sorted(p.name for p in out.iterdir()) == expected
    assert sorted(wrote) == expected and all(len(ranks) == 1 for ranks in wrote.values()), wrote
    assert {name: ranks[0] for name, ranks in wrote.items()} == {n: i % 2 for i, n in enumerate(expected)}


def test_degrees_not_matching_the_world_size(tmp_path: Path) -> None:
    launch = torchrun(2, generate("--prompt", "x", "-o", str(tmp_path / "o"), "--parallel", "cfg=2,sp=2", *TINY_REQUEST), tmp_path)
    assert_every_rank_failed(launch, 2, "--parallel cfg=2,sp=2: cfg x sp = 2 x 2 = 4 processes, but the launch has 2")
    assert not (tmp_path / "o").exists() or not any((tmp_path / "o").iterdir())


def test_peer_still_starting_when_a_rank_fails(tmp_path: Path) -> None:
    """Rank 1 is still starting (no SIGTERM handler yet) when rank 0 refuses the plan: rank 0 waits for it
    to count in before exiting, so torchrun's SIGTERM finds a rank that reports it (exit 2, not -15)."""
    bad = generate("--prompt", "x", "-o", str(tmp_path / "o"), "--parallel", "cfg=2,sp=2", *TINY_REQUEST)
    launch = torchrun(2, [str(SLOW_START), "1", "6", *bad[2:]], tmp_path)
    assert_every_rank_failed(launch, 2, "--parallel cfg=2,sp=2: cfg x sp = 2 x 2 = 4 processes, but the launch has 2")


def test_degree_not_dividing_the_heads(tmp_path: Path) -> None:
    """The tiny network has 2 heads; sp=3 on 3 ranks is refused before any model is built."""
    launch = torchrun(3, generate("--prompt", "x", "-o", str(tmp_path / "o"), "--parallel", "sp=3", *TINY_REQUEST), tmp_path)
    assert_every_rank_failed(launch, 3, "sequence-parallel degree sp=3 does not divide the model's 2 attention heads")


def test_rank_raising_mid_step(tmp_path: Path) -> None:
    """Rank 0 raises inside sampling step 1 of a cfg=2 run: both ranks exit 2 naming rank 0."""
    entry = [str(FAULTY_GENERATE), "0", "1", "generate", "--prompt", "x", "-o", str(tmp_path / "o"), "--parallel", "cfg=2", *TINY_REQUEST]
    launch = torchrun(2, entry, tmp_path)
    assert_every_rank_failed(launch, 2, "rank 0 failed (RuntimeError: injected failure in step 1)")
    assert errors(launch, 1) == ["ERROR javisrt: rank 0 failed (RuntimeError: injected failure in step 1); rank 1 stopped"]
