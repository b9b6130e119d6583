"""`promptvault doctor`: what this machine will do with MLX, and how to make it faster.

The most common surprise is on Linux CPU: `mlx[cpu]` bundles a reference BLAS that runs fp32
matmul an order of magnitude slower than OpenBLAS. The doctor measures the
matmul rate instead of guessing, checks whether OpenBLAS is mapped into this process, and
says exactly how to fix it. It also reports the model cache, where GGUF conversions live.
"""

import platform
import re
import sys
import time
from importlib import metadata
from pathlib import Path

import mlx.core as mx

from promptvault.models.cache_dir import dir_size_bytes, models_cache_dir

# Below this fp32 matmul rate on a Linux CPU, the reference BLAS is almost certainly in use.
SLOW_CPU_GFLOPS = 30.0


def openblas_path() -> str:
    """Where Debian/Ubuntu's pthread OpenBLAS lives for this CPU architecture."""
    return f"/usr/lib/{platform.machine()}-linux-gnu/openblas-pthread/libopenblas.so.0"


def openblas_loaded() -> bool:
    """True if a system libopenblas is mapped into this process (Linux: /proc/self/maps).

    numpy's bundled libscipy_openblas64_ does not count: its symbols are renamed, so MLX
    never calls it.
    """
    try:
        return re.search(r"/libopenblas[^/]*\.so", Path("/proc/self/maps").read_text()) is not None
    except OSError:
        return False


def matmul_gflops(n: int = 512, min_seconds: float = 0.25, max_reps: int = 200) -> float:
    """Measured fp32 n x n matmul rate on the default device, in GFLOP/s."""
    a = mx.random.normal((n, n), dtype=mx.float32)
    b = mx.random.normal((n, n), dtype=mx.float32)
    mx.eval(a @ b)  # warm up: allocation, kernel selection
    reps, start = 0, time.perf_counter()
    while reps < max_reps and (reps == 0 or time.perf_counter() - start < min_seconds):
        mx.eval(a @ b)
        reps += 1
    return 2 * n**3 * reps / (time.perf_counter() - start) / 1e9


def blas_hint(system: str, on_cpu: bool, has_openblas: bool, gflops: float) -> str | None:
    """The fix for a slow Linux CPU BLAS, or None when nothing needs fixing."""
    if system != "Linux" or not on_cpu or has_openblas or gflops >= SLOW_CPU_GFLOPS:
        return None
    lib = openblas_path()
    return (
        f"fp32 matmul runs at {gflops:.1f} GFLOP/s on MLX's bundled reference BLAS (~30x slower than OpenBLAS): "
        f"install OpenBLAS (`sudo apt-get install libopenblas0-pthread`) and run with "
        f"`LD_PRELOAD={lib} promptvault ...` (or export LD_PRELOAD={lib})"
    )


def _version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def _installed_models() -> dict:
    from promptvault.errors import ModelLoadError
    from promptvault.models.default import GEMMA_INSTALL, GEMMA_PART_PACKAGES, SMOLLM_INSTALL, SMOLLM_PACKAGE, _package_dir

    found = {}
    for label, packages, hint in (
        ("SmolLM2-135M-Instruct (default)", [SMOLLM_PACKAGE], SMOLLM_INSTALL),
        ("gemma-3-270m", GEMMA_PART_PACKAGES, GEMMA_INSTALL),
    ):
        try:
            for package in packages:
                _package_dir(package, hint)
            found[label] = "installed"
        except ModelLoadError as exc:
            found[label] = str(exc)
    return found


def run_doctor() -> dict:
    """A JSON-able report: versions, device, measured matmul rate, BLAS hint, model cache."""
    device = mx.default_device()
    on_cpu = device.type == mx.cpu
    gflops = matmul_gflops()
    has_openblas = openblas_loaded()
    cache = models_cache_dir()
    hint = blas_hint(platform.system(), on_cpu, has_openblas, gflops)
    return {
        "promptvault": _version("promptvault"),
        "python": sys.version.split()[0],
        "platform": platform.platform(),
        "mlx": mx.__version__,
        "mlx_lm": _version("mlx-lm"),
        "default_device": str(device),
        "matmul_fp32_gflops": round(gflops, 1),
        "openblas_loaded": has_openblas,
        "model_cache": {"path": str(cache), "exists": cache.is_dir(), "bytes": dir_size_bytes(cache)},
        "test_models": _installed_models(),
        "hints": [hint] if hint else [],
    }
