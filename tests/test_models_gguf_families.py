"""GGUF files of the families people run (Llama 3.x, Mistral, Qwen3, Qwen2.5) against mlx-lm itself.

Each test writes one set of random weights twice: as a GGUF file the way llama.cpp's converter
does (tests/test_models_helpers.py) and as a Hugging Face directory with that family's own
config.json, which mlx-lm loads directly. The GGUF loaded through promptvault must give the
same logits as mlx-lm's model from the directory.
"""

import json

import gguf
import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.utils import load_model as mlx_lm_load_model
from test_models_helpers import llama3_rope_freqs, random_model, write_gguf, write_hf_dir

from promptvault.errors import PromptvaultError, UnsupportedModelError
from promptvault.models import load_model

# Llama 3.x's scaling with a tiny original context, so that it changes 40-token logits:
# head_dim 16 and base 50000 give wavelengths 6, 24, 94, 362, 1398, ...: two between the
# high- and low-frequency bounds (64, 512), four stretched by the full factor.
LLAMA3_SCALING = {
    "rope_type": "llama3",
    "factor": 8.0,
    "low_freq_factor": 1.0,
    "high_freq_factor": 8.0,
    "original_max_position_embeddings": 512,
}

# family -> (GGUF arch, tokenizer.ggml.pre or SentencePiece, config overrides, Hugging Face config entries)
FAMILIES = {
    "llama3": (
        "llama", "llama-bpe", {"rope_scaling": LLAMA3_SCALING, "max_position_embeddings": 4096}, {"model_type": "llama"}
    ),
    # Mistral Nemo: llama arch in GGUF, head_dim 128 != 5120 / 32 heads, tekken, no sliding window
    "mistral-nemo": (
        "llama",
        "tekken",
        {"head_dim": 32, "rope_theta": 1000000.0},
        {"model_type": "mistral", "sliding_window": None},
    ),
    # Mistral 7B v0.3: SentencePiece vocabulary, llama.cpp drops its (unused) sliding window
    "mistral-7b": ("llama", "mistral-spm", {"head_dim": 16}, {"model_type": "mistral", "sliding_window": None}),
    "qwen3": ("qwen3", "qwen2", {}, {"model_type": "qwen3"}),
    # Qwen2.5: q/k/v biases, untied output (7B and up)
    "qwen2.5": ("qwen2", "qwen2", {"tie_word_embeddings": False}, {"model_type": "qwen2"}),
}
TOKENS = mx.random.randint(3, 200, (1, 40), key=mx.random.key(7))


def _family_files(tmp_path, family: str, seed: int = 1):
    arch, tokenizer, overrides, hf = FAMILIES[family]
    model, config = random_model(arch, seed=seed, tokenizer=tokenizer, **overrides)
    gguf_path = tmp_path / f"{family}.gguf"
    write_gguf(gguf_path, arch, model, config, tokenizer=tokenizer)
    hf_dir = write_hf_dir(tmp_path / f"{family}-hf", model, {**config, **hf})
    return gguf_path, hf_dir, config


def _max_diff(a, b) -> float:
    return mx.abs(a(TOKENS) - b(TOKENS)).max().item()


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_matches_mlx_lm_from_hugging_face_layout(tmp_path, family):
    gguf_path, hf_dir, _ = _family_files(tmp_path, family)
    reference, _ = mlx_lm_load_model(hf_dir)
    loaded = load_model(str(gguf_path), dtype="float32")
    assert type(loaded.model) is type(reference)
    diff = _max_diff(loaded.model, reference)
    assert diff < 1e-4, f"{family}: max |logit diff| {diff}"


def test_llama3_scaling_is_read_from_rope_freqs_and_matters(tmp_path):
    gguf_path, hf_dir, _ = _family_files(tmp_path, "llama3")
    loaded = load_model(str(gguf_path), dtype="float32")
    assert loaded.model.args.rope_scaling == LLAMA3_SCALING
    assert "rope_freqs.weight" not in str(mx.load(str(loaded.path / "model.safetensors")).keys())
    unscaled, _ = mlx_lm_load_model(hf_dir, model_config={"rope_scaling": None})
    assert _max_diff(loaded.model, unscaled) > 1e-2  # ignoring the scaling would be caught above


@pytest.mark.parametrize("factor", [8.0, 32.0])  # Llama 3.1, Llama 3.2
def test_real_llama3_parameters_are_recovered(tmp_path, factor):
    """Llama 3.1 / 3.2's head_dim 128, base 500000 and scaling come back exactly from rope_freqs."""
    scaling = {
        "rope_type": "llama3",
        "factor": factor,
        "low_freq_factor": 1.0,
        "high_freq_factor": 4.0,
        "original_max_position_embeddings": 8192,
    }
    model, config = random_model(
        "llama", tokenizer="llama-bpe", head_dim=128, rope_theta=500000.0, rope_scaling=scaling, max_position_embeddings=131072
    )
    path = tmp_path / "llama3.gguf"
    write_gguf(path, "llama", model, config, tokenizer="llama-bpe")
    loaded = load_model(str(path), dtype="float32")
    assert loaded.model.args.rope_scaling == scaling
    reference, _ = mlx_lm_load_model(write_hf_dir(tmp_path / "hf", model, config))
    assert _max_diff(loaded.model, reference) < 1e-4


def test_rope_freqs_of_ones_mean_no_scaling(tmp_path):
    model, config = random_model("llama", tokenizer="llama-bpe")
    path = tmp_path / "unit-freqs.gguf"
    write_gguf(path, "llama", model, config, extra=lambda w: w.add_tensor("rope_freqs.weight", np.ones(8, np.float32)))
    loaded = load_model(str(path), dtype="float32")
    assert loaded.model.args.rope_scaling is None
    assert _max_diff(loaded.model, model) < 1e-4


def _refusal(path) -> str:
    with pytest.raises(UnsupportedModelError) as info:
        load_model(str(path))
    message = str(info.value)
    assert isinstance(info.value, PromptvaultError) and message and "\n" not in message
    return message


def test_rope_freqs_stored_in_float16_still_match(tmp_path):
    """llama.cpp keeps rope_freqs in F32; a file that rounded it to F16 is checked at F16's precision."""
    model, config = random_model("llama", tokenizer="llama-bpe", max_position_embeddings=4096)
    half = llama3_rope_freqs({**config, "rope_scaling": LLAMA3_SCALING}).astype(np.float16)
    path = tmp_path / "f16-freqs.gguf"
    write_gguf(path, "llama", model, config, tokenizer="llama-bpe", extra=lambda w: w.add_tensor("rope_freqs.weight", half))
    assert load_model(str(path), dtype="float32").model.args.rope_scaling == LLAMA3_SCALING


def test_rope_freqs_that_no_llama3_scaling_explains_are_refused(tmp_path):
    model, config = random_model("llama", tokenizer="llama-bpe")
    odd = llama3_rope_freqs({**config, "rope_scaling": LLAMA3_SCALING})
    odd[1] *= 1.01
    path = tmp_path / "odd-freqs.gguf"
    write_gguf(path, "llama", model, config, tokenizer="llama-bpe", extra=lambda w: w.add_tensor("rope_freqs.weight", odd))
    assert "rope_freqs.weight does not match any llama3 RoPE scaling" in _refusal(path)


@pytest.mark.parametrize(
    "length, rope_dims, message",
    [(64, 16, "rope_freqs.weight has shape (64,), expected (8,)"), (8, 8, "partial RoPE (8 of 16 dims)")],
)
def test_rope_freqs_that_do_not_fit_the_heads_are_refused(tmp_path, length, rope_dims, message):
    model, config = random_model("llama", tokenizer="llama-bpe")  # head_dim 16: 8 frequencies

    def freqs(w):
        w.add_tensor("rope_freqs.weight", np.full(length, 2.0, np.float32))
        w.add_rope_dimension_count(rope_dims)

    path = tmp_path / "bad-freqs.gguf"
    write_gguf(path, "llama", model, config, extra=freqs)
    assert message in _refusal(path)


@pytest.mark.parametrize("arch", ["qwen2", "qwen3"])
def test_yarn_scaling_matches_mlx_lm_and_matters(tmp_path, arch):
    """Qwen's long-context YaRN setting, as convert_hf_to_gguf writes it (type, factor, original context)."""
    scaling = {"rope_type": "yarn", "factor": 4.0, "original_max_position_embeddings": 64}
    model, config = random_model(arch, seed=2, rope_scaling=scaling)
    path = tmp_path / "yarn.gguf"
    write_gguf(path, arch, model, config)
    loaded = load_model(str(path), dtype="float32")
    assert loaded.model.args.rope_scaling == {**scaling, "beta_fast": 32.0, "beta_slow": 1.0}
    hf_dir = write_hf_dir(tmp_path / "hf", model, config)
    reference, _ = mlx_lm_load_model(hf_dir)
    assert _max_diff(loaded.model, reference) < 1e-4
    unscaled, _ = mlx_lm_load_model(hf_dir, model_config={"rope_scaling": None})
    assert _max_diff(loaded.model, unscaled) > 1e-2


@pytest.mark.parametrize(
    "kind, extra, message",
    [
        (gguf.RopeScalingType.LONGROPE, None, "RoPE scaling 'longrope' is not supported"),
        (gguf.RopeScalingType.YARN, lambda w: w.add_rope_scaling_yarn_log_mul(0.1), "rope.scaling.yarn_log_multiplier"),
    ],
)
def test_unsupported_rope_scaling_is_named(tmp_path, kind, extra, message):
    model, config = random_model("qwen2")
    path = tmp_path / "scaled.gguf"

    def scaling(w):
        w.add_rope_scaling_type(kind)
        w.add_rope_scaling_factor(4.0)
        if extra:
            extra(w)

    write_gguf(path, "qwen2", model, config, extra=scaling)
    assert message in _refusal(path)


def test_rope_freqs_outside_llama_arch_is_refused(tmp_path):
    model, config = random_model("qwen3")
    path = tmp_path / "qwen3-freqs.gguf"
    write_gguf(path, "qwen3", model, config, extra=lambda w: w.add_tensor("rope_freqs.weight", np.ones(16, np.float32)))
    assert "'rope_freqs.weight' has no qwen3 equivalent" in _refusal(path)


def test_generation_stops_where_llama_cpp_stops(tmp_path):
    """eos, eot and the end-of-turn texts llama.cpp knows (<|im_end|>, <|endoftext|>) all end generation."""
    model, config = random_model("qwen3")
    path = tmp_path / "eot.gguf"
    write_gguf(path, "qwen3", model, config, extra=lambda w: w.add_eot_token_id(1))
    loaded = load_model(str(path))
    assert json.loads((loaded.path / "config.json").read_text())["eos_token_id"] == [2, 1, 0]
    assert set(loaded.tokenizer.eos_token_ids) == {0, 1, 2}
