"""Fused kernels vs the pure-MLX reference on a GPU: correctness, then encode/decode GB/s next to
the measured copy bandwidth (`promptvault bench kernels`; its --cpu table is bench/kernels_cpu.py).

    promptvault bench kernels --check --bench --restore --out kb.json

--check   per bits 1–4, head dim 64/96/128/256, dtype float16/bfloat16, plain and centered with
          8-bit norms, and outlier splits (share 0.25; K4/6, K3/6, K2/4 bits; centered with 8-bit
          norms in both dtypes, plain in float16) where the kernels take them: codes byte-identical to the reference (any difference must be a rounding
          tie on a codebook boundary, counted), float16 norms, decoded values within float16
          rounding (max difference in units of the output dtype's ulp).
--bench   GB/s (bytes read + bytes written, once each) of reference and fused encode / decode at
          2/3/4 bits and d = 64/128/256 on 2^27 float16 elements, and of a plain copy (x + 0).
--restore restore_cache of a random KVCache / RotatingKVCache with the fused path vs the reference.
--sweep   decode GB/s and max ulps of the checked plain kernel and of the plan kernel under its
          tuning knobs (warps, unroll, contiguous layout): what PROMPTVAULT_DECODE_V2 would ship.
"""

from __future__ import annotations

import json
import os
import time

import mlx.core as mx
import numpy as np

from promptvault.codec import CodecSpec, kernels
from promptvault.codec.turboquant import decode_arrays, encode_arrays


class NoKernels(RuntimeError):
    """The GPU parts of the bench were asked for where no fused backend runs."""


def _lang() -> str:
    lang = kernels.backend()
    if lang == "reference":
        raise NoKernels("no fused backend on this device (needs MLX's CUDA backend or Metal); "
                        "--cpu measures the pure-MLX codec")
    return lang


def _data(shape, dtype, seed):
    """Random vectors with a per-channel offset and a few outlier channels (like real keys)."""
    key = mx.random.key(seed)
    k1, k2 = mx.random.split(key)
    x = mx.random.normal(shape, key=k1)
    chan = mx.random.normal((shape[-1],), key=k2)
    x = x * (1.0 + 4.0 * (mx.abs(chan) > 2.0)) + 0.5 * chan
    return x.astype(dtype)


def _ulps(have, want, dtype) -> float:
    """Max |have - want| in ulps of the output dtype, the ulp taken at max(|want|, rms/64) with rms
    the vector's RMS: near-zero outputs are sums that cancel, where float32 summation order
    alone moves the result by ~1e-7 of the norm, far below float16 rounding of the vector."""
    eps = {mx.float16: 2.0**-10, mx.bfloat16: 2.0**-7, mx.float32: 2.0**-23}[dtype]
    h, w = have.astype(mx.float32), want.astype(mx.float32)
    rms = mx.sqrt(mx.mean(w * w, axis=-1, keepdims=True))
    mag = mx.maximum(mx.abs(w), mx.maximum(rms / 64, 1e-30))
    ulp = mx.power(2.0, mx.floor(mx.log2(mag))) * eps
    return float(mx.max(mx.abs(h - w) / ulp).item())


_OUTLIER_CASES = ((4, 6), (3, 6), (2, 4))  # (bits, outlier_bits) with an outlier split, d = 128 / 256


def _cases(dims, bits_list, dtypes):
    """(dim, dtype, spec) of every --check case: plain with float16 norms and centered with
    8-bit norms per bits / dim / dtype, then outlier splits (share 0.25, centered, 8-bit norms:
    the shape of the default key codec) where the kernels take the split (d = 128, 256)."""
    for dim in dims:
        for bits in bits_list:
            for dtype in dtypes:
                for center, norm_bits in ((False, 16), (True, 8)):
                    yield dim, dtype, CodecSpec(bits=bits, seed=3, center=center, norm_bits=norm_bits)
    for dim in dims:
        for bits, ob in _OUTLIER_CASES:
            spec = CodecSpec(bits=bits, seed=3, center=True, norm_bits=8, outliers=0.25, outlier_bits=ob)
            if kernels.supports(spec, dim, mx.float16):
                for dtype in dtypes:
                    yield dim, dtype, spec
                yield dim, mx.float16, CodecSpec(bits=bits, seed=3, outliers=0.25, outlier_bits=ob)


def check(dims=(64, 96, 128, 256), bits_list=(1, 2, 3, 4), dtypes=(mx.float16, mx.bfloat16)) -> list[dict]:
    """Every case against the reference (see the module docstring)."""
    lang = _lang()
    rows = []
    for seed, (dim, dtype, spec) in enumerate(_cases(dims, bits_list, dtypes), start=1):
        try:
            row = _check_case(lang, dim, dtype, spec, seed)
        except Exception as err:  # a failing case is reported, the other cases still run
            row = {"dim": dim, "spec": str(spec), "dtype": str(dtype).split(".")[-1], "pass": False,
                   "error": f"{type(err).__name__}: {err}"[:2000]}
        rows.append(row)
        print(json.dumps(row), flush=True)
    return rows


_CHECK_SHAPE = (4, 8, 1024)  # batch, heads, tokens of each --check case


def _check_case(lang, dim, dtype, spec, seed) -> dict:
    x = _data((*_CHECK_SHAPE, dim), dtype, seed)
    ref = encode_arrays(x, spec)
    got = kernels.encode_arrays_with(lang, x, spec)
    mx.eval(ref, got)
    if set(got) != set(ref):
        raise ValueError(f"encode arrays {sorted(got)} != {sorted(ref)}")
    rc, gc = np.array(ref["codes"]), np.array(got["codes"])
    ok, why = kernels.codes_match(x, spec, ref["codes"], got["codes"], ref.get("channels"), got.get("channels"))
    same = (rc == gc).all(axis=-1).reshape(-1)  # vectors whose codes all match
    if spec.norm_bits == 16:  # positive float16: bit patterns order like values
        rn = np.array(ref["norms"]).view(np.uint16).astype(np.int64)
        gn = np.array(got["norms"]).view(np.uint16).astype(np.int64)
    else:
        rn, gn = np.array(ref["norms"]).astype(np.int64), np.array(got["norms"]).astype(np.int64)
    steps = np.abs(rn - gn).reshape(same.size, -1)[same]
    n = x.shape[-2]
    want = decode_arrays(ref, spec, dim, dtype)
    have = kernels.decode_rows_with(lang, [ref], spec, dim, dtype, kernels.identity_map(n), n)
    own = kernels.decode_rows_with(lang, [got], spec, dim, dtype, kernels.identity_map(n), n)
    xf = x.astype(mx.float32)
    err_ref = float((mx.sum((want.astype(mx.float32) - xf) ** 2) / mx.sum(xf * xf)).item())
    err_fused = float((mx.sum((own.astype(mx.float32) - xf) ** 2) / mx.sum(xf * xf)).item())
    row = {"dim": dim, "bits": spec.bits, "spec": str(spec), "dtype": str(dtype).split(".")[-1],
           "center": spec.center, "norm_bits": spec.norm_bits, "outliers": spec.outliers,
           "outlier_bits": spec.outlier_bits, "vectors": int(np.prod(x.shape[:-1])),
           "code_bytes_differing": int((rc != gc).sum()), "code_bytes": int(rc.size),
           "codes_ok": ok, "codes_note": why,
           "norms_differing": int((rn != gn).sum()), "norms_max_steps": int(steps.max()) if steps.size else 0,
           "vectors_with_a_tie": int((~same).sum()),
           "decode_max_ulps": _ulps(have, want, dtype),
           "rel_mse_reference": err_ref, "rel_mse_fused_roundtrip": err_fused}
    row["pass"] = bool(ok and row["decode_max_ulps"] <= 1.0 and row["norms_max_steps"] <= 1)
    return row


def _time(fn, reps=7) -> float:
    out = fn()
    mx.eval(out)
    mx.synchronize()
    times = []
    for _ in range(reps):
        mx.synchronize()
        t0 = time.perf_counter()
        out = fn()
        mx.eval(out)
        mx.synchronize()
        times.append(time.perf_counter() - t0)
        del out
    return float(np.median(times))


def _nbytes(arrays) -> int:
    return sum(a.nbytes for a in arrays.values()) if isinstance(arrays, dict) else arrays.nbytes


def _default_specs():
    from promptvault.vault.vault import DEFAULT_CODEC

    return (("K default", DEFAULT_CODEC.keys), ("V default", DEFAULT_CODEC.values))


def bench(dims=(64, 128, 256), bits_list=(2, 3, 4), elements=2**27) -> dict:
    """GB/s of reference and fused encode / decode: the plain codec at `bits_list` x `dims`,
    then the default codec's key and value specs at d = 128 and 256."""
    lang = _lang()
    x = _data((elements // 1024, 1024), mx.float16, 99)
    copy_s = _time(lambda: x + 0)
    copy = 2 * x.nbytes / copy_s / 1e9
    rows = []
    cases = [(dim, f"tq{bits}", CodecSpec(bits=bits)) for dim in dims for bits in bits_list]
    cases += [(dim, name, spec) for dim in (128, 256) for name, spec in _default_specs()]
    for dim, name, spec in cases:
        x = _data((32, 8, elements // (256 * dim), dim), mx.float16, dim)
        n = x.shape[-2]
        ref = encode_arrays(x, spec)
        mx.eval(ref)
        coded = _nbytes(ref)
        row = {"dim": dim, "bits": spec.bits, "codec": name, "spec": str(spec),
               "fused": kernels.supports(spec, dim, mx.float16), "tensor_MB": x.nbytes / 1e6, "coded_MB": coded / 1e6}
        t = _time(lambda: encode_arrays(x, spec))
        row["encode_ref_GBs"] = (x.nbytes + coded) / t / 1e9
        t = _time(lambda: decode_arrays(ref, spec, dim, mx.float16))
        row["decode_ref_GBs"] = (x.nbytes + coded) / t / 1e9
        if row["fused"]:
            t0 = time.perf_counter()
            mx.eval(kernels.encode_arrays_with(lang, x, spec))
            row["encode_fused_first_call_s"] = time.perf_counter() - t0
            t = _time(lambda: kernels.encode_arrays_with(lang, x, spec))
            row["encode_fused_GBs"] = (x.nbytes + coded) / t / 1e9
            idm = kernels.identity_map(n)
            t0 = time.perf_counter()
            mx.eval(kernels.decode_rows_with(lang, [ref], spec, dim, mx.float16, idm, n))
            row["decode_fused_first_call_s"] = time.perf_counter() - t0
            t = _time(lambda: kernels.decode_rows_with(lang, [ref], spec, dim, mx.float16, idm, n))
            row["decode_fused_GBs"] = (x.nbytes + coded) / t / 1e9
            row["decode_fused_vs_copy"] = row["decode_fused_GBs"] / copy
        rows.append(row)
        print(json.dumps(row), flush=True)
        del x, ref
    return {"copy_GBs": copy, "rows": rows}


SWEEP_SETTINGS = [(None, None, None)] + [(w, u, e) for w in (8192, 65536) for u in (1, 2) for e in (4, 8)]


def _sweep_specs():
    return ((128, CodecSpec(bits=3)), (256, CodecSpec(bits=3)), (128, CodecSpec(bits=4, center=True, norm_bits=8)),
            (128, _default_specs()[0][1]), (128, _default_specs()[1][1]))


def sweep(elements=2**27, settings=None, specs=None) -> list[dict]:
    """Fused decode GB/s and max ulps vs the reference: the H100-checked plain kernel ("v1") and
    the plan kernel under its tuning knobs (warps launched, items per iteration, contiguous
    layout up to E coordinates per lane), for choosing what plain specs should run."""
    lang = _lang()
    rows = []
    settings = SWEEP_SETTINGS if settings is None else settings
    knobs = kernels.KNOBS
    saved = (knobs.decode_v2, knobs.warps, knobs.unroll, knobs.contiguous_max_e)
    try:
        for dim, spec in (_sweep_specs() if specs is None else specs):
            x = _data((32, 8, elements // (256 * dim), dim), mx.float16, dim)
            n = x.shape[-2]
            ref = encode_arrays(x, spec)
            want = decode_arrays(ref, spec, dim, mx.float16)
            mx.eval(ref, want)
            nbytes = x.nbytes + _nbytes(ref)
            idm = kernels.identity_map(n)
            for w, u, e in settings:
                if w is None:
                    if spec.outliers:
                        continue  # no plain kernel for the split
                    knobs.decode_v2 = False
                else:
                    knobs.decode_v2, knobs.warps, knobs.unroll, knobs.contiguous_max_e = True, w, u, e
                kernels.clear_kernels()
                row = {"dim": dim, "spec": str(spec), "kernel": "v1" if w is None else "plan",
                       "warps": w, "unroll": u, "contiguous_max_e": e}
                try:
                    have = kernels.decode_rows_with(lang, [ref], spec, dim, mx.float16, idm, n)
                    row["max_ulps"] = _ulps(have, want, mx.float16)
                    del have
                    t = _time(lambda: kernels.decode_rows_with(lang, [ref], spec, dim, mx.float16, idm, n))
                    row["decode_fused_GBs"] = nbytes / t / 1e9
                except Exception as err:
                    row["error"] = f"{type(err).__name__}: {err}"[:2000]
                rows.append(row)
                print(json.dumps(row), flush=True)
            del x, ref, want
    finally:
        knobs.decode_v2, knobs.warps, knobs.unroll, knobs.contiguous_max_e = saved
        kernels.clear_kernels()
    return rows


def restore_check() -> list[dict]:
    """restore_cache through the fused path vs the reference path, on random K/V."""
    from mlx_lm.models.cache import KVCache, RotatingKVCache

    from promptvault.codec import KVCodec
    from promptvault.vault import caches

    results = []
    for name, make, n in (("KVCache", KVCache, 1000), ("RotatingKVCache", lambda: RotatingKVCache(512, keep=4), 1000)):
        from promptvault.vault.vault import DEFAULT_CODEC

        for codec in (KVCodec(CodecSpec(bits=4, center=True), CodecSpec(bits=3)),
                      KVCodec(CodecSpec(bits=2, norm_bits=8), CodecSpec(bits=4, center=True, norm_bits=8)),
                      DEFAULT_CODEC):
            cache = [make() for _ in range(2)]
            payloads = []
            for start in range(0, n, 256):
                end = min(start + 256, n)
                for c in cache:
                    k = _data((1, 8, end - start, 128), mx.bfloat16, start + 1)
                    v = _data((1, 8, end - start, 128), mx.bfloat16, start + 2)
                    c.update_and_fetch(k, v)
                payloads.append(caches.encode_block(cache, start, end, codec))
            outs = {}
            for mode in ("1", "0"):
                os.environ["PROMPTVAULT_FUSED"] = mode
                kernels.reset()
                restored = caches.restore_cache(None, payloads, n - 3)
                outs[mode] = [(c.keys, c.values, c.offset) for c in restored]
            os.environ.pop("PROMPTVAULT_FUSED")
            kernels.reset()
            worst = 0.0
            same_shape = True
            for (k1, v1, o1), (k0, v0, o0) in zip(outs["1"], outs["0"]):
                same_shape &= k1.shape == k0.shape and v1.shape == v0.shape and o1 == o0
                worst = max(worst, _ulps(k1, k0, mx.bfloat16), _ulps(v1, v0, mx.bfloat16))
            row = {"cache": name, "codec": str(codec), "same_shapes": bool(same_shape), "max_ulps": worst,
                   "pass": bool(same_shape and worst <= 1.0)}
            results.append(row)
            print(json.dumps(row), flush=True)
    return results


def format_bench(result: dict) -> str:
    lines = [f"copy (x + 0, float16, 256 MiB): {result['copy_GBs']:,.0f} GB/s",
             "| codec | d | encode ref GB/s | encode fused GB/s | decode ref GB/s | decode fused GB/s | fused decode / copy |",
             "|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if not r.get("fused", True):
            lines.append(f"| {r.get('codec', r['bits'])} | {r['dim']} | {r['encode_ref_GBs']:,.0f} | (reference) | "
                         f"{r['decode_ref_GBs']:,.0f} | (reference) | |")
            continue
        lines.append(f"| {r.get('codec', r['bits'])} | {r['dim']} | {r['encode_ref_GBs']:,.0f} | {r['encode_fused_GBs']:,.0f} | "
                     f"{r['decode_ref_GBs']:,.0f} | {r['decode_fused_GBs']:,.0f} | {100 * r['decode_fused_vs_copy']:.0f}% |")
    return "\n".join(lines)


def run(check_: bool, bench_: bool, restore: bool, sweep_: bool, dims: list[int], bits: list[int],
        dtypes: list) -> tuple[dict, bool]:
    """The GPU parts asked for: (result, failed). Progress rows go to stdout as JSON lines."""
    result = {}
    failed = False
    if sweep_:
        result["sweep"] = sweep()
    if bench_:
        result["bench"] = bench()
        print(format_bench(result["bench"]))
    if check_:
        result["check"] = check(dims=dims, bits_list=bits, dtypes=dtypes)
        failed |= not all(r["pass"] for r in result["check"])
    if restore:
        result["restore"] = restore_check()
        failed |= not all(r["pass"] for r in result["restore"])
    if check_:
        bad = [r for r in result["check"] if not r["pass"]]
        print(f"check: {len(result['check']) - len(bad)}/{len(result['check'])} cases pass")
        for r in bad:
            print("FAIL", json.dumps(r))
    return result, failed
