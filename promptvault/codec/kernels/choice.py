"""Backend choice, once per process: what `encode` / `decode` run on this device.

  - MLX's CUDA backend with the GPU as default device → the CUDA kernels (checked against the
    reference on a GPU: docs/speed.md);
  - Metal → the kernels are compiled and compared with the reference on a small random batch
    first (`checks.self_check`); on failure one warning, then the reference for the process;
  - anything else (CPU) → the pure-MLX reference (promptvault.codec.turboquant).
`PROMPTVAULT_FUSED=0` turns the kernels off. A spec or tensor the kernels do not handle
(`supports`) always goes to the reference: an explicit capability check, not a caught error.
The plan decode kernel (outlier splits) is checked per config before its first use everywhere.
"""

from __future__ import annotations

import os
import threading
import warnings

import mlx.core as mx

from promptvault.codec.kernels.checks import config_check, self_check
from promptvault.codec.kernels.layout import supports, uses_plan_kernel
from promptvault.codec.spec import CodecSpec
_lock = threading.Lock()
_state: dict = {}


def _platform() -> str:
    """'cuda', 'metal' or 'cpu': where MLX's default device runs."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


def backend() -> str:
    """'cuda', 'metal' or 'reference': what encode/decode use in this process (decided once)."""
    with _lock:
        if "backend" not in _state:
            _state["backend"] = _choose(_platform(), lambda lang: self_check(lang))
        return _state["backend"]


def _choose(platform: str, check) -> str:
    """The selection rule: env switch, then CUDA as is, Metal only after `check` passes."""
    if os.environ.get("PROMPTVAULT_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return "reference"
    if platform == "cuda":
        return "cuda"
    if platform == "metal":
        ok, why = check("metal")
        if ok:
            return "metal"
        warnings.warn(f"promptvault: the fused Metal kernels failed their self-check ({why}); "
                      "using the pure-MLX codec", RuntimeWarning, stacklevel=3)
        return "reference"
    return "reference"


def reset() -> None:
    """Forget the selection and the per-config checks (tests; a changed default device)."""
    with _lock:
        _state.clear()
    with _check_lock:
        _checked.clear()


_check_lock = threading.Lock()
_checked: dict[tuple, bool] = {}


def _config_ok(lang: str, spec: CodecSpec, dim: int, dtype) -> bool:
    """`config_check` once per process and (lang, spec, dim, dtype); on failure one warning and
    the reference for that config."""
    key = (lang, spec, dim, str(dtype))
    with _check_lock:
        if key not in _checked:
            ok, why = config_check(lang, spec, dim, dtype)
            if not ok:
                warnings.warn(f"promptvault: the fused {lang} decode for {spec} at head dim {dim} ({dtype}) "
                              f"failed its check against the reference ({why}); using the pure-MLX codec "
                              "for it", RuntimeWarning, stacklevel=3)
            _checked[key] = ok
        return _checked[key]


def use_fused(spec: CodecSpec, dim: int, dtype, size: int = 0) -> str | None:
    """The kernel language to use for this spec/tensor, or None for the reference. A spec the
    plan kernel decodes (the outlier split) is first checked against the reference, once per
    process and config (`config_check`): that kernel has not yet run on a GPU we could test on."""
    if not supports(spec, dim, dtype, size):
        return None
    lang = backend()
    if lang == "reference":
        return None
    if uses_plan_kernel(spec) and not _config_ok(lang, spec, dim, dtype):
        return None
    return lang
