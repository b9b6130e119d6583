"""Per-architecture knowledge for GGUF -> mlx-lm: config.json fields and tensor renaming.

GGUF (llama.cpp) and mlx-lm (Hugging Face layout) name tensors differently and llama.cpp
stores some weights transformed: llama-arch attn_q / attn_k rows are permuted for its
interleaved RoPE, and Gemma norm weights are stored as 1 + w. Each ArchSpec says how to undo
that for one architecture and which values the file does not carry (Gemma 3's layer pattern,
local RoPE base, query scaling).
"""

import re
from dataclasses import dataclass
from typing import Callable

import numpy as np

from promptvault.errors import UnsupportedModelError
from promptvault.models.gguf_file import GGUFFile
from promptvault.models.gguf_rope import ROPE_FREQS, rope_scaling
from promptvault.models.gguf_tokenizer import end_of_generation_ids

_TOP_LEVEL = {
    "token_embd.weight": "model.embed_tokens.weight",
    "output_norm.weight": "model.norm.weight",
    "output.weight": "lm_head.weight",
}

_BLOCK_COMMON = {
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.([a-z_]+)\.(weight|bias)$")


@dataclass(frozen=True)
class ArchSpec:
    """How one GGUF architecture maps onto an mlx-lm model_type."""

    model_type: str
    block_names: dict  # GGUF block tensor stem -> mlx-lm module path inside the layer
    permute_qk: bool  # undo llama.cpp's q/k row permutation
    norm_offset: float  # subtract from every *norm.weight (Gemma stores 1 + w)
    extra_config: Callable[[GGUFFile], dict]
    config_tensors: frozenset = frozenset()  # read into config.json by extra_config, not weights

    def mlx_name(self, gguf_name: str) -> str:
        if gguf_name in _TOP_LEVEL:
            return _TOP_LEVEL[gguf_name]
        match = _BLOCK_RE.match(gguf_name)
        if match and match.group(2) in self.block_names:
            layer, stem, kind = match.groups()
            return f"model.layers.{layer}.{self.block_names[stem]}.{kind}"
        raise UnsupportedModelError(f"GGUF tensor {gguf_name!r} has no {self.model_type} equivalent in mlx-lm")

    def transform(self, gguf_name: str, weight: np.ndarray, config: dict) -> np.ndarray:
        """Undo llama.cpp's storage transforms for one tensor (numpy order: out x in)."""
        if self.norm_offset and gguf_name.endswith("norm.weight"):
            weight = weight - self.norm_offset
        if self.permute_qk and gguf_name.endswith(("attn_q.weight", "attn_q.bias")):
            weight = unpermute_rows(weight, config["num_attention_heads"])
        elif self.permute_qk and gguf_name.endswith(("attn_k.weight", "attn_k.bias")):
            weight = unpermute_rows(weight, config["num_key_value_heads"])
        return weight


def unpermute_rows(weight: np.ndarray, n_heads: int) -> np.ndarray:
    """Inverse of convert_hf_to_gguf's LlamaModel.permute: back to HF's half-split RoPE rows."""
    rows = weight.shape[0]
    return weight.reshape(n_heads, rows // n_heads // 2, 2, *weight.shape[1:]).swapaxes(1, 2).reshape(weight.shape)


def _required(g: GGUFFile, key: str):
    value = g.arch_value(key)
    if value is None:
        raise UnsupportedModelError(f"{g.path}: metadata key {g.architecture}.{key} is missing")
    return value


def _default_head_dim(g: GGUFFile) -> int:
    return int(_required(g, "embedding_length")) // int(_required(g, "attention.head_count"))


def _head_dim(g: GGUFFile) -> int:
    key_length = g.arch_value("attention.key_length")
    return int(key_length) if key_length else _default_head_dim(g)


def _qwen2_extra(g: GGUFFile) -> dict:
    return {"rope_scaling": rope_scaling(g, _head_dim(g))}


def _llama_extra(g: GGUFFile) -> dict:
    """Llama 1-3, Mistral 7B / Nemo / Small (llama.cpp writes Mistral as "llama", sliding window dropped)."""
    head_dim = _head_dim(g)
    extra = {"rope_scaling": rope_scaling(g, head_dim)}
    if head_dim != _default_head_dim(g):
        extra["head_dim"] = head_dim
    return extra


def _qwen3_extra(g: GGUFFile) -> dict:
    head_dim = _head_dim(g)
    return {"head_dim": head_dim, "rope_scaling": rope_scaling(g, head_dim)}


def _sliding_window_pattern(g: GGUFFile) -> int:
    """Every n-th layer is global. Gemma 3 GGUFs mostly omit it (n = 6); newer ones store n or a
    per-layer "is sliding" list, which mlx-lm can only express when it repeats with period n."""
    stored = g.arch_value("attention.sliding_window_pattern")
    if stored is None:
        return 6
    if isinstance(stored, int):
        return stored
    sliding = [bool(x) for x in stored]
    period = sliding.index(False) + 1 if False in sliding else len(sliding) + 1
    if sliding != [(i + 1) % period != 0 for i in range(len(sliding))]:
        raise UnsupportedModelError(f"{g.path}: sliding-window layer pattern {sliding} is not periodic")
    return period


def _gemma3_extra(g: GGUFFile) -> dict:
    head_dim = int(_required(g, "attention.key_length"))
    return {
        "head_dim": head_dim,
        "sliding_window": int(_required(g, "attention.sliding_window")),
        "sliding_window_pattern": _sliding_window_pattern(g),
        "rope_local_base_freq": 10000.0,
        "query_pre_attn_scalar": head_dim,
        "rope_scaling": rope_scaling(g, head_dim),
    }


ARCHITECTURES = {
    "llama": ArchSpec(
        "llama",
        {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"},
        True,
        0.0,
        _llama_extra,
        config_tensors=frozenset({ROPE_FREQS}),
    ),
    "qwen2": ArchSpec("qwen2", {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"}, False, 0.0, _qwen2_extra),
    "qwen3": ArchSpec("qwen3", {**_BLOCK_COMMON, "ffn_norm": "post_attention_layernorm"}, False, 0.0, _qwen3_extra),
    "gemma3": ArchSpec(
        "gemma3_text",
        {
            **_BLOCK_COMMON,
            "post_attention_norm": "post_attention_layernorm",
            "ffn_norm": "pre_feedforward_layernorm",
            "post_ffw_norm": "post_feedforward_layernorm",
        },
        False,
        1.0,
        _gemma3_extra,
    ),
}


def arch_spec(g: GGUFFile) -> ArchSpec:
    spec = ARCHITECTURES.get(g.architecture)
    if spec is None:
        raise UnsupportedModelError(
            f"{g.path}: GGUF architecture {g.architecture!r} is not supported "
            f"(supported: {', '.join(sorted(ARCHITECTURES))})"
        )
    return spec


def model_config(g: GGUFFile, spec: ArchSpec) -> dict:
    """config.json for mlx-lm, from the GGUF metadata and tensor list."""
    names = {t.name for t in g.tensors}
    embed = next((t for t in g.tensors if t.name == "token_embd.weight"), None)
    if embed is None:
        raise UnsupportedModelError(f"{g.path}: no token_embd.weight tensor")
    heads = int(_required(g, "attention.head_count"))
    config = {
        "model_type": spec.model_type,
        "hidden_size": int(_required(g, "embedding_length")),
        "num_hidden_layers": int(_required(g, "block_count")),
        "intermediate_size": int(_required(g, "feed_forward_length")),
        "num_attention_heads": heads,
        "num_key_value_heads": int(g.arch_value("attention.head_count_kv", heads)),
        "rms_norm_eps": float(_required(g, "attention.layer_norm_rms_epsilon")),
        "vocab_size": int(embed.shape[-1]),
        "rope_theta": float(g.arch_value("rope.freq_base", 10000.0)),
        "max_position_embeddings": int(g.arch_value("context_length", 4096)),
        "tie_word_embeddings": "output.weight" not in names,
    }
    config.update(spec.extra_config(g))
    eog = end_of_generation_ids(g)
    if eog:
        config["eos_token_id"] = eog[0] if len(eog) == 1 else eog
    return {k: v for k, v in config.items() if v is not None}
