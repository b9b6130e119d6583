"""The Vault: prompt caches on disk, keyed by chained token blocks, restored into mlx-lm caches.

    vault = Vault("~/.cache/promptvault/vault")
    cache, rest = vault.fetch(lm, tokens)   # fresh mlx-lm caches holding the longest stored prefix
    ... generate from `rest` with prompt_cache=cache (mlx-lm's stream_generate / generate) ...
    vault.save(lm, cache, tokens)           # store the prompt's blocks not stored yet
    vault.warm(lm, tokens)                  # or: prefill a prompt now, only to store it

The Vault is a facade over three rooms: the read path (this module: lookup, restore, the RAM
tier, checksums and quarantine), the write path (write_path.py: warm, save) and maintenance
(maintenance.py: stats, verify, gc, rm, reindex, configure, warmed, describe).

Directory layout (everything 0700 / 0600: hash-named files let anyone who can list them test
whether a prompt was seen):

    vault.json          format version and block size, fixed when the vault is created
    index.sqlite        rebuildable index (+ -wal, -shm, .lock)
    shards/ab/cd/<key>.safetensors   one chunk per file (see shards.py)
    quarantine/         shards that failed their checksum, kept for inspection

`lm` is a promptvault.models.LoadedModel (load_model, or from_mlx_lm for what mlx_lm.load
returned), or anything with `.model` (an mlx-lm model) and `.fingerprint` (a string that changes
with weights, tokenizer and chat template). Token sequences may be given as text, which is then
encoded as is with `lm.tokenizer` (promptvault.tokens).
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import time
import weakref
from pathlib import Path

import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten
from mlx_lm.models.cache import make_prompt_cache

from promptvault.codec import KVCodec
from promptvault.codec.spec import DEFAULT_CODEC
from promptvault.tokens import token_array
from promptvault.vault import caches, remote_sync
from promptvault.vault.errors import VaultPathError, VaultReadOnlyError, VaultSettingsError
from promptvault.vault.index import Index, corrupt as _corrupt
from promptvault.vault.maintenance import Maintenance
from promptvault.vault.namespace import FORMAT_VERSION, Namespace, make_namespace
from promptvault.vault.remote import open_remote
from promptvault.vault.shards import SUFFIX
from promptvault.vault.store import ChunkStore, LookupResult, RestoreResult
from promptvault.vault.tiers import DiskTier, RamTier
from promptvault.vault.write_path import WritePath

log = logging.getLogger(__name__)

DEFAULT_BLOCK_SIZE = 256
DEFAULT_RAM_CAP = 256 * 2**20


class Vault(WritePath, Maintenance):
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
        self.store = ChunkStore(self)
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
        return self.store.lookup(lm, _tokens(lm, tokens))

    def restore(self, lm, tokens, *, longer_than: int = 0) -> RestoreResult:
        """Fresh caches for `lm` holding the longest stored prefix of `tokens` (store.py).

        Chunks are read in order; the first one that is missing, fails its checksum (it is then
        quarantined) or holds other tokens than the prompt ends the restore there: the intact
        chunks before it are used, so one bad chunk costs only the tokens from it on.
        longer_than: read nothing unless the stored prefix is longer than this many tokens (a
        caller that already holds that much, e.g. LiveCaches); the result is then a miss.
        """
        toks = _tokens(lm, tokens)
        fetched = remote_sync.fetch(self, lm, toks) if self.remote else 0  # remote tier: into the disk tier
        result = self.store.restore(lm, toks, longer_than)
        if fetched and result.tokens_reused:
            result.tier = "remote"
        return result

    def fetch(self, lm, tokens) -> tuple[list, list[int]]:
        """(cache, rest_tokens), as mlx-lm's LRUPromptCache.fetch_nearest_cache: fresh mlx-lm
        caches holding the longest stored prefix of `tokens` (empty ones when nothing is stored),
        and the tokens still to prefill (at least the last one, whose logits generation needs)."""
        toks = _tokens(lm, tokens)
        r = self.restore(lm, toks)
        return r.cache, toks[r.tokens_reused:].tolist()

    # the read path's pieces the write path and maintenance also use (store.py)

    def _load(self, rows: list[dict], toks: np.ndarray | None = None):
        return self.store.load(rows, toks)

    def _read(self, row: dict):
        return self.store.read(row)

    def _usable(self, ns: Namespace, rows: list[dict], reuse: int) -> int:
        return self.store.usable(ns, rows, reuse)

    def _quarantine_dir(self) -> Path:
        return self.store.quarantine_dir()

    def _quarantine(self, key: str, path: Path) -> None:
        self.store.quarantine(key, path)

    # the remote tier (remote_sync.py moves chunks, remote_admin.py inspects the bucket)

    def _remote(self):
        if self.remote is None:
            raise VaultSettingsError("no remote: give --remote s3://bucket/prefix (or set PROMPTVAULT_REMOTE)")
        return self.remote

    def push(self, labels: list[str] | None = None) -> dict:
        """Put warmed prompts (those labels, or all) on the remote; chunks it holds are skipped."""
        self._remote()
        return remote_sync.push(self, labels)

    def pull(self, labels: list[str] | None = None) -> dict:
        """Copy warmed prompts (those labels, or all the remote holds) into this vault, each chunk
        checked (checksum, key vs its tokens) before it is kept."""
        self._remote()
        return remote_sync.pull(self, labels)

    def remote_warmed(self) -> list[dict]:
        from promptvault.vault import remote_admin

        return remote_admin.ls(self._remote())

    def remote_stats(self) -> dict:
        from promptvault.vault import remote_admin

        return remote_admin.stats(self._remote())

    def remote_verify(self) -> dict:
        """Check every chunk object of the remote (reported, never deleted)."""
        from promptvault.vault import remote_admin

        return remote_admin.verify(self._remote())

    def remote_gc(self) -> dict:
        """Remove remote chunks no warmed prompt uses (older than an hour: another machine's warm
        may still be putting its record)."""
        from promptvault.vault import remote_admin

        return remote_admin.gc(self._remote())

    def _iter_shard_files(self):
        """Published shard files under shards/ (a writer's temp files excluded), unsorted."""
        return (p for p in self.shards.glob(f"*/*/*{SUFFIX}") if not p.name.startswith(".tmp-"))

    def _any_shard_file(self) -> bool:
        return self.shards.is_dir() and next(self._iter_shard_files(), None) is not None

    def _shard_files(self) -> list[Path]:
        return sorted(self._iter_shard_files())


def _tokens(lm, tokens) -> np.ndarray:
    return token_array(lm.tokenizer, tokens)


_eval_cache = caches.evaluate_cache


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
