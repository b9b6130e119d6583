"""TurboQuant (MSE variant, arXiv 2504.19874) in pure MLX: the reference path on every device.

Per vector x: subtract the optional token mean, split into rotation blocks, and per block store
  - the b-bit Lloyd–Max codes of the rotated unit vector u = R(x / ‖x‖), bit-packed, and
  - the corrected norm ‖x‖ / ‖û‖ as float16 (or as an 8-bit logarithm, see CodecSpec), where û
    is the decoded unit vector. Rescaling by ‖û‖ makes the decoded vector's norm exact, which
    halves the bias of q·k inner products (attention logits) compared with storing ‖x‖.
Decode: codebook lookup, inverse rotation, multiply by the stored norm, add the mean back.
All arithmetic is float32 whatever the input dtype.
"""

from dataclasses import dataclass
from functools import lru_cache
from typing import Callable

import mlx.core as mx

from promptvault.codec.codebook import codebook
from promptvault.codec.packing import pack_bits, packed_width, unpack_bits
from promptvault.codec.rotation import random_signs, rotate, rotation_blocks, unrotate
from promptvault.codec.spec import CodecSpec

_FP16_MAX = 65504.0
_TINY = 1e-30


@dataclass(frozen=True)
class _Block:
    """One rotation block of a head dim, with its compiled encode and decode steps."""

    offset: int
    size: int
    encode: Callable[[mx.array], tuple[mx.array, mx.array]]
    decode: Callable[[mx.array, mx.array], mx.array]


def _lookup(table: mx.array, codes: mx.array) -> mx.array:
    """table[codes] as a gather along the last axis of the broadcast table: on the CPU several
    times faster than mx.take of the flat table."""
    return mx.take_along_axis(table.reshape((1,) * (codes.ndim - 1) + (-1,)), codes, axis=-1)


def _make_block(offset: int, size: int, bits: int, signs: mx.array) -> _Block:
    centroids, boundaries = codebook(size, bits)
    table = mx.array(centroids)
    thresholds = [float(b) for b in boundaries]

    def encode_block(block: mx.array) -> tuple[mx.array, mx.array]:
        norm = mx.sqrt(mx.sum(block * block, axis=-1, keepdims=True))
        rotated = rotate(block / mx.maximum(norm, _TINY), signs)
        # Index of the nearest centroid = number of boundaries below the value. Comparing with
        # constant thresholds fuses into one pass; a gather-based search is far slower on CPU.
        codes = (rotated > thresholds[0]).astype(mx.uint8)
        for threshold in thresholds[1:]:
            codes = codes + (rotated > threshold).astype(mx.uint8)
        decoded = _lookup(table, codes)
        decoded_norm = mx.sqrt(mx.sum(decoded * decoded, axis=-1, keepdims=True))
        return codes, norm / mx.maximum(decoded_norm, _TINY)

    def decode_block(codes: mx.array, norm: mx.array) -> mx.array:
        return unrotate(_lookup(table, codes), signs) * norm

    return _Block(offset, size, mx.compile(encode_block), mx.compile(decode_block))


@lru_cache(maxsize=None)
def _blocks(dim: int, bits: int, seed: int) -> tuple[_Block, ...]:
    """The rotation blocks of a head dim with their signs and codebooks, built once."""
    signs = random_signs(dim, seed)
    blocks = []
    offset = 0
    for size in rotation_blocks(dim):
        blocks.append(_make_block(offset, size, bits, mx.array(signs[offset : offset + size])))
        offset += size
    return tuple(blocks)


def _code(values: mx.array, bits: int, seed: int) -> tuple[mx.array, mx.array]:
    """Packed codes and corrected norms (..., blocks) of vectors (..., n) in rotation blocks."""
    code_blocks, norm_blocks = [], []
    for block in _blocks(values.shape[-1], bits, seed):
        codes, norm = block.encode(values[..., block.offset : block.offset + block.size])
        code_blocks.append(codes)
        norm_blocks.append(norm)
    codes = code_blocks[0] if len(code_blocks) == 1 else mx.concatenate(code_blocks, axis=-1)
    return pack_bits(codes, bits), mx.concatenate(norm_blocks, axis=-1)


def _uncode(packed: mx.array, norms: mx.array, bits: int, seed: int, dim: int) -> mx.array:
    codes = unpack_bits(packed, bits, dim)
    parts = []
    for index, block in enumerate(_blocks(dim, bits, seed)):
        parts.append(block.decode(codes[..., block.offset : block.offset + block.size], norms[..., index : index + 1]))
    return parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)


def _other_channels(channels: mx.array, dim: int) -> mx.array:
    """The channel indices (ascending) not in `channels` (..., 1, k)."""
    every = mx.arange(dim, dtype=mx.int32)
    chosen = mx.any(channels[..., :, None] == every, axis=-2)  # (..., 1, dim)
    return mx.sort(mx.where(chosen, every + dim, every), axis=-1)[..., : dim - channels.shape[-1]]


def channel_order(channels: mx.array, dim: int) -> mx.array:
    """(..., 1, dim) int32: the channel each coordinate of the decoded parts belongs to, in the
    order they are stored: the outlier channels, then the others ascending."""
    hi = channels.astype(mx.int32)
    return mx.concatenate([hi, _other_channels(hi, dim)], axis=-1)


def _gather(values: mx.array, channels: mx.array) -> mx.array:
    index = mx.broadcast_to(channels, (*values.shape[:-1], channels.shape[-1]))
    return mx.take_along_axis(values, index, axis=-1)


def outlier_channels(x: mx.array, mean: mx.array | None, spec: CodecSpec) -> mx.array:
    """(..., 1, k) int32, ascending: the k channels of each head with the most energy over the
    tokens of x minus its stored mean (`centered`). Reads x itself, in one fused pass, rather
    than the float32 centered copy: the GPU encode never makes that copy."""
    k = spec.outlier_channels(x.shape[-1])
    energy = _energy(x) if mean is None else _centered_energy(x, mean)
    return mx.sort(mx.argsort(-energy, axis=-1)[..., :k], axis=-1).astype(mx.int32)


@mx.compile
def _energy(x: mx.array) -> mx.array:
    v = x.astype(mx.float32)
    return mx.mean(v * v, axis=-2, keepdims=True)


@mx.compile
def _centered_energy(x: mx.array, mean: mx.array) -> mx.array:
    v = x.astype(mx.float32) - mean.astype(mx.float32)
    return mx.mean(v * v, axis=-2, keepdims=True)


def centered(x: mx.array, spec: CodecSpec) -> tuple[mx.array, mx.array | None]:
    """x in float32 minus its stored per-head mean over the tokens, and that mean (None when the
    spec does not center). The mean is stored in the input's dtype: float16 / bfloat16 caches
    keep 2 bytes per channel; float32 ones 4 (choosing float16 where the mean fits would wait
    for the device on every tensor, and a warm step's tensors must encode as one lazy graph).
    Any stored dtype decodes, so shards with float16 means of float32 caches stay readable. The
    stored (rounded) mean is what is subtracted, so decode adds back exactly what was removed."""
    values = x.astype(mx.float32)
    if not spec.center:
        return values, None
    mean = _token_mean(x)
    return values - mean.astype(mx.float32), mean


@mx.compile
def _token_mean(x: mx.array) -> mx.array:
    return mx.mean(x.astype(mx.float32), axis=-2, keepdims=True).astype(x.dtype)


def encode_arrays(x: mx.array, spec: CodecSpec) -> dict[str, mx.array]:
    """Coded arrays of x (..., T, d); see the module docstring for what they hold. A tensor of
    many rows (e.g. every layer of a block stacked) is coded in cache-sized pieces of whole rows
    (a row's mean and channel choice need all its tokens); each row's bytes do not depend on
    the piece it falls in."""
    lead, tokens, dim = x.shape[:-2], x.shape[-2], x.shape[-1]
    rows = 1
    for n in lead:
        rows *= n
    per_rows = max(1, _PIECE // (tokens * dim))
    if rows * tokens * dim <= _SPLIT_ABOVE or rows <= per_rows or not _on_cpu():
        arrays = _encode_piece(x, spec)
    else:
        flat = x.reshape(rows, tokens, dim)
        pieces = [_encode_piece(flat[r : r + per_rows], spec) for r in range(0, rows, per_rows)]
        arrays = {name: mx.concatenate([p[name] for p in pieces], axis=0).reshape(*lead, *pieces[0][name].shape[-2:])
                  for name in pieces[0]}
    if spec.norm_bits == 16:
        arrays.update(stored_norms(arrays["norms"]))  # one overflow check for the whole tensor
    return arrays


def _encode_piece(x: mx.array, spec: CodecSpec) -> dict[str, mx.array]:
    dim = x.shape[-1]
    values, mean = centered(x, spec)
    arrays = {} if mean is None else {"mean": mean}
    if spec.outliers:
        # Outlier split: the highest-energy channels of each head get their own rotation, norm
        # and finer codebook; channel indices ascending, stored once per head.
        hi = outlier_channels(x, mean, spec)
        lo = _other_channels(hi, dim)
        arrays["channels"] = hi.astype(mx.uint8 if dim <= 256 else mx.uint16)
        codes_hi, norms_hi = _code(_gather(values, hi), spec.outlier_bits, spec.seed)
        codes_lo, norms_lo = _code(_gather(values, lo), spec.bits, spec.seed)
        arrays["codes"] = mx.concatenate([codes_hi, codes_lo], axis=-1)
        norms = mx.concatenate([norms_hi, norms_lo], axis=-1)
    else:
        arrays["codes"], norms = _code(values, spec.bits, spec.seed)
    if spec.norm_bits == 8:
        arrays.update(_log_norms(norms))
    else:
        arrays["norms"] = norms.astype(mx.float16)  # checked by encode_arrays
    return arrays


def stored_norms(norms: mx.array) -> dict[str, mx.array]:
    """The stored form of corrected norms (..., T, blocks): float16 norms as they are, after
    checking they did not overflow (the one host sync of an encode, and only of specs with
    16-bit norms: a stored inf would decode to garbage), or float32 norms as 8-bit log norms."""
    if norms.dtype != mx.float16:
        return _log_norms(norms)
    if not mx.all(mx.isfinite(norms)).item():
        raise ValueError("vector norms overflow the float16 norm (above 65504); use lossless coding "
                         "or 8-bit norms (norm_bits=8)")
    return {"norms": norms}


_LOG_LEVELS = 254  # codes 1..255 cover [lo, hi] in log space; 0 means a zero norm


def _log_norms(norms: mx.array) -> dict[str, mx.array]:
    """8-bit log-scale norms: per head and rotation block, the range [lo, hi] of log-norms over
    the tokens is split into 254 steps. lo and step are stored as one float32 array
    "norm_range" (..., 1, 2 · blocks): one tensor, not two, since every tensor costs a header
    entry in every shard."""
    positive = norms > 0
    log_norms = mx.log(mx.maximum(norms, _TINY))
    lo = mx.min(mx.where(positive, log_norms, mx.inf), axis=-2, keepdims=True)
    hi = mx.max(mx.where(positive, log_norms, -mx.inf), axis=-2, keepdims=True)
    lo = mx.where(mx.isfinite(lo), lo, 0.0)  # a head whose vectors are all zero
    step = mx.maximum((mx.maximum(hi, lo) - lo) / _LOG_LEVELS, 1e-12)
    levels = mx.clip(mx.round((log_norms - lo) / step), 0, _LOG_LEVELS) + 1
    return {
        "norms": mx.where(positive, levels, 0).astype(mx.uint8),
        "norm_range": mx.concatenate([lo, step], axis=-1).astype(mx.float32),
    }


def _norm_values(arrays: dict[str, mx.array]) -> mx.array:
    norms = arrays["norms"]
    if norms.dtype == mx.float16:
        return norms.astype(mx.float32)
    blocks = norms.shape[-1]
    lo, step = arrays["norm_range"][..., :blocks], arrays["norm_range"][..., blocks:]
    values = mx.exp(lo + (norms.astype(mx.float32) - 1) * step)
    return mx.where(norms > 0, values, 0.0)


# Elements decoded (or encoded) per piece on the CPU: the pure-MLX path makes several passes over
# float32 intermediates, which stay in the cache when a piece is small enough (a stacked tensor of
# every layer, decoded whole, runs slower than the same bytes in pieces); each piece also pays
# ~30 op dispatches, so smaller pieces lose again (2^15 decoded SmolLM2's keys ~1.5x slower).
_PIECE = 1 << 17
# Below this many elements the per-piece graph costs more than the cache saves.
_SPLIT_ABOVE = 1 << 18


def _on_cpu() -> bool:
    """Pieces help only the CPU: on a GPU they would turn a few large launches into thousands."""
    return mx.default_device() == mx.cpu


def decode_arrays(arrays: dict[str, mx.array], spec: CodecSpec, dim: int, dtype: mx.Dtype) -> mx.array:
    """Inverse of `encode_arrays`, in `dtype`. Any leading shape: a stacked (layers, batch,
    heads, T, d) tensor decodes in one call, in cache-sized pieces of rows and tokens. Every
    step is per vector with a fixed order of operations, so a vector decodes to the same bits
    whatever is decoded with it (and whichever piece it falls in)."""
    codes = arrays["codes"]
    lead, tokens = codes.shape[:-2], codes.shape[-2]
    rows = 1
    for n in lead:
        rows *= n
    if rows * tokens * dim <= _SPLIT_ABOVE or not _on_cpu():
        return _decode_piece(arrays, spec, dim, dtype)
    flat = {name: a.reshape(rows, a.shape[-2], a.shape[-1]) for name, a in arrays.items()}
    per_rows = max(1, _PIECE // (tokens * dim))
    per_tokens = tokens if per_rows > 1 else max(1, _PIECE // dim)
    out = []
    for r in range(0, rows, per_rows):
        cols = []
        for t in range(0, tokens, per_tokens):
            piece = {name: a[r : r + per_rows, t : t + per_tokens] if a.shape[-2] == tokens and name in ("codes", "norms")
                     else a[r : r + per_rows] for name, a in flat.items()}
            cols.append(_decode_piece(piece, spec, dim, dtype))
        out.append(cols[0] if len(cols) == 1 else mx.concatenate(cols, axis=-2))
    whole = out[0] if len(out) == 1 else mx.concatenate(out, axis=0)
    return whole.reshape(*lead, tokens, dim)


def _decode_piece(arrays: dict[str, mx.array], spec: CodecSpec, dim: int, dtype: mx.Dtype) -> mx.array:
    norms = _norm_values(arrays)
    if spec.outliers:
        k = arrays["channels"].shape[-1]
        width, n_hi = packed_width(k, spec.outlier_bits), len(rotation_blocks(k))
        x_hi = _uncode(arrays["codes"][..., :width], norms[..., :n_hi], spec.outlier_bits, spec.seed, k)
        x_lo = _uncode(arrays["codes"][..., width:], norms[..., n_hi:], spec.bits, spec.seed, dim - k)
        inverse = mx.argsort(channel_order(arrays["channels"], dim), axis=-1)
        out = _gather(mx.concatenate([x_hi, x_lo], axis=-1), inverse)
    else:
        out = _uncode(arrays["codes"], norms, spec.bits, spec.seed, dim)
    if "mean" in arrays:
        return _add_mean_cast(out, arrays["mean"], dtype)
    return out.astype(dtype)


@lru_cache(maxsize=None)
def _mean_adder(dtype: mx.Dtype):
    """out + mean in float32, then the cast to `dtype`: one fused pass."""
    return mx.compile(lambda out, mean: (out + mean.astype(mx.float32)).astype(dtype))


def _add_mean_cast(out: mx.array, mean: mx.array, dtype: mx.Dtype) -> mx.array:
    return _mean_adder(dtype)(out, mean)
