"""Source of the plan decode kernel: one launch for all parts of a vector (the whole vector, or the
outlier and the other channels of an outlier split), written straight into the destination rows.

Each warp loops over items (an item: 32/L vectors of one part), KNOBS.unroll items per
iteration with all their loads issued before the first is computed; vector stores and 32-bit
word loads where the layout allows. It decodes the outlier split (the default key codec); plain
specs keep the H100-checked `source.decode_source` unless PROMPTVAULT_DECODE_V2=1.
"""

from __future__ import annotations

from promptvault.codec.kernels.layout import DecodePart, DecodePlan, KernelConfig, contiguous_v2, word_loads
from promptvault.codec.kernels.source import (CUDA_HEADER, CUDA_PROLOGUE, METAL_HEADER, METAL_PROLOGUE,
                                              VEC_HEADER, rotation, tables)


def decode_tables(p: int, cfg: KernelConfig) -> str:
    """Part p's centroids and signs (decode needs no thresholds)."""
    return tables(cfg, str(p), thresholds=False)


def _part_setup(plan: DecodePlan, p: int, part: DecodePart) -> str:
    """Per-thread constants of a part, hoisted out of the loop over items: lane, signs."""
    m, k2, lanes, e = part.cfg.layout
    index = f"lane{p} * {e}u + (unsigned int)j" if contiguous_v2(part.cfg) else f"(unsigned int)j * {lanes}u + lane{p}"
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
    if contiguous_v2(cfg):
        lines.append(f"""
        {{ const unsigned int i0 = {lane} * {e}u;
          PV_UNROLL for (int q = 0; q < {bits}; ++q) {{
            const unsigned int bb = ((unsigned int)codes[base{x} + (i0 >> 3u) + (unsigned int)q * {nb}u]) >> (i0 & 7u);
            PV_UNROLL for (int j = 0; j < {e}; ++j) cc{x}[j] |= ((bb >> j) & 1u) << q;
          }} }}""")
    elif word_loads(plan, part):
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
    contig = contiguous_v2(cfg)
    rot = rotation(cfg, inverse=True, contiguous=contig, lane=f"lane{p}")
    index = f"lane{p} * {e}u + (unsigned int)j" if contig else f"(unsigned int)j * {lanes}u + lane{p}"
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
        }}""" if contig else head + f"""
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
    header = ((CUDA_HEADER if lang == "cuda" else METAL_HEADER) + VEC_HEADER[lang] + f"#define PV_D {plan.dim}\n"
              + "".join(decode_tables(p, part.cfg) for p, part in enumerate(plan.parts)))
    body = (CUDA_PROLOGUE if lang == "cuda" else METAL_PROLOGUE) + f"""
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
