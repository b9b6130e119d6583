"""A model loaded by mlx-lm itself, as promptvault's LoadedModel: `from_mlx_lm(model, tokenizer)`.

The vault keys stored caches by the model's fingerprint, which must change with anything that
changes the cache bytes: weights, tokenizer, chat template, dtype. With the model's directory
that is the hash of its files (models/fingerprint.py, as load_model computes it); without one it
is the hash of the weights as loaded, with the tokenizer's vocabulary and chat template: slower
(it reads every weight once) but it needs nothing but the objects.
"""

import hashlib
import json
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten

from promptvault.models.fingerprint import fingerprint_dir
from promptvault.models.load import LoadedModel


def from_mlx_lm(model, tokenizer, path=None, name: str | None = None) -> LoadedModel:
    """Wrap what `mlx_lm.load(path)` returned. `path`: what was given to mlx_lm.load (a local
    directory, or a Hugging Face id already downloaded): the fingerprint comes from its files,
    fast; None: from the weights and tokenizer."""
    dtype = weights_dtype(model)
    if path is not None:
        path = _local_dir(path)
        fingerprint = fingerprint_dir(path, dtype)
    else:
        fingerprint = weights_fingerprint(model, tokenizer, dtype)
    return LoadedModel(model, tokenizer, path, fingerprint, name or (path.name if path else type(model).__module__))


def _local_dir(path) -> Path:
    """The directory mlx_lm.load read: `path` itself, or the local copy of a Hugging Face id."""
    from promptvault.errors import ModelLoadError

    local = Path(path).expanduser()
    if local.is_dir():
        return local
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(str(path), local_files_only=True))
    except Exception:  # noqa: BLE001 - not an id, or not downloaded: one line either way
        raise ModelLoadError(f"{path} is neither a model directory nor a downloaded Hugging Face model "
                             "(give what mlx_lm.load was given, or path=None)") from None


def weights_dtype(model) -> str:
    """The dtype of the model's floating-point weights ("float32", "bfloat16", "float16")."""
    for _, w in tree_flatten(model.parameters()):
        if mx.issubdtype(w.dtype, mx.floating):
            return str(w.dtype).removeprefix("mlx.core.")
    return "none"


def weights_fingerprint(model, tokenizer, dtype: str) -> str:
    """sha256 over every weight's name, shape, dtype and bytes, the tokenizer's vocabulary and
    chat template, and the dtype."""
    h = hashlib.sha256(b"promptvault-model-fingerprint/weights/1\0")
    for name, w in sorted(tree_flatten(model.parameters()), key=lambda kv: kv[0]):
        h.update(f"{name}\0{w.dtype}\0{list(w.shape)}\0".encode())
        a = w.view(mx.uint16) if w.dtype == mx.bfloat16 else w
        h.update(np.ascontiguousarray(np.asarray(a)).tobytes())
    if tokenizer is not None:
        vocab = tokenizer.get_vocab() if hasattr(tokenizer, "get_vocab") else {}
        h.update(json.dumps(sorted(vocab.items()), ensure_ascii=False).encode())
        h.update(str(getattr(tokenizer, "chat_template", None)).encode())
    h.update(f"dtype={dtype}".encode())
    return h.hexdigest()
