"""torchrun entry for tests/test_parallel_launch.py: ``javisrt`` with one rank slow to start.

    torchrun --nproc_per_node N tests/_slow_start.py SLOW_RANK SECONDS generate ...

Rank SLOW_RANK sleeps SECONDS before it imports javisrt, i.e. before its SIGTERM handler exists: a rank
still starting its interpreter when a peer fails (a loaded machine) is what this stands in for.
"""

from __future__ import annotations

import os
import sys
import time


def main() -> int:
    slow_rank, seconds = int(sys.argv[1]), float(sys.argv[2])
    if int(os.environ["RANK"]) == slow_rank:
        time.sleep(seconds)
    from javisrt.runtime import cli

    return cli.main(sys.argv[3:])


if __name__ == "__main__":
    sys.exit(main())
