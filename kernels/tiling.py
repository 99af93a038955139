"""Tile-order helpers shared by the GEMM kernels (modality_ffn, fp8_linear)."""

from __future__ import annotations

import triton
import triton.language as tl

__all__ = ["grouped_tile"]


@triton.jit
def grouped_tile(pid, tiles_m, tiles_n, GROUP_M: tl.constexpr):
    """Map a linear tile id to (m tile, n tile) in grouped order: GROUP_M M tiles sweep the N tiles
    together, so a group's weight tiles stay in L2 (Triton tutorial 03)."""
    num_pid_in_group = GROUP_M * tiles_n
    group_id = pid // num_pid_in_group
    first_pid_m = group_id * GROUP_M
    group_size_m = tl.minimum(tiles_m - first_pid_m, GROUP_M)
    pid_m = first_pid_m + ((pid % num_pid_in_group) % group_size_m)
    pid_n = (pid % num_pid_in_group) // group_size_m
    return pid_m, pid_n
