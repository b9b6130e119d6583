"""The vault: compressed prompt caches on disk, in chained token blocks (see vault.py)."""

from promptvault.vault.errors import (CapTooSmallError, VaultError, VaultPathError, VaultReadOnlyError,
                                     VaultSettingsError)
from promptvault.vault.vault import (
    DEFAULT_BLOCK_SIZE,
    DEFAULT_CODEC,
    DEFAULT_RAM_CAP,
    LookupResult,
    RestoreResult,
    StoreResult,
    Vault,
)

__all__ = ["CapTooSmallError", "DEFAULT_BLOCK_SIZE", "DEFAULT_CODEC", "DEFAULT_RAM_CAP", "LookupResult",
           "RestoreResult", "StoreResult", "Vault", "VaultError", "VaultPathError", "VaultReadOnlyError",
           "VaultSettingsError"]
