#!/usr/bin/env bash
# Apple Silicon readiness without a Mac: csrc/ must compile for aarch64 with two
# compilers (-Werror on our code), and the kernels' NEON paths must agree with
# their scalar paths (and a double-precision reference) under qemu-aarch64.
# Takes MLX's and Python's headers from $PYTHON's environment (default .venv); compile-only,
# so x86 headers do: both are LP64 little-endian, pyconfig.h's sizes match.
set -euo pipefail
cd "$(dirname "$0")/.."
start=$SECONDS
py=${PYTHON:-.venv/bin/python}
out=build/arm64

for tool in aarch64-linux-gnu-g++ clang++; do
  command -v $tool >/dev/null || { echo "arm64: FAILED: $tool missing (bash .ci/cross_tools.sh installs it)"; exit 1; }
done
qemu=$(command -v qemu-aarch64-static || command -v qemu-aarch64) ||
  { echo "arm64: FAILED: qemu-aarch64 missing (bash .ci/cross_tools.sh installs it)"; exit 1; }
# Apple clang's front end; macOS SDK headers are not available here.
clang_arm64="clang++ --target=aarch64-linux-gnu"

# nanobind is only a build requirement (not in the venv): its headers, at the
# version pyproject.toml pins, go to build/.
nb_req=$(grep -o -m1 'nanobind==[0-9.]*' pyproject.toml)
nb=$out/$nb_req
[ -d "$nb/nanobind" ] || $py -m pip install -q --no-deps --target "$nb" "$nb_req"
headers="-isystem $($py -m mlx --cmake-dir)/include -isystem $nb/nanobind/include -isystem $($py -c 'import sysconfig; print(sysconfig.get_paths()["include"])')"

# -Wno-psabi: GCC's note that C++17 changed how std::pair is passed on arm64.
for cxx in aarch64-linux-gnu-g++ "$clang_arm64"; do
  printf '%s\n' csrc/*.cpp |
    xargs -P2 -I{} sh -c "$cxx -std=c++20 -O2 -Wall -Wextra -Werror -Wno-psabi $headers -Icsrc -c {} -o /dev/null" ||
    { echo "arm64: FAILED: csrc/ does not compile for aarch64 with ${cxx%% *}"; exit 1; }
done
compiled=$((SECONDS - start))

# The driver with both compilers: their code generation differs, and clang's is
# the one Macs build with.
for cxx in aarch64-linux-gnu-g++ "$clang_arm64"; do
  CXX=$cxx LDFLAGS=-static tests/native/run.sh "$out/driver-${cxx%% *}" neon "$qemu" ||
    { echo "arm64: FAILED: kernel driver (${cxx%% *}) under $(basename "$qemu")"; exit 1; }
done
echo "arm64: csrc/*.cpp compile for aarch64 with g++ and clang, -Werror (${compiled} s);" \
  "NEON vs scalar kernels agree under $(basename "$qemu") with both ($((SECONDS - start - compiled)) s)"
