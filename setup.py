"""Build hook for the C++ extension mlx_llama._qmm_ext (everything else is in pyproject.toml).

`pip install .` / `pip install -e .` run CMake (CMakeLists.txt) with the build
requirements from pyproject.toml: cmake, ninja, nanobind and the pinned MLX whose
headers and libmlx the extension compiles and links against.

Set MLX_LLAMA_SKIP_EXT=1 to install without the extension (the package then
falls back to mx.quantized_matmul). A failed extension build is an error, except
on macOS: there it prints one line and installs without the extension, since a
Mac user must always be able to install (the Metal path never uses it, and on
the CPU the package falls back with a warning). MLX_LLAMA_EXT_OPTIONAL=1 or 0
sets that policy on any platform.
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


def ext_optional() -> bool:
    value = os.environ.get("MLX_LLAMA_EXT_OPTIONAL")
    return sys.platform == "darwin" if value is None else value == "1"


class CMakeBuild(build_ext):
    def build_extensions(self) -> None:
        built = []
        for ext in self.extensions:
            try:
                self.build_extension(ext)
                built.append(ext)
            except (OSError, subprocess.CalledProcessError) as e:  # OSError: no cmake
                if not ext_optional():
                    raise
                print(f"mlx-llama: C++ extension not built ({type(e).__name__}), installing without it: "
                      "mx.quantized_matmul is used", file=sys.stderr)
        # What setuptools then copies (editable installs) and lists in the wheel.
        self.extensions = built

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
