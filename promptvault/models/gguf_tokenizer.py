"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

mlx-lm loads tokenizers through transformers, which needs tokenizer.json; a GGUF file carries
the vocabulary as `tokenizer.ggml.*` arrays instead. Two families are rebuilt with the
`tokenizers` library:

* "gpt2" (byte-level BPE: SmolLM2, Qwen2 / 2.5 / 3, Llama 3, Mistral Nemo): vocab + merge list
  from the file; the pre-tokenizer is chosen by `tokenizer.ggml.pre` ("smollm" splits digits one
  by one, "llama-bpe" in runs of up to three, "tekken" also splits CamelCase words), with the
  flags llama.cpp sets for that name (Llama 3 and tekken look whole words up before merging,
  and add BOS unless the file says otherwise).
* "llama" (SentencePiece BPE: Gemma, Llama 2, Mistral 7B): the file has scores but no merges, so the merge
  list is rebuilt from vocabulary order (a piece that splits into two pieces becomes a merge
  ranked by its own position); spaces become "▁"; unknown bytes fall back to <0xNN> pieces.
  User-defined pieces (Gemma's runs of spaces, tabs and newlines, stored with real whitespace)
  are matched first and whole, as SentencePiece does.

An unknown pre-tokenizer is refused: a slightly wrong tokenizer still runs, but shows up
only as a perplexity several times too high. end_of_generation_ids() gives the tokens llama.cpp
stops generating at, for config.json's eos_token_id.
"""

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from promptvault.errors import UnsupportedModelError
from promptvault.models.gguf_file import GGUFFile

# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6

# Split regexes as in the models' own tokenizer.json; llama.cpp's llama-vocab.cpp uses the same
# ones (rewritten for its regex engine) for the pre-tokenizer names below.
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# Mistral's tekken (Nemo, Small 3): no contraction rule, CamelCase words split, single digits.
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Split by a llama.cpp regex, then map bytes to GPT-2's printable alphabet."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


def _gpt2_split() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)


def _digits_then_gpt2() -> pre_tokenizers.PreTokenizer:
    return pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True), _gpt2_split()])


@dataclass(frozen=True)
class PreTokenizer:
    """One llama.cpp pre-tokenizer type, with the flags llama-vocab.cpp sets for it."""

    split: Callable[[], pre_tokenizers.PreTokenizer]
    ignore_merges: bool = False  # a word that is itself in the vocabulary is one token, merges or not
    add_bos: bool = False  # llama.cpp's default when the file has no tokenizer.ggml.add_bos_token


_LLAMA3 = PreTokenizer(lambda: _regex_split(_LLAMA3_SPLIT), ignore_merges=True, add_bos=True)
_QWEN2 = PreTokenizer(lambda: _regex_split(_QWEN2_SPLIT))

# tokenizer.ggml.pre -> pre-tokenizer (names as llama.cpp's convert_hf_to_gguf writes them)
_BPE_PRE_TOKENIZERS = {
    "default": PreTokenizer(_gpt2_split),
    "gpt-2": PreTokenizer(_gpt2_split),
    "smollm": PreTokenizer(_digits_then_gpt2),
    "starcoder": PreTokenizer(_digits_then_gpt2),
    "qwen2": _QWEN2,  # Qwen2 / 2.5 / 3
    "deepseek-r1-qwen": _QWEN2,  # DeepSeek-R1 distilled into Qwen2.5
    "llama-bpe": _LLAMA3,  # Llama 3.x
    "llama3": _LLAMA3,
    "llama-v3": _LLAMA3,
    "pixtral": _LLAMA3,  # Mistral's Pixtral: llama.cpp gives it the Llama 3 split
    "smaug-bpe": PreTokenizer(lambda: _regex_split(_LLAMA3_SPLIT)),  # Llama 3 fine-tunes: same split, merges always
    "tekken": PreTokenizer(lambda: _regex_split(_TEKKEN_SPLIT), ignore_merges=True, add_bos=True),  # Mistral Nemo
}


def _added_tokens(tokens: list, types: list) -> list:
    """Control pieces become special tokens; user-defined pieces are matched whole, before BPE."""
    return [
        AddedToken(tok, special=(kind == _CONTROL), normalized=False)
        for tok, kind in zip(tokens, types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]


def _bpe_pre_tokenizer(g: GGUFFile) -> PreTokenizer:
    pre = g.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{g.path}: BPE pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(_BPE_PRE_TOKENIZERS))})"
        )
    return _BPE_PRE_TOKENIZERS[pre]


def _gpt2_tokenizer(g: GGUFFile, tokens: list, pre: PreTokenizer) -> Tokenizer:
    merges = [tuple(m.split(" ", 1)) for m in g.metadata.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False, ignore_merges=pre.ignore_merges))
    tok.pre_tokenizer = pre.split()
    tok.decoder = decoders.ByteLevel()
    return tok


def sentencepiece_merges(tokens: list, types: list) -> list:
    """Merges implied by a SentencePiece-BPE vocabulary, in rank order.

    Pieces are ordered by score, i.e. by id; a normal piece that splits into two normal pieces
    is the result of a merge ranked by the piece's own id (ties broken by the parts' ids), as
    transformers' SentencePieceExtractor does.
    """
    normal = {tok: i for i, (tok, kind) in enumerate(zip(tokens, types)) if kind == _NORMAL}
    ranked = []
    for piece, piece_id in normal.items():
        for cut in range(1, len(piece)):
            left, right = piece[:cut], piece[cut:]
            if left in normal and right in normal:
                ranked.append((piece_id, normal[left], normal[right], left, right))
    ranked.sort()
    return [(left, right) for *_, left, right in ranked]


def _sentencepiece_tokenizer(g: GGUFFile, tokens: list, types: list) -> Tokenizer:
    vocab = {tok: i for i, tok in enumerate(tokens)}
    unk = _special(g, tokens, "unknown")
    tok = Tokenizer(
        models.BPE(vocab, sentencepiece_merges(tokens, types), unk_token=unk, fuse_unk=True, byte_fallback=True)
    )
    steps = [normalizers.Replace(" ", "▁")]
    if g.metadata.get("tokenizer.ggml.add_space_prefix", True):
        steps.insert(0, normalizers.Prepend("▁"))
    tok.normalizer = normalizers.Sequence(steps)
    dec = [decoders.Replace("▁", " "), decoders.ByteFallback(), decoders.Fuse()]
    if g.metadata.get("tokenizer.ggml.add_space_prefix", True):
        dec.append(decoders.Strip(" ", 1, 0))
    tok.decoder = decoders.Sequence(dec)
    return tok


def _special(g: GGUFFile, tokens: list, name: str) -> str | None:
    token_id = g.metadata.get(f"tokenizer.ggml.{name}_token_id")
    return tokens[int(token_id)] if token_id is not None and int(token_id) < len(tokens) else None


# Token texts llama.cpp (llama-vocab.cpp) treats as end of generation whatever the metadata says
# (the ones of supported families: Llama 3's end of turn / tool call, ChatML's <|im_end|>,
# Gemma's <end_of_turn>, ...), and its fill-in-the-middle pad / repo / file-separator tokens,
# which also end generation there, found by text unless the metadata names them.
_EOG_TEXTS = frozenset(
    {
        "<|eot_id|>", "<|eom_id|>", "<|end_of_text|>", "<|im_end|>", "<|endoftext|>", "<|end|>", "<end_of_turn>",
        "<eos>", "</s>", "<EOT>", "_<EOT>", "<｜end▁of▁sentence｜>",
    }
)
_FIM_EOG_TEXTS = {
    "fim_pad": {"<|fim_pad|>", "<fim-pad>", "<fim_pad>", "<PAD>", "[PAD]"},
    "fim_rep": {"<|fim_repo|>", "<|repo_name|>", "<fim-repo>", "<REPO>", "<reponame>"},
    "fim_sep": {"<|file_sep|>"},
}


def end_of_generation_ids(g: GGUFFile) -> list[int]:
    """Every token llama.cpp stops generating at: eos / eot / eom from the metadata, then the
    known end-of-turn and fill-in-the-middle tokens. With eos alone, mlx-lm would run past a
    Llama 3 <|eot_id|> or a Gemma <end_of_turn> whenever the file's eos is the end-of-text token."""
    tokens = g.metadata.get("tokenizer.ggml.tokens", [])
    ids = [g.metadata.get(f"tokenizer.ggml.{name}_token_id") for name in ("eos", "eot", "eom")]
    ids += [i for i, text in enumerate(tokens) if text in _EOG_TEXTS]
    for name, texts in _FIM_EOG_TEXTS.items():
        named = g.metadata.get(f"tokenizer.ggml.{name}_token_id")
        ids += [named] if named is not None else [i for i, text in enumerate(tokens) if text in texts]
    return list(dict.fromkeys(int(i) for i in ids if i is not None and 0 <= int(i) < len(tokens)))


def build_tokenizer(g: GGUFFile) -> tuple[Tokenizer, dict]:
    """The tokenizer and the tokenizer_config.json dict (special tokens, chat template)."""
    family = g.metadata.get("tokenizer.ggml.model")
    tokens = list(g.metadata.get("tokenizer.ggml.tokens", []))
    types = list(g.metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    if family == "gpt2":
        pre = _bpe_pre_tokenizer(g)
        tok, add_bos_default = _gpt2_tokenizer(g, tokens, pre), pre.add_bos
    elif family == "llama":
        tok, add_bos_default = _sentencepiece_tokenizer(g, tokens, types), True  # llama.cpp's SPM default
    else:
        raise UnsupportedModelError(f"{g.path}: tokenizer model {family!r} is not supported (supported: gpt2, llama)")
    tok.add_tokens(_added_tokens(tokens, types))

    bos = _special(g, tokens, "bos")
    add_bos = bool(g.metadata.get("tokenizer.ggml.add_bos_token", add_bos_default)) and bos is not None
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", pair=f"{bos} $A {bos} $B", special_tokens=[(bos, tokens.index(bos))]
        )
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        "clean_up_tokenization_spaces": False,
        "add_bos_token": add_bos,
        "add_eos_token": False,
        "model_max_length": int(g.arch_value("context_length", 4096)),
    }
    for name, gguf_name in (("bos", "bos"), ("eos", "eos"), ("unk", "unknown"), ("pad", "padding")):
        value = _special(g, tokens, gguf_name)
        if value is not None:
            config[f"{name}_token"] = value
    template = g.metadata.get("tokenizer.chat_template")
    if template:
        config["chat_template"] = template
    return tok, config


def write_tokenizer(g: GGUFFile, out_dir: Path) -> None:
    """Write tokenizer.json and tokenizer_config.json for transformers / mlx-lm into out_dir."""
    tok, config = build_tokenizer(g)
    tok.save(str(out_dir / "tokenizer.json"))
    (out_dir / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False))
