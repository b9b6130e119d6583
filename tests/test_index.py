"""SQLite index (migrations, WAL, insert-or-ignore, leaf-first eviction order), chained keys and
the lookup plan (full blocks, token-level LCP inside the next block, exact leaves)."""

import hashlib
import sqlite3
import struct

import numpy as np
import pytest
import sqlite_utils

from promptvault.migrations import migrations
from promptvault.vault.index import Index, corrupt
from promptvault.vault.keys import block_keys, chunk_key, tokens_to_bytes
from promptvault.vault.lookup import plan
from promptvault.vault.namespace import make_namespace

NS = make_namespace(model_fingerprint="m", kv_dtype="float16", layout={"layers": [{"type": "KVCache"}]},
                    block_size=4, codec={"keys": {"codec": "lossless/1"}})


def test_migrations_create_schema_once(tmp_path):
    path = tmp_path / "index.sqlite"
    Index(path).close()
    Index(path).close()  # reopening applies nothing twice
    db = sqlite_utils.Database(str(path))
    assert {"namespaces", "chunks", "warmed", "snapshots"} <= set(db.table_names())
    assert [m.name for m in migrations.applied(db)] == [m.name for m in migrations._migrations]
    assert not migrations.pending(db)
    assert db.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert oct(path.stat().st_mode & 0o777) == "0o600"


def test_keys_follow_the_definition():
    toks = list(range(10))
    keys = block_keys(NS.digest, toks, 4)
    assert len(keys) == 2  # the 2-token tail is not a full block
    h0 = hashlib.blake2b(bytes(32) + NS.digest + struct.pack("<4I", 0, 1, 2, 3), digest_size=32).hexdigest()
    h1 = hashlib.blake2b(bytes.fromhex(h0) + NS.digest + struct.pack("<4I", 4, 5, 6, 7), digest_size=32).hexdigest()
    assert keys == [h0, h1]
    other = make_namespace(model_fingerprint="m2", kv_dtype="float16", layout={"layers": []}, block_size=4, codec={})
    assert block_keys(other.digest, toks, 4)[0] != h0
    assert block_keys(NS.digest, [9] + toks[1:], 4)[1] != h1  # the chain carries the whole prefix
    assert chunk_key(h1, NS.digest, [8, 9]) != chunk_key(h1, NS.digest, [8, 9, 0])


def _add(index, toks, start, parent):
    key = chunk_key(parent, NS.digest, toks)
    index.add_chunk({"key": key, "namespace": NS.id, "parent": parent, "position": start,
                     "n_tokens": len(toks), "tokens": tokens_to_bytes(toks), "file": key, "bytes": 1,
                     "checksum": "c"})
    return key


def test_insert_or_ignore_and_leaf_first_eviction(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    index.add_namespace(NS)
    k0 = _add(index, [1, 2, 3, 4], 0, None)
    assert not index.add_chunk({**index.chunk(k0)})  # second put of the same chunk: ignored
    k1 = _add(index, [5, 6, 7, 8], 4, k0)
    leaf = _add(index, [9], 8, k1)
    other = _add(index, [7, 7], 4, k0)
    index.touch([other])  # most recently used
    order = []
    while rows := index.eviction_candidates(limit=1):
        order.append(rows[0]["key"])
        index.delete_chunks([rows[0]["key"]])
    assert order.index(leaf) < order.index(k1) < order.index(k0)
    assert order.index(other) < order.index(k0)


def test_plan_blocks_lcp_and_leaves(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    index.add_namespace(NS)
    k0 = _add(index, [1, 2, 3, 4], 0, None)
    k1 = _add(index, [5, 6, 7, 8], 4, k0)
    leaf = _add(index, [9, 10, 11], 8, k1)
    q = lambda toks: plan(index, NS, np.array(toks))
    p = q([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11])  # the stored prompt itself: all but the last token
    assert p.reuse == 10 and [r["key"] for r in p.chunks] == [k0, k1, leaf]
    p = q([1, 2, 3, 4, 5, 6, 0, 0, 0])  # diverges inside block 1: LCP reuses its first 2 tokens
    assert p.reuse == 6 and [r["key"] for r in p.chunks] == [k0, k1]
    p = q([1, 2, 3, 4, 5, 6, 7, 8])  # exactly two blocks: the last token is recomputed
    assert p.reuse == 7 and [r["key"] for r in p.chunks] == [k0, k1]
    p = q([1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13])  # longer prompt: blocks + the whole leaf
    assert p.reuse == 11
    assert q([2, 2, 3, 4, 5]).reuse == 0
    assert q([1]).reuse == 0
    try:
        index.db.execute("INSERT INTO chunks (key) VALUES ('x')")
        raise AssertionError("NOT NULL constraints missing")
    except sqlite3.IntegrityError:
        pass


def test_a_garbled_schema_format_number_counts_as_corruption(tmp_path):
    """SQLite reports a header whose schema format number is out of range as a plain
    SQLITE_ERROR ("unsupported file format"); the vault must treat it as a damaged index (set it
    aside and rebuild from the shards), not as a setting it cannot use."""
    path = tmp_path / "index.sqlite"
    with sqlite3.connect(path) as db:
        db.execute("create table t(x)")
    data = bytearray(path.read_bytes())
    data[47] = 0xFF  # last byte of the schema format number (header offset 44, 4 bytes)
    path.write_bytes(bytes(data))
    with pytest.raises(sqlite3.DatabaseError) as err:
        sqlite3.connect(path).execute("select * from t").fetchall()
    assert "unsupported file format" in str(err.value)
    assert corrupt(err.value)
    assert not corrupt(sqlite3.OperationalError("database is locked"))
