"""Dense bit packing of b-bit codes (1 ≤ b ≤ 8) as bit-planes: exactly b bits per code.

For each vector of n codes we store b planes of ceil(n/8) bytes; plane j holds bit j of every
code. This wastes nothing for any b (unlike 10 three-bit codes per uint32), is pure MLX (shifts
and sums), and packs each vector on its own, so a range of tokens can be sliced out of a packed
array without re-packing.
"""

import mlx.core as mx

# Built from data, not with mx.arange: a lazy op made at import is bound to the importing
# thread's stream, and evaluating it from another thread (a server's MLX thread) fails with
# "There is no Stream(cpu, 0) in current thread".
_BIT_WEIGHTS = mx.array([1 << i for i in range(8)], dtype=mx.uint32)
_SHIFTS = mx.array(list(range(8)), dtype=mx.uint8)


def packed_width(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take."""
    return bits * ((n + 7) // 8)


def pack_bits(codes: mx.array, bits: int) -> mx.array:
    """(..., n) uint8 codes < 2**bits → (..., bits * ceil(n/8)) uint8."""
    n = codes.shape[-1]
    pad = (-n) % 8
    if pad:
        codes = mx.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    lead = codes.shape[:-1]
    groups = codes.shape[-1] // 8
    plane_shifts = mx.arange(bits, dtype=mx.uint8)
    # (..., bits, n) bit-planes, then 8 neighbouring bits of a plane into one byte.
    planes = (mx.expand_dims(codes, -2) >> plane_shifts[:, None]) & 1
    planes = planes.reshape(*lead, bits, groups, 8).astype(mx.uint32)
    packed = (planes * _BIT_WEIGHTS).sum(axis=-1).astype(mx.uint8)
    return packed.reshape(*lead, bits * groups)


def unpack_bits(packed: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of `pack_bits`: (..., bits * ceil(n/8)) uint8 → (..., n) uint8 codes."""
    lead = packed.shape[:-1]
    groups = packed.shape[-1] // bits
    planes = (packed.reshape(*lead, bits, groups, 1) >> _SHIFTS) & 1
    planes = planes.reshape(*lead, bits, groups * 8)
    plane_shifts = mx.arange(bits, dtype=mx.uint8)
    codes = (planes << plane_shifts[:, None]).sum(axis=-2).astype(mx.uint8)
    return codes[..., :n]
