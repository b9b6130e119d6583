"""promptvault as a library: warm a long system prompt into a vault once, then answer questions
that share it by restoring the stored prefix instead of prefilling it again.

    python examples/library_api.py [vault-dir]

Runs on the default model (SmolLM2-135M-Instruct, installed by `make setup`).
"""

import sys
import tempfile
import time

from mlx_lm import stream_generate

from promptvault import Vault, load_model

RULES = "\n".join(
    f"{i}. When a customer asks about order type {i}, quote policy section {i * 7 % 31} and "
    f"offer the standard {i % 5 + 1}-day resolution window."
    for i in range(1, 40)
)
SYSTEM = f"You are the support assistant of a small hardware shop. Follow these rules:\n{RULES}"


def chat_tokens(lm, question: str | None) -> list[int]:
    """The chat prompt; with no question, just the system turn (a prefix of every chat)."""
    messages = [{"role": "system", "content": SYSTEM}]
    if question is not None:
        messages.append({"role": "user", "content": question})
    return list(lm.tokenizer.apply_chat_template(messages, add_generation_prompt=question is not None))


def answer(lm, vault: Vault, question: str) -> None:
    tokens = chat_tokens(lm, question)
    t0 = time.perf_counter()
    r = vault.restore(lm, tokens)  # fresh mlx-lm caches holding the longest stored prefix
    print(f"\nQ: {question}\n   {r.tokens_reused}/{r.tokens_total} tokens restored from {r.tier} "
          f"in {r.seconds * 1e3:.0f} ms (lookup {r.lookup_s * 1e3:.1f}, read {r.read_s * 1e3:.1f}, "
          f"decode {r.decode_s * 1e3:.1f})")
    text = ""
    for out in stream_generate(lm.model, lm.tokenizer, tokens[r.tokens_reused:], max_tokens=40,
                               prompt_cache=r.cache):
        text += out.text
    print(f"A: {text.strip()}\n   (restore + 40-token answer: {time.perf_counter() - t0:.2f} s)")


def main() -> None:
    path = sys.argv[1] if len(sys.argv) > 1 else tempfile.mkdtemp(prefix="promptvault-")
    lm = load_model()
    with Vault(path) as vault:  # default block size 256, default codec (4-bit keys, 3-bit values)
        w = vault.warm(lm, chat_tokens(lm, None), label="support-system-prompt")
        print(f"warmed {w.tokens} tokens: {w.written} new chunks, {w.bytes_written / 1e6:.2f} MB, "
              f"prefill {w.prefill_s:.2f} s, encode {w.encode_s:.2f} s, write {w.write_s:.2f} s")
        answer(lm, vault, "What is the resolution window for order type 12?")
        answer(lm, vault, "Which policy section applies to order type 3?")
        s = vault.stats()
        print(f"\nvault {s.path}: {s.bytes_on_disk / 1e6:.2f} MB on disk, {s.chunks} chunks, {s.ram_chunks} in RAM")


if __name__ == "__main__":
    main()
