"""Lookup, stats and the disk cap's accounting do not grow with the vault: the sibling search by
16-token heads, per-namespace totals and the running disk usage kept by triggers (migration
m003), the migration of an older index, and the running count against a real walk after two
processes wrote and evicted. Work is counted in SQLite VM steps (deterministic), never timed."""

import multiprocessing as mp

import numpy as np
import sqlite_utils

from promptvault.migrations import migrations
from promptvault.vault import Vault
from promptvault.vault.index import HEAD_TOKENS, Index, head_of
from promptvault.vault.keys import chunk_key, tokens_to_bytes
from promptvault.vault.lookup import plan
from promptvault.vault.namespace import make_namespace
from promptvault.vault.tiers import disk_usage
from test_vault_tiny import LOSSLESS_KV, prompt, tiny_llama

B = 64
NS = make_namespace(model_fingerprint="m", kv_dtype="float16", layout={"layers": [{"type": "KVCache"}]},
                    block_size=B, codec={"keys": {"codec": "lossless/1"}})
EXACT = make_namespace(model_fingerprint="m", kv_dtype="float16", layout={"layers": [{"type": "ArraysCache"}]},
                       block_size=B, codec={"keys": {"codec": "lossless/1"}})
RNG = np.random.default_rng(0)


def _toks(n):
    return RNG.integers(1, 2**31, n)


def _add(index, ns, toks, start=0, parent=None, snapshot=False):
    key = chunk_key(parent, ns.digest, toks)
    index.add_chunk({"key": key, "namespace": ns.id, "parent": parent, "position": start, "n_tokens": len(toks),
                     "tokens": tokens_to_bytes(toks), "file": key, "bytes": 100 + len(toks), "checksum": "c"},
                    snapshot=snapshot)
    return key


def _steps(index, fn):
    """SQLite VM instructions (in tens) that fn() runs on the index's connection."""
    count = [0]

    def tick():
        count[0] += 1
        return 0

    index.db.conn.set_progress_handler(tick, 10)
    try:
        result = fn()
    finally:
        index.db.conn.set_progress_handler(None, 0)
    return count[0], result


def _filled(siblings):
    index = Index(None)
    for ns in (NS, EXACT):
        index.add_namespace(ns)
    firsts = [_toks(B) for _ in range(siblings)]
    with index.db.conn:  # one transaction: fast
        for t in firsts:
            _add(index, NS, t)
    return index, firsts


def test_head_probes_find_the_longest_sibling_among_many():
    index, firsts = _filled(3000)
    target = firsts[1234]
    q = lambda toks: plan(index, NS, np.asarray(toks))  # noqa: E731
    p = q([*target[:40], *_toks(100)])  # shares 40 (>= 16) tokens with one of 3000 first blocks
    assert p.reuse == 40 and p.chunks[0]["tokens"] == tokens_to_bytes(target)
    p = q([*firsts[7][:10], *_toks(100)])  # shares only 10 (< 16): found by the neighbour probes
    assert p.reuse == 10 and p.chunks[0]["tokens"] == tokens_to_bytes(firsts[7])
    assert q(_toks(100)).reuse == 0
    leaf = _add(index, NS, target[:5])  # an exact 5-token leaf next to its 64-token sibling
    assert q([*target[:5], *_toks(3)]).reuse == 5
    assert q([*target, *_toks(3)]).chunks[0]["key"] != leaf  # the whole block is the longer match
    # Siblings sharing 20 tokens with the prompt: one shares 50 and is among the most recent.
    common = _toks(20)
    for _ in range(5):
        _add(index, NS, np.concatenate([common, _toks(B - 20)]))
    best = np.concatenate([common, _toks(B - 20)])
    _add(index, NS, best)
    assert q([*best[:50], *_toks(30)]).reuse == 50
    # Over 32 of them: an old leaf the prompt continues whole is still found (by key).
    old_leaf = np.concatenate([common, _toks(10)])
    _add(index, NS, old_leaf)
    index.db.execute("UPDATE chunks SET last_used = 0 WHERE key = ?", [chunk_key(None, NS.digest, old_leaf)])
    with index.db.conn:
        for _ in range(40):
            _add(index, NS, np.concatenate([common, _toks(B - 20)]))
    assert q([*old_leaf, *_toks(30)]).reuse == 30
    # The work does not depend on the number of siblings (the old scan read all 3000).
    small, small_firsts = _filled(30)
    for idx, tops in ((index, firsts), (small, small_firsts)):
        assert plan(idx, NS, np.asarray([*tops[3][:40], *_toks(50)])).reuse == 40
    many = _steps(index, lambda: plan(index, NS, np.asarray([*firsts[3][:40], *_toks(50)])))[0]
    few = _steps(small, lambda: plan(small, NS, np.asarray([*small_firsts[3][:40], *_toks(50)])))[0]
    miss_many = _steps(index, lambda: plan(index, NS, _toks(90)))[0]
    miss_few = _steps(small, lambda: plan(small, NS, _toks(90)))[0]
    assert many < 2 * few and miss_many < 2 * miss_few, (many, few, miss_many, miss_few)


def test_exact_namespaces_find_whole_leaves_by_key_among_many():
    index, _ = _filled(0)
    leaves = [_toks(int(n)) for n in RNG.integers(1, B, 500)]
    with index.db.conn:
        for t in leaves:
            _add(index, EXACT, t, snapshot=True)
    first = _add(index, EXACT, leaves[9][:3], snapshot=True)  # 3 tokens: shorter than a head
    for t in (leaves[42], leaves[9][:3]):
        p = plan(index, EXACT, np.asarray([*t, *_toks(5)]))
        assert p.reuse == len(t) and p.chunks[-1]["tokens"] == tokens_to_bytes(t)
    # A leaf sharing all but its last token is no use where state cannot be cut.
    assert plan(index, EXACT, np.asarray([*leaves[42][:-1], leaves[42][-1] + 1, 7])).reuse == 0
    assert index.chunk(first)["n_tokens"] == 3


def _fresh_stats(index):
    return index._rows(
        "SELECT n.id AS namespace, count(c.key) AS chunks, coalesce(sum(c.bytes), 0) AS bytes, "
        "coalesce(sum(c.n_tokens), 0) AS tokens, coalesce(sum(c.hits), 0) AS hits "
        "FROM namespaces n LEFT JOIN chunks c ON c.namespace = n.id GROUP BY n.id ORDER BY n.created")


def test_totals_follow_inserts_deletes_and_hits(tmp_path):
    index = Index(tmp_path / "i.sqlite")
    for ns in (NS, EXACT):
        index.add_namespace(ns)
    keys = [_add(index, ns, _toks(int(n))) for ns in (NS, EXACT) for n in RNG.integers(1, B, 40)]
    _add(index, NS, _toks(3))
    assert not index.add_chunk({**index.chunk(keys[0])})  # an ignored duplicate counts once
    index.touch(keys[::3])
    index.touch(keys[::5])
    index.delete_chunks(keys[::4] + ["not-a-key"])
    assert index.stats() == _fresh_stats(index)
    stored = index._rows("SELECT namespace, chunks, bytes, tokens, hits FROM totals ORDER BY namespace")
    assert stored == sorted(_fresh_stats(index), key=lambda r: r["namespace"])
    # Reading them costs the same with 10x the chunks.
    steps = _steps(index, index.stats)[0]
    with index.db.conn:
        for _ in range(800):
            _add(index, NS, _toks(4))
    assert index.stats() == _fresh_stats(index)
    assert _steps(index, index.stats)[0] <= steps
    index.clear()
    index.add_namespace(NS)
    assert index.stats() == _fresh_stats(index) == [{"namespace": NS.id, "chunks": 0, "bytes": 0, "tokens": 0,
                                                     "hits": 0}]


def test_an_m002_index_gets_heads_and_totals_in_place(tmp_path):
    path = tmp_path / "index.sqlite"
    db = sqlite_utils.Database(str(path))
    migrations.apply(db, stop_before="m003_heads_totals_usage")
    assert "head" not in db["chunks"].columns_dict
    db["namespaces"].insert({"id": NS.id, "descriptor": "{}", "created": 0.0})
    blocks = [_toks(B) for _ in range(50)] + [_toks(7)]
    for t in blocks:
        key = chunk_key(None, NS.digest, t)
        db["chunks"].insert({"key": key, "namespace": NS.id, "parent": None, "position": 0, "n_tokens": len(t),
                             "tokens": tokens_to_bytes(t), "file": key, "bytes": 4000, "checksum": "c",
                             "created": 0.0, "last_used": 0.0, "hits": 2})
    db.close()
    index = Index(path)
    rows = index._rows("SELECT tokens, head FROM chunks")
    assert len(rows) == 51 and all(r["head"] == head_of(r["tokens"]) for r in rows)
    assert len(rows[-1]["head"]) == 7 * 4 and all(len(r["head"]) == HEAD_TOKENS * 4 for r in rows[:-1])
    assert index.stats() == _fresh_stats(index) and index.stats()[0]["hits"] == 102
    assert plan(index, NS, np.asarray([*blocks[20][:30], *_toks(9)])).reuse == 30
    assert index.usage() is None  # measured by the first walk, not guessed
    # A writer that knows nothing of heads (an older promptvault sharing the vault): a trigger adds it.
    t = np.concatenate([blocks[3][:20], _toks(30)])
    index.db.execute("INSERT INTO chunks (key, namespace, parent, position, n_tokens, tokens, file, bytes, checksum) "
                     "VALUES ('old', ?, NULL, 0, 50, ?, 'f', 1, 'c')", [NS.id, tokens_to_bytes(t)])
    assert index.chunk("old")["head"] == head_of(tokens_to_bytes(t))
    assert plan(index, NS, np.asarray([*t[:45], *_toks(9)])).reuse == 45
    assert index.stats() == _fresh_stats(index)


CAPPED_PROMPTS, CAPPED_BLOCKS = 16, 10  # per writer, and blocks per prompt: twice the cap below


def _warm_capped(root, seed, cap):
    lm = tiny_llama()
    with Vault(root, block_size=8, codec=LOSSLESS_KV, disk_cap=cap) as vault:
        for i in range(CAPPED_PROMPTS):
            vault.warm(lm, prompt(8 * CAPPED_BLOCKS, seed * 10 + i))


def test_running_disk_usage_matches_a_walk_after_two_capped_writers(tmp_path):
    root = tmp_path / "v"
    with Vault(root, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(tiny_llama(), prompt(40, 99))
        block = max(-(-r["bytes"] // 4096) * 4096 for r in vault.index.all_chunks())
    # room for about 8 more blocks than now, plus the index's growth: the cap counts every file of
    # the vault, and while two writers take turns a checkpoint rarely finds the WAL unread, so it
    # grows (160-320 KiB measured on 2 cores, and a CI run met more): 1 MiB for both
    cap = disk_usage(root) + 8 * block + 1024 * 1024
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_warm_capped, args=(str(root), s, cap)) for s in (1, 2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with Vault(root, codec=LOSSLESS_KV) as vault:
        assert vault.index.usage() is not None  # kept running by the writers, not re-walked
        counted, real = vault.disk.usage(vault.index), disk_usage(root)
        assert real <= counted <= real + 2 * block, (counted, real, block)  # never under
        assert real <= cap + 2 * block and len(vault.index.all_chunks()) < 2 * CAPPED_PROMPTS * CAPPED_BLOCKS, real  # evicted
        vault.gc()  # reconciles with a walk: exact again
        assert vault.disk.usage(vault.index) == disk_usage(root)


def test_a_walk_leaves_out_files_in_flight_and_counts_old_orphans(tmp_path):
    """A walk that meets another writer's shard before its row (or its temp file) must not count
    it in the baseline: the row's trigger counts it when it lands, and twice is an over-count that
    lasts until the next walk. An unindexed file older than IN_FLIGHT_S is an orphan and counts."""
    import os
    import shutil
    import time

    from promptvault.vault.tiers import IN_FLIGHT_S
    root = tmp_path / "v"
    with Vault(root, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(tiny_llama(), prompt(40, 99))
        row = vault.index.chunk(vault.index.all_chunks()[0]["key"])
        src = vault.shards / row["file"]
        toks = _toks(row["n_tokens"])
        key = "e" * len(row["key"])  # another writer's chunk
        landing = src.parent / f"{key}{src.suffix}"
        shutil.copy(src, landing)  # published, row not yet written
        temp = src.parent / f".tmp-abc{src.suffix}"
        shutil.copy(src, temp)  # still being written
        orphan = src.parent / f"{'f' * len(key)}{src.suffix}"
        shutil.copy(src, orphan)
        old = time.time() - IN_FLIGHT_S - 60
        os.utime(orphan, (old, old))
        vault.disk.reconcile(vault.index)
        temp.unlink()  # the temp's writer lost the race
        vault.index.add_chunk({c: row[c] for c in ("namespace", "parent", "position", "n_tokens", "bytes", "checksum")}
                              | {"key": key, "file": str(landing.relative_to(vault.shards)),
                                 "tokens": tokens_to_bytes(toks)})
        vault.index.checkpoint()
        assert vault.disk.usage(vault.index) == disk_usage(root)


def test_a_walk_takes_the_live_files_share_from_the_same_pass(tmp_path):
    """The baseline is the walk minus the indexed shards minus the live files (index, WAL, ledger,
    quarantine). Their share must come from the walk itself: measured apart, another writer's WAL
    growth between the two looks would stay in the baseline until the next walk."""
    from promptvault.vault.tiers import _walk, allocated
    root = tmp_path / "v"
    (root / "quarantine" / "deep").mkdir(parents=True)
    (root / "shards" / "ab").mkdir(parents=True)
    sizes = {"index.sqlite-wal": 40_000, "warmed.jsonl": 3_000, "quarantine/deep/x.st": 9_000,
             "shards/ab/index.sqlite": 5_000, "vault.json": 100, "shards/ab/k.st": 20_000}
    for name, size in sizes.items():
        (root / name).write_bytes(b"\1" * size)
    walked = _walk(root, root / "shards")
    live = ["index.sqlite-wal", "warmed.jsonl", "quarantine/deep/x.st"]  # not the shard named like the index
    assert walked.live == sum(allocated(root / n) for n in live)
    assert walked.total == disk_usage(root) == sum(allocated(root / n) for n in sizes)
    assert set(walked.recent) == {"index", "k"}
