"""Vault behaviour on small random-weight mlx-lm models (fast): exact restores through plain and
ring caches, caps, dedup, several processes on one vault, gc, rm, errors. The real-model checks
(compression, fidelity, namespaces across models) are in test_vault.py."""

import multiprocessing as mp
import os
import types

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models import gemma3_text, llama, qwen3_5
from mlx_lm.models.cache import make_prompt_cache

from promptvault.codec import LOSSLESS, CodecSpec, KVCodec
from promptvault.vault import Vault, VerifyResult
from promptvault.vault.errors import CapTooSmallError, VaultPathError, VaultSettingsError
from promptvault.vault.tiers import disk_usage

LOSSLESS_KV = KVCodec(LOSSLESS, LOSSLESS)


def tiny_llama(seed=0):
    mx.random.seed(seed)
    m = llama.Model(llama.ModelArgs(model_type="llama", hidden_size=64, num_hidden_layers=2,
                                    intermediate_size=128, num_attention_heads=4, num_key_value_heads=2,
                                    rms_norm_eps=1e-5, vocab_size=128, head_dim=16))
    mx.eval(m.parameters())
    return types.SimpleNamespace(model=m, fingerprint=f"tiny-llama-{seed}", tokenizer=None)


def tiny_gemma():
    mx.random.seed(1)
    m = gemma3_text.Model(gemma3_text.ModelArgs(
        model_type="gemma3_text", hidden_size=64, num_hidden_layers=3, intermediate_size=128,
        num_attention_heads=2, head_dim=32, rms_norm_eps=1e-6, vocab_size=128, num_key_value_heads=1,
        sliding_window=12, sliding_window_pattern=3))
    mx.eval(m.parameters())
    return types.SimpleNamespace(model=m, fingerprint="tiny-gemma", tokenizer=None)


def tiny_hybrid():
    """qwen3_5 text: 3 gated-delta layers (ArraysCache: recurrent state), 1 attention layer."""
    mx.random.seed(2)
    m = qwen3_5.TextModel(qwen3_5.TextModelArgs(
        model_type="qwen3_5_text", hidden_size=64, intermediate_size=128, num_hidden_layers=4,
        num_attention_heads=4, num_key_value_heads=2, head_dim=16, vocab_size=128,
        linear_num_value_heads=4, linear_num_key_heads=2, linear_key_head_dim=16,
        linear_value_head_dim=16, linear_conv_kernel_dim=4, full_attention_interval=4))
    mx.eval(m.parameters())
    return types.SimpleNamespace(model=m, fingerprint="tiny-hybrid", tokenizer=None)


def prompt(n, seed=0):
    return [int(t) for t in np.random.RandomState(seed).randint(0, 128, n)]


def last_logits(lm, tokens, cache=None, start=0):
    cache = cache if cache is not None else make_prompt_cache(lm.model)
    out = lm.model(mx.array([tokens[start:]]), cache=cache)
    return out[0, -1].astype(mx.float32)


@pytest.mark.parametrize("make", [tiny_llama, tiny_gemma], ids=["kv", "rings"])
def test_restore_matches_cold_for_every_kind_of_reuse(tmp_path, make):
    lm = make()
    base = prompt(45)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        w = vault.warm(lm, base)
        assert (w.chunks, w.written, w.tokens_reused) == (6, 6, 0)  # 5 blocks + a 5-token leaf
        queries = {
            "same prompt": (base, 44),
            "longer": (base + prompt(7, 1), 45),
            "diverges inside block 3": (base[:27] + prompt(9, 2), 27),
            "diverges inside the leaf": (base[:42] + [(base[42] + 1) % 128, 5], 42),
            "shorter, mid block": (base[:19], 18),
        }
        for name, (query, expected) in queries.items():
            r = vault.restore(lm, query)
            assert r.tokens_reused == expected, name
            assert r.tier == "ram" and r.seconds > 0
            got = last_logits(lm, query, r.cache, r.tokens_reused)
            assert mx.allclose(got, last_logits(lm, query), atol=1e-4).item(), name
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:  # new process-like open: disk tier
        r = vault.restore(lm, base)
        assert (r.tokens_reused, r.tier) == (44, "disk") and r.read_s > 0
        assert mx.allclose(last_logits(lm, base, r.cache, 44), last_logits(lm, base), atol=1e-4).item()


def test_recurrent_state_restores_only_at_block_ends(tmp_path):
    lm = tiny_hybrid()
    base = prompt(45)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, base)
        for query, expected in ((base, 40), (base[:27] + prompt(9, 2), 24), (base + [3, 4], 45)):
            r = vault.restore(lm, query)
            assert r.tokens_reused == expected
            got = last_logits(lm, query, r.cache, r.tokens_reused)
            assert mx.allclose(got, last_logits(lm, query), atol=1e-4).item()


def test_restored_caches_are_independent(tmp_path):
    lm = tiny_llama()
    toks = prompt(30)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks)
        a = vault.restore(lm, toks)
        b = vault.restore(lm, toks)
        first = last_logits(lm, toks, b.cache, 29)
        last_logits(lm, prompt(20, 5), a.cache)  # grow one cache with other tokens
        again = vault.restore(lm, toks)
        assert a.cache[0].offset == 49 and again.cache[0].offset == 29
        assert mx.array_equal(last_logits(lm, toks, again.cache, 29), first).item()


def test_dedup_writes_nothing_twice(tmp_path):
    lm = tiny_llama()
    shared = prompt(32)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        a = vault.warm(lm, shared + prompt(12, 1))
        mtimes = {p: p.stat().st_mtime_ns for p in (tmp_path / "shards").rglob("*.safetensors")}
        again = vault.warm(lm, shared + prompt(12, 1))
        assert (again.written, again.bytes_written, again.prefill_s) == (0, 0, 0.0)
        b = vault.warm(lm, shared + prompt(12, 2))
        assert b.tokens_reused == 32 and b.written == 2  # 4 shared blocks restored, not rewritten
        assert all(p.stat().st_mtime_ns == t for p, t in mtimes.items())
        assert len(list((tmp_path / "shards").rglob("*.safetensors"))) == a.written + b.written == 8


def test_disk_cap_respected_leaves_first(tmp_path):
    lm = tiny_llama()
    toks = prompt(70)
    with Vault(tmp_path / "big", block_size=8, codec=LOSSLESS_KV) as big:
        full = big.warm(lm, toks)
    cap = disk_usage(tmp_path / "big") - 4 * (full.bytes_written // full.written)
    with Vault(tmp_path / "v", block_size=8, codec=LOSSLESS_KV, disk_cap=cap) as vault:
        w = vault.warm(lm, toks)
        assert w.written == 9 and w.evicted > 0
        assert disk_usage(tmp_path / "v") <= cap
        r = vault.restore(lm, toks)  # what is left is the start of the chain: still a hit
        assert r.tokens_reused == 8 * (9 - w.evicted) and r.tokens_reused > 0
        keep = vault.lookup(lm, toks).chunks
        assert [c["position"] for c in keep] == list(range(0, r.tokens_reused, 8))


def test_eviction_skips_files_it_cannot_delete(tmp_path):
    lm = tiny_llama()
    a, b = prompt(20, 1), prompt(20, 2)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, a)
        vault.warm(lm, b)
        rows = vault.lookup(lm, a).chunks
    chain_a, stuck = [r["key"] for r in rows], tmp_path / "shards" / rows[-1]["file"]
    stuck.unlink()
    (stuck / "x").mkdir(parents=True)  # a non-empty directory where the leaf was: os.remove fails
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        largest = max(r["bytes"] for r in vault.index.all_chunks())
    with Vault(tmp_path, codec=LOSSLESS_KV, disk_cap=largest) as vault:
        evicted = vault.gc(evict_all=True).evicted
        # b's chain went; a's stuck leaf was skipped, so its blocks (which it extends) stay
        assert evicted == 3 and stuck.is_dir()
        assert sorted(r["key"] for r in vault.index.all_chunks()) == sorted(chain_a)


def test_caps_and_paths_errors(tmp_path):
    lm = tiny_llama()
    with Vault(tmp_path / "v", block_size=8, codec=LOSSLESS_KV, disk_cap=100) as vault:
        with pytest.raises(CapTooSmallError, match="smaller than one block"):
            vault.warm(lm, prompt(20))
    with pytest.raises(VaultSettingsError, match="block size"):
        Vault(tmp_path / "v", block_size=16)
    (tmp_path / "file").write_text("x")
    with pytest.raises(VaultPathError, match="not usable"):
        Vault(tmp_path / "file" / "vault")
    with pytest.raises(VaultSettingsError):
        Vault(tmp_path / "w", block_size=0)


def test_flipped_byte_is_a_miss_and_quarantined(tmp_path):
    lm = tiny_llama()
    toks = prompt(20)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks)
    shard = sorted((tmp_path / "shards").rglob("*.safetensors"), key=lambda p: p.stat().st_size)[0]
    data = bytearray(shard.read_bytes())
    data[len(data) // 2] ^= 1
    shard.write_bytes(bytes(data))
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        r = vault.restore(lm, toks)
        # the leaf was bad: the intact blocks before it serve this very run
        assert (r.tokens_reused, r.tier, len(r.quarantined), r.missing) == (16, "disk", 1, [])
        assert not shard.exists() and vault.stats().quarantined == 1
        assert vault.restore(lm, toks).tokens_reused == 16
        assert vault.verify().bad == []


def test_a_bad_chunk_in_the_middle_keeps_the_chunks_before_it(tmp_path):
    """Block 1 of 0..3 damaged: the same run restores block 0 and prefills the rest, exactly."""
    lm = tiny_llama()
    toks = prompt(33)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks)
        second = vault.lookup(lm, toks).chunks[1]
    path = tmp_path / "shards" / second["file"]
    data = bytearray(path.read_bytes())
    data[-5] ^= 0x40
    path.write_bytes(bytes(data))
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        r = vault.restore(lm, toks)
        assert (r.tokens_reused, r.quarantined) == (8, [second["key"]])
        assert mx.allclose(last_logits(lm, toks, r.cache, 8), last_logits(lm, toks), atol=1e-4).item()
        first = vault.lookup(lm, toks[:8] + [1, 2]).chunks[0]
    (tmp_path / "shards" / first["file"]).unlink()
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        r = vault.restore(lm, toks)  # block 0's file deleted: missing, not quarantined
        assert (r.tokens_reused, r.quarantined, len(r.missing)) == (0, [], 1)


@pytest.mark.parametrize("ram_cap", [0, 2**20])
def test_index_row_with_wrong_tokens_never_serves_its_shard(tmp_path, ram_cap):
    """Silent damage to an index row's token copy: the restore checks the shard's own tokens,
    whether the chunk comes through the RAM tier or straight from disk (RAM tier off)."""
    import sqlite3

    lm = tiny_llama()
    toks = prompt(20)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks)
        vault.index.checkpoint()
    other = toks[:16] + [(t + 1) % 128 for t in toks[16:]] + [5]  # differs inside the tail leaf
    with sqlite3.connect(tmp_path / "index.sqlite") as db:
        key, blob = db.execute("SELECT key, tokens FROM chunks WHERE position = 16").fetchone()
        db.execute("UPDATE chunks SET tokens = ? WHERE key = ?",
                   (np.asarray(other[16:20], dtype="<u4").tobytes(), key))
    with Vault(tmp_path, codec=LOSSLESS_KV, ram_cap=ram_cap) as vault:
        r = vault.restore(lm, other)
        assert r.tokens_reused == 16 and r.quarantined == []  # the intact leading blocks serve this run
        assert vault.index.chunk(key)["tokens"] == blob  # re-read from its file
        assert vault.restore(lm, other).tokens_reused == 16

def _warm_in_child(path, seed):
    lm = tiny_llama()
    with Vault(path, block_size=8, codec=LOSSLESS_KV) as vault:
        for s in range(3):
            vault.warm(lm, prompt(40, s) + prompt(5, seed))


def test_several_processes_share_one_vault(tmp_path):
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_warm_in_child, args=(str(tmp_path), s)) for s in (10, 11)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(120)
    assert [p.exitcode for p in procs] == [0, 0]
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        files = list((tmp_path / "shards").rglob("*"))
        assert not [f for f in files if f.name.startswith(".tmp-")]
        assert vault.verify() == VerifyResult(checked=3 * 5 + 3 * 2, ok=21, bad=[], adopted=[], missing=[])
        assert vault.restore(tiny_llama(), prompt(40, 1) + prompt(5, 11)).tokens_reused == 44


def test_gc_rm_and_namespaces(tmp_path):
    lm = tiny_llama()
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, prompt(24) + prompt(4, 1), label="a")
        vault.warm(lm, prompt(24) + prompt(4, 2), label="b")
        other = vault.namespace(lm, KVCodec(CodecSpec(4), CodecSpec(4)))
        assert other.id != vault.namespace(lm).id
        assert vault.namespace(tiny_llama(seed=3)).id != vault.namespace(lm).id
        stale = tmp_path / "shards" / "00" / "00" / ".tmp-x.safetensors"
        stale.parent.mkdir(parents=True)
        stale.write_bytes(b"x")
        os.utime(stale, (0, 0))
        row = vault.lookup(lm, prompt(24) + prompt(4, 1)).chunks[-1]
        (tmp_path / "shards" / row["file"]).unlink()
        g = vault.gc()
        assert g.temp_files_removed == 1 and g.rows_dropped == 1 and not stale.exists()
        assert [w["label"] for w in vault.index.warmed()] == ["b"]  # "a" lost its last chunk: forgotten
        with pytest.raises(VaultSettingsError, match="no warmed prompt is labelled 'a'"):
            vault.rm(label="a")
        assert vault.rm(label="b").removed_chunks == 4
        assert vault.stats().namespaces[0].chunks == 0


def test_save_a_live_cache_then_restore(tmp_path):
    lm = tiny_llama()
    toks = prompt(37)
    cache = make_prompt_cache(lm.model)
    cold = last_logits(lm, toks, cache)  # the cache now holds all 37 tokens
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        s = vault.save(lm, cache, toks)
        assert (s.chunks, s.written, s.prefill_s) == (5, 5, 0.0)
        assert vault.save(lm, cache, toks).written == 0
        longer = toks + prompt(3, 4)
        r = vault.restore(lm, longer)
        assert r.tokens_reused == 37
        ref = last_logits(lm, longer)
        assert mx.allclose(last_logits(lm, longer, r.cache, 37), ref, atol=1e-4).item()
        assert vault.warm(lm, toks).written == 0  # warm sees the saved chunks


def test_warm_rewrites_a_corrupted_block(tmp_path):
    lm = tiny_llama()
    toks = prompt(30)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks[:24])
        first = vault.lookup(lm, toks).chunks[0]
    path = tmp_path / "shards" / first["file"]
    path.write_bytes(path.read_bytes()[:-3] + b"xyz")
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        w = vault.warm(lm, toks)
        assert (w.tokens_reused, w.written) == (0, 2)  # block 0 again, plus the new leaf
        assert vault.verify() == VerifyResult(checked=4, ok=4, bad=[], adopted=[], missing=[])
        assert vault.restore(lm, toks).tokens_reused == 29


def test_restore_reads_only_the_shards_it_needs(tmp_path):
    lm = tiny_llama()
    toks = prompt(40)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        vault.warm(lm, toks)
    with Vault(tmp_path, codec=LOSSLESS_KV) as vault:
        r = vault.restore(lm, toks[:11] + prompt(4, 3))  # needs blocks 0 and 1 (LCP 3 tokens)
        assert r.tokens_reused == 11 and vault.ram.nbytes > 0 and len(vault.ram) == 2
        hits = sorted(vault.index.chunk(k)["hits"] for k in [c["key"] for c in vault.lookup(lm, toks).chunks])
        assert hits == [0, 0, 0, 1, 1]


def test_save_of_a_ring_that_dropped_rows_prefills_the_prompt(tmp_path):
    lm = tiny_gemma()  # sliding window 12
    toks = prompt(40)
    cache = make_prompt_cache(lm.model)
    for t in toks:  # one token at a time: the rings keep only the last 12 rows
        lm.model(mx.array([[t]]), cache=cache)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        s = vault.save(lm, cache, toks)
        assert s.prefilled and s.written == 5 and vault.restore(lm, toks + [1]).tokens_reused == 40
