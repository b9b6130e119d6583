"""RoPE scaling of a GGUF file -> the `rope_scaling` entry of an mlx-lm config.json.

Linear and YaRN scaling are GGUF metadata (`<arch>.rope.scaling.type`, `.factor`,
`.original_context_length`, `.yarn_beta_fast/slow`). For YaRN, llama.cpp's kernel mixes the
interpolated and original frequencies with the same floor/ceil ramp as mlx-lm's YarnRoPE and
scales q and k by 1 + 0.1 ln(factor), as YarnRoPE does; the rarer knobs (attention factor, log
multiplier, extrapolation factor) are refused rather than approximated.

Llama 3.x's "llama3" scaling is not metadata: llama.cpp's convert_hf_to_gguf writes none of its
parameters (factor, low / high frequency factors, original context length) and instead stores
what they imply, one divisor per RoPE frequency, as the `rope_freqs.weight` tensor (head_dim / 2
floats) that llama.cpp divides each frequency by. mlx-lm's llama model wants the parameters, so
they are recovered from the tensor, and the tensor is dropped only when the recovered
parameters reproduce it; otherwise the file is refused, because a model with subtly wrong
positions still runs and only degrades on long prompts, where nobody would trace it back here.
The tensor fixes only the ratios low_freq_factor / original context and high_freq_factor /
original context. Every Llama 3.x release uses low_freq_factor = 1, and with it the ratios give
the original context length and high_freq_factor themselves (8192 and 4 for Llama 3.1 / 3.2).
"""

import gguf
import numpy as np

from promptvault.errors import UnsupportedModelError
from promptvault.models.gguf_file import GGUFFile

ROPE_FREQS = "rope_freqs.weight"

# Relative tolerance of the check: llama.cpp computes the factors in float32 and keeps 1-D
# tensors in F32; a file written with them in 16 bits gets that format's rounding.
_RTOL = {gguf.GGMLQuantizationType.F32: 1e-5, gguf.GGMLQuantizationType.F16: 1e-3, gguf.GGMLQuantizationType.BF16: 8e-3}


def llama3_factors(dims: int, base: float, scaling: dict) -> np.ndarray:
    """The rope_freqs values convert_hf_to_gguf writes for llama3 parameters (its loop, vectorized)."""
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    original = scaling["original_max_position_embeddings"]
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    with np.errstate(divide="ignore", invalid="ignore"):
        smooth = (original / wavelen - low) / (high - low)
        medium = 1 / ((1 - smooth) / factor + smooth)
    return np.where(wavelen < original / high, 1.0, np.where(wavelen > original / low, factor, medium))


def _fitted(factors: np.ndarray, dims: int, base: float, rtol: float) -> list[dict]:
    """Parameters from the intermediate frequencies: their smoothing weight is linear in 1 / wavelength.

    Needs two of them; Llama 3.1 / 3.2 have six (head_dim 128) or three (head_dim 64). Returns
    candidates from the roundest (2 significant digits) to the raw fit, for the caller to check.
    """
    factor = float(factors.max())
    medium = (factors > 1 + rtol) & (factors < factor * (1 - rtol))
    if medium.sum() < 2:
        return []
    wavelen = 2 * np.pi * base ** (np.arange(0, dims, 2, dtype=np.float64) / dims)
    smooth = (1 / factors[medium] - 1 / factor) / (1 - 1 / factor)
    slope, intercept = np.polyfit(1 / wavelen[medium], smooth, 1)
    low_ratio = -intercept / slope  # low_freq_factor / original context
    if not low_ratio > 0:
        return []
    original = round(1 / low_ratio)
    high = (low_ratio + 1 / slope) * original
    return [
        {
            "factor": float(f"{factor:.{digits}g}"),
            "low_freq_factor": 1.0,
            "high_freq_factor": float(f"{high:.{digits}g}"),
            "original_max_position_embeddings": original,
        }
        for digits in (2, 3, 4, 6, 17)
    ]


def _llama3_scaling(g: GGUFFile, factors: np.ndarray, rtol: float, head_dim: int) -> dict | None:
    dims = int(g.arch_value("rope.dimension_count", head_dim))
    base = float(g.arch_value("rope.freq_base", 10000.0))
    if factors.shape != (head_dim // 2,):
        raise UnsupportedModelError(
            f"{g.path}: {ROPE_FREQS} has shape {factors.shape}, expected ({head_dim // 2},) for head_dim {head_dim}"
        )
    if dims != head_dim:
        raise UnsupportedModelError(
            f"{g.path}: {ROPE_FREQS} with partial RoPE ({dims} of {head_dim} dims) is not supported"
        )
    if np.allclose(factors, 1.0, rtol=0, atol=rtol):
        return None  # no scaling at all
    for scaling in _fitted(factors, dims, base, rtol):
        if np.allclose(llama3_factors(dims, base, scaling), factors, rtol=rtol, atol=0):
            return {"rope_type": "llama3", **scaling}
    raise UnsupportedModelError(f"{g.path}: {ROPE_FREQS} does not match any llama3 RoPE scaling; cannot convert it")


# YaRN knobs llama.cpp reads and their neutral values (ext_factor < 0 means "unset", i.e. 1):
# any other value is refused
_YARN_NEUTRAL = {
    "attn_factor": lambda v: v == 1.0,
    "yarn_log_multiplier": lambda v: v == 0.0,
    "yarn_ext_factor": lambda v: v == 1.0 or v < 0,
    "yarn_attn_factor": lambda v: v == 1.0,
}


def _yarn_scaling(g: GGUFFile, factor: float) -> dict:
    for key, neutral in _YARN_NEUTRAL.items():
        value = g.arch_value(f"rope.scaling.{key}")
        if value is not None and not neutral(float(value)):
            raise UnsupportedModelError(f"{g.path}: YaRN with rope.scaling.{key} = {value} is not supported")
    original = g.arch_value("rope.scaling.original_context_length") or g.arch_value("context_length")
    if not original:
        raise UnsupportedModelError(f"{g.path}: YaRN scaling without rope.scaling.original_context_length")
    return {
        "rope_type": "yarn",
        "factor": float(factor),
        "original_max_position_embeddings": int(original),
        "beta_fast": float(g.arch_value("rope.scaling.yarn_beta_fast", 32.0)),  # llama.cpp's defaults
        "beta_slow": float(g.arch_value("rope.scaling.yarn_beta_slow", 1.0)),
    }


def rope_scaling(g: GGUFFile, head_dim: int) -> dict | None:
    """mlx-lm's rope_scaling for this file (None: unscaled). Raises UnsupportedModelError otherwise."""
    kind = g.arch_value("rope.scaling.type")
    factor = g.arch_value("rope.scaling.factor")
    freqs = next((t for t in g.tensors if t.name == ROPE_FREQS), None)
    if freqs is not None:
        if kind not in (None, "none"):
            raise UnsupportedModelError(f"{g.path}: {ROPE_FREQS} together with RoPE scaling {kind!r} is not supported")
        if freqs.tensor_type not in _RTOL:
            raise UnsupportedModelError(f"{g.path}: {ROPE_FREQS} stored as {freqs.tensor_type.name} is not supported")
        factors = g.dequantized(freqs).reshape(-1).astype(np.float64)
        return _llama3_scaling(g, factors, _RTOL[freqs.tensor_type], head_dim)
    if kind in (None, "none") or not factor:
        return None
    if kind == "yarn":
        return _yarn_scaling(g, factor)
    if kind != "linear":
        raise UnsupportedModelError(
            f"{g.path}: RoPE scaling {kind!r} is not supported (supported: linear, yarn, llama3)"
        )
    return {"rope_type": "linear", "factor": float(factor)}
