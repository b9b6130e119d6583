"""The vault: compressed prompt caches on disk, in chained token blocks (see vault.py)."""

from promptvault.vault.errors import (CapTooSmallError, VaultError, VaultPathError, VaultReadOnlyError,
                                     VaultSettingsError)
from promptvault.vault.results import (ChunkInfo, Description, GcResult, NamespaceStats, ReindexResult, RmResult,
                                       Settings, StoreResult, VaultStats, VerifyResult, Warmed)
from promptvault.vault.vault import DEFAULT_BLOCK_SIZE, DEFAULT_RAM_CAP, LookupResult, RestoreResult, Vault

__all__ = ["CapTooSmallError", "ChunkInfo", "DEFAULT_BLOCK_SIZE", "DEFAULT_RAM_CAP", "Description", "GcResult",
           "LookupResult", "NamespaceStats", "ReindexResult", "RestoreResult", "RmResult", "Settings",
           "StoreResult", "Vault", "VaultError", "VaultPathError", "VaultReadOnlyError", "VaultSettingsError",
           "VaultStats", "VerifyResult", "Warmed"]
