"""The pure-MLX codec on the CPU (no custom kernels there): encode / decode GB/s of the default
codec's key and value specs per head dim, for one layer's tensor and for all layers stacked on a
leading axis (how the vault decodes a uniform layer group: one call for every layer), plus the
bit-stability of the stacked decode (each layer decodes to the same bits as on its own).

GB/s counts the float16 tensor and its coded bytes once each, as the GPU table does.
"""

from __future__ import annotations

import time

import mlx.core as mx

from promptvault.codec.turboquant import decode_arrays, encode_arrays


def _data(shape, seed):
    """Random float16 vectors with a per-channel offset and a few loud channels (like keys)."""
    k1, k2 = mx.random.split(mx.random.key(seed))
    chan = mx.random.normal((shape[-1],), key=k2)
    return (mx.random.normal(shape, key=k1) * (1.0 + 4.0 * (mx.abs(chan) > 2.0)) + 0.5 * chan).astype(mx.float16)


def _best(fn, reps: int) -> float:
    """Fastest of `reps` timed calls after one warm call (the first call compiles): on a shared
    machine the minimum is the least disturbed figure."""
    mx.eval(fn())
    best = float("inf")
    for _ in range(reps):
        t0 = time.perf_counter()
        mx.eval(fn())
        best = min(best, time.perf_counter() - t0)
    return best


def cpu_table(dims=(64, 128, 256), heads: int = 4, tokens: int = 2048, layers: int = 8, reps: int = 3) -> list[dict]:
    """Rows per (spec, head dim): encode and decode GB/s of a (1, heads, tokens, d) tensor, decode
    GB/s of `layers` such tensors stacked (layers, 1, heads, tokens, d), and whether each layer of
    the stacked decode is bit-identical to its own decode."""
    from promptvault.vault.vault import DEFAULT_CODEC

    rows = []
    device = mx.default_device()
    mx.set_default_device(mx.cpu)
    try:
        for name, spec in (("K default", DEFAULT_CODEC.keys), ("V default", DEFAULT_CODEC.values)):
            for dim in dims:
                x = _data((layers, 1, heads, tokens, dim), dim)
                one = x[0]
                mx.eval(x)
                enc_one = encode_arrays(one, spec)
                enc_all = encode_arrays(x, spec)
                mx.eval(enc_one, enc_all)
                coded = sum(a.nbytes for a in enc_one.values())
                nbytes = one.nbytes + coded
                t_enc = _best(lambda: encode_arrays(one, spec), reps)
                t_dec = _best(lambda: decode_arrays(enc_one, spec, dim, mx.float16), reps)
                t_all = _best(lambda: decode_arrays(enc_all, spec, dim, mx.float16), reps)
                whole = decode_arrays(enc_all, spec, dim, mx.float16)
                first = decode_arrays({k: v[0] for k, v in enc_all.items()}, spec, dim, mx.float16)
                rows.append({"codec": name, "spec": str(spec), "dim": dim, "tensor_MB": one.nbytes / 1e6,
                             "coded_MB": coded / 1e6, "encode_GBs": nbytes / t_enc / 1e9,
                             "decode_GBs": nbytes / t_dec / 1e9, "layers": layers,
                             "decode_stacked_GBs": layers * nbytes / t_all / 1e9,
                             "stacked_bit_identical": bool(mx.array_equal(whole[0], first).item()),
                             "encode_ms_per_256_tokens": 1e3 * t_enc * 256 / tokens})
                del x, one, enc_one, enc_all, whole, first
    finally:
        mx.set_default_device(device)
    return rows


def format_cpu_table(rows: list[dict], load: tuple[float, float, float] | None = None) -> str:
    head = f"pure-MLX codec on the CPU (float16; {rows[0]['layers']} layers stacked)" if rows else "no rows"
    if load is not None:
        head += f"; load average {load[0]:.1f} on {_cpus()} CPUs"
    lines = [head,
             "| codec | d | encode GB/s | decode GB/s | decode stacked GB/s | stacked = per layer | encode ms / 256 tok |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['codec']} ({r['spec']}) | {r['dim']} | {r['encode_GBs']:.3f} | {r['decode_GBs']:.3f} | "
                     f"{r['decode_stacked_GBs']:.3f} | {'yes' if r['stacked_bit_identical'] else 'NO'} | "
                     f"{r['encode_ms_per_256_tokens']:.2f} |")
    return "\n".join(lines)


def _cpus() -> int:
    import os

    return os.cpu_count() or 1


def machine_load() -> tuple[float, float, float] | None:
    """The 1/5/15-minute load average (None where the OS has none): CPU figures mean little
    without it on a shared machine."""
    import os

    try:
        return os.getloadavg()
    except (AttributeError, OSError):
        return None
