"""How text becomes the tokens of a run, and which token prefix a document contributes to it.

Chat by default, as mlx-lm: a prompt is one user message rendered with the model's chat template
(when it has one) and the assistant's turn opened; `raw` sends the text as is.

A document and a question (`run --context FILE -p QUESTION`) are ONE user message: each part
stripped of surrounding whitespace, joined by a blank line, document(s) first. The document is
the start of the first user turn rather than a system message so that the template's own
system prompt stays (SmolLM2's template adds "You are a helpful AI assistant named SmolLM…"
when no system message is given) and so that a file holding the document followed by the
question (`run --prompt-file doc-and-question.txt`) starts with the very same tokens.

`warm` must store exactly the token prefix such a run starts with. The question is not known
yet, and BPE tokenization at the boundary depends on what follows the document: SmolLM2 encodes
"end.\n\n1" with one "\n\n" token but "end.\n\nA" with two "\n" tokens. So the stored prefix is
the longest token prefix common to the conversation rendered with several probe questions
(a letter, a digit, punctuation, a non-ASCII letter): it stops at the last token that no
question can change.
"""

from promptvault.errors import PromptvaultError
from promptvault.tokens import common_prefix, encode_text

SEPARATOR = "\n\n"
# First characters of the questions the stored prefix must be a prefix for (questions are
# stripped, so none starts with whitespace); each class tokenizes the separator differently.
PROBES = ("A", "a", "1", "?", "(", "Ω", "<")


def has_chat_template(tokenizer) -> bool:
    return getattr(tokenizer, "chat_template", None) is not None


def user_text(context: list[str], question: str | None) -> str:
    """The first user message's text: the documents, then the question, blank-line separated."""
    parts = [p.strip() for p in [*context, *([question] if question is not None else [])]]
    return SEPARATOR.join(p for p in parts if p)


def encode(tokenizer, text: str, *, raw: bool, system: str | None = None) -> list[int]:
    """Tokens of `text` as a run sends it: raw, or one user message through the chat template
    with the assistant's turn opened (raw when the model has no chat template)."""
    if raw or not has_chat_template(tokenizer):
        if system:
            raise PromptvaultError("--system needs the chat template: drop --raw (or --system)")
        return encode_text(tokenizer, text)
    return encode_messages(tokenizer, [{"role": "user", "content": text}], system=system)


def encode_messages(tokenizer, messages: list[dict], *, system: str | None = None,
                    add_generation_prompt: bool = True) -> list[int]:
    """Chat messages through the template (a system message first when `system`)."""
    if not has_chat_template(tokenizer):
        raise PromptvaultError("the model has no chat template for chat messages")
    if system:
        messages = [{"role": "system", "content": system}, *messages]
    return list(tokenizer.apply_chat_template(list(messages), add_generation_prompt=add_generation_prompt,
                                              tokenize=True))


def context_prefix(tokenizer, context: list[str], *, raw: bool, system: str | None = None) -> list[int]:
    """The tokens every `run --context …` over these documents starts with, whatever its question."""
    text = user_text(context, None)
    if not text:
        raise PromptvaultError("empty document: nothing to warm")
    renders = [encode(tokenizer, text + SEPARATOR + probe, raw=raw, system=system) for probe in PROBES]
    n = min(common_prefix(renders[0], r) for r in renders[1:])
    return renders[0][:n]
