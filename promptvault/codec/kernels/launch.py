"""Launches: the compiled kernels (built once per plan and language) and what each launch takes.

Encode is one launch per coded tensor whatever the spec: with an outlier split the channel
choice (energies, sort: the reference's own MLX code, so both paths pick the same channels) stays
lazy MLX work, and the kernel reads each part's channels of x through the channel order itself,
so no gathered copy of the values is made. Nothing here waits for the GPU: a step's tensors
encode as one lazy graph.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import mlx.core as mx
import numpy as np

from promptvault.codec import turboquant as tq
from promptvault.codec.kernels.layout import KNOBS, TG, DecodePlan, KernelConfig, decode_plan, grid, uses_plan_kernel
from promptvault.codec.kernels.plan_source import plan_decode_source
from promptvault.codec.kernels.source import decode_source, encode_source, plain_plan
from promptvault.codec.spec import CodecSpec


def _make(lang: str):
    return mx.fast.cuda_kernel if lang == "cuda" else mx.fast.metal_kernel


def _tag(plan: DecodePlan) -> str:
    return "_".join(f"d{p.cfg.dim}b{p.cfg.bits}" for p in plan.parts) + \
        f"_s{plan.parts[0].cfg.seed}_c{int(plan.center)}_n{plan.norm_bits}"


@lru_cache(maxsize=None)
def encode_kernel(plan: DecodePlan, lang: str):
    header, body = encode_source(plan, lang)
    inputs = ["x"] + (["mean"] if plan.center else []) + (["perm"] if plan.permuted else []) + ["params"]
    if len(plan.parts) == 1:
        cfg = plan.parts[0].cfg
        name = f"pv_encode_d{cfg.dim}_b{cfg.bits}_s{cfg.seed}_c{int(plan.center)}_n{plan.norm_bits}"
    else:
        name = "pv_encode_" + _tag(plan)
    return _make(lang)(name=name, input_names=inputs, output_names=["codes", "norms"],
                       source=body, header=header, ensure_row_contiguous=True)


@lru_cache(maxsize=None)
def decode_kernel(cfg: KernelConfig, lang: str):
    """The H100-checked plain decode kernel of one config."""
    header, body = decode_source(cfg, lang)
    tag = f"pv_decode_d{cfg.dim}_b{cfg.bits}_s{cfg.seed}_c{int(cfg.center)}_n{cfg.norm_bits}"
    return _make(lang)(name=tag, input_names=decode_input_names(plain_plan(cfg)), output_names=["out"],
                       source=body, header=header, ensure_row_contiguous=True)


@lru_cache(maxsize=None)
def plan_kernel(plan: DecodePlan, lang: str, contiguous_max_e: int):
    """The plan decode kernel (its source depends on KNOBS.contiguous_max_e: part of the key)."""
    header, body = plan_decode_source(plan, lang)
    tag = f"pv_pdecode_{_tag(plan)}_u{plan.unroll}_x{contiguous_max_e}"
    return _make(lang)(name=tag, input_names=decode_input_names(plan), output_names=["out"], source=body,
                       header=header, ensure_row_contiguous=True)


def clear_kernels() -> None:
    """Forget the compiled kernels (tests that swap the kernel factory; sweeps of the knobs)."""
    encode_kernel.cache_clear()
    decode_kernel.cache_clear()
    plan_kernel.cache_clear()


def decode_input_names(plan: DecodePlan) -> list[str]:
    return ["codes", "norms"] + (["norm_range"] if plan.norm_bits == 8 else []) \
        + (["mean"] if plan.center else []) + (["perm"] if plan.permuted else []) + ["rowmap", "params"]


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


def encode_launch(x: mx.array, mean, spec: CodecSpec, order=None) -> Launch:
    """What the encode launch over x (..., T, dim) takes (outputs: codes, then raw norms
    (..., T, parts)). order: the channel order (..., 1, dim) int32 of an outlier split."""
    dim = x.shape[-1]
    if spec.outliers:
        full = decode_plan(spec, dim, unroll=1)
        plan = DecodePlan(dim, mean is not None, spec.norm_bits, full.width, full.parts)
    else:
        plan = plain_plan(KernelConfig(dim, spec.bits, spec.seed, mean is not None, spec.norm_bits))
    lead, tokens = x.shape[:-2], x.shape[-2]
    n = (int(np.prod(lead)) if lead else 1) * tokens
    lanes = [part.cfg.layout[2] for part in plan.parts]
    warps0 = -(-n * lanes[0] // 32)
    threads = (n * lanes[0] if len(lanes) == 1 else warps0 * 32 + n * lanes[1])
    extra = ([mean] if mean is not None else []) + ([order] if plan.permuted else [])
    names = ["x"] + (["mean"] if mean is not None else []) + (["perm"] if plan.permuted else []) + ["params"]
    inputs = [x, *extra, mx.array([n, tokens, warps0], dtype=mx.int32)]
    return Launch("encode", plan, inputs, grid(threads, 1), (*lead, tokens, plan.width), names)


def encode_arrays_with(lang: str, x: mx.array, spec: CodecSpec) -> dict[str, mx.array]:
    """The reference's `encode_arrays(x, spec)`, computed by the fused kernel of `lang` in one
    launch (both parts of an outlier split included). No host sync except the float16-norm
    overflow check of 16-bit-norm specs (the reference's own)."""
    dim = x.shape[-1]
    _, mean = tq.centered(x, spec)  # the centered float32 copy itself is never evaluated here
    arrays = {} if mean is None else {"mean": mean}
    order = None
    if spec.outliers:
        hi = tq.outlier_channels(x, mean, spec)
        arrays["channels"] = hi.astype(mx.uint8 if dim <= 256 else mx.uint16)
        order = tq.channel_order(hi, dim)
    norm_dtype = mx.float16 if spec.norm_bits == 16 else mx.float32
    launch = encode_launch(x, mean, spec, order)
    codes, norms = encode_kernel(launch.key, lang)(
        inputs=launch.inputs, template=[("NormT", norm_dtype)], grid=launch.grid, threadgroup=(TG, 1, 1),
        output_shapes=[launch.out_shape, (*launch.out_shape[:-1], launch.key.n_norms)],
        output_dtypes=[mx.uint8, norm_dtype])
    arrays["codes"] = codes
    arrays.update(tq.stored_norms(norms))
    return arrays


def decode_rows_with(lang: str, parts: list[dict[str, mx.array]], spec: CodecSpec, dim: int,
                     dtype, rowmap: np.ndarray, n_rows: int) -> mx.array:
    """Decode in one launch rows of several coded tensors (same spec, dim, leading shape) into
    one (..., n_rows, dim) array: row t takes token rowmap[t, 0] of the tokens of `parts`
    concatenated (segment rowmap[t, 1] for its mean / norm range / channels), or zeros where it
    is -1."""
    launch = decode_launch(parts, spec, dim, rowmap, n_rows)
    if launch.kind == "plain":
        kernel = decode_kernel(launch.key, lang)
    else:
        kernel = plan_kernel(launch.key, lang, KNOBS.contiguous_max_e)
    (out,) = kernel(inputs=launch.inputs, template=[("OutT", dtype)], grid=launch.grid, threadgroup=(TG, 1, 1),
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
        inputs.append(tq.channel_order(cat("channels"), dim))
    inputs.append(mx.array(np.ascontiguousarray(rowmap, dtype=np.int32)))
    out_shape = (*lead, n_rows, dim)
    names = decode_input_names(plan)
    if not uses_plan_kernel(spec):  # the H100-checked kernel: one vector per lane group
        cfg = plan.parts[0].cfg
        inputs.append(mx.array([rows, t_src, n_rows, len(parts)], dtype=mx.int32))
        return Launch("plain", cfg, inputs, grid(rows * n_rows, cfg.layout[2]), out_shape, names)
    n_vec = rows * n_rows
    items = [-(-n_vec // (32 // part.cfg.layout[2])) for part in plan.parts]
    launch_grid = grid(max(1, min(max(items), KNOBS.warps)), 32)
    warps = launch_grid[0] // 32  # every launched warp strides by the count launched: no item twice
    inputs.append(mx.array([rows, t_src, n_rows, len(parts), *items, warps], dtype=mx.int32))
    return Launch("plan", plan, inputs, launch_grid, out_shape, names)
