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


@migrations()
def m003_heads_totals_usage(db):
    """Lookups, stats and the disk cap that do not grow with the vault.

    - `chunks.head`: the chunk's first 16 tokens as uint32 big-endian (byte order = token
      order), indexed after (namespace, parent) with last_used, so the sibling sharing the most
      leading tokens with a prompt is found by two ordered neighbour probes instead of a scan of
      every sibling (`promptvault.vault.lookup` says how). It replaces the (namespace, parent)
      index, of which it is an extension.
    - `totals`: chunks, bytes, tokens and hits per namespace, kept by triggers on `chunks`, so
      stats read one row per namespace whichever process wrote the chunks.
    - `usage`: the disk cap's running count (`promptvault.vault.tiers`): the allocated size of the
      indexed shards, kept by the same triggers, plus a baseline for every other file measured by
      the last full walk. No row until the first walk.
    """
    # The head in SQL (byte-reversed 4-byte groups of `tokens`; `index.head_of` is the same in
    # numpy): rows that come without one (written by an older promptvault sharing the vault)
    # get it from a trigger, so no sibling is ever invisible to the head probes.
    reversed_bytes = (f"substr({{t}}, {4 * i + 4 - j}, 1)" for i in range(16) for j in range(4))
    head = f"CAST({' || '.join(reversed_bytes)} AS BLOB)"
    db["chunks"].add_column("head", bytes)
    db.execute(f"UPDATE chunks SET head = {head.format(t='tokens')}")
    db.execute(f"""
        CREATE TRIGGER chunks_head AFTER INSERT ON chunks WHEN NEW.head IS NULL BEGIN
            UPDATE chunks SET head = {head.format(t='NEW.tokens')} WHERE key = NEW.key;
        END""")
    db.execute("DROP INDEX IF EXISTS idx_chunks_namespace_parent")
    db.execute("CREATE INDEX idx_chunks_head ON chunks (namespace, parent, head, last_used)")
    db["totals"].create({"namespace": str, "chunks": int, "bytes": int, "tokens": int, "hits": int},
                        pk="namespace")
    db.execute("INSERT INTO totals SELECT n.id, count(c.key), coalesce(sum(c.bytes), 0), "
               "coalesce(sum(c.n_tokens), 0), coalesce(sum(c.hits), 0) "
               "FROM namespaces n LEFT JOIN chunks c ON c.namespace = n.id GROUP BY n.id")
    db.execute("INSERT OR IGNORE INTO totals SELECT namespace, count(*), sum(bytes), sum(n_tokens), sum(hits) "
               "FROM chunks GROUP BY namespace")
    # shards: sum over indexed chunks of bytes rounded up to `unit` (the filesystem's block);
    # other: every other file under the vault at the last walk, minus what is measured live.
    db["usage"].create({"id": int, "shards": int, "other": int, "unit": int, "measured": float}, pk="id")
    alloc = "((({r}.bytes + u.unit - 1) / u.unit) * u.unit)"
    db.execute(f"""
        CREATE TRIGGER chunks_added AFTER INSERT ON chunks BEGIN
            INSERT OR IGNORE INTO totals VALUES (NEW.namespace, 0, 0, 0, 0);
            UPDATE totals SET chunks = chunks + 1, bytes = bytes + NEW.bytes,
                tokens = tokens + NEW.n_tokens, hits = hits + NEW.hits WHERE namespace = NEW.namespace;
            UPDATE usage SET shards = shards + (SELECT {alloc.format(r="NEW")} FROM usage u WHERE u.id = 1)
                WHERE id = 1;
        END""")
    db.execute(f"""
        CREATE TRIGGER chunks_removed AFTER DELETE ON chunks BEGIN
            UPDATE totals SET chunks = chunks - 1, bytes = bytes - OLD.bytes,
                tokens = tokens - OLD.n_tokens, hits = hits - OLD.hits WHERE namespace = OLD.namespace;
            UPDATE usage SET shards = shards - (SELECT {alloc.format(r="OLD")} FROM usage u WHERE u.id = 1)
                WHERE id = 1;
        END""")
    db.execute("""
        CREATE TRIGGER chunks_hit AFTER UPDATE OF hits ON chunks BEGIN
            UPDATE totals SET hits = hits + NEW.hits - OLD.hits WHERE namespace = NEW.namespace;
        END""")
