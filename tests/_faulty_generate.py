"""torchrun entry for tests/test_parallel_launch.py: ``javisrt generate`` in which one rank raises.

    torchrun --nproc_per_node N tests/_faulty_generate.py FAIL_RANK FAIL_STEP generate ... --parallel ...

Rank FAIL_RANK raises RuntimeError in its FAIL_STEP-th call of the torch engine's parallel forward (0-based), i.e.
in the middle of a sampling step, while the other ranks wait in that step's collectives.
"""

from __future__ import annotations

import sys
from typing import Any

from javisrt.runtime import cli
from javisrt.runtime.backends import torch_parallel


def main() -> int:
    fail_rank, fail_step = int(sys.argv[1]), int(sys.argv[2])
    real = torch_parallel.parallel_contract_forward
    calls = {"n": 0}

    def forward(model: Any, inputs: Any, video_frames: int, parallel: Any) -> Any:
        if parallel.rank == fail_rank and calls["n"] == fail_step:
            raise RuntimeError(f"injected failure in step {fail_step}")
        calls["n"] += 1
        return real(model, inputs, video_frames, parallel)

    torch_parallel.parallel_contract_forward = forward
    return cli.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
