"""Cache adapters on the real models: a cache restored from lossless block payloads continues
greedy generation token for token like a naturally prefilled one (SmolLM2: KVCache and
keep=4 rings; Gemma-3: RotatingKVCache(512) + KVCache at prefixes around the window)."""

from pathlib import Path

import mlx.core as mx
from mlx_lm.models.cache import RotatingKVCache, make_prompt_cache
from test_caches_helpers import greedy, prefill, ring_view, warm_blocks

from promptvault.codec import LOSSLESS, CodecSpec, KVCodec
from promptvault.vault.caches import restore_cache

LOSSLESS_KV = KVCodec(LOSSLESS, LOSSLESS)
TQ3 = KVCodec(CodecSpec(bits=3), CodecSpec(bits=3))
TEXT = (Path(__file__).parent / "data" / "gpl3_opening.txt").read_text()


def _tokens(lm, n):
    tokens = lm.tokenizer.encode(TEXT)
    assert len(tokens) >= n
    return tokens[:n]


def _check_state(restored, natural, n):
    """Same cache types and positions; ring rows as a naturally grown ring exposes them
    (values differ by float rounding only: the chunking of the prefill differs)."""
    for nat, res in zip(natural, restored):
        assert type(res) is type(nat) and res.offset == nat.offset == n
        if isinstance(nat, RotatingKVCache):
            ref_k, ref_v = ring_view(nat)
            assert res._idx == min(n, nat.max_size) and res.keys.shape == ref_k.shape
            assert mx.allclose(res.values, ref_v, atol=1e-3).item()


def _check_same_generation(model, payload_sets, tokens, n, natural, n_gen):
    """Restore n tokens from each payload set; each continues greedily like `natural`."""
    restored = [restore_cache(model, payloads, n) for payloads in payload_sets]
    for res in restored:
        _check_state(res, natural, n)
    want = greedy(model, natural, tokens[n], n_gen)
    for res in restored:
        got = greedy(model, res, tokens[n], n_gen)
        assert got == want, f"prefix {n}: restored {got} vs natural {want}"


def test_gemma3_rings_restore_like_natural_prefill(gemma):
    """Prefixes below, at and past the 512-token window; blocks of 256 and of 300 (which does
    not divide the prefixes). 12 greedy tokens cover the ring's wrap-around after 511..513;
    24 at 1,300. (Gemma's 262K-entry LM head makes each generated token costly on CPU.)"""
    model = gemma.model
    tokens = _tokens(gemma, 1301)
    by_block = {b: warm_blocks(model, make_prompt_cache(model), tokens, b, LOSSLESS_KV) for b in (256, 300)}
    for n in (100, 511, 512, 513, 1300):
        natural = prefill(model, make_prompt_cache(model), tokens[:n])
        sets = [by_block[256], by_block[300]] if n in (513, 1300) else [by_block[256]]
        _check_same_generation(model, sets, tokens, n, natural, 24 if n == 1300 else 12)


def test_smollm2_kvcache_restore_and_turboquant(smollm):
    model = smollm.model
    tokens = _tokens(smollm, 401)
    payloads, tq3 = warm_blocks(model, make_prompt_cache(model), tokens, 256, LOSSLESS_KV, TQ3)
    for n, n_gen in ((400, 24), (300, 12)):
        natural = prefill(model, make_prompt_cache(model), tokens[:n])
        _check_same_generation(model, [payloads], tokens, n, natural, n_gen)
    # 3-bit TurboQuant keys and values: restores to the same cache types and generates.
    assert sum(p.nbytes for p in tq3) * 4 < sum(p.nbytes for p in payloads)
    restored = restore_cache(model, tq3, 400)
    assert all(c.offset == 400 and c.keys.dtype == mx.float32 for c in restored)
    assert len(set(greedy(model, restored, tokens[400], n=8))) > 1


def test_smollm2_keep4_rings(smollm):
    """RotatingKVCache(300, keep=4) on every layer, as max_kv_size=300 would give a model
    without make_cache. (mlx-lm's llama defines make_cache, so make_prompt_cache(model,
    max_kv_size=300) returns plain KVCaches for SmolLM2; the rings are built directly.)
    For keep > 0 mlx-lm's own state depends on the prefill chunking, so the natural
    reference is prefilled in chunks of the block size."""
    model = smollm.model
    rings = lambda: [RotatingKVCache(300, keep=4) for _ in model.layers]  # noqa: E731
    tokens = _tokens(smollm, 558)
    payloads = warm_blocks(model, rings(), tokens, 256, LOSSLESS_KV)
    for n in (150, 300, 301, 557):
        natural = prefill(model, rings(), tokens[:n], chunk=256)
        _check_same_generation(model, [payloads], tokens, n, natural, 24 if n == 557 else 12)
