"""`promptvault chat`: an interactive conversation (like `mlx_lm.chat`) whose every turn restores
the previous turns from the vault instead of prefilling them (promptvault.chat)."""

import sys
from pathlib import Path

import click

from promptvault.cli.common import codec_options, model_option, open_vault, vault_options
from promptvault.cli.progress import Progress
from promptvault.sources import read_text

HELP_LINE = "Type a message. /reset starts over, /save [NAME] keeps the conversation, /quit leaves."


def _report(result) -> str:
    return (f"[reused {result.reused_tokens}/{result.prompt_tokens} prompt tokens ({result.tier}), "
            f"prefilled {result.prompt_tokens - result.reused_tokens}, first token {result.ttft_s * 1000:.0f} ms, "
            f"{result.generation_tokens} tokens at {result.generation_tps:.1f} tok/s]")


@click.command("chat")
@click.option("--context", "context_files", type=click.Path(path_type=Path, dir_okay=False), multiple=True,
              help="A document to talk about (repeatable): it opens the first message; "
                   "`promptvault warm FILE` stores it ahead of time.")
@click.option("--session", default=None,
              help="Keep the conversation under this name (in the vault) and resume it on the next start.")
@click.option("--system", default=None, help="System message (replaces the template's default one).")
@click.option("--max-tokens", type=click.IntRange(min=1), default=512, show_default=True)
@click.option("--temp", type=click.FloatRange(min=0.0), default=0.0, show_default=True)
@click.option("--top-p", type=click.FloatRange(min=0.0, max=1.0), default=1.0, show_default=True)
@click.option("--seed", type=int, default=None)
@model_option
@codec_options
@vault_options
def chat_cmd(context_files, session, system, max_tokens, temp, top_p, seed, model, codec,
             vault_path, block_size, ram_cap, disk_cap):
    """Chat with the model; each turn reuses the previous turns from the vault.

    Answers stream as they are generated; a line after each one says how many prompt tokens
    were restored. With --session NAME the messages are kept in the vault (sessions/NAME.json)
    and the next `chat --session NAME` continues from the stored cache.

    Example: promptvault chat --context manual.txt --session manual
    """
    import readline  # noqa: F401  (line editing and history with the arrow keys in input())

    from promptvault.chat import Conversation, load_session, save_session, session_path
    from promptvault.models import load_model

    context = [read_text(Path(f)) for f in context_files]
    with open_vault(vault_path, block_size, ram_cap, disk_cap, codec) as vault:
        if session is not None:
            session_path(vault.root, session)  # a bad name fails now, not after the first answer
        conversation = load_session(vault.root, session) if session else None
        if conversation is not None and conversation.messages:
            if context:
                raise click.UsageError(f"session {session!r} already holds its documents: drop --context")
            if system is not None and system != conversation.system:
                raise click.UsageError(f"session {session!r} has its own system message: drop --system")
            click.echo(f"resumed session {session!r}: {len(conversation.messages)} messages", err=True)
        else:
            conversation = Conversation(system=system, context=context)
        lm = load_model(model)
        click.echo(HELP_LINE, err=True)
        while True:
            try:
                line = input(">> ").strip()
            except EOFError:
                click.echo("", err=True)
                break
            except KeyboardInterrupt:
                click.echo("", err=True)
                continue
            if not line:
                continue
            if line in ("/quit", "/exit", "/q"):
                break
            if line == "/reset":
                conversation.reset()
                click.echo("(conversation cleared)", err=True)
                continue
            if line.split()[0] == "/save":
                name = line[len("/save"):].strip() or session
                if not name:
                    click.echo("usage: /save NAME", err=True)
                    continue
                session = name
            elif line.startswith("/"):
                click.echo(f"unknown command {line.split()[0]}. {HELP_LINE}", err=True)
                continue
            else:
                with Progress("prefill", delay_s=2.0) as bar:
                    def on_text(text):
                        bar.close()
                        sys.stdout.write(text)
                        sys.stdout.flush()

                    try:
                        result = conversation.ask(lm, line, vault=vault, max_tokens=max_tokens, temp=temp,
                                                  top_p=top_p, seed=seed, on_text=on_text, on_prefill=bar)
                    except KeyboardInterrupt:  # Ctrl-C stops this answer, not the conversation
                        click.echo("\n(interrupted: this turn was dropped)", err=True)
                        continue
                click.echo("")
                click.echo(_report(result), err=True)
            if session:
                path = save_session(vault.root, session, conversation)
                if line.startswith("/save"):
                    click.echo(f"(saved to {path})", err=True)
