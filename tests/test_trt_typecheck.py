"""Static check of the TensorRT code against ``tensorrt-stubs`` (TensorRT cannot be installed here).

The stubs (PyPI ``tensorrt-stubs==10.13.0.35.1``) are a test dependency, pinned in
``requirements-stubs.txt`` and installed with ``--no-deps`` (their declared dependency is TensorRT
itself, which has no installable wheel on the CPU machines; the ``.pyi`` files need none of it).
Installed, they leave a namespace-only ``tensorrt`` package: ``import tensorrt`` succeeds but is not
TensorRT, which conftest.py (skip markers) and ``export/tensorrt_api.import_tensorrt`` both
recognise. A missing stub package fails this test rather than skipping it.

The stubs are copied out of site-packages (mypy ignores them there: no ``py.typed``) and two syntax
errors are patched (a parameter named ``in`` and a non-default parameter after defaults). They describe
TensorRT 10.13: they still list the precision flags TensorRT 11 removed (our code uses none;
test_trt_build asserts it) and they have no ``tensorrt.plugin`` module, so ``export/trt_plugins.py``'s
plugin decorators are not type-checked.
"""

from __future__ import annotations

import importlib.metadata
import importlib.util
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import tensorrt_present

ROOT = Path(__file__).resolve().parents[1]
STUBS = ("tensorrt-stubs", "10.13.0.35.1")
MODULES = ["export/trt_build.py", "export/trt_cli.py", "export/trt_plugins.py", "export/engine_meta.py",
           "export/tensorrt_api.py", "runtime/backends/tensorrt_engine.py"]
MYPY_INI = """[mypy]
python_version = 3.11
ignore_missing_imports = True
mypy_path = {typings}
check_untyped_defs = True
warn_unused_ignores = True
# Report the TensorRT modules' own errors: the modules they import (kernels, engine, the contract) are
# type-checked by `make lint`; here they only supply their types. Without this, a checkout in a
# folder named `javisrt` makes mypy also report them under this file's stricter flags.
follow_imports = silent
[mypy-tensorrt_bindings.*]
ignore_errors = True
[mypy-tensorrt]
ignore_errors = True
"""


def _stubs() -> importlib.metadata.Distribution:
    name, version = STUBS
    try:
        dist = importlib.metadata.distribution(name)
    except importlib.metadata.PackageNotFoundError:
        pytest.fail(f"{name} is not installed: it is a test dependency (`make install`; or "
                    f"`pip install --no-deps -r requirements-stubs.txt`)")  # fmt: skip
    assert dist.version == version, f"{name} {dist.version} installed, {version} pinned"
    return dist


def _typings(dest: Path) -> Path:
    """The installed stubs' .pyi files copied under ``dest``, with the two syntax errors patched."""
    for file in _stubs().files or []:
        if file.suffix == ".pyi":
            target = dest / file
            target.parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(file.locate(), target)
    stub = dest / "tensorrt_bindings" / "tensorrt.pyi"
    assert stub.is_file(), f"{STUBS[0]} has no tensorrt_bindings/tensorrt.pyi"
    text = stub.read_text()
    text = re.sub(r"\bin: list\[", "in_: list[", text)
    text = text.replace("power: Weights = None, channel_axis: int)", "power: Weights = None, channel_axis: int = ...)")
    stub.write_text(text)
    return dest


def test_stubs_alone_are_not_tensorrt() -> None:
    """The installed stubs make ``tensorrt`` a namespace package; neither the tests nor the backend
    take it for TensorRT."""
    _stubs()
    spec = importlib.util.find_spec("tensorrt")
    assert spec is not None
    if spec.origin is not None:
        pytest.skip("real TensorRT is installed next to the stubs")
    assert not tensorrt_present()
    from javisrt.engine.errors import UnavailableError
    from javisrt.export.tensorrt_api import import_tensorrt

    with pytest.raises(UnavailableError, match="namespace package"):
        import_tensorrt()


@pytest.mark.slow
def test_tensorrt_modules_typecheck_against_stubs(tmp_path: Path) -> None:
    typings = _typings(tmp_path / "typings")
    ini = tmp_path / "mypy.ini"
    ini.write_text(MYPY_INI.format(typings=typings))
    result = subprocess.run(
        [sys.executable, "-m", "mypy", "--config-file", str(ini), "--no-incremental", *MODULES],
        cwd=ROOT, capture_output=True, text=True, timeout=600,
    )  # fmt: skip
    assert result.returncode == 0, result.stdout[-4000:] + result.stderr[-2000:]
    assert "Success" in result.stdout
