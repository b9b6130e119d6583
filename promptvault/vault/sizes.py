"""What stored entries would weigh uncompressed: the float16 baseline every ratio is against."""

_KV_LAYER_TYPES = ("KVCache", "RotatingKVCache")


def fp16_bytes_per_token(descriptor: dict) -> int:
    """Bytes one token's keys and values take in float16 across the namespace's attention
    layers: Σ 2 (K and V) · kv_heads · head_dim · 2 bytes. Recurrent state (ArraysCache) has no
    per-token size and is not counted."""
    layers = descriptor["layout"]["layers"]
    shapes = descriptor["layout"]["shapes"]
    total = 0
    for layer, arrays in zip(layers, shapes):
        if layer.get("type") in _KV_LAYER_TYPES:
            for _dtype, shape in arrays[:2]:
                total += shape[1] * shape[-1] * 2
    return total
