"""QuantizedKVCache (mlx-lm's affine-quantized KV, mx.quantize tuples) <-> block payloads.

Each of keys/values is a tuple (packed uint32, scales, biases), tokens on axis -2.
Stored per block, for keys and values independently:
  - lossless spec: the tuple's rows, bit-exact (re-coding already-quantized data would only
    add error, and the tuple is already smaller than the floats);
  - lossy spec: the rows dequantized and coded with our codec (restore re-quantizes them with
    the cache's group_size/bits, so the restored cache has the same type and parameters).
Restored: a QuantizedKVCache(group_size, bits) with buffers sized once (256-row step).
"""

import mlx.core as mx
from mlx_lm.models.cache import QuantizedKVCache

from promptvault.codec import Encoded, KVCodec, decode, encode as codec_encode
from promptvault.vault.caches_rows import RestoreError, fill_rows, put_arrays, round_up, sub_arrays


def layout(cache: QuantizedKVCache) -> dict:
    return {"type": "QuantizedKVCache", "group_size": int(cache.group_size), "bits": int(cache.bits)}


def _encode_part(parts: tuple, spec, group_size: int, bits: int, prefix: str, out: dict) -> dict:
    if spec.lossless:
        put_arrays(out, prefix, {f"q{i}": p for i, p in enumerate(parts)})
        return {"raw": len(parts)}
    if len(parts) != 3:
        raise RestoreError(f"{prefix}: expected an affine (packed, scales, biases) tuple, got {len(parts)} arrays")
    floats = mx.dequantize(*parts, group_size=group_size, bits=bits)
    enc = codec_encode(floats, spec)
    put_arrays(out, prefix, enc.arrays)
    return {"codec": enc.meta()}


def encode(cache: QuantizedKVCache, start: int, end: int, kv: KVCodec, prefix: str, out: dict) -> dict:
    if cache.keys is None or end > cache.offset:
        raise RestoreError(
            f"layer {prefix}: QuantizedKVCache holds {cache.offset} tokens, cannot capture block [{start}, {end})"
        )
    seg = {"tokens": [start, end]}
    for name, parts, spec in (("k", cache.keys, kv.keys), ("v", cache.values, kv.values)):
        rows = tuple(p[..., start:end, :] for p in parts)
        seg[name] = _encode_part(rows, spec, cache.group_size, cache.bits, f"{prefix}.s0.{name}", out)
    return {**layout(cache), "segments": [seg]}


def _decoder(group_size: int, bits: int):
    def decode_rows(seg: dict, arrays: dict, prefix: str, i0: int, i1: int) -> tuple:
        out = []
        for name in ("k", "v"):
            part = seg[name]
            stored = sub_arrays(arrays, f"{prefix}.{name}")
            if "raw" in part:
                out.extend(stored[f"q{i}"][..., i0:i1, :] for i in range(part["raw"]))
            else:
                floats = decode(Encoded.from_parts(part["codec"], stored).slice_tokens(i0, i1))
                out.extend(mx.quantize(floats, group_size=group_size, bits=bits))
        return tuple(out)

    return decode_rows


def restore(layout: dict, blocks: list, n_tokens: int, prefix: str) -> QuantizedKVCache:
    group_size, bits = int(layout["group_size"]), int(layout["bits"])
    cache = QuantizedKVCache(group_size=group_size, bits=bits)
    n_k = _n_parts(blocks[0][0]["segments"][0]["k"])
    buffers = fill_rows(blocks, prefix, [(0, n_tokens, 0)], round_up(n_tokens, QuantizedKVCache.step),
                        _decoder(group_size, bits))
    cache.keys, cache.values = tuple(buffers[:n_k]), tuple(buffers[n_k:])
    cache.offset = n_tokens
    return cache


def _n_parts(part: dict) -> int:
    """Arrays one of keys/values decodes to: the stored tuple's length, or 3 when re-quantized."""
    return part["raw"] if "raw" in part else 3
