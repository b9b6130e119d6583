"""Token sequences as every part of promptvault takes them: one rule for text without a chat
template, one array form, one common-prefix count.

The vault and the library API accept a prompt as token ids (a list, array or mx.array) or as
text; text is encoded as is, with the tokenizer's special tokens (a BOS where the model wants
one), exactly as `promptvault run --raw` sends it. Chat templates are the CLI's business
(promptvault.prompting), not the vault's.
"""

import numpy as np


def encode_text(tokenizer, text: str) -> list[int]:
    """`text` as is: the tokenizer's own encoding, with its special tokens."""
    return list(tokenizer.encode(text, add_special_tokens=True))


def token_array(tokenizer, tokens) -> np.ndarray:
    """A prompt given as text or token ids, as a flat int64 array of ids."""
    if isinstance(tokens, str):
        tokens = encode_text(tokenizer, tokens)
    return np.asarray(tokens, dtype=np.int64).reshape(-1)


def common_prefix(a, b) -> int:
    """How many leading tokens two token sequences (lists or arrays) share."""
    n = min(len(a), len(b))
    diff = np.flatnonzero(np.asarray(a[:n]) != np.asarray(b[:n]))
    return int(diff[0]) if diff.size else n
