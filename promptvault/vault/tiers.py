"""Storage tiers: a RAM tier of compressed chunks over the disk tier, each with a byte cap.

RAM holds verified, still-compressed payloads (the codes and norms as read from a shard) as MLX
arrays in the form a restore uses directly: one stacked tensor per layer group, segment and role
(caches.py), on the device where there is one (unified memory on Apple silicon). A hot prefix
skips the file read, checksum and upload, and costs only its compressed size in memory.

The disk cap counts everything under the vault directory (shards, index, WAL, quarantine), and
files other processes wrote count too (LMCache filled 460 GB of a 250 GB cap by trusting its
own ledger). Walking a million files takes seconds, so the count is a running one kept in the
shared index (`Index.usage`), not in any process's memory:
- indexed shards: each chunk's size rounded up to the filesystem's block, added and subtracted
  by SQLite triggers as rows come and go, whichever process writes them;
- the index files (database, WAL, shared memory), the warmed-prompts ledger and quarantine/:
  measured afresh each time;
- everything else (vault.json, lock, temp files, files no row names): the baseline the last full
  walk found beyond the two above.
A full walk restarts the count: at the first check of a vault that has none, and in `reconcile`
(gc and verify call it). It keeps the larger of the walk and the indexed shards' count (the
baseline never goes below zero), so the count errs high (evicting early), not low. Shard files
(and temp files) younger than `IN_FLIGHT_S` that no row names are another writer's work in
flight — its background writer publishes up to a queue's worth before the rows follow — so the
walk leaves them out: their rows' triggers count them once they land (counting them in the
baseline too would count them twice until the next walk). What the count cannot see until the
next walk: files that appear under the vault without an index row (in flight, left by a crash,
or written there by something other than promptvault).
Eviction removes chunks that nothing extends first — tail leaves before their blocks, the end of
a chain before its start — because a missing first block makes every later block unreachable.
Files that cannot be deleted are skipped, never retried in a loop.
"""

from __future__ import annotations

import os
import time
from collections import OrderedDict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

from promptvault.vault import ledger
from promptvault.vault.index import Index


@dataclass
class RamTier:
    cap: int
    _items: OrderedDict = field(default_factory=OrderedDict)
    nbytes: int = 0

    def get(self, key: str):
        item = self._items.get(key)
        if item is None:
            return None
        self._items.move_to_end(key)
        return item[0]

    def put(self, key: str, value, nbytes: int) -> None:
        if nbytes > self.cap:
            return
        self.discard(key)
        self._items[key] = (value, nbytes)
        self.nbytes += nbytes
        while self.nbytes > self.cap:
            _, (_, n) = self._items.popitem(last=False)
            self.nbytes -= n

    def discard(self, key: str) -> None:
        item = self._items.pop(key, None)
        if item is not None:
            self.nbytes -= item[1]

    def clear(self) -> None:
        self._items.clear()
        self.nbytes = 0

    def __len__(self) -> int:
        return len(self._items)


IN_FLIGHT_S = 600  # an unindexed shard younger than this is a live writer's, not an orphan


LIVE_FILES = ("index.sqlite", "index.sqlite-wal", "index.sqlite-shm", ledger.NAME)  # at the vault's top
LIVE_DIRS = ("quarantine",)  # and everything under these


def disk_usage(root: Path) -> int:
    """Bytes allocated on disk under `root`, like `du` (files that vanish meanwhile are skipped)."""
    return _walk(root).total


@dataclass
class _Walked:
    total: int  # bytes allocated under the root
    live: int  # of which the live files (LIVE_FILES, LIVE_DIRS) took, as this walk saw them
    recent: dict[str, int]  # young files under the shards: chunk key (a temp file's name) -> bytes


def _walk(root: Path, shards: Path | None = None, since: float = 0.0) -> _Walked:
    """One pass over `root`. The live files' share comes from the same pass: measuring them apart
    (before or after) would put their growth meanwhile — another writer's WAL — into the baseline."""
    walked = _Walked(0, 0, {})
    top = str(root)
    live_dirs = tuple(os.path.join(top, d) for d in LIVE_DIRS)
    inside = str(shards) + os.sep if shards is not None else None
    for dirpath, _, files in os.walk(root):
        in_live_dir = any(dirpath == d or dirpath.startswith(d + os.sep) for d in live_dirs)
        for name in files:
            try:
                st = os.lstat(os.path.join(dirpath, name))
            except OSError:
                continue
            size = getattr(st, "st_blocks", 0) * 512 or st.st_size
            walked.total += size
            if in_live_dir or (dirpath == top and name in LIVE_FILES):
                walked.live += size
            if inside is not None and st.st_mtime >= since and (dirpath + os.sep).startswith(inside):
                walked.recent[name if name.startswith(".") else name.split(".")[0]] = size
    return walked


def allocated(path: Path) -> int:
    try:
        st = os.lstat(path)
    except OSError:
        return 0
    return getattr(st, "st_blocks", 0) * 512 or st.st_size


@dataclass
class DiskTier:
    root: Path  # the vault directory (everything under it counts)
    shards: Path  # where chunk files live
    cap: int | None

    def usage(self, index: Index) -> int:
        """Bytes the vault uses, from the running count (a full walk if there is none yet)."""
        row = index.usage()
        if row is None:
            return self.reconcile(index)
        return row["shards"] + row["other"] + self._live()

    def shard_usage(self, index: Index) -> int:
        """Bytes the indexed shards take, from the running count (walked first if there is none)."""
        if index.usage() is None:
            self.reconcile(index)
        row = index.usage()
        return row["shards"] if row is not None else disk_usage(self.shards)

    def reconcile(self, index: Index) -> int:
        """Walk the whole vault, restart the running count from what is there; returns the usage
        (the walk's total, or more where indexed shards count for more than the walk found)."""
        walked = _walk(self.root, self.shards, time.time() - IN_FLIGHT_S)
        if index.read_only or index.path is None:
            return walked.total
        index.set_usage(walked.total, walked.live, os.statvfs(self.root).f_frsize or 4096, walked.recent)
        return self.usage(index)

    def _live(self) -> int:
        """What changes without a chunk row changing: the index files, the warmed-prompts ledger
        and quarantine/."""
        files = sum(allocated(self.root / name) for name in LIVE_FILES)
        return files + sum(disk_usage(self.root / d) for d in LIVE_DIRS)

    def enforce(self, index: Index, on_evict: Callable[[str], None]) -> list[str]:
        """Evict leaf-first, least recently used, until usage <= cap; returns the evicted keys.

        Usage is re-read after each round (O(1): the running count), with the index WAL
        checkpointed first: deleting rows writes to the WAL, which counts too.
        """
        evicted: list[str] = []
        skipped: list[str] = []
        if self.cap is None or self.usage(index) <= self.cap:
            return evicted
        while True:
            index.checkpoint()
            over = self.usage(index) - self.cap
            rows = index.eviction_candidates(limit=64, exclude=skipped) if over > 0 else []
            batch, freed = [], 0
            for row in rows:
                if freed >= over:
                    break
                path = self.shards / row["file"]
                size = allocated(path)
                try:
                    path.unlink(missing_ok=True)
                except OSError:
                    skipped.append(row["key"])
                    continue
                batch.append(row["key"])
                freed += size
            if not rows:
                return evicted
            index.delete_chunks(batch)
            for key in batch:
                on_evict(key)
            evicted += batch
