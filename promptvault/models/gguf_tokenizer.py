"""Rebuild a Hugging Face tokenizer (tokenizer.json + tokenizer_config.json) from GGUF metadata.

mlx-lm loads tokenizers through transformers, which needs tokenizer.json; a GGUF file carries
the vocabulary as `tokenizer.ggml.*` arrays instead. Two families are rebuilt with the
`tokenizers` library:

* "gpt2" (byte-level BPE: SmolLM2, Qwen2, Llama 3): vocab + merge list from the file; the
  pre-tokenizer is chosen by `tokenizer.ggml.pre` (SmolLM2's "smollm" splits digits one by one).
* "llama" (SentencePiece BPE: Gemma, Llama 2): the file has scores but no merges, so the merge
  list is rebuilt from vocabulary order (a piece that splits into two pieces becomes a merge
  ranked by its own position); spaces become "▁"; unknown bytes fall back to <0xNN> pieces.
  User-defined pieces (Gemma's runs of spaces, tabs and newlines, stored with real whitespace)
  are matched first and whole, as SentencePiece does.

An unknown pre-tokenizer is refused: a slightly wrong tokenizer still runs, but shows up
only as a perplexity several times too high.
"""

import json
from pathlib import Path

from tokenizers import AddedToken, Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, processors

from promptvault.errors import UnsupportedModelError
from promptvault.models.gguf_file import GGUFFile

# llama.cpp token types (gguf.TokenType)
_NORMAL, _CONTROL, _USER_DEFINED, _BYTE = 1, 3, 4, 6

_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)


def _regex_split(pattern: str) -> pre_tokenizers.PreTokenizer:
    """Split by a llama.cpp regex, then map bytes to GPT-2's printable alphabet."""
    return pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(pattern), behavior="isolated", invert=False),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )


# tokenizer.ggml.pre -> pre-tokenizer (names as llama.cpp's convert_hf_to_gguf writes them)
_BPE_PRE_TOKENIZERS = {
    "default": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "gpt-2": lambda: pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
    "smollm": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    ),
    "starcoder": lambda: pre_tokenizers.Sequence(
        [pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)]
    ),
    "qwen2": lambda: _regex_split(_QWEN2_SPLIT),
    "llama-bpe": lambda: _regex_split(_LLAMA3_SPLIT),
}


def _added_tokens(tokens: list, types: list) -> list:
    """Control pieces become special tokens; user-defined pieces are matched whole, before BPE."""
    return [
        AddedToken(tok, special=(kind == _CONTROL), normalized=False)
        for tok, kind in zip(tokens, types)
        if kind in (_CONTROL, _USER_DEFINED)
    ]


def _gpt2_tokenizer(g: GGUFFile, tokens: list) -> Tokenizer:
    pre = g.metadata.get("tokenizer.ggml.pre", "default")
    if pre not in _BPE_PRE_TOKENIZERS:
        raise UnsupportedModelError(
            f"{g.path}: BPE pre-tokenizer {pre!r} is not supported "
            f"(supported: {', '.join(sorted(_BPE_PRE_TOKENIZERS))})"
        )
    merges = [tuple(m.split(" ", 1)) for m in g.metadata.get("tokenizer.ggml.merges", [])]
    vocab = {tok: i for i, tok in enumerate(tokens)}
    tok = Tokenizer(models.BPE(vocab, merges, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = _BPE_PRE_TOKENIZERS[pre]()
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


def build_tokenizer(g: GGUFFile) -> tuple[Tokenizer, dict]:
    """The tokenizer and the tokenizer_config.json dict (special tokens, chat template)."""
    family = g.metadata.get("tokenizer.ggml.model")
    tokens = list(g.metadata.get("tokenizer.ggml.tokens", []))
    types = list(g.metadata.get("tokenizer.ggml.token_type", [_NORMAL] * len(tokens)))
    if family == "gpt2":
        tok = _gpt2_tokenizer(g, tokens)
    elif family == "llama":
        tok = _sentencepiece_tokenizer(g, tokens, types)
    else:
        raise UnsupportedModelError(f"{g.path}: tokenizer model {family!r} is not supported (supported: gpt2, llama)")
    tok.add_tokens(_added_tokens(tokens, types))

    bos = _special(g, tokens, "bos")
    add_bos = bool(g.metadata.get("tokenizer.ggml.add_bos_token", False)) and bos is not None
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
