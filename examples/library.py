"""An mlx-lm script that gains a vault: a prompt's cache is stored after the answer and restored next time.

    python examples/library.py MODEL_DIR [VAULT_DIR]
"""
import sys

import mlx_lm

import promptvault

path = sys.argv[1]
model, tokenizer = mlx_lm.load(path)
lm = promptvault.from_mlx_lm(model, tokenizer, path)
vault = promptvault.Vault(sys.argv[2] if len(sys.argv) > 2 else "~/.cache/promptvault")

messages = [{"role": "user", "content": "Name three uses of a prompt cache."}]
tokens = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
cache, rest = vault.fetch(lm, tokens)  # the longest stored prefix, and the tokens still to prefill
print(f"reused {len(tokens) - len(rest)} of {len(tokens)} prompt tokens")
print(mlx_lm.generate(model, tokenizer, rest, prompt_cache=cache, max_tokens=40))
vault.save(lm, cache, tokens)  # store the prompt's blocks for the next run
