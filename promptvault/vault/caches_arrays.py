"""ArraysCache (recurrent / SSM state of hybrid models: conv window + recurrent state) <-> payloads.

The state summarises every token seen so far and cannot be trimmed or recomputed from rows, so
each block stores a lossless snapshot of the whole state as it is at the block's end. A restore
is possible only at a block end; anywhere else raises RestoreError saying why.
The snapshot is taken from the live cache, so the cache must be exactly at the block's end when
the block is captured (the caller passes that position; see caches.encode_block).
"""

import mlx.core as mx
from mlx_lm.models.cache import ArraysCache

from promptvault.vault.caches_rows import RestoreError, put_arrays, sub_arrays


def layout(cache: ArraysCache) -> dict:
    return {"type": "ArraysCache", "size": len(cache.cache)}


def encode(cache: ArraysCache, start: int, end: int, kv, prefix: str, out: dict) -> dict:
    if cache.left_padding is not None or cache.lengths is not None:
        raise RestoreError(f"layer {prefix}: ArraysCache is in a batched prefill (padding/lengths set)")
    present = [c is not None for c in cache.cache]
    put_arrays(out, prefix, {f"a{i}": c for i, c in enumerate(cache.cache) if c is not None})
    return {**layout(cache), "position": end, "present": present}


def restore(layout: dict, blocks: list, n_tokens: int, prefix: str) -> ArraysCache:
    for meta, arrays, block_prefix in blocks:
        if meta["position"] == n_tokens:
            cache = ArraysCache(int(layout["size"]))
            stored = sub_arrays(arrays, block_prefix)
            # A copy: the restored cache must never share an array object with the payload.
            cache.cache = [mx.array(stored[f"a{i}"]) if p else None for i, p in enumerate(meta["present"])]
            mx.eval([c for c in cache.cache if c is not None])
            return cache
    positions = [meta["position"] for meta, _, _ in blocks]
    raise RestoreError(
        f"layer {prefix}: ArraysCache (recurrent state) can only be restored where a snapshot was "
        f"taken, at block ends {positions}; {n_tokens} tokens is not one of them"
    )
