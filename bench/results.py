"""Benchmark result rows with their provenance, appended to CSV and JSON-lines files.

Every row carries the device name, software versions, the git commit, a UTC timestamp, the shapes,
backend and precision (shared/style.md lesson 12: every number has a denominator and a provenance).
"""

from __future__ import annotations

import csv
import datetime as _dt
import importlib.metadata
import json
import platform
import subprocess
from collections.abc import Mapping
from pathlib import Path
from typing import Any


def git_commit(cwd: str | Path | None = None) -> str:
    """Short commit of the checkout javisrt runs from ("unknown" outside git), "+dirty" if modified."""
    where = Path(cwd) if cwd else Path(__file__).resolve().parent
    try:
        sha = subprocess.run(["git", "rev-parse", "--short=12", "HEAD"], cwd=where, capture_output=True,
                             text=True, check=True, timeout=10).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=where,
                               capture_output=True, text=True, check=True, timeout=10).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown"
    return sha + ("+dirty" if dirty else "")


def device_name() -> str:
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name()
    cpu = platform.processor() or platform.machine()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU: {cpu} x{torch.get_num_threads()} threads"


def versions() -> dict[str, str]:
    """Installed distributions' versions, read from their metadata (nothing is imported)."""
    out = {"python": platform.python_version()}
    for name in ("torch", "onnxruntime", "triton", "tensorrt"):
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def provenance() -> dict[str, Any]:
    return {
        "timestamp_utc": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
        "device": device_name(),
        "git_commit": git_commit(),
        "versions": versions(),
    }


def append_row(row: Mapping[str, Any], csv_path: str | Path | None = None, json_path: str | Path | None = None) -> dict[str, Any]:
    """Add provenance to ``row`` and append it to the given files (CSV gets flattened JSON cells)."""
    full = {**provenance(), **row}
    if json_path is not None:
        with Path(json_path).open("a") as f:
            f.write(json.dumps(full, sort_keys=True) + "\n")
    if csv_path is not None:
        path = Path(csv_path)
        flat = {k: (json.dumps(v, sort_keys=True) if isinstance(v, (dict, list, tuple)) else v) for k, v in full.items()}
        new = not path.exists() or path.stat().st_size == 0
        if not new:
            with path.open(newline="") as f:
                header = next(csv.reader(f))
            if header != list(flat):
                raise ValueError(f"{path} has columns {header}; this row has {list(flat)}: write to a new file")
        with path.open("a", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=list(flat))
            if new:
                writer.writeheader()
            writer.writerow(flat)
    return full
