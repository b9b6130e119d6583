#!/usr/bin/env bash
# Print the path of Debian's OpenBLAS (pthread build), installing it first when we can.
# mlx[cpu] on Linux bundles a reference BLAS that runs fp32 matmul ~30x slower; preloading
# OpenBLAS gives identical results at full speed (see README, "Linux CPU").
# Prints nothing on macOS (Accelerate is used there). Fails loudly if it cannot be had on Linux.
set -euo pipefail
[ "$(uname -s)" = Linux ] || exit 0
lib=/usr/lib/$(uname -m)-linux-gnu/openblas-pthread/libopenblas.so.0
if [ ! -e "$lib" ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null; then
    echo "installing libopenblas0-pthread (Debian) for fast MLX on CPU" >&2
    DEBIAN_FRONTEND=noninteractive apt-get update -qq >&2
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq libopenblas0-pthread >&2
  else
    echo "error: $lib is missing; install it with: sudo apt-get install libopenblas0-pthread" >&2
    exit 1
  fi
fi
echo "$lib"
