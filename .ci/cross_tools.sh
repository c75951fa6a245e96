#!/usr/bin/env bash
# The tools .ci/arm64.sh needs (tests/test_arm64.py runs it): an aarch64 g++,
# clang and qemu-aarch64, from Debian, when missing.
set -euo pipefail
need=()
command -v aarch64-linux-gnu-g++ >/dev/null || need+=(g++-aarch64-linux-gnu)
command -v clang++ >/dev/null || need+=(clang)
command -v qemu-aarch64-static >/dev/null || command -v qemu-aarch64 >/dev/null || need+=(qemu-user-static)
if ((${#need[@]})); then
  echo "arm64: apt-get install ${need[*]}"
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
