"""A model fingerprint: one hex digest over everything that changes a model's KV cache bytes.

Prompt caches are only valid for the exact weights, tokenizer and chat template that produced
them, in the dtype they ran in. The fingerprint hashes the content of those files (through
the stat cache, so it costs a hash only the first time) and the dtype.
"""

import hashlib
from pathlib import Path

from promptvault.models.file_hash import cached_sha256

# Files of an mlx-lm / Hugging Face directory that decide weights, tokenization and templates.
_FINGERPRINT_PATTERNS = (
    "*.safetensors",
    "config.json",
    "tokenizer.json",
    "tokenizer_config.json",
    "special_tokens_map.json",
    "tokenizer.model",
    "chat_template.jinja",
    "chat_template.json",
)


def fingerprint_dir(path: Path, dtype_name: str) -> str:
    """sha256 over (file name, file sha256) for the model's defining files, plus the dtype."""
    path = Path(path)
    files = sorted({f for pattern in _FINGERPRINT_PATTERNS for f in path.glob(pattern) if f.is_file()})
    digest = hashlib.sha256(b"promptvault-model-fingerprint/1\0")
    for f in files:
        digest.update(f"{f.name}\0{cached_sha256(f)}\0".encode())
    digest.update(f"dtype={dtype_name}".encode())
    return digest.hexdigest()
