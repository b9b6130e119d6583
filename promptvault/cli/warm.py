"""`promptvault warm SOURCES…`: prefill prompts once and store their caches."""

import json
import sys
import time

import click

from promptvault.cli.common import codec_options, json_option, make_codec, model_option, open_vault, vault_options
from promptvault.sources import prompt_tokens, read_sources
from promptvault.tables import format_table
from promptvault.vault.sizes import fp16_bytes_per_token


@click.command("warm")
@click.argument("sources", nargs=-1, required=True)
@click.option("--chat", is_flag=True, help="Wrap plain-text prompts as a user message in the chat template.")
@click.option("--system", default=None, help="System message for chat prompts.")
@click.option("--label", default=None, help="Label for the warmed entries (default: the source).")
@model_option
@codec_options
@vault_options
@json_option
def warm_cmd(sources, chat, system, label, model, key_bits, value_bits, vault_path, block_size, ram_cap,
             disk_cap, as_json):
    """Prefill SOURCES (files, directories, '-', .json, .jsonl) and store their caches.

    Chat messages get the model's chat template; plain text is used raw unless --chat.
    """
    from promptvault.models import load_model

    prompts = read_sources(list(sources))
    rows = []
    with open_vault(vault_path, block_size, ram_cap, disk_cap, make_codec(key_bits, value_bits)) as vault:
        vault.require_writable("warm prompts")  # before the model loads: fail in a second, not ten
        lm = load_model(model)
        encoded = [(p, prompt_tokens(lm.tokenizer, p, chat=chat, system=system)) for p in prompts]
        per_token = fp16_bytes_per_token(vault.namespace(lm).descriptor)
        total = sum(len(tokens) for _, tokens in encoded)
        # The bar is for people watching a terminal; pipes and logs get only the summary.
        with click.progressbar(length=total, label="warming", file=sys.stderr, show_pos=True,
                               item_show_func=lambda s: s, hidden=not sys.stderr.isatty()) as bar:
            for prompt, tokens in encoded:
                start = time.perf_counter()
                result = vault.warm(lm, tokens, label=label or prompt.source, source=prompt.source)
                seconds = time.perf_counter() - start
                new_tokens = result.tokens - result.tokens_reused
                rows.append({
                    "source": prompt.source, "tokens": result.tokens, "new_chunks": result.written,
                    "reused_chunks": result.chunks - result.written, "bytes_written": result.bytes_written,
                    "ratio_vs_fp16": (per_token * new_tokens / result.bytes_written) if result.bytes_written else None,
                    "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds else None,
                    "evicted_chunks": result.evicted,
                })
                bar.update(len(tokens), f"{prompt.source} ({rows[-1]['tokens_per_s'] or 0:.0f} tok/s)")
    if as_json:
        click.echo(json.dumps({"prompts": rows}, indent=1))
    else:
        click.echo(format_table(rows, ["source", "tokens", "new_chunks", "reused_chunks", "bytes_written",
                                       "ratio_vs_fp16", "seconds"]))
