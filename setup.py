"""Packaging for javisrt.

The repository's top-level folders are the subpackages of the import package ``javisrt``:
``engine/ -> javisrt.engine``, ``kernels/ -> javisrt.kernels`` and so on; the repository root itself
holds ``javisrt/__init__.py``. The C++ sampling loop in ``cpp/`` is built with CMake into the private
extension ``javisrt._sampler`` (pybind11 ``cmake_example`` style: a ``CMakeExtension`` plus a
``CMakeBuild`` that honours ``CMAKE_ARGS`` and ``CMAKE_BUILD_PARALLEL_LEVEL``).

Install with the pinned set first (``make install`` does this), then
``pip install --no-build-isolation -e .``: no build step may pull another torch.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).resolve().parent
SUBPACKAGES = ("engine", "kernels", "export", "runtime", "runtime.backends", "runtime.serve", "bench")


class CMakeExtension(Extension):
    """An extension whose sources live in a CMake project (``sourcedir``)."""

    def __init__(self, name: str, sourcedir: str) -> None:
        super().__init__(name, sources=[])
        self.sourcedir = str((ROOT / sourcedir).resolve())


class CMakeBuild(build_ext):
    """Configure and build a :class:`CMakeExtension`; the module lands where setuptools expects it."""

    def build_extension(self, ext: Extension) -> None:
        if not isinstance(ext, CMakeExtension):
            super().build_extension(ext)
            return
        import pybind11  # build requirement, pinned in requirements.txt

        out_dir = Path(self.get_ext_fullpath(ext.name)).resolve().parent
        build_type = "Debug" if self.debug else "Release"
        cmake_args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPYTHON_EXECUTABLE={sys.executable}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
        ]
        cmake_args += [a for a in os.environ.get("CMAKE_ARGS", "").split(" ") if a]
        build_args = ["--config", build_type]
        if "CMAKE_BUILD_PARALLEL_LEVEL" not in os.environ:
            build_args += [f"-j{os.cpu_count() or 1}"]
        build_temp = Path(self.build_temp) / ext.name
        build_temp.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", ext.sourcedir, *cmake_args], cwd=build_temp, check=True)
        subprocess.run(["cmake", "--build", ".", *build_args], cwd=build_temp, check=True)


def _requirements(name: str) -> list[str]:
    lines = (ROOT / name).read_text().splitlines()
    return [ln.split("#")[0].strip() for ln in lines if ln.split("#")[0].strip()]


setup(
    name="javisrt",
    version="0.1.0",
    description="Compiled inference engine for JavisDiT++ (joint text-to-audio+video DiT)",
    long_description=(ROOT / "README.md").read_text(encoding="utf-8"),
    long_description_content_type="text/markdown",
    python_requires=">=3.11",
    packages=["javisrt", *(f"javisrt.{p}" for p in SUBPACKAGES)],
    package_dir={"javisrt": ".", **{f"javisrt.{p}": p.replace(".", "/") for p in SUBPACKAGES}},
    package_data={"javisrt": ["py.typed", "_sampler.pyi"], "javisrt.runtime.serve": ["static/*.html"]},
    ext_modules=[CMakeExtension("javisrt._sampler", sourcedir="cpp")],
    cmdclass={"build_ext": CMakeBuild},
    install_requires=_requirements("requirements.txt"),
    extras_require={"test": _requirements("requirements-test.txt")},
    entry_points={"console_scripts": ["javisrt = javisrt.runtime.cli:main"]},
    zip_safe=False,
)
