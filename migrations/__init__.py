"""Schema of the vault index (SQLite), as an ordered `sqlite_utils.Migrations` set.

Never edit a migration once released: add a new one below it. The index only caches what the
shard files say (see `promptvault.vault.index`), so a migration may also be replaced by deleting
the index and running `reindex`, but vaults in the field upgrade in place through this list.
"""

from sqlite_utils import Migrations

migrations = Migrations("promptvault")


@migrations()
def m001_initial(db):
    """Namespaces, chunks (blocks and tail leaves), warmed prompts and state snapshots."""
    db["namespaces"].create({"id": str, "descriptor": str, "created": float}, pk="id")
    db["chunks"].create(
        {
            "key": str,  # chained blake2b-256 hex (promptvault.vault.keys)
            "namespace": str,
            "parent": str,  # key of the previous block; NULL for a prompt's first block
            "position": int,  # index of the first token
            "n_tokens": int,  # == block size for blocks, fewer for a tail leaf
            "tokens": bytes,  # uint32-LE, for token-level longest common prefix
            "file": str,  # path relative to the vault's shard directory
            "bytes": int,
            "checksum": str,
            "created": float,
            "last_used": float,
            "hits": int,
        },
        pk="key",
        not_null={"namespace", "position", "n_tokens", "tokens", "file", "bytes", "checksum"},
        defaults={"hits": 0},
        foreign_keys=[("namespace", "namespaces", "id")],
    )
    db["chunks"].create_index(["namespace", "parent"])
    db["chunks"].create_index(["parent"])
    db["chunks"].create_index(["last_used"])
    db["warmed"].create(
        {"id": int, "namespace": str, "label": str, "source": str, "n_tokens": int,
         "last_key": str, "created": float},
        pk="id",
    )
    db["warmed"].create_index(["label"])
    # Recurrent (ArraysCache-style) layers can only be restored exactly where their state was
    # taken: one row per chunk whose shard carries such a snapshot at `position`.
    db["snapshots"].create(
        {"key": str, "namespace": str, "position": int}, pk="key",
        foreign_keys=[("key", "chunks", "key")],
    )


@migrations()
def m002_warmed_last_key(db):
    """Index warmed prompts by their last chunk. Every warm checks for its own row before adding
    it (`Index.add_warmed`), and gc drops prompts whose last chunk is gone: by last_key both."""
    db["warmed"].create_index(["last_key"], if_not_exists=True)
