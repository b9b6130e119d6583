"""RotatingKVCache (sliding-window ring) <-> block payloads.

What mlx-lm does (0.32.x, verified against its code): a multi-token update first puts the ring
in temporal order, trims it to max_size - 1 rows (always keeping the first `keep`), then appends
all S new rows, so right after a block is processed its rows are the last S rows in temporal
order; a single-token update writes in place at `_idx` and wraps to `keep`. Either way the
temporal view holds tokens [0, keep) followed by the most recent rows.

Stored per block: the rows of tokens [start, end) that the ring still holds, as up to two
segments (the `keep` head and the recent tail), with the ring's offset/_idx for diagnosis.
When blocks are captured right after being processed, that is every row of the block.

Restored for a prefix of P tokens, exactly what a ring grown by prefill behaves like:
P <= max_size: all P rows, offset = _idx = P; else the first `keep` rows plus the last
max_size - keep rows in temporal order, offset = P, _idx = max_size (the next single-token
update wraps to `keep` and overwrites the oldest non-kept row, as it would naturally).
"""

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache

from promptvault.codec import KVCodec
from promptvault.vault.caches_rows import RestoreError, Rows, encode_group as _encode_group, encode_segments, fill_rows


def layout(cache: RotatingKVCache) -> dict:
    return {"type": "RotatingKVCache", "max_size": int(cache.max_size), "keep": int(cache.keep)}


def _temporal(cache: RotatingKVCache) -> tuple[mx.array, mx.array]:
    """Keys and values in temporal order (mlx-lm's own reordering, the source of truth)."""
    return cache._temporal_order(cache.keys), cache._temporal_order(cache.values)


def held_ranges(keep: int, offset: int, n_rows: int, start: int, end: int) -> list[tuple[int, int, int]]:
    """(a, b, row) for the tokens [a, b) of [start, end) present in a temporal view of n_rows
    rows of a ring that has seen `offset` tokens; row = index of token a in that view."""
    if n_rows >= offset:
        return [(start, end, start)] if start < end else []
    first_recent = offset - (n_rows - keep)
    out = []
    if start < keep:
        out.append((start, min(end, keep), start))
    a = max(start, first_recent, keep)
    if a < end:
        out.append((a, end, a - first_recent + keep))
    return out


def encode(cache: RotatingKVCache, start: int, end: int, kv: KVCodec, prefix: str, out: dict) -> dict:
    if cache.keys is None or end > cache.offset:
        raise RestoreError(
            f"layer {prefix}: RotatingKVCache has seen {cache.offset} tokens, cannot capture block [{start}, {end})"
        )
    keys, values = _temporal(cache)
    segments = []
    for a, b, row in held_ranges(cache.keep, cache.offset, keys.shape[2], start, end):
        rows = slice(row, row + b - a)
        segments += encode_segments(keys[..., rows, :], values[..., rows, :], (a, b), kv, prefix, len(segments), out)
    return {**layout(cache), "offset": int(cache.offset), "idx": int(cache._idx), "segments": segments}


def capture(cache: RotatingKVCache, start: int, end: int, prefix: str) -> Rows:
    """The ring's rows of tokens [start, end) that it still holds, for a layer group."""
    if cache.keys is None or end > cache.offset:
        raise RestoreError(
            f"layer {prefix}: RotatingKVCache has seen {cache.offset} tokens, cannot capture block [{start}, {end})"
        )
    keys, values = _temporal(cache)
    ranges = held_ranges(cache.keep, cache.offset, keys.shape[2], start, end)
    return Rows(keys, values, ranges, {"ranges": [[a, b, r] for a, b, r in ranges], "offset": int(cache.offset),
                                       "idx": int(cache._idx)})


def encode_group(rows: list[Rows], kv: KVCodec, prefix: str, out: dict) -> dict:
    info = rows[0].info
    return {"offset": info["offset"], "idx": info["idx"], "segments": _encode_group(rows, kv, prefix, out)}


def restore_group(layout: dict, blocks: list, n_tokens: int, prefix: str, n_layers: int) -> list[RotatingKVCache]:
    """One ring per layer of a group, decoded together (see caches_kv.restore_group)."""
    max_size, keep = int(layout["max_size"]), int(layout["keep"])
    n_rows = min(n_tokens, max_size)
    keys, values = fill_rows(blocks, prefix, needed_ranges(max_size, keep, n_tokens), n_rows)
    out = []
    for j in range(n_layers):
        cache = RotatingKVCache(max_size=max_size, keep=keep)
        cache.keys, cache.values, cache.offset, cache._idx = keys[j], values[j], n_tokens, n_rows
        out.append(cache)
    return out


def needed_ranges(max_size: int, keep: int, n_tokens: int) -> list[tuple[int, int, int]]:
    """(a, b, row): the tokens a naturally grown ring of n_tokens holds and where."""
    if n_tokens <= max_size:
        return [(0, n_tokens, 0)]
    tail = max_size - keep
    head = [(0, keep, 0)] if keep else []
    return head + [(n_tokens - tail, n_tokens, keep)]


def restore(layout: dict, blocks: list, n_tokens: int, prefix: str) -> RotatingKVCache:
    max_size, keep = int(layout["max_size"]), int(layout["keep"])
    cache = RotatingKVCache(max_size=max_size, keep=keep)
    n_rows = min(n_tokens, max_size)
    cache.keys, cache.values = fill_rows(blocks, prefix, needed_ranges(max_size, keep, n_tokens), n_rows)
    cache.offset = n_tokens
    cache._idx = n_rows
    return cache
