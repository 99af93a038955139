"""Derived tolerances (shared/style.md lesson 7) and a verbose comparison for kernel/model tests."""

from __future__ import annotations

import torch


def noise_floor(ref: torch.Tensor, dtype: torch.dtype = torch.float32) -> float:
    """Rounding noise of the reference's own magnitude in ``dtype`` (the dtype under test):
    ``((r + 0.3 - 0.3) - r).abs().max()`` with ``r = ref.to(dtype)``."""
    r = ref.to(dtype)
    return float(((r + 0.3 - 0.3) - r).abs().max())


def max_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).abs().max())


def assert_within(out: torch.Tensor, ref: torch.Tensor, atol: float, what: str = "output") -> None:
    """Fail with max/mean error and the first mismatches when ``|out - ref| > atol`` anywhere."""
    assert out.shape == ref.shape, f"{what}: shape {tuple(out.shape)} != {tuple(ref.shape)}"
    diff = (out.float() - ref.float()).abs()
    assert not torch.isnan(out).any(), f"{what}: NaN in output"
    bad = diff > atol
    if bad.any():
        idx = bad.nonzero()[:5].tolist()
        firsts = ", ".join(f"{i}: {out[tuple(i)].item():.6g} vs {ref[tuple(i)].item():.6g}" for i in idx)
        raise AssertionError(
            f"{what}: max err {diff.max().item():.3e} mean {diff.mean().item():.3e} > atol {atol:.3e} "
            f"at {int(bad.sum())} elements; first: {firsts}"
        )


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    """``||out - ref|| / ||ref||`` in float64."""
    o, r = out.double(), ref.double()
    return float((o - r).norm() / r.norm().clamp_min(1e-30))
