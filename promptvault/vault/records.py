"""The chunk record: what one shard file holds besides its payload, in one place for the writer,
the reindex and the benchmarks.

A shard's metadata (safetensors `__metadata__`, str -> str; see shards.py for the file itself):

    format      SHARD_FORMAT
    chunk       canonical JSON {key, parent, namespace, position, n_tokens}: the chunk's identity
    namespace   compact.pack(namespace descriptor): model, KV dtype, layout, block size, codec
    payload     compact.pack(block payload meta without layout and codec, which the namespace holds)

and besides the payload's tensors one tensor TOKENS: the chunk's token ids (uint32), so a reader
can check that a chunk belongs to the prompt it is asked to serve without trusting the index.
"""

from __future__ import annotations

from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from promptvault.vault import caches, compact
from promptvault.vault.namespace import FORMAT_VERSION, Namespace, canonical_json
from promptvault.vault.shards import encode_shard, relpath

SHARD_FORMAT = f"promptvault.shard/{FORMAT_VERSION}"
TOKENS = "_tokens"  # tensor holding the chunk's token ids (uint32)


@dataclass
class EncodedChunk:
    """A block on its way to disk: its shard bytes and what its index row needs."""
    key: str
    rel: str  # shard path under shards/
    chunk: dict  # the chunk's identity (key, parent, namespace, position, n_tokens)
    ns: Namespace
    payload: caches.BlockPayload
    tokens: np.ndarray
    parts: list[bytes]  # the shard file's bytes (shards.encode_shard)
    digest: str

    @property
    def nbytes(self) -> int:
        """The shard file's size."""
        return sum(len(p) for p in self.parts)


def encode_chunk(ns: Namespace, payload: caches.BlockPayload, tokens, key: str, parent: str | None) -> EncodedChunk:
    """A captured block (tokens [payload.start, payload.end) of the prompt `tokens`) as the bytes
    of its shard file. MLX work: call it from the thread that owns the arrays."""
    start, end = payload.start, payload.end
    own = np.asarray(tokens[start:end], dtype=np.int64)
    meta = {k: v for k, v in payload.meta.items() if k not in ("layout", "codec")}  # in "namespace"
    chunk = {"key": key, "parent": parent, "namespace": ns.id, "position": start, "n_tokens": end - start}
    arrays = {**payload.arrays, TOKENS: mx.array(own, dtype=mx.uint32)}
    shard_meta = {"format": SHARD_FORMAT, "chunk": canonical_json(chunk),
                  "namespace": compact.pack(ns.descriptor), "payload": compact.pack(meta)}
    parts, digest = encode_shard(arrays, shard_meta)
    return EncodedChunk(key, relpath(key), chunk, ns, payload, own, parts, digest)


@dataclass
class Loaded:
    """A chunk's payload as the RAM tier keeps it (read back from its shard, or just written)."""
    payload: caches.BlockPayload
    nbytes: int
    tokens: np.ndarray  # the chunk's token ids, from the shard itself (not the index)
