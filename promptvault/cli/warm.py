"""`promptvault warm SOURCES…`: prefill prompts once and store their caches."""

import json
import time

import click

from promptvault.cli.common import (codec_options, json_option, model_option, open_vault, raw_option,
                                    vault_options)
from promptvault.cli.progress import Progress
from promptvault.sources import Prompt, prompt_tokens, read_sources
from promptvault.tables import format_table


def _tokens(tokenizer, prompt: Prompt, raw: bool, system: str | None) -> list[int]:
    """A conversation as a run of it would start; a text as the document of a
    `run --context FILE -p QUESTION` (the token prefix every such run starts with)."""
    from promptvault.prompting import context_prefix

    if prompt.messages is not None:
        return prompt_tokens(tokenizer, prompt, system=system)
    return context_prefix(tokenizer, [prompt.text], raw=raw, system=system)


@click.command("warm")
@click.argument("sources", nargs=-1, required=True)
@raw_option
@click.option("--system", default=None, help="System message (as given to the runs that will reuse them).")
@click.option("--join", is_flag=True,
              help="Store the text sources as ONE document, in order (for `run --context A --context B`).")
@click.option("--label", default=None, help="Label for the warmed entries (default: the source).")
@model_option
@codec_options
@vault_options
@json_option
def warm_cmd(sources, raw, system, join, label, model, codec, vault_path, block_size,
             ram_cap, disk_cap, as_json):
    """Prefill SOURCES (files, directories, '-', .json, .jsonl) and store their caches.

    Each text is stored as the document a later `promptvault run --context FILE -p QUESTION`
    starts with: through the chat template (--raw: as is, for `run --raw`). Chat conversations
    are stored as a run of them starts (template applied, assistant turn opened).

    Example: promptvault warm manual.txt && promptvault run --context manual.txt -p "How do I reset it?"
    """
    from promptvault.models import load_model
    from promptvault.prompting import user_text

    prompts = read_sources(list(sources))
    if join:
        if any(p.messages is not None for p in prompts):
            raise click.UsageError("--join takes text sources only, not chat conversations")
        prompts = [Prompt(source=" + ".join(p.source for p in prompts), text=user_text([p.text for p in prompts], None))]
    rows = []
    with open_vault(vault_path, block_size, ram_cap, disk_cap, codec) as vault:
        vault.require_writable("warm prompts")  # before the model loads: fail in a second, not ten
        lm = load_model(model)
        encoded = [(p, _tokens(lm.tokenizer, p, raw, system)) for p in prompts]
        total, base = sum(len(tokens) for _, tokens in encoded), 0
        # The bar is for people watching a terminal (it moves per prefill step); pipes, logs
        # and --json get only the summary.
        with Progress("warming", enabled=not as_json) as bar:
            for prompt, tokens in encoded:
                start = time.perf_counter()
                result = vault.warm(lm, tokens, label=label or prompt.source, source=prompt.source,
                                    progress=lambda done, _total, base=base: bar(base + done, total))
                base += len(tokens)
                seconds = time.perf_counter() - start
                new_tokens = result.tokens - result.tokens_reused
                rows.append({
                    "source": prompt.source, "tokens": result.tokens, "new_chunks": result.written,
                    "reused_chunks": result.chunks - result.written, "bytes_written": result.bytes_written,
                    "ratio_vs_fp16": result.fp16_bytes / result.bytes_written if result.bytes_written else None,
                    "seconds": seconds, "tokens_per_s": new_tokens / seconds if seconds else None,
                    "evicted_chunks": result.evicted,
                })
    if as_json:
        click.echo(json.dumps({"prompts": rows}, indent=1))
    else:
        click.echo(format_table(rows, ["source", "tokens", "new_chunks", "reused_chunks", "bytes_written",
                                       "ratio_vs_fp16", "seconds"]))
