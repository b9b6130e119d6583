"""KVCache <-> block payloads: the plain growing cache, every token's row kept.

Stored per block: one segment with the rows of tokens [start, end) (any block whose tokens the
cache still holds can be captured, so a cache can also be saved after the fact).
Restored: a KVCache whose buffer is allocated once, rounded up to mlx-lm's 256-row step as a
natural prefill would leave it, holding tokens [0, n_tokens) with offset = n_tokens.
"""

from mlx_lm.models.cache import KVCache

from promptvault.codec import KVCodec
from promptvault.vault.caches_rows import RestoreError, Rows, encode_group as _encode_group, encode_segments, fill_rows, round_up


def layout(cache: KVCache) -> dict:
    return {"type": "KVCache"}


def encode(cache: KVCache, start: int, end: int, kv: KVCodec, prefix: str, out: dict) -> dict:
    if cache.keys is None or end > cache.offset:
        raise RestoreError(
            f"layer {prefix}: KVCache holds {cache.offset} tokens, cannot capture block [{start}, {end})"
        )
    keys = cache.keys[..., start:end, :]
    values = cache.values[..., start:end, :]
    return {**layout(cache), "segments": encode_segments(keys, values, (start, end), kv, prefix, 0, out)}


def capture(cache: KVCache, start: int, end: int, prefix: str) -> Rows:
    """The rows of tokens [start, end) (views of the live buffer), for a layer group."""
    if cache.keys is None or end > cache.offset:
        raise RestoreError(
            f"layer {prefix}: KVCache holds {cache.offset} tokens, cannot capture block [{start}, {end})"
        )
    return Rows(cache.keys[..., start:end, :], cache.values[..., start:end, :], [(start, end, 0)],
                {"ranges": [[start, end]]})


def encode_group(rows: list[Rows], kv: KVCodec, prefix: str, out: dict) -> dict:
    return {"segments": _encode_group(rows, kv, prefix, out)}


def restore_group(layout: dict, blocks: list, n_tokens: int, prefix: str, n_layers: int) -> list[KVCache]:
    """One KVCache per layer of a group, decoded together; each layer's buffers are its slice of
    the group's (MLX arrays are values: a layer's later in-place update never touches another)."""
    keys, values = fill_rows(blocks, prefix, [(0, n_tokens, 0)], round_up(n_tokens, KVCache.step))
    out = []
    for j in range(n_layers):
        cache = KVCache()
        cache.keys, cache.values, cache.offset = keys[j], values[j], n_tokens
        out.append(cache)
    return out


def restore(layout: dict, blocks: list, n_tokens: int, prefix: str) -> KVCache:
    cache = KVCache()
    cache.keys, cache.values = fill_rows(blocks, prefix, [(0, n_tokens, 0)], round_up(n_tokens, KVCache.step))
    cache.offset = n_tokens
    return cache
