"""Dense bit packing of b-bit codes (1 ≤ b ≤ 8) as bit-planes: exactly b bits per code.

For each vector of n codes we store b planes of ceil(n/8) bytes; plane j holds bit j of every
code. This wastes nothing for any b (unlike 10 three-bit codes per uint32), is pure MLX (shifts
and sums), and packs each vector on its own, so a range of tokens can be sliced out of a packed
array without re-packing.
"""

from functools import lru_cache

import mlx.core as mx

# Built from data, not with mx.arange: a lazy op made at import is bound to the importing
# thread's stream, and evaluating it from another thread (a server's MLX thread) fails with
# "There is no Stream(cpu, 0) in current thread".
_SHIFTS = mx.array(list(range(8)), dtype=mx.uint8)


def packed_width(n: int, bits: int) -> int:
    """Bytes that n codes of `bits` bits take."""
    return bits * ((n + 7) // 8)


# Both directions are one compiled elementwise pass each: the sums over bit-planes (pack: over
# the 8 codes of a byte) are written out term by term instead of as reductions, so MLX fuses
# the shifts, masks and adds into a single loop over the data (on the CPU, several times faster
# than materialising the (..., bits, groups, 8) intermediate and reducing it).


@lru_cache(maxsize=None)
def _pack_fn(bits: int):
    def pack(groups: mx.array) -> mx.array:  # (..., groups, 8) uint8 codes -> (..., bits, groups)
        planes = []
        for q in range(bits):
            byte = (groups[..., 0] >> q) & 1
            for i in range(1, 8):
                byte = byte | (((groups[..., i] >> q) & 1) << i)
            planes.append(byte)
        return mx.stack(planes, axis=-2)

    return mx.compile(pack)


@lru_cache(maxsize=None)
def _unpack_fn(bits: int):
    def unpack(planes: mx.array) -> mx.array:  # (..., bits, groups, 1) -> (..., groups, 8)
        codes = (planes[..., 0, :, :] >> _SHIFTS) & 1
        for q in range(1, bits):
            codes = codes | (((planes[..., q, :, :] >> _SHIFTS) & 1) << q)
        return codes

    return mx.compile(unpack)


def pack_bits(codes: mx.array, bits: int) -> mx.array:
    """(..., n) uint8 codes < 2**bits → (..., bits * ceil(n/8)) uint8."""
    n = codes.shape[-1]
    pad = (-n) % 8
    if pad:
        codes = mx.pad(codes, [(0, 0)] * (codes.ndim - 1) + [(0, pad)])
    lead = codes.shape[:-1]
    groups = codes.shape[-1] // 8
    packed = _pack_fn(bits)(codes.reshape(*lead, groups, 8))
    return packed.reshape(*lead, bits * groups)


def unpack_bits(packed: mx.array, bits: int, n: int) -> mx.array:
    """Inverse of `pack_bits`: (..., bits * ceil(n/8)) uint8 → (..., n) uint8 codes."""
    lead = packed.shape[:-1]
    groups = packed.shape[-1] // bits
    codes = _unpack_fn(bits)(packed.reshape(*lead, bits, groups, 1)).reshape(*lead, groups * 8)
    return codes if groups * 8 == n else codes[..., :n]
