"""Every vault call the server makes, in one place.

Before a request: restore the longest stored prefix of its tokens (the vault reads its RAM tier
first, so the turns of one conversation do not touch the disk). After the answer has been sent:
store the blocks the live cache now holds, prompt and answer both, so the next turn of the same
conversation (its history re-rendered with this answer, then a new message) restores all of it
up to where the rendered answer parts from the generated tokens.

A client that went away mid-answer stores nothing (`store` is simply not called): a store is all
of a request's blocks or none of them, never a half-written answer.
"""

import dataclasses

from promptvault import UnsupportedCacheError
from promptvault.vault import caches


def fetch(vault, lm, tokens: list[int]) -> tuple[list, int]:
    """Fresh mlx-lm caches for `lm` holding the longest stored prefix of `tokens`, and its length."""
    cache, rest = vault.fetch(lm, tokens)
    return cache, len(tokens) - len(rest)


def store(vault, lm, cache: list, prompt: list[int], answer: list[int]) -> int:
    """Store the blocks of prompt + answer that `cache` holds rows for; returns chunks written.

    The cache holds the prompt and every answer token but the last (never fed back); layers that
    record no position (recurrent state) store the prompt. `Vault.save` takes any cache: blocks the
    live cache cannot give (a ring dropped them, recurrent state moved on) it prefills again."""
    if vault.read_only:
        return 0
    at = caches.position(cache)
    tokens = (prompt + answer)[:at] if at is not None and at >= len(prompt) else prompt
    try:
        return vault.save(lm, cache, tokens).written
    except UnsupportedCacheError:
        return 0


def stats(vault) -> dict:
    return dataclasses.asdict(vault.stats())


def clear(vault, label: str | None = None) -> int:
    """Remove every stored chunk, or only those of one warmed label; returns how many."""
    result = vault.rm(label=label) if label is not None else vault.rm(everything=True)
    return result.removed_chunks
