"""What the server does with its caches beyond `LiveCaches.fetch` / `keep` (which it calls directly).

Before a request: the longest prefix of its tokens that this process still holds live (the last
answers' caches, `LiveCaches`) or the vault has stored (its RAM tier, then disk), whichever is
longer. After the answer has been sent: the live cache is kept as it is, and its blocks, prompt
and answer both, are stored in the vault — later, when the server is idle (`Worker`), so that
no request waits for the store of another's answer. The next turn of a conversation (its history
re-rendered with this answer, then a new message) continues from the live cache without a
decode; after a restart, or in another process on the same vault, it restores the same prefix
from disk.

A client that went away mid-answer keeps and stores nothing: a store is all of a request's
blocks or none of them, never a half-written answer.
"""

import dataclasses
from collections import deque

from mlx_lm.models.cache import can_trim_prompt_cache

from promptvault import UnsupportedCacheError
from promptvault.vault import caches
from promptvault.vault.live import LiveCaches


def held_tokens(cache: list, prompt: list[int], answer: list[int]) -> list[int]:
    """The tokens `cache` has consumed after generating `answer`: the prompt and the answer up to
    the cache's position (generation feeds each token back only once it asks for the next one).
    Layers that record no position (recurrent state) say nothing: the prompt alone."""
    at = caches.position(cache)
    return (prompt + answer)[:at] if at is not None and at >= len(prompt) else prompt


def queue_store(pending: deque, cache: list, tokens: list[int]) -> deque:
    """`pending` stores (cache, tokens), oldest first, with this answer's added. A pending store
    whose tokens this one extends is dropped: the new cache holds every row of them and stores
    the same blocks. Only for caches of plain KV layers (those mlx-lm can trim): a ring may have
    dropped the earlier rows, and recurrent state has moved past them."""
    if can_trim_prompt_cache(cache):
        pending = deque((c, t) for c, t in pending if not (len(t) <= len(tokens) and tokens[: len(t)] == t))
    pending.append((cache, tokens))
    return pending


def store(vault, lm, cache: list, tokens: list[int]) -> int:
    """Store the blocks of `tokens` that `cache` holds rows for; returns chunks written.

    `Vault.save` takes any cache: blocks the live cache cannot give (a ring dropped them,
    recurrent state moved on) it prefills again."""
    if vault.read_only:
        return 0
    try:
        return vault.save(lm, cache, tokens).written
    except UnsupportedCacheError:
        return 0


def stats(vault, live: LiveCaches) -> dict:
    return {**dataclasses.asdict(vault.stats()), "live": live.stats()}


def clear(vault, live: LiveCaches, label: str | None = None) -> int:
    """Remove every stored chunk, or only those of one warmed label; returns how many. The live
    caches go too (they are not labelled: none may answer for a removed prefix)."""
    result = vault.rm(label=label) if label is not None else vault.rm(everything=True)
    live.clear()
    return result.removed_chunks
