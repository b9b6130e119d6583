"""Layout plans: which head dims and specs the kernels take, how a vector's coordinates map to the
lanes of a SIMD group, and how a coded vector splits into parts (the whole vector, or the outlier
channels and the others of an outlier split).

Each vector (or part) is handled by L lanes of one SIMD group (L = min(32, 2^k) for a part of
dim d = m·2^k), lane `l` holding the E = d/L coordinates i = j·L + l (or, in the contiguous
layout, i = l·E + j).
"""

from __future__ import annotations

import os
from dataclasses import dataclass

import mlx.core as mx
import numpy as np

from promptvault.codec.rotation import rotation_blocks
from promptvault.codec.spec import CodecSpec

TG = 256  # threads per threadgroup (a multiple of the SIMD width 32)
_MAX_DIM = 1024
_MAX_ELEMS = 2**31 - 1


@dataclass
class Knobs:
    """Tuning of the plan decode kernel, read when a kernel is built (`promptvault bench kernels
    --sweep` varies them; tests set them). decode_v2: plain specs use the plan kernel too (measured by
    `promptvault bench kernels --sweep`); warps: warps launched at most (each loops over its
    items); unroll: items per loop iteration (all their loads issued before the first is
    computed); contiguous_max_e: contiguous layout up to E coordinates per lane."""

    decode_v2: bool = os.environ.get("PROMPTVAULT_DECODE_V2", "0").strip() == "1"
    warps: int = int(os.environ.get("PROMPTVAULT_DECODE_WARPS", "65536"))
    unroll: int = int(os.environ.get("PROMPTVAULT_DECODE_UNROLL", "1"))
    contiguous_max_e: int = int(os.environ.get("PROMPTVAULT_CONTIGUOUS_MAX_E", "8"))


KNOBS = Knobs()


def lane_layout(dim: int) -> tuple[int, int, int, int] | None:
    """(m, K2, L, E) for a head dim the kernels handle: one rotation block d = m·K2 with m in
    {1, 12, 20, 28} and K2 = 2^k ≥ 8 (so a byte of a bit-plane lies within one lane group),
    d ≤ 1024. None otherwise."""
    if dim > _MAX_DIM or rotation_blocks(dim) != (dim,):
        return None
    for m in (1, 12, 20, 28):
        k2 = dim // m
        if dim % m == 0 and k2 >= 8 and k2 & (k2 - 1) == 0:
            lanes = min(32, k2)
            return m, k2, lanes, dim // lanes
    return None


def supports(spec: CodecSpec, dim: int, dtype, size: int = 0) -> bool:
    """True when the fused kernels compute exactly what the reference does for this spec,
    head dim, dtype and element count. Options the kernels do not know (e.g. a CodecSpec field
    added later) must be at their defaults: the spec must equal one rebuilt from the known fields.
    With an outlier split, both sub-vectors (the outlier channels and the others) must have a
    layout the kernels handle: head dim 128 → 32 + 96, 256 → 64 + 192 (64 → 16 + 48: not)."""
    if spec.lossless or not 1 <= spec.bits <= 8 or spec.norm_bits not in (8, 16):
        return False
    try:
        known = CodecSpec(bits=spec.bits, seed=spec.seed, center=spec.center, norm_bits=spec.norm_bits,
                          outliers=spec.outliers, outlier_bits=spec.outlier_bits)
    except (TypeError, ValueError):
        return False
    if known != spec:
        return False
    if dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return False
    if size >= _MAX_ELEMS or lane_layout(dim) is None and not spec.outliers:
        return False
    if spec.outliers:
        try:
            k = spec.outlier_channels(dim)
        except ValueError:
            return False
        # channel indices are stored as uint8 up to head dim 256 (uint16 above): the kernels read uint8
        return dim <= 256 and lane_layout(k) is not None and lane_layout(dim - k) is not None
    return True


@dataclass(frozen=True)
class KernelConfig:
    """One rotation-coded (sub-)vector: its dim, bits, sign seed, centering, norm format."""

    dim: int
    bits: int
    seed: int
    center: bool
    norm_bits: int

    @property
    def layout(self):
        return lane_layout(self.dim)

    @property
    def width(self) -> int:  # packed bytes per vector
        return self.bits * (self.dim // 8)


@dataclass(frozen=True)
class DecodePart:
    """One rotation-coded sub-vector of a stored vector: `cfg` (its dim, bits, seed, norm
    format), its codes at byte `code_offset` of the vector's codes, its norm at index
    `norm_index` of the vector's norms, its coordinates at channels
    `perm[chan_offset : chan_offset + cfg.dim]` (or channels 0..d-1 when `chan_offset` is None).
    Encode reads a part from the same places decode writes it to."""

    cfg: KernelConfig
    code_offset: int
    norm_index: int
    chan_offset: int | None


@dataclass(frozen=True)
class DecodePlan:
    """How a stored vector of one spec splits into parts (also the encode plan of a split)."""

    dim: int  # the full head dim
    center: bool
    norm_bits: int
    width: int  # packed bytes per vector, all parts
    parts: tuple[DecodePart, ...]
    unroll: int = 1

    @property
    def n_norms(self) -> int:
        return len(self.parts)

    @property
    def permuted(self) -> bool:
        return self.parts[0].chan_offset is not None


def decode_plan(spec: CodecSpec, dim: int, unroll: int | None = None) -> DecodePlan:
    """The parts a vector of `spec` decodes from (call only where `supports` is true)."""
    unroll = KNOBS.unroll if unroll is None else unroll
    if not spec.outliers:
        cfg = KernelConfig(dim, spec.bits, spec.seed, spec.center, spec.norm_bits)
        return DecodePlan(dim, spec.center, spec.norm_bits, cfg.width, (DecodePart(cfg, 0, 0, None),), unroll)
    k = spec.outlier_channels(dim)
    hi = KernelConfig(k, spec.outlier_bits, spec.seed, False, spec.norm_bits)
    lo = KernelConfig(dim - k, spec.bits, spec.seed, False, spec.norm_bits)
    return DecodePlan(dim, spec.center, spec.norm_bits, hi.width + lo.width,
                      (DecodePart(hi, 0, 0, 0), DecodePart(lo, hi.width, 1, k)), unroll)


def uses_plan_kernel(spec: CodecSpec) -> bool:
    """Decode of `spec` runs the plan kernel (not yet checked on a GPU: `use_fused` checks it
    against the reference before first use) rather than the H100-checked plain kernel."""
    return bool(spec.outliers) or KNOBS.decode_v2


def contiguous(cfg: KernelConfig) -> bool:
    """Plain decode kernel layout: for power-of-two d ≤ 128, lane l holds the E ≤ 4 adjacent
    coordinates i = l·E + j (one byte load per bit-plane); otherwise i = j·L + l. On the GPU
    (docs/speed.md) it is faster at d = 64 / 128 and slower at d = 256 (E = 8: a warp's stores
    spread over 16-byte strides), so d = 256 keeps the strided layout."""
    m, k2, lanes, e = cfg.layout
    return m == 1 and lanes == 32 and e <= 4


def contiguous_v2(cfg: KernelConfig) -> bool:
    """Plan-kernel layout: for power-of-two d with E = d/32 ≤ KNOBS.contiguous_max_e, lane l holds
    the E adjacent coordinates i = l·E + j (one byte load per bit-plane, one vector store of E
    values); otherwise i = j·L + l (strided)."""
    m, k2, lanes, e = cfg.layout
    return m == 1 and lanes == 32 and e <= KNOBS.contiguous_max_e


def word_loads(plan: DecodePlan, part: DecodePart) -> bool:
    """Strided layout: each bit-plane read as 32-bit words (broadcast to the lane group) instead
    of one byte per coordinate; needs 4-byte alignment of every plane of every vector."""
    nb = part.cfg.dim // 8
    return plan.width % 4 == 0 and part.code_offset % 4 == 0 and nb % 4 == 0 and part.cfg.layout[2] >= 8


def arrays_fit(arrays: dict[str, mx.array], spec: CodecSpec, dim: int) -> bool:
    """The coded arrays have exactly the shapes and dtypes the kernels index (a kernel must
    never read out of bounds, whatever a shard says; stored channel indices are clamped to the
    head dim in the kernel)."""
    plan = decode_plan(spec, dim)
    codes, norms = arrays.get("codes"), arrays.get("norms")
    if codes is None or norms is None or codes.dtype != mx.uint8 or codes.ndim < 2:
        return False
    lead = tuple(codes.shape[:-1])
    if codes.shape[-1] != plan.width or tuple(norms.shape) != (*lead, plan.n_norms):
        return False
    if norms.dtype != (mx.float16 if spec.norm_bits == 16 else mx.uint8):
        return False
    one = (*lead[:-1], 1)
    if spec.norm_bits == 8:
        rng = arrays.get("norm_range")
        if rng is None or rng.dtype != mx.float32 or tuple(rng.shape) != (*one, 2 * plan.n_norms):
            return False
    if spec.center:
        mean = arrays.get("mean")
        if mean is None or tuple(mean.shape) != (*one, dim):
            return False
    if plan.permuted:
        chans = arrays.get("channels")
        k = plan.parts[0].cfg.dim
        if chans is None or chans.dtype != mx.uint8 or tuple(chans.shape) != (*one, k):
            return False
    return True


def identity_map(n: int) -> np.ndarray:
    """The row map of a plain decode: row t is token t of segment 0."""
    out = np.zeros((n, 2), dtype=np.int32)
    out[:, 0] = np.arange(n)
    return out


def grid(n_vectors: int, lanes: int) -> tuple[int, int, int]:
    """Threads (rounded up to whole threadgroups) for n_vectors of `lanes` lanes each."""
    threads = n_vectors * lanes
    return ((threads + TG - 1) // TG * TG, 1, 1)
