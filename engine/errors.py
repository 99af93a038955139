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
