"""Codec benchmark: TurboQuant vs MLX's affine quantization (mx.quantize) at the same bits.

For every data set × head dim × bit width: bytes per vector on disk, ratio vs float16, relative
MSE (Σ‖x − x̂‖² / Σ‖x‖²), mean cosine, and encode / decode throughput in GB/s of float16 input.
Data sets: isotropic Gaussian vectors; synthetic keys with outlier channels (a few channels
10–20x larger with a nonzero mean), the case that breaks quantizers without a rotation; and the
real keys and values of a model after prefilling a fixed text (all layers and heads).
"""

import time

import mlx.core as mx

from promptvault.codec import CodecSpec, bytes_per_vector, decode, encode
from promptvault.codec.rotation import expected_distortion
from promptvault.tables import format_table as _format_table

AFFINE_BITS = (2, 3, 4, 5, 6, 8)
AFFINE_GROUPS = (64, 32)
_HEADS = 8
_REPEATS = 5


def gaussian_vectors(tokens: int, dim: int, seed: int) -> mx.array:
    return mx.random.normal((1, _HEADS, tokens, dim), key=mx.random.key(seed)).astype(mx.float16)


def outlier_keys(tokens: int, dim: int, seed: int) -> mx.array:
    """Gaussian keys where 4 channels per head are 10–20x larger and carry a nonzero mean."""
    k1, k2, k3 = mx.random.split(mx.random.key(seed), 3)
    base = mx.random.normal((1, _HEADS, tokens, dim), key=k1)
    channels = mx.random.randint(0, dim, (_HEADS, 4), key=k2)
    scales = mx.random.uniform(10.0, 20.0, (_HEADS, 4), key=k3)
    boost = mx.ones((_HEADS, dim))
    offset = mx.zeros((_HEADS, dim))
    for h in range(_HEADS):
        boost[h, channels[h]] = scales[h]
        offset[h, channels[h]] = 0.5 * scales[h]
    keys = base * boost[None, :, None, :] + offset[None, :, None, :]
    return keys.astype(mx.float16)


DATASETS = {"gaussian": gaussian_vectors, "outlier_keys": outlier_keys}


def real_text() -> str:
    """Fixed real text that ships with every Python: stdlib sources (code with prose docstrings)."""
    import inspect
    import json.decoder
    import textwrap

    return inspect.getsource(textwrap) + inspect.getsource(json.decoder)


def real_kv(model_spec: str | None, tokens: int) -> tuple[str, mx.array, mx.array]:
    """(model name, keys, values) of a model after prefilling `tokens` tokens of `real_text`,
    every layer's heads stacked on the head axis: (1, layers · kv_heads, tokens, head_dim), in
    float16 as a GPU cache would hold them (so affine scales cost 2 bytes, as ours do)."""
    from mlx_lm.models.cache import make_prompt_cache

    from promptvault.models import load_model
    from promptvault.tokens import encode_text

    loaded = load_model(model_spec)
    ids = encode_text(loaded.tokenizer, real_text())[:tokens]
    cache = make_prompt_cache(loaded.model)
    loaded.model(mx.array(ids)[None], cache=cache)
    keys = [c.state[0][..., : len(ids), :] for c in cache]
    values = [c.state[1][..., : len(ids), :] for c in cache]
    as_fp16 = [mx.concatenate(kv, axis=1).astype(mx.float16) for kv in (keys, values)]
    return loaded.name, *as_fp16


def _seconds(fn) -> float:
    """Best wall time of fn (which must evaluate its result) over a few runs, after a warm-up."""
    fn()
    best = float("inf")
    for _ in range(_REPEATS):
        start = time.perf_counter()
        fn()
        best = min(best, time.perf_counter() - start)
    return best


def _errors(x: mx.array, x_hat: mx.array) -> tuple[float, float]:
    x = x.astype(mx.float32)
    x_hat = x_hat.astype(mx.float32)
    rel_mse = (mx.sum((x - x_hat) ** 2) / mx.sum(x * x)).item()
    cos = mx.sum(x * x_hat, -1) / mx.maximum(mx.sqrt(mx.sum(x * x, -1) * mx.sum(x_hat * x_hat, -1)), 1e-30)
    return rel_mse, mx.mean(cos).item()


def _row(method, data, bits, dim, nbytes, x, x_hat, enc_s, dec_s, **extra) -> dict:
    rel_mse, cosine = _errors(x, x_hat)
    vectors = x.size // dim
    return {
        "method": method,
        "data": data,
        "bits": bits,
        "dim": dim,
        "bytes_per_vector": nbytes,
        "ratio_vs_fp16": 2 * dim / nbytes,
        "rel_mse": rel_mse,
        "cosine": cosine,
        "encode_gbps": x.nbytes / enc_s / 1e9,
        "decode_gbps": x.nbytes / dec_s / 1e9,
        "vectors": vectors,
        **extra,
    }


def turboquant_row(x: mx.array, data: str, spec: CodecSpec) -> dict:
    dim = x.shape[-1]
    enc = encode(x, spec)
    x_hat = decode(enc)
    enc_s = _seconds(lambda: mx.eval(encode(x, spec).arrays))
    dec_s = _seconds(lambda: mx.eval(decode(enc)))
    method = "turboquant+center" if spec.center else "turboquant"
    theory = expected_distortion(dim, spec.bits) if data == "gaussian" else None
    return _row(method, data, spec.bits, dim, bytes_per_vector(dim, spec), x, x_hat, enc_s, dec_s, theory_mse=theory)


def affine_row(x: mx.array, data: str, bits: int) -> dict | None:
    """mx.quantize at `bits`, group 64 (or 32 when the head dim needs it); None if impossible."""
    dim = x.shape[-1]
    group = next((g for g in AFFINE_GROUPS if dim % g == 0), None)
    if bits not in AFFINE_BITS or group is None:
        return None

    def quantize():
        return mx.quantize(x, group_size=group, bits=bits)

    packed, scales, biases = quantize()
    x_hat = mx.dequantize(packed, scales, biases, group_size=group, bits=bits)
    vectors = x.size // dim
    nbytes = (packed.nbytes + scales.nbytes + biases.nbytes) / vectors
    enc_s = _seconds(lambda: mx.eval(quantize()))
    dec_s = _seconds(lambda: mx.eval(mx.dequantize(packed, scales, biases, group_size=group, bits=bits)))
    return _row(f"affine-g{group}", data, bits, dim, nbytes, x, x_hat, enc_s, dec_s, theory_mse=None)


def _rows_for(x: mx.array, data: str, bits: list[int], seed: int, center: bool) -> list[dict]:
    mx.eval(x)
    rows = []
    for b in bits:
        rows.append(turboquant_row(x, data, CodecSpec(bits=b, seed=seed)))
        if center:
            rows.append(turboquant_row(x, data, CodecSpec(bits=b, seed=seed, center=True)))
        affine = affine_row(x, data, b)
        if affine is not None:
            rows.append(affine)
    return rows


def run_codec_bench(
    bits: list[int], dims: list[int], tokens: int = 4096, seed: int = 0, real_model: str | None = None,
    real: bool = True,
) -> list[dict]:
    """Rows for every data set × dim × bits: TurboQuant, TurboQuant with centering on keys,
    and affine mx.quantize where its group size divides the head dim. With `real`, also the
    keys and values of `real_model` (None: the default model) after a 1,024-token prefill."""
    rows = []
    for data, make in DATASETS.items():
        for dim in dims:
            rows += _rows_for(make(tokens, dim, seed), data, bits, seed, center=data == "outlier_keys")
    if real:
        name, keys, values = real_kv(real_model, 1024)
        rows += _rows_for(keys, f"{name} keys", bits, seed, center=True)
        rows += _rows_for(values, f"{name} values", bits, seed, center=False)
    return rows


TABLE_COLUMNS = [
    "data", "dim", "bits", "method", "bytes_per_vector", "ratio_vs_fp16",
    "rel_mse", "theory_mse", "cosine", "encode_gbps", "decode_gbps",
]


def format_table(rows: list[dict]) -> str:
    return _format_table(rows, TABLE_COLUMNS)
