"""Shared fixtures: deterministic seeding, GPU/TensorRT skip markers, tolerance helpers."""

from __future__ import annotations

import importlib.util
import os
import random
from collections.abc import Iterator

import torch

# Triton kernels run under the interpreter on machines without CUDA. The flag must be set before
# triton is first imported by anything (diffusers imports it too), so here, before any test module.
# The ahead-of-time compile tests strip it in their child processes.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(autouse=True)
def restore_tf32() -> Iterator[None]:
    """``official`` numerics on CUDA turn TF32 on process-wide (engine.model.enable_tf32); no test
    leaves it changed for the next."""
    flags = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = flags


@pytest.fixture(autouse=True)
def seed() -> int:
    """Every test starts from the same RNG state (torch, numpy, random)."""
    value = 0
    random.seed(value)
    np.random.seed(value)
    torch.manual_seed(value)
    return value


def tensorrt_present() -> bool:
    """Whether real TensorRT is importable. A namespace-only ``tensorrt`` (the one tensorrt-stubs, a
    test dependency, leaves: it ships no ``__init__.py``) is not TensorRT."""
    spec = importlib.util.find_spec("tensorrt")
    return spec is not None and spec.origin is not None


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    has_gpu = torch.cuda.is_available()
    has_trt = tensorrt_present()
    for item in items:
        if "gpu" in item.keywords and not has_gpu:
            item.add_marker(pytest.mark.skip(reason="needs a CUDA GPU; the dev/CI machines have none"))
        if "tensorrt" in item.keywords and not has_trt:
            item.add_marker(
                pytest.mark.skip(reason="needs TensorRT, which cannot be installed on the dev/CI machines")
            )
