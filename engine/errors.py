"""Typed exceptions raised across javisrt; the CLI turns them into one-line messages."""

from __future__ import annotations


class JavisError(Exception):
    """Base class of every error javisrt raises on purpose."""


class ConfigError(JavisError, ValueError):
    """A configuration value is invalid or inconsistent (unknown preset, bad enum, bad size)."""


class ShapeError(JavisError, ValueError):
    """A tensor has the wrong rank, size, dtype or layout for the operation."""


class CheckpointError(JavisError):
    """A checkpoint is missing, corrupt, unsafe, or does not fit the model."""


class EngineMismatchError(JavisError):
    """A serialized engine was built for another model, GPU, precision or TensorRT version."""


class UnavailableError(JavisError, RuntimeError):
    """An optional component (GPU, TensorRT, the C++ extension) is not present on this machine."""


class DistributedError(JavisError, RuntimeError):
    """A multi-process run failed: a rank raised, was killed, or a collective timed out.

    ``failed_rank`` is the rank that failed first when one reported it (None: unknown, e.g. a timeout).
    """

    def __init__(self, message: str, failed_rank: int | None = None) -> None:
        super().__init__(message)
        self.failed_rank = failed_rank


class LauncherStopped(DistributedError):
    """The launcher (torchrun's agent) stopped this rank with SIGTERM, usually because another rank exited."""
