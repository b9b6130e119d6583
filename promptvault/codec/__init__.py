"""The codec: TurboQuant (random signs + Walsh–Hadamard rotation + Lloyd–Max codes + corrected
float16 norm) or lossless, for tensors of vectors (..., T, d) in float16 / bfloat16 / float32.

    enc = encode(keys, CodecSpec(bits=3))
    keys_hat = decode(enc)          # same shape and dtype as keys
"""

import mlx.core as mx
import numpy as np

from promptvault.codec.encoded import DTYPE_NAMES, Encoded
from promptvault.codec.spec import LOSSLESS, CodecSpec, KVCodec
from promptvault.codec.turboquant import decode_arrays, encode_arrays
from promptvault.codec import kernels  # noqa: E402  (after the modules it uses)

__all__ = ["CodecSpec", "KVCodec", "LOSSLESS", "Encoded", "encode", "decode", "bytes_per_vector"]


def _check_input(x) -> None:
    if not isinstance(x, mx.array):
        raise ValueError(f"expected an mx.array, got {type(x).__name__}")
    if x.dtype not in DTYPE_NAMES:
        raise ValueError(f"dtype {x.dtype} is not supported: use float16, bfloat16 or float32")
    if x.ndim < 2:
        raise ValueError(f"expected shape (..., tokens, head_dim), got {tuple(x.shape)}")
    if x.size == 0:
        raise ValueError(f"cannot encode an empty array of shape {tuple(x.shape)}")
    if x.shape[-1] < 2:
        raise ValueError(f"head dim must be at least 2, got {x.shape[-1]}")


def encode(x: mx.array, spec: CodecSpec) -> Encoded:
    """Code x (..., T, d) with spec. Raises ValueError naming the problem for bad input."""
    _check_input(x)
    if spec.lossless:
        arrays = {"data": x}
    elif lang := kernels.use_fused(spec, x.shape[-1], x.dtype, x.size):
        arrays = kernels.encode_arrays_with(lang, x, spec)  # one GPU pass (codec/kernels/)
    else:
        arrays = encode_arrays(x, spec)
    return Encoded(spec=spec, shape=tuple(x.shape), dtype=x.dtype, arrays=arrays)


def decode(enc: Encoded) -> mx.array:
    """The tensor `enc` was made from (exactly, when lossless), in its original dtype."""
    if enc.spec.lossless:
        return enc.arrays["data"]
    dim = enc.shape[-1]
    lang = kernels.use_fused(enc.spec, dim, enc.dtype, int(np.prod(enc.shape)))
    if lang and kernels.arrays_fit(enc.arrays, enc.spec, dim):
        return kernels.decode_rows_with(lang, [enc.arrays], enc.spec, dim, enc.dtype,
                                        kernels.identity_map(enc.tokens), enc.tokens)
    return decode_arrays(enc.arrays, enc.spec, dim, enc.dtype)


def bytes_per_vector(dim: int, spec: CodecSpec, dtype_bytes: int = 2) -> float:
    """Bytes one d-dim vector takes on disk (codes + norms; per-tensor extras such as a stored
    mean or the log-norm range are not per vector and not counted here)."""
    if spec.lossless:
        return dim * dtype_bytes
    from promptvault.codec.packing import packed_width
    from promptvault.codec.rotation import rotation_blocks

    def coded(n: int, bits: int) -> int:  # n channels: codes + one norm per rotation block
        return packed_width(n, bits) + spec.norm_bits // 8 * len(rotation_blocks(n))

    if spec.outliers:
        k = spec.outlier_channels(dim)
        return coded(k, spec.outlier_bits) + coded(dim - k, spec.bits)
    return coded(dim, spec.bits)
