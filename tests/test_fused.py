"""Fused GPU kernels (promptvault.codec.kernels): what can run without a GPU.

The kernels themselves are checked on an NVIDIA GPU against the reference
(`python -m promptvault.bench.kernels --check`, results in README.md (Speed)). Here: the selection
rule (CUDA as is, Metal only after its self-check, one warning on failure, CPU → reference),
the self-check's comparison logic fed with right and wrong implementations, the capability
check, the generated kernel source of both languages, and the CPU path staying the reference.
"""

import re
import warnings

import mlx.core as mx
import numpy as np
import pytest

from promptvault.codec import CodecSpec, decode, encode, kernels
from promptvault.codec.kernels import choice as kbackend, plan_source, source
from promptvault.codec.codebook import codebook
from promptvault.codec.rotation import random_signs
from promptvault.codec.turboquant import decode_arrays, encode_arrays


@pytest.fixture(autouse=True)
def fresh_selection(monkeypatch):
    monkeypatch.delenv("PROMPTVAULT_FUSED", raising=False)
    kernels.reset()
    yield
    kernels.reset()


def _reference_decode(arrays, spec, dim, dtype):
    return decode_arrays(arrays, spec, dim, dtype)


# ---- selection ----------------------------------------------------------------------------------

def test_cpu_selects_the_reference_and_codec_output_is_the_reference():
    assert kernels.backend() == "reference"
    x = (mx.random.normal((2, 4, 40, 128), key=mx.random.key(1)) * 2).astype(mx.float16)
    spec = CodecSpec(bits=3, center=True)
    enc = encode(x, spec)
    ref = encode_arrays(x, spec)
    assert set(enc.arrays) == set(ref)
    for name in ref:
        assert mx.array_equal(enc.arrays[name], ref[name]).item(), name
    assert mx.array_equal(decode(enc), decode_arrays(ref, spec, 128, mx.float16)).item()


def test_cuda_platform_selects_cuda_without_a_check():
    calls = []
    assert kbackend._choose("cuda", lambda lang: calls.append(lang) or (False, "never asked")) == "cuda"
    assert calls == []


def test_env_switch_turns_the_kernels_off(monkeypatch):
    monkeypatch.setenv("PROMPTVAULT_FUSED", "0")
    assert kbackend._choose("cuda", lambda lang: (True, "ok")) == "reference"
    assert kbackend._choose("metal", lambda lang: (True, "ok")) == "reference"


def test_metal_is_used_only_after_its_self_check_passes():
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # a passing check warns nothing
        chosen = kbackend._choose("metal", lambda lang: kernels.self_check(
            lang, encode_impl=encode_arrays, decode_impl=_reference_decode))
    assert chosen == "metal"


def test_failed_metal_check_warns_once_and_the_process_uses_the_reference(monkeypatch):
    calls = []

    def failing_check(lang, **_):
        calls.append(lang)
        return False, "forced failure"

    monkeypatch.setattr(kbackend, "_platform", lambda: "metal")
    monkeypatch.setattr(kbackend, "self_check", failing_check)
    with pytest.warns(RuntimeWarning, match="forced failure") as record:
        assert kernels.backend() == "reference"
        assert kernels.backend() == "reference"
        assert kernels.use_fused(CodecSpec(bits=3), 128, mx.float16) is None
    assert calls == ["metal"]  # checked once per process
    assert len(record) == 1


def test_passed_metal_check_is_remembered(monkeypatch):
    calls = []
    monkeypatch.setattr(kbackend, "_platform", lambda: "metal")
    monkeypatch.setattr(kbackend, "self_check", lambda lang, **_: calls.append(lang) or (True, "ok"))
    assert kernels.backend() == "metal"
    assert kernels.use_fused(CodecSpec(bits=3), 128, mx.float16) == "metal"
    assert kernels.use_fused(CodecSpec(bits=3), 72, mx.float16) is None  # unsupported dim: reference
    assert calls == ["metal"]


# ---- the self-check's comparison logic ------------------------------------------------------------

def test_self_check_rejects_wrong_codes():
    def wrong_codes(x, spec):
        arrays = encode_arrays(x, spec)
        arrays["codes"] = arrays["codes"] ^ mx.array(1, dtype=mx.uint8)  # flip one bit per byte
        return arrays

    ok, why = kernels.self_check("metal", encode_impl=wrong_codes, decode_impl=_reference_decode)
    assert not ok and "codes differ" in why


def test_self_check_rejects_a_decode_off_by_one_percent():
    ok, why = kernels.self_check("metal", encode_impl=encode_arrays,
                               decode_impl=lambda *a: _reference_decode(*a) * 1.01)
    assert not ok and "decoded values differ" in why


def test_self_check_rejects_wrong_norms():
    def wrong_norms(x, spec):
        arrays = encode_arrays(x, spec)
        if spec.norm_bits == 16:
            arrays["norms"] = (arrays["norms"].astype(mx.float32) * 1.01).astype(mx.float16)
        return arrays

    ok, why = kernels.self_check("metal", encode_impl=wrong_norms, decode_impl=_reference_decode)
    assert not ok and "norms differ" in why


def test_self_check_turns_a_compile_error_into_a_failure():
    def broken(x, spec):
        raise RuntimeError("program_source:12: error: use of undeclared identifier")

    ok, why = kernels.self_check("metal", encode_impl=broken, decode_impl=_reference_decode)
    assert not ok and "RuntimeError" in why and "undeclared" in why


def test_codes_match_accepts_only_boundary_ties():
    spec = CodecSpec(bits=2)
    x = mx.random.normal((1, 1, 16, 64), key=mx.random.key(5)).astype(mx.float32)
    codes = encode_arrays(x, spec)["codes"]
    assert kernels.codes_match(x, spec, codes, codes) == (True, "identical")
    changed = np.array(codes)
    changed[0, 0, 3, 0] ^= 0x10
    ok, why = kernels.codes_match(x, spec, codes, mx.array(changed))
    assert not ok, why


# ---- capability --------------------------------------------------------------------------------

@pytest.mark.parametrize("dim, ok", [(64, True), (96, True), (128, True), (256, True), (192, True),
                                     (512, True), (80, False), (112, False), (72, False), (2048, False)])
def test_supported_head_dims(dim, ok):
    assert kernels.supports(CodecSpec(bits=3), dim, mx.float16) is ok


def test_specs_the_kernels_do_not_know_go_to_the_reference():
    assert kernels.supports(CodecSpec(bits=4, center=True, norm_bits=8), 128, mx.bfloat16)
    assert not kernels.supports(CodecSpec(bits=None), 128, mx.float16)
    assert not kernels.supports(CodecSpec(bits=3), 128, mx.int32)
    assert not kernels.supports(CodecSpec(bits=3), 128, mx.float16, size=2**31)
    assert not kernels.supports(CodecSpec(bits=3), 72, mx.float16)


@pytest.mark.parametrize("dim, ok", [(128, True), (256, True), (64, False), (96, False), (512, False)])
def test_outlier_split_is_supported_where_both_parts_have_a_layout(dim, ok):
    """128 → 32 + 96 channels, 256 → 64 + 192; 64 → 16 + 48 and 96 → 24 + 72 have no kernel
    layout; above 256 the stored channel indices are uint16 (the kernels read uint8)."""
    spec = CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6)
    assert kernels.supports(spec, dim, mx.float16) is ok


def test_outlier_split_plan_matches_the_stored_layout():
    spec = CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6)
    plan = kernels.decode_plan(spec, 128)
    hi, lo = plan.parts
    assert (hi.cfg.dim, hi.cfg.bits, hi.code_offset, hi.norm_index, hi.chan_offset) == (32, 6, 0, 0, 0)
    assert (lo.cfg.dim, lo.cfg.bits, lo.code_offset, lo.norm_index, lo.chan_offset) == (96, 4, 24, 1, 32)
    assert plan.width == 72 and plan.n_norms == 2 and plan.permuted and kernels.uses_plan_kernel(spec)
    assert not kernels.uses_plan_kernel(CodecSpec(bits=4, center=True, norm_bits=8))
    x = mx.random.normal((1, 2, 12, 128), key=mx.random.key(3)).astype(mx.float16)
    arrays = encode_arrays(x, spec)
    assert arrays["codes"].shape[-1] == plan.width and arrays["norms"].shape[-1] == plan.n_norms
    assert kernels.arrays_fit(arrays, spec, 128)
    assert not kernels.arrays_fit({**arrays, "channels": arrays["channels"][..., :-1]}, spec, 128)
    assert not kernels.arrays_fit({**arrays, "channels": arrays["channels"].astype(mx.uint16)}, spec, 128)
    assert not kernels.arrays_fit({k: v for k, v in arrays.items() if k != "channels"}, spec, 128)
    assert not kernels.arrays_fit({**arrays, "norm_range": arrays["norm_range"][..., :2]}, spec, 128)


def test_cpu_never_checks_or_runs_a_kernel_for_the_split(monkeypatch):
    monkeypatch.setattr(kbackend, "config_check", lambda *a, **k: pytest.fail("no check on the CPU"))
    spec = CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6)
    assert kernels.use_fused(spec, 128, mx.float16) is None


def test_the_split_is_checked_once_per_config_before_first_use(monkeypatch):
    calls = []
    monkeypatch.setattr(kbackend, "backend", lambda: "cuda")
    monkeypatch.setattr(kbackend, "config_check", lambda lang, spec, dim, dtype: calls.append((dim, dtype)) or (True, "ok"))
    spec = CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6)
    for _ in range(3):
        assert kernels.use_fused(spec, 128, mx.float16) == "cuda"
    assert kernels.use_fused(spec, 256, mx.bfloat16) == "cuda"
    assert kernels.use_fused(CodecSpec(bits=3), 128, mx.float16) == "cuda"  # plain: the H100-checked kernel, no check
    assert calls == [(128, mx.float16), (256, mx.bfloat16)]


def test_arrays_fit_rejects_arrays_a_kernel_would_misread():
    spec = CodecSpec(bits=3, center=True, norm_bits=8)
    x = mx.random.normal((2, 3, 10, 64), key=mx.random.key(2)).astype(mx.float16)
    arrays = encode_arrays(x, spec)
    assert kernels.arrays_fit(arrays, spec, 64)
    assert not kernels.arrays_fit(arrays, spec, 128)
    assert not kernels.arrays_fit({**arrays, "codes": arrays["codes"][..., :-1]}, spec, 64)
    assert not kernels.arrays_fit({**arrays, "norms": arrays["norms"].astype(mx.float16)}, spec, 64)
    assert not kernels.arrays_fit({k: v for k, v in arrays.items() if k != "mean"}, spec, 64)
    assert not kernels.arrays_fit({k: v for k, v in arrays.items() if k != "norm_range"}, spec, 64)


# ---- generated source ------------------------------------------------------------------------------

_CUDA_ONLY = ("__shfl", "__ballot", "__device__", "blockIdx", "threadIdx", "sqrtf", "expf")
_METAL_ONLY = ("simd_", "thread_position_in_grid", "metal::", "threadgroup", "constant float")


def _one_body_tables(make) -> tuple[str, dict[str, np.ndarray]]:
    """Source from make(lang) for both languages: each free of the other's words, one body that
    differs only in the language prologue; returns the CUDA body and its float tables."""
    cuda_header, cuda_body = make("cuda")
    metal_header, metal_body = make("metal")
    assert not any(w in metal_header + metal_body for w in _CUDA_ONLY)
    assert not any(w in cuda_header + cuda_body for w in _METAL_ONLY)
    strip = lambda body: body.split("pv_wlane = ", 1)[1].split("\n", 1)[1]
    assert strip(cuda_body) == strip(metal_body)
    tables = dict(re.findall(r"float (pv_\w+)\[\d+\] = \{([^}]*)\}", cuda_header))
    parse = lambda t: np.array([float(v.rstrip("f")) for v in t.split(",")], dtype=np.float32)
    return cuda_body, {name: parse(t) for name, t in tables.items()}


@pytest.mark.parametrize("dim, bits, center, norm_bits", [(128, 3, False, 16), (96, 4, True, 8),
                                                          (256, 6, True, 16), (64, 1, False, 8)])
def test_kernel_sources_share_one_body_and_carry_the_codec_constants(dim, bits, center, norm_bits):
    cfg = kernels.KernelConfig(dim, bits, 5, center, norm_bits)
    for make in (source.encode_source, source.decode_source):
        cuda_body, tables = _one_body_tables(lambda lang: make(cfg, lang))
        centroids, boundaries = codebook(dim, bits)
        np.testing.assert_array_equal(tables["pv_cent"], centroids)
        np.testing.assert_array_equal(tables["pv_thr"], boundaries)
        np.testing.assert_array_equal(tables["pv_sign"], random_signs(dim, 5))
        assert ("mean[" in cuda_body) is center


@pytest.mark.parametrize("dim, spec", [
    (128, CodecSpec(bits=4, center=True, norm_bits=8, outliers=0.25, outlier_bits=6)),
    (256, CodecSpec(bits=2, outliers=0.25, outlier_bits=4)),
    (128, CodecSpec(bits=3, center=True, norm_bits=8)),
])
def test_plan_kernel_source_shares_one_body_and_carries_each_parts_constants(dim, spec):
    plan = kernels.decode_plan(spec, dim, unroll=2)
    cuda_body, tables = _one_body_tables(lambda lang: plan_source.plan_decode_source(plan, lang))
    for p, part in enumerate(plan.parts):
        np.testing.assert_array_equal(tables[f"pv_cent{p}"], codebook(part.cfg.dim, part.cfg.bits)[0])
        np.testing.assert_array_equal(tables[f"pv_sign{p}"], random_signs(part.cfg.dim, spec.seed))
    assert ("perm[" in cuda_body) is bool(spec.outliers)
    if spec.outliers:  # a stored channel index never takes a write out of the row
        assert "c0 < PV_D ? c0 : PV_D - 1u" in cuda_body


def test_non_power_of_two_factor_is_the_matrix_mlx_uses():
    m = source.hadamard_factor(12)
    with mx.stream(mx.cpu):
        direct = np.array(mx.hadamard_transform(mx.eye(96), scale=1.0))
    h8 = np.array([[1.0]])
    while h8.shape[0] < 8:
        h8 = np.block([[h8, h8], [h8, -h8]])
    np.testing.assert_array_equal(np.kron(m, h8), direct)
    assert (m @ m.T == 12 * np.eye(12)).all()


def test_bench_kernels_cpu_table_runs_and_the_stacked_decode_is_bit_identical():
    """`promptvault bench kernels --cpu` (tiny): one row per default spec and head dim, and every
    layer of a stacked decode decodes to the bits of its own decode."""
    from promptvault.bench.kernels_cpu import cpu_table, format_cpu_table

    rows = cpu_table(dims=(64,), heads=2, tokens=64, layers=3, reps=1)
    assert [r["codec"] for r in rows] == ["K default", "V default"]
    assert all(r["stacked_bit_identical"] and r["decode_GBs"] > 0 and r["encode_GBs"] > 0 for r in rows)
    table = format_cpu_table(rows, (1.0, 1.0, 1.0))
    assert "| K default (4cn8o25x6) | 64 |" in table and "load average 1.0" in table


def test_a_stacked_tensor_decodes_in_pieces_to_the_bits_of_each_layer():
    """Above the piece size the pure-MLX path works in cache-sized pieces of rows and tokens; a
    layer (and a token range) must decode to the same bits whatever it is decoded with."""
    from promptvault.codec import turboquant as tq
    from promptvault.vault.vault import DEFAULT_CODEC

    x = mx.random.normal((3, 1, 2, 700, 64), key=mx.random.key(3)).astype(mx.float16)
    for spec in (DEFAULT_CODEC.keys, DEFAULT_CODEC.values):
        enc = encode(x, spec)
        whole = decode(enc)
        assert enc.nbytes and x.size > tq._SPLIT_ABOVE
        for layer in range(3):
            alone = encode(x[layer], spec)
            for name in enc.arrays:  # encoding in pieces: the same bytes as the layer alone
                assert mx.array_equal(enc.arrays[name][layer], alone.arrays[name]).item(), name
            assert mx.array_equal(whole[layer], decode(alone)).item()
        assert mx.array_equal(decode(enc.slice_tokens(100, 650)), whole[..., 100:650, :]).item()
