"""A coded tensor: named arrays plus what is needed to decode them (spec, shape, dtype)."""

from dataclasses import dataclass

import mlx.core as mx

from promptvault.codec.spec import CodecSpec

DTYPES = {"float16": mx.float16, "bfloat16": mx.bfloat16, "float32": mx.float32}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}

# Arrays indexed by token on axis -2; anything else (e.g. "mean") is shared by all tokens.
_PER_TOKEN = ("codes", "norms", "data")


@dataclass(frozen=True)
class Encoded:
    """Output of `encode`: flat named arrays (what goes into a shard) and their JSON meta.

    TurboQuant arrays: "codes" (..., T, packed bytes) uint8, "norms" (..., T, blocks) float16
    (or uint8 log-norms with their "norm_range" (..., 1, 2 · blocks) float32 when the spec has
    norm_bits=8), and "mean" (..., 1, d) when the spec centers (float16 for float32 input when it fits, else the
    input dtype; readers accept any float dtype), and "channels" (..., 1, outliers) uint8 (uint16
    above head dim 256) with an outlier split.
    Lossless: "data".
    """

    spec: CodecSpec
    shape: tuple[int, ...]
    dtype: mx.Dtype
    arrays: dict[str, mx.array]

    @property
    def tokens(self) -> int:
        return self.shape[-2]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.arrays.values())

    def meta(self) -> dict:
        return {"spec": self.spec.to_json(), "shape": list(self.shape), "dtype": DTYPE_NAMES[self.dtype]}

    @classmethod
    def from_parts(cls, meta: dict, arrays: dict[str, mx.array]) -> "Encoded":
        """Rebuild from a shard's meta and arrays, checking that the arrays fit the meta."""
        spec = CodecSpec.from_json(meta["spec"])
        shape = tuple(int(s) for s in meta["shape"])
        if meta["dtype"] not in DTYPES:
            raise ValueError(f"unknown dtype {meta['dtype']!r} in codec metadata")
        expected = {"data"} if spec.lossless else (
            {"codes", "norms"} | ({"mean"} if spec.center else set())
            | ({"norm_range"} if spec.norm_bits == 8 else set())
            | ({"channels"} if spec.outliers else set())
        )
        if set(arrays) != expected:
            raise ValueError(f"codec arrays {sorted(arrays)} do not match {spec}: expected {sorted(expected)}")
        for name in _PER_TOKEN:
            if name in arrays and tuple(arrays[name].shape[:-1]) != shape[:-1]:
                raise ValueError(f"array {name!r} has shape {arrays[name].shape}, expected leading {shape[:-1]}")
        return cls(spec=spec, shape=shape, dtype=DTYPES[meta["dtype"]], arrays=dict(arrays))

    def slice_tokens(self, start: int, stop: int) -> "Encoded":
        """Rows [start, stop) of the token axis. Codes are packed per vector: no re-packing."""
        if not 0 <= start < stop <= self.tokens:
            raise ValueError(f"token slice [{start}, {stop}) outside [0, {self.tokens})")
        arrays = {
            name: (a[..., start:stop, :] if name in _PER_TOKEN else a) for name, a in self.arrays.items()
        }
        shape = (*self.shape[:-2], stop - start, self.shape[-1])
        return Encoded(spec=self.spec, shape=shape, dtype=self.dtype, arrays=arrays)
