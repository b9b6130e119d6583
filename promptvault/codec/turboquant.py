"""TurboQuant (MSE variant, arXiv 2504.19874) in pure MLX: the reference path on every device.

Per vector x: subtract the optional token mean, split into rotation blocks, and per block store
  - the b-bit Lloyd–Max codes of the rotated unit vector u = R(x / ‖x‖), bit-packed, and
  - the corrected norm ‖x‖ / ‖û‖ as float16, where û is the decoded unit vector. Rescaling by
    ‖û‖ makes the decoded vector's norm exact, which halves the bias of q·k inner products
    (attention logits) compared with storing ‖x‖.
Decode: codebook lookup, inverse rotation, multiply by the stored norm, add the mean back.
All arithmetic is float32 whatever the input dtype.
"""

from functools import lru_cache

import mlx.core as mx

from promptvault.codec.codebook import codebook
from promptvault.codec.packing import pack_bits, unpack_bits
from promptvault.codec.rotation import random_signs, rotate, rotation_blocks, unrotate
from promptvault.codec.spec import CodecSpec

_FP16_MAX = 65504.0
_TINY = 1e-30


@lru_cache(maxsize=None)
def _block_tables(dim: int, bits: int, seed: int) -> tuple[tuple[int, int, mx.array, mx.array, mx.array], ...]:
    """Per rotation block: (offset, size, signs, centroids, boundaries) as MLX arrays."""
    signs = random_signs(dim, seed)
    tables = []
    offset = 0
    for size in rotation_blocks(dim):
        centroids, boundaries = codebook(size, bits)
        tables.append(
            (offset, size, mx.array(signs[offset : offset + size]), mx.array(centroids), mx.array(boundaries))
        )
        offset += size
    return tuple(tables)


def _quantize(rotated: mx.array, boundaries: mx.array, bits: int) -> mx.array:
    """Index of the nearest centroid = number of boundaries below the value (binary search)."""
    codes = mx.zeros(rotated.shape, dtype=mx.uint32)
    for step in reversed(range(bits)):
        candidate = codes + (1 << step)
        codes = mx.where(rotated > mx.take(boundaries, candidate - 1), candidate, codes)
    return codes


def encode_arrays(x: mx.array, spec: CodecSpec) -> dict[str, mx.array]:
    """Coded arrays of x (..., T, d); see the module docstring for what they hold."""
    dim = x.shape[-1]
    values = x.astype(mx.float32)
    arrays = {}
    if spec.center:
        mean = mx.mean(values, axis=-2, keepdims=True).astype(x.dtype)
        arrays["mean"] = mean
        # Subtract the stored (rounded) mean so decode adds back exactly what was removed.
        values = values - mean.astype(mx.float32)
    code_blocks, norm_blocks = [], []
    for offset, size, signs, centroids, boundaries in _block_tables(dim, spec.bits, spec.seed):
        block = values[..., offset : offset + size]
        norm = mx.sqrt(mx.sum(block * block, axis=-1, keepdims=True))
        rotated = rotate(block / mx.maximum(norm, _TINY), signs)
        codes = _quantize(rotated, boundaries, spec.bits)
        decoded = mx.take(centroids, codes)
        decoded_norm = mx.sqrt(mx.sum(decoded * decoded, axis=-1, keepdims=True))
        code_blocks.append(codes.astype(mx.uint8))
        norm_blocks.append(norm / mx.maximum(decoded_norm, _TINY))
    norms = mx.concatenate(norm_blocks, axis=-1)
    if mx.max(norms).item() > _FP16_MAX:
        raise ValueError(
            f"vector norms up to {mx.max(norms).item():.3g} overflow the float16 norm; use lossless coding"
        )
    codes = code_blocks[0] if len(code_blocks) == 1 else mx.concatenate(code_blocks, axis=-1)
    arrays["codes"] = pack_bits(codes, spec.bits)
    arrays["norms"] = norms.astype(mx.float16)
    return arrays


def decode_arrays(arrays: dict[str, mx.array], spec: CodecSpec, dim: int, dtype: mx.Dtype) -> mx.array:
    """Inverse of `encode_arrays`, in `dtype`."""
    codes = unpack_bits(arrays["codes"], spec.bits, dim).astype(mx.uint32)
    norms = arrays["norms"].astype(mx.float32)
    parts = []
    for index, (offset, size, signs, centroids, _) in enumerate(_block_tables(dim, spec.bits, spec.seed)):
        decoded = mx.take(centroids, codes[..., offset : offset + size])
        parts.append(unrotate(decoded, signs) * norms[..., index : index + 1])
    out = parts[0] if len(parts) == 1 else mx.concatenate(parts, axis=-1)
    if "mean" in arrays:
        out = out + arrays["mean"].astype(mx.float32)
    return out.astype(dtype)
