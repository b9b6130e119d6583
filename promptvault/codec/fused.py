"""Fused GPU kernels for the TurboQuant codec: encode and decode each in one pass over the data.

Encode (one launch): load x (minus the stored mean when centered), norm, random signs,
Walsh–Hadamard rotation, codebook search, corrected norm, bit-plane packing.
Decode (one launch): unpack, codebook lookup, inverse rotation, signs, norm (float16 or 8-bit log),
mean, cast, written straight into the destination rows (a whole layer's cache buffer at restore).

One kernel body serves CUDA (`mx.fast.cuda_kernel`) and Metal (`mx.fast.metal_kernel`): the body
uses a few macros (PV_SHFL_XOR, PV_BALLOT, PV_SQRT, ...) that each language's header defines,
plus a language prologue that names the thread indices.

Layout: each vector is handled by L lanes of one SIMD group (L = min(32, 2^k) for head dim
d = m·2^k), lane `l` holding the E = d/L coordinates i = j·L + l. The rotation
x ↦ x · (M_m ⊗ H_{2^k}) / √d (the exact matrix mx.hadamard_transform applies, M_m read from MLX
itself) factors into an in-register transform over j and log2(L) butterfly stages across lanes
(shuffles), so no shared memory and no barriers. Bit-planes are packed with a SIMD ballot.

Selection (`backend()`), once per process:
  - MLX's CUDA backend with the GPU as default device → the CUDA kernels (checked against the
    reference on an H100: README.md (Speed));
  - Metal → the kernels are compiled and compared with the reference on a small random batch
    first (`metal_self_check`); on failure one warning, then the reference for the process;
  - anything else (CPU) → the pure-MLX reference (promptvault.codec.turboquant).
`PROMPTVAULT_FUSED=0` turns the kernels off. A spec or tensor the kernels do not handle
(`supports`) always goes to the reference: an explicit capability check, not a caught error.
"""

from __future__ import annotations

import os
import threading
import warnings
from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from promptvault.codec.codebook import codebook
from promptvault.codec.rotation import random_signs, rotation_blocks
from promptvault.codec.spec import CodecSpec

_TG = 256  # threads per threadgroup (a multiple of the SIMD width 32)
_MAX_DIM = 1024
_MAX_ELEMS = 2**31 - 1

# ----------------------------------------------------------------------------------------------
# Capability


def _layout(dim: int) -> tuple[int, int, int, int] | None:
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
    if size >= _MAX_ELEMS or _layout(dim) is None and not spec.outliers:
        return False
    if spec.outliers:
        try:
            k = spec.outlier_channels(dim)
        except ValueError:
            return False
        # channel indices are stored as uint8 up to head dim 256 (uint16 above): the kernels read uint8
        return dim <= 256 and _layout(k) is not None and _layout(dim - k) is not None
    return True


# ----------------------------------------------------------------------------------------------
# Kernel source: one body, two languages

_CUDA_HEADER = """
#define PV_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define PV_BALLOT(p) __ballot_sync(0xffffffffu, (p))
#define PV_SQRT(x) sqrtf(x)
#define PV_EXP(x) expf(x)
#define PV_MAX(a, b) fmaxf((a), (b))
#define PV_TABLE __device__
#define PV_UNROLL _Pragma("unroll")
"""

_METAL_HEADER = """
#define PV_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define PV_BALLOT(p) ((unsigned int)((ulong)simd_ballot(p)))
#define PV_SQRT(x) metal::sqrt(x)
#define PV_EXP(x) metal::exp(x)
#define PV_MAX(a, b) metal::max((a), (b))
#define PV_TABLE constant
#define PV_UNROLL
"""

_VEC_HEADER = {  # the plan decode kernel's vector stores (CUDA: one aligned store of E values)
    "cuda": "#define PV_GLOBAL\ntemplate <typename T, int N> struct alignas(sizeof(T) * N) pv_vec { T v[N]; };\n",
    "metal": "#define PV_GLOBAL device\ntemplate <typename T, int N> struct pv_vec { T v[N]; };\n",
}

_CUDA_PROLOGUE = """
    const unsigned int pv_gid = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned int pv_wlane = threadIdx.x & 31u;
"""

_METAL_PROLOGUE = """
    const unsigned int pv_gid = thread_position_in_grid.x;
    const unsigned int pv_wlane = thread_index_in_simdgroup;
"""


@dataclass(frozen=True)
class KernelConfig:
    dim: int
    bits: int
    seed: int
    center: bool
    norm_bits: int

    @property
    def layout(self):
        return _layout(self.dim)

    @property
    def width(self) -> int:  # packed bytes per vector
        return self.bits * (self.dim // 8)


@lru_cache(maxsize=None)
def _hadamard_factor(m: int) -> np.ndarray:
    """The m×m ±1 matrix mx.hadamard_transform uses as the Kronecker factor for sizes m·2^k
    (transform(x) = x @ kron(M, H_2^k) up to scale), read from MLX itself on the CPU."""
    with mx.stream(mx.cpu):
        f = mx.hadamard_transform(mx.eye(m), scale=1.0)
        return np.rint(np.array(f)).astype(np.int64)


def _floats(values) -> str:
    return ", ".join(f"{float(v):.9e}f" for v in values)


def _tables(cfg: KernelConfig) -> str:
    centroids, boundaries = codebook(cfg.dim, cfg.bits)
    signs = random_signs(cfg.dim, cfg.seed)
    return (f"PV_TABLE float pv_cent[{len(centroids)}] = {{{_floats(centroids)}}};\n"
            f"PV_TABLE float pv_thr[{len(boundaries)}] = {{{_floats(boundaries)}}};\n"
            f"PV_TABLE float pv_sign[{cfg.dim}] = {{{_floats(signs)}}};\n")


def _rotation(cfg: KernelConfig, inverse: bool, contiguous: bool = False) -> str:
    """Code applying the rotation (forward or inverse) to u[0..E) of every lane, then 1/√d.
    contiguous: the lane-contiguous layout of `_contiguous` (power-of-two d: the register index j
    is the low bits of i, the lane the high bits; H_d = H_32 ⊗ H_E)."""
    m, k2, lanes, e = cfg.layout
    j2 = e if contiguous else k2 // lanes  # values of j per Hadamard-factor index a
    lines = []
    h = 1
    while h < j2:  # in-register butterflies over the low bits of j
        for jj in range(e):
            if jj & h == 0:
                lines.append(f"{{ float p = u[{jj}], q = u[{jj + h}]; u[{jj}] = p + q; u[{jj + h}] = p - q; }}")
        h *= 2
    s = 1
    while s < lanes:  # butterflies across lanes
        lines.append(f"{{ const bool up = (lane & {s}u) != 0u;")
        lines.append("  PV_UNROLL for (int jj = 0; jj < PV_E; ++jj) { float p = PV_SHFL_XOR(u[jj], " + str(s)
                     + "); u[jj] = up ? (p - u[jj]) : (u[jj] + p); } }")
        s *= 2
    if m > 1:  # y[a'] = sum_a x[a] M[a][a'] (forward), x[a] = sum_a' y[a'] M[a][a'] (inverse)
        mat = _hadamard_factor(m)
        for jl in range(j2):
            terms = []
            for out in range(m):
                coeffs = mat[:, out] if not inverse else mat[out, :]
                expr = " ".join(("+ " if c > 0 else "- ") + f"u[{a * j2 + jl}]" for a, c in enumerate(coeffs))
                terms.append(f"const float t{out} = {expr};")
            lines.append("{ " + " ".join(terms) + " " +
                         " ".join(f"u[{o * j2 + jl}] = t{o};" for o in range(m)) + " }")
    lines.append(f"PV_UNROLL for (int jj = 0; jj < PV_E; ++jj) u[jj] *= {1.0 / np.sqrt(cfg.dim):.9e}f;")
    return "\n    ".join(lines)


def _defines(cfg: KernelConfig) -> str:
    m, k2, lanes, e = cfg.layout
    return (f"#define PV_D {cfg.dim}\n#define PV_L {lanes}\n#define PV_E {e}\n#define PV_BITS {cfg.bits}\n"
            f"#define PV_NB {cfg.dim // 8}\n#define PV_W {cfg.width}\n")


def _quantize(cfg: KernelConfig) -> str:
    n_thr = (1 << cfg.bits) - 1
    if cfg.bits <= 4:  # count the thresholds below: uniform table reads
        return ("unsigned int c = 0u;\n        PV_UNROLL for (int t = 0; t < " + str(n_thr)
                + "; ++t) c += (y > pv_thr[t]) ? 1u : 0u;")
    return ("unsigned int c = 0u;\n        PV_UNROLL for (int h = " + str(1 << (cfg.bits - 1))
            + "; h > 0; h >>= 1) { if (y > pv_thr[c + h - 1]) c += h; }")


def encode_source(cfg: KernelConfig, lang: str) -> tuple[str, str]:
    """(header, body) of the fused encode kernel. Inputs: x (rows·T·d), [mean (rows·d)],
    params int32 [n_vectors, T]. Outputs: codes (n_vectors·W) uint8, norms (n_vectors) NormT."""
    header = (_CUDA_HEADER if lang == "cuda" else _METAL_HEADER) + _defines(cfg) + _tables(cfg)
    center = "val -= (float)mean[r * PV_D + i];" if cfg.center else ""
    body = (_CUDA_PROLOGUE if lang == "cuda" else _METAL_PROLOGUE) + f"""
    const unsigned int nvec = (unsigned int)params[0];
    const unsigned int T = (unsigned int)params[1];
    const unsigned int lane = pv_gid % PV_L;
    const unsigned int v_raw = pv_gid / PV_L;
    const bool active = v_raw < nvec;
    const unsigned int v = active ? v_raw : nvec - 1u;  // idle lanes still join the shuffles
    const unsigned int r = v / T;
    float u[PV_E];
    float ss = 0.0f;
    PV_UNROLL for (int j = 0; j < PV_E; ++j) {{
        const unsigned int i = (unsigned int)j * PV_L + lane;
        float val = (float)x[v * PV_D + i];
        {center}
        u[j] = val;
        ss += val * val;
    }}
    PV_UNROLL for (int s = 1; s < PV_L; s <<= 1) ss += PV_SHFL_XOR(ss, s);
    const float norm = PV_SQRT(ss);
    const float nd = PV_MAX(norm, 1e-30f);
    PV_UNROLL for (int j = 0; j < PV_E; ++j) u[j] = (u[j] / nd) * pv_sign[(unsigned int)j * PV_L + lane];
    {_rotation(cfg, inverse=False)}
    unsigned int code[PV_E];
    float dss = 0.0f;
    PV_UNROLL for (int j = 0; j < PV_E; ++j) {{
        const float y = u[j];
        {_quantize(cfg)}
        code[j] = c;
        const float cv = pv_cent[c];
        dss += cv * cv;
    }}
    PV_UNROLL for (int s = 1; s < PV_L; s <<= 1) dss += PV_SHFL_XOR(dss, s);
    if (active && lane == 0u) norms[v] = (NormT)(norm / PV_MAX(PV_SQRT(dss), 1e-30f));
    PV_UNROLL for (int p = 0; p < PV_BITS; ++p) {{
        PV_UNROLL for (int j = 0; j < PV_E; ++j) {{
            const unsigned int bal = PV_BALLOT(((code[j] >> p) & 1u) != 0u);
            if (active && (lane & 7u) == 0u)
                codes[v * PV_W + (unsigned int)p * PV_NB + (unsigned int)j * (PV_L / 8) + lane / 8u] =
                    (unsigned char)((bal >> pv_wlane) & 0xffu);
        }}
    }}
"""
    return header, body


# ----------------------------------------------------------------------------------------------
# Decode: one launch for all parts of a vector (the whole vector, or the outlier and the other
# channels of an outlier split), written straight into the destination rows.

# The plan kernel (below) decodes the outlier split; its loop over items per warp, vector stores
# and word loads are also the candidate fix for the decode bandwidth (README.md (Speed)), which is
# NOT yet measured on a GPU: plain specs keep the H100-checked kernel (`decode_source`) unless
# PROMPTVAULT_DECODE_V2=1. Knobs (for `python -m promptvault.bench.kernels --sweep`): warps
# launched at most (each loops over its items), items per loop iteration (all their loads
# issued before the first is computed), contiguous layout up to E coordinates per lane.
_DECODE_V2 = os.environ.get("PROMPTVAULT_DECODE_V2", "0").strip() == "1"
_DECODE_WARPS = int(os.environ.get("PROMPTVAULT_DECODE_WARPS", "65536"))
_DECODE_UNROLL = int(os.environ.get("PROMPTVAULT_DECODE_UNROLL", "1"))
_CONTIGUOUS_MAX_E = int(os.environ.get("PROMPTVAULT_CONTIGUOUS_MAX_E", "8"))


@dataclass(frozen=True)
class DecodePart:
    """One rotation-coded sub-vector of a stored vector: `cfg` (its dim, bits, seed, norm
    format), its codes at byte `code_offset` of the vector's codes, its norm at index
    `norm_index` of the vector's norms, its coordinates written to channels
    `perm[chan_offset : chan_offset + cfg.dim]` (or to channels 0..d-1 when `chan_offset` is None)."""

    cfg: KernelConfig
    code_offset: int
    norm_index: int
    chan_offset: int | None


@dataclass(frozen=True)
class DecodePlan:
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
    unroll = _DECODE_UNROLL if unroll is None else unroll
    if not spec.outliers:
        cfg = KernelConfig(dim, spec.bits, spec.seed, spec.center, spec.norm_bits)
        return DecodePlan(dim, spec.center, spec.norm_bits, cfg.width, (DecodePart(cfg, 0, 0, None),), unroll)
    k = spec.outlier_channels(dim)
    hi = KernelConfig(k, spec.outlier_bits, spec.seed, False, spec.norm_bits)
    lo = KernelConfig(dim - k, spec.bits, spec.seed, False, spec.norm_bits)
    return DecodePlan(dim, spec.center, spec.norm_bits, hi.width + lo.width,
                      (DecodePart(hi, 0, 0, 0), DecodePart(lo, hi.width, 1, k)), unroll)


def _contiguous_v2(cfg: KernelConfig) -> bool:
    """Plan-kernel layout: for power-of-two d with E = d/32 ≤ 8, lane l holds the E adjacent
    coordinates i = l·E + j (one byte load per bit-plane, one vector store of E values);
    otherwise i = j·L + l (strided). README.md (Speed) has the H100 measurements of both."""
    m, k2, lanes, e = cfg.layout
    return m == 1 and lanes == 32 and e <= _CONTIGUOUS_MAX_E


def _word_loads(plan: DecodePlan, part: DecodePart) -> bool:
    """Strided layout: each bit-plane read as 32-bit words (broadcast to the lane group) instead
    of one byte per coordinate; needs 4-byte alignment of every plane of every vector."""
    nb = part.cfg.dim // 8
    return plan.width % 4 == 0 and part.code_offset % 4 == 0 and nb % 4 == 0 and part.cfg.layout[2] >= 8


def _decode_tables(p: int, cfg: KernelConfig) -> str:
    centroids, _ = codebook(cfg.dim, cfg.bits)
    signs = random_signs(cfg.dim, cfg.seed)
    return (f"PV_TABLE float pv_cent{p}[{len(centroids)}] = {{{_floats(centroids)}}};\n"
            f"PV_TABLE float pv_sign{p}[{cfg.dim}] = {{{_floats(signs)}}};\n")


def _part_setup(plan: DecodePlan, p: int, part: DecodePart) -> str:
    """Per-thread constants of a part, hoisted out of the loop over items: lane, signs."""
    m, k2, lanes, e = part.cfg.layout
    index = f"lane{p} * {e}u + (unsigned int)j" if _contiguous_v2(part.cfg) else f"(unsigned int)j * {lanes}u + lane{p}"
    return f"""
    const unsigned int lane{p} = pv_wlane % {lanes}u;
    float sg{p}[{e}];
    PV_UNROLL for (int j = 0; j < {e}; ++j) sg{p}[j] = pv_sign{p}[{index}];"""


def _part_load(plan: DecodePlan, p: int, part: DecodePart, it: str, x: str) -> str:
    """Code of the load phase of one item (suffix x): indices, rowmap, codes, norm."""
    cfg = part.cfg
    m, k2, lanes, e = cfg.layout
    nb, bits = cfg.dim // 8, cfg.bits
    lane = f"lane{p}"
    lines = [f"""
        const unsigned int v_raw{x} = ({it}) * {32 // lanes}u + pv_wlane / {lanes}u;
        const bool active{x} = v_raw{x} < NV;
        const unsigned int v{x} = active{x} ? v_raw{x} : NV - 1u;
        const unsigned int r{x} = v{x} / NR;
        const unsigned int row{x} = v{x} - r{x} * NR;
        const int src{x} = rowmap[2u * row{x}];
        const unsigned int hs{x} = r{x} * S + (src{x} < 0 ? 0u : (unsigned int)rowmap[2u * row{x} + 1u]);
        const unsigned int sv{x} = r{x} * Ts + (unsigned int)(src{x} < 0 ? 0 : src{x});
        const unsigned int base{x} = sv{x} * {plan.width}u + {part.code_offset}u;
        unsigned int cc{x}[{e}];
        PV_UNROLL for (int j = 0; j < {e}; ++j) cc{x}[j] = 0u;"""]
    if _contiguous_v2(cfg):
        lines.append(f"""
        {{ const unsigned int i0 = {lane} * {e}u;
          PV_UNROLL for (int q = 0; q < {bits}; ++q) {{
            const unsigned int bb = ((unsigned int)codes[base{x} + (i0 >> 3u) + (unsigned int)q * {nb}u]) >> (i0 & 7u);
            PV_UNROLL for (int j = 0; j < {e}; ++j) cc{x}[j] |= ((bb >> j) & 1u) << q;
          }} }}""")
    elif _word_loads(plan, part):
        qd = lanes // 8  # bytes of a plane per j
        words = nb // 4
        lines.append(f"        PV_UNROLL for (int q = 0; q < {bits}; ++q) {{")
        lines.append(f"            const PV_GLOBAL unsigned int* wp = (const PV_GLOBAL unsigned int*)(codes + base{x} + (unsigned int)q * {nb}u);")
        lines.append(f"            unsigned int wd[{words}];")
        lines.append(f"            PV_UNROLL for (int w = 0; w < {words}; ++w) wd[w] = wp[w];")
        for j in range(e):
            word, byte = (j * qd) // 4, (j * qd) % 4
            lines.append(f"            cc{x}[{j}] |= ((wd[{word}] >> ({8 * byte}u + {lane})) & 1u) << q;")
        lines.append("        }")
    else:
        lines.append(f"""
        PV_UNROLL for (int j = 0; j < {e}; ++j) {{
            const unsigned int i = (unsigned int)j * {lanes}u + {lane};
            PV_UNROLL for (int q = 0; q < {bits}; ++q)
                cc{x}[j] |= (((unsigned int)codes[base{x} + (i >> 3u) + (unsigned int)q * {nb}u] >> (i & 7u)) & 1u) << q;
        }}""")
    nn = plan.n_norms
    if plan.norm_bits == 8:
        lines.append(f"""
        const unsigned int nl{x} = (unsigned int)norms[sv{x} * {nn}u + {part.norm_index}u];
        const unsigned int rs{x} = hs{x} * {2 * nn}u + {part.norm_index}u;
        const float nrm{x} = nl{x} > 0u ? PV_EXP(norm_range[rs{x}] + ((float)nl{x} - 1.0f) * norm_range[rs{x} + {nn}u]) : 0.0f;""")
    else:
        lines.append(f"        const float nrm{x} = (float)norms[sv{x} * {nn}u + {part.norm_index}u];")
    return "\n".join(lines)


def _part_compute(plan: DecodePlan, p: int, part: DecodePart, x: str) -> str:
    """Code of the compute-and-store phase of one item (suffix x)."""
    cfg = part.cfg
    m, k2, lanes, e = cfg.layout
    contiguous = _contiguous_v2(cfg)
    rot = _rotation(cfg, inverse=True, contiguous=contiguous).replace("lane &", f"lane{p} &").replace("PV_E", str(e))
    index = f"lane{p} * {e}u + (unsigned int)j" if contiguous else f"(unsigned int)j * {lanes}u + lane{p}"
    head = f"""
        {{ float u[{e}];
        PV_UNROLL for (int j = 0; j < {e}; ++j) u[j] = pv_cent{p}[cc{x}[j]];
        {rot}
        const bool z{x} = src{x} < 0;  // a row no segment fills: zeros"""
    if not plan.permuted:
        mean = f"val += (float)mean[hs{x} * PV_D + {index}];" if plan.center else ""
        return head + f"""
        pv_vec<OutT, {e}> pk;
        PV_UNROLL for (int j = 0; j < {e}; ++j) {{
            float val = (u[j] * sg{p}[j]) * nrm{x};
            {mean}
            pk.v[j] = (OutT)(z{x} ? 0.0f : val);
        }}
        if (active{x}) *((PV_GLOBAL pv_vec<OutT, {e}>*)(out + v{x} * PV_D + lane{p} * {e}u)) = pk;
        }}""" if contiguous else head + f"""
        PV_UNROLL for (int j = 0; j < {e}; ++j) {{
            const unsigned int i = {index};
            float val = (u[j] * sg{p}[j]) * nrm{x};
            {mean}
            if (active{x}) out[v{x} * PV_D + i] = (OutT)(z{x} ? 0.0f : val);
        }}
        }}"""
    mean = f"val += (float)mean[hs{x} * PV_D + ch];" if plan.center else ""
    return head + f"""
        PV_UNROLL for (int j = 0; j < {e}; ++j) {{
            const unsigned int c0 = (unsigned int)perm[hs{x} * PV_D + {part.chan_offset}u + {index}];
            const unsigned int ch = c0 < PV_D ? c0 : PV_D - 1u;  // never out of bounds, whatever a shard says
            float val = (u[j] * sg{p}[j]) * nrm{x};
            {mean}
            if (active{x}) out[v{x} * PV_D + ch] = (OutT)(z{x} ? 0.0f : val);
        }}
        }}"""


def plan_decode_source(plan: DecodePlan, lang: str) -> tuple[str, str]:
    """(header, body) of the plan decode kernel (outlier splits; plain specs with
    PROMPTVAULT_DECODE_V2=1). Inputs: codes (rows·Ts·W) uint8, norms
    (rows·Ts·P) float16 or uint8 (P parts), [norm_range (rows·S·2P) float32], [mean (rows·S·d)],
    [perm (rows·S·d) int32: the channel of each part's coordinates, with an outlier split],
    rowmap int32 (n_rows·2: source token or -1 for a zero row, segment),
    params int32 [rows, Ts, n_rows, S, items of each part (P), warps].
    Output: out (rows·n_rows·d) OutT.

    Each warp loops over items (an item: 32/L vectors of one part), `plan.unroll` items per
    iteration with all their loads issued before the first is computed."""
    header = ((_CUDA_HEADER if lang == "cuda" else _METAL_HEADER) + _VEC_HEADER[lang] + f"#define PV_D {plan.dim}\n"
              + "".join(_decode_tables(p, part.cfg) for p, part in enumerate(plan.parts)))
    body = (_CUDA_PROLOGUE if lang == "cuda" else _METAL_PROLOGUE) + f"""
    const unsigned int R = (unsigned int)params[0];
    const unsigned int Ts = (unsigned int)params[1];
    const unsigned int NR = (unsigned int)params[2];
    const unsigned int S = (unsigned int)params[3];
    const unsigned int NWARP = (unsigned int)params[{4 + len(plan.parts)}];
    const unsigned int NV = R * NR;
    const unsigned int warp = pv_gid >> 5u;"""
    u = plan.unroll
    for p, part in enumerate(plan.parts):
        body += _part_setup(plan, p, part)
        suffixes = [f"_{a}" for a in range(u)]
        body += f"""
    {{ const unsigned int G = (unsigned int)params[{4 + p}];
    for (unsigned int t = warp; t < G; t += {u}u * NWARP) {{"""
        for a, x in enumerate(suffixes):
            body += _part_load(plan, p, part, f"t + {a}u * NWARP", x)
        for x in suffixes:
            body += _part_compute(plan, p, part, x)
        body += "\n    } }"
    return header, body + "\n"


def _contiguous(cfg: KernelConfig) -> bool:
    """Decode layout: for power-of-two d ≤ 128, lane l holds the E ≤ 4 adjacent coordinates
    i = l·E + j (one byte load per bit-plane); otherwise i = j·L + l. Measured on the H100
    (README.md (Speed)): +10–35% decode GB/s at d = 64 / 128, but −40% at d = 256 (E = 8: a warp's
    stores spread over 16-byte strides), so d = 256 keeps the strided layout."""
    m, k2, lanes, e = cfg.layout
    return m == 1 and lanes == 32 and e <= 4


def decode_source(cfg: KernelConfig, lang: str) -> tuple[str, str]:
    """(header, body) of the fused decode kernel. Inputs: codes (rows·Ts·W) uint8, norms (rows·Ts)
    float16 or uint8, [norm_range (rows·S·2) float32], [mean (rows·S·d)], rowmap int32
    (n_rows·2: source token or -1 for a zero row, segment), params int32 [rows, Ts, n_rows, S].
    Output: out (rows·n_rows·d) OutT."""
    header = (_CUDA_HEADER if lang == "cuda" else _METAL_HEADER) + _defines(cfg) + _tables(cfg)
    if cfg.norm_bits == 8:
        norm = """const unsigned int nl = (unsigned int)norms[sv];
    const unsigned int rs = (r * S + seg) * 2u;
    const float nrm = nl > 0u ? PV_EXP(norm_range[rs] + ((float)nl - 1.0f) * norm_range[rs + 1u]) : 0.0f;"""
    else:
        norm = "const float nrm = (float)norms[sv];"
    mean = "val += (float)mean[(r * S + seg) * PV_D + i];" if cfg.center else ""
    contiguous = _contiguous(cfg)
    if contiguous:
        load = """const unsigned int i0 = lane * PV_E;
    const unsigned int base = sv * PV_W + (i0 >> 3u);
    const unsigned int sh = i0 & 7u;
    unsigned int cc[PV_E];
    PV_UNROLL for (int j = 0; j < PV_E; ++j) cc[j] = 0u;
    PV_UNROLL for (int p = 0; p < PV_BITS; ++p) {
        const unsigned int bb = ((unsigned int)codes[base + (unsigned int)p * PV_NB]) >> sh;
        PV_UNROLL for (int j = 0; j < PV_E; ++j) cc[j] |= ((bb >> j) & 1u) << p;
    }
    float u[PV_E];
    PV_UNROLL for (int j = 0; j < PV_E; ++j) u[j] = pv_cent[cc[j]];"""
        index = "lane * PV_E + (unsigned int)j"
    else:
        load = """float u[PV_E];
    PV_UNROLL for (int j = 0; j < PV_E; ++j) {
        const unsigned int i = (unsigned int)j * PV_L + lane;
        const unsigned int base = sv * PV_W + (i >> 3u);
        const unsigned int bit = i & 7u;
        unsigned int c = 0u;
        PV_UNROLL for (int p = 0; p < PV_BITS; ++p)
            c |= (((unsigned int)codes[base + (unsigned int)p * PV_NB] >> bit) & 1u) << p;
        u[j] = pv_cent[c];
    }"""
        index = "(unsigned int)j * PV_L + lane"
    body = (_CUDA_PROLOGUE if lang == "cuda" else _METAL_PROLOGUE) + f"""
    const unsigned int R = (unsigned int)params[0];
    const unsigned int Ts = (unsigned int)params[1];
    const unsigned int NR = (unsigned int)params[2];
    const unsigned int S = (unsigned int)params[3];
    const unsigned int lane = pv_gid % PV_L;
    const unsigned int v_raw = pv_gid / PV_L;
    const bool active = v_raw < R * NR;
    const unsigned int v = active ? v_raw : R * NR - 1u;
    const unsigned int r = v / NR;
    const unsigned int row = v % NR;
    const int src = rowmap[2u * row];
    const unsigned int seg = (unsigned int)rowmap[2u * row + 1u];
    const unsigned int sv = r * Ts + (unsigned int)(src < 0 ? 0 : src);
    {load}
    {_rotation(cfg, inverse=True, contiguous=contiguous)}
    {norm}
    PV_UNROLL for (int j = 0; j < PV_E; ++j) {{
        const unsigned int i = {index};
        float val = (u[j] * pv_sign[i]) * nrm;
        {mean}
        if (active) out[v * PV_D + i] = (OutT)(src < 0 ? 0.0f : val);
    }}
"""
    return header, body


# ----------------------------------------------------------------------------------------------
# Kernels and launches



@lru_cache(maxsize=None)
def _kernel(op: str, cfg: KernelConfig, lang: str):
    header, body = (encode_source if op == "encode" else decode_source)(cfg, lang)
    tag = f"pv_{op}_d{cfg.dim}_b{cfg.bits}_s{cfg.seed}_c{int(cfg.center)}_n{cfg.norm_bits}"
    if op == "encode":
        inputs = ["x"] + (["mean"] if cfg.center else []) + ["params"]
        outputs = ["codes", "norms"]
    else:
        inputs = _decode_input_names(decode_plan(CodecSpec(bits=cfg.bits, seed=cfg.seed, center=cfg.center,
                                                           norm_bits=cfg.norm_bits), cfg.dim))
        outputs = ["out"]
    make = mx.fast.cuda_kernel if lang == "cuda" else mx.fast.metal_kernel
    return make(name=tag, input_names=inputs, output_names=outputs, source=body, header=header,
                ensure_row_contiguous=True)


def _decode_input_names(plan: DecodePlan) -> list[str]:
    return ["codes", "norms"] + (["norm_range"] if plan.norm_bits == 8 else []) \
        + (["mean"] if plan.center else []) + (["perm"] if plan.permuted else []) + ["rowmap", "params"]


@lru_cache(maxsize=None)
def _plan_kernel(plan: DecodePlan, lang: str):
    header, body = plan_decode_source(plan, lang)
    tag = "pv_pdecode_" + "_".join(f"d{p.cfg.dim}b{p.cfg.bits}" for p in plan.parts) + \
        f"_s{plan.parts[0].cfg.seed}_c{int(plan.center)}_n{plan.norm_bits}_u{plan.unroll}_x{_CONTIGUOUS_MAX_E}"
    inputs = _decode_input_names(plan)
    make = mx.fast.cuda_kernel if lang == "cuda" else mx.fast.metal_kernel
    return make(name=tag, input_names=inputs, output_names=["out"], source=body, header=header,
                ensure_row_contiguous=True)


def _grid(n_vectors: int, lanes: int) -> tuple[int, int, int]:
    threads = n_vectors * lanes
    return ((threads + _TG - 1) // _TG * _TG, 1, 1)


@dataclass
class Launch:
    """What one launch takes: the kernel ("encode": `encode_source(key)`, "plain":
    `decode_source(key)`, "plan": `plan_decode_source(key)`), its inputs in the kernel's order
    with their names, grid (threads) and (first) output shape."""

    kind: str
    key: object
    inputs: list
    grid: tuple[int, int, int]
    out_shape: tuple[int, ...]
    names: list[str]


def encode_launch(x: mx.array, mean, spec: CodecSpec) -> Launch:
    """What one encode launch over x (..., T, dim) takes (outputs: codes, then raw norms)."""
    dim = x.shape[-1]
    cfg = KernelConfig(dim, spec.bits, spec.seed, mean is not None, spec.norm_bits)
    lead, tokens = x.shape[:-2], x.shape[-2]
    n = (int(np.prod(lead)) if lead else 1) * tokens
    inputs = [x] + ([mean] if mean is not None else []) + [mx.array([n, tokens], dtype=mx.int32)]
    names = ["x"] + (["mean"] if mean is not None else []) + ["params"]
    return Launch("encode", cfg, inputs, _grid(n, cfg.layout[2]), (*lead, tokens, cfg.width), names)


def _encode_launch(lang: str, x: mx.array, mean, spec: CodecSpec, norm_dtype):
    """One launch of the encode kernel over x (..., T, dim): (codes, raw norms (..., T, 1))."""
    launch = encode_launch(x, mean, spec)
    return _kernel("encode", launch.key, lang)(
        inputs=launch.inputs, template=[("NormT", norm_dtype)], grid=launch.grid,
        threadgroup=(_TG, 1, 1), output_shapes=[launch.out_shape, (*launch.out_shape[:-1], 1)],
        output_dtypes=[mx.uint8, norm_dtype])


def encode_arrays_with(lang: str, x: mx.array, spec: CodecSpec) -> dict[str, mx.array]:
    """The reference's `encode_arrays(x, spec)`, computed by the fused kernel of `lang`.

    With an outlier split: the channel choice (energies, sort) and the gather of the two channel
    sets are the reference's own MLX code; each set is then coded by one kernel launch."""
    from promptvault.codec import turboquant as tq

    arrays = {}
    norm_dtype = mx.float16 if spec.norm_bits == 16 else mx.float32
    if spec.outliers:
        dim = x.shape[-1]
        values, mean = tq.centered(x, spec)
        if mean is not None:
            arrays["mean"] = mean
        hi = tq.outlier_channels(values, spec)
        lo = tq._other_channels(hi, dim)
        arrays["channels"] = hi.astype(mx.uint8 if dim <= 256 else mx.uint16)
        sub = CodecSpec(bits=spec.outlier_bits, seed=spec.seed, norm_bits=spec.norm_bits)
        codes_hi, norms_hi = _encode_launch(lang, tq._gather(values, hi), None, sub, norm_dtype)
        sub = CodecSpec(bits=spec.bits, seed=spec.seed, norm_bits=spec.norm_bits)
        codes_lo, norms_lo = _encode_launch(lang, tq._gather(values, lo), None, sub, norm_dtype)
        arrays["codes"] = mx.concatenate([codes_hi, codes_lo], axis=-1)
        norms = mx.concatenate([norms_hi, norms_lo], axis=-1)
    else:
        mean = None
        if spec.center:
            mean = mx.mean(x.astype(mx.float32), axis=-2, keepdims=True).astype(x.dtype)
            arrays["mean"] = mean
        arrays["codes"], norms = _encode_launch(lang, x, mean, spec, norm_dtype)
    if spec.norm_bits == 8:
        arrays.update(tq._log_norms(norms))
        return arrays
    if not mx.all(mx.isfinite(norms)).item():
        return tq.encode_arrays(x, spec)  # raises the reference's overflow error
    arrays["norms"] = norms
    return arrays


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


def uses_plan_kernel(spec: CodecSpec) -> bool:
    """Decode of `spec` runs the plan kernel (not yet checked on a GPU: `use_fused` checks it
    against the reference before first use) rather than the H100-checked plain kernel."""
    return bool(spec.outliers) or _DECODE_V2


def decode_rows_with(lang: str, parts: list[dict[str, mx.array]], spec: CodecSpec, dim: int,
                     dtype, rowmap: np.ndarray, n_rows: int) -> mx.array:
    """Decode in one launch rows of several coded tensors (same spec, dim, leading shape) into
    one (..., n_rows, dim) array: row t takes token rowmap[t, 0] of the tokens of `parts`
    concatenated (segment rowmap[t, 1] for its mean / norm range / channels), or zeros where it
    is -1."""
    launch = decode_launch(parts, spec, dim, rowmap, n_rows)
    kernel = _kernel("decode", launch.key, lang) if launch.kind == "plain" else _plan_kernel(launch.key, lang)
    (out,) = kernel(inputs=launch.inputs, template=[("OutT", dtype)], grid=launch.grid, threadgroup=(_TG, 1, 1),
                    output_shapes=[launch.out_shape], output_dtypes=[dtype])
    return out


def decode_launch(parts: list[dict[str, mx.array]], spec: CodecSpec, dim: int, rowmap: np.ndarray,
                  n_rows: int) -> Launch:
    plan = decode_plan(spec, dim)

    def cat(name):
        arrs = [p[name] for p in parts]
        return arrs[0] if len(arrs) == 1 else mx.concatenate(arrs, axis=-2)

    codes = cat("codes")
    lead, t_src = codes.shape[:-2], codes.shape[-2]
    rows = int(np.prod(lead)) if lead else 1
    inputs = [codes, cat("norms")]
    if spec.norm_bits == 8:
        inputs.append(cat("norm_range"))
    if spec.center:
        inputs.append(cat("mean"))
    if plan.permuted:
        from promptvault.codec.turboquant import channel_order

        inputs.append(channel_order(cat("channels"), dim))
    inputs.append(mx.array(np.ascontiguousarray(rowmap, dtype=np.int32)))
    out_shape = (*lead, n_rows, dim)
    if not uses_plan_kernel(spec):  # the H100-checked kernel: one vector per lane group
        cfg = plan.parts[0].cfg
        inputs.append(mx.array([rows, t_src, n_rows, len(parts)], dtype=mx.int32))
        return Launch("plain", cfg, inputs, _grid(rows * n_rows, cfg.layout[2]), out_shape, _decode_input_names(plan))
    n_vec = rows * n_rows
    items = [-(-n_vec // (32 // part.cfg.layout[2])) for part in plan.parts]
    grid = _grid(max(1, min(max(items), _DECODE_WARPS)), 32)
    warps = grid[0] // 32  # every launched warp strides by the count launched: no item twice
    inputs.append(mx.array([rows, t_src, n_rows, len(parts), *items, warps], dtype=mx.int32))
    return Launch("plan", plan, inputs, grid, out_shape, _decode_input_names(plan))
    n_vec = rows * n_rows
    items = [-(-n_vec // (32 // part.cfg.layout[2])) for part in plan.parts]
    grid = _grid(max(1, min(max(items), _DECODE_WARPS)), 32)
    warps = grid[0] // 32  # every launched warp strides by the count launched: no item twice
    inputs.append(mx.array([rows, t_src, n_rows, len(parts), *items, warps], dtype=mx.int32))
    (out,) = _plan_kernel(plan, lang)(
        inputs=inputs, template=[("OutT", dtype)], grid=grid,
        threadgroup=(_TG, 1, 1), output_shapes=[(*lead, n_rows, dim)], output_dtypes=[dtype])
    return out


# ----------------------------------------------------------------------------------------------
# Selection

_lock = threading.Lock()
_state: dict = {}


def _platform() -> str:
    """'cuda', 'metal' or 'cpu': where MLX's default device runs."""
    if mx.default_device() != mx.gpu:
        return "cpu"
    if mx.cuda.is_available():
        return "cuda"
    if mx.metal.is_available():
        return "metal"
    return "cpu"


def self_check(lang: str, encode_impl=None, decode_impl=None, seed: int = 1234) -> tuple[bool, str]:
    """Compare the kernels of `lang` with the reference on a small random batch (d = 128 and
    96, 1–4 bits, centered and 8-bit norms included). (ok, reason). The outlier split's plan
    kernel is checked apart, per config (`config_check`), so a failure there never turns the
    checked plain kernels off.

    Encode must give the reference's codes (a coordinate may differ only where the reference's
    rotated value lies within 1e-5 of a codebook boundary, i.e. a float rounding tie) and its
    norms within 1e-3; decode of the reference's arrays must match the reference's decode
    within 2 ulps of the output dtype. Any exception (a compile error) is a failure."""
    key = mx.random.key(seed)
    cases = [(128, 3, False, 16), (128, 4, True, 8), (96, 2, True, 16), (128, 1, False, 16)]
    for dim, bits, center, norm_bits in cases:
        spec = CodecSpec(bits=bits, seed=7, center=center, norm_bits=norm_bits)
        key, sub = mx.random.split(key)
        ok, why = _compare(lang, spec, dim, mx.float16, sub, encode_impl, decode_impl)
        if not ok:
            return False, why
    return True, "ok"


def config_check(lang: str, spec: CodecSpec, dim: int, dtype, encode_impl=None, decode_impl=None,
                 seed: int = 4321) -> tuple[bool, str]:
    """`self_check`'s comparison for exactly this spec, head dim and dtype: run once per process
    before the plan kernel (not yet checked on a GPU, see `uses_plan_kernel`) is used for them."""
    return _compare(lang, spec, dim, dtype, mx.random.key(seed), encode_impl, decode_impl)


def _compare(lang, spec, dim, dtype, key, encode_impl=None, decode_impl=None) -> tuple[bool, str]:
    from promptvault.codec.turboquant import decode_arrays, encode_arrays

    enc = encode_impl or (lambda x, spec: encode_arrays_with(lang, x, spec))
    dec = decode_impl or (lambda arrays, spec, dim, dtype: decode_rows_with(
        lang, [arrays], spec, dim, dtype, identity_map(arrays["codes"].shape[-2]), arrays["codes"].shape[-2]))
    bits = spec.bits
    try:
        k1, k2 = mx.random.split(key)
        scale = 1.0 + 4.0 * (mx.random.uniform(shape=(dim,), key=k2) > 0.9)  # a few outlier channels
        x = ((mx.random.normal((2, 3, 64, dim), key=k1) * 3.0 + 0.5) * scale).astype(dtype)
        ref = encode_arrays(x, spec)
        got = enc(x, spec)
        if set(got) != set(ref):
            return False, f"encode arrays {sorted(got)} != {sorted(ref)}"
        ok, why = _codes_match(x, spec, ref["codes"], got["codes"], ref.get("channels"), got.get("channels"))
        if not ok:
            return False, f"d={dim} b={bits}: {why}"
        if spec.norm_bits == 16:
            rn, gn = ref["norms"].astype(mx.float32), got["norms"].astype(mx.float32)
            if not mx.allclose(gn, rn, rtol=1e-3, atol=0).item():
                return False, f"d={dim} b={bits}: norms differ"
        want = decode_arrays(ref, spec, dim, dtype).astype(mx.float32)
        have = dec(ref, spec, dim, dtype).astype(mx.float32)
        if tuple(have.shape) != tuple(want.shape):
            return False, f"decode shape {have.shape} != {want.shape}"
        eps = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7, mx.float32: 2.0**-23}[dtype]
        rms = mx.sqrt(mx.mean(want * want, axis=-1, keepdims=True))
        ulp = mx.maximum(mx.abs(want), rms / 64) * eps  # near-zero sums cancel: see docs
        if not mx.all(mx.abs(have - want) <= 2 * ulp).item():
            return False, f"d={dim} b={bits}: decoded values differ by more than 2 ulps"
    except Exception as err:  # a kernel that does not compile or run fails the check
        return False, f"{type(err).__name__}: {err}"
    return True, "ok"


def identity_map(n: int) -> np.ndarray:
    out = np.zeros((n, 2), dtype=np.int32)
    out[:, 0] = np.arange(n)
    return out


def _codes_match(x, spec: CodecSpec, ref_codes, got_codes, ref_channels=None, got_channels=None) -> tuple[bool, str]:
    """Codes equal, except where the reference value sits on a boundary (rounding ties).
    With an outlier split: the same channels, and each part's codes judged on its own rotation."""
    from promptvault.codec.packing import unpack_bits
    from promptvault.codec.rotation import rotate
    from promptvault.codec import turboquant as tq

    dim = x.shape[-1]
    if ref_codes.shape != got_codes.shape:
        return False, f"codes shape {got_codes.shape} != {ref_codes.shape}"
    v, _ = tq.centered(x, spec)  # the reference's centered values (its stored mean subtracted)
    if spec.outliers:
        if ref_channels is None or got_channels is None or not mx.array_equal(ref_channels, got_channels).item():
            return False, "outlier channels differ"
        hi = ref_channels.astype(mx.int32)
        lo = tq._other_channels(hi, dim)
        w = decode_plan(spec, dim).parts[1].code_offset
        parts = [(tq._gather(v, hi), spec.outlier_bits, ref_codes[..., :w], got_codes[..., :w]),
                 (tq._gather(v, lo), spec.bits, ref_codes[..., w:], got_codes[..., w:])]
    else:
        parts = [(v, spec.bits, ref_codes, got_codes)]
    notes, ties = [], 0
    for vals, bits, rc, gc in parts:
        n = vals.shape[-1]
        r = unpack_bits(rc, bits, n)
        g = unpack_bits(gc, bits, n)
        diff = r != g
        if not mx.any(diff).item():
            continue
        unit = vals / mx.maximum(mx.sqrt(mx.sum(vals * vals, axis=-1, keepdims=True)), 1e-30)
        y = rotate(unit, mx.array(random_signs(n, spec.seed)))
        _, boundaries = codebook(n, bits)
        dist = mx.min(mx.abs(y[..., None] - mx.array(boundaries)), axis=-1)
        far = mx.logical_and(diff, dist > 1e-5)
        if mx.any(far).item():
            return False, f"{int(mx.sum(far).item())} codes differ away from a boundary"
        if mx.any(mx.abs(r.astype(mx.int32) - g.astype(mx.int32)) > 1).item():
            return False, "codes differ by more than one level"
        ties += int(mx.sum(diff).item())
    return (True, "identical") if ties == 0 else (True, f"{ties} boundary ties")


def backend() -> str:
    """'cuda', 'metal' or 'reference': what encode/decode use in this process (decided once)."""
    with _lock:
        if "backend" not in _state:
            _state["backend"] = _choose(_platform(), lambda lang: self_check(lang))
        return _state["backend"]


def _choose(platform: str, check) -> str:
    """The selection rule: env switch, then CUDA as is, Metal only after `check` passes."""
    if os.environ.get("PROMPTVAULT_FUSED", "1").strip().lower() in ("0", "false", "no", "off"):
        return "reference"
    if platform == "cuda":
        return "cuda"
    if platform == "metal":
        ok, why = check("metal")
        if ok:
            return "metal"
        warnings.warn(f"promptvault: the fused Metal kernels failed their self-check ({why}); "
                      "using the pure-MLX codec", RuntimeWarning, stacklevel=3)
        return "reference"
    return "reference"


def reset() -> None:
    """Forget the selection and the per-config checks (tests; a changed default device)."""
    with _lock:
        _state.clear()
    with _check_lock:
        _checked.clear()


_check_lock = threading.Lock()
_checked: dict[tuple, bool] = {}


def _config_ok(lang: str, spec: CodecSpec, dim: int, dtype) -> bool:
    """`config_check` once per process and (lang, spec, dim, dtype); on failure one warning and
    the reference for that config."""
    key = (lang, spec, dim, str(dtype))
    with _check_lock:
        if key not in _checked:
            ok, why = config_check(lang, spec, dim, dtype)
            if not ok:
                warnings.warn(f"promptvault: the fused {lang} decode for {spec} at head dim {dim} ({dtype}) "
                              f"failed its check against the reference ({why}); using the pure-MLX codec "
                              "for it", RuntimeWarning, stacklevel=3)
            _checked[key] = ok
        return _checked[key]


def use_fused(spec: CodecSpec, dim: int, dtype, size: int = 0) -> str | None:
    """The kernel language to use for this spec/tensor, or None for the reference. A spec the
    plan kernel decodes (the outlier split) is first checked against the reference, once per
    process and config (`config_check`): that kernel has not yet run on a GPU we could test on."""
    if not supports(spec, dim, dtype, size):
        return None
    lang = backend()
    if lang == "reference":
        return None
    if uses_plan_kernel(spec) and not _config_ok(lang, spec, dim, dtype):
        return None
    return lang
