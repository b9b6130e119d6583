"""Finding the longest reusable prefix of a prompt in the index.

Three kinds of reuse, in order: the run of full blocks whose chained keys are all indexed; then,
among the chunks that extend that run (full blocks or tail leaves of other prompts), the one
sharing the most leading tokens with the prompt (a token-level longest common prefix, so a
prompt that diverges inside a block still reuses that block's first rows); an exact tail leaf is
simply the case where that prefix is the whole leaf. At least the last prompt token is always
left to be recomputed, because generation needs its logits.

Layers with recurrent state (ArraysCache) cannot be cut mid-block: in such namespaces reuse
stops only where a stored snapshot was taken (a chunk end).

The cost does not grow with the vault. Full blocks are found by key. The chunk that extends them
is found without reading every sibling (a vault of a million prompts has a million first blocks,
all children of "no parent"): the index keeps each chunk's first HEAD_TOKENS (16) tokens as a
big-endian `head`, so SQLite orders siblings by their leading tokens, and
`Index.nearest_children` returns
- when some siblings begin with the prompt's next 16 tokens: those, the MAX_CANDIDATES (32) most
  recently used first; their token-level prefix with the prompt is computed as before;
- otherwise the two siblings next to the prompt in head order, which share the most leading
  tokens with it (fewer than 16) — so reuse below 16 tokens inside a block is still found.
When that group is full, the chunks the prompt continues whole (a stored shorter prompt's tail
leaf, say an earlier turn of the same chat) are also looked up by key, one per possible length.
What this gives up: when more than 32 siblings share the prompt's next 16 tokens (many stored
prompts with one long common beginning that ends inside a block, e.g. a system prompt), an older
sibling that shares more tokens with the prompt but not all of its own is not compared, so the
reuse may stop at the common beginning. In ArraysCache namespaces only whole chunks count, and
those are always looked up by key, so nothing is given up there.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

import numpy as np

from promptvault.vault.caches import block_ends_only
from promptvault.vault.index import Index, head_of
from promptvault.tokens import common_prefix
from promptvault.vault.keys import ROOT, block_keys, bytes_to_tokens, tokens_to_bytes
from promptvault.vault.namespace import Namespace

MAX_CANDIDATES = 32  # siblings compared at most when many share the prompt's next 16 tokens


@dataclass
class Plan:
    reuse: int  # tokens restorable (0: miss)
    chunks: list[dict]  # index rows, in token order, covering [0, >= reuse)


def exact_only(ns: Namespace) -> bool:
    """The namespace's caches hold recurrent state: reuse only where a snapshot was taken."""
    return block_ends_only(ns.descriptor["layout"]["layers"])


def plan(index: Index, ns: Namespace, tokens: np.ndarray) -> Plan:
    limit = len(tokens) - 1
    if limit < 1:
        return Plan(0, [])
    B = ns.block_size
    keys = block_keys(ns.digest, tokens, B)
    have = index.existing(keys)
    chain: list[dict] = []
    for key in keys:
        if key not in have:
            break
        row = index.chunk(key)
        if row is None:  # removed by another process since
            break
        chain.append(row)
    pos = len(chain) * B
    parent = chain[-1]["key"] if chain else None
    snapshots = exact_only(ns)
    rest = tokens[pos : pos + B]
    if snapshots:
        candidates = index.chunks(_leaf_keys(parent, ns.digest, rest[: B - 1]))
    else:
        candidates = index.nearest_children(ns.id, parent, head_of(tokens_to_bytes(rest)), MAX_CANDIDATES)
        if len(candidates) == MAX_CANDIDATES:  # maybe cut: whole chunks the prompt continues, by key
            candidates += index.chunks(_leaf_keys(parent, ns.digest, rest[: B - 1]))
    best, best_len = None, 0
    for child in candidates:
        ctoks = bytes_to_tokens(child["tokens"])
        n = common_prefix(ctoks, tokens[pos : pos + len(ctoks)])
        if snapshots and n < len(ctoks):
            continue
        if n > best_len:
            best, best_len = child, n
    if best is not None:
        chain.append(best)
    ends = np.cumsum([r["n_tokens"] for r in chain]) if chain else np.array([0])
    reuse = min(pos + best_len, limit)
    if snapshots:
        marks = [e for e, r in zip(ends, chain) if e <= limit and index.has_snapshot(r["key"])]
        reuse = int(max(marks, default=0))
    if reuse <= 0:
        return Plan(0, [])
    needed = int(np.searchsorted(ends, reuse)) + 1  # chunks covering [0, reuse)
    return Plan(reuse, chain[:needed])


def _leaf_keys(parent: str | None, digest: bytes, rest: np.ndarray) -> list[str]:
    """Keys of the leaves that would hold exactly rest[:1], rest[:2], … (`keys.chunk_key`,
    hashed incrementally: one pass over the tokens)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(bytes.fromhex(parent) if parent else ROOT)
    h.update(digest)
    data, keys = tokens_to_bytes(rest), []
    for i in range(0, len(data), 4):
        h.update(data[i : i + 4])
        keys.append(h.copy().hexdigest())
    return keys
