"""The write path: warm (prefill a prompt and store its blocks) and save (store a live cache).

A mixin of `Vault` (vault.py). A block becomes a chunk in three steps, in this order, so that the
index never names a file that is not complete: encode (chunks.encode_chunk, the MLX work, in the
calling thread), publish the file (shards.publish_shard: temp file, fsync, rename; warm hands this
to a background writer.ShardWriter while the next step prefills), then index it. Whichever
process publishes a key first wins; a damaged file already under the key is quarantined and
replaced.
"""

from __future__ import annotations

import logging
import sqlite3
import time
from collections.abc import Callable

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from promptvault.tokens import token_array
from promptvault.vault import caches, ledger, remote_sync
from promptvault.vault.records import EncodedChunk, Loaded, encode_chunk
from promptvault.vault.errors import CapTooSmallError, VaultPathError, VaultSettingsError
from promptvault.vault.keys import block_keys, block_spans, tokens_to_bytes
from promptvault.vault.lookup import exact_only
from promptvault.vault.namespace import Namespace
from promptvault.vault.results import StoreResult
from promptvault.vault.shards import CorruptShard, publish_shard
from promptvault.vault.sizes import fp16_bytes_per_token
from promptvault.vault.writer import ShardWriter

log = logging.getLogger(__name__)

# warm's tokens per model call (rounded down to whole blocks). On a GPU, mlx-lm's prefill_step_size.
# On CPU smaller steps prefill faster: attention over a 2,048-row step is memory bound there.
PREFILL_STEP = 2048
CPU_PREFILL_STEP = 512


class WritePath:
    """warm and save (see the module docstring)."""

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
            remote_sync.fetch(self, lm, token_array(lm.tokenizer, tokens))
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
        res = StoreResult(ns.id, len(toks), len(keys), tokens_reused=reused)
        if not all(k in have for k in keys):
            res.prefilled = True
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
                caches.evaluate_cache(cache)
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
            raise self._write_error(failed, res) from None

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

    def save(self, lm, cache: list, tokens) -> StoreResult:
        """Store the prompt `tokens` whose state `cache` holds (its first len(tokens) positions;
        after a generation it may hold the answer too). Any cache the model runs with will do:
        only blocks not yet stored are stored, taken from the live cache when it still holds
        them, else computed again by prefilling the prompt (warm), which is slower but the same
        bytes. The cache cannot give a block when it is of another kind than the model's default
        (make_prompt_cache(model), what the vault restores: e.g. converted to QuantizedKVCache),
        when a ring (RotatingKVCache) has dropped the block's rows, or when recurrent state
        (ArraysCache) has moved past the block's end. `StoreResult.prefilled` says which way it
        went."""
        toks, ns, spans, keys, have = self._store_plan(lm, tokens, "store a cache")
        at = caches.position(cache)
        if at is not None and at < len(toks):
            raise VaultSettingsError(f"the cache holds {at} tokens, fewer than the {len(toks)} given to save")
        todo = [i for i, k in enumerate(keys) if k not in have]
        res = StoreResult(ns.id, len(toks), len(keys))
        if todo and not self._cache_gives(cache, ns, [spans[i] for i in todo], at):
            log.info("the cache does not hold every block still to store: prefilling the prompt again")
            return self.warm(lm, toks)
        for i in todo:
            t0 = time.perf_counter()
            payload = caches.encode_block(cache, *spans[i], self.codec, at=at)
            res.encode_s += time.perf_counter() - t0
            if not payload.complete:  # a ring dropped rows: the blocks stored so far are a start for warm
                log.info("the cache no longer holds tokens [%d, %d): prefilling the prompt again", *spans[i])
                return self.warm(lm, toks)
            self._store(self._prepare(ns, payload, toks, keys[i], keys[i - 1] if i else None), res)
        if self.remote:  # remote tier: write through (conditional puts) what this call stored
            remote_sync.write_through(self, ns, [keys[i] for i in todo])
        res.evicted = self._enforce_cap()
        return res

    def _cache_gives(self, cache: list, ns: Namespace, spans: list[tuple[int, int]], at: int | None) -> bool:
        """Whether the live cache can give these blocks as the vault stores them, as far as can be
        told before encoding (a ring's dropped rows show only then: BlockPayload.complete)."""
        try:
            if caches.layer_layout(cache) != ns.descriptor["layout"]["layers"]:
                return False
        except caches.UnsupportedCacheError:
            return False
        if exact_only(ns):  # recurrent state is a snapshot of one position: the one block ending there
            return at is not None and all(end == at for _, end in spans)
        return True

    def _store(self, job: EncodedChunk, res: StoreResult) -> None:
        """Publish and index one encoded chunk in this thread (save's path)."""
        t0 = time.perf_counter()
        try:
            try:
                written = publish_shard(self.shards / job.rel, job.parts, job.digest)
            except CorruptShard:
                written = self._publish_again(job)
        except (OSError, CorruptShard) as e:  # disk full, file too large, I/O error: the temp file is gone
            raise self._write_error(e, res) from None
        res.write_s += time.perf_counter() - t0
        self._index(job, written, res)

    def _write_error(self, error: Exception, res: StoreResult) -> VaultPathError:
        return VaultPathError(f"cannot write to vault {self.root}: {getattr(error, 'strerror', None) or error} "
                              f"(after {res.written} new chunks; entries stored before are intact)")

    def _prepare(self, ns: Namespace, payload: caches.BlockPayload, toks: np.ndarray, key: str,
                 parent: str | None) -> EncodedChunk:
        """A captured block as the bytes of its shard file (MLX work: the calling thread's)."""
        if not payload.complete:  # warm's steps stay within every ring's window: a bug, not bad input
            raise RuntimeError(f"block [{payload.start}, {payload.end}) was captured after a ring dropped some of its rows")
        if self.disk.cap is not None and payload.nbytes > self.disk.cap:
            raise CapTooSmallError(f"disk cap of {self.disk.cap} bytes is smaller than one block "
                                   f"({payload.nbytes} bytes): raise the cap or lower the block size")
        return encode_chunk(ns, payload, toks, key, parent)

    def _publish_again(self, job: EncodedChunk):
        """The file already under the chunk's key is damaged: set it aside, publish ours."""
        self._quarantine(job.key, self.shards / job.rel)
        return publish_shard(self.shards / job.rel, job.parts, job.digest)

    def _index(self, job: EncodedChunk, written, res: StoreResult) -> None:
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
            self.ram.put(job.key, Loaded(job.payload, job.payload.nbytes, job.tokens), job.payload.nbytes)
            res.written += 1
            res.bytes_written += written.nbytes
            res.fp16_bytes += fp16_bytes_per_token(job.ns.descriptor) * job.chunk["n_tokens"]
        else:
            self.ram.discard(job.key)
            log.debug("chunk %s was stored by another writer first: its file stays", job.key[:12])

    def _store_plan(self, lm, tokens, action: str):
        """What warm and save both start from: the tokens, their namespace, block spans, chained
        keys and the keys already stored (after checking the vault can be written at all)."""
        self.require_writable(action)
        toks = token_array(lm.tokenizer, tokens)
        if len(toks) < 1:
            raise VaultSettingsError("cannot store an empty prompt")
        ns = self.namespace(lm)
        spans = block_spans(len(toks), self.block_size, tail=True)
        keys = block_keys(ns.digest, toks, self.block_size, tail=True)
        return toks, ns, spans, keys, self.index.existing(keys)
