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
    reference on an H100: docs/speed.md);
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

_FP16_MAX = 65504.0
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
    added later) must be at their defaults: the spec must equal one rebuilt from the known fields."""
    if spec.lossless or not 1 <= spec.bits <= 8 or spec.norm_bits not in (8, 16):
        return False
    try:
        known = CodecSpec(bits=spec.bits, seed=spec.seed, center=spec.center, norm_bits=spec.norm_bits)
    except (TypeError, ValueError):
        return False
    if known != spec:
        return False
    if dtype not in (mx.float16, mx.bfloat16, mx.float32):
        return False
    return _layout(dim) is not None and size < _MAX_ELEMS


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


def _contiguous(cfg: KernelConfig) -> bool:
    """Decode layout: for power-of-two d ≤ 128, lane l holds the E ≤ 4 adjacent coordinates
    i = l·E + j (one byte load per bit-plane); otherwise i = j·L + l. Measured on the H100
    (docs/speed.md): +10–35% decode GB/s at d = 64 / 128, but −40% at d = 256 (E = 8: a warp's
    stores spread over 16-byte strides), so d = 256 keeps the strided layout."""
    m, k2, lanes, e = cfg.layout
    return m == 1 and lanes == 32 and e <= 4


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
        inputs = ["codes", "norms"] + (["norm_range"] if cfg.norm_bits == 8 else []) \
            + (["mean"] if cfg.center else []) + ["rowmap", "params"]
        outputs = ["out"]
    make = mx.fast.cuda_kernel if lang == "cuda" else mx.fast.metal_kernel
    return make(name=tag, input_names=inputs, output_names=outputs, source=body, header=header,
                ensure_row_contiguous=True)


def _grid(n_vectors: int, lanes: int) -> tuple[int, int, int]:
    threads = n_vectors * lanes
    return ((threads + _TG - 1) // _TG * _TG, 1, 1)


def _cfg(spec: CodecSpec, dim: int) -> KernelConfig:
    return KernelConfig(dim, spec.bits, spec.seed, spec.center, spec.norm_bits)


def encode_arrays_with(lang: str, x: mx.array, spec: CodecSpec) -> dict[str, mx.array]:
    """The reference's `encode_arrays(x, spec)`, computed by the fused kernel of `lang`."""
    from promptvault.codec.turboquant import _log_norms

    dim = x.shape[-1]
    cfg = _cfg(spec, dim)
    lead, tokens = x.shape[:-2], x.shape[-2]
    rows = int(np.prod(lead)) if lead else 1
    n = rows * tokens
    arrays = {}
    inputs = [x]
    if spec.center:
        mean = mx.mean(x.astype(mx.float32), axis=-2, keepdims=True).astype(x.dtype)
        arrays["mean"] = mean
        inputs.append(mean)
    inputs.append(mx.array([n, tokens], dtype=mx.int32))
    norm_dtype = mx.float16 if spec.norm_bits == 16 else mx.float32
    codes, norms = _kernel("encode", cfg, lang)(
        inputs=inputs, template=[("NormT", norm_dtype)], grid=_grid(n, cfg.layout[2]),
        threadgroup=(_TG, 1, 1), output_shapes=[(*lead, tokens, cfg.width), (*lead, tokens, 1)],
        output_dtypes=[mx.uint8, norm_dtype])
    arrays["codes"] = codes
    if spec.norm_bits == 8:
        arrays.update(_log_norms(norms))
        return arrays
    if not mx.all(mx.isfinite(norms)).item():
        from promptvault.codec.turboquant import encode_arrays

        return encode_arrays(x, spec)  # raises the reference's overflow error
    arrays["norms"] = norms
    return arrays


def arrays_fit(arrays: dict[str, mx.array], spec: CodecSpec, dim: int) -> bool:
    """The coded arrays have exactly the shapes and dtypes the kernels index (a kernel must
    never read out of bounds, whatever a shard says)."""
    codes, norms = arrays.get("codes"), arrays.get("norms")
    if codes is None or norms is None or codes.dtype != mx.uint8 or codes.ndim < 2:
        return False
    lead = tuple(codes.shape[:-1])
    if codes.shape[-1] != spec.bits * (dim // 8) or tuple(norms.shape) != (*lead, 1):
        return False
    if norms.dtype != (mx.float16 if spec.norm_bits == 16 else mx.uint8):
        return False
    one = (*lead[:-1], 1)
    if spec.norm_bits == 8:
        rng = arrays.get("norm_range")
        if rng is None or rng.dtype != mx.float32 or tuple(rng.shape) != (*one, 2):
            return False
    if spec.center:
        mean = arrays.get("mean")
        if mean is None or tuple(mean.shape) != (*one, dim):
            return False
    return True


def decode_rows_with(lang: str, parts: list[dict[str, mx.array]], spec: CodecSpec, dim: int,
                     dtype, rowmap: np.ndarray, n_rows: int) -> mx.array:
    """Decode in one launch rows of several coded tensors (same spec, dim, leading shape) into
    one (..., n_rows, dim) array: row t takes token rowmap[t, 0] of the tokens of `parts`
    concatenated (segment rowmap[t, 1] for its mean / norm range), or zeros where it is -1."""
    cfg = _cfg(spec, dim)

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
    inputs.append(mx.array(np.ascontiguousarray(rowmap, dtype=np.int32)))
    inputs.append(mx.array([rows, t_src, n_rows, len(parts)], dtype=mx.int32))
    (out,) = _kernel("decode", cfg, lang)(
        inputs=inputs, template=[("OutT", dtype)], grid=_grid(rows * n_rows, cfg.layout[2]),
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
    96, 1–4 bits, centered and 8-bit norms included). (ok, reason).

    Encode must give the reference's codes (a coordinate may differ only where the reference's
    rotated value lies within 1e-5 of a codebook boundary, i.e. a float rounding tie) and its
    norms within 1e-3; decode of the reference's arrays must match the reference's decode
    within 2 float16 ulps. Any exception (a compile error) is a failure."""
    from promptvault.codec.turboquant import decode_arrays, encode_arrays

    enc = encode_impl or (lambda x, spec: encode_arrays_with(lang, x, spec))
    dec = decode_impl or (lambda arrays, spec, dim, dtype: decode_rows_with(
        lang, [arrays], spec, dim, dtype, identity_map(arrays["codes"].shape[-2]), arrays["codes"].shape[-2]))
    try:
        key = mx.random.key(seed)
        cases = [(128, 3, False, 16), (128, 4, True, 8), (96, 2, True, 16), (128, 1, False, 16)]
        for dim, bits, center, norm_bits in cases:
            spec = CodecSpec(bits=bits, seed=7, center=center, norm_bits=norm_bits)
            key, sub = mx.random.split(key)
            x = (mx.random.normal((2, 3, 64, dim), key=sub) * 3.0 + 0.5).astype(mx.float16)
            ref = encode_arrays(x, spec)
            got = enc(x, spec)
            if set(got) != set(ref):
                return False, f"encode arrays {sorted(got)} != {sorted(ref)}"
            ok, why = _codes_match(x, spec, ref["codes"], got["codes"])
            if not ok:
                return False, f"d={dim} b={bits}: {why}"
            if norm_bits == 16:
                rn, gn = ref["norms"].astype(mx.float32), got["norms"].astype(mx.float32)
                if not mx.allclose(gn, rn, rtol=1e-3, atol=0).item():
                    return False, f"d={dim} b={bits}: norms differ"
            want = decode_arrays(ref, spec, dim, mx.float16).astype(mx.float32)
            have = dec(ref, spec, dim, mx.float16).astype(mx.float32)
            if tuple(have.shape) != tuple(want.shape):
                return False, f"decode shape {have.shape} != {want.shape}"
            rms = mx.sqrt(mx.mean(want * want, axis=-1, keepdims=True))
            ulp = mx.maximum(mx.abs(want), rms / 64) * 2.0**-10  # near-zero sums cancel: see docs
            if not mx.all(mx.abs(have - want) <= 2 * ulp).item():
                return False, f"d={dim} b={bits}: decoded values differ by more than 2 float16 ulps"
    except Exception as err:  # a kernel that does not compile or run fails the check
        return False, f"{type(err).__name__}: {err}"
    return True, "ok"


def identity_map(n: int) -> np.ndarray:
    out = np.zeros((n, 2), dtype=np.int32)
    out[:, 0] = np.arange(n)
    return out


def _codes_match(x, spec: CodecSpec, ref_codes, got_codes) -> tuple[bool, str]:
    """Codes equal, except where the reference value sits on a boundary (rounding ties)."""
    from promptvault.codec.packing import unpack_bits
    from promptvault.codec.rotation import rotate

    dim = x.shape[-1]
    if ref_codes.shape != got_codes.shape:
        return False, f"codes shape {got_codes.shape} != {ref_codes.shape}"
    r = unpack_bits(ref_codes, spec.bits, dim)
    g = unpack_bits(got_codes, spec.bits, dim)
    diff = r != g
    if not mx.any(diff).item():
        return True, "identical"
    v = x.astype(mx.float32)
    if spec.center:
        v = v - mx.mean(v, axis=-2, keepdims=True).astype(x.dtype).astype(mx.float32)
    unit = v / mx.maximum(mx.sqrt(mx.sum(v * v, axis=-1, keepdims=True)), 1e-30)
    y = rotate(unit, mx.array(random_signs(dim, spec.seed)))
    _, boundaries = codebook(dim, spec.bits)
    dist = mx.min(mx.abs(y[..., None] - mx.array(boundaries)), axis=-1)
    far = mx.logical_and(diff, dist > 1e-5)
    if mx.any(far).item():
        return False, f"{int(mx.sum(far).item())} codes differ away from a boundary"
    if mx.any(mx.abs(r.astype(mx.int32) - g.astype(mx.int32)) > 1).item():
        return False, "codes differ by more than one level"
    return True, f"{int(mx.sum(diff).item())} boundary ties"


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
    """Forget the selection (tests; a changed default device)."""
    with _lock:
        _state.clear()


def use_fused(spec: CodecSpec, dim: int, dtype, size: int = 0) -> str | None:
    """The kernel language to use for this spec/tensor, or None for the reference."""
    if not supports(spec, dim, dtype, size):
        return None
    lang = backend()
    return None if lang == "reference" else lang
