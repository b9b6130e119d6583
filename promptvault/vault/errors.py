"""Vault errors people see (one line each, printed by the CLI without a stack trace)."""

from promptvault.errors import PromptvaultError


class VaultError(PromptvaultError):
    """Base class for vault failures."""


class VaultPathError(VaultError):
    """The vault directory cannot be created, read or written."""


class VaultReadOnlyError(VaultPathError):
    """A write (warm, save, gc, rm, reindex) to a vault opened read-only (no write access)."""


class VaultSettingsError(VaultError):
    """Settings that contradict the vault's fixed ones, or make no sense (e.g. block size 0)."""


class CapTooSmallError(VaultError):
    """A byte cap too small to hold even one block."""
