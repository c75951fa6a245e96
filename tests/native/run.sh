#!/usr/bin/env bash
# Builds kernel_driver.cpp with csrc/'s kernels and runs it twice: on the SIMD
# path the kernels pick (which must be EXPECT_ISA), saving its results, then
# with MLX_LLAMA_FORCE_SCALAR=1 against them (see kernel_driver.cpp).
#   [CXX=...] [LDFLAGS=...] tests/native/run.sh OUT_DIR EXPECT_ISA [RUNNER...]
# e.g. CXX=aarch64-linux-gnu-g++ LDFLAGS=-static tests/native/run.sh build/arm64 neon qemu-aarch64-static
set -euo pipefail
src=$(cd "$(dirname "$0")" && pwd)
csrc=$src/../../csrc
out=$1 isa=$2
shift 2
mkdir -p "$out"
# Optimised as CMakeLists.txt builds the extension; -Werror: our code only.
# shellcheck disable=SC2086  # CXX and LDFLAGS may hold several words
${CXX:-g++} -std=c++20 -O3 -fno-math-errno -Wall -Wextra -Werror -pthread -I"$csrc" \
  "$src/kernel_driver.cpp" "$csrc/kernels.cpp" "$csrc/panel_avx512.cpp" "$csrc/threadpool.cpp" ${LDFLAGS:-} -o "$out/kernel_driver"
"$@" "$out/kernel_driver" --expect-isa "$isa" --write "$out/simd.bin"
MLX_LLAMA_FORCE_SCALAR=1 "$@" "$out/kernel_driver" --expect-isa scalar --against "$out/simd.bin"
