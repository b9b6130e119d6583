"""Looking after a vault: stats, verify, reindex, gc, rm, configure, the disk cap, and what is
stored (warmed, describe), so that nothing outside the vault package reads its index.

A mixin of `Vault` (vault.py): these methods use the vault's index, tiers and read path, and
return the typed records of results.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import sqlite3
import time
from pathlib import Path

from promptvault.codec import KVCodec
from promptvault.vault import compact, ledger
from promptvault.vault.records import SHARD_FORMAT, TOKENS
from promptvault.vault.errors import CapTooSmallError, VaultSettingsError
from promptvault.vault.index import Index, corrupt
from promptvault.vault.keys import tokens_to_bytes
from promptvault.vault.lookup import exact_only
from promptvault.vault.namespace import Namespace
from promptvault.vault.results import (ChunkInfo, Description, GcResult, NamespaceStats, ReindexResult, RmResult,
                                       Settings, VaultStats, VerifyResult, Warmed)
from promptvault.vault.shards import SUFFIX, CorruptShard, read_metadata
from promptvault.vault.sizes import fp16_bytes_per_token

_TMP_MAX_AGE_S = 3600
# What reading a shard's header can raise when the file is damaged or not a shard at all.
_UNREADABLE = (CorruptShard, KeyError, ValueError, TypeError, OSError)


def codec_name(codec_json: dict | None) -> str | None:
    """A namespace's codec as its name (promptvault.codec.spec grammar)."""
    return None if codec_json is None else str(KVCodec.from_json(codec_json))


class Maintenance:
    """stats, verify, reindex, gc, rm, configure, warmed, describe (see the module docstring)."""

    # what is stored

    def stats(self) -> VaultStats:
        """Totals for the whole vault and per namespace, with the float16 size of what is stored."""
        descriptors = {n["id"]: n["descriptor"] for n in self.index.namespaces()}
        rows = []
        for s in self.index.stats():
            d = descriptors.get(s["namespace"], {})
            fp16 = s["tokens"] * fp16_bytes_per_token(d) if d else 0
            rows.append(NamespaceStats(
                namespace=s["namespace"], model=d.get("model"), codec=codec_name(d.get("codec")),
                kv_dtype=d.get("kv_dtype"), chunks=s["chunks"], tokens=s["tokens"], bytes=s["bytes"],
                hits=s["hits"], fp16_bytes=fp16, ratio_vs_fp16=fp16 / s["bytes"] if s["bytes"] else None))
        quarantine = self.root / "quarantine"
        shard_bytes = sum(r.bytes for r in rows)
        fp16_total = sum(r.fp16_bytes for r in rows)
        return VaultStats(
            path=str(self.root), block_size=self.block_size, chunks=sum(r.chunks for r in rows),
            bytes_on_disk=self.disk.usage(self.index), shard_bytes=shard_bytes, fp16_bytes=fp16_total,
            ratio_vs_fp16=fp16_total / shard_bytes if shard_bytes else None, disk_cap=self.disk.cap,
            ram_cap=self.ram.cap, ram_bytes=self.ram.nbytes, ram_chunks=len(self.ram),
            warmed=self.index.warmed_count(),
            quarantined=len(list(quarantine.iterdir())) if quarantine.exists() else 0, namespaces=rows)

    def warmed(self) -> list[Warmed]:
        """The prompts stored by warm(), oldest first."""
        return [Warmed.from_row(w) for w in self.index.warmed()]

    def describe(self, ref: str) -> Description:
        """The warmed prompts labelled `ref`, or else the one chunk whose key starts with `ref`;
        each with its chain of chunks from the prompt's first token. VaultSettingsError when
        neither matches (or the prefix matches several chunks)."""
        warmed = [w for w in self.index.warmed() if w["label"] == ref]
        if warmed:
            return Description(ref, warmed=[Warmed.from_row(w) for w in warmed],
                               chains=[self._chain(w["last_key"]) for w in warmed])
        keys = [r["key"] for r in self.index.all_chunks() if r["key"].startswith(ref)]
        if len(keys) != 1:
            raise VaultSettingsError(f"{ref!r} matches {len(keys)} chunks and no warmed label (see: promptvault ls)")
        row = self.index.chunk(keys[0])
        if row is None:  # removed by another process since
            raise VaultSettingsError(f"chunk {keys[0][:12]} was removed meanwhile")
        return Description(ref, chunk=ChunkInfo.from_row(row), chains=[self._chain(keys[0])])

    def _chain(self, key: str | None) -> list[ChunkInfo]:
        """The chunks from the prompt's start to `key`, in token order."""
        return [ChunkInfo.from_row(r) for r in reversed(self._ancestor_rows(key))]

    def _ancestors(self, key: str | None) -> list[str]:
        return [r["key"] for r in self._ancestor_rows(key)]

    def _ancestor_rows(self, key: str | None) -> list[dict]:
        """`key`'s row and its parents' up to the first chunk (or the first one missing)."""
        out = []
        while key:
            row = self.index.chunk(key)
            if row is None:
                break
            out.append(row)
            key = row["parent"]
        return out

    # checking and rebuilding

    def verify(self) -> VerifyResult:
        """Check every shard file under shards/, indexed or not, against its own checksum.

        Bad files are quarantined; files the index does not list are adopted when they check out
        (an index that lost rows); rows whose files are gone are dropped."""
        rows = {r["file"]: r for r in self.index.all_chunks()}
        result = VerifyResult(0, 0, [], [], [])
        for path in self._shard_files():
            rel = str(path.relative_to(self.shards))
            row = rows.pop(rel, None)
            if row is None:
                if not self.read_only:
                    self._adopt(path)
                row = self.index.chunk(path.stem) if not self.read_only else None
                if row is None:  # unreadable header (or read-only): check it as a stranger
                    row = {"key": path.stem, "file": rel, "checksum": ""}
                else:
                    result.adopted.append(path.stem)
            result.checked += 1
            _, problem = self._read(row)
            if problem is None:
                result.ok += 1
            elif problem == "quarantined":
                result.bad.append(row["key"])
        result.missing = [r["key"] for r in rows.values()]
        if result.missing and not self.read_only:
            self.index.delete_chunks(result.missing)
        self.disk.reconcile(self.index)  # a read-only index is walked, not written
        return result

    def reindex(self) -> ReindexResult:
        """Rebuild the index from the shard files alone (headers read, bytes checked on use).

        Warmed-prompt labels come back from the ledger (ledger.py), creation times from the files'
        modification times, recency from their access times (a restore sets it); hit counts and
        the exact times the old index holds are carried over when it is readable."""
        self.require_writable("rebuild its index")
        return self._reindex()

    def _reindex(self) -> ReindexResult:
        try:
            times = self.index.chunk_times()
        except sqlite3.DatabaseError:
            times = {}
        try:
            self.index.clear()
        except sqlite3.DatabaseError as e:
            if not corrupt(e):
                raise
            self.index.db.close()
            self._set_aside_index(e)
            self.index = Index(self.root / "index.sqlite")
        self.ram.clear()
        files, bad = 0, 0
        for path in self._shard_files():
            files += 1
            if not self._adopt(path):
                bad += 1
                self._quarantine(path.stem, path)
        self.index.restore_chunk_times(times)
        for rec in ledger.replay(self.root):
            self.index.add_warmed(**rec)
        self._drop_stale_warmed()
        return ReindexResult(files=files, indexed=files - bad, quarantined=bad,
                             namespaces=len(self.index.namespaces()), warmed=len(self.index.warmed()))

    def _adopt(self, path: Path) -> bool:
        """Index a shard file from its own header; False when the header is unreadable or
        contradicts the file's name (the caller decides whether to quarantine it)."""
        try:
            self._index_file(path)
            return True
        except _UNREADABLE:
            return False

    def _index_file(self, path: Path) -> None:
        meta, checksum, tokens = read_metadata(path, TOKENS)
        if meta.get("format") != SHARD_FORMAT:
            raise CorruptShard(f"unknown shard format {meta.get('format')!r}")
        chunk = json.loads(meta["chunk"])
        ns = Namespace.from_descriptor(compact.unpack(meta["namespace"]))
        if ns.id != chunk["namespace"] or path.name != f"{chunk['key']}{SUFFIX}":
            raise CorruptShard("shard metadata does not match its name or namespace")
        st = path.stat()
        self.index.add_namespace(ns)
        self.index.add_chunk({**chunk, "created": st.st_mtime, "last_used": max(st.st_atime, st.st_mtime),
                              "tokens": tokens_to_bytes(tokens), "file": str(path.relative_to(self.shards)),
                              "bytes": st.st_size, "checksum": checksum}, snapshot=exact_only(ns))

    def _drop_stale_warmed(self) -> None:
        """Forget warmed prompts whose last chunk is gone (evicted, removed, quarantined)."""
        warmed = self.index.warmed()
        live = self.index.existing([w["last_key"] for w in warmed])
        stale = [w for w in warmed if w["last_key"] not in live]
        if stale:
            self.index.delete_warmed([w["id"] for w in stale])
            if not self.read_only:
                ledger.record_removed(self.root, stale)

    # caps

    def _check_cap(self, cap: int | None) -> None:
        """Refuse (before anything is evicted) a cap smaller than the largest stored chunk: it could
        never hold even one block, so enforcing it would only empty the vault."""
        span = self.index.chunk_bytes_range() if cap is not None else None
        if span is not None and cap < span[1]:
            raise CapTooSmallError(f"a disk cap of {cap:,} bytes is smaller than one stored block ({span[1]:,} "
                                   "bytes); nothing was evicted (to empty the vault: promptvault rm --all)")

    def _enforce_cap(self, evict_all: bool = False) -> int:
        """Evict down to the disk cap; returns how many chunks went. A cap that leaves no room for
        even the smallest chunk beside the index and other files would evict every chunk: that
        needs evict_all=True, and is refused otherwise before anything is evicted."""
        cap = self.disk.cap
        if cap is None:
            return 0
        self.index.checkpoint()  # the WAL counts, and deleting rows writes to it
        total = self.disk.usage(self.index)
        if total <= cap:  # the running count: O(1); a cap at or above usage holds every chunk
            return 0
        self._check_cap(cap)
        span = self.index.chunk_bytes_range()
        if span is None:
            return 0
        fixed = total - self.disk.shard_usage(self.index)
        if cap < fixed + span[0] and not evict_all:
            raise CapTooSmallError(f"a disk cap of {cap:,} bytes would evict every stored chunk (the index and "
                                   f"other files take {fixed:,} bytes); nothing was evicted: raise the cap, or "
                                   "pass --evict-all (evict_all=True) to empty the vault")
        evicted = self.disk.enforce(self.index, self.ram.discard)
        if evicted:  # forgetting their warmed prompts writes too (index, ledger): measure again
            self._drop_stale_warmed()
            evicted += self.disk.enforce(self.index, self.ram.discard)
        return len(evicted)

    def settings(self) -> Settings:
        """The block size and the caps in force for this open vault."""
        return Settings(block_size=self.block_size, disk_cap=self.disk.cap, ram_cap=self.ram.cap)

    def configure(self, **settings) -> Settings:
        """Store caps in the vault (vault.json), used by every later open that does not pass its
        own: disk_cap (bytes or None for no cap), ram_cap (bytes). Returns the stored settings."""
        self.require_writable("change its settings")
        unknown = set(settings) - {"disk_cap", "ram_cap"}
        if unknown:
            raise VaultSettingsError(f"unknown vault settings: {', '.join(sorted(unknown))}")
        for name, value in settings.items():
            if value is not None and (not isinstance(value, int) or value < 0):
                raise VaultSettingsError(f"{name} must be a number of bytes >= 0, got {value!r}")
        if settings.get("disk_cap") is not None:
            self._check_cap(settings["disk_cap"])
        if settings.get("ram_cap") is None and "ram_cap" in settings:
            raise VaultSettingsError("ram_cap must be a number of bytes (0 turns the RAM tier off)")
        path = self.root / "vault.json"
        with open(self.root / "index.sqlite.lock", "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            current = json.loads(path.read_text())
            current.update(settings)
            tmp = path.with_name(f".vault.json.{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                json.dump(current, f)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        if "disk_cap" in settings:
            self.disk.cap = settings["disk_cap"]
        if "ram_cap" in settings:
            self.ram.cap = settings["ram_cap"]
        return Settings(block_size=current["block_size"], disk_cap=current.get("disk_cap"),
                        ram_cap=current.get("ram_cap", self.ram.cap))

    # tidying and removing

    def gc(self, *, evict_all: bool = False, empty_quarantine: bool = False) -> GcResult:
        """Tidy up: stale temp files, rows whose files are gone, unindexed files, the disk cap, and
        (empty_quarantine) the files set aside in quarantine/."""
        self.require_writable("tidy it up")
        now = time.time()
        temps = 0
        for path in self.shards.glob("*/*/.tmp-*"):
            try:
                if now - path.stat().st_mtime > _TMP_MAX_AGE_S:
                    path.unlink()
                    temps += 1
            except OSError:
                pass
        self._check_cap(self.disk.cap)
        rows = self.index.all_chunks()
        gone = [r["key"] for r in rows if not (self.shards / r["file"]).exists()]
        self.index.delete_chunks(gone)
        known = {r["file"] for r in rows}
        adopted = 0
        for path in self._shard_files():
            if str(path.relative_to(self.shards)) in known:
                continue
            if self._adopt(path):
                adopted += 1
            else:
                self._quarantine(path.stem, path)
        self._drop_stale_warmed()
        self.disk.reconcile(self.index)
        evicted = self._enforce_cap(evict_all)
        cleared = 0
        qdir = self.root / "quarantine"
        if empty_quarantine and qdir.is_dir():
            for path in qdir.iterdir():
                try:
                    path.unlink()
                    cleared += 1
                except OSError:
                    pass
        return GcResult(temp_files_removed=temps, rows_dropped=len(gone), files_adopted=adopted, evicted=evicted,
                        quarantine_removed=cleared, bytes_on_disk=self.disk.usage(self.index))

    def rm(self, *, namespace: str | None = None, label: str | None = None, everything: bool = False) -> RmResult:
        """Remove stored chunks.

        namespace: every chunk of that namespace (an id or unique id prefix).
        label: the warmed prompts with that label, and their chunks that no other warmed prompt
            or longer chunk still uses (an unknown label raises VaultSettingsError).
        everything: all chunks of all namespaces.
        """
        if sum(x is not None and x is not False for x in (namespace, label, everything)) != 1:
            raise VaultSettingsError("rm needs exactly one of: namespace, label, everything")
        self.require_writable("remove chunks")
        warmed = self.index.warmed()
        if everything:
            doomed = [r["key"] for r in self.index.all_chunks()]
            gone = warmed
        elif namespace is not None:
            ids = [n["id"] for n in self.index.namespaces() if n["id"].startswith(namespace)]
            if len(ids) != 1:
                raise VaultSettingsError(f"namespace {namespace!r} matches {len(ids)} namespaces")
            doomed = [r["key"] for r in self.index.all_chunks(ids[0])]
            gone = [w for w in warmed if w["namespace"] == ids[0]]
        else:
            gone = [w for w in warmed if w["label"] == label]
            if not gone:
                raise VaultSettingsError(f"no warmed prompt is labelled {label!r} (see: promptvault ls)")
            doomed = self._label_chunks(label, warmed)
        self.index.delete_warmed([w["id"] for w in gone])
        ledger.record_removed(self.root, gone)
        for key in doomed:
            row = self.index.chunk(key)
            if row is not None:
                (self.shards / row["file"]).unlink(missing_ok=True)
        self.index.delete_chunks(doomed)
        for key in doomed:
            self.ram.discard(key)
        return RmResult(removed_chunks=len(doomed), removed_warmed=len(gone))

    def _label_chunks(self, label: str, warmed: list[dict]) -> list[str]:
        mine = [w for w in warmed if w["label"] == label]
        keep: set[str] = set()
        for w in warmed:
            if w["label"] != label:
                keep.update(self._ancestors(w["last_key"]))
        candidates: set[str] = set()
        for w in mine:
            candidates.update(self._ancestors(w["last_key"]))
        candidates -= keep
        doomed: list[str] = []
        changed = True
        while changed:  # remove from the leaves inwards; a chunk others extend stays
            changed = False
            for key in list(candidates):
                if not [c for c in self.index.children_of(key) if c not in doomed]:
                    doomed.append(key)
                    candidates.discard(key)
                    changed = True
        return doomed

