"""Several processes, one job: the ``--parallel`` plan, process groups under torchrun, failure handling.

Launch (one process per GPU, or per CPU socket with gloo)::

    torchrun --nproc_per_node 4 -m javisrt.runtime.cli generate ... --parallel cfg=2,sp=2   # one video, 4 ranks
    torchrun --nproc_per_node 8 -m javisrt.runtime.cli generate --prompt-file p.csv ...      # data parallel

Three schemes (torch.distributed only: NCCL on CUDA devices, gloo on the CPU):
  * **data parallel** (no ``--parallel`` under torchrun, as the official code does): prompt i of the
    list runs on rank ``i % world_size``; every rank runs the whole pipeline and writes its own files.
  * **CFG-parallel** (``cfg=2``): the [cond; uncond] batch of every step is split over two ranks and
    the velocities are all-gathered (``runtime/backends/torch_parallel.py``).
  * **Ulysses sequence parallel** (``sp=K``, K dividing the head count): the joint token sequence is
    split over K ranks (``engine/sequence_parallel.py``).
``cfg=2,sp=K`` combines the last two on 2K ranks. Rank layout: ``rank = c * sp + s`` with c the CFG
half (0 cond, 1 uncond) and s the sequence slice, so an SP group is a run of consecutive ranks (on a
multi-node job its per-layer all-to-alls stay inside a node when sp <= GPUs per node) and a CFG group
pairs rank s with rank sp + s (one all-gather per step). All groups are built once, by every rank in
the same order (the ``new_group`` contract).

Failure handling: the collectives run with ``timeout`` (gloo and NCCL raise after it), so a hung rank
cannot block the others forever. A rank whose work raises writes ``rank: error`` into the rendezvous
store (torchrun's agent hosts it, so it outlives any worker) before it exits; its exit closes its
sockets, which fails the peers' pending collectives within moments (or torchrun's agent stops them
with SIGTERM, which the CLI turns into :class:`LauncherStopped`). Every peer then reads the store and
exits with a :class:`DistributedError` naming the failed rank (:meth:`ParallelContext.guard`). A rank
that fails before the others have finished starting waits for them first (:class:`StartupBarrier`), so
none is SIGTERMed before its handler exists.
"""

from __future__ import annotations

import contextlib
import datetime
import logging
import re
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

import torch
import torch.distributed as dist

from javisrt.engine.errors import ConfigError, DistributedError, LauncherStopped
from javisrt.engine.sequence_parallel import check_degree

log = logging.getLogger(__name__)

T = TypeVar("T")

DEFAULT_TIMEOUT_S = 600.0  # longest wait in a collective: covers one rank loading weights while others wait
FAILURE_KEY = "javisrt/failed/{rank}"
STARTED_KEY = "javisrt/started"
STARTUP_WAIT_S = 60.0  # longest a failed rank waits for its peers to finish starting
_SPEC = re.compile(r"^\s*(cfg|sp)\s*=\s*(\d+)\s*$")


@dataclass(frozen=True)
class ParallelPlan:
    """Degrees of one launch: ``cfg`` (1 or 2) x ``sp`` ranks per video, ``data`` videos at a time."""

    cfg: int = 1
    sp: int = 1
    data: int = 1

    def __post_init__(self) -> None:
        if self.cfg not in (1, 2):
            raise ConfigError(f"cfg degree must be 1 or 2 (the CFG batch has two halves), got {self.cfg}")
        if self.sp < 1 or self.data < 1:
            raise ConfigError(f"parallel degrees must be >= 1, got sp={self.sp} data={self.data}")
        if self.data > 1 and self.cfg * self.sp > 1:
            raise NotImplementedError("data parallel combined with --parallel cfg/sp groups is not implemented")

    @classmethod
    def parse(cls, spec: str) -> ParallelPlan:
        """``"cfg=2,sp=4"`` (either key may be left out; default 1)."""
        degrees: dict[str, int] = {}
        for part in spec.split(","):
            m = _SPEC.match(part)
            if m is None:
                raise ConfigError(f"--parallel {spec!r}: expected comma-separated cfg=N and sp=N, e.g. cfg=2,sp=2")
            if m.group(1) in degrees:
                raise ConfigError(f"--parallel {spec!r}: {m.group(1)} given twice")
            degrees[m.group(1)] = int(m.group(2))
        return cls(**degrees)

    @property
    def model_parallel(self) -> int:
        """Ranks that compute one video together."""
        return self.cfg * self.sp

    @property
    def world_size(self) -> int:
        return self.model_parallel * self.data

    def describe(self) -> str:
        return f"cfg={self.cfg},sp={self.sp}" if self.data == 1 else f"data={self.data}"


def plan_for_launch(spec: str | None, world_size: int, num_heads: int) -> ParallelPlan:
    """The plan for ``--parallel spec`` on ``world_size`` processes, validated before any model exists.

    No spec: data parallel over the world. With a spec, cfg * sp must equal the world size and sp must
    divide the head count; both raise :class:`ConfigError` on every rank alike.
    """
    if world_size < 1:
        raise ConfigError(f"world size must be >= 1, got {world_size}")
    if spec is None:
        return ParallelPlan(data=world_size)
    plan = ParallelPlan.parse(spec)
    if plan.model_parallel != world_size:
        raise ConfigError(
            f"--parallel {spec}: cfg x sp = {plan.cfg} x {plan.sp} = {plan.model_parallel} processes, but the launch "
            f"has {world_size} (WORLD_SIZE); run torchrun --nproc_per_node {plan.model_parallel} "
            "(times nodes) or change the degrees"
        )
    check_degree(plan.sp, num_heads)
    return plan


@dataclass(frozen=True)
class LaunchEnv:
    """Where this process sits in the launch (torchrun's RANK, WORLD_SIZE, LOCAL_RANK)."""

    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @classmethod
    def from_environ(cls, env: Mapping[str, str]) -> LaunchEnv:
        """From torchrun's variables; a plain (non-torchrun) process is rank 0 of 1."""
        try:
            launch = cls(int(env.get("RANK", 0)), int(env.get("WORLD_SIZE", 1)), int(env.get("LOCAL_RANK", 0)))
        except ValueError as exc:
            raise ConfigError(f"bad torchrun environment (RANK/WORLD_SIZE/LOCAL_RANK): {exc}") from None
        if not 0 <= launch.rank < launch.world_size:
            raise ConfigError(f"RANK {launch.rank} outside 0..WORLD_SIZE-1 = {launch.world_size - 1}")
        return launch


class StartupBarrier:
    """Every rank counts itself in torchrun's agent store once its SIGTERM handler is installed.

    torchrun's agent sends SIGTERM to every rank as soon as one exits. A rank still starting its
    interpreter has no handler yet: it dies with -15 and no message, so the launch does not say why it
    stopped. A rank that fails on its own therefore waits (at most :data:`STARTUP_WAIT_S`) until all
    ranks have counted in before it exits; from then on each peer reports the launcher's stop itself.

    Only under torchrun's agent store (``TORCHELASTIC_USE_AGENT_STORE=True``): there every rank is a
    client of a store the agent hosts, so connecting early creates nothing the rendezvous later needs.
    """

    def __init__(self, store: Any, world_size: int) -> None:
        self.store = store
        self.world_size = world_size

    @classmethod
    def join(cls, env: Mapping[str, str], timeout_s: float = STARTUP_WAIT_S) -> StartupBarrier | None:
        """Count this rank in; None outside torchrun's agent store (nothing to wait for)."""
        if env.get("TORCHELASTIC_USE_AGENT_STORE") != "True":
            return None
        launch = LaunchEnv.from_environ(env)
        try:
            store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                                  timeout=datetime.timedelta(seconds=timeout_s))  # fmt: skip
            store.add(STARTED_KEY, 1)
        except (KeyError, ValueError, RuntimeError) as exc:  # no usable agent store: ranks start unguarded
            log.warning("rank %d: cannot count in at torchrun's store (%s); a peer still starting when "
                        "this rank fails may be killed without a message", launch.rank, exc)  # fmt: skip
            return None
        return cls(store, launch.world_size)

    def started(self) -> int:
        """How many ranks have counted in."""
        return int(self.store.add(STARTED_KEY, 0))

    def wait(self, timeout_s: float = STARTUP_WAIT_S, poll_s: float = 0.05) -> bool:
        """Block until every rank has counted in (True) or ``timeout_s`` passed (False)."""
        deadline = time.monotonic() + timeout_s
        while self.started() < self.world_size:
            if time.monotonic() >= deadline:
                return False
            time.sleep(poll_s)
        return True


def rank_device(device: torch.device | str, launch: LaunchEnv) -> torch.device:
    """``cuda`` means this rank's GPU (``cuda:LOCAL_RANK``) when several processes run."""
    device = torch.device(device)
    if device.type == "cuda" and device.index is None and launch.world_size > 1:
        return torch.device("cuda", launch.local_rank)
    return device


def _is_communication_error(exc: BaseException) -> bool:
    """A failed collective (a peer's sockets closed, a timeout) rather than this rank's own error."""
    text = str(exc)
    return isinstance(exc, dist.DistError) or any(
        marker in text for marker in ("gloo/transport", "Connection closed by peer", "Connection reset", "Timed out", "NCCL")
    )


@dataclass
class ParallelContext:
    """This rank's view of the launch: plan, rank, device, the store and the process groups."""

    plan: ParallelPlan
    rank: int = 0
    world_size: int = 1
    device: torch.device = torch.device("cpu")
    store: Any = None  # torch.distributed.Store (torchrun's agent store); None in a single process
    cfg_group: Any = None  # ProcessGroup of this rank's CFG pair (None: cfg == 1)
    sp_group: Any = None  # ProcessGroup of this rank's sequence slices (None: sp == 1)

    @property
    def distributed(self) -> bool:
        return self.world_size > 1

    @property
    def cfg_index(self) -> int:
        """0: this rank runs the cond half of the CFG batch, 1: the uncond half."""
        return self.rank // self.plan.sp % self.plan.cfg

    @property
    def sp_index(self) -> int:
        return self.rank % self.plan.sp

    @property
    def writes_outputs(self) -> bool:
        """Data parallel: every rank writes its own prompts' files. Model parallel: rank 0 only (all
        ranks hold the same result, see ``runtime/backends/torch_parallel.py``)."""
        return self.plan.model_parallel == 1 or self.rank == 0

    def share(self, items: Sequence[T]) -> list[T]:
        """This rank's items of a list: every ``data``-th from its rank (all of them when model-parallel)."""
        if self.plan.data == 1:
            return list(items)
        return list(items[self.rank :: self.plan.data])

    # ---- failures ------------------------------------------------------------------------------
    def failure_reports(self) -> dict[int, str]:
        """``rank -> error`` as written into the store by failed ranks (this one excluded)."""
        if self.store is None:
            return {}
        reports = {}
        for r in range(self.world_size):
            key = FAILURE_KEY.format(rank=r)
            if r != self.rank and self.store.check([key]):
                reports[r] = self.store.get(key).decode(errors="replace")
        return reports

    def report_failure(self, message: str) -> None:
        if self.store is not None:
            self.store.set(FAILURE_KEY.format(rank=self.rank), message)

    def _as_distributed_error(self, exc: BaseException) -> DistributedError:
        try:
            reports = self.failure_reports()
        except Exception as store_exc:  # the store went away with its host: name nobody rather than hang
            log.debug("failure reports unreadable: %s", store_exc)
            reports = {}
        if reports:
            first = min(reports)
            return DistributedError(f"rank {first} failed ({reports[first]}); rank {self.rank} stopped", first)
        if isinstance(exc, LauncherStopped) or _is_communication_error(exc):
            first_line = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
            return DistributedError(
                f"rank {self.rank}: stopped ({first_line}) but no rank reported an error: a rank was killed "
                "or hung; see the launcher's log for which"
            )
        message = f"{type(exc).__name__}: {exc}"
        try:
            self.report_failure(message)
        except Exception as store_exc:
            log.debug("could not report the failure: %s", store_exc)
        return DistributedError(f"rank {self.rank} failed ({message})", self.rank)

    @contextlib.contextmanager
    def guard(self) -> Iterator[ParallelContext]:
        """Turn any failure inside into a :class:`DistributedError` naming the rank that failed first.

        This rank's own error is reported to the store for the others; a peer's failure (seen as a
        failed collective, or as :class:`LauncherStopped` from the launcher's SIGTERM) is looked up there.
        """
        if not self.distributed:
            yield self
            return
        try:
            yield self
        except Exception as exc:
            if isinstance(exc, DistributedError) and not isinstance(exc, LauncherStopped):
                raise
            error = self._as_distributed_error(exc)
            log.debug("rank %d: %s", self.rank, error, exc_info=True)
            raise error from exc


def _groups(plan: ParallelPlan) -> tuple[list[list[int]], list[list[int]]]:
    """Rank lists of every SP group (consecutive ranks) and every CFG group (stride sp)."""
    sp_groups = [[c * plan.sp + s for s in range(plan.sp)] for c in range(plan.cfg)]
    cfg_groups = [[c * plan.sp + s for c in range(plan.cfg)] for s in range(plan.sp)]
    return sp_groups, cfg_groups


def init_process_groups(
    plan: ParallelPlan,
    launch: LaunchEnv,
    device: torch.device | str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    store: Any = None,
) -> ParallelContext:
    """Join the launch (``env://`` rendezvous unless ``store`` is given) and build every group once."""
    if not timeout_s > 0:
        raise ConfigError(f"the collective timeout must be > 0 s, got {timeout_s}")
    if plan.world_size != launch.world_size:
        raise ConfigError(f"plan {plan.describe()} is for {plan.world_size} processes, the launch has {launch.world_size}")
    device = rank_device(device, launch)
    ctx = ParallelContext(plan, launch.rank, launch.world_size, device)
    if not ctx.distributed:
        return ctx
    timeout = datetime.timedelta(seconds=timeout_s)
    backend = "nccl" if device.type == "cuda" else "gloo"
    if device.type == "cuda":
        torch.cuda.set_device(device)
    try:
        if store is None:
            store, _, _ = next(dist.rendezvous("env://", launch.rank, launch.world_size, timeout=timeout))
        dist.init_process_group(backend, store=store, rank=launch.rank, world_size=launch.world_size, timeout=timeout)
        sp_groups, cfg_groups = _groups(plan)
        for ranks in sp_groups if plan.sp > 1 else []:
            group = dist.new_group(ranks, timeout=timeout)
            if launch.rank in ranks:
                ctx.sp_group = group
        for ranks in cfg_groups if plan.cfg > 1 else []:
            group = dist.new_group(ranks, timeout=timeout)
            if launch.rank in ranks:
                ctx.cfg_group = group
    except Exception as exc:
        raise DistributedError(f"rank {launch.rank}: could not join the {backend} process group: {exc}") from exc
    ctx.store = store
    log.info("rank %d/%d on %s: %s (%s)", launch.rank, launch.world_size, device, plan.describe(), backend)
    return ctx


@contextlib.contextmanager
def session(
    plan: ParallelPlan,
    launch: LaunchEnv,
    device: torch.device | str = "cpu",
    timeout_s: float = DEFAULT_TIMEOUT_S,
    store: Any = None,
) -> Iterator[ParallelContext]:
    """:func:`init_process_groups`, the work under :meth:`ParallelContext.guard`, then a clean teardown.

    On failure the process group is left to the exiting process: destroying it while peers are
    blocked in a collective could wait on them.
    """
    ctx = init_process_groups(plan, launch, device, timeout_s, store)
    with ctx.guard():
        yield ctx
    if ctx.distributed and dist.is_initialized():
        dist.destroy_process_group()
