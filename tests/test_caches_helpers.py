"""Shared helpers for the cache-adapter tests (no tests here): block-by-block warming like the
vault does, natural prefill, greedy generation, and the state a naturally grown ring exposes."""

import mlx.core as mx
from mlx_lm.generate import generate_step

from promptvault.vault.caches import encode_block


def _body(model):
    """The model without its LM head: prefill needs only the cache, not logits for every token."""
    return getattr(model, "model", model)


def warm_blocks(model, cache, tokens, block, kv, *more_kvs, at=0):
    """Prefill `tokens` (prompt positions at, at+1, ...) block by block, capturing each block
    right after it is processed (one payload list per codec given, or the list for one)."""
    kvs = (kv, *more_kvs)
    payloads = [[] for _ in kvs]
    for start in range(0, len(tokens), block):
        end = min(start + block, len(tokens))
        _body(model)(mx.array(tokens[start:end])[None], cache=cache)
        mx.eval([c.state for c in cache])
        for out, codec in zip(payloads, kvs):
            out.append(encode_block(cache, at + start, at + end, codec, at=at + end))
    return payloads if more_kvs else payloads[0]


def prefill(model, cache, tokens, chunk=None):
    """The normal prefill: one forward pass (or fixed chunks, as generate_step's prefill_step_size)."""
    chunk = chunk or len(tokens)
    for start in range(0, len(tokens), chunk):
        _body(model)(mx.array(tokens[start : start + chunk])[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def greedy(model, cache, next_tokens, n=24):
    """n greedy tokens from mlx-lm's generate_step, continuing the cache with `next_tokens`
    (one token id, or a list: all but the last go through the multi-token prefill path)."""
    prompt = next_tokens if isinstance(next_tokens, list) else [next_tokens]
    steps = generate_step(mx.array(prompt), model, prompt_cache=cache, max_tokens=n)
    return [int(tok) for tok, _ in steps]


def ring_view(cache):
    """(keys, values) that a ring grown to cache.offset tokens exposes, in temporal order:
    all rows if offset <= max_size, else the first `keep` rows and the last max_size - keep."""
    keys, values = cache._temporal_order(cache.keys), cache._temporal_order(cache.values)
    if cache.offset > cache.max_size:
        tail = cache.max_size - cache.keep
        keys = mx.concatenate([keys[..., : cache.keep, :], keys[..., -tail:, :]], axis=2)
        values = mx.concatenate([values[..., : cache.keep, :], values[..., -tail:, :]], axis=2)
    return keys, values


def same(a, b):
    return a.shape == b.shape and a.dtype == b.dtype and bool(mx.array_equal(a, b))
