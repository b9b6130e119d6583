"""Cache adapters (promptvault.vault.caches) on small random-weight mlx-lm models: every cache
type round-trips through block payloads, restored caches behave like naturally prefilled ones."""

import copy

import mlx.core as mx
import pytest
from mlx_lm.models import gemma3_text, llama, qwen3_5
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    ChunkedKVCache,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)
from test_caches_helpers import greedy, prefill, ring_view, same, warm_blocks

from promptvault.codec import LOSSLESS, CodecSpec, KVCodec
from promptvault.errors import PromptvaultError
from promptvault.vault.caches import (
    BlockPayload,
    block_ends_only,
    RestoreError,
    UnsupportedCacheError,
    encode_block,
    layer_layout,
    layer_segments,
    restore_cache,
)

LOSSLESS_KV = KVCodec(LOSSLESS, LOSSLESS)
TQ3 = KVCodec(CodecSpec(bits=3), CodecSpec(bits=3))
VOCAB = 256


def _init(model):
    mx.eval(model.parameters())
    return model


@pytest.fixture(scope="module")
def tiny_gemma():
    """Gemma-3 layout at small scale: RotatingKVCache(32) on 5 of 6 layers, a KVCache on the 6th."""
    mx.random.seed(1)
    args = gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=6, intermediate_size=128,
        num_attention_heads=2, head_dim=64, num_key_value_heads=1, vocab_size=VOCAB,
        sliding_window=32, sliding_window_pattern=6,
    )
    return _init(gemma3_text.Model(args))


@pytest.fixture(scope="module")
def tiny_llama():
    mx.random.seed(2)
    args = llama.ModelArgs(
        model_type="llama", hidden_size=64, num_hidden_layers=2, intermediate_size=128,
        num_attention_heads=4, num_key_value_heads=2, rms_norm_eps=1e-5, vocab_size=VOCAB, head_dim=32,
    )
    return _init(llama.Model(args))


@pytest.fixture(scope="module")
def tiny_hybrid():
    """qwen3_5 text model: 3 gated-delta (ArraysCache) layers, then 1 attention (KVCache) layer."""
    mx.random.seed(3)
    args = qwen3_5.TextModelArgs(
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=VOCAB,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4,
    )
    return _init(qwen3_5.TextModel(args))


def _tokens(n, seed=0):
    return mx.random.randint(0, VOCAB, (n,), key=mx.random.key(seed)).tolist()


def test_layout_is_static_and_json_able(tiny_gemma, tiny_hybrid):
    import json

    layout = layer_layout(make_prompt_cache(tiny_gemma))
    assert layout == [{"type": "RotatingKVCache", "max_size": 32, "keep": 0}] * 5 + [{"type": "KVCache"}]
    nested = layer_layout([CacheList(KVCache(), QuantizedKVCache(group_size=32, bits=4))])
    assert nested == [{"type": "CacheList", "children": [
        {"type": "KVCache"}, {"type": "QuantizedKVCache", "group_size": 32, "bits": 4}]}]
    assert layer_layout(tiny_hybrid.make_cache())[0] == {"type": "ArraysCache", "size": 2}
    assert block_ends_only(layer_layout(tiny_hybrid.make_cache()))
    assert block_ends_only(layer_layout([KVCache(), CacheList(KVCache(), ArraysCache(2))]))
    assert not block_ends_only(layout + nested)
    json.dumps(layout + nested)
    # Filling the cache does not change the layout (it is fingerprinted before any prefill).
    cache = make_prompt_cache(tiny_gemma)
    prefill(tiny_gemma, cache, _tokens(40))
    assert layer_layout(cache) == layout


@pytest.mark.parametrize("block", [16, 23])
def test_ring_and_kv_restore_match_natural_prefill(tiny_gemma, block):
    model = tiny_gemma
    tokens = _tokens(136, seed=block)
    payloads = warm_blocks(model, make_prompt_cache(model), tokens, block, LOSSLESS_KV)
    for n in (5, 31, 32, 33, 46, 64, 100, 129):
        natural = prefill(model, make_prompt_cache(model), tokens[:n])
        restored = restore_cache(model, payloads, n)
        for nat, res in zip(natural, restored):
            assert type(res) is type(nat) and res.offset == nat.offset == n
            if isinstance(nat, RotatingKVCache):
                assert (res.max_size, res.keep, res._idx) == (nat.max_size, nat.keep, min(n, nat.max_size))
                ref_k, ref_v = ring_view(nat)
                got_k, got_v = res.keys, res.values
            else:
                ref_k, ref_v = nat.keys[..., :n, :], nat.values[..., :n, :]
                got_k, got_v = res.keys[..., :n, :], res.values[..., :n, :]
            # Rows computed in a different chunking differ by float rounding only.
            assert got_k.shape == ref_k.shape and mx.allclose(got_k, ref_k, atol=1e-4).item()
            assert got_v.shape == ref_v.shape and mx.allclose(got_v, ref_v, atol=1e-4).item()
        # A multi-token continuation (concatenating ring update) after a restore, then greedy.
        suffix = tokens[n : n + 6]
        assert greedy(model, restored, suffix) == greedy(model, natural, suffix), n


def test_restore_at_block_end_is_bit_exact(tiny_gemma):
    """At a block boundary the restored state equals the warmed cache's own state, bit for bit."""
    model = tiny_gemma
    tokens = _tokens(96, seed=5)
    cache = make_prompt_cache(model)
    payloads = []
    for n in (24, 48, 72, 96):
        payloads += warm_blocks(model, cache, tokens[n - 24 : n], 24, LOSSLESS_KV, at=n - 24)
        restored = restore_cache(model, payloads, n)
        for live, res in zip(cache, restored):
            if isinstance(live, RotatingKVCache):
                live_k, live_v = ring_view(live)
                assert same(res.keys, live_k) and same(res.values, live_v)
                assert (res.offset, res._idx) == (n, min(n, 32))
            else:
                assert same(res.keys[..., :n, :], live.keys[..., :n, :]) and res.offset == n
        # The next token after the restored cache sees exactly what the live one sees.
        nxt = mx.array([[tokens[n % 96]]])
        assert same(model(nxt, cache=restored), model(nxt, cache=restore_cache(model, payloads, n)))


def test_rings_with_keep(tiny_llama):
    """RotatingKVCache(40, keep=4) (what generate_step's max_kv_size builds for models without
    make_cache). For keep > 0 mlx-lm's own result depends on the prefill chunking (a first
    chunk's window mask ignores the kept rows), so the natural reference is chunked like the
    blocks, as generate_step with prefill_step_size=block would prefill."""
    model, block = tiny_llama, 16
    rings = lambda: [RotatingKVCache(40, keep=4) for _ in model.layers]  # noqa: E731
    tokens = _tokens(150, seed=7)
    payloads = warm_blocks(model, rings(), tokens, block, LOSSLESS_KV)
    assert payloads[0].meta["layout"][0] == {"type": "RotatingKVCache", "max_size": 40, "keep": 4}
    for n in (3, 39, 40, 41, 57, 100, 149):
        natural = prefill(model, rings(), tokens[:n], chunk=block)
        restored = restore_cache(model, payloads, n)
        for nat, res in zip(natural, restored):
            ref_k, _ = ring_view(nat)
            assert (res.offset, res._idx, res.keep) == (n, min(n, 40), 4)
            assert mx.allclose(res.keys, ref_k, atol=1e-4).item()
        assert greedy(model, restored, tokens[n]) == greedy(model, natural, tokens[n]), n


def test_single_token_blocks_through_rotated_rings(tiny_gemma):
    """Blocks of one token go through mlx-lm's in-place ring update (the buffer rotates and
    `_idx` wraps); the captured rows still restore to a ring that generates like a natural one."""
    model = tiny_gemma
    tokens = _tokens(45, seed=31)
    cache = make_prompt_cache(model)
    payloads = warm_blocks(model, cache, tokens[:4], 4, LOSSLESS_KV)
    payloads += warm_blocks(model, cache, tokens[4:44], 1, LOSSLESS_KV, at=4)
    for i, p in enumerate(payloads[1:]):
        for layer in range(len(p.meta["layers"])):
            assert [tuple(seg["tokens"]) for seg in layer_segments(p.meta, layer)] == [(4 + i, 5 + i)]
    assert cache[0]._idx == 44 - 32 and cache[0].offset == 44  # rotated in place
    for n in (10, 32, 33, 44):
        natural = prefill(model, make_prompt_cache(model), tokens[:n])
        assert greedy(model, restore_cache(model, payloads, n), tokens[n]) == greedy(model, natural, tokens[n])


def test_ring_rows_lost_before_capture_are_refused(tiny_gemma):
    """A ring captured after the fact holds only its window: blocks record the rows still there,
    restore works where those suffice and names the missing tokens where they do not."""
    model = tiny_gemma
    tokens = _tokens(80, seed=9)
    cache = prefill(model, make_prompt_cache(model), tokens)
    for c in cache[:5]:
        assert c.keys.shape[2] == 80  # a one-shot multi-token update keeps every row for now
    generate_one = model(mx.array([[tokens[0]]]), cache=cache)  # single-token update trims the ring to 32
    mx.eval(generate_one)
    tokens = tokens + [tokens[0]]
    payloads = [encode_block(cache, s, min(s + 16, 81), LOSSLESS_KV) for s in range(0, 81, 16)]
    ring_tokens = [seg["tokens"] for p in payloads for seg in layer_segments(p.meta, 0)]
    assert ring_tokens == [[49, 64], [64, 80], [80, 81]]
    assert [p.complete for p in payloads] == [False, False, False, False, True, True]
    restored = restore_cache(model, payloads, 81)
    natural = prefill(model, make_prompt_cache(model), tokens)
    assert greedy(model, restored, 7) == greedy(model, natural, 7)
    with pytest.raises(RestoreError, match=r"tokens \[\[33, 49\]\]"):
        restore_cache(model, payloads, 65)


def test_restore_twice_is_independent(tiny_gemma):
    model = tiny_gemma
    tokens = _tokens(70, seed=11)
    payloads = warm_blocks(model, make_prompt_cache(model), tokens, 16, LOSSLESS_KV)
    assert all(p.complete for p in payloads)
    snapshot = [{k: mx.array(v) for k, v in p.arrays.items()} for p in payloads]
    first = greedy(model, restore_cache(model, payloads, 50), tokens[50], n=40)
    second = greedy(model, restore_cache(model, payloads, 50), tokens[50], n=40)
    assert first == second
    for p, snap in zip(payloads, snapshot):
        assert all(same(p.arrays[k], snap[k]) for k in snap)


def test_hybrid_arrays_cache_restores_only_at_snapshots(tiny_hybrid):
    model = tiny_hybrid
    tokens = _tokens(70, seed=13)
    payloads = warm_blocks(model, model.make_cache(), tokens, 16, LOSSLESS_KV)
    for n in (16, 48, 64):
        natural = prefill(model, model.make_cache(), tokens[:n], chunk=16)
        restored = restore_cache(model, payloads, n)
        for nat, res in zip(natural, restored):
            if type(nat).__name__ == "ArraysCache":
                assert all(same(a, b) for a, b in zip(res.cache, nat.cache))
        assert greedy(model, restored, tokens[n]) == greedy(model, natural, tokens[n])
    with pytest.raises(RestoreError, match=r"ArraysCache .* block ends \[16, 32, 48\]; 40 tokens"):
        restore_cache(model, payloads, 40)
    with pytest.raises(RestoreError, match="only be captured at the position"):
        encode_block(restore_cache(model, payloads, 64), 32, 48, LOSSLESS_KV)


def _quantized(model, bits):
    return [QuantizedKVCache(group_size=32, bits=bits) for _ in model.layers]


@pytest.mark.parametrize("bits", [4, 8])
def test_quantized_cache_round_trip(tiny_llama, bits):
    model = tiny_llama
    tokens = _tokens(90, seed=bits)
    live = _quantized(model, bits)
    payloads = warm_blocks(model, live, tokens, 32, LOSSLESS_KV)
    restored = restore_cache(model, payloads, 90)
    for a, b in zip(restored, live):
        assert type(a) is QuantizedKVCache and (a.group_size, a.bits, a.offset) == (32, bits, 90)
        for x, y in zip(a.keys + a.values, b.keys + b.values):
            assert same(x[..., :90, :], y[..., :90, :])  # lossless keeps the tuples bit-exact
    nxt = tokens[-1]
    assert greedy(model, restored, nxt) == greedy(model, live, nxt)
    lossy = restore_cache(model, warm_blocks(model, _quantized(model, bits), tokens, 32, TQ3), 70)
    assert all(type(c) is QuantizedKVCache and c.bits == bits and c.offset == 70 for c in lossy)
    assert len(greedy(model, lossy, nxt, n=4)) == 4


def test_cache_list_round_trip(tiny_llama):
    """CacheList nests caches (DeepSeek-V3.2 / GLM DSA); driven here directly, layer by layer."""
    mx.random.seed(17)
    cache = [CacheList(KVCache(), RotatingKVCache(8, keep=2)), KVCache()]
    payloads = []
    for start in range(0, 40, 10):
        for c in (cache[0].caches[0], cache[0].caches[1], cache[1]):
            k, v = mx.random.normal((1, 2, 10, 16)), mx.random.normal((1, 2, 10, 16))
            c.update_and_fetch(k, v)
        payloads.append(encode_block(cache, start, start + 10, LOSSLESS_KV))
    assert "l00.c1.s0.k.data" in payloads[-1].arrays
    restored = restore_cache(None, payloads, 40)
    assert type(restored[0]) is CacheList and len(restored[0].caches) == 2
    kv, ring = restored[0].caches
    assert same(kv.keys[..., :40, :], cache[0].caches[0].keys[..., :40, :])
    ref_k, ref_v = ring_view(cache[0].caches[1])
    assert same(ring.keys, ref_k) and same(ring.values, ref_v) and (ring.offset, ring._idx) == (40, 8)
    assert same(restored[1].values[..., :40, :], cache[1].values[..., :40, :])


@pytest.mark.parametrize("dtype", [mx.bfloat16, mx.float16])
def test_half_precision_kept(dtype):
    mx.random.seed(37)
    cache = [KVCache(), RotatingKVCache(24, keep=2)]
    lossless, tq = [], []
    for start in range(0, 60, 20):
        for c in cache:
            c.update_and_fetch(mx.random.normal((1, 2, 20, 64)).astype(dtype), mx.random.normal((1, 2, 20, 64)).astype(dtype))
        lossless.append(encode_block(cache, start, start + 20, LOSSLESS_KV))
        tq.append(encode_block(cache, start, start + 20, TQ3))
    restored = restore_cache(None, lossless, 60)
    assert same(restored[0].keys[..., :60, :], cache[0].keys[..., :60, :])
    assert same(restored[1].values, ring_view(cache[1])[1])
    assert all(c.keys.dtype == dtype for c in restore_cache(None, tq, 50))


def test_unknown_cache_type_is_named():
    chunked = ChunkedKVCache(16)
    chunked.update_and_fetch(mx.zeros((1, 1, 4, 8)), mx.zeros((1, 1, 4, 8)))
    with pytest.raises(UnsupportedCacheError, match="ChunkedKVCache") as err:
        encode_block([KVCache(), chunked], 0, 4, LOSSLESS_KV)
    assert isinstance(err.value, PromptvaultError)
    with pytest.raises(UnsupportedCacheError, match="ChunkedKVCache"):
        layer_layout([chunked])

    class MyCache(KVCache):  # a subclass may change what the buffers mean: refused too
        pass

    with pytest.raises(UnsupportedCacheError, match="MyCache"):
        layer_layout([MyCache()])


def test_payloads_must_chain_and_cover(tiny_llama):
    model = tiny_llama
    payloads = warm_blocks(model, make_prompt_cache(model), _tokens(40, seed=19), 16, LOSSLESS_KV)
    with pytest.raises(RestoreError, match="fewer than the 41"):
        restore_cache(model, payloads, 41)
    with pytest.raises(RestoreError, match="contiguous"):
        restore_cache(model, payloads[1:], 20)
    with pytest.raises(RestoreError, match="cache layers"):
        restore_cache(make_prompt_cache_model_with_layers(3), payloads, 20)
    bad = copy.deepcopy(payloads[0].meta)
    bad["groups"][0]["segments"][0]["tokens"] = [0, 20]  # meta claiming rows the arrays lack
    with pytest.raises(RestoreError, match="g0.s0 does not decode"):
        restore_cache(model, [BlockPayload(payloads[0].arrays, bad)] + payloads[1:], 20)


def make_prompt_cache_model_with_layers(n):
    class Stub:
        layers = [None] * n

    return Stub()


def test_turboquant_restore_generates(tiny_gemma):
    model = tiny_gemma
    tokens = _tokens(100, seed=23)
    payloads = warm_blocks(model, make_prompt_cache(model), tokens, 32, TQ3)
    lossless = warm_blocks(model, make_prompt_cache(model), tokens, 32, LOSSLESS_KV)
    assert sum(p.nbytes for p in payloads) * 4 < sum(p.nbytes for p in lossless)
    restored = restore_cache(model, payloads, 77)
    reference = restore_cache(model, lossless, 77)
    for res, ref in zip(restored, reference):
        assert type(res) is type(ref) and res.keys.shape == ref.keys.shape and res.offset == 77
        cos = (res.keys * ref.keys).sum(-1) / (mx.linalg.norm(res.keys, axis=-1) * mx.linalg.norm(ref.keys, axis=-1) + 1e-9)
        assert mx.mean(cos[..., : min(77, ref.keys.shape[2]) if hasattr(ref, "max_size") else 77]).item() > 0.95
    assert len(greedy(model, restored, tokens[77])) == 24


@pytest.mark.parametrize("kv", [LOSSLESS_KV, TQ3], ids=["lossless", "tq3"])
def test_restore_peak_memory(kv):
    """Restore allocates each buffer once: peak memory over what was already live stays within
    1.3x of the restored cache's own bytes (8 layers, 2,000 tokens, decoded layer by layer)."""
    mx.random.seed(29)
    cache = [KVCache() for _ in range(8)] + [RotatingKVCache(512) for _ in range(4)]
    payloads = []
    for start in range(0, 2000, 250):
        for c in cache:
            c.update_and_fetch(mx.random.normal((1, 4, 250, 64)), mx.random.normal((1, 4, 250, 64)))
        payloads.append(encode_block(cache, start, start + 250, kv))
    del cache
    mx.synchronize()
    mx.clear_cache()
    mx.reset_peak_memory()
    before = mx.get_active_memory()
    restored = restore_cache(None, payloads, 2000)
    mx.synchronize()
    size = sum(c.nbytes for c in restored)
    ratio = (mx.get_peak_memory() - before) / size
    print(f"restore peak / cache bytes ({kv}): {ratio:.3f}")
    assert size == 8 * 2 * 4 * 2048 * 64 * 4 + 4 * 2 * 4 * 512 * 64 * 4
    assert ratio <= 1.3
