"""Every vault call the server makes, in one place.

Before a request: restore the longest stored prefix of its tokens (the vault reads its RAM tier
first, so the turns of one conversation do not touch the disk). After the answer has been sent:
store the blocks the live cache now holds, prompt and answer both, so the next turn of the same
conversation (its history re-rendered with this answer, then a new message) restores all of it
up to where the rendered answer parts from the generated tokens.

A client that went away mid-answer stores nothing (`store` is simply not called): a store is all
of a request's blocks or none of them, never a half-written answer.
"""

from mlx_lm.models.cache import KVCache

from promptvault.vault.caches import UnsupportedCacheError


def fetch(vault, lm, tokens: list[int]) -> tuple[list, int]:
    """Fresh mlx-lm caches for `lm` holding the longest stored prefix of `tokens`, and its length."""
    restored = vault.restore(lm, tokens)
    return restored.cache, restored.tokens_reused


def store(vault, lm, cache: list, prompt: list[int], answer: list[int]) -> int:
    """Store the blocks of prompt + answer that `cache` holds rows for; returns chunks written.

    A cache of plain KV layers is stored as it is; other layer kinds (rings that dropped old rows,
    recurrent state that moved on) are re-prefilled from the prompt by `warm`."""
    if vault.read_only:
        return 0
    try:
        if all(type(layer) is KVCache for layer in cache):
            return vault.save(lm, cache, (prompt + answer)[: cache[0].offset]).written
        return vault.warm(lm, prompt).written
    except UnsupportedCacheError:
        return 0


def stats(vault) -> dict:
    return vault.stats()


def clear(vault, label: str | None = None) -> int:
    """Remove every stored chunk, or only those of one warmed label; returns how many."""
    return vault.rm(label=label) if label is not None else vault.rm(everything=True)
