"""The Vault: prompt caches on disk, keyed by chained token blocks, restored into mlx-lm caches.

    vault = Vault("~/.cache/promptvault/vault")
    vault.warm(lm, tokens)                  # prefill in large steps, store each block once
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

import fcntl
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
from promptvault.vault import caches, compact, ledger, remote_sync
from promptvault.vault.errors import CapTooSmallError, VaultPathError, VaultReadOnlyError, VaultSettingsError
from promptvault.vault.index import Index
from promptvault.vault.keys import chunk_key, tokens_to_bytes
from promptvault.vault.lookup import exact_only, plan
from promptvault.vault.namespace import FORMAT_VERSION, Namespace, canonical_json, make_namespace
from promptvault.vault.remote import open_remote
from promptvault.vault.shards import (SUFFIX, CorruptShard, encode_shard, publish_shard, read_metadata, read_shard,
                                     relpath)
from promptvault.vault.tiers import DiskTier, RamTier
from promptvault.vault.writer import ShardWriter

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 256
# warm's tokens per model call (rounded down to whole blocks). On a GPU, mlx-lm's prefill_step_size.
# On CPU smaller steps prefill faster (attention over a 2,048-row step is memory bound there):
# SmolLM2, 2,048 tokens, 2-core EPYC with OpenBLAS, two loaded rounds (2026-11-30): steps of
# 2048 / 1024 / 512 / 256 took 30.1 / 29.3 / 24.5 / 23.0 s and 43.2 / 38.9 / 31.8 / 34.1 s.
PREFILL_STEP = 2048
CPU_PREFILL_STEP = 512
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
    tier: str  # "ram", "disk", "remote" (chunks came from the remote tier) or "none"
    lookup_s: float
    read_s: float  # shard reads + checksums (0 for RAM hits)
    decode_s: float  # payloads -> cache objects, evaluated
    quarantined: list[str] = field(default_factory=list)  # keys of shards that failed their check
    missing: list[str] = field(default_factory=list)  # keys whose files were gone (evicted meanwhile)
    note: str | None = None  # why nothing was reused, when the vault can tell (another namespace)

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
class _Chunk:
    """A block on its way to disk: its shard bytes and what its index row needs."""
    key: str
    rel: str  # shard path under shards/
    chunk: dict  # the chunk's identity (key, parent, namespace, position, n_tokens)
    ns: Namespace
    payload: caches.BlockPayload
    tokens: np.ndarray
    parts: list[bytes]  # the shard file's bytes (shards.encode_shard)
    digest: str


@dataclass
class _Loaded:
    payload: caches.BlockPayload
    nbytes: int
    tokens: np.ndarray  # the chunk's token ids, from the shard itself (not the index)


class Vault:
    """A prompt-cache vault at `path` (created on first use).

    block_size: tokens per block, fixed when the vault is created (None: the vault's, or 256).
    disk_cap: bytes the whole vault directory may use; enforced after writes. A cap smaller than
        the largest stored chunk is refused. None: the cap stored by configure(), else unlimited.
    ram_cap: bytes of compressed chunks kept in memory by this process (0 disables the tier).
        None: the stored one, else DEFAULT_RAM_CAP.
    codec: how new blocks are coded; part of the namespace, so each codec has its own entries.
    remote: a shared remote tier below the disk, `s3://bucket/prefix` or a remote.RemoteTier
        (credentials from the AWS variables/profile); None: local tiers only.
    """

    def __init__(self, path, *, block_size: int | None = None, disk_cap: int | None = None,
                 ram_cap: int | None = None, codec: KVCodec | None = None, remote=None):
        self.root = Path(path).expanduser()
        self.codec = codec or DEFAULT_CODEC
        self.remote = open_remote(remote)  # remote tier (remote.py, remote_sync.py)
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
        stored = json.loads((self.root / "vault.json").read_text())  # caps kept by configure()
        self.ram = RamTier(ram_cap if ram_cap is not None else stored.get("ram_cap", DEFAULT_RAM_CAP))
        self.disk = DiskTier(self.root, self.shards, disk_cap if disk_cap is not None else stored.get("disk_cap"))
        if not new_index and not self.index.any_chunk() and self._any_shard_file():
            log.warning("the vault index lists no chunks but shards/ holds files: rebuilding it from them")
            if self.read_only:
                self.index.close()
                self.index = Index(None)
            new_index = True
        if new_index and self._any_shard_file():
            self._reindex()  # the index was lost: the files are the truth
        self._check_cap(disk_cap)

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
        if self.remote is not None:
            self.remote.close()

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
        """The longest stored prefix of `tokens` reusable by `lm` (always < len(tokens)).

        A model whose cache holds a layer type the vault cannot store is a miss, not an error."""
        t0 = time.perf_counter()
        toks = _tokens(lm, tokens)
        try:
            ns = self.namespace(lm)
        except caches.UnsupportedCacheError as e:
            log.warning("%s: nothing can be reused", e)
            return LookupResult("", len(toks), 0, "none", [], time.perf_counter() - t0)
        p = plan(self.index, ns, toks)
        tier = "none"
        if p.reuse:
            tier = "ram" if all(self.ram.get(r["key"]) is not None for r in p.chunks) else "disk"
        return LookupResult(ns.id, len(toks), p.reuse, tier, p.chunks, time.perf_counter() - t0)

    def restore(self, lm, tokens) -> RestoreResult:
        """Fresh caches for `lm` holding the longest stored prefix of `tokens`.

        Chunks are read in order; the first one that is missing, fails its checksum (it is then
        quarantined) or holds other tokens than the prompt ends the restore there: the intact
        chunks before it are used, so one bad chunk costs only the tokens from it on.
        """
        toks = _tokens(lm, tokens)
        fetched = remote_sync.fetch(self, lm, toks) if self.remote else 0  # remote tier: into the disk tier
        look = self.lookup(lm, toks)
        result = RestoreResult(make_prompt_cache(lm.model), look.tokens_total, 0, "none", look.seconds, 0.0, 0.0)
        if not look.tokens_reused:
            if look.namespace:
                result.note = self._other_namespace_note(toks, self.namespace(lm))
                if result.note:
                    log.warning("%s", result.note)
            return result
        t0 = time.perf_counter()
        items, result.quarantined, result.missing = self._load(look.chunks, toks[: look.tokens_reused])
        result.read_s = time.perf_counter() - t0
        reuse = look.tokens_reused
        if len(items) < len(look.chunks):
            reuse = self._usable(self.namespace(lm), look.chunks[: len(items)], reuse)
            what = ", ".join(f"{len(keys)} {kind}" for kind, keys in
                             (("missing", result.missing), ("quarantined", result.quarantined)) if keys)
            log.warning("stored chunk(s) unusable (%s): restoring %d of the %d tokens found%s", what, reuse,
                        look.tokens_reused, "" if reuse else ", running cold")
        if not reuse:
            return result
        t1 = time.perf_counter()
        try:
            cache = caches.restore_cache(lm.model, [i.payload for i in items], reuse)
        except caches.RestoreError as e:
            log.warning("stored chunks cannot be restored (%s); running cold", e)
            return result
        _eval_cache(cache)
        decode_s = time.perf_counter() - t1
        used = look.chunks[: len(items)]
        log.info("restored %d of %d tokens from %d chunks (%s): lookup %.1f ms, read %.1f ms, decode %.1f ms",
                 reuse, look.tokens_total, len(used), look.tier, look.seconds * 1e3, result.read_s * 1e3,
                 decode_s * 1e3)
        if not self.read_only:
            self.index.touch([r["key"] for r in used])
            self._touch_files(used)
        result.cache, result.tokens_reused, result.decode_s = cache, reuse, decode_s
        result.tier = "remote" if fetched else look.tier
        return result

    def _usable(self, ns: Namespace, rows: list[dict], reuse: int) -> int:
        """Tokens restorable from the leading chunks `rows` alone (at most `reuse`): their end, or
        in a namespace with recurrent state the last of their ends that has a snapshot."""
        ends = np.cumsum([r["n_tokens"] for r in rows]).tolist() if rows else []
        if rows and exact_only(ns):
            ends = [e for e, r in zip(ends, rows) if e <= reuse and self.index.has_snapshot(r["key"])]
        return min(int(max(ends, default=0)), reuse)

    def _touch_files(self, rows: list[dict]) -> None:
        """A file's access time is its chunk's last use, its modification time its creation: the
        eviction order survives an index rebuild (reindex reads both back)."""
        now = time.time()
        for r in rows:
            try:
                os.utime(self.shards / r["file"], (now, os.stat(self.shards / r["file"]).st_mtime))
            except OSError:
                pass

    def _other_namespace_note(self, toks: np.ndarray, ns: Namespace) -> str | None:
        """Why a prompt found nothing: another namespace of this vault (another model, codec or KV
        dtype) holds its first block. None when no other namespace does, or the prompt is shorter
        than a block."""
        if len(toks) <= self.block_size:
            return None
        for other in self.index.namespaces():
            desc = other["descriptor"]
            if other["id"] == ns.id:
                continue
            first = chunk_key(None, Namespace.from_descriptor(desc).digest, toks[: self.block_size])
            if self.index.existing([first]):
                what = {"model": "another model", "codec": "another codec (--key-bits/--value-bits/--quality)",
                        "kv_dtype": "another KV dtype", "layout": "another cache layout"}
                diff = [text for k, text in what.items() if desc.get(k) != ns.descriptor.get(k)]
                return (f"nothing reused: this prompt is stored under namespace {other['id'][:12]} with "
                        f"{', '.join(diff) or 'other settings'} than this run's")
        return None

    def _load(self, rows: list[dict], toks: np.ndarray | None = None
              ) -> tuple[list[_Loaded], list[str], list[str]]:
        """The leading chunks of `rows` that can be used, from the RAM tier or read and verified
        from disk (then kept in RAM), up to the first that cannot; with the keys quarantined and
        missing. Given the reused tokens `toks`, each chunk's own tokens must match them where they overlap:
        the lookup trusted the index's copy of the tokens, and a damaged index must not make a
        shard serve a prompt it was not computed for (such a row is re-read from its file)."""
        loaded: list[_Loaded] = []
        for row in rows:
            item = self.ram.get(row["key"])
            if item is None:
                item, problem = self._read(row)
                if item is None:
                    return loaded, [row["key"]] if problem == "quarantined" else [], \
                        [row["key"]] if problem == "missing" else []
                self.ram.put(row["key"], item, item.nbytes)
            if toks is not None and not self._tokens_match(row, item, toks):
                return loaded, [], []
            loaded.append(item)
        return loaded, [], []

    def _tokens_match(self, row: dict, item: _Loaded, toks: np.ndarray) -> bool:
        start = row["position"]
        need = min(row["n_tokens"], len(toks) - start)
        if need <= 0 or (len(item.tokens) >= need and np.array_equal(item.tokens[:need], toks[start : start + need])):
            return True
        log.warning("the index disagreed with shard %s about its tokens; its row is re-read from the file",
                    row["key"][:12])
        self.ram.discard(row["key"])
        if not self.read_only:
            self.index.delete_chunks([row["key"]])
            try:
                self._index_file(self.shards / row["file"])
            except (CorruptShard, KeyError, ValueError, TypeError, OSError):
                pass
        return False

    def _read(self, row: dict) -> tuple[_Loaded | None, str | None]:
        """Read and verify one shard: (chunk, None), or (None, "missing") when its file is gone,
        or (None, "quarantined") when it failed its check (moved aside, row dropped).

        A file that checks out against its own checksum and names the right key is used even when
        the index recorded another checksum: the index row is stale (the file was evicted and
        published again since), so the row is corrected, not the file quarantined."""
        path = self.shards / row["file"]
        try:
            shard = read_shard(path)
            info = json.loads(shard.metadata["chunk"])
            if info["key"] != row["key"]:
                raise CorruptShard("shard does not hold the indexed chunk")
            ns = compact.unpack(shard.metadata["namespace"])
            meta = {**compact.unpack(shard.metadata["payload"]), "layout": ns["layout"]["layers"],
                    "codec": ns["codec"]}
        except FileNotFoundError:  # evicted by another process meanwhile
            if not self.read_only:
                self.index.delete_chunks([row["key"]])
            return None, "missing"
        except (CorruptShard, KeyError, ValueError, TypeError):
            self._quarantine(row["key"], path)
            return None, "quarantined"
        if shard.checksum != row["checksum"] and not self.read_only:
            self.index.set_file(row["key"], shard.nbytes, shard.checksum)
        arrays = {k: v for k, v in shard.arrays.items() if k != _TOKENS}
        toks = np.asarray(shard.arrays[_TOKENS]).astype(np.int64) if _TOKENS in shard.arrays else np.zeros(0, np.int64)
        return _Loaded(caches.BlockPayload(arrays, meta), sum(a.nbytes for a in arrays.values()), toks), None

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
             progress: Callable[[int, int], None] | None = None, step: int | None = None) -> StoreResult:
        """Prefill `tokens` through `lm` and store every block not yet stored.

        Leading blocks already in the vault are restored instead of recomputed (full blocks
        only, up to the first that cannot be read), so with a lossy codec the new blocks are
        computed from the decoded prefix: the same state a later restore of that prefix continues
        from. The prompt's tail shorter than a block is stored as a leaf. Another process may be
        storing the same blocks meanwhile with other bytes: whichever file is complete first stays.

        The rest is prefilled in steps of `step` tokens (default PREFILL_STEP on a GPU, mlx-lm's
        own; CPU_PREFILL_STEP on CPU, where smaller steps are faster),
        rounded down to whole blocks and limited by the model's caches (caches.prefill_step:
        one block for recurrent state); the step's blocks are then cut out of the live cache and
        encoded with one evaluation, and their files written by a background thread while the
        next step prefills. `progress(tokens_done, tokens_total)` is called after each step.
        Timing: prefill_s and encode_s are this thread's; write_s is the writer thread's file
        time plus this thread's index time, so it overlaps the others.
        """
        if self.remote:  # remote tier: leading chunks stored there are restored, not recomputed
            remote_sync.fetch(self, lm, _tokens(lm, tokens))
        toks, ns, spans, keys, have = self._store_plan(lm, tokens, "warm a prompt")
        done = 0  # leading chunks already stored (full blocks: restorable as a start)
        while done < len(keys) and keys[done] in have and spans[done][1] - spans[done][0] == self.block_size:
            done += 1
        cache, reused = make_prompt_cache(lm.model), 0
        if done and not all(k in have for k in keys):
            rows = [self.index.chunk(k) for k in keys[:done]]
            rows = rows[: rows.index(None)] if None in rows else rows
            items, _, _ = self._load(rows, toks)
            if items:
                reused = spans[len(items) - 1][1]
                cache = caches.restore_cache(lm.model, [i.payload for i in items], reused)
            have = self.index.existing(keys)  # chunks dropped as unreadable are stored again
        res = StoreResult(ns.id, len(toks), len(keys), 0, 0, reused, 0.0, 0.0, 0.0, 0)
        if not all(k in have for k in keys):
            if step is None:
                step = PREFILL_STEP if mx.default_device() == mx.gpu else CPU_PREFILL_STEP
            size = caches.prefill_step(cache, self.block_size, step)
            self._prefill_and_store(lm, cache, toks, ns, spans, keys, have, reused, size, res, progress)
        added = self.index.add_warmed(ns.id, label, source, len(toks), keys[-1])
        if added:
            ledger.record_added(self.root, added)
        if self.remote:  # remote tier: write through (conditional puts)
            remote_sync.write_through(self, ns, keys, added or {"namespace": ns.id, "label": label, "source": source,
                                                                "n_tokens": len(toks), "created": time.time()})
        res.evicted = self._enforce_cap()
        log.info("warmed %d tokens: %d of %d chunks written (%d bytes), %d tokens restored, %d evicted",
                 res.tokens, res.written, res.chunks, res.bytes_written, res.tokens_reused, res.evicted)
        return res

    def _prefill_and_store(self, lm, cache, toks, ns, spans, keys, have, pos, step, res, progress) -> None:
        """warm's loop from token `pos` (a block end) in `step`-token steps (whole blocks)."""
        writer = ShardWriter()
        failed = None  # the first write error, raised once every earlier chunk is indexed
        try:
            while pos < len(toks) and failed is None:
                end = min(pos + step, len(toks))
                t0 = time.perf_counter()
                lm.model(mx.array(toks[pos:end], dtype=mx.uint32)[None], cache=cache)
                _eval_cache(cache)
                res.prefill_s += time.perf_counter() - t0
                log.debug("prefilled tokens [%d, %d) in %.0f ms", pos, end, (time.perf_counter() - t0) * 1e3)
                if progress is not None:
                    progress(end, len(toks))
                todo = [i for i, (a, b) in enumerate(spans) if pos <= a < end and keys[i] not in have]
                t0 = time.perf_counter()
                payloads = caches.encode_blocks(cache, [spans[i] for i in todo], self.codec, at=end)
                jobs = [self._prepare(ns, p, toks, keys[i], keys[i - 1] if i else None)
                        for i, p in zip(todo, payloads)]
                res.encode_s += time.perf_counter() - t0
                for job in jobs:
                    writer.submit(job, self.shards / job.rel, job.parts, job.digest)
                failed = self._index_results(writer.ready(), res, failed)
                pos = end
            failed = self._index_results(writer.wait(), res, failed)
        except BaseException:
            self._drop_unindexed(writer.stop())
            raise
        self._drop_unindexed(writer.stop())  # after a write error: the jobs skipped (nothing published)
        if failed is not None:
            raise VaultPathError(f"cannot write to vault {self.root}: {getattr(failed, 'strerror', None) or failed} "
                                 f"(after {res.written} new chunks; entries stored before are intact)") from None

    def _index_results(self, results: list, res: StoreResult, failed: Exception | None) -> Exception | None:
        """Index the published chunks among the writer's results, in order, until a write error;
        returns that error (or `failed`, one seen before). Nothing is indexed after it."""
        for i, r in enumerate(results):
            if failed is not None:
                self._drop_unindexed(results[i:])
                break
            res.write_s += r.seconds
            written = r.written
            if isinstance(r.error, CorruptShard):  # the file already under the key is damaged
                try:
                    written = self._publish_again(r.job)
                except (OSError, CorruptShard) as e:
                    failed = e
            elif isinstance(r.error, OSError):
                failed = r.error
            elif r.error is not None:  # a bug in the writer: not a disk problem
                self._drop_unindexed(results[i + 1:])
                raise r.error
            if failed is None and written is not None:
                self._index(r.job, written, res)
        return failed

    def _drop_unindexed(self, results: list) -> None:
        """Remove the files the writer published for chunks that will get no index row (warm
        stopped before indexing them): no file is left that the index does not name."""
        for r in results:
            if r.written is not None and r.written.published and self.index.chunk(r.job.key) is None:
                (self.shards / r.job.rel).unlink(missing_ok=True)

    def _store(self, ns: Namespace, cache: list, toks: np.ndarray, start: int, end: int, key: str,
               parent: str | None, res: StoreResult, at: int | None = None) -> None:
        """Encode, publish and index one chunk in this thread (save's path)."""
        t0 = time.perf_counter()
        job = self._prepare(ns, caches.encode_block(cache, start, end, self.codec, at=at), toks, key, parent)
        t1 = time.perf_counter()
        res.encode_s += t1 - t0
        try:
            try:
                written = publish_shard(self.shards / job.rel, job.parts, job.digest)
            except CorruptShard:
                written = self._publish_again(job)
        except (OSError, CorruptShard) as e:  # disk full, file too large, I/O error: the temp file is gone
            raise VaultPathError(f"cannot write to vault {self.root}: {getattr(e, 'strerror', None) or e} "
                                 f"(after {res.written} new chunks; entries stored before are intact)") from None
        res.write_s += time.perf_counter() - t1
        self._index(job, written, res)

    def _prepare(self, ns: Namespace, payload: caches.BlockPayload, toks: np.ndarray, key: str,
                 parent: str | None) -> _Chunk:
        """A captured block as the bytes of its shard file (MLX work: the calling thread's)."""
        start, end = payload.start, payload.end
        if not payload.complete:
            raise VaultSettingsError(f"the cache no longer holds every row of tokens [{start}, {end}) "
                                     "(a ring dropped them): warm the prompt instead of saving it")
        if self.disk.cap is not None and payload.nbytes > self.disk.cap:
            raise CapTooSmallError(f"disk cap of {self.disk.cap} bytes is smaller than one block "
                                   f"({payload.nbytes} bytes): raise the cap or lower the block size")
        meta = {k: v for k, v in payload.meta.items() if k not in ("layout", "codec")}  # in "namespace"
        chunk = {"key": key, "parent": parent, "namespace": ns.id, "position": start, "n_tokens": end - start}
        arrays = {**payload.arrays, _TOKENS: mx.array(toks[start:end], dtype=mx.uint32)}
        shard_meta = {"format": SHARD_FORMAT, "chunk": canonical_json(chunk),
                      "namespace": compact.pack(ns.descriptor), "payload": compact.pack(meta)}
        parts, digest = encode_shard(arrays, shard_meta)
        return _Chunk(key, relpath(key), chunk, ns, payload, np.asarray(toks[start:end], dtype=np.int64), parts, digest)

    def _publish_again(self, job: _Chunk):
        """The file already under the chunk's key is damaged: set it aside, publish ours."""
        self._quarantine(job.key, self.shards / job.rel)
        return publish_shard(self.shards / job.rel, job.parts, job.digest)

    def _index(self, job: _Chunk, written, res: StoreResult) -> None:
        """The index row (and RAM tier entry) of a chunk whose file is now published."""
        t0 = time.perf_counter()
        try:
            self.index.add_namespace(job.ns)
            self.index.add_chunk(
                {**job.chunk, "tokens": tokens_to_bytes(job.tokens), "file": job.rel, "bytes": written.nbytes,
                 "checksum": written.checksum}, snapshot=exact_only(job.ns))
        except sqlite3.OperationalError as e:  # e.g. the index cannot grow on a full disk
            if written.published and self.index.chunk(job.key) is None:
                (self.shards / job.rel).unlink(missing_ok=True)  # ours and not indexed: do not leave it behind
            raise VaultPathError(f"cannot write to vault {self.root} index: {e} "
                                 f"(after {res.written} new chunks; entries stored before are intact)") from None
        res.write_s += time.perf_counter() - t0
        if written.published:  # the RAM tier holds only the bytes the file holds
            self.ram.put(job.key, _Loaded(job.payload, job.payload.nbytes, job.tokens), job.payload.nbytes)
            res.written += 1
            res.bytes_written += written.nbytes
        else:
            self.ram.discard(job.key)
            log.debug("chunk %s was stored by another writer first: its file stays", job.key[:12])

    def save(self, lm, cache: list, tokens) -> StoreResult:
        """Store a live cache whose first rows are `tokens` (e.g. after a generation, when it
        also holds the answer). Only blocks not yet stored are encoded.

        The cache must be the model's default kind (make_prompt_cache(model)): that is what the
        vault stores and restores. KV layers can be saved after the fact; recurrent state
        (ArraysCache) only for the block ending where the cache is now, so a prompt whose other
        blocks are not stored yet must be warmed (warm() stores the state at every block end).
        """
        toks, ns, spans, keys, have = self._store_plan(lm, tokens, "store a cache")
        layout = caches.layer_layout(cache)
        default = ns.descriptor["layout"]["layers"]
        if layout != default:
            kinds = sorted({lay["type"] for lay in layout} ^ {lay["type"] for lay in default}) or ["parameters"]
            raise VaultSettingsError(
                f"this cache differs from the model's default cache ({', '.join(kinds)}); the vault stores and "
                "restores the default one (make_prompt_cache(model)): save that (convert after restoring, "
                "e.g. cache[i].to_quantized())")
        todo = [i for i, k in enumerate(keys) if k not in have]
        at = None
        if caches.block_ends_only(layout) and todo:
            at = caches.position(cache)
            if at is None:
                raise VaultSettingsError("this model's cache records no token position (only recurrent state), "
                                         "so the vault cannot tell which token its state belongs to: warm the "
                                         "prompt instead (Vault.warm / promptvault warm)")
            wrong = [spans[i] for i in todo if spans[i][1] != at]
            if wrong:
                raise VaultSettingsError(
                    f"this model keeps recurrent state, which the cache holds only for token {at}; the blocks "
                    f"ending at {', '.join(str(e) for _, e in wrong)} are not stored: warm the prompt instead "
                    "(Vault.warm / promptvault warm stores the state at every block end)")
        res = StoreResult(ns.id, len(toks), len(keys), 0, 0, 0, 0.0, 0.0, 0.0, 0)
        for i in todo:
            start, end = spans[i]
            self._store(ns, cache, toks, start, end, keys[i], keys[i - 1] if i else None, res, at=at)
        if self.remote:  # remote tier: write through (conditional puts) what this call stored
            remote_sync.write_through(self, ns, [keys[i] for i in todo])
        res.evicted = self._enforce_cap()
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
            "disk_bytes": self.disk.usage(self.index), "shard_bytes": sum(r["bytes"] for r in rows),
            "ram_cap": self.ram.cap, "ram_bytes": self.ram.nbytes, "ram_chunks": len(self.ram),
            "namespaces": rows, "warmed": self.index.warmed_count(),
            "quarantined": len(list(quarantine.iterdir())) if quarantine.exists() else 0,
        }

    def verify(self) -> dict:
        """Check every shard file under shards/, indexed or not, against its own checksum.

        Bad files are quarantined; files the index does not list are adopted when they check out
        (an index that lost rows); rows whose files are gone are dropped. Returns the counts and
        keys of each."""
        rows = {r["file"]: r for r in self.index.all_chunks()}
        checked, ok, bad, adopted = 0, 0, [], []
        for path in self._shard_files():
            rel = str(path.relative_to(self.shards))
            row = rows.pop(rel, None)
            if row is None:
                if not self.read_only:
                    try:
                        self._index_file(path)
                    except (CorruptShard, KeyError, ValueError, TypeError, OSError):
                        pass
                row = self.index.chunk(path.stem) if not self.read_only else None
                if row is None:  # unreadable header (or read-only): check it as a stranger
                    row = {"key": path.stem, "file": rel, "checksum": ""}
                else:
                    adopted.append(path.stem)
            checked += 1
            _, problem = self._read(row)
            if problem is None:
                ok += 1
            elif problem == "quarantined":
                bad.append(row["key"])
        missing = [r["key"] for r in rows.values()]
        if missing and not self.read_only:
            self.index.delete_chunks(missing)
        self.disk.reconcile(self.index)  # a read-only index is walked, not written
        return {"checked": checked, "ok": ok, "bad": bad, "adopted": adopted, "missing": missing}

    def _iter_shard_files(self):
        """Published shard files under shards/ (a writer's temp files excluded), unsorted."""
        return (p for p in self.shards.glob(f"*/*/*{SUFFIX}") if not p.name.startswith(".tmp-"))

    def _any_shard_file(self) -> bool:
        return self.shards.is_dir() and next(self._iter_shard_files(), None) is not None

    def _shard_files(self) -> list[Path]:
        return sorted(self._iter_shard_files())

    def reindex(self) -> dict:
        """Rebuild the index from the shard files alone (headers read, bytes checked on use).

        Warmed-prompt labels come back from the ledger (ledger.py), creation times from the files'
        modification times, recency from their access times (a restore sets it); hit counts and
        the exact times the old index holds are carried over when it is readable."""
        self.require_writable("rebuild its index")
        return self._reindex()

    def _reindex(self) -> dict:
        try:
            times = self.index.chunk_times()
        except sqlite3.DatabaseError:
            times = {}
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
        for path in self._shard_files():
            files += 1
            try:
                self._index_file(path)
            except (CorruptShard, KeyError, ValueError, TypeError, OSError):
                bad += 1
                self._quarantine(path.stem, path)
        self.index.restore_chunk_times(times)
        for rec in ledger.replay(self.root):
            self.index.add_warmed(**rec)
        self._drop_stale_warmed()
        return {"files": files, "indexed": files - bad, "quarantined": bad,
                "namespaces": len(self.index.namespaces()), "warmed": len(self.index.warmed())}

    def _index_file(self, path: Path) -> None:
        meta, checksum, tokens = read_metadata(path, _TOKENS)
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

    def configure(self, **settings) -> dict:
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
        return {k: current.get(k) for k in ("block_size", "disk_cap", "ram_cap")}

    def gc(self, *, evict_all: bool = False, empty_quarantine: bool = False) -> dict:
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
            try:
                self._index_file(path)
                adopted += 1
            except (CorruptShard, KeyError, ValueError, TypeError, OSError):
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
        return {"temp_files_removed": temps, "rows_dropped": len(gone), "files_adopted": adopted,
                "evicted": evicted, "quarantine_removed": cleared}

    def rm(self, *, namespace: str | None = None, label: str | None = None, everything: bool = False) -> int:
        """Remove stored chunks; returns how many.

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
        return len(doomed)

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
