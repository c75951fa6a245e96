"""Build hook for the C++ extension mlx_llama._qmm_ext (everything else is in pyproject.toml).

`pip install .` / `pip install -e .` run CMake (CMakeLists.txt) with the build
requirements from pyproject.toml: cmake, ninja, nanobind and the pinned MLX whose
headers and libmlx the extension compiles and links against.

Set MLX_LLAMA_SKIP_EXT=1 to install without the extension (the package then
falls back to mx.quantized_matmul); a failed extension build is an error.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

from setuptools import Extension, setup
from setuptools.command.build_ext import build_ext

ROOT = Path(__file__).parent.resolve()


class CMakeExtension(Extension):
    def __init__(self, name: str):
        super().__init__(name, sources=[])


class CMakeBuild(build_ext):
    def build_extension(self, ext: Extension) -> None:
        out_dir = Path(self.get_ext_fullpath(ext.name)).parent.resolve()
        out_dir.mkdir(parents=True, exist_ok=True)
        build_dir = Path(self.build_temp).resolve() / "cmake"
        cfg = os.environ.get("MLX_LLAMA_BUILD_TYPE", "Release")
        args = [
            "cmake",
            "-S",
            str(ROOT),
            "-B",
            str(build_dir),
            f"-DPython_EXECUTABLE={sys.executable}",
            f"-DMLX_LLAMA_EXT_OUTPUT_DIR={out_dir}",
            f"-DCMAKE_BUILD_TYPE={cfg}",
        ]
        if shutil.which("ninja") and not os.environ.get("CMAKE_GENERATOR"):
            args += ["-G", "Ninja"]
        subprocess.run(args, check=True)
        jobs = str(os.cpu_count() or 1)
        subprocess.run(["cmake", "--build", str(build_dir), "--parallel", jobs], check=True)


ext_modules = [] if os.environ.get("MLX_LLAMA_SKIP_EXT") else [CMakeExtension("mlx_llama._qmm_ext")]

setup(ext_modules=ext_modules, cmdclass={"build_ext": CMakeBuild})
