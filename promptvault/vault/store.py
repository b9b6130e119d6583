"""The vault's read path: lookup -> RAM tier -> shard files -> checksum -> quarantine -> restore.

`ChunkStore` belongs to one Vault and uses its index, tiers and directories (the Vault may
replace its index, e.g. after a rebuild, so the store reads them through the vault each time).
Reads follow the rules in shards.py: a file is trusted only after its own checksum checks out;
one that fails is moved to quarantine/ and its row dropped; a file that vanished (evicted by
another process) is a miss. The RAM tier keeps chunks as `records.Loaded`: MLX arrays in the
stacked group form, so a hot restore does no file work and no per-layer work.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from promptvault.vault import caches
from promptvault.vault.keys import chunk_key
from promptvault.vault.lookup import exact_only, plan
from promptvault.vault.namespace import Namespace
from promptvault.vault.records import Loaded, loaded
from promptvault.vault.shards import SUFFIX, CorruptShard, Timing, read_shards

log = logging.getLogger("promptvault.vault.vault")


@dataclass
class LookupResult:
    namespace: str
    tokens_total: int
    tokens_reused: int
    tier: str  # "ram" (every chunk in RAM), "disk", or "none" (miss)
    chunks: list[dict]  # index rows covering the reused tokens
    seconds: float


@dataclass
class RestoreResult:
    cache: list  # fresh mlx-lm cache objects (empty ones on a miss)
    tokens_total: int
    tokens_reused: int
    tier: str  # "ram", "disk", "remote" (chunks came from the remote tier) or "none"
    lookup_s: float
    read_s: float  # chunks loaded: RAM hits, shard reads + checksums + arrays (wall time)
    decode_s: float  # payloads -> cache objects (decode and assembly), evaluated
    quarantined: list[str] = field(default_factory=list)  # keys of shards that failed their check
    missing: list[str] = field(default_factory=list)  # keys whose files were gone (evicted meanwhile)
    note: str | None = None  # why nothing was reused, when the vault can tell (another namespace)
    # profile of read_s (file reads and checksums run on several threads: sums of per-file times)
    file_read_s: float = 0.0  # readinto of the shard files
    checksum_s: float = 0.0  # header parse + xxh3
    arrays_s: float = 0.0  # MLX arrays made from the read buffers (the upload, on a GPU)
    files: int = 0  # shard files read
    tensors: int = 0  # tensors in the chunks used (RAM or disk)
    bytes_read: int = 0

    @property
    def seconds(self) -> float:
        return self.lookup_s + self.read_s + self.decode_s


class ChunkStore:
    def __init__(self, vault):
        self.vault = vault

    # lookup / restore

    def lookup(self, lm, toks: np.ndarray) -> LookupResult:
        v = self.vault
        t0 = time.perf_counter()
        try:
            ns = v.namespace(lm)
        except caches.UnsupportedCacheError as e:
            log.warning("%s: nothing can be reused", e)
            return LookupResult("", len(toks), 0, "none", [], time.perf_counter() - t0)
        p = plan(v.index, ns, toks)
        tier = "none"
        if p.reuse:
            tier = "ram" if all(v.ram.get(r["key"]) is not None for r in p.chunks) else "disk"
        return LookupResult(ns.id, len(toks), p.reuse, tier, p.chunks, time.perf_counter() - t0)

    def restore(self, lm, toks: np.ndarray, longer_than: int = 0) -> RestoreResult:
        v = self.vault
        look = self.lookup(lm, toks)
        result = RestoreResult(make_prompt_cache(lm.model), look.tokens_total, 0, "none", look.seconds, 0.0, 0.0)
        if look.tokens_reused <= longer_than:
            if not look.tokens_reused and look.namespace:
                result.note = self.other_namespace_note(toks, v.namespace(lm))
                if result.note:
                    log.warning("%s", result.note)
            return result
        t0 = time.perf_counter()
        timing = Timing()
        items, result.quarantined, result.missing = self.load(look.chunks, toks[: look.tokens_reused], timing)
        result.read_s = time.perf_counter() - t0
        result.file_read_s, result.checksum_s, result.arrays_s = timing.read_s, timing.checksum_s, timing.arrays_s
        result.files, result.bytes_read = timing.files, timing.nbytes
        result.tensors = sum(len(i.payload.arrays) + 1 for i in items)
        reuse = look.tokens_reused
        if len(items) < len(look.chunks):
            reuse = self.usable(v.namespace(lm), look.chunks[: len(items)], reuse)
            what = ", ".join(f"{len(keys)} {kind}" for kind, keys in
                             (("missing", result.missing), ("quarantined", result.quarantined)) if keys)
            log.warning("stored chunk(s) unusable (%s): restoring %d of the %d tokens found%s", what, reuse,
                        look.tokens_reused, "" if reuse else ", running cold")
        if not reuse:
            return result
        _note_old_format(items)
        t1 = time.perf_counter()
        try:
            cache = caches.restore_cache(lm.model, [i.payload for i in items], reuse)
        except caches.RestoreError as e:
            log.warning("stored chunks cannot be restored (%s); running cold", e)
            return result
        _eval(cache)
        decode_s = time.perf_counter() - t1
        used = look.chunks[: len(items)]
        log.info("restored %d of %d tokens from %d chunks (%s): lookup %.1f ms, read %.1f ms, decode %.1f ms",
                 reuse, look.tokens_total, len(used), look.tier, look.seconds * 1e3, result.read_s * 1e3,
                 decode_s * 1e3)
        if not v.read_only:
            v.index.touch([r["key"] for r in used])
            self.touch_files(used)
        result.cache, result.tokens_reused, result.tier, result.decode_s = cache, reuse, look.tier, decode_s
        return result

    def usable(self, ns: Namespace, rows: list[dict], reuse: int) -> int:
        """Tokens restorable from the leading chunks `rows` alone (at most `reuse`): their end, or
        in a namespace with recurrent state the last of their ends that has a snapshot."""
        ends = np.cumsum([r["n_tokens"] for r in rows]).tolist() if rows else []
        if rows and exact_only(ns):
            ends = [e for e, r in zip(ends, rows) if e <= reuse and self.vault.index.has_snapshot(r["key"])]
        return min(int(max(ends, default=0)), reuse)

    def touch_files(self, rows: list[dict]) -> None:
        """A file's access time is its chunk's last use, its modification time its creation: the
        eviction order survives an index rebuild (reindex reads both back)."""
        now = time.time()
        for r in rows:
            path = self.vault.shards / r["file"]
            try:
                os.utime(path, (now, os.stat(path).st_mtime))
            except OSError:
                pass

    def other_namespace_note(self, toks: np.ndarray, ns: Namespace) -> str | None:
        """Why a prompt found nothing: another namespace of this vault (another model, codec or KV
        dtype) holds its first block. None when no other namespace does, or the prompt is shorter
        than a block."""
        v = self.vault
        if len(toks) <= v.block_size:
            return None
        for other in v.index.namespaces():
            desc = other["descriptor"]
            if other["id"] == ns.id:
                continue
            first = chunk_key(None, Namespace.from_descriptor(desc).digest, toks[: v.block_size])
            if v.index.existing([first]):
                what = {"model": "another model", "codec": "another codec (--key-bits/--value-bits/--quality)",
                        "kv_dtype": "another KV dtype", "layout": "another cache layout"}
                diff = [text for k, text in what.items() if desc.get(k) != ns.descriptor.get(k)]
                return (f"nothing reused: this prompt is stored under namespace {other['id'][:12]} with "
                        f"{', '.join(diff) or 'other settings'} than this run's")
        return None

    # chunks

    def load(self, rows: list[dict], toks: np.ndarray | None = None, timing: Timing | None = None
             ) -> tuple[list[Loaded], list[str], list[str]]:
        """The leading chunks of `rows` that can be used, from the RAM tier or read and verified
        from disk (then kept in RAM), up to the first that cannot; with the keys quarantined and
        missing. The files not in RAM are read several at once (shards.read_shards) and used in
        order. Given the reused tokens `toks`, each chunk's own tokens must match them where they
        overlap: the lookup trusted the index's copy of the tokens, and a damaged index must not
        make a shard serve a prompt it was not computed for (such a row is re-read from its file)."""
        v = self.vault
        hits = {r["key"]: v.ram.get(r["key"]) for r in rows}
        todo = [r for r in rows if hits[r["key"]] is None]
        reads = read_shards([v.shards / r["file"] for r in todo], timing)
        loaded_: list[Loaded] = []
        try:
            for row in rows:
                item = hits[row["key"]]
                if item is None:
                    _, got = next(reads)
                    item, problem = self._verified(row, got)
                    if item is None:
                        return loaded_, [row["key"]] if problem == "quarantined" else [], \
                            [row["key"]] if problem == "missing" else []
                    v.ram.put(row["key"], item, item.nbytes)
                if toks is not None and not self.tokens_match(row, item, toks):
                    return loaded_, [], []
                loaded_.append(item)
            return loaded_, [], []
        finally:
            reads.close()

    def read(self, row: dict) -> tuple[Loaded | None, str | None]:
        """Read and verify one shard: (chunk, None), or (None, "missing") when its file is gone,
        or (None, "quarantined") when it failed its check (moved aside, row dropped)."""
        reads = read_shards([self.vault.shards / row["file"]])
        try:
            return self._verified(row, next(reads)[1])
        finally:
            reads.close()

    def _verified(self, row: dict, got) -> tuple[Loaded | None, str | None]:
        """A read's outcome for `row`. A file that checks out against its own checksum and names
        the right key is used even when the index recorded another checksum: the index row is
        stale (the file was evicted and published again since), so the row is corrected, not the
        file quarantined."""
        v = self.vault
        path = v.shards / row["file"]
        if isinstance(got, FileNotFoundError):  # evicted by another process meanwhile
            if not v.read_only:
                v.index.delete_chunks([row["key"]])
            return None, "missing"
        if isinstance(got, OSError):
            raise got
        try:
            if isinstance(got, CorruptShard):
                raise got
            item = loaded(got, row["key"])
        except CorruptShard:
            self.quarantine(row["key"], path)
            return None, "quarantined"
        if got.checksum != row["checksum"] and not v.read_only:
            v.index.set_file(row["key"], got.nbytes, got.checksum)
        return item, None

    def tokens_match(self, row: dict, item: Loaded, toks: np.ndarray) -> bool:
        v = self.vault
        start = row["position"]
        need = min(row["n_tokens"], len(toks) - start)
        if need <= 0 or (len(item.tokens) >= need and np.array_equal(item.tokens[:need], toks[start : start + need])):
            return True
        log.warning("the index disagreed with shard %s about its tokens; its row is re-read from the file",
                    row["key"][:12])
        v.ram.discard(row["key"])
        if not v.read_only:
            v.index.delete_chunks([row["key"]])
            try:
                v._index_file(v.shards / row["file"])
            except (CorruptShard, KeyError, ValueError, TypeError, OSError):
                pass
        return False

    # quarantine

    def quarantine_dir(self) -> Path:
        """quarantine/, where damaged files go for inspection instead of being deleted."""
        qdir = self.vault.root / "quarantine"
        qdir.mkdir(mode=0o700, exist_ok=True)
        return qdir

    def quarantine(self, key: str, path: Path) -> None:
        v = self.vault
        v.ram.discard(key)
        if v.read_only:  # cannot move it: it stays a miss for this process
            log.warning("corrupt shard %s left in place: the vault is read-only", path)
            return
        qdir = self.quarantine_dir()
        try:
            os.replace(path, qdir / f"{path.stem}.{time.time_ns()}{SUFFIX}")
        except OSError:
            try:
                path.unlink()
            except OSError:
                pass
        v.index.delete_chunks([key])


_OLD_FORMAT_NOTED: set[str] = set()


def _note_old_format(items: list[Loaded]) -> None:
    """One line, once per process and format, when chunks of an older payload format restore."""
    old = {i.payload.meta.get("format") for i in items} - {caches.FORMAT}
    for fmt in sorted(old - _OLD_FORMAT_NOTED):
        _OLD_FORMAT_NOTED.add(fmt)
        log.warning("restoring chunks in the older format %s (one tensor per layer: slower to read); "
                    "chunks written from now on use %s", fmt, caches.FORMAT)


def _eval(cache: list) -> None:
    import mlx.core as mx
    from mlx.utils import tree_flatten

    mx.eval([x for c in cache for _, x in tree_flatten(c.state) if isinstance(x, mx.array)])
