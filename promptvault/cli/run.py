"""`promptvault run`: generate, reusing the longest stored prefix of the prompt."""

import json
import sys
from pathlib import Path

import click

from promptvault.cli.common import codec_options, json_option, make_codec, model_option, open_vault, vault_options
from promptvault.errors import PromptvaultError
from promptvault.sources import Prompt, PromptSourceError, prompt_tokens, read_sources


def _prompt(prompt, prompt_file, messages) -> Prompt:
    given = [x for x in (prompt, prompt_file, messages) if x is not None]
    if len(given) > 1:
        raise click.UsageError("give only one of --prompt, --prompt-file, --messages")
    if prompt is not None:
        if not prompt.strip():
            raise PromptSourceError("empty prompt")
        return Prompt(source="--prompt", text=prompt)
    if prompt_file is not None:
        return read_sources([str(prompt_file)])[0]
    if messages is not None:
        found = read_sources([str(messages)])
        if len(found) != 1 or found[0].messages is None:
            raise PromptSourceError(f"{messages}: expected one chat conversation (a JSON list of messages)")
        return found[0]
    if sys.stdin.isatty():
        raise click.UsageError("no prompt: give --prompt, --prompt-file, --messages or pipe text on stdin")
    return read_sources(["-"])[0]


@click.command("run")
@click.option("--prompt", "-p", default=None, help="Prompt text.")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None, help="Read the prompt from a file.")
@click.option("--messages", type=click.Path(path_type=Path), default=None,
              help="JSON file with one chat conversation: [{role, content}, …].")
@click.option("--system", default=None, help="System message (the prompt becomes a chat).")
@click.option("--chat", is_flag=True, help="Send the prompt as a user message through the chat template.")
@click.option("--max-tokens", type=click.IntRange(min=1), default=256, show_default=True)
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@click.option("--save/--no-save", default=True, show_default=True, help="Store the prompt's new blocks.")
@click.option("--no-vault", is_flag=True, help="Run cold, without the vault (for comparison).")
@model_option
@codec_options
@vault_options
@json_option
def run_cmd(prompt, prompt_file, messages, system, chat, max_tokens, temp, top_p, seed, save, no_vault, model,
            key_bits, value_bits, vault_path, block_size, ram_cap, disk_cap, as_json):
    """Generate from a prompt, restoring its longest stored prefix instead of prefilling it.

    Text streams to stdout; the report (reused tokens, tier, restore / prefill / first-token
    times, decode speed) goes to stderr, or everything as one JSON object with --json.
    """
    from promptvault.generate import run_prompt
    from promptvault.models import load_model

    source = _prompt(prompt, prompt_file, messages)
    lm = load_model(model)
    tokens = prompt_tokens(lm.tokenizer, source, chat=chat, system=system)
    if not tokens:
        raise PromptvaultError("empty prompt: it encodes to no tokens")
    stream = None if as_json else (lambda text: click.echo(text, nl=False))
    if no_vault:
        result = run_prompt(lm, tokens, vault=None, max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed,
                            on_text=stream)
    else:
        with open_vault(vault_path, block_size, ram_cap, disk_cap, make_codec(key_bits, value_bits)) as vault:
            result = run_prompt(lm, tokens, vault=vault, save=save, max_tokens=max_tokens, temp=temp, top_p=top_p,
                                seed=seed, on_text=stream)
    if as_json:
        click.echo(json.dumps(result.to_json(), indent=1))
        return
    click.echo("")
    click.echo(
        f"reused {result.reused_tokens}/{result.prompt_tokens} prompt tokens (tier: {result.tier}); "
        f"saved {result.saved_chunks} new chunks in {result.save_s * 1000:.0f} ms; "
        f"restore {result.restore_s * 1000:.1f} ms, prefill {result.prefill_s * 1000:.0f} ms, "
        f"time to first token {result.ttft_s * 1000:.0f} ms; "
        f"{result.generation_tokens} tokens at {result.generation_tps:.1f} tok/s",
        err=True,
    )
