"""`promptvault run`: generate, reusing the longest stored prefix of the prompt."""

import json
import logging
import sys
from pathlib import Path

import click

from promptvault.cli.common import (codec_options, json_option, model_option, open_vault, raw_option,
                                    vault_options)
from promptvault.errors import PromptvaultError
from promptvault.sources import Prompt, PromptSourceError, read_sources, read_text

log = logging.getLogger("promptvault.cli")


def _one(found: list[Prompt], path) -> Prompt:
    if len(found) != 1:
        raise PromptSourceError(f"{path}: holds {len(found)} prompts; run takes one "
                                "(`promptvault warm` takes many)")
    return found[0]


def _prompt(prompt, prompt_file, messages) -> Prompt:
    given = [x for x in (prompt, prompt_file, messages) if x is not None]
    if len(given) > 1:
        raise click.UsageError("give only one of --prompt, --prompt-file, --messages")
    if prompt is not None:
        if not prompt.strip():
            raise PromptSourceError("empty prompt")
        return Prompt(source="--prompt", text=prompt)
    if prompt_file is not None:
        if Path(prompt_file).is_dir():
            raise PromptSourceError(f"{prompt_file}: is a directory; run takes one prompt file "
                                    "(`promptvault warm` takes directories)")
        return _one(read_sources([str(prompt_file)]), prompt_file)
    if messages is not None:
        found = _one(read_sources([str(messages)]), messages)
        if found.messages is None:
            raise PromptSourceError(f"{messages}: expected one chat conversation: [{{role, content}}, …] "
                                    'or {"messages": [...]}')
        return found
    if sys.stdin.isatty():
        raise click.UsageError("no prompt: give --prompt, --prompt-file, --messages or pipe text on stdin")
    return read_sources(["-"])[0]


def run_tokens(tokenizer, source: Prompt, context: list[str], raw: bool, system: str | None) -> list[int]:
    """The run's tokens: a conversation file as is; text (after any --context documents) as one
    user message through the chat template, or raw (promptvault.prompting has the rules)."""
    from promptvault.prompting import context_prefix, encode, encode_messages, user_text

    if source.messages is not None:
        if context:
            raise click.UsageError("--context goes with --prompt, --prompt-file or stdin, not --messages")
        if raw:
            raise click.UsageError("--raw is for text prompts: --messages always uses the chat template")
        return encode_messages(tokenizer, list(source.messages), system=system)
    tokens = encode(tokenizer, user_text(context, source.text), raw=raw, system=system)
    if context:  # what `warm` stored for these documents must be a token prefix of this run
        prefix = context_prefix(tokenizer, context, raw=raw, system=system)
        if tokens[:len(prefix)] != prefix:
            log.warning("the documents tokenize differently before this question: a warmed copy of them "
                        "is reused only up to where the tokens part")
    return tokens


@click.command("run")
@click.option("--prompt", "-p", default=None, help="Prompt text (the question, with --context).")
@click.option("--prompt-file", type=click.Path(path_type=Path), default=None,
              help="Read the prompt from one file (text, or .json/.jsonl holding one prompt).")
@click.option("--messages", type=click.Path(path_type=Path), default=None,
              help='JSON file with one chat conversation: [{role, content}, …] or {"messages": [...]}.')
@click.option("--context", "context_files", type=click.Path(path_type=Path, dir_okay=False), multiple=True,
              help="A document the prompt is about (repeatable): it starts the user message, before the "
                   "prompt; `promptvault warm FILE` stores exactly that start.")
@click.option("--system", default=None, help="System message (replaces the template's default one).")
@raw_option
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
def run_cmd(prompt, prompt_file, messages, context_files, system, raw, max_tokens, temp, top_p, seed, save,
            no_vault, model, codec, vault_path, block_size, ram_cap, disk_cap, as_json):
    """Generate from a prompt, restoring its longest stored prefix instead of prefilling it.

    The prompt goes through the model's chat template as a user message (as mlx_lm.generate);
    --raw sends it as is. Text streams to stdout; the report (reused tokens, tier, restore /
    prefill / first-token times, decode speed) goes to stderr, or everything as one JSON object
    with --json.

    Example: promptvault warm report.txt && promptvault run --context report.txt -p "Who wrote it?"
    """
    from promptvault.cli.progress import Progress
    from promptvault.generate import run_prompt
    from promptvault.models import load_model

    source = _prompt(prompt, prompt_file, messages)
    context = [read_text(Path(f)) for f in context_files]
    lm = load_model(model)
    tokens = run_tokens(lm.tokenizer, source, context, raw, system)
    if not tokens:
        raise PromptvaultError("empty prompt: it encodes to no tokens")
    stream = None if as_json else (lambda text: click.echo(text, nl=False))
    with Progress("prefill", delay_s=2.0, enabled=not as_json) as progress:
        def on_text(text):
            progress.close()
            if stream:
                stream(text)

        kwargs = dict(max_tokens=max_tokens, temp=temp, top_p=top_p, seed=seed, on_text=on_text, on_prefill=progress)
        if no_vault:
            result = run_prompt(lm, tokens, vault=None, **kwargs)
        else:
            with open_vault(vault_path, block_size, ram_cap, disk_cap, codec) as vault:
                result = run_prompt(lm, tokens, vault=vault, save=save, **kwargs)
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

