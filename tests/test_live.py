"""LiveCaches: the last answers' caches in memory in front of the vault (what `serve` continues a
conversation from). Small random-weight models, a real vault; logits compared with a cold run."""

import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from promptvault.vault import Vault
from promptvault.vault.live import LiveCaches
from test_vault_tiny import LOSSLESS_KV, last_logits, prompt, tiny_gemma, tiny_hybrid, tiny_llama


def _held(lm, tokens):
    cache = make_prompt_cache(lm.model)
    last_logits(lm, tokens, cache)
    return cache


def test_the_next_turn_continues_from_memory_and_matches_a_cold_run(tmp_path):
    lm = tiny_llama()
    turn1 = prompt(30, 1)
    turn2 = turn1 + prompt(9, 2)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        live = LiveCaches(vault)
        got = live.fetch(lm, turn1)
        assert (got.cached, got.source) == (0, "none")
        live.keep(lm, _held(lm, turn1), turn1)
        nxt = live.fetch(lm, turn2)
        assert (nxt.cached, nxt.source) == (30, "live")  # nothing stored: memory alone
        assert mx.allclose(last_logits(lm, turn2, nxt.cache, 30), last_logits(lm, turn2), atol=1e-4).item()
        again = live.fetch(lm, turn1)  # an exact hit leaves the last token to prefill
        assert (again.cached, again.source) == (29, "live")
        assert mx.allclose(last_logits(lm, turn1, again.cache, 29), last_logits(lm, turn1), atol=1e-4).item()
        # the fetched caches were copies: the kept one still holds exactly turn1
        assert live.fetch(lm, turn2).cached == 30


def _continues_from_memory(tmp_path, lm, kept, asked, cached):
    """Keep a cache of `kept`, then ask for `asked`: `cached` tokens come from memory (nothing is
    stored) and the next-token logits equal a cold run's."""
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        live = LiveCaches(vault)
        live.keep(lm, _held(lm, kept), kept)
        got = live.fetch(lm, asked)
        assert (got.cached, got.source) == (cached, "live")
        assert mx.allclose(last_logits(lm, asked, got.cache, cached), last_logits(lm, asked), atol=1e-4).item()


def test_a_prompt_sharing_only_a_start_gets_the_kept_cache_cut_to_it(tmp_path):
    a = prompt(40, 1)
    _continues_from_memory(tmp_path, tiny_llama(), a, a[:25] + prompt(10, 3), 25)


def test_the_vault_answers_when_it_holds_more_than_memory(tmp_path):
    lm = tiny_llama()
    long = prompt(50, 1)
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        live = LiveCaches(vault)
        live.keep(lm, _held(lm, long[:20]), long[:20])
        vault.warm(lm, long[:48])
        got = live.fetch(lm, long)
        assert (got.cached, got.source) == (48, "ram")  # the warm put its chunks in the RAM tier
        assert mx.allclose(last_logits(lm, long, got.cache, 48), last_logits(lm, long), atol=1e-4).item()
        # as much in memory as in the vault: memory, which costs no decode
        live.keep(lm, _held(lm, long[:48]), long[:48])
        assert live.fetch(lm, long).source == "live"


def test_limits_clear_and_caches_it_cannot_key(tmp_path):
    lm = tiny_llama()
    with Vault(tmp_path, block_size=8, codec=LOSSLESS_KV) as vault:
        live = LiveCaches(vault, max_size=2)
        for seed in range(3):
            t = prompt(12, 10 + seed)
            live.keep(lm, _held(lm, t), t)
        assert live.stats()["sequences"] == 2 and live.stats()["bytes"] > 0
        assert live.fetch(lm, prompt(12, 10) + [1]).cached == 0  # the oldest went
        assert live.fetch(lm, prompt(12, 12) + [1]).cached == 12
        live.clear()
        assert live.stats() == {"sequences": 0, "bytes": 0}
        t = prompt(12, 20)
        live.keep(lm, _held(lm, t), t[:-1])  # tokens that are not what the cache holds: not kept
        assert live.stats()["sequences"] == 0
    hybrid = tiny_hybrid()
    with Vault(tmp_path / "h", block_size=8, codec=LOSSLESS_KV) as vault:
        live = LiveCaches(vault)
        t = prompt(16, 5)
        live.keep(hybrid, _held(hybrid, t), t)  # an attention layer gives the position: kept
        got = live.fetch(hybrid, t + prompt(3, 6))
        assert (got.cached, got.source) == (16, "live")


def test_rings_continue_from_memory(tmp_path):
    turn1 = prompt(30, 1)  # past the sliding window (12): the rings have wrapped
    _continues_from_memory(tmp_path, tiny_gemma(), turn1, turn1 + prompt(5, 2), 30)


def test_a_pending_store_is_replaced_by_the_next_turn_only_when_it_holds_every_row():
    from collections import deque

    from promptvault.server.prefix_cache import queue_store
    lm, rings = tiny_llama(), tiny_gemma()
    a, b = prompt(20, 1), prompt(20, 2)
    pending = deque()
    for lm_, extra in ((lm, 5), (lm, 9)):
        pending = queue_store(pending, _held(lm_, a + prompt(extra, 3)[:extra]), a + prompt(extra, 3)[:extra])
    pending = queue_store(pending, _held(lm, b), b)
    assert [len(t) for _, t in pending] == [29, 20]  # a's first turn went: a's second holds it all
    ring_pending = deque()
    for n in (20, 30):  # past the window of 12: the later ring no longer holds the first rows
        ring_pending = queue_store(ring_pending, _held(rings, a + prompt(10, 3)[: n - 20]), (a + prompt(10, 3))[:n])
    assert [len(t) for _, t in ring_pending] == [20, 30]
