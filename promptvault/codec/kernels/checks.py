"""Self-checks: the kernels of a language against the pure-MLX reference on small random batches,
run before first use where the kernels have not been checked on that hardware (Metal; the plan
decode of the outlier split everywhere). `choice` decides what runs with them.
"""

from __future__ import annotations

import mlx.core as mx

from promptvault.codec.codebook import codebook
from promptvault.codec.kernels.launch import decode_rows_with, encode_arrays_with
from promptvault.codec.kernels.layout import decode_plan, identity_map
from promptvault.codec.rotation import random_signs
from promptvault.codec.spec import CodecSpec


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
        ok, why = codes_match(x, spec, ref["codes"], got["codes"], ref.get("channels"), got.get("channels"))
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


def codes_match(x, spec: CodecSpec, ref_codes, got_codes, ref_channels=None, got_channels=None) -> tuple[bool, str]:
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
