"""Kernel sources: one body per kernel for CUDA (`mx.fast.cuda_kernel`) and Metal
(`mx.fast.metal_kernel`). The body uses a few macros (PV_SHFL_XOR, PV_BALLOT, PV_SQRT, ...) that
each language's header defines, plus a language prologue that names the thread indices.

The rotation x ↦ x · (M_m ⊗ H_{2^k}) / √d (the exact matrix mx.hadamard_transform applies, M_m
read from MLX itself) factors into an in-register transform over a lane's coordinates and
log2(L) butterfly stages across lanes (shuffles): no shared memory, no barriers. Bit-planes are
packed with a SIMD ballot.

Encode (one launch): load x (through the channel permutation of an outlier split, minus the
stored mean when centered), norm, random signs, rotation, codebook search, corrected norm,
bit-plane packing, for every part of the vector. Plain decode: `decode_source`; the plan decode
of outlier splits: `plan_source`.
"""

from __future__ import annotations

from functools import lru_cache

import mlx.core as mx
import numpy as np

from promptvault.codec.codebook import codebook
from promptvault.codec.kernels.layout import DecodePart, DecodePlan, KernelConfig, contiguous
from promptvault.codec.rotation import random_signs

CUDA_HEADER = """
#define PV_SHFL_XOR(v, m) __shfl_xor_sync(0xffffffffu, (v), (m))
#define PV_BALLOT(p) __ballot_sync(0xffffffffu, (p))
#define PV_SQRT(x) sqrtf(x)
#define PV_EXP(x) expf(x)
#define PV_MAX(a, b) fmaxf((a), (b))
#define PV_TABLE __device__
#define PV_UNROLL _Pragma("unroll")
"""

METAL_HEADER = """
#define PV_SHFL_XOR(v, m) simd_shuffle_xor((v), (ushort)(m))
#define PV_BALLOT(p) ((unsigned int)((ulong)simd_ballot(p)))
#define PV_SQRT(x) metal::sqrt(x)
#define PV_EXP(x) metal::exp(x)
#define PV_MAX(a, b) metal::max((a), (b))
#define PV_TABLE constant
#define PV_UNROLL
"""

VEC_HEADER = {  # the plan decode kernel's vector stores (CUDA: one aligned store of E values)
    "cuda": "#define PV_GLOBAL\ntemplate <typename T, int N> struct alignas(sizeof(T) * N) pv_vec { T v[N]; };\n",
    "metal": "#define PV_GLOBAL device\ntemplate <typename T, int N> struct pv_vec { T v[N]; };\n",
}

CUDA_PROLOGUE = """
    const unsigned int pv_gid = blockIdx.x * blockDim.x + threadIdx.x;
    const unsigned int pv_wlane = threadIdx.x & 31u;
"""

METAL_PROLOGUE = """
    const unsigned int pv_gid = thread_position_in_grid.x;
    const unsigned int pv_wlane = thread_index_in_simdgroup;
"""


@lru_cache(maxsize=None)
def hadamard_factor(m: int) -> np.ndarray:
    """The m×m ±1 matrix mx.hadamard_transform uses as the Kronecker factor for sizes m·2^k
    (transform(x) = x @ kron(M, H_2^k) up to scale), read from MLX itself on the CPU."""
    with mx.stream(mx.cpu):
        f = mx.hadamard_transform(mx.eye(m), scale=1.0)
        return np.rint(np.array(f)).astype(np.int64)


def _floats(values) -> str:
    return ", ".join(f"{float(v):.9e}f" for v in values)


def tables(cfg: KernelConfig, suffix: str = "", thresholds: bool = True) -> str:
    """The codebook (centroids, and the thresholds encode compares with) and random signs of a
    (sub-)vector as constant tables named pv_cent{suffix}, pv_thr{suffix}, pv_sign{suffix}."""
    centroids, boundaries = codebook(cfg.dim, cfg.bits)
    signs = random_signs(cfg.dim, cfg.seed)
    thr = f"PV_TABLE float pv_thr{suffix}[{len(boundaries)}] = {{{_floats(boundaries)}}};\n" if thresholds else ""
    return (f"PV_TABLE float pv_cent{suffix}[{len(centroids)}] = {{{_floats(centroids)}}};\n" + thr
            + f"PV_TABLE float pv_sign{suffix}[{cfg.dim}] = {{{_floats(signs)}}};\n")


def rotation(cfg: KernelConfig, inverse: bool, contiguous: bool = False, lane: str = "lane") -> str:
    """Code applying the rotation (forward or inverse) to u[0..E) of every lane (its lane index
    in the variable `lane`), then 1/√d. contiguous: the lane-contiguous layout (power-of-two d:
    the register index j is the low bits of i, the lane the high bits; H_d = H_32 ⊗ H_E)."""
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
        lines.append(f"{{ const bool up = ({lane} & {s}u) != 0u;")
        lines.append(f"  PV_UNROLL for (int jj = 0; jj < {e}; ++jj) {{ float p = PV_SHFL_XOR(u[jj], " + str(s)
                     + "); u[jj] = up ? (p - u[jj]) : (u[jj] + p); } }")
        s *= 2
    if m > 1:  # y[a'] = sum_a x[a] M[a][a'] (forward), x[a] = sum_a' y[a'] M[a][a'] (inverse)
        mat = hadamard_factor(m)
        for jl in range(j2):
            terms = []
            for out in range(m):
                coeffs = mat[:, out] if not inverse else mat[out, :]
                expr = " ".join(("+ " if c > 0 else "- ") + f"u[{a * j2 + jl}]" for a, c in enumerate(coeffs))
                terms.append(f"const float t{out} = {expr};")
            lines.append("{ " + " ".join(terms) + " " +
                         " ".join(f"u[{o * j2 + jl}] = t{o};" for o in range(m)) + " }")
    lines.append(f"PV_UNROLL for (int jj = 0; jj < {e}; ++jj) u[jj] *= {1.0 / np.sqrt(cfg.dim):.9e}f;")
    return "\n    ".join(lines)


def _defines(cfg: KernelConfig) -> str:
    m, k2, lanes, e = cfg.layout
    return (f"#define PV_D {cfg.dim}\n#define PV_L {lanes}\n#define PV_E {e}\n#define PV_BITS {cfg.bits}\n"
            f"#define PV_NB {cfg.dim // 8}\n#define PV_W {cfg.width}\n")


def _quantize(cfg: KernelConfig, suffix: str) -> str:
    thr = f"pv_thr{suffix}"
    if cfg.bits <= 4:  # count the thresholds below: uniform table reads
        return (f"unsigned int c = 0u;\n        PV_UNROLL for (int t = 0; t < {(1 << cfg.bits) - 1}; ++t) "
                f"c += (y > {thr}[t]) ? 1u : 0u;")
    return (f"unsigned int c = 0u;\n        PV_UNROLL for (int h = {1 << (cfg.bits - 1)}; h > 0; h >>= 1) "
            f"{{ if (y > {thr}[c + h - 1]) c += h; }}")


def _encode_part(plan: DecodePlan, p: int, part: DecodePart, suffix: str, gid: str) -> str:
    """Encode of one part of every vector, its threads numbered by `gid` (L lanes per vector):
    reads its channels of x (through perm with an outlier split), writes its codes at the part's
    byte offset and its norm at the part's index."""
    cfg = part.cfg
    m, k2, lanes, e = cfg.layout
    d, nb = plan.dim, cfg.dim // 8
    if part.chan_offset is None:
        chan = "const unsigned int ch = i;"
    else:  # perm is built by encode_arrays_with from the chosen channels: always < d
        chan = f"const unsigned int ch = (unsigned int)perm[r * {d}u + {part.chan_offset}u + i];"
    center = f"val -= (float)mean[r * {d}u + ch];" if plan.center else ""
    return f"""
    {{
    const unsigned int lane = {gid} % {lanes}u;
    const unsigned int v_raw = {gid} / {lanes}u;
    const bool active = v_raw < nvec;
    const unsigned int v = active ? v_raw : nvec - 1u;  // idle lanes still join the shuffles
    const unsigned int r = v / T;
    float u[{e}];
    float ss = 0.0f;
    PV_UNROLL for (int j = 0; j < {e}; ++j) {{
        const unsigned int i = (unsigned int)j * {lanes}u + lane;
        {chan}
        float val = (float)x[v * {d}u + ch];
        {center}
        u[j] = val;
        ss += val * val;
    }}
    PV_UNROLL for (int s = 1; s < {lanes}; s <<= 1) ss += PV_SHFL_XOR(ss, s);
    const float norm = PV_SQRT(ss);
    const float nd = PV_MAX(norm, 1e-30f);
    PV_UNROLL for (int j = 0; j < {e}; ++j) u[j] = (u[j] / nd) * pv_sign{suffix}[(unsigned int)j * {lanes}u + lane];
    {rotation(cfg, inverse=False)}
    unsigned int code[{e}];
    float dss = 0.0f;
    PV_UNROLL for (int j = 0; j < {e}; ++j) {{
        const float y = u[j];
        {_quantize(cfg, suffix)}
        code[j] = c;
        const float cv = pv_cent{suffix}[c];
        dss += cv * cv;
    }}
    PV_UNROLL for (int s = 1; s < {lanes}; s <<= 1) dss += PV_SHFL_XOR(dss, s);
    if (active && lane == 0u) norms[v * {plan.n_norms}u + {part.norm_index}u] = (NormT)(norm / PV_MAX(PV_SQRT(dss), 1e-30f));
    PV_UNROLL for (int q = 0; q < {cfg.bits}; ++q) {{
        PV_UNROLL for (int j = 0; j < {e}; ++j) {{
            const unsigned int bal = PV_BALLOT(((code[j] >> q) & 1u) != 0u);
            if (active && (lane & 7u) == 0u)
                codes[v * {plan.width}u + {part.code_offset}u + (unsigned int)q * {nb}u + (unsigned int)j * {lanes // 8}u + lane / 8u] =
                    (unsigned char)((bal >> pv_wlane) & 0xffu);
        }}
    }}
    }}"""


def encode_source(plan: DecodePlan | KernelConfig, lang: str) -> tuple[str, str]:
    """(header, body) of the fused encode kernel of a plan (a KernelConfig: its plain plan).
    Inputs: x (rows·T·d), [mean (rows·d)], [perm (rows·d) int32 with an outlier split: the
    channels of part 0, then of part 1], params int32 [n_vectors, T, warps of part 0].
    Outputs: codes (n_vectors·W) uint8, norms (n_vectors·P) NormT (P parts, raw float norms).

    The parts run in one launch: the first `params[2]` warps encode part 0 (L0 lanes per
    vector), the rest part 1, so a warp never mixes parts and its shuffles stay uniform."""
    if isinstance(plan, KernelConfig):
        plan = plain_plan(plan)
    one = len(plan.parts) == 1
    header = (CUDA_HEADER if lang == "cuda" else METAL_HEADER) + "".join(
        tables(part.cfg, "" if one else str(p)) for p, part in enumerate(plan.parts))
    body = (CUDA_PROLOGUE if lang == "cuda" else METAL_PROLOGUE) + """
    const unsigned int nvec = (unsigned int)params[0];
    const unsigned int T = (unsigned int)params[1];"""
    if one:
        return header, body + _encode_part(plan, 0, plan.parts[0], "", "pv_gid") + "\n"
    body += """
    const unsigned int warps0 = (unsigned int)params[2];
    if ((pv_gid >> 5u) < warps0) {""" + _encode_part(plan, 0, plan.parts[0], "0", "pv_gid") + """
    } else {
    const unsigned int gid1 = pv_gid - warps0 * 32u;""" + _encode_part(plan, 1, plan.parts[1], "1", "gid1") + """
    }
"""
    return header, body


def plain_plan(cfg: KernelConfig) -> DecodePlan:
    """The one-part plan of a plain (not split) spec."""
    return DecodePlan(cfg.dim, cfg.center, cfg.norm_bits, cfg.width, (DecodePart(cfg, 0, 0, None),))


def decode_source(cfg: KernelConfig, lang: str) -> tuple[str, str]:
    """(header, body) of the fused decode kernel. Inputs: codes (rows·Ts·W) uint8, norms (rows·Ts)
    float16 or uint8, [norm_range (rows·S·2) float32], [mean (rows·S·d)], rowmap int32
    (n_rows·2: source token or -1 for a zero row, segment), params int32 [rows, Ts, n_rows, S].
    Output: out (rows·n_rows·d) OutT."""
    header = (CUDA_HEADER if lang == "cuda" else METAL_HEADER) + _defines(cfg) + tables(cfg)
    if cfg.norm_bits == 8:
        norm = """const unsigned int nl = (unsigned int)norms[sv];
    const unsigned int rs = (r * S + seg) * 2u;
    const float nrm = nl > 0u ? PV_EXP(norm_range[rs] + ((float)nl - 1.0f) * norm_range[rs + 1u]) : 0.0f;"""
    else:
        norm = "const float nrm = (float)norms[sv];"
    mean = "val += (float)mean[(r * S + seg) * PV_D + i];" if cfg.center else ""
    contig = contiguous(cfg)
    if contig:
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
    body = (CUDA_PROLOGUE if lang == "cuda" else METAL_PROLOGUE) + f"""
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
    {rotation(cfg, inverse=True, contiguous=contig)}
    {norm}
    PV_UNROLL for (int j = 0; j < PV_E; ++j) {{
        const unsigned int i = {index};
        float val = (u[j] * pv_sign[i]) * nrm;
        {mean}
        if (active) out[v * PV_D + i] = (OutT)(src < 0 ? 0.0f : val);
    }}
"""
    return header, body

