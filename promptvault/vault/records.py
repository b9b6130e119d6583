"""The chunk record: what one shard file holds besides the codec's tensors, and how a block
becomes one (encode_chunk, for the writer and the benchmarks) and a verified shard a restorable
block again (loaded).

A chunk file (shards.py) holds the block's payload tensors (caches.py: layer groups "g<k>.*" and
per-layer "l<i>.*"), the tensor TOKENS (the chunk's token ids, uint32: a restore checks them
against the prompt, so a damaged index cannot make a shard serve a prompt it was not computed
for), and metadata:
    "format": SHARD_FORMAT (the vault format; reindex refuses other values),
    "chunk": canonical JSON {key, parent, namespace, position, n_tokens},
    "namespace": the namespace descriptor (compact.pack), whose layout and codec complete the
                 payload meta,
    "payload": the payload meta without layout and codec (compact.pack),
    "shard_version": the file layout version (shards.VERSION; added by shards.py).
"""

from __future__ import annotations

import json
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from promptvault.vault import caches, compact
from promptvault.vault.namespace import FORMAT_VERSION, Namespace, canonical_json
from promptvault.vault.shards import CorruptShard, Shard, encode_shard, relpath

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
    """A chunk ready to restore (what the RAM tier keeps: arrays already in MLX, in the layer
    groups' stacked form a restore decodes in one go)."""
    payload: caches.BlockPayload
    nbytes: int
    tokens: np.ndarray  # the chunk's token ids, from the shard itself (not the index)


def loaded(shard: Shard, key: str) -> Loaded:
    """The chunk a verified shard holds; CorruptShard if it is not the chunk `key` or its
    metadata does not parse (KeyError / ValueError / TypeError are turned into CorruptShard)."""
    try:
        info = json.loads(shard.metadata["chunk"])
        if info["key"] != key:
            raise CorruptShard("shard does not hold the indexed chunk")
        ns = compact.unpack(shard.metadata["namespace"])
        meta = {**compact.unpack(shard.metadata["payload"]), "layout": ns["layout"]["layers"], "codec": ns["codec"]}
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptShard(f"bad chunk metadata: {e}") from e
    arrays = {k: v for k, v in shard.arrays.items() if k != TOKENS}
    toks = np.asarray(shard.arrays[TOKENS]).astype(np.int64) if TOKENS in shard.arrays else np.zeros(0, np.int64)
    return Loaded(caches.BlockPayload(arrays, meta), sum(a.nbytes for a in arrays.values()), toks)
