"""Finding the longest reusable prefix of a prompt in the index.

Three kinds of reuse, in order: the run of full blocks whose chained keys are all indexed; then,
among the chunks that extend that run (full blocks or tail leaves of other prompts), the one
sharing the most leading tokens with the prompt (a token-level longest common prefix, so a
prompt that diverges inside a block still reuses that block's first rows); an exact tail leaf is
simply the case where that prefix is the whole leaf. At least the last prompt token is always
left to be recomputed, because generation needs its logits.

Layers with recurrent state (ArraysCache) cannot be cut mid-block: in such namespaces reuse
stops only where a stored snapshot was taken (a chunk end).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from promptvault.vault.index import Index
from promptvault.vault.keys import block_keys, bytes_to_tokens
from promptvault.vault.namespace import Namespace, canonical_json


@dataclass
class Plan:
    reuse: int  # tokens restorable (0: miss)
    chunks: list[dict]  # index rows, in token order, covering [0, >= reuse)


def common_prefix(a: np.ndarray, b: np.ndarray) -> int:
    n = min(len(a), len(b))
    diff = np.flatnonzero(a[:n] != b[:n])
    return int(diff[0]) if diff.size else n


def exact_only(ns: Namespace) -> bool:
    return '"ArraysCache"' in canonical_json(ns.descriptor["layout"])


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
    best, best_len = None, 0
    for child in index.children(ns.id, parent):
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
