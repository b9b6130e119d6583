"""The remote tier on the command line: `push`, `pull`, and the `--remote` parts of ls, stats,
verify and gc (promptvault/vault/remote*.py do the work)."""

import json

import click

from promptvault import Vault
from promptvault.cli.common import json_option, open_vault, vault_option
from promptvault.tables import format_table

LS_COLUMNS = ["label", "source", "tokens", "namespace", "created", "chunks"]


def _need_remote(vault) -> None:
    if vault.remote is None:
        raise click.UsageError("no remote: give --remote s3://bucket/prefix (or set PROMPTVAULT_REMOTE)")


def stats_text(s: dict) -> str:
    rows = [{"namespace": n["namespace"][:12], "chunks": n["chunks"], "bytes": n["bytes"], "warmed": n["warmed"],
             "block_size": n["block_size"]} for n in s["namespaces"]]
    head = f"remote       {s['remote']}: {s['chunks']} chunks, {s['bytes']:,} bytes, {s['warmed']} warmed prompts"
    return head + ("\n\n" + format_table(rows) if rows else "")


def verify_text(r: dict) -> str:
    lines = [f"remote {r['remote']}: checked {r['checked']} chunk objects: {len(r['bad'])} corrupt"]
    lines += [f"  corrupt: {b['path']} ({b['problem']})" for b in r["bad"]]
    return "\n".join(lines)


def _move(vault_path, labels, everything, move) -> dict:
    """`move(vault, labels or None for all)` (Vault.push or Vault.pull) on the vault's remote."""
    if bool(labels) == bool(everything):
        raise click.UsageError("give LABEL… or --all")
    with open_vault(vault_path) as vault:
        _need_remote(vault)
        return move(vault, None if everything else list(labels))


@click.command("push")
@click.argument("labels", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every warmed prompt of the vault.")
@vault_option
@json_option
def push_cmd(labels, everything, vault_path, as_json):
    """Put warmed prompts (LABEL…, or --all) on the remote tier; chunks it holds are skipped.

    Example: promptvault push manual.txt --remote s3://team-bucket/vault"""
    result = _move(vault_path, labels, everything, Vault.push)
    click.echo(json.dumps(result, indent=1) if as_json else
               f"pushed {result['prompts']} warmed prompts to {result['remote']}: {result['chunks_put']} chunks put")


@click.command("pull")
@click.argument("labels", nargs=-1)
@click.option("--all", "everything", is_flag=True, help="Every warmed prompt the remote holds.")
@vault_option
@json_option
def pull_cmd(labels, everything, vault_path, as_json):
    """Copy warmed prompts (LABEL…, or --all) from the remote tier into the vault, each chunk
    checked (checksum, key vs its tokens) before it is kept.

    Example: promptvault pull manual.txt --remote s3://team-bucket/vault"""
    result = _move(vault_path, labels, everything, Vault.pull)
    click.echo(json.dumps(result, indent=1) if as_json else
               f"pulled {result['prompts']} warmed prompts from {result['remote']}: {result['chunks_fetched']} "
               f"chunks fetched, {result['chunks_present']} already here, {result['failed']} failed their check")
    if result["failed"]:
        raise SystemExit(1)


COMMANDS = [push_cmd, pull_cmd]
