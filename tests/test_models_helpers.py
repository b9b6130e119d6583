"""Test support (no tests here): small random-weight mlx-lm models and a GGUF writer for them.

The writer does what llama.cpp's convert_hf_to_gguf does, written independently of
promptvault's converter so that a round trip checks the converter against it: Hugging Face
names -> GGUF names, llama q/k rows permuted for interleaved RoPE, Gemma norms stored as 1 + w,
Llama 3 RoPE scaling stored as the rope_freqs tensor only.
"""

import json
import math

import gguf
import mlx.core as mx
import numpy as np
from mlx.utils import tree_flatten, tree_map_with_path
from mlx_lm.models import gemma3_text, llama, qwen2, qwen3
from tokenizers import pre_tokenizers

TOP = {"model.embed_tokens.weight": "token_embd.weight", "model.norm.weight": "output_norm.weight", "lm_head.weight": "output.weight"}
BLOCK = {
    "self_attn.q_proj": "attn_q",
    "self_attn.k_proj": "attn_k",
    "self_attn.v_proj": "attn_v",
    "self_attn.o_proj": "attn_output",
    "self_attn.q_norm": "attn_q_norm",
    "self_attn.k_norm": "attn_k_norm",
    "mlp.gate_proj": "ffn_gate",
    "mlp.up_proj": "ffn_up",
    "mlp.down_proj": "ffn_down",
    "input_layernorm": "attn_norm",
}
BLOCK_BY_ARCH = {
    "llama": {**BLOCK, "post_attention_layernorm": "ffn_norm"},
    "qwen2": {**BLOCK, "post_attention_layernorm": "ffn_norm"},
    "qwen3": {**BLOCK, "post_attention_layernorm": "ffn_norm"},
    "gemma3": {
        **BLOCK,
        "post_attention_layernorm": "post_attention_norm",
        "pre_feedforward_layernorm": "ffn_norm",
        "post_feedforward_layernorm": "post_ffw_norm",
    },
}


def gpt2_vocab():
    """A byte-level BPE vocabulary: 3 control tokens, the 256-symbol alphabet, a few merges.

    "Ġzz" has no merge that makes it: only a tokenizer that looks whole words up first
    (llama.cpp's ignore_merges, Llama 3 and tekken) produces it.
    """
    merged = ["Ġt", "he", "Ġthe", "in", "Ġin", "Ġzz"]
    tokens = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", *sorted(pre_tokenizers.ByteLevel.alphabet()), *merged]
    types = [3, 3, 3] + [1] * (len(tokens) - 3)
    merges = ["Ġ t", "h e", "Ġt he", "i n", "Ġ in"]
    return tokens, types, merges


def sentencepiece_vocab(tokenizer: str = "gemma"):
    """A SentencePiece-BPE vocabulary: controls, bytes, pieces, and then Gemma's user-defined
    whitespace runs or Mistral 7B v0.3's [INST] controls and "▁▁" pieces."""
    tokens = ["<pad>", "<eos>", "<bos>", "<unk>"] + [f"<0x{b:02X}>" for b in range(256)]
    types = [3, 3, 3, 3] + [6] * 256
    pieces = ["▁", *"abcdefghijklmnopqrstuvwxyz.,", "▁t", "he", "▁the", "in", "▁in"]
    tokens += pieces
    types += [1] * len(pieces)
    if tokenizer == "gemma":
        tokens += ["\n", "\n\n", "  ", "   "]
        types += [4] * 4
    else:
        tokens += ["[INST]", "[/INST]", "▁▁", "▁▁▁▁"]
        types += [3, 3, 1, 1]
    return tokens, types


ARCH_SETUP = {
    "llama": (llama, dict(head_dim=16, tie_word_embeddings=False)),
    "qwen2": (qwen2, dict(tie_word_embeddings=True)),
    "qwen3": (qwen3, dict(head_dim=32, tie_word_embeddings=True)),
    "gemma3": (gemma3_text, dict(head_dim=32, sliding_window=8, query_pre_attn_scalar=32, rope_local_base_freq=10000.0)),
}
# tokenizer.ggml.pre each architecture's test files carry unless told otherwise
DEFAULT_TOKENIZER = {"llama": "smollm", "qwen2": "qwen2", "qwen3": "qwen2", "gemma3": "gemma"}
SENTENCEPIECE = ("gemma", "mistral-spm")  # the others are byte-level BPE pre-tokenizer names


def random_model(arch: str, seed: int = 0, tokenizer: str | None = None, **overrides):
    """(model, config) of a 6-layer random-weight mlx-lm model; Gemma gets 5 local + 1 global layer.

    `tokenizer` (see write_gguf) sets the vocabulary size; `overrides` change config entries.
    """
    module, extra = ARCH_SETUP[arch]
    tokenizer = tokenizer or DEFAULT_TOKENIZER[arch]
    vocab = len(sentencepiece_vocab(tokenizer)[0] if tokenizer in SENTENCEPIECE else gpt2_vocab()[0])
    config = dict(
        model_type="gemma3_text" if arch == "gemma3" else arch,
        hidden_size=64,
        num_hidden_layers=6,
        intermediate_size=96,
        num_attention_heads=4,
        num_key_value_heads=2,
        rms_norm_eps=1e-6,
        vocab_size=vocab,
        rope_theta=50000.0,
        max_position_embeddings=256,
        **extra,
    )
    config.update(overrides)
    model = module.Model(module.ModelArgs.from_dict(config))
    if arch == "gemma3":
        model.sanitize({})  # Gemma ties its output to the embedding: drops lm_head
    mx.random.seed(seed)

    def randomize(path, p):
        if "norm" in path:  # Gemma norms scale by 1 + w, the others by w
            return mx.random.uniform(-0.5, 0.5, p.shape) + (0.0 if arch == "gemma3" else 1.0)
        return mx.random.normal(p.shape) * 0.2

    model.update(tree_map_with_path(randomize, model.parameters()))
    mx.eval(model.parameters())
    return model, config


def permute(w: np.ndarray, n_head: int) -> np.ndarray:
    """convert_hf_to_gguf LlamaModel.permute."""
    return w.reshape(n_head, 2, w.shape[0] // n_head // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_name(arch: str, name: str) -> str:
    if name in TOP:
        return TOP[name]
    _, _, layer, *rest = name.split(".")
    module, kind = ".".join(rest[:-1]), rest[-1]
    return f"blk.{layer}.{BLOCK_BY_ARCH[arch][module]}.{kind}"


def llama3_rope_freqs(config: dict) -> np.ndarray:
    """convert_hf_to_gguf LlamaModel.generate_extra_tensors: the llama3 factors, one per frequency."""
    scaling = config["rope_scaling"]
    dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    freqs = 1.0 / (config["rope_theta"] ** (np.arange(0, dim, 2, dtype=np.float32) / dim))
    factor, low, high = scaling["factor"], scaling["low_freq_factor"], scaling["high_freq_factor"]
    old_context_len = scaling["original_max_position_embeddings"]
    low_freq_wavelen, high_freq_wavelen = old_context_len / low, old_context_len / high
    factors = []
    for freq in freqs:
        wavelen = 2 * math.pi / freq
        if wavelen < high_freq_wavelen:
            factors.append(1)
        elif wavelen > low_freq_wavelen:
            factors.append(factor)
        else:
            smooth = (old_context_len / wavelen - low) / (high - low)
            factors.append(1 / ((1 - smooth) / factor + smooth))
    return np.array(factors, dtype=np.float32)


def write_hf_dir(path, model, config: dict):
    """An mlx-lm / Hugging Face directory (config.json + model.safetensors) holding `model`'s weights."""
    path.mkdir(parents=True, exist_ok=True)
    (path / "config.json").write_text(json.dumps(config))
    mx.save_safetensors(str(path / "model.safetensors"), dict(tree_flatten(model.parameters())))
    return path


def write_vocab(w, tokenizer: str) -> None:
    """tokenizer.ggml.* metadata of the test vocabularies (see write_gguf for `tokenizer`)."""
    if tokenizer in SENTENCEPIECE:
        tokens, types = sentencepiece_vocab(tokenizer)
        w.add_tokenizer_model("llama")
        w.add_tokenizer_pre("default")
        w.add_token_list(tokens)
        w.add_token_types(types)
        w.add_token_scores([0.0 if t != 1 else -float(i) for i, t in enumerate(types)])
        w.add_bos_token_id(2)
        w.add_eos_token_id(1)
        w.add_unk_token_id(3)
        if tokenizer == "gemma":
            w.add_add_bos_token(True)
            w.add_add_space_prefix(False)
        return  # Mistral 7B files leave BOS and the space prefix to llama.cpp's SentencePiece defaults
    tokens, types, merges = gpt2_vocab()
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre(tokenizer)
    w.add_token_list(tokens)
    w.add_token_types(types)
    w.add_token_merges(merges)
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    if tokenizer in ("smollm", "qwen2"):
        w.add_add_bos_token(False)
    w.add_chat_template("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}")


def write_gguf(
    path, arch: str, model, config: dict, architecture_name=None, skip=(), extra=None, tokenizer=None
) -> None:
    """Write `model` as an F32 GGUF file the way llama.cpp's converter would.

    architecture_name overrides general.architecture; `skip` names GGUFWriter.add_* calls to
    leave out; `extra(writer)` adds more metadata (both for testing broken or newer files).
    `tokenizer`: a BPE pre-tokenizer name ("smollm", "qwen2", "llama-bpe", "tekken", ...) or a
    SentencePiece vocabulary ("gemma", or "mistral-spm" with llama.cpp's defaults).
    """
    w = gguf.GGUFWriter(str(path), architecture_name or arch)
    for method, value in [
        ("add_block_count", config["num_hidden_layers"]),
        ("add_context_length", config["max_position_embeddings"]),
        ("add_embedding_length", config["hidden_size"]),
        ("add_feed_forward_length", config["intermediate_size"]),
        ("add_head_count", config["num_attention_heads"]),
        ("add_head_count_kv", config["num_key_value_heads"]),
        ("add_layer_norm_rms_eps", config["rms_norm_eps"]),
        ("add_rope_freq_base", config["rope_theta"]),
    ]:
        if method not in skip:
            getattr(w, method)(value)
    if extra is not None:
        extra(w)
    if "head_dim" in config:
        w.add_key_length(config["head_dim"])
        w.add_value_length(config["head_dim"])
    if arch == "gemma3":
        w.add_sliding_window(config["sliding_window"])
    write_vocab(w, tokenizer or DEFAULT_TOKENIZER[arch])
    scaling = config.get("rope_scaling") or {}
    if scaling.get("rope_type") == "llama3":  # parameters not written: only the factors they imply
        w.add_tensor("rope_freqs.weight", llama3_rope_freqs(config))
    elif scaling.get("rope_type") == "linear":
        w.add_rope_scaling_type(gguf.RopeScalingType.LINEAR)
        w.add_rope_scaling_factor(scaling["factor"])
    elif scaling.get("rope_type") == "yarn":
        w.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        w.add_rope_scaling_factor(scaling["factor"])
        w.add_rope_scaling_orig_ctx_len(scaling["original_max_position_embeddings"])
    for name, value in tree_flatten(model.parameters()):
        array = np.array(value.astype(mx.float32))
        if arch == "llama" and name.endswith("q_proj.weight"):
            array = permute(array, config["num_attention_heads"])
        elif arch == "llama" and name.endswith("k_proj.weight"):
            array = permute(array, config["num_key_value_heads"])
        if arch == "gemma3" and name.endswith("norm.weight"):
            array = array + 1.0
        w.add_tensor(gguf_name(arch, name), array)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
