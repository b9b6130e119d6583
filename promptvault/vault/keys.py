"""Chained block keys.

A prompt is cut into blocks of a fixed number of tokens. Block i is keyed by

    key_i = blake2b-256(key_{i-1} || namespace digest || tokens of block i as uint32-LE)

with key_{-1} = 32 zero bytes. Chaining makes a key stand for the whole prefix up to the end of its
block, so a hit on key_i proves every earlier token matched; the namespace digest keeps two models
(or two codecs) from ever sharing a key; a fixed byte encoding and a cryptographic hash (never
Python's salted, collision-prone `hash()`) make keys stable across processes and machines.

A prompt's tail shorter than a block (a "leaf") is keyed the same way over its exact tokens: the
parent and namespace parts have fixed lengths, so inputs of different token counts can never
collide, and a leaf is only ever found again by the exact same tokens.
"""

from __future__ import annotations

import hashlib
from typing import Sequence

import numpy as np

ROOT = bytes(32)


def tokens_to_bytes(tokens: Sequence[int]) -> bytes:
    """The fixed token encoding: uint32 little-endian. Rejects ids that do not fit."""
    arr = np.asarray(tokens, dtype=np.int64).reshape(-1)
    if arr.size and (arr.min() < 0 or arr.max() >= 2**32):
        raise ValueError("token ids must be in [0, 2**32)")
    return arr.astype("<u4").tobytes()


def bytes_to_tokens(data: bytes) -> np.ndarray:
    return np.frombuffer(data, dtype="<u4")


def chunk_key(parent: str | None, namespace_digest: bytes, tokens: Sequence[int]) -> str:
    """Key of one block (or leaf) whose preceding chunk has key `parent` (None for the first)."""
    h = hashlib.blake2b(digest_size=32)
    h.update(bytes.fromhex(parent) if parent else ROOT)
    h.update(namespace_digest)
    h.update(tokens_to_bytes(tokens))
    return h.hexdigest()


def block_spans(n_tokens: int, block_size: int, *, tail: bool = False) -> list[tuple[int, int]]:
    """[start, end) of every full block of a prompt of `n_tokens`, and with `tail` of the shorter
    rest (the leaf) when there is one."""
    last = n_tokens if tail else n_tokens - n_tokens % block_size
    return [(s, min(s + block_size, n_tokens)) for s in range(0, last, block_size)]


def block_keys(namespace_digest: bytes, tokens: Sequence[int], block_size: int, *, tail: bool = False) -> list[str]:
    """Chained keys of every full block of `tokens`, in order, and with `tail` the leaf's key of a
    shorter rest (without it a partial tail gets none)."""
    keys: list[str] = []
    parent = None
    for start, end in block_spans(len(tokens), block_size, tail=tail):
        parent = chunk_key(parent, namespace_digest, tokens[start:end])
        keys.append(parent)
    return keys

