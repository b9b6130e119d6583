"""Namespaces: one id per combination of everything that changes the stored bytes.

Two caches may only share blocks when the same tokens produce the same bytes: same weights,
tokenizer and chat template (the model fingerprint), same KV dtype, same per-layer cache types and
shapes, same block size, same codec (id, bits, seed, ...) and same on-disk format version. All of
it goes into a canonical JSON descriptor; its blake2b-128 digest is the namespace id, which is
mixed into every block key, so entries of one namespace can never be served to another (llama.cpp
checks shapes only and happily restores another model's cache).
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

FORMAT_VERSION = 1


def canonical_json(obj) -> str:
    return json.dumps(obj, sort_keys=True, separators=(",", ":"))


@dataclass(frozen=True)
class Namespace:
    id: str  # 32 hex chars
    descriptor: dict

    @property
    def digest(self) -> bytes:
        return bytes.fromhex(self.id)

    @property
    def block_size(self) -> int:
        return self.descriptor["block_size"]

    @classmethod
    def from_descriptor(cls, descriptor: dict) -> "Namespace":
        text = canonical_json(descriptor)
        return cls(hashlib.blake2b(text.encode(), digest_size=16).hexdigest(), json.loads(text))


def make_namespace(*, model_fingerprint: str, kv_dtype: str, layout: list, block_size: int,
                   codec: dict) -> Namespace:
    return Namespace.from_descriptor({
        "format": FORMAT_VERSION,
        "model": model_fingerprint,
        "kv_dtype": kv_dtype,
        "layout": layout,
        "block_size": block_size,
        "codec": codec,
    })
