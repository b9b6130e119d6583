"""Live mlx-lm cache objects <-> per-block payloads (the vault's unit of storage).

The vault warms a prompt in steps of whole blocks: once the model has processed tokens [start, end),
`encode_block` (or `encode_blocks`, for a step's blocks at once) captures every layer's state for those tokens as flat named arrays plus JSON
meta. `restore_cache` rebuilds fresh mlx-lm cache objects holding exactly the first n tokens
from the payloads of the blocks covering them, behaving as if those tokens had just been
prefilled. Supported layer caches: KVCache, RotatingKVCache, QuantizedKVCache, ArraysCache,
and CacheList of those (recursively); anything else raises UnsupportedCacheError naming it.
Each type's storage rules live in its own module (caches_kv, caches_rotating, ...).

Layer groups (payload format 2): the top-level KVCache / RotatingKVCache layers whose blocks
look alike (same layout, same token segments, same K/V shapes and dtypes: all layers of a Llama,
Gemma-3's ring layers and its global layers) are stacked on a new leading axis and coded as ONE
tensor per segment and role, so a block file holds a handful of tensors whatever the depth of
the model, and a restore decodes a group with a few calls instead of one per layer. The codec
reduces only over a vector and its head's tokens (norms, means, outlier channels, log-norm
ranges), so a stacked encode decodes to the same values as per-layer encodes (tests check it).
Other layers (ArraysCache, QuantizedKVCache, CacheList) are stored per layer as before.

Array names: "g0.s0.k.codes" = group 0, segment 0, keys, codec array "codes" (leading axis: the
group's layers, in meta["groups"][0]["layers"] order); per-layer entries "l03.s0.k.codes" =
layer 3, segment 0, ...; nested caches add ".c<j>" ("l03.c1.s0.v.data"), ArraysCache state
entries are "l03.a<i>". Format 1 payloads (every layer per layer) still restore.
"""

from dataclasses import dataclass

import mlx.core as mx
from mlx.utils import tree_flatten
from mlx_lm.models.cache import (
    ArraysCache,
    CacheList,
    KVCache,
    QuantizedKVCache,
    RotatingKVCache,
    make_prompt_cache,
)

from promptvault.codec import KVCodec
from promptvault.errors import PromptvaultError
from promptvault.vault import caches_arrays, caches_kv, caches_quantized, caches_rotating
from promptvault.vault.caches_rows import RestoreError

__all__ = ["BlockPayload", "layer_layout", "layer_segments", "block_ends_only", "position", "encode_block",
           "encode_blocks", "prefill_step", "restore_cache", "evaluate_cache",
           "RestoreError", "UnsupportedCacheError", "FORMAT"]

FORMAT = "promptvault.caches/2"
FORMAT_V1 = "promptvault.caches/1"  # per-layer tensors only; still restored
_GROUPABLE = (KVCache, RotatingKVCache)

# Exact classes only: a subclass may change what the buffers mean, so it must be added here
# deliberately rather than be handled by accident.
_ADAPTERS = {
    KVCache: caches_kv,
    RotatingKVCache: caches_rotating,
    QuantizedKVCache: caches_quantized,
    ArraysCache: caches_arrays,
}
_BY_NAME = {cls.__name__: mod for cls, mod in _ADAPTERS.items()}


class UnsupportedCacheError(PromptvaultError, TypeError):
    """A layer cache type this module does not know how to store."""


@dataclass
class BlockPayload:
    """One block's state: `arrays` go into a shard as tensors, `meta` (JSON-able) alongside.

    meta = {"format", "start", "end", "codec": KVCodec json, "layout": layer_layout(cache),
            "layers": per-layer meta (segments / snapshot, codec metas; {"type", "group": g} for a
                      layer stored in a group),
            "groups": per group {"layers": [i, ...], "segments": ..., layout fields}}
    """

    arrays: dict[str, mx.array]
    meta: dict

    @property
    def start(self) -> int:
        return self.meta["start"]

    @property
    def end(self) -> int:
        return self.meta["end"]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    @property
    def complete(self) -> bool:
        """Every layer holds every token of the block. False when a ring had already dropped
        some of its rows when it was captured (a cache saved after the fact): such a block
        serves only restores whose window lies within the rows it kept."""
        n = self.end - self.start
        return all(_complete(m, n) for m in [*self.meta["layers"], *self.meta.get("groups", [])])


def _complete(meta: dict, n: int) -> bool:
    if "children" in meta:
        return all(_complete(m, n) for m in meta["children"])
    if "group" in meta:
        return True  # its group is checked
    if "segments" in meta:
        return sum(b - a for a, b in (s["tokens"] for s in meta["segments"])) == n
    return True  # a recurrent-state snapshot is whole by construction


def _adapter(cache):
    mod = _ADAPTERS.get(type(cache))
    if mod is None:
        raise UnsupportedCacheError(
            f"promptvault cannot store a {type(cache).__module__}.{type(cache).__name__} layer cache "
            f"(supported: {', '.join(sorted(_BY_NAME))}, CacheList)"
        )
    return mod


def _layout_one(cache) -> dict:
    if type(cache) is CacheList:
        return {"type": "CacheList", "children": [_layout_one(c) for c in cache.caches]}
    return _adapter(cache).layout(cache)


def layer_layout(cache: list) -> list[dict]:
    """Per layer: the cache type and the static parameters that change the stored bytes
    (ring max_size/keep, quantization group_size/bits, state slots, nested layouts).

    Works on a fresh, empty cache (make_prompt_cache), so the vault can fingerprint its
    namespace before any prefill. Tensor shapes and dtypes are not known then: they are
    recorded per block in the codec metas and checked when blocks are joined at restore.
    """
    return [_layout_one(c) for c in cache]


def layer_segments(meta: dict, layer: int) -> list[dict]:
    """The token segments a payload holds for a KV-like top-level layer (its group's, when it is
    stored in one): what a block holds of that layer, for checks and diagnostics."""
    own = meta["layers"][layer]
    return meta["groups"][own["group"]]["segments"] if "group" in own else own["segments"]


def block_ends_only(layout: list[dict]) -> bool:
    """True when some layer holds recurrent state (ArraysCache), which is stored as a snapshot
    at each block end: such a cache can be restored only at exactly those positions, so a
    lookup must round a reusable prefix down to a block end instead of trimming it."""
    return any(
        lay["type"] == "ArraysCache" or (lay["type"] == "CacheList" and block_ends_only(lay["children"]))
        for lay in layout
    )


def position(cache: list) -> int | None:
    """The token position the live cache is at, from its positional layers; None when no layer
    records one (a purely recurrent model: its state says nothing about how many tokens it saw).
    Raises RestoreError when layers disagree."""
    offsets = {int(c.offset) for c in _flat(cache) if hasattr(c, "offset")}
    if len(offsets) > 1:
        raise RestoreError(f"the cache's layers are at different positions {sorted(offsets)}")
    return offsets.pop() if offsets else None


def evaluate_cache(cache: list) -> None:
    """Evaluate every array the cache's layers hold (after a prefill or a restore)."""
    mx.eval([v for c in cache for _, v in tree_flatten(c.state) if isinstance(v, mx.array)])


def _flat(cache: list):
    for c in cache:
        if type(c) is CacheList:
            yield from _flat(c.caches)
        else:
            yield c


def _encode_one(cache, start, end, kv, prefix, out) -> dict:
    if type(cache) is CacheList:
        children = [_encode_one(c, start, end, kv, f"{prefix}.c{j}", out) for j, c in enumerate(cache.caches)]
        return {"type": "CacheList", "children": children}
    return _adapter(cache).encode(cache, start, end, kv, prefix, out)


def prefill_step(cache: list, block_size: int, wanted: int) -> int:
    """Tokens per model call when warming into `cache`: `wanted` rounded down to whole blocks,
    so every block is captured from the live cache after the step that computed it.

    Recurrent state (ArraysCache) is a snapshot of "now": one block per step, so every block end
    is seen. A ring (RotatingKVCache) keeps every row of a multi-token update (mlx-lm 0.32 trims
    before appending), but the step also stays within its window minus `keep`, so a step's
    blocks would still be held if a ring trimmed after appending.
    """
    layers = list(_flat(cache))
    if any(type(c) is ArraysCache for c in layers):
        return block_size
    rings = [int(c.max_size) - int(c.keep) for c in layers if type(c) is RotatingKVCache]
    step = min([wanted, *rings])
    return max(block_size, step - step % block_size)


def encode_blocks(cache: list, spans: list[tuple[int, int]], kv: KVCodec, at: int | None = None
                  ) -> list[BlockPayload]:
    """encode_block for several blocks, evaluated together: one host sync for all of them."""
    payloads = [encode_block(cache, start, end, kv, at=at, evaluate=False) for start, end in spans]
    mx.eval([a for p in payloads for a in p.arrays.values()])
    return payloads


def encode_block(cache: list, start: int, end: int, kv: KVCodec, at: int | None = None,
                 evaluate: bool = True) -> BlockPayload:
    """Capture tokens [start, end) of every layer of `cache`, coded with `kv`.

    KV-like layers can give any rows they still hold, but recurrent state (ArraysCache) is a
    snapshot of "now", so when the model has one the cache must be exactly at `end`. Its position
    comes from the positional layers; a purely recurrent model records none, so the caller must
    say where the cache is (`at`, e.g. warm right after prefilling [start, end)), or the block is
    refused: storing a snapshot under the wrong position would restore the wrong state silently.
    Arrays own their bytes (no views into the live cache) and are evaluated unless `evaluate`
    is False (encode_blocks evaluates many blocks at once).
    """
    if not 0 <= start < end:
        raise ValueError(f"bad block [{start}, {end})")
    layers = list(_flat(cache))
    for c in layers:
        _adapter(c)  # reject unknown types before any work
    if any(type(c) is ArraysCache for c in layers):
        known = position(cache)
        if known is not None and at is not None and known != at:
            raise RestoreError(f"the cache is at token {known}, not {at} as the caller says")
        at = known if known is not None else at
        if at != end:
            where = "an unknown position (its layers record none)" if at is None else f"token {at}"
            raise RestoreError(f"the cache is at {where} but the block ends at {end}: recurrent state "
                               "(ArraysCache) can only be captured at the position the cache is at")
    arrays: dict[str, mx.array] = {}
    metas: list = [None] * len(cache)
    groups = []
    for g, members in enumerate(_groups(cache, start, end)):
        layers = [i for i, _ in members]
        mod = _ADAPTERS[type(cache[layers[0]])]
        groups.append({"layers": layers, **mod.layout(cache[layers[0]]), **mod.encode_group([rows for _, rows in members], kv, f"g{g}", arrays)})
        for i in layers:
            metas[i] = {**mod.layout(cache[i]), "group": g}
    for i, c in enumerate(cache):
        if metas[i] is None:
            metas[i] = _encode_one(c, start, end, kv, f"l{i:02d}", arrays)
    if evaluate:
        mx.eval(list(arrays.values()))
    meta = {"format": FORMAT, "start": start, "end": end, "codec": kv.to_json(),
            "layout": layer_layout(cache), "layers": metas, "groups": groups}
    return BlockPayload(arrays=arrays, meta=meta)


def _groups(cache: list, start: int, end: int) -> list[list[tuple[int, object]]]:
    """The top-level KV-like layers in groups of alike blocks: (layer, rows) per member, where
    rows is the adapter's capture of [start, end) (its held token ranges and their K/V rows)."""
    groups: dict[tuple, list] = {}
    for i, c in enumerate(cache):
        if type(c) not in _GROUPABLE:
            continue
        rows = _ADAPTERS[type(c)].capture(c, start, end, f"l{i:02d}")
        keys, values = rows.keys, rows.values
        like = (type(c), repr(_layout_one(c)), repr(rows.info), keys.shape[:-2], keys.shape[-1], keys.dtype,
                values.shape[:-2], values.shape[-1], values.dtype)
        groups.setdefault(like, []).append((i, rows))
    return list(groups.values())


def _restore_one(layout: dict, blocks: list, n_tokens: int, prefix: str):
    if layout["type"] == "CacheList":
        children = []
        for j, child in enumerate(layout["children"]):
            sub = [(m["children"][j], a, f"{p}.c{j}") for m, a, p in blocks]
            children.append(_restore_one(child, sub, n_tokens, f"{prefix}.c{j}"))
        return CacheList(*children)
    mod = _BY_NAME.get(layout["type"])
    if mod is None:
        raise UnsupportedCacheError(f"payload holds an unknown layer cache type {layout['type']!r}")
    return mod.restore(layout, blocks, n_tokens, prefix)


def _check_payloads(payloads: list, n_tokens: int) -> list:
    """The payloads needed for n_tokens, after checking they chain from 0 with one layout."""
    if n_tokens < 1:
        raise ValueError(f"n_tokens must be >= 1, got {n_tokens}")
    if not payloads:
        raise RestoreError("no payloads to restore from")
    pos = 0
    used = []
    for p in payloads:
        if p.meta.get("format") not in (FORMAT, FORMAT_V1):
            raise RestoreError(f"payload format {p.meta.get('format')!r} is not {FORMAT!r} (or {FORMAT_V1!r})")
        if p.start != pos:
            raise RestoreError(f"payloads must be contiguous from token 0: got block [{p.start}, {p.end}) at {pos}")
        if p.meta["layout"] != payloads[0].meta["layout"]:
            raise RestoreError(f"block [{p.start}, {p.end}) has a different cache layout from block 0")
        if pos >= n_tokens:
            break
        used.append(p)
        pos = p.end
    if pos < n_tokens:
        raise RestoreError(f"payloads cover tokens [0, {pos}), fewer than the {n_tokens} requested")
    return used


def restore_cache(model, payloads: list[BlockPayload], n_tokens: int) -> list:
    """Fresh mlx-lm cache objects holding exactly the first n_tokens of the payloads' prompt.

    payloads: BlockPayloads in token order, contiguous from token 0, covering >= n_tokens (the
    last one may be used only in part). `model` (may be None) is checked to have as many cache
    layers as the payloads. The layer types come from the payloads, not from the model: a ring
    cache warmed with make_prompt_cache(model, max_kv_size=N) restores as that ring.
    Buffers are decoded layer by layer into preallocated arrays, evaluated as they fill.
    The restored arrays never alias payload arrays.
    """
    used = _check_payloads(payloads, n_tokens)
    layout = used[0].meta["layout"]
    if model is not None and len(make_prompt_cache(model)) != len(layout):
        raise RestoreError(
            f"the model has {len(make_prompt_cache(model))} cache layers, the payloads {len(layout)}"
        )
    shared = _shared_groups(used)
    if shared is None:  # format 1 blocks, or blocks grouped differently: layer by layer
        used = [_per_layer(p) for p in used]
        shared = []
    out: list = [None] * len(layout)
    for g, group in enumerate(shared):
        blocks = [(p.meta["groups"][g], p.arrays, f"g{g}") for p in used]
        mod = _BY_NAME[layout[group["layers"][0]]["type"]]
        for i, c in zip(group["layers"], mod.restore_group(layout[group["layers"][0]], blocks, n_tokens, f"g{g}",
                                                             len(group["layers"]))):
            out[i] = c
    for i, lay in enumerate(layout):
        if out[i] is None:
            blocks = [(p.meta["layers"][i], p.arrays, f"l{i:02d}") for p in used]
            out[i] = _restore_one(lay, blocks, n_tokens, f"l{i:02d}")
    return out


def _shared_groups(payloads: list) -> list[dict] | None:
    """The layer groups every payload has (same members and types), or None when they differ."""
    first = payloads[0].meta.get("groups")
    if first is None:
        return None
    members = [g["layers"] for g in first]
    for p in payloads[1:]:
        if [g["layers"] for g in p.meta.get("groups", [])] != members:
            return None
    for g in first:
        if any(_BY_NAME.get(payloads[0].meta["layout"][i]["type"]) is None for i in g["layers"]):
            return None
    return first


def _per_layer(payload: BlockPayload) -> BlockPayload:
    """A payload with its groups split back into per-layer entries (format 1's naming), as views
    of the group tensors: how blocks grouped differently from their neighbours (or a format 1
    block next to format 2 ones) restore together."""
    groups = payload.meta.get("groups")
    if not groups:
        return payload
    arrays = {name: a for name, a in payload.arrays.items() if not name.startswith("g")}
    layers = list(payload.meta["layers"])
    for g, group in enumerate(groups):
        head = f"g{g}."
        mine = {name[len(head):]: a for name, a in payload.arrays.items() if name.startswith(head)}
        rest = {k: v for k, v in group.items() if k not in ("layers", "segments")}
        for j, i in enumerate(group["layers"]):
            for name, a in mine.items():
                arrays[f"l{i:02d}.{name}"] = a[j]
            segments = [{**seg, **{r: {**seg[r], "shape": seg[r]["shape"][1:]} for r in ("k", "v")}}
                        for seg in group["segments"]]
            layers[i] = {"type": layers[i]["type"], **rest, "segments": segments}
    return BlockPayload(arrays, {**payload.meta, "layers": layers, "groups": []})
