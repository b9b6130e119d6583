"""promptvault: compressed on-disk prompt caches for MLX / mlx-lm.

    import mlx_lm, promptvault
    model, tokenizer = mlx_lm.load(path)
    lm = promptvault.from_mlx_lm(model, tokenizer, path)
    vault = promptvault.Vault("~/.cache/promptvault")
    cache, rest = vault.fetch(lm, tokens)         # the longest stored prefix, and what is left
    ... mlx_lm.generate(model, tokenizer, rest, prompt_cache=cache) ...
    vault.save(lm, cache, tokens)                 # store the new blocks

The names load on first use, so `import promptvault` is cheap and, where MLX has no backend
(Linux without the [cpu] or [cuda] extra), fails with one line that says what to install.
"""

import importlib
from typing import TYPE_CHECKING

__version__ = "0.1.0"

# public name -> module that defines it
_API = {
    "Vault": "promptvault.vault.vault",
    "LookupResult": "promptvault.vault.store",
    "RestoreResult": "promptvault.vault.store",
    "StoreResult": "promptvault.vault.results",
    "VaultStats": "promptvault.vault.results",
    "NamespaceStats": "promptvault.vault.results",
    "VerifyResult": "promptvault.vault.results",
    "GcResult": "promptvault.vault.results",
    "RmResult": "promptvault.vault.results",
    "ReindexResult": "promptvault.vault.results",
    "Settings": "promptvault.vault.results",
    "Warmed": "promptvault.vault.results",
    "ChunkInfo": "promptvault.vault.results",
    "Description": "promptvault.vault.results",
    "load_model": "promptvault.models.load",
    "LoadedModel": "promptvault.models.load",
    "from_mlx_lm": "promptvault.models.wrap",
    "KVCodec": "promptvault.codec.spec",
    "CodecSpec": "promptvault.codec.spec",
    "DEFAULT_CODEC": "promptvault.codec.spec",
    "PromptvaultError": "promptvault.errors",
    "ModelLoadError": "promptvault.errors",
    "UnsupportedModelError": "promptvault.errors",
    "MissingBackendError": "promptvault.errors",
    "VaultError": "promptvault.vault.errors",
    "VaultPathError": "promptvault.vault.errors",
    "VaultReadOnlyError": "promptvault.vault.errors",
    "VaultSettingsError": "promptvault.vault.errors",
    "CapTooSmallError": "promptvault.vault.errors",
    "UnsupportedCacheError": "promptvault.vault.caches",
    "RemoteTier": "promptvault.vault.remote",
    "RemoteError": "promptvault.vault.remote",
    "LiveCaches": "promptvault.vault.live",
    "Fetched": "promptvault.vault.live",
}

__all__ = ["__version__", *_API]


def __getattr__(name: str):
    module = _API.get(name)
    if module is None:
        raise AttributeError(f"module 'promptvault' has no attribute {name!r}")
    try:
        value = getattr(importlib.import_module(module), name)
    except ImportError as e:
        from promptvault.errors import BACKEND_HINT, MissingBackendError, missing_backend

        if missing_backend(e):
            raise MissingBackendError(BACKEND_HINT) from None
        raise
    globals()[name] = value
    return value


def __dir__():
    return sorted([*globals(), *_API])


if TYPE_CHECKING:  # what the names are, for type checkers and editors
    from promptvault.codec.spec import DEFAULT_CODEC, CodecSpec, KVCodec
    from promptvault.errors import MissingBackendError, ModelLoadError, PromptvaultError, UnsupportedModelError
    from promptvault.models.load import LoadedModel, load_model
    from promptvault.models.wrap import from_mlx_lm
    from promptvault.vault.errors import (CapTooSmallError, VaultError, VaultPathError, VaultReadOnlyError,
                                         VaultSettingsError)
    from promptvault.vault.results import (ChunkInfo, Description, GcResult, NamespaceStats, ReindexResult,
                                           RmResult, Settings, StoreResult, VaultStats, VerifyResult, Warmed)
    from promptvault.vault.caches import UnsupportedCacheError
    from promptvault.vault.live import Fetched, LiveCaches
    from promptvault.vault.remote import RemoteError, RemoteTier
    from promptvault.vault.store import LookupResult, RestoreResult
    from promptvault.vault.vault import Vault
