"""The Vault: prompt caches on disk, keyed by chained token blocks, restored into mlx-lm caches.

    vault = Vault("~/.cache/promptvault/vault")
    vault.warm(lm, tokens)                  # prefill block by block, store each block once
    r = vault.restore(lm, tokens)           # fresh caches holding r.tokens_reused tokens
    logits = lm.model(mx.array([tokens[r.tokens_reused:]]), cache=r.cache)

Directory layout (everything 0700 / 0600: hash-named files let anyone who can list them test
whether a prompt was seen):

    vault.json          format version and block size, fixed when the vault is created
    index.sqlite        rebuildable index (+ -wal, -shm, .lock)
    shards/ab/cd/<key>.safetensors   one chunk per file (see shards.py)
    quarantine/         shards that failed their checksum, kept for inspection

`lm` is a promptvault.models.LoadedModel, or anything with `.model` (an mlx-lm model) and
`.fingerprint` (a string that changes with weights, tokenizer and chat template). Token
sequences may be given as text, which is then encoded with `lm.tokenizer`.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import weakref
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from promptvault.codec import CodecSpec, KVCodec
from promptvault.vault import caches, compact
from promptvault.vault.errors import CapTooSmallError, VaultPathError, VaultReadOnlyError, VaultSettingsError
from promptvault.vault.index import Index
from promptvault.vault.keys import chunk_key, tokens_to_bytes
from promptvault.vault.lookup import exact_only, plan
from promptvault.vault.namespace import FORMAT_VERSION, Namespace, canonical_json, make_namespace
from promptvault.vault.shards import SUFFIX, CorruptShard, read_metadata, read_shard, relpath, write_shard
from promptvault.vault.tiers import DiskTier, RamTier, disk_usage

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 256
DEFAULT_RAM_CAP = 256 * 2**20
# Chosen by `promptvault bench fidelity` on SmolLM2-135M and Gemma-3-270M (README.md, Choosing bits):
# centered 4-bit keys whose loudest quarter of channels per head get 6 bits (outlier split),
# 3-bit values, 8-bit log norms, the first prompt token (attention sink) lossless.
# Teacher-forced KL 0.0059 / 0.0067 nats at 3.93x / 4.09x smaller than float16 on disk; a value
# split would reach 0.0043 / 0.0044 but has no fused GPU kernel at head dim 128 (README says why).
DEFAULT_CODEC = KVCodec(keys=CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6),
                        values=CodecSpec(bits=3, norm_bits=8), sinks=1)
SHARD_FORMAT = f"promptvault.shard/{FORMAT_VERSION}"
_TOKENS = "_tokens"  # tensor holding the chunk's token ids (uint32)
_TMP_MAX_AGE_S = 3600


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
    tier: str  # "ram", "disk" or "none"
    lookup_s: float
    read_s: float  # shard reads + checksums (0 for RAM hits)
    decode_s: float  # payloads -> cache objects, evaluated
    quarantined: list[str] = field(default_factory=list)  # keys of shards that failed their check

    @property
    def seconds(self) -> float:
        return self.lookup_s + self.read_s + self.decode_s


@dataclass
class StoreResult:
    namespace: str
    tokens: int
    chunks: int  # chunks covering the prompt
    written: int  # chunks written by this call (the rest were already stored)
    bytes_written: int
    tokens_reused: int  # tokens restored instead of prefilled (warm only)
    prefill_s: float
    encode_s: float
    write_s: float
    evicted: int  # chunks evicted afterwards to respect the disk cap


@dataclass
class _Loaded:
    payload: caches.BlockPayload
    nbytes: int
    tokens: np.ndarray  # the chunk's token ids, from the shard itself (not the index)


class Vault:
    """A prompt-cache vault at `path` (created on first use).

    block_size: tokens per block, fixed when the vault is created (None: the vault's, or 256).
    disk_cap: bytes the whole vault directory may use (None: unlimited); enforced after writes.
    ram_cap: bytes of compressed chunks kept in memory by this process (0 disables the tier).
    codec: how new blocks are coded; part of the namespace, so each codec has its own entries.
    """

    def __init__(self, path, *, block_size: int | None = None, disk_cap: int | None = None,
                 ram_cap: int = DEFAULT_RAM_CAP, codec: KVCodec | None = None):
        self.root = Path(path).expanduser()
        self.codec = codec or DEFAULT_CODEC
        self.read_only = False  # set when the directory cannot be written: reads work, writes raise
        try:
            self.root.mkdir(mode=0o700, parents=True, exist_ok=True)
            self.shards = self.root / "shards"
            if not os.access(self.root, os.W_OK | os.X_OK):
                if not (self.root / "vault.json").exists():
                    raise PermissionError(f"no write permission on {self.root}")
                self.read_only = True
            else:
                os.chmod(self.root, 0o700)
                self.shards.mkdir(mode=0o700, exist_ok=True)
            self.block_size = self._settings(block_size)
            index_path = self.root / "index.sqlite"
            new_index = not index_path.exists()
            try:
                if self.read_only:  # a missing index is rebuilt in memory from the files
                    self.index = Index(None if new_index else index_path, read_only=not new_index)
                else:
                    self.index = Index(index_path)
            except sqlite3.DatabaseError as e:
                if not _corrupt(e):
                    raise VaultPathError(f"vault index {index_path} is not usable: {e}") from None
                if self.read_only:
                    self.index, new_index = Index(None), True
                else:
                    self._set_aside_index(e)  # the files are the truth: rebuild the index from them
                    self.index = Index(index_path)
                    new_index = True
        except OSError as e:
            raise VaultPathError(f"vault path {self.root} is not usable: {e.strerror or e}") from None
        for cap, name in ((disk_cap, "disk_cap"), (ram_cap, "ram_cap")):
            if cap is not None and cap < 0:
                raise VaultSettingsError(f"{name} must be >= 0 bytes, got {cap}")
        self.ram = RamTier(ram_cap)
        self.disk = DiskTier(self.root, self.shards, disk_cap)
        if new_index and self.shards.is_dir() and any(self.shards.iterdir()):
            self._reindex()  # the index was lost: the files are the truth

    def _set_aside_index(self, error: Exception) -> None:
        """Move a corrupt index (and its WAL / shared memory) to quarantine/ for inspection."""
        qdir = self._quarantine_dir()
        stamp = time.time_ns()
        for suffix in ("", "-wal", "-shm"):
            path = self.root / f"index.sqlite{suffix}"
            if path.exists():
                os.replace(path, qdir / f"index.sqlite{suffix}.{stamp}.corrupt")
        log.warning("the vault index was corrupt (%s): set aside in quarantine/, rebuilding it from the shards",
                    error)

    def require_writable(self, what: str) -> None:
        """Raise VaultReadOnlyError (one line) if this vault was opened read-only."""
        if self.read_only:
            raise VaultReadOnlyError(f"vault {self.root} is read-only (no write access): cannot {what}")

    def _settings(self, block_size: int | None) -> int:
        path = self.root / "vault.json"
        if path.exists():
            try:
                settings = json.loads(path.read_text())
                settings["block_size"], settings["format"]
            except (ValueError, KeyError, TypeError):
                raise VaultSettingsError(f"{path} is unreadable: not a promptvault vault?") from None
            if settings["format"] != FORMAT_VERSION:
                raise VaultSettingsError(f"{self.root} has vault format {settings.get('format')}, "
                                         f"this promptvault reads {FORMAT_VERSION}")
            if block_size is not None and block_size != settings["block_size"]:
                raise VaultSettingsError(f"{self.root} was created with block size {settings['block_size']}, "
                                         f"not {block_size} (block size is fixed per vault)")
            return settings["block_size"]
        block_size = DEFAULT_BLOCK_SIZE if block_size is None else block_size
        if not isinstance(block_size, int) or block_size < 1:
            raise VaultSettingsError(f"block size must be a positive number of tokens, got {block_size!r}")
        tmp = path.with_name(f".vault.json.{os.getpid()}.tmp")
        fd = os.open(tmp, os.O_CREAT | os.O_WRONLY | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as f:
            json.dump({"format": FORMAT_VERSION, "block_size": block_size, "created": time.time()}, f)
            f.flush()
            os.fsync(f.fileno())
        try:
            os.link(tmp, path)  # first creator wins; a racing one reads the winner's settings
        except FileExistsError:
            os.unlink(tmp)
            return self._settings(block_size)
        os.unlink(tmp)
        return block_size

    def close(self) -> None:
        self.index.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    # namespaces

    def namespace(self, lm, codec: KVCodec | None = None) -> Namespace:
        """The namespace of `lm` with `codec` (default: the vault's) in this vault."""
        layout, kv_dtype, shapes = _probe(lm.model)
        return make_namespace(model_fingerprint=lm.fingerprint, kv_dtype=kv_dtype,
                              layout={"layers": layout, "shapes": shapes}, block_size=self.block_size,
                              codec=(codec or self.codec).to_json())

    # lookup / restore

    def lookup(self, lm, tokens) -> LookupResult:
        """The longest stored prefix of `tokens` reusable by `lm` (always < len(tokens))."""
        t0 = time.perf_counter()
        toks = _tokens(lm, tokens)
        ns = self.namespace(lm)
        p = plan(self.index, ns, toks)
        tier = "none"
        if p.reuse:
            tier = "ram" if all(self.ram.get(r["key"]) is not None for r in p.chunks) else "disk"
        return LookupResult(ns.id, len(toks), p.reuse, tier, p.chunks, time.perf_counter() - t0)

    def restore(self, lm, tokens) -> RestoreResult:
        """Fresh caches for `lm` holding the longest stored prefix of `tokens`.

        Any shard that fails its checksum is quarantined and the whole restore becomes a miss
        (empty caches), so generation proceeds exactly as if cold.
        """
        toks = _tokens(lm, tokens)
        look = self.lookup(lm, toks)
        miss = RestoreResult(make_prompt_cache(lm.model), look.tokens_total, 0, "none",
                             look.seconds, 0.0, 0.0)
        if not look.tokens_reused:
            return miss
        t0 = time.perf_counter()
        items, bad = self._load(look.chunks)
        if not bad:
            bad = self._mismatched(look.chunks, items, toks, look.tokens_reused)
        read_s = time.perf_counter() - t0
        if bad:
            log.warning("%d stored chunk(s) failed their check and were quarantined; running cold", len(bad))
            miss.read_s, miss.quarantined = read_s, bad
            return miss
        t1 = time.perf_counter()
        try:
            cache = caches.restore_cache(lm.model, [i.payload for i in items], look.tokens_reused)
        except caches.RestoreError as e:
            log.warning("stored chunks cannot be restored (%s); running cold", e)
            miss.read_s = read_s
            return miss
        _eval_cache(cache)
        decode_s = time.perf_counter() - t1
        log.info("restored %d of %d tokens from %d chunks (%s): lookup %.1f ms, read %.1f ms, decode %.1f ms",
                 look.tokens_reused, look.tokens_total, len(look.chunks), look.tier, look.seconds * 1e3,
                 read_s * 1e3, decode_s * 1e3)
        if not self.read_only:
            self.index.touch([r["key"] for r in look.chunks])
        return RestoreResult(cache, look.tokens_total, look.tokens_reused, look.tier, look.seconds,
                             read_s, decode_s)

    def _mismatched(self, rows: list[dict], items: list[_Loaded], toks: np.ndarray, reuse: int) -> list[str]:
        """Keys of chunks whose own tokens (in the shard, carried by `items`) differ from the
        prompt over the reused span. The lookup trusted the index's copy of the tokens; a damaged
        index must not make a shard serve a prompt it was not computed for. Such a row is re-read
        from its file."""
        bad = []
        for row, item in zip(rows, items):
            start, need = row["position"], min(row["n_tokens"], reuse - row["position"])
            if need <= 0:
                continue
            if len(item.tokens) < need or not np.array_equal(item.tokens[:need], toks[start : start + need]):
                bad.append(row["key"])
                self.ram.discard(row["key"])
                if self.read_only:
                    continue
                self.index.delete_chunks([row["key"]])
                try:
                    self._index_file(self.shards / row["file"])
                except (CorruptShard, KeyError, ValueError, TypeError, OSError):
                    pass
        if bad:
            log.warning("the index disagreed with %d shard(s) about their tokens; rows re-read from the files",
                        len(bad))
        return bad

    def _load(self, rows: list[dict]) -> tuple[list[_Loaded], list[str]]:
        """The chunks of `rows`, from the RAM tier or read and verified from disk (then kept in
        RAM), and the keys of those that failed (quarantined)."""
        loaded, bad = [], []
        for row in rows:
            item = self.ram.get(row["key"])
            if item is None:
                item = self._read(row)
                if item is None:
                    bad.append(row["key"])
                    continue
                self.ram.put(row["key"], item, item.nbytes)
            loaded.append(item)
        return loaded, bad

    def _read(self, row: dict) -> _Loaded | None:
        """Read and verify one shard; on failure quarantine it, drop its row, return None."""
        path = self.shards / row["file"]
        try:
            shard = read_shard(path)
            info = json.loads(shard.metadata["chunk"])
            if info["key"] != row["key"] or shard.checksum != row["checksum"]:
                raise CorruptShard("shard does not hold the indexed chunk")
            ns = compact.unpack(shard.metadata["namespace"])
            meta = {**compact.unpack(shard.metadata["payload"]), "layout": ns["layout"]["layers"],
                    "codec": ns["codec"]}
        except FileNotFoundError:  # evicted by another process meanwhile
            if not self.read_only:
                self.index.delete_chunks([row["key"]])
            return None
        except (CorruptShard, KeyError, ValueError, TypeError):
            self._quarantine(row["key"], path)
            return None
        arrays = {k: v for k, v in shard.arrays.items() if k != _TOKENS}
        toks = np.asarray(shard.arrays[_TOKENS]).astype(np.int64) if _TOKENS in shard.arrays else np.zeros(0, np.int64)
        return _Loaded(caches.BlockPayload(arrays, meta), sum(a.nbytes for a in arrays.values()), toks)

    def _quarantine_dir(self) -> Path:
        """quarantine/, where damaged files go for inspection instead of being deleted."""
        qdir = self.root / "quarantine"
        qdir.mkdir(mode=0o700, exist_ok=True)
        return qdir

    def _quarantine(self, key: str, path: Path) -> None:
        self.ram.discard(key)
        if self.read_only:  # cannot move it: it stays a miss for this process
            log.warning("corrupt shard %s left in place: the vault is read-only", path)
            return
        qdir = self._quarantine_dir()
        try:
            os.replace(path, qdir / f"{path.stem}.{time.time_ns()}{SUFFIX}")
        except OSError:
            try:
                path.unlink()
            except OSError:
                pass
        self.index.delete_chunks([key])

    # writing

    def warm(self, lm, tokens, *, label: str | None = None, source: str | None = None,
             progress: Callable[[int, int], None] | None = None) -> StoreResult:
        """Prefill `tokens` block by block through `lm` and store every block not yet stored.

        Leading blocks already in the vault are restored instead of recomputed (full blocks
        only), so with a lossy codec the new blocks are computed from the decoded prefix: the
        same state a later restore of that prefix continues from. The prompt's tail shorter than
        a block is stored as a leaf. `progress(tokens_done, tokens_total)` is called after each
        prefill step (a progress bar for long prompts).
        """
        toks, ns, spans, keys, have = self._store_plan(lm, tokens, "warm a prompt")
        done = 0  # leading chunks already stored (full blocks: restorable as a start)
        while done < len(keys) and keys[done] in have and spans[done][1] - spans[done][0] == self.block_size:
            done += 1
        cache, reused = make_prompt_cache(lm.model), 0
        rows = [self.index.chunk(k) for k in keys[:done]]
        if done and None not in rows and not all(k in have for k in keys):
            items, bad = self._load(rows)
            if bad:  # quarantined: store those chunks again
                have = self.index.existing(keys)
            else:
                reused = spans[done - 1][1]
                cache = caches.restore_cache(lm.model, [i.payload for i in items], reused)
        res = StoreResult(ns.id, len(toks), len(keys), 0, 0, reused, 0.0, 0.0, 0.0, 0)
        if not all(k in have for k in keys):
            for i, (start, end) in enumerate(spans):
                if end <= reused:
                    continue
                t0 = time.perf_counter()
                lm.model(mx.array(toks[start:end], dtype=mx.uint32)[None], cache=cache)
                _eval_cache(cache)
                res.prefill_s += time.perf_counter() - t0
                log.debug("prefilled tokens [%d, %d) in %.0f ms", start, end, (time.perf_counter() - t0) * 1e3)
                if progress is not None:
                    progress(end, len(toks))
                if keys[i] not in have:
                    self._store(ns, cache, toks, start, end, keys[i], keys[i - 1] if i else None, res)
        self.index.add_warmed(ns.id, label, source, len(toks), keys[-1])
        res.evicted = len(self.disk.enforce(self.index, self.ram.discard))
        log.info("warmed %d tokens: %d of %d chunks written (%d bytes), %d tokens restored, %d evicted",
                 res.tokens, res.written, res.chunks, res.bytes_written, res.tokens_reused, res.evicted)
        return res

    def save(self, lm, cache: list, tokens) -> StoreResult:
        """Store a live cache whose first rows are `tokens` (e.g. after a generation, when it
        also holds the answer). Only blocks not yet stored are encoded.

        Only layers that still hold every block's rows can be saved after the fact (KVCache);
        a ring that dropped rows, or recurrent state that moved on, raises: warm those instead.
        """
        toks, ns, spans, keys, have = self._store_plan(lm, tokens, "store a cache")
        res = StoreResult(ns.id, len(toks), len(keys), 0, 0, 0, 0.0, 0.0, 0.0, 0)
        for i, (start, end) in enumerate(spans):
            if keys[i] not in have:
                self._store(ns, cache, toks, start, end, keys[i], keys[i - 1] if i else None, res)
        res.evicted = len(self.disk.enforce(self.index, self.ram.discard))
        return res

    def _store_plan(self, lm, tokens, action: str):
        """What warm and save both start from: the tokens, their namespace, block spans, chained
        keys and the keys already stored (after checking the vault can be written at all)."""
        self.require_writable(action)
        toks = _tokens(lm, tokens)
        ns = self.namespace(lm)
        spans = self._spans(len(toks))
        keys = _chain_keys(ns, toks, spans)
        return toks, ns, spans, keys, self.index.existing(keys)

    def _spans(self, n: int) -> list[tuple[int, int]]:
        if n < 1:
            raise VaultSettingsError("cannot store an empty prompt")
        return [(s, min(s + self.block_size, n)) for s in range(0, n, self.block_size)]

    def _store(self, ns: Namespace, cache: list, toks: np.ndarray, start: int, end: int, key: str,
               parent: str | None, res: StoreResult) -> None:
        t0 = time.perf_counter()
        payload = caches.encode_block(cache, start, end, self.codec)
        if not payload.complete:
            raise VaultSettingsError(f"the cache no longer holds every row of tokens [{start}, {end}) "
                                     "(a ring dropped them): warm the prompt instead of saving it")
        t1 = time.perf_counter()
        res.encode_s += t1 - t0
        if self.disk.cap is not None and payload.nbytes > self.disk.cap:
            raise CapTooSmallError(f"disk cap of {self.disk.cap} bytes is smaller than one block "
                                   f"({payload.nbytes} bytes): raise the cap or lower the block size")
        if payload.meta["layout"] != ns.descriptor["layout"]["layers"]:
            raise VaultSettingsError("this cache's layer layout differs from the model's default cache "
                                     "(e.g. a max_kv_size ring): store it with warm() instead")
        meta = {k: v for k, v in payload.meta.items() if k not in ("layout", "codec")}  # in "namespace"
        chunk = {"key": key, "parent": parent, "namespace": ns.id, "position": start, "n_tokens": end - start}
        arrays = {**payload.arrays, _TOKENS: mx.array(toks[start:end], dtype=mx.uint32)}
        rel = relpath(key)
        try:
            nbytes, checksum = write_shard(self.shards / rel, arrays, {
                "format": SHARD_FORMAT, "chunk": canonical_json(chunk),
                "namespace": compact.pack(ns.descriptor), "payload": compact.pack(meta)})
        except OSError as e:  # disk full, file too large, I/O error: the temp file is gone already
            raise VaultPathError(f"cannot write to vault {self.root}: {e.strerror or e} "
                                 f"(after {res.written} new chunks; entries stored before are intact)") from None
        try:
            self.index.add_namespace(ns)
            inserted = self.index.add_chunk(
                {**chunk, "tokens": tokens_to_bytes(toks[start:end]), "file": rel, "bytes": nbytes,
                 "checksum": checksum}, snapshot=exact_only(ns))
        except sqlite3.OperationalError as e:  # e.g. the index cannot grow on a full disk
            if self.index.chunk(key) is None:
                (self.shards / rel).unlink(missing_ok=True)  # not indexed: do not leave it behind
            raise VaultPathError(f"cannot write to vault {self.root} index: {e} "
                                 f"(after {res.written} new chunks; entries stored before are intact)") from None
        self.ram.put(key, _Loaded(payload, payload.nbytes, np.asarray(toks[start:end], dtype=np.int64)),
                     payload.nbytes)
        res.write_s += time.perf_counter() - t1
        if inserted:
            res.written += 1
            res.bytes_written += nbytes

    # maintenance

    def stats(self) -> dict:
        namespaces = {n["id"]: n["descriptor"] for n in self.index.namespaces()}
        rows = []
        for s in self.index.stats():
            d = namespaces.get(s["namespace"], {})
            rows.append({**s, "model": d.get("model"), "codec": d.get("codec"), "kv_dtype": d.get("kv_dtype")})
        quarantine = self.root / "quarantine"
        return {
            "path": str(self.root), "block_size": self.block_size, "disk_cap": self.disk.cap,
            "disk_bytes": disk_usage(self.root), "shard_bytes": disk_usage(self.shards),
            "ram_cap": self.ram.cap, "ram_bytes": self.ram.nbytes, "ram_chunks": len(self.ram),
            "namespaces": rows, "warmed": len(self.index.warmed()),
            "quarantined": len(list(quarantine.iterdir())) if quarantine.exists() else 0,
        }

    def verify(self) -> dict:
        """Read and check every indexed shard; quarantine the bad ones."""
        checked, bad = 0, []
        for row in self.index.all_chunks():
            checked += 1
            if self._read(row) is None:
                bad.append(row["key"])
        return {"checked": checked, "ok": checked - len(bad), "bad": bad}

    def reindex(self) -> dict:
        """Rebuild the index from the shard files alone (headers read, bytes checked on use)."""
        self.require_writable("rebuild its index")
        return self._reindex()

    def _reindex(self) -> dict:
        try:
            self.index.clear()
        except sqlite3.DatabaseError as e:
            if not _corrupt(e):
                raise
            self.index.db.close()
            self._set_aside_index(e)
            self.index = Index(self.root / "index.sqlite")
        self.ram.clear()
        files, bad = 0, 0
        for path in sorted(self.shards.glob(f"*/*/*{SUFFIX}")):
            if path.name.startswith(".tmp-"):
                continue
            files += 1
            try:
                self._index_file(path)
            except (CorruptShard, KeyError, ValueError, TypeError, OSError):
                bad += 1
                self._quarantine(path.stem, path)
        return {"files": files, "indexed": files - bad, "quarantined": bad,
                "namespaces": len(self.index.namespaces())}

    def _index_file(self, path: Path) -> None:
        meta, checksum, tokens = read_metadata(path, _TOKENS)
        if meta.get("format") != SHARD_FORMAT:
            raise CorruptShard(f"unknown shard format {meta.get('format')!r}")
        chunk = json.loads(meta["chunk"])
        ns = Namespace.from_descriptor(compact.unpack(meta["namespace"]))
        if ns.id != chunk["namespace"] or path.name != f"{chunk['key']}{SUFFIX}":
            raise CorruptShard("shard metadata does not match its name or namespace")
        self.index.add_namespace(ns)
        self.index.add_chunk({**chunk, "tokens": tokens_to_bytes(tokens),
                              "file": str(path.relative_to(self.shards)), "bytes": path.stat().st_size,
                              "checksum": checksum}, snapshot=exact_only(ns))

    def gc(self) -> dict:
        """Tidy up: stale temp files, rows whose files are gone, unindexed files, the disk cap."""
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
        rows = self.index.all_chunks()
        gone = [r["key"] for r in rows if not (self.shards / r["file"]).exists()]
        self.index.delete_chunks(gone)
        known = {r["file"] for r in rows}
        adopted = 0
        for path in self.shards.glob(f"*/*/*{SUFFIX}"):
            if path.name.startswith(".tmp-") or str(path.relative_to(self.shards)) in known:
                continue
            try:
                self._index_file(path)
                adopted += 1
            except (CorruptShard, KeyError, ValueError, TypeError, OSError):
                self._quarantine(path.stem, path)
        live = self.index.existing([w["last_key"] for w in self.index.warmed()])
        self.index.delete_warmed([w["id"] for w in self.index.warmed() if w["last_key"] not in live])
        evicted = self.disk.enforce(self.index, self.ram.discard)
        return {"temp_files_removed": temps, "rows_dropped": len(gone), "files_adopted": adopted,
                "evicted": len(evicted)}

    def rm(self, *, namespace: str | None = None, label: str | None = None, everything: bool = False) -> int:
        """Remove stored chunks; returns how many.

        namespace: every chunk of that namespace (an id or unique id prefix).
        label: the warmed prompts with that label, and their chunks that no other warmed prompt
            or longer chunk still uses.
        everything: all chunks of all namespaces.
        """
        if sum(x is not None and x is not False for x in (namespace, label, everything)) != 1:
            raise VaultSettingsError("rm needs exactly one of: namespace, label, everything")
        self.require_writable("remove chunks")
        if everything:
            doomed = [r["key"] for r in self.index.all_chunks()]
            self.index.delete_warmed([w["id"] for w in self.index.warmed()])
        elif namespace is not None:
            ids = [n["id"] for n in self.index.namespaces() if n["id"].startswith(namespace)]
            if len(ids) != 1:
                raise VaultSettingsError(f"namespace {namespace!r} matches {len(ids)} namespaces")
            doomed = [r["key"] for r in self.index.all_chunks(ids[0])]
            self.index.delete_warmed([w["id"] for w in self.index.warmed() if w["namespace"] == ids[0]])
        else:
            doomed = self._label_chunks(label)
        for key in doomed:
            row = self.index.chunk(key)
            if row is not None:
                (self.shards / row["file"]).unlink(missing_ok=True)
        self.index.delete_chunks(doomed)
        for key in doomed:
            self.ram.discard(key)
        return len(doomed)

    def _label_chunks(self, label: str) -> list[str]:
        warmed = self.index.warmed()
        mine = [w for w in warmed if w["label"] == label]
        keep: set[str] = set()
        for w in warmed:
            if w["label"] != label:
                keep.update(self._ancestors(w["last_key"]))
        candidates: set[str] = set()
        for w in mine:
            candidates.update(self._ancestors(w["last_key"]))
        candidates -= keep
        self.index.delete_warmed([w["id"] for w in mine])
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

    def _ancestors(self, key: str | None) -> list[str]:
        out = []
        while key:
            row = self.index.chunk(key)
            if row is None:
                break
            out.append(key)
            key = row["parent"]
        return out


def _corrupt(error: sqlite3.DatabaseError) -> bool:
    """SQLite says the file is damaged or not a database (not merely busy, full or read-only)."""
    name = getattr(error, "sqlite_errorname", None)
    if name is not None:
        return name.startswith(("SQLITE_CORRUPT", "SQLITE_NOTADB"))
    return any(s in str(error) for s in ("malformed", "not a database"))


def _tokens(lm, tokens) -> np.ndarray:
    if isinstance(tokens, str):
        tokens = lm.tokenizer.encode(tokens)
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


def _chain_keys(ns: Namespace, toks: np.ndarray, spans: list[tuple[int, int]]) -> list[str]:
    keys, parent = [], None
    for start, end in spans:
        parent = chunk_key(parent, ns.digest, toks[start:end])
        keys.append(parent)
    return keys


def _eval_cache(cache: list) -> None:
    mx.eval([v for c in cache for _, v in tree_flatten(c.state) if isinstance(v, mx.array)])


_PROBES: dict[int, tuple] = {}  # id(model) -> (weakref to it, probe result): once per process


def _probe(model) -> tuple[list, str, list]:
    """Layer layout, KV dtype and per-layer state shapes after one token: what the stored bytes
    depend on besides the weights (a float16 and a float32 run of one model must not mix)."""
    known = _PROBES.get(id(model))
    if known is not None and known[0]() is model:
        return known[1]
    cache = make_prompt_cache(model)
    layout = caches.layer_layout(cache)
    model(mx.array([[0]], dtype=mx.uint32), cache=cache)
    shapes, dtypes = [], []
    for c in cache:
        arrays = [v for _, v in tree_flatten(c.state) if isinstance(v, mx.array)]
        shapes.append([[str(a.dtype).removeprefix("mlx.core."), list(a.shape)] for a in arrays])
        dtypes += [s[0] for s in shapes[-1]]
    result = (layout, dtypes[0] if dtypes else "none", shapes)
    _PROBES[id(model)] = (weakref.ref(model), result)
    return result
