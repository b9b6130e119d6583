"""Tokenizers rebuilt from GGUF metadata: exact round trips, special tokens, chat template."""

from pathlib import Path

import pytest

SAMPLES = (Path(__file__).parent / "data" / "tokenizer_samples.txt").read_text(encoding="utf-8").split("\n<<<SAMPLE>>>\n")


@pytest.fixture(params=["smollm", "gemma"])
def lm(request):
    return request.getfixturevalue(request.param)


def test_sample_set_is_varied():
    text = "".join(SAMPLES)
    assert len(SAMPLES) >= 12
    for needle in ("def ", "42", "   ", "\t\t", "\n\n", "🙂", "中文", "日本語", "café"):
        assert needle in text


@pytest.mark.parametrize("index", range(len(SAMPLES)))
def test_decode_encode_round_trip(lm, index):
    text = SAMPLES[index]
    ids = lm.tokenizer.encode(text, add_special_tokens=False)
    assert lm.tokenizer.decode(ids) == text


def test_round_trip_of_whole_file(lm):
    text = "\n".join(SAMPLES)
    assert lm.tokenizer.decode(lm.tokenizer.encode(text, add_special_tokens=False)) == text


def test_streaming_detokenizer_reproduces_text(lm):
    """mlx-lm's generate() decodes through the streaming detokenizer it picks from our decoder."""
    text = "\n".join(SAMPLES[:12])
    detok = lm.tokenizer.detokenizer
    detok.reset()
    for token in lm.tokenizer.encode(text, add_special_tokens=False):
        detok.add_token(token)
    detok.finalize()
    assert type(detok).__name__ in ("SPMStreamingDetokenizer", "BPEStreamingDetokenizer")
    assert detok.text == text


@pytest.mark.parametrize(
    "name, bos, eos, unk, pad",
    [("smollm", "<|im_start|>", "<|im_end|>", "<|endoftext|>", "<|im_end|>"), ("gemma", "<bos>", "<eos>", "<unk>", "<pad>")],
)
def test_special_tokens_come_from_metadata(request, name, bos, eos, unk, pad):
    tok = request.getfixturevalue(name).tokenizer
    assert (tok.bos_token, tok.eos_token, tok.unk_token, tok.pad_token) == (bos, eos, unk, pad)


def test_smollm_splits_digits_and_adds_no_bos(smollm):
    tok = smollm.tokenizer
    ids = tok.encode("12345", add_special_tokens=True)
    assert [tok.decode([i]) for i in ids] == ["1", "2", "3", "4", "5"]


def test_gemma_adds_bos_and_keeps_whitespace_runs_whole(gemma):
    tok = gemma.tokenizer
    ids = tok.encode("a\n\nb")
    assert ids[0] == tok.bos_token_id == 2
    assert tok.decode(ids[1:]) == "a\n\nb"
    assert len(ids) == 4  # <bos> a \n\n b: a blank line is one piece in Gemma's vocabulary


def test_smollm_control_tokens_are_single_ids(smollm):
    tok = smollm.tokenizer
    assert tok.encode("<|im_start|>user<|im_end|>", add_special_tokens=False)[0] == 1
    assert tok.eos_token_id == 2
    assert tok.decode([1, 2], skip_special_tokens=True) == ""


def test_smollm_chat_template(smollm):
    tok = smollm.tokenizer
    messages = [{"role": "user", "content": "What is the capital of France?"}]
    prompt = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert prompt == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face<|im_end|>\n"
        "<|im_start|>user\nWhat is the capital of France?<|im_end|>\n"
        "<|im_start|>assistant\n"
    )
    ids = tok.apply_chat_template(messages, add_generation_prompt=True)
    assert ids[0] == 1 and ids.count(1) == 3 and ids.count(2) == 2
    system = [{"role": "system", "content": "Be brief."}, *messages]
    assert tok.apply_chat_template(system, tokenize=False).startswith("<|im_start|>system\nBe brief.<|im_end|>\n")


def test_end_of_generation_tokens_are_llama_cpps(smollm, gemma):
    """The sets llama.cpp's llama_vocab_is_eog gives for these files (read with its C API, 2026-11-30).

    Gemma's file names <eos> as eos, but its chat turns end with <end_of_turn>."""
    assert set(smollm.tokenizer.eos_token_ids) == {0, 2, 4}  # <|endoftext|>, <|im_end|>, <reponame>
    assert set(gemma.tokenizer.eos_token_ids) == {1, 106, 212}  # <eos>, <end_of_turn>, </s>
    assert gemma.tokenizer.convert_ids_to_tokens([106, 212]) == ["<end_of_turn>", "</s>"]
