"""Token rows of K/V tensors <-> coded segments, shared by the KV-like cache adapters.

A *segment* is a run of consecutive tokens [a, b) of one layer captured in one block, its keys
and values coded with the block's KVCodec. KVCache blocks hold one segment; a ring may hold
fewer rows than its block (the ring had already dropped some), so a block can hold 0..2 segments.
Restore copies, for every token range a cache needs, the matching rows of every segment into
one preallocated buffer: each buffer is sized once, no concatenation chains.
"""

from dataclasses import dataclass
from typing import Callable, Sequence

import mlx.core as mx
import numpy as np

from promptvault.codec import LOSSLESS, Encoded, KVCodec, decode, encode, kernels
from promptvault.errors import PromptvaultError


class RestoreError(PromptvaultError, ValueError):
    """The payloads cannot rebuild the requested cache (missing rows, wrong position, bad meta)."""


@dataclass
class Rows:
    """What one KV-like layer holds of a block: `keys`/`values` (..., rows, d) and, per held
    token range (a, b), the row where token a is (`ranges`); `info` is the JSON-able part
    (ranges and ring position) that layers must share to be coded as one group."""
    keys: mx.array
    values: mx.array
    ranges: list[tuple[int, int, int]]
    info: dict


def encode_group(rows: list[Rows], kv: KVCodec, prefix: str, out: dict) -> list[dict]:
    """Code alike layers' rows as one stack (a new leading axis): one tensor per segment and
    role for the whole group. Returns the group's segments (split at the sinks as
    encode_segments does)."""
    segments: list[dict] = []
    for a, b, row in rows[0].ranges:
        for s, e, codec in _sink_split(a, b, kv):
            sl = slice(row + s - a, row + e - a)
            ek = _encode_stack([r.keys[..., sl, :] for r in rows], codec.keys)
            ev = _encode_stack([r.values[..., sl, :] for r in rows], codec.values)
            name = f"{prefix}.s{len(segments)}"
            put_arrays(out, name + ".k", ek.arrays)
            put_arrays(out, name + ".v", ev.arrays)
            segments.append({"tokens": [s, e], "k": ek.meta(), "v": ev.meta()})
    return segments


def _encode_stack(parts: list[mx.array], spec) -> Encoded:
    """`encode` of the parts stacked on a new leading axis. With the fused kernels (GPU) that is
    one launch over the stack; on the CPU path each part is encoded on its own and the coded
    arrays stacked (a whole stack at once is several times slower there: its float32
    intermediates leave the cache). The codec's math is per vector and per head, so both give
    the same arrays."""
    if spec.lossless or kernels.backend() != "reference":
        return encode(mx.stack(parts), spec)
    encs = [encode(p, spec) for p in parts]
    arrays = {name: mx.stack([e.arrays[name] for e in encs]) for name in encs[0].arrays}
    return Encoded(spec, (len(parts), *encs[0].shape), encs[0].dtype, arrays)


def _sink_split(a: int, b: int, kv: KVCodec) -> list[tuple[int, int, KVCodec]]:
    """Tokens [a, b) as (start, end, codec) runs: the part within the lossless sinks (tokens
    [0, kv.sinks)) losslessly, the rest with `kv`."""
    cut = min(max(kv.sinks, a), b)
    return ([(a, cut, KVCodec(LOSSLESS, LOSSLESS))] if cut > a else []) + ([(cut, b, kv)] if cut < b else [])


def sub_arrays(arrays: dict, prefix: str) -> dict:
    """The arrays named `prefix.<name>`, keyed by <name>."""
    head = prefix + "."
    return {name[len(head) :]: a for name, a in arrays.items() if name.startswith(head)}


def put_arrays(out: dict, prefix: str, arrays: dict) -> None:
    """Add `arrays` to `out` under `prefix.<name>`, materialised as compact arrays.

    Slices of a cache buffer are views that keep the whole buffer alive; a contiguous copy
    makes the payload own exactly its bytes.
    """
    for name, a in arrays.items():
        out[f"{prefix}.{name}"] = mx.contiguous(a)


def encode_segment(keys: mx.array, values: mx.array, tokens: tuple[int, int], kv: KVCodec,
                   prefix: str, out: dict) -> dict:
    """Code one run of rows; returns the segment meta and adds its arrays to `out`."""
    ek, ev = encode(keys, kv.keys), encode(values, kv.values)
    put_arrays(out, prefix + ".k", ek.arrays)
    put_arrays(out, prefix + ".v", ev.arrays)
    return {"tokens": list(tokens), "k": ek.meta(), "v": ev.meta()}


def encode_segments(keys: mx.array, values: mx.array, tokens: tuple[int, int], kv: KVCodec,
                    prefix: str, first: int, out: dict) -> list[dict]:
    """Code rows of tokens [a, b) as segments named `prefix.s<first>`, `prefix.s<first+1>`:
    one segment, or two when the rows start within the codec's lossless sinks (tokens
    [0, kv.sinks)): the sink rows losslessly, the rest with `kv`. Every segment records its own
    codec, so readers need nothing new to decode them."""
    a, b = tokens
    parts = _sink_split(a, b, kv)
    return [
        encode_segment(keys[..., s - a : e - a, :], values[..., s - a : e - a, :], (s, e), codec,
                       f"{prefix}.s{first + j}", out)
        for j, (s, e, codec) in enumerate(parts)
    ]


def decode_segment(seg: dict, arrays: dict, prefix: str, i0: int, i1: int) -> tuple[mx.array, mx.array]:
    """Rows [i0, i1) (relative to the segment) of its keys and values, decoded."""
    out = []
    for part in ("k", "v"):
        enc = Encoded.from_parts(seg[part], sub_arrays(arrays, f"{prefix}.{part}"))
        out.append(decode(enc.slice_tokens(i0, i1)))
    return tuple(out)


def fill_rows(blocks: Sequence, layer: str, needed: Sequence[tuple[int, int, int]], n_rows: int,
              decode_rows: Callable = decode_segment) -> tuple[mx.array, ...]:
    """Buffers of `n_rows` rows holding, for every (a, b, dest) in `needed`, tokens [a, b) at
    rows [dest, dest + b - a).

    blocks: (layer_meta, arrays, prefix) of this layer in every payload, in token order.
    decode_rows(seg, arrays, seg_prefix, i0, i1) -> tuple of (..., rows, width) arrays.
    Coverage is checked from the metadata before anything is decoded: RestoreError names the
    tokens no segment holds. Each block is evaluated as it is written, so at most one block's
    decoded rows exist beside the buffers.
    """
    plan, covered = [], []
    for meta, arrays, prefix in blocks:
        for j, seg in enumerate(meta["segments"]):
            s0, s1 = seg["tokens"]
            for a, b, dest in needed:
                lo, hi = max(a, s0), min(b, s1)
                if lo < hi:
                    plan.append((seg, arrays, f"{prefix}.s{j}", lo - s0, hi - s0, dest + lo - a))
                    covered.append((lo, hi))
    missing = _missing(needed, covered)
    if missing:
        raise RestoreError(
            f"layer {layer}: tokens {missing} are needed but no block holds them (a ring cache "
            f"that had already dropped those rows when the block was captured?)"
        )
    if decode_rows is decode_segment:
        buffers = _fill_rows_fused(plan, n_rows)
        if buffers is not None:
            return buffers
        return _fill_rows_tiled(plan, n_rows, layer)
    buffers = None
    for seg, arrays, prefix, i0, i1, row in plan:
        try:
            parts = decode_rows(seg, arrays, prefix, i0, i1)
        except (KeyError, ValueError) as err:
            raise RestoreError(f"layer {layer}: segment {prefix} does not decode: {err}") from err
        if buffers is None:
            buffers = [mx.zeros((*p.shape[:-2], n_rows, p.shape[-1]), p.dtype) for p in parts]
        for buf, p in zip(buffers, parts):
            _check_rows(layer, p, buf)
            buf[..., row : row + i1 - i0, :] = p
        mx.eval(buffers)
    return tuple(buffers)


def _check_rows(layer: str, p: mx.array, buf: mx.array) -> None:
    if p.shape[:-2] != buf.shape[:-2] or p.shape[-1] != buf.shape[-1] or p.dtype != buf.dtype:
        raise RestoreError(
            f"layer {layer}: block rows of shape {p.shape} {p.dtype} do not match "
            f"earlier blocks ({buf.shape} {buf.dtype})"
        )


def _fill_rows_tiled(plan: list, n_rows: int, layer: str) -> tuple[mx.array, mx.array]:
    """K and V buffers with the codec's own decode (CPU, or kernels off), tile by tile: each
    segment's vectors (all layers of a group, flattened with the heads) are decoded in tiles of
    about _TILE values, each evaluated straight into the buffer. On a CPU the decode is a chain
    of elementwise MLX ops, fastest while a tile's float32 intermediates stay in the core's cache
    (a whole group at once is several times slower), and the intermediates beside the buffers
    stay small. The decode is per-vector math in a fixed order: a vector decodes to the same bits
    in any tile."""
    buffers = []
    for part in ("k", "v"):
        buf, lead = None, None
        for seg, arrays, prefix, i0, i1, row in plan:
            try:
                enc = Encoded.from_parts(seg[part], sub_arrays(arrays, f"{prefix}.{part}"))
                enc = enc.slice_tokens(i0, i1)
            except (KeyError, ValueError) as err:
                raise RestoreError(f"layer {layer}: segment {prefix} does not decode: {err}") from err
            if buf is None:
                lead = enc.shape[:-2]
                buf = mx.zeros((int(np.prod(lead)), n_rows, enc.shape[-1]), enc.dtype)
            if enc.shape[:-2] != lead or enc.shape[-1] != buf.shape[-1] or enc.dtype != buf.dtype:
                raise RestoreError(f"layer {layer}: block rows of shape {enc.shape} {enc.dtype} do not match "
                                   f"earlier blocks ({(*lead, n_rows, buf.shape[-1])} {buf.dtype})")
            n_vec, (t, d) = buf.shape[0], enc.shape[-2:]
            flat = {name: a.reshape(n_vec, *a.shape[-2:]) for name, a in enc.arrays.items()}
            step = n_vec if enc.spec.lossless else max(1, _TILE // (t * d))
            for r in range(0, n_vec, step):
                s = min(step, n_vec - r)
                tile = Encoded(enc.spec, (s, t, d), enc.dtype, {n: a[r : r + s] for n, a in flat.items()})
                try:
                    buf[r : r + s, row : row + t, :] = decode(tile)
                except ValueError as err:
                    raise RestoreError(f"layer {layer}: segment {prefix} does not decode: {err}") from err
                mx.eval(buf)
        buffers.append(buf.reshape(*lead, n_rows, buf.shape[-1]))
    return tuple(buffers)


# Values per decode call on the CPU path: a tile's float32 intermediates (~1 MiB) stay in the
# core's L2, and each tile pays ~30 op dispatches and an evaluation, so much smaller tiles lose
# to that overhead (2^15 restored SmolLM2's 2,048 tokens ~1.6x slower).
_TILE = 1 << 18


def _fill_rows_fused(plan: list, n_rows: int) -> tuple[mx.array, ...] | None:
    """The layer's K and V buffers decoded by the fused GPU kernel: one launch each for all
    segments, written straight into the (..., n_rows, d) buffer (rows no segment fills are
    zero). None when the kernels are off or do not fit these segments (then the per-segment
    reference path runs, and reports any problem)."""
    if not plan or kernels.backend() == "reference":
        return None
    uniq: dict[tuple[int, str], int] = {}
    encs: list[tuple[Encoded, Encoded]] = []
    for seg, arrays, prefix, _, _, _ in plan:
        key = (id(arrays), prefix)
        if key not in uniq:
            try:
                pair = tuple(Encoded.from_parts(seg[part], sub_arrays(arrays, f"{prefix}.{part}"))
                             for part in ("k", "v"))
            except (KeyError, ValueError):
                return None
            uniq[key] = len(encs)
            encs.append(pair)
    out = []
    for part in (0, 1):
        # Lossless segments (the attention-sink rows of KVCodec.sinks) are copied in after the
        # launch; every coded segment goes through the one kernel launch.
        coded = [j for j, pair in enumerate(encs) if not pair[part].spec.lossless]
        if not coded:
            return None
        first = encs[coded[0]][part]
        spec, dim, dtype, lead = first.spec, first.shape[-1], first.dtype, first.shape[:-2]
        lang = kernels.use_fused(spec, dim, dtype, int(np.prod(lead)) * n_rows * dim)
        if lang is None:
            return None
        for pair in encs:
            e = pair[part]
            if e.dtype != dtype or e.shape[-1] != dim or e.shape[:-2] != lead:
                return None
            if not e.spec.lossless and (e.spec != spec or not kernels.arrays_fit(e.arrays, spec, dim)):
                return None
        position = {j: n for n, j in enumerate(coded)}
        base = np.cumsum([0] + [encs[j][part].tokens for j in coded])
        rowmap = np.zeros((n_rows, 2), dtype=np.int32)
        rowmap[:, 0] = -1
        copies = []
        for seg, arrays, prefix, i0, i1, row in plan:
            j = uniq[(id(arrays), prefix)]
            if j in position:
                n = position[j]
                rowmap[row : row + i1 - i0, 0] = np.arange(base[n] + i0, base[n] + i1)
                rowmap[row : row + i1 - i0, 1] = n
            else:
                copies.append((encs[j][part], i0, i1, row))
        buf = kernels.decode_rows_with(lang, [encs[j][part].arrays for j in coded], spec, dim, dtype,
                                       rowmap, n_rows)
        for e, i0, i1, row in copies:
            buf[..., row : row + i1 - i0, :] = decode(e.slice_tokens(i0, i1))
        out.append(buf)
    mx.eval(out)
    return tuple(out)


def _missing(needed, covered) -> list[list[int]]:
    """Token ranges of `needed` not covered by any (lo, hi) in `covered`."""
    gaps = []
    for a, b, _ in needed:
        pos = a
        for lo, hi in sorted(c for c in covered if c[1] > a and c[0] < b):
            if lo > pos:
                gaps.append([pos, lo])
            pos = max(pos, hi)
        if pos < b:
            gaps.append([pos, b])
    return gaps


def round_up(n: int, step: int) -> int:
    """n rounded up to a multiple of step: the buffer size mlx-lm's own growth would give."""
    return (n + step - 1) // step * step
