"""The fused kernels' generated CUDA source, compiled for the CPU (tests/simt.py) and compared with
the pure-MLX reference: the plan kernel of the outlier split (the default key codec), the encode
of the split, restore with lossless sink rows, the per-config check before first use.

The plain kernels were checked on an H100 (README.md (Speed)); running them here too checks the
harness itself. The plan kernel has not run on a GPU yet: these tests are its evidence so far.
"""

import warnings

import mlx.core as mx
import numpy as np
import pytest

from promptvault.codec import CodecSpec, KVCodec, kernels
from promptvault.codec.kernels import choice as kbackend, plan_source
from promptvault.bench.kernels import _ulps
from promptvault.codec.turboquant import decode_arrays, encode_arrays
import simt  # tests/simt.py (pytest puts tests/ on sys.path)

pytestmark = pytest.mark.skipif(simt.CXX is None, reason="needs a C++20 compiler (g++) for the SIMT harness")

K_DEFAULT = CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6)


@pytest.fixture(autouse=True)
def emulated_cuda(monkeypatch):
    """mx.fast.cuda_kernel replaced by the CPU harness; fresh kernel caches and selection."""
    monkeypatch.setattr(mx.fast, "cuda_kernel", simt.cuda_kernel, raising=False)
    monkeypatch.delenv("PROMPTVAULT_FUSED", raising=False)
    monkeypatch.setattr(kernels.KNOBS, "warps", 16)  # few warps, each looping over many items
    kernels.clear_kernels()
    kernels.reset()
    simt.launches.clear()
    yield
    kernels.clear_kernels()
    kernels.reset()


def _data(shape, dtype, seed):
    k1, k2 = mx.random.split(mx.random.key(seed))
    chan = mx.random.normal((shape[-1],), key=k2)
    x = mx.random.normal(shape, key=k1) * (1.0 + 4.0 * (mx.abs(chan) > 1.5)) + 0.5 * chan
    return x.astype(dtype)


def _max_ulps(have, want, dtype=mx.float16):
    """The GPU check's own metric (bench.kernels._ulps), after checking that every output
    element was written (outputs start as NaN in the harness)."""
    assert not np.isnan(np.array(have.astype(mx.float32))).any(), "an output element was never written"
    return _ulps(have, want, dtype)


def _decode(arrays, spec, dim, dtype, rowmap=None, n_rows=None):
    n = arrays["codes"].shape[-2]
    rowmap = kernels.identity_map(n) if rowmap is None else rowmap
    return kernels.decode_rows_with("cuda", [arrays], spec, dim, dtype, rowmap, n if n_rows is None else n_rows)


def test_harness_reproduces_the_h100_checked_plain_kernels():
    spec = CodecSpec(bits=3, center=True, norm_bits=8)
    x = _data((1, 2, 40, 128), mx.float16, 1)
    ref = encode_arrays(x, spec)
    got = kernels.encode_arrays_with("cuda", x, spec)
    assert kernels.codes_match(x, spec, ref["codes"], got["codes"])[0]
    assert _max_ulps(_decode(ref, spec, 128, mx.float16), decode_arrays(ref, spec, 128, mx.float16)) <= 1
    assert simt.launches == ["pv_encode_d128_b3_s0_c1_n8", "pv_decode_d128_b3_s0_c1_n8"]


@pytest.mark.parametrize("dim, spec, dtype", [
    (128, K_DEFAULT, mx.float16),
    (128, CodecSpec(bits=3, outliers=0.25, outlier_bits=6), mx.float32),
    (256, CodecSpec(bits=2, center=True, norm_bits=8, outliers=0.25, outlier_bits=4), mx.float16),
])
def test_outlier_split_decodes_like_the_reference(dim, spec, dtype):
    x = _data((1, 3, 40, dim), dtype, dim)
    ref = encode_arrays(x, spec)
    want = decode_arrays(ref, spec, dim, dtype)
    # float16: within 1 ulp (the H100 criterion); float32: float32 sums in another order than
    # MLX's Hadamard transform move the last bits, so a few ulps
    bound = 1 if dtype == mx.float16 else 4
    assert _max_ulps(_decode(ref, spec, dim, dtype), want, dtype) <= bound
    assert simt.launches[-1].startswith("pv_pdecode_")


def test_outlier_split_decode_rows_segments_and_zero_rows():
    """Two coded tensors with their own channels, means and norm ranges, rows out of order,
    rows that no segment fills (zeros)."""
    dim, spec = 128, K_DEFAULT
    a = encode_arrays(_data((1, 2, 24, dim), mx.float16, 5), spec)
    b = encode_arrays(_data((1, 2, 16, dim), mx.float16, 6) * 3, spec)
    da, db = decode_arrays(a, spec, dim, mx.float16), decode_arrays(b, spec, dim, mx.float16)
    rowmap = np.full((48, 2), -1, dtype=np.int32)
    rowmap[0:16, 0], rowmap[0:16, 1] = np.arange(24, 40), 1  # all of b first
    rowmap[20:44, 0], rowmap[20:44, 1] = np.arange(0, 24), 0  # then a, after 4 empty rows
    out = kernels.decode_rows_with("cuda", [a, b], spec, dim, mx.float16, rowmap, 48)
    assert _max_ulps(out[..., 0:16, :], db) <= 1
    assert _max_ulps(out[..., 20:44, :], da) <= 1
    zeros = np.array(out[..., 16:20, :].astype(mx.float32)), np.array(out[..., 44:, :].astype(mx.float32))
    assert all((z == 0).all() for z in zeros)


@pytest.mark.parametrize("unroll, max_e", [(1, 8), (2, 8), (2, 4)])
@pytest.mark.parametrize("dim, spec", [(128, CodecSpec(bits=3)), (256, CodecSpec(bits=4, center=True, norm_bits=8)),
                                       (96, CodecSpec(bits=2, center=True)), (128, K_DEFAULT)])
def test_plan_kernel_variants_decode_like_the_reference(monkeypatch, unroll, max_e, dim, spec):
    """The speed variants (PROMPTVAULT_DECODE_V2 for plain specs: loop over items, unrolled
    loads, vector stores, word loads; not yet measured on a GPU)."""
    monkeypatch.setattr(kernels.KNOBS, "decode_v2", True)
    monkeypatch.setattr(kernels.KNOBS, "unroll", unroll)
    monkeypatch.setattr(kernels.KNOBS, "contiguous_max_e", max_e)
    x = _data((1, 2, 24, dim), mx.float16, 7)
    ref = encode_arrays(x, spec)
    assert _max_ulps(_decode(ref, spec, dim, mx.float16), decode_arrays(ref, spec, dim, mx.float16)) <= 1
    assert simt.launches[-1].startswith("pv_pdecode_")


@pytest.mark.parametrize("dtype", [mx.float16, mx.float32])
def test_outlier_split_encode_matches_the_reference(dtype):
    dim, spec = 128, K_DEFAULT
    x = _data((1, 2, 48, dim), dtype, 9)
    ref = encode_arrays(x, spec)
    got = kernels.encode_arrays_with("cuda", x, spec)
    assert set(got) == set(ref)
    ok, why = kernels.codes_match(x, spec, ref["codes"], got["codes"], ref["channels"], got["channels"])
    assert ok, why
    assert mx.array_equal(got["mean"], ref["mean"]).item()
    same = np.array((ref["codes"] == got["codes"]).all(axis=-1))
    steps = np.abs(np.array(ref["norms"]).astype(int) - np.array(got["norms"]).astype(int))
    assert steps[same].max() <= 1
    # both parts in one launch, reading x through the channel order (no gathered copy first)
    assert simt.launches == ["pv_encode_d32b6_d96b4_s0_c1_n8"]


def test_outlier_split_encode_of_many_heads_and_float16_norms():
    """Several heads with different channel choices, and a split without centering with float16
    norms: each vector's parts land at their byte offsets and norm indices."""
    spec = CodecSpec(bits=2, outliers=0.25, outlier_bits=4)
    x = _data((3, 4, 37, 256), mx.float32, 5)
    ref = encode_arrays(x, spec)
    got = kernels.encode_arrays_with("cuda", x, spec)
    ok, why = kernels.codes_match(x, spec, ref["codes"], got["codes"], ref["channels"], got["channels"])
    assert ok, why
    assert mx.allclose(got["norms"].astype(mx.float32), ref["norms"].astype(mx.float32), rtol=1e-3, atol=0).item()
    assert simt.launches == ["pv_encode_d64b4_d192b2_s0_c0_n16"]


def test_codes_match_judges_each_part_of_the_split():
    dim, spec = 128, K_DEFAULT
    x = _data((1, 1, 16, dim), mx.float32, 11)
    ref = encode_arrays(x, spec)
    codes, ch = ref["codes"], ref["channels"]
    assert kernels.codes_match(x, spec, codes, codes, ch, ch) == (True, "identical")
    for byte in (3, 40):  # one in the outlier part, one in the other
        changed = np.array(codes)
        changed[0, 0, 5, byte] ^= 0x10
        assert not kernels.codes_match(x, spec, codes, mx.array(changed), ch, ch)[0]
    other = np.array(ch)
    other[0, 0, 0, 0] = (int(other[0, 0, 0, 0]) + 1) % dim
    assert kernels.codes_match(x, spec, codes, codes, ch, mx.array(other)) == (False, "outlier channels differ")


def test_config_check_passes_and_use_fused_takes_the_split(monkeypatch):
    monkeypatch.setattr(kbackend, "backend", lambda: "cuda")
    assert kernels.config_check("cuda", K_DEFAULT, 128, mx.float16) == (True, "ok")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert kernels.use_fused(K_DEFAULT, 128, mx.float16) == "cuda"


def test_a_wrong_plan_kernel_fails_its_check_and_the_reference_is_used(monkeypatch):
    monkeypatch.setattr(kbackend, "backend", lambda: "cuda")
    real = plan_source.decode_tables

    def wrong_sign(p, cfg):  # the first sign of each part's table flipped
        return real(p, cfg).replace(f"pv_sign{p}[{cfg.dim}] = {{", f"pv_sign{p}[{cfg.dim}] = {{-1.0f * ", 1)

    monkeypatch.setattr(plan_source, "decode_tables", wrong_sign)
    with pytest.warns(RuntimeWarning, match="failed its check against the reference"):
        assert kernels.use_fused(K_DEFAULT, 128, mx.float16) is None
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # decided once per config: no second warning
        assert kernels.use_fused(K_DEFAULT, 128, mx.float16) is None
    assert kernels.use_fused(CodecSpec(bits=3), 128, mx.float16) == "cuda"  # the checked plain kernel is unaffected


def test_restore_with_the_default_codec_goes_through_the_kernels(monkeypatch):
    """DEFAULT_CODEC: outlier-split keys, 3-bit values, a lossless sink row (token 0). Before,
    the sink's lossless segment sent every layer to the per-segment reference path."""
    from mlx_lm.models.cache import KVCache

    from promptvault.vault import caches
    from promptvault.vault.vault import DEFAULT_CODEC

    n, block = 40, 16
    cache = [KVCache() for _ in range(2)]
    payloads = []
    for start in range(0, n, block):
        end = min(start + block, n)
        for layer, c in enumerate(cache):
            c.update_and_fetch(_data((1, 2, end - start, 128), mx.float16, 100 * layer + start + 1),
                               _data((1, 2, end - start, 128), mx.float16, 100 * layer + start + 2))
        payloads.append(caches.encode_block(cache, start, end, DEFAULT_CODEC))
    restored = {}
    monkeypatch.setattr(kbackend, "_platform", lambda: "cuda")
    for mode in ("0", "1"):
        monkeypatch.setenv("PROMPTVAULT_FUSED", mode)
        kernels.reset()
        if mode == "1":
            assert kernels.use_fused(DEFAULT_CODEC.keys, 128, mx.float16) == "cuda"  # its check runs here
        simt.launches.clear()
        restored[mode] = caches.restore_cache(None, payloads, n - 3)
        launched = [k for k in simt.launches if "decode" in k]
        if mode == "1":  # one launch per layer group (both layers here) for keys (plan kernel), one for values
            assert sum(k.startswith("pv_pdecode_") for k in launched) == 1
            assert sum(k.startswith("pv_decode_d128_b3") for k in launched) == 1
        else:
            assert launched == []
    for ref, got in zip(restored["0"], restored["1"]):
        assert ref.offset == got.offset and ref.keys.shape == got.keys.shape
        assert _max_ulps(got.keys[..., : ref.offset, :], ref.keys[..., : ref.offset, :]) <= 1
        assert _max_ulps(got.values[..., : ref.offset, :], ref.values[..., : ref.offset, :]) <= 1
        # the sink row is exact (lossless), as in the reference
        assert mx.array_equal(got.keys[..., 0, :], ref.keys[..., 0, :]).item()


def test_bench_kernels_check_bench_and_sweep_run(monkeypatch):
    """The GPU bench's own code (python -m promptvault.bench.kernels), run small on the harness,
    so a device run is not spent on a bug in it."""
    from promptvault.bench import kernels as kbench

    monkeypatch.setattr(kbackend, "_platform", lambda: "cuda")
    monkeypatch.setattr(kbench, "_CHECK_SHAPE", (1, 2, 16))
    monkeypatch.setattr(kbench, "_time", lambda fn, reps=7: (mx.eval(fn()), 1e-3)[1])
    rows = kbench.check(dims=(128,), bits_list=(3,), dtypes=(mx.float16,))
    assert len(rows) == 2 + 3 * 2 and all(r["pass"] for r in rows), [r for r in rows if not r["pass"]]
    assert sum(r["outliers"] > 0 for r in rows) == 6
    result = kbench.bench(dims=(128,), bits_list=(3,), elements=2**16)
    table = kbench.format_bench(result)
    assert "| tq3 | 128 |" in table and "| K default | 128 |" in table and "| V default | 256 |" in table
    sweep = kbench.sweep(elements=2**15, settings=[(None, None, None), (16, 2, 8)],
                          specs=[(128, CodecSpec(bits=3)), (128, K_DEFAULT)])
    assert not [r for r in sweep if "error" in r] and all(r["max_ulps"] <= 1 for r in sweep)
    assert {r["kernel"] for r in sweep} == {"v1", "plan"}
