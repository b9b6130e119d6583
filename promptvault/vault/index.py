"""The SQLite index: a fast, rebuildable map from chunk keys to shard files.

The shard files are the truth (each one carries its key, parent, namespace, tokens and checksum
in its metadata); this index only makes lookups cheap: children of a chunk, token lists for the
longest-common-prefix search, sizes and recency for eviction, hit counts for stats. If it is lost
or stale, `Vault.reindex` rebuilds it from the files (LMCache's most reported bug was a disk cache
that became invisible after a restart).

Several processes may share one vault: the database runs in WAL mode with a busy timeout, chunk
rows go in with INSERT OR IGNORE (two writers of the same chunk both succeed), and the schema
migrations (`promptvault.migrations`) run under an exclusive file lock.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path
from typing import Iterable

import numpy as np
import sqlite_utils

from promptvault.migrations import migrations
from promptvault.vault.namespace import Namespace, canonical_json

HEAD_TOKENS = 16  # leading tokens of a chunk kept in `chunks.head` (fixed by migration m003's SQL)
BUSY_TIMEOUT_MS = 30_000
WAL_LIMIT = 4 * 2**20  # bytes a checkpointed WAL is truncated to
_CHUNK_COLS = ("key", "namespace", "parent", "position", "n_tokens", "tokens", "file", "bytes",
               "checksum", "created", "last_used", "hits", "head")


def head_of(tokens: bytes) -> bytes:
    """`chunks.head` of a chunk whose tokens are `tokens` (uint32-LE): its first HEAD_TOKENS
    tokens as uint32 big-endian, so that SQLite's byte order of heads is the tokens' order and
    the siblings next to a prompt in that order share the most leading tokens with it."""
    return np.frombuffer(tokens, dtype="<u4")[:HEAD_TOKENS].astype(">u4").tobytes()


class Index:
    def __init__(self, path: Path | None, read_only: bool = False):
        """Open (and create or migrate) the index at `path`. read_only: open it without writing
        anything (a vault on a read-only filesystem, or another user's); None: in memory."""
        self.path = Path(path) if path is not None else None
        self.read_only = read_only
        if path is None:
            self.db = sqlite_utils.Database(memory=True)
            migrations.apply(self.db)
            return
        if read_only:
            self.db = sqlite_utils.Database(_read_only_connection(self.path))
            if list(migrations.pending(self.db)):
                raise sqlite3.OperationalError(
                    "the index has an older schema and the vault is read-only: open it once with write access")
            return
        if not self.path.exists():
            os.close(os.open(self.path, os.O_CREAT | os.O_WRONLY, 0o600))  # WAL/SHM inherit 0600
        self.db = sqlite_utils.Database(str(self.path))
        self.db.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
        self.db.execute(f"PRAGMA journal_size_limit = {WAL_LIMIT}")
        # WAL + NORMAL stays consistent on power loss and skips an fsync per commit (every restore
        # commits its hit counts); at worst the last rows are lost, and the files still hold them.
        self.db.execute("PRAGMA synchronous = NORMAL")
        with open(self.path.with_name(self.path.name + ".lock"), "a") as lock:
            os.chmod(lock.name, 0o600)
            fcntl.flock(lock, fcntl.LOCK_EX)
            self.db.enable_wal()
            migrations.apply(self.db)

    def checkpoint(self) -> None:
        """Fold the WAL back into the database and truncate it (it counts against the disk cap)."""
        if self.read_only or self.path is None:
            return
        try:
            self.db.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        except sqlite3.OperationalError:  # another process is busy: a later checkpoint does it
            pass

    def close(self) -> None:
        self.checkpoint()
        self.db.close()

    def _write(self, sql: str, params: Iterable = ()) -> int:
        with self.db.conn:
            return self.db.conn.execute(sql, tuple(params)).rowcount

    def _rows(self, sql: str, params: Iterable = ()) -> list[dict]:
        cur = self.db.conn.execute(sql, tuple(params))
        cols = [c[0] for c in cur.description]
        return [dict(zip(cols, r)) for r in cur.fetchall()]

    # namespaces
    def add_namespace(self, ns: Namespace) -> None:
        self._write("INSERT OR IGNORE INTO namespaces (id, descriptor, created) VALUES (?, ?, ?)",
                    (ns.id, canonical_json(ns.descriptor), time.time()))

    def namespaces(self) -> list[dict]:
        rows = self._rows("SELECT * FROM namespaces ORDER BY created")
        for r in rows:
            r["descriptor"] = json.loads(r["descriptor"])
        return rows

    # chunks
    def add_chunk(self, row: dict, snapshot: bool = False) -> bool:
        """Record a chunk as its file on disk now is; True if the key was new to the index.

        The file is the truth: a row already there (stale, from a file since evicted and
        published again by another writer) takes the file's name, size and checksum, and keeps
        its own recency and hit count.
        """
        now = time.time()
        row = {"created": now, "last_used": now, "hits": 0, **row, "head": head_of(row["tokens"])}
        with self.db.conn:
            cur = self.db.conn.execute(
                f"INSERT INTO chunks ({', '.join(_CHUNK_COLS)}) "
                f"VALUES ({', '.join('?' * len(_CHUNK_COLS))}) ON CONFLICT(key) DO NOTHING",
                [row[c] for c in _CHUNK_COLS])
            inserted = cur.rowcount == 1
            if not inserted:
                self.db.conn.execute(
                    "UPDATE chunks SET file = ?, bytes = ?, checksum = ? WHERE key = ? AND "
                    "(file IS NOT ? OR bytes IS NOT ? OR checksum IS NOT ?)",
                    (row["file"], row["bytes"], row["checksum"], row["key"],
                     row["file"], row["bytes"], row["checksum"]))
            if snapshot:
                self.db.conn.execute(
                    "INSERT OR IGNORE INTO snapshots (key, namespace, position) VALUES (?, ?, ?)",
                    (row["key"], row["namespace"], row["position"] + row["n_tokens"]))
        return inserted

    def add_chunks(self, rows: Iterable[dict]) -> None:
        """Insert many chunk rows (no snapshots) in one transaction, ignoring keys already there."""
        now = time.time()

        def values(r):
            r = {"created": now, "last_used": now, "hits": 0, **r, "head": head_of(r["tokens"])}
            return [r[c] for c in _CHUNK_COLS]

        with self.db.conn:
            self.db.conn.executemany(
                f"INSERT OR IGNORE INTO chunks ({', '.join(_CHUNK_COLS)}) VALUES ({', '.join('?' * len(_CHUNK_COLS))})",
                map(values, rows))

    def chunk(self, key: str) -> dict | None:
        rows = self._rows("SELECT * FROM chunks WHERE key = ?", (key,))
        return rows[0] if rows else None

    def set_file(self, key: str, nbytes: int, checksum: str) -> None:
        """Make a row agree with its (self-checking) file: the file is the truth."""
        self._write("UPDATE chunks SET bytes = ?, checksum = ? WHERE key = ?", (nbytes, checksum, key))

    def chunk_times(self) -> dict[str, tuple]:
        """key -> (created, last_used, hits): what only the index knows, carried over a rebuild."""
        return {r[0]: r[1:] for r in self.db.conn.execute("SELECT key, created, last_used, hits FROM chunks")}

    def restore_chunk_times(self, times: dict[str, tuple]) -> None:
        with self.db.conn:
            self.db.conn.executemany("UPDATE chunks SET created = ?, last_used = ?, hits = ? WHERE key = ?",
                                     [(*v, k) for k, v in times.items()])

    def chunk_bytes_range(self) -> tuple[int, int] | None:
        """(smallest, largest) chunk file size, or None when no chunk is indexed."""
        lo, hi = self.db.conn.execute("SELECT min(bytes), max(bytes) FROM chunks").fetchone()
        return None if lo is None else (lo, hi)

    def any_chunk(self) -> bool:
        return self.db.conn.execute("SELECT 1 FROM chunks LIMIT 1").fetchone() is not None

    def existing(self, keys: list[str]) -> set[str]:
        found: set[str] = set()
        for i in range(0, len(keys), 500):
            part = keys[i : i + 500]
            found.update(r["key"] for r in self._rows(
                f"SELECT key FROM chunks WHERE key IN ({','.join('?' * len(part))})", part))
        return found

    def nearest_children(self, namespace: str, parent: str | None, head: bytes, limit: int) -> list[dict]:
        """Children of `parent` that may share the most leading tokens with a continuation whose
        head (see `head_of`) is `head`: up to `limit` of those with exactly that head, most
        recently used first; if there are none, the children just before and just after it in
        head order (a sibling sharing more tokens than both cannot exist). Three index probes,
        however many children `parent` has."""
        where = "namespace = ? AND parent IS ? AND head"
        rows = self._rows(f"SELECT * FROM chunks WHERE {where} = ? ORDER BY last_used DESC LIMIT ?",
                          (namespace, parent, head, limit))
        if rows:
            return rows
        return [*self._rows(f"SELECT * FROM chunks WHERE {where} < ? ORDER BY head DESC LIMIT 1",
                            (namespace, parent, head)),
                *self._rows(f"SELECT * FROM chunks WHERE {where} > ? ORDER BY head LIMIT 1",
                            (namespace, parent, head))]

    def chunks(self, keys: list[str]) -> list[dict]:
        """The rows of those of `keys` that are indexed (any order)."""
        return self._rows(f"SELECT * FROM chunks WHERE key IN ({','.join('?' * len(keys))})", keys) if keys else []

    def children_of(self, key: str) -> list[str]:
        return [r["key"] for r in self._rows("SELECT key FROM chunks WHERE parent = ?", (key,))]

    def has_snapshot(self, key: str) -> bool:
        return bool(self._rows("SELECT 1 FROM snapshots WHERE key = ?", (key,)))

    def touch(self, keys: list[str]) -> None:
        if keys:
            self._write(f"UPDATE chunks SET hits = hits + 1, last_used = ? "
                        f"WHERE key IN ({','.join('?' * len(keys))})", [time.time(), *keys])

    def delete_chunks(self, keys: list[str]) -> None:
        with self.db.conn:
            for key in keys:
                self.db.conn.execute("DELETE FROM chunks WHERE key = ?", (key,))
                self.db.conn.execute("DELETE FROM snapshots WHERE key = ?", (key,))

    def eviction_candidates(self, limit: int = 64, exclude: Iterable[str] = ()) -> list[dict]:
        """Least recently used chunks that no other chunk extends (leaves before their parents)."""
        exclude = list(exclude)
        return self._rows(
            "SELECT key, file, bytes FROM chunks c WHERE NOT EXISTS "
            "(SELECT 1 FROM chunks d WHERE d.parent = c.key) "
            f"AND key NOT IN ({','.join('?' * len(exclude))}) ORDER BY last_used, position DESC LIMIT ?",
            [*exclude, limit])

    def all_chunks(self, namespace: str | None = None) -> list[dict]:
        if namespace is None:
            return self._rows("SELECT key, namespace, file, bytes, checksum FROM chunks")
        return self._rows("SELECT key, namespace, file, bytes, checksum FROM chunks WHERE namespace = ?",
                          (namespace,))

    # warmed prompts
    def add_warmed(self, namespace: str, label: str | None, source: str | None, n_tokens: int,
                   last_key: str, created: float | None = None) -> dict | None:
        """Record a warmed prompt unless the same (last chunk, label, source) is there; returns the
        new row, or None if it was already recorded."""
        row = {"namespace": namespace, "label": label, "source": source, "n_tokens": n_tokens,
               "last_key": last_key, "created": time.time() if created is None else created}
        n = self._write("INSERT INTO warmed (namespace, label, source, n_tokens, last_key, created) "
                        "SELECT ?, ?, ?, ?, ?, ? WHERE NOT EXISTS (SELECT 1 FROM warmed WHERE last_key = ? "
                        "AND label IS ? AND source IS ?)",
                        (namespace, label, source, n_tokens, last_key, row["created"], last_key, label, source))
        return row if n == 1 else None

    def warmed(self) -> list[dict]:
        return self._rows("SELECT * FROM warmed ORDER BY id")

    def warmed_count(self) -> int:
        return self.db.conn.execute("SELECT count(*) FROM warmed").fetchone()[0]

    def delete_warmed(self, ids: list[int]) -> None:
        with self.db.conn:
            for i in ids:
                self.db.conn.execute("DELETE FROM warmed WHERE id = ?", (i,))

    def stats(self) -> list[dict]:
        """Chunks, bytes, tokens and hits per namespace, from the running totals that triggers on
        `chunks` keep (migration m003): one row read per namespace, whatever the vault's size."""
        return self._rows(
            "SELECT n.id AS namespace, coalesce(t.chunks, 0) AS chunks, coalesce(t.bytes, 0) AS bytes, "
            "coalesce(t.tokens, 0) AS tokens, coalesce(t.hits, 0) AS hits "
            "FROM namespaces n LEFT JOIN totals t ON t.namespace = n.id ORDER BY n.created")

    # disk usage (the running count behind the disk cap: promptvault.vault.tiers)
    def usage(self) -> dict | None:
        """The running count's row (shards, other, unit, measured), or None if never measured."""
        rows = self._rows("SELECT shards, other, unit, measured FROM usage WHERE id = 1")
        return rows[0] if rows else None

    def set_usage(self, walked: int, live: int, unit: int, recent: dict[str, int] | None = None) -> None:
        """Restart the running count from a full walk: `walked` bytes under the vault, of which
        `live` are measured afresh each time (index files, quarantine). The indexed shards are
        recounted in the same transaction, so chunks added or removed meanwhile by other
        processes are not lost; what is neither goes to `other` (never below 0). `recent` (chunk
        key -> bytes) are young files the walk saw: those still without a row are in flight and
        left out, since their rows will count them (looked up under the write lock, so a row
        cannot land between the look and the recount)."""
        with self.db.conn:
            self.db.conn.execute("INSERT OR IGNORE INTO usage VALUES (1, 0, 0, ?, 0)", (unit,))
            if recent:
                indexed = {r[0] for r in self.db.conn.execute(
                    "SELECT key FROM chunks WHERE key IN (SELECT value FROM json_each(?))", [json.dumps(list(recent))])}
                walked -= sum(size for key, size in recent.items() if key not in indexed)
            self.db.conn.execute(
                "UPDATE usage SET unit = ?1, measured = ?2, "
                "shards = (SELECT coalesce(sum(((bytes + ?1 - 1) / ?1) * ?1), 0) FROM chunks) WHERE id = 1", (unit, time.time()))
            self.db.conn.execute("UPDATE usage SET other = max(0, ? - shards) WHERE id = 1", (walked - live,))

    def clear(self) -> None:
        """Forget every chunk and namespace (reindex refills them from the files)."""
        with self.db.conn:
            for table in ("snapshots", "chunks", "namespaces", "totals"):
                self.db.conn.execute(f"DELETE FROM {table}")


def _read_only_connection(path: Path) -> sqlite3.Connection:
    """A connection that never writes: mode=ro sees other writers' WAL when the -shm is usable;
    where it is not (a read-only filesystem, no -shm), the file is opened as immutable."""
    uri = path.resolve().as_uri()
    for flags in ("mode=ro", "mode=ro&immutable=1"):
        conn = sqlite3.connect(f"{uri}?{flags}", uri=True)
        try:
            conn.execute(f"PRAGMA busy_timeout = {BUSY_TIMEOUT_MS}")
            conn.execute("SELECT count(*) FROM sqlite_master").fetchone()
            return conn
        except sqlite3.OperationalError:
            conn.close()
            if "immutable" in flags:
                raise
    raise AssertionError("unreachable")


def corrupt(error: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is damaged or not a database (not merely busy, full or read-only).
    A garbled header's schema format number is reported as a plain SQLITE_ERROR, "unsupported
    file format": damage too."""
    if "unsupported file format" in str(error):
        return True
    name = getattr(error, "sqlite_errorname", None)
    if name is not None:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    return any(s in str(error) for s in ("malformed", "not a database"))
