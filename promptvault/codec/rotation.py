"""Random ±1 signs followed by a Walsh–Hadamard transform: the rotation TurboQuant relies on.

The rotation spreads outlier channels over all coordinates, so every coordinate of the rotated
unit vector follows the same known marginal and one fixed codebook fits all of them.

`mx.hadamard_transform` supports sizes m·2^k with m in {1, 12, 20, 28}. Its 20- and 28-point
matrices are orthogonal but not symmetric, so the transform is not its own inverse there: those
sizes are inverted with the explicit transposed matrix. On the CPU backend an
unsupported size is not rejected: it returns garbage or corrupts the heap (NOTES §4), so we check
sizes ourselves and never call it with anything else. Other head dims are split into blocks of
supported sizes (block-diagonal rotation, one norm per block) instead of being padded: padding
costs more bits than it saves.
"""

import hashlib
from functools import lru_cache

import mlx.core as mx
import numpy as np

_HADAMARD_BASES = (1, 12, 20, 28)


def hadamard_supported(n: int) -> bool:
    """True when n = m·2^k with m in {1, 12, 20, 28} (what mx.hadamard_transform computes)."""
    while n >= 1:
        if n in _HADAMARD_BASES:
            return True
        if n % 2:
            return False
        n //= 2
    return False


@lru_cache(maxsize=None)
def rotation_blocks(dim: int) -> tuple[int, ...]:
    """Split dim into consecutive block sizes that mx.hadamard_transform supports.

    One block when dim itself is supported; otherwise greedily the largest supported size first
    (72 → 64 + 8, 576 → 512 + 64), which keeps blocks large and their codebooks near-Gaussian.
    """
    blocks = []
    remaining = dim
    while remaining:
        size = max(n for n in range(1, remaining + 1) if hadamard_supported(n))
        blocks.append(size)
        remaining -= size
    return tuple(blocks)


@lru_cache(maxsize=None)
def random_signs(dim: int, seed: int) -> np.ndarray:
    """dim values of ±1 derived from SHA-256 in counter mode over (seed, dim).

    A hash rather than a library RNG: the stream must stay the same across numpy/MLX versions
    and platforms forever, because every stored shard depends on it.
    """
    bits = bytearray()
    counter = 0
    while len(bits) * 8 < dim:
        bits += hashlib.sha256(f"promptvault-signs/v1/{seed}/{dim}/{counter}".encode()).digest()
        counter += 1
    unpacked = np.unpackbits(np.frombuffer(bytes(bits), dtype=np.uint8))[:dim]
    signs = np.where(unpacked == 1, -1.0, 1.0).astype(np.float32)
    signs.setflags(write=False)
    return signs


def rotate(unit: mx.array, signs: mx.array) -> mx.array:
    """Orthonormal rotation of the last axis (one supported block): H · diag(signs) / sqrt(n)."""
    n = unit.shape[-1]
    if _is_power_of_two(n):
        return mx.hadamard_transform(unit * signs, scale=1.0 / float(np.sqrt(n)))
    return _kronecker_transform(unit * signs, n, transposed=False)


def _is_power_of_two(n: int) -> bool:
    return n & (n - 1) == 0


@lru_cache(maxsize=None)
def _kronecker_parts(n: int) -> tuple[np.ndarray, int]:
    """n = m·k with k a power of two and m the base of mx.hadamard_transform's matrix; that
    transform is x @ kron(H_m, H_k) / sqrt(n) with ±1 matrices. Returns (that ±1 H_m, k)."""
    for m in _HADAMARD_BASES[::-1]:
        k = n // m
        if m > 1 and n % m == 0 and k & (k - 1) == 0:
            with mx.stream(mx.cpu):
                return np.rint(np.array(mx.hadamard_transform(mx.eye(m), scale=1.0))).astype(np.int64), k
    raise ValueError(f"{n} has no Hadamard base in {_HADAMARD_BASES}")


def _kronecker_transform(x: mx.array, n: int, transposed: bool) -> mx.array:
    """x @ kron(H_m, H_k) / sqrt(n) (mx.hadamard_transform's own matrix), or its transpose (the
    inverse), for n = m·k: H_k (symmetric) as unscaled butterflies over k
    (mx.hadamard_transform), H_m (m ≤ 28) as a fixed sequence of ±1 additions, then one scale,
    as the GPU kernels do. The m-axis goes first (one copy) so each term is a contiguous array
    and MLX fuses the additions into one contiguous pass (strided or broadcast operands take a
    slow indexed loop on the CPU). The order of operations is the same for every vector: a BLAS
    product here (OpenBLAS on Linux) rounded each vector differently depending on how many
    vectors came with it, so a restore's bits depended on what else it read."""
    hm, k = _kronecker_parts(n)
    m = hm.shape[0]
    y = x.reshape(*x.shape[:-1], m, k)
    if k > 1:
        y = mx.hadamard_transform(y, scale=1.0)
    y = mx.contiguous(mx.moveaxis(y, -2, 0))
    outs = _combiner(n, transposed)(*[y[a] for a in range(m)])
    return mx.stack(outs, axis=-2).reshape(x.shape)


@lru_cache(maxsize=None)
def _combiner(n: int, transposed: bool):
    """Compiled: m arrays y[a] → m arrays out[b] = (sum_a ±y[a]) / sqrt(n), the signs H[a, b]
    (H[b, a] transposed)."""
    hm, _ = _kronecker_parts(n)
    m = hm.shape[0]
    scale = float(1.0 / np.sqrt(n))

    def combine(*ys):
        outs = []
        for b in range(m):
            signs = hm[b, :] if transposed else hm[:, b]
            acc = ys[0] if signs[0] > 0 else -ys[0]
            for a in range(1, m):
                acc = acc + ys[a] if signs[a] > 0 else acc - ys[a]
            outs.append(acc * scale)
        return outs

    return mx.compile(combine)


def unrotate(rotated: mx.array, signs: mx.array) -> mx.array:
    """Inverse of `rotate`: diag(signs) · Hᵀ / sqrt(n)."""
    n = rotated.shape[-1]
    if _is_power_of_two(n):  # the Sylvester matrix is symmetric: its own inverse
        return mx.hadamard_transform(rotated, scale=1.0 / float(np.sqrt(n))) * signs
    return _kronecker_transform(rotated, n, transposed=True) * signs


def expected_distortion(dim: int, bits: int) -> float:
    """Theory relative MSE for isotropic data: per-block Lloyd–Max distortion, weighted by size."""
    from promptvault.codec.codebook import distortion

    return sum(size * distortion(size, bits) for size in rotation_blocks(dim)) / dim
