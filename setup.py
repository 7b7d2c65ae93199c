"""Builds meldkit._C with CMake and ninja (the pybind11 cmake_example pattern).

Environment (see README.md): ``MELDKIT_CUDA=0`` builds CPU kernels only;
``CMAKE_CUDA_ARCHITECTURES`` overrides the default ``80;90``; ``CMAKE_ARGS`` passes extra CMake
arguments (for example ``-DMELDKIT_CUDA_RESOURCE_USAGE=ON`` for ptxas register reports).
"""

import os
import shlex
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str) -> None:
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        import pybind11

        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        build_type = "Debug" if self.debug else os.environ.get("MELDKIT_BUILD_TYPE", "Release")
        args = [
            f"-DCMAKE_LIBRARY_OUTPUT_DIRECTORY={out_dir}{os.sep}",
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-Dpybind11_DIR={pybind11.get_cmake_dir()}",
            f"-DCMAKE_BUILD_TYPE={build_type}",
            "-GNinja",
        ]
        if os.environ.get("MELDKIT_CUDA", "1").strip().lower() in ("0", "off", "false", "no"):
            args.append("-DMELDKIT_CUDA=OFF")
        else:
            args.append("-DMELDKIT_CUDA=ON")
        if os.environ.get("CMAKE_CUDA_ARCHITECTURES"):
            args.append(f"-DCMAKE_CUDA_ARCHITECTURES={os.environ['CMAKE_CUDA_ARCHITECTURES']}")
        args += shlex.split(os.environ.get("CMAKE_ARGS", ""))

        build_dir = Path(self.build_temp) / ext.name
        build_dir.mkdir(parents=True, exist_ok=True)
        subprocess.run(["cmake", str(ROOT), *args], cwd=build_dir, check=True)
        jobs = os.environ.get("CMAKE_BUILD_PARALLEL_LEVEL") or str(os.cpu_count() or 2)
        subprocess.run(["cmake", "--build", ".", "--parallel", jobs], cwd=build_dir, check=True)


setup(ext_modules=[CMakeExtension("meldkit._C")], cmdclass={"build_ext": CMakeBuild})
