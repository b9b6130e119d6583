"""`promptvault bench index`: what a lookup, `stats` and a capped write's accounting cost as the
index grows to a million chunks.

A temporary index is filled in steps (10K, 100K, 1M chunks, up to --chunks) with P prompts x 10
blocks of 256 random tokens (bulk inserts: no shard files, no model), plus a few prompts that end
in a 100-token tail leaf. At each size, the median of REPEATS runs of:
  - lookup (`lookup.plan`) of a stored prompt (10 blocks: all but its last token reused);
  - a stored prompt diverging inside block 5 (token-level prefix inside that block);
  - a new prompt that shares no first block with any stored one (the case that used to read
    every first block);
  - a stored prompt with its exact tail leaf, plus one new token;
  - `Index.stats()`, and `Vault.stats()` (what `promptvault stats` prints: it adds the disk usage);
  - a capped write's accounting: `DiskTier.enforce` with the cap above the usage (the check each
    write makes), and with the cap one block under it (one round of eviction). The shards are
    not on disk, so this measures the accounting, not the unlinks.
Random tokens make every first block's head distinct: prompts that share a long common start
ending inside a block (a system prompt) fall in `lookup`'s capped candidate group instead.
"""

from __future__ import annotations

import os
import platform
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from promptvault.vault import Vault
from promptvault.vault.index import Index
from promptvault.vault.keys import chunk_key, tokens_to_bytes
from promptvault.vault.lookup import plan
from promptvault.vault.namespace import make_namespace
from promptvault.vault.tiers import DiskTier

BLOCK = 256
BLOCKS = 10  # per prompt
LEAF = 100  # tokens of the tail leaves some prompts end with
CHUNK_BYTES = 400_000  # a shard's size (accounting only: no file is written)
REPEATS = 21
NS = make_namespace(model_fingerprint="bench-index", kv_dtype="float16", layout={"layers": [{"type": "KVCache"}]},
                    block_size=BLOCK, codec={"keys": {"codec": "lossless/1"}})


def _prompt(seed: int) -> np.ndarray:
    """The tokens of stored prompt `seed` (10 blocks), the same on every call."""
    return np.random.default_rng(seed).integers(0, 2**31, BLOCK * BLOCKS)


def _leaf(seed: int) -> np.ndarray:
    return np.random.default_rng((seed, 1)).integers(0, 2**31, LEAF)


def _rows(seed: int, clock: float, leaf: bool):
    toks, parent = _prompt(seed), None
    parts = [toks[i : i + BLOCK] for i in range(0, len(toks), BLOCK)] + ([_leaf(seed)] if leaf else [])
    for i, part in enumerate(parts):
        key = chunk_key(parent, NS.digest, part)
        yield {"key": key, "namespace": NS.id, "parent": parent, "position": i * BLOCK, "n_tokens": len(part),
               "tokens": tokens_to_bytes(part), "file": f"{key[:2]}/{key[2:4]}/{key}.safetensors",
               "bytes": CHUNK_BYTES, "checksum": "0" * 16, "created": clock + i * 1e-3,
               "last_used": clock + i * 1e-3}
        parent = key


def _old_blocks(index: Index, n: int, first: int) -> None:
    """n one-block prompts used longer ago than any other chunk: what the eviction rounds take
    (so that the prompts the lookups look for stay whole)."""
    index.add_chunks({**next(_rows(10**9 + first + i, 0.0, False)), "created": -1e9 + i, "last_used": -1e9 + i}
                     for i in range(n))


def _fill(index: Index, prompts: range, leaf_every: int) -> None:
    batch = 2000
    for start in range(prompts.start, prompts.stop, batch):
        seeds = range(start, min(start + batch, prompts.stop))
        index.add_chunks(r for s in seeds for r in _rows(s, float(s), s % leaf_every == 0))


def _median_ms(fn, repeats: int = REPEATS) -> float:
    times = []
    for i in range(repeats):
        t0 = time.perf_counter()
        fn(i)
        times.append(time.perf_counter() - t0)
    return statistics.median(times) * 1e3


def run_index_bench(max_chunks: int = 1_000_000, workdir: str | None = None) -> dict:
    sizes = [n for n in (10_000, 100_000, 1_000_000) if n < max_chunks] + [max_chunks]
    root = Path(tempfile.mkdtemp(prefix="pv-bench-index-", dir=workdir))
    rows = []
    try:
        index = Index(root / "index.sqlite")
        index.add_namespace(NS)
        leaf_every = 1000
        filled = 0  # prompts stored so far
        rng = np.random.default_rng(12345)
        for size in sizes:
            prompts = max(1, size // BLOCKS)
            t0 = time.perf_counter()
            _fill(index, range(filled, prompts), leaf_every)
            index.checkpoint()
            fill_s = time.perf_counter() - t0
            filled = max(filled, prompts)
            pick = lambda: int(rng.integers(0, filled))  # noqa: E731
            leafy = list(range(0, filled, leaf_every))

            def stored(_):
                p = plan(index, NS, _prompt(pick()))
                assert p.reuse == BLOCK * BLOCKS - 1

            def diverging(_):
                toks = _prompt(pick())
                toks[5 * BLOCK + 100 :] = rng.integers(0, 2**31, len(toks) - 5 * BLOCK - 100)
                assert plan(index, NS, toks).reuse == 5 * BLOCK + 100

            def new(_):
                assert plan(index, NS, rng.integers(0, 2**31, BLOCK * BLOCKS)).reuse == 0

            def leaf(i):
                s = leafy[i % len(leafy)]
                toks = np.concatenate([_prompt(s), _leaf(s), [7]])
                assert plan(index, NS, toks).reuse == BLOCK * BLOCKS + LEAF

            n_chunks = index.stats()[0]["chunks"]
            timings = {"stored_ms": _median_ms(stored), "diverging_ms": _median_ms(diverging),
                       "new_ms": _median_ms(new), "leaf_ms": _median_ms(leaf), "stats_ms": _median_ms(lambda _: index.stats())}
            with Vault(root, block_size=BLOCK) as vault:
                timings["vault_stats_ms"] = _median_ms(lambda _: vault.stats())
            disk = DiskTier(root, root / "shards", None)
            usage = disk.reconcile(index)
            disk.cap = usage + 10 * CHUNK_BYTES
            check_ms = _median_ms(lambda _: disk.enforce(index, lambda key: None))
            evicted = []
            _old_blocks(index, 5 * 64, len(rows) * 5 * 64)

            def evict(_):
                index.checkpoint()
                disk.cap = disk.usage(index) - CHUNK_BYTES // 2
                evicted.append(len(disk.enforce(index, lambda key: None)))

            evict_ms = _median_ms(evict, 5)
            assert index.stats()[0]["chunks"] >= n_chunks, "eviction took more than the old one-block prompts"
            rows.append({
                "chunks": n_chunks, "prompts": filled, "fill_s": round(fill_s, 1),
                **timings,
                "cap_check_ms": check_ms, "cap_evict_ms": evict_ms, "evicted_per_round": max(evicted),
                "index_mb": round(sum(f.stat().st_size for f in root.glob("index.sqlite*")) / 2**20),
            })
        index.close()
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"env": {"processor": platform.processor() or platform.machine(), "cpus": os.cpu_count(),
                    "system": platform.system(), "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime())},
            "rows": rows}


def format_table(result: dict) -> str:
    from promptvault.tables import format_table as table

    env = result["env"]
    head = f"{env['processor']} ({env['cpus']} cpus), {env['system']} | {env['date']} | times: median ms"
    return head + "\n" + table(result["rows"])
