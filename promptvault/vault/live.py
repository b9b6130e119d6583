"""Live caches of recent conversations, in front of a vault.

A server answering one conversation turn after turn holds, after each answer, an mlx-lm cache
of exactly the tokens the next turn starts with. Restoring that prefix from the vault instead
would pay the decode of every compressed block again on each turn (on a CPU, ~0.35 ms per token
for a 135M model: most of a short turn's time to first token). So the last few live caches stay
in memory, uncompressed, in mlx-lm's own `LRUPromptCache` (the one `mlx_lm.server` keeps: same
trie, same trimming of a longer entry to the shared prefix, same limits), and the vault is read
only when it holds a longer prefix than any of them: after a restart, in another process, or
for a prompt this process never saw.

The vault stays the place that outlives the process: callers still store every answer there
(`Vault.save`); this tier only saves the decode for prefixes that are still in memory.
"""

from __future__ import annotations

from dataclasses import dataclass

from mlx_lm.models.cache import LRUPromptCache, can_trim_prompt_cache, trim_prompt_cache

from promptvault.vault import caches


@dataclass
class Fetched:
    cache: list  # fresh mlx-lm caches for the model, holding `cached` tokens
    cached: int  # leading tokens of the prompt the cache holds (the rest must be prefilled)
    source: str  # "live" (this process's memory), the vault's tier ("ram", "disk", "remote"), or "none"


class LiveCaches:
    """The `max_size` most recent live caches (and at most `max_bytes` of them) over `vault`."""

    def __init__(self, vault, *, max_size: int = 10, max_bytes: int | None = None):
        self.vault = vault
        self._lru = LRUPromptCache(max_size=max_size, max_bytes=max_bytes if max_bytes is not None else 1 << 63)

    def fetch(self, lm, tokens: list[int]) -> Fetched:
        """Caches holding the longest prefix of `tokens` that memory or the vault has (memory when
        both hold as much: it costs no decode), always leaving at least the last token to prefill."""
        cache, cached = self._nearest(lm, tokens)
        restored = self.vault.restore(lm, tokens, longer_than=cached)  # reads only if the vault holds more
        if restored.tokens_reused > cached or cache is None:  # not more: a miss, or damaged chunks dropped
            return Fetched(restored.cache, restored.tokens_reused, restored.tier)
        return Fetched(cache, cached, "live")

    def keep(self, lm, cache: list, tokens: list[int]) -> None:
        """Hold `cache`, which has consumed exactly `tokens`. The caller must not change it after:
        fetches hand out copies. A cache whose position is unknown (purely recurrent layers) is
        not kept: nothing says which tokens its state has seen."""
        at = caches.position(cache)
        if at is None or at != len(tokens) or not tokens:
            return
        self._lru.insert_cache(_model_key(lm), list(tokens), cache)

    def clear(self) -> None:
        self._lru.trim_to(n_sequences=0)

    def stats(self) -> dict:
        return {"sequences": len(self._lru), "bytes": self._lru.nbytes}

    def _nearest(self, lm, tokens: list[int]) -> tuple[list | None, int]:
        cache, rest = self._lru.fetch_nearest_cache(_model_key(lm), list(tokens))
        if cache is None:
            return None, 0
        if not rest:  # an exact hit: generation needs the last token's logits, so give it back
            if not can_trim_prompt_cache(cache):
                return None, 0
            trim_prompt_cache(cache, 1)
            rest = tokens[-1:]
        return cache, len(tokens) - len(rest)


def _model_key(lm) -> int:
    return id(lm.model)
