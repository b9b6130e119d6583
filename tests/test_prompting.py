"""promptvault.prompting on the real SmolLM2 tokenizer and chat template: the prefix `warm`
stores for a document is a true token prefix of every `run --context DOC -p QUESTION`."""

import pytest

from promptvault.prompting import context_prefix, encode, user_text
from promptvault.tokens import common_prefix

DOC = "The museum opened in 1931.\nIts first curator was Ada Byrne, who kept a diary.\n\n"
QUESTIONS = ["Who was the first curator?", "1931 or 1932?", "¿Quién?", "(a) or (b)?", "Ωmega", "<tag> ok",
             "  padded question  ", "\"Quoted\"", "What year?\n"]


@pytest.mark.parametrize("raw", [False, True], ids=["chat", "raw"])
@pytest.mark.parametrize("doc", [DOC, DOC.rstrip(), "Ends with a digit 7", "ends with a colon:"])
def test_context_prefix_is_a_token_prefix_of_every_question(smollm, raw, doc):
    prefix = context_prefix(smollm.tokenizer, [doc], raw=raw)
    doc_tokens = len(smollm.tokenizer.encode(doc.strip(), add_special_tokens=False))
    for question in QUESTIONS:
        run = encode(smollm.tokenizer, user_text([doc], question), raw=raw)
        assert run[:len(prefix)] == prefix, (doc, question)
        # Everything of the document but (at most) its last token is in the stored prefix.
        header = common_prefix(encode(smollm.tokenizer, "A", raw=raw), encode(smollm.tokenizer, "1", raw=raw))
        assert len(prefix) - header >= doc_tokens - 1


def test_chat_renders_the_document_as_the_start_of_the_first_user_turn(smollm):
    text = smollm.tokenizer.decode(encode(smollm.tokenizer, user_text(["  A document.  \n"], "A question?"), raw=False))
    # SmolLM2's template keeps its default system prompt when none is given.
    assert "<|im_start|>system\nYou are a helpful AI assistant" in text
    assert "<|im_start|>user\nA document.\n\nA question?<|im_end|>\n<|im_start|>assistant\n" in text
