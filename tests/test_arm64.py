"""Apple Silicon readiness: csrc/ compiles for aarch64 with g++ and clang (-Werror), and the
kernels' NEON paths agree with the scalar ones under qemu (.ci/arm64.sh does both).

Needs an aarch64 g++, clang and qemu-aarch64 (`bash .ci/cross_tools.sh` installs them;
.ci/run does).  Without them the test skips, except in CI, where it must run.
"""

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
TOOLS = ("aarch64-linux-gnu-g++", "clang++")


def test_arm64_build_and_neon_kernels() -> None:
    missing = [t for t in TOOLS if shutil.which(t) is None]
    if not (shutil.which("qemu-aarch64-static") or shutil.which("qemu-aarch64")):
        missing.append("qemu-aarch64")
    if missing:
        if os.environ.get("CI"):
            pytest.fail(f"CI must run the arm64 checks, but {', '.join(missing)} is missing")
        pytest.skip(f"{', '.join(missing)} not installed (bash .ci/cross_tools.sh)")
    run = subprocess.run(["bash", str(ROOT / ".ci" / "arm64.sh")], capture_output=True, text=True,
                         env={**os.environ, "PYTHON": sys.executable}, timeout=900)
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    assert "NEON vs scalar kernels agree" in run.stdout
