"""Static check of the TensorRT code against ``tensorrt-stubs`` (TensorRT cannot be installed here).

The stubs (PyPI ``tensorrt-stubs==10.13.0.35.1``) are fetched into a cache *outside* site-packages:
installed, they create a namespace-only ``tensorrt`` package that makes ``import tensorrt`` succeed
and every TensorRT test run. Two syntax errors in the stub file are patched (a parameter named ``in``
and a non-default parameter after defaults). The stubs describe TensorRT 10.13: they still list the
precision flags TensorRT 11 removed (our code uses none; test_trt_build asserts it) and they have no
``tensorrt.plugin`` module, so ``export/trt_plugins.py``'s plugin decorators are not type-checked.
"""

from __future__ import annotations

import re
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STUBS = "tensorrt-stubs==10.13.0.35.1"
CACHE = ROOT / "build" / "trt-stubs"
MODULES = ["export/trt_build.py", "export/trt_cli.py", "export/trt_plugins.py", "export/engine_meta.py",
           "export/tensorrt_api.py", "runtime/backends/tensorrt_engine.py"]
MYPY_INI = """[mypy]
python_version = 3.11
ignore_missing_imports = True
mypy_path = {typings}
check_untyped_defs = True
warn_unused_ignores = True
[mypy-tensorrt_bindings.*]
ignore_errors = True
[mypy-tensorrt]
ignore_errors = True
"""


def _typings() -> Path:
    typings = CACHE / "typings"
    if (typings / "tensorrt_bindings" / "tensorrt.pyi").is_file():
        return typings
    CACHE.mkdir(parents=True, exist_ok=True)
    fetched = subprocess.run(
        [sys.executable, "-m", "pip", "download", "-q", "--no-deps", STUBS, "-d", str(CACHE)],
        capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    wheels = sorted(CACHE.glob("tensorrt_stubs-*.whl"))
    if fetched.returncode != 0 or not wheels:
        pytest.skip(f"cannot fetch {STUBS} from PyPI: {fetched.stderr.strip()[-300:]}")
    with zipfile.ZipFile(wheels[0]) as zf:
        zf.extractall(typings)
    stub = typings / "tensorrt_bindings" / "tensorrt.pyi"
    text = stub.read_text()
    text = re.sub(r"\bin: list\[", "in_: list[", text)
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    stub.write_text(text)
    return typings


@pytest.mark.slow
def test_tensorrt_modules_typecheck_against_stubs(tmp_path: Path) -> None:
    typings = _typings()
    ini = tmp_path / "mypy.ini"
    ini.write_text(MYPY_INI.format(typings=typings))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ini), "--no-incremental", *MODULES],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success" in result.stdout
