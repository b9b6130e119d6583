"""GGUF pre-tokenizers (`tokenizer.ggml.pre`) of Llama 3, Mistral and Qwen files, as llama.cpp runs them.

Each name must split text the way llama.cpp's llama-vocab.cpp does for it (digits one by one or
in threes, contractions, CamelCase) and carry its flags: whole-word lookup before merges
(Llama 3, tekken) and BOS added when the file does not say (Llama 3, tekken, SentencePiece).
Splits are read from the rebuilt tokenizer directly, on metadata-only GGUF files; the full load
path (transformers, mlx-lm) is covered by the round trips at the end.
"""

from pathlib import Path

import gguf
import pytest
from test_models_helpers import write_vocab
from test_models_gguf_families import FAMILIES, _family_files

from promptvault.errors import UnsupportedModelError
from promptvault.models import load_model
from promptvault.models.gguf_file import GGUFFile
from promptvault.models.gguf_tokenizer import build_tokenizer

SAMPLES = (Path(__file__).parent / "data" / "tokenizer_samples.txt").read_text(encoding="utf-8").split("\n<<<SAMPLE>>>\n")

LLAMA3 = ["llama-bpe", "llama3", "llama-v3", "pixtral"]
QWEN2 = ["qwen2", "deepseek-r1-qwen"]


def _tokenizer(tmp_path, pre: str):
    path = tmp_path / f"{pre}.gguf"
    w = gguf.GGUFWriter(str(path), "llama")
    write_vocab(w, pre)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return build_tokenizer(GGUFFile(path))


def _splits(tok, text: str) -> list:
    return [piece for piece, _ in tok.pre_tokenizer.pre_tokenize_str(text)]


@pytest.mark.parametrize("pre", LLAMA3 + ["smaug-bpe"])
def test_llama3_split_digits_in_threes_and_contractions(tmp_path, pre):
    tok, _ = _tokenizer(tmp_path, pre)
    assert _splits(tok, "12345") == ["123", "45"]
    assert _splits(tok, "we'll WE'LL 'llama") == ["we", "'ll", "ĠWE", "'LL", "Ġ'", "llama"]
    assert _splits(tok, "x'llama HelloWorld") == ["x", "'ll", "ama", "ĠHelloWorld"]


@pytest.mark.parametrize("pre", QWEN2)
def test_qwen2_splits_single_digits_and_contractions(tmp_path, pre):
    tok, _ = _tokenizer(tmp_path, pre)
    assert _splits(tok, "12345") == ["1", "2", "3", "4", "5"]
    assert _splits(tok, "x'llama HelloWorld") == ["x", "'ll", "ama", "ĠHelloWorld"]


def test_tekken_splits_camel_case_and_has_no_contraction_rule(tmp_path):
    tok, _ = _tokenizer(tmp_path, "tekken")
    assert _splits(tok, "12345") == ["1", "2", "3", "4", "5"]
    assert _splits(tok, "x'llama HelloWorld getHTTPResponse") == ["x", "'llama", "ĠHello", "World", "Ġget", "HTTPResponse"]
    assert _splits(tok, "a/b/\n") == ["a", "/b", "/Ċ"]  # tekken keeps "/" and newlines after punctuation


@pytest.mark.parametrize(
    "pre, whole_words, bos", [*[(p, True, True) for p in LLAMA3], ("tekken", True, True), ("smaug-bpe", False, False)]
    + [(p, False, False) for p in QWEN2]
)
def test_llama_cpp_flags_per_pre_tokenizer(tmp_path, pre, whole_words, bos):
    """ignore_merges: " zz" is in the vocabulary but no merge makes it; add_bos: the file says nothing."""
    tok, config = _tokenizer(tmp_path, pre)
    pieces = tok.encode(" zz", add_special_tokens=False).tokens
    assert pieces == (["Ġzz"] if whole_words else ["Ġ", "z", "z"])
    assert config["add_bos_token"] is bos


@pytest.mark.parametrize("pre", LLAMA3 + ["smaug-bpe", "tekken"] + QWEN2)
def test_round_trip_of_samples(tmp_path, pre):
    tok, _ = _tokenizer(tmp_path, pre)
    for text in SAMPLES:
        assert tok.decode(tok.encode(text, add_special_tokens=False).ids, skip_special_tokens=False) == text


def test_unknown_pre_tokenizer_is_refused_in_one_line(tmp_path):
    with pytest.raises(UnsupportedModelError) as info:
        _tokenizer(tmp_path, "mystery-bpe")
    message = str(info.value)
    assert "BPE pre-tokenizer 'mystery-bpe' is not supported" in message and "tekken" in message
    assert "\n" not in message


@pytest.mark.parametrize("family", list(FAMILIES))
def test_loaded_family_tokenizer_round_trips_and_adds_bos(tmp_path, family):
    """Through load_model (transformers + mlx-lm's wrapper), with llama.cpp's BOS default per family.

    SentencePiece files with a space prefix (Mistral 7B) prefix every run of text after a special
    token, in llama.cpp as in the model's own tokenizer.json, so there only plain text round-trips.
    """
    gguf_path, _, _ = _family_files(tmp_path, family)
    tok = load_model(str(gguf_path)).tokenizer
    spm = FAMILIES[family][1] == "mistral-spm"
    text = "\n".join(s for s in SAMPLES if not (spm and "[INST]" in s))
    assert tok.decode(tok.encode(text, add_special_tokens=False)) == text
    pre = FAMILIES[family][1]
    assert (tok.encode("the")[0] == tok.bos_token_id) is (pre in ("llama-bpe", "tekken", "mistral-spm"))
    if pre != "mistral-spm":  # whole-word lookup survives the trip through transformers
        whole = tok.encode(" zz", add_special_tokens=False) == tok.convert_tokens_to_ids(["Ġzz"])
        assert whole is (pre in ("llama-bpe", "tekken"))


def test_mistral_sentencepiece_file_gets_llama_cpp_defaults(tmp_path):
    """Mistral 7B files carry neither add_space_prefix nor add_bos_token: llama.cpp prefixes a space and adds BOS."""
    gguf_path, _, _ = _family_files(tmp_path, "mistral-7b")
    tok = load_model(str(gguf_path)).tokenizer
    assert tok.encode("the in") == [tok.bos_token_id, *tok.convert_tokens_to_ids(["▁the", "▁in"])]
    assert tok.encode("[INST] the [/INST]", add_special_tokens=False)[0] == tok.convert_tokens_to_ids("[INST]")
