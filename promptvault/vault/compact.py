"""Compact JSON for shard metadata: subtrees that repeat are written once.

A block's payload meta describes every layer, and most layers are described identically (same
cache type, same codec spec, same shapes); spelled out, that JSON would repeat per layer. Here
each repeated dict or list is stored once in "defs" and referenced as {"$": i}, which keeps the
metadata plain, readable JSON and its size independent of the number of layers. Input dicts must not use the key "$".
"""

from __future__ import annotations

import json
from collections import Counter

from promptvault.vault.namespace import canonical_json

_MIN_LEN = 12  # shorter subtrees cost about as much as a reference


def pack(obj) -> str:
    counts: Counter = Counter()

    def count(x):
        if isinstance(x, dict):
            if "$" in x:
                raise ValueError('compact JSON reserves the key "$"')
            children = x.values()
        elif isinstance(x, list):
            children = x
        else:
            return
        counts[canonical_json(x)] += 1
        for c in children:
            count(c)

    count(obj)
    defs: list = []
    ids: dict[str, int] = {}

    def rep(x, top=False):
        if not isinstance(x, (dict, list)):
            return x
        text = canonical_json(x)
        if not top and counts[text] > 1 and len(text) >= _MIN_LEN:
            if text not in ids:
                ids[text] = len(defs)
                defs.append(None)
                defs[ids[text]] = _map(x, rep)
            return {"$": ids[text]}
        return _map(x, rep)

    return canonical_json({"defs": defs, "value": rep(obj, top=True)})


def unpack(text: str):
    doc = json.loads(text)
    defs = doc["defs"]

    def expand(x):
        if isinstance(x, dict) and set(x) == {"$"}:
            return expand(defs[x["$"]])
        return _map(x, expand) if isinstance(x, (dict, list)) else x

    return expand(doc["value"])


def _map(x, fn):
    if isinstance(x, dict):
        return {k: fn(v) for k, v in x.items()}
    return [fn(v) for v in x]
