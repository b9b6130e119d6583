"""Verbs that look after a vault: ls, stats, inspect, verify, gc, rm, reindex, config.

Each opens the vault, calls one library method and prints its typed result (as a table or
`--json`). None of them runs a model, so they take only --vault (and what the verb itself needs).
"""

import dataclasses
import json
import time

import click

from promptvault.cli import remote as remote_cli
from promptvault.cli.common import ByteSize, json_option, open_vault, remote_asked, vault_option
from promptvault.cli.quality import quality_of
from promptvault.tables import format_table


def _echo(data, as_json: bool, human) -> None:
    click.echo(json.dumps(data, indent=1, default=str) if as_json else human(data))


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@click.command("ls")
@vault_option
@json_option
def ls_cmd(vault_path, as_json):
    """List warmed prompts (--remote: those the remote holds)."""
    with open_vault(vault_path) as vault:
        if remote_asked():  # remote tier
            return _echo(vault.remote_warmed(), as_json, lambda r: format_table(r, remote_cli.LS_COLUMNS))
        rows = [{"label": w.label, "source": w.source, "tokens": w.tokens, "namespace": w.namespace[:12],
                 "created": _when(w.created), "last_key": w.last_key} for w in vault.warmed()]
    _echo(rows, as_json, lambda r: format_table(r, ["label", "source", "tokens", "namespace", "created"]))


def _stats_json(stats) -> dict:
    data = dataclasses.asdict(stats)
    for ns in data["namespaces"]:
        ns["quality"] = quality_of(ns["codec"])
    return data


def _stats_text(s: dict) -> str:
    head = [
        f"vault        {s['path']}",
        f"block size   {s['block_size']} tokens",
        f"chunks       {s['chunks']} ({s['warmed']} warmed prompts, {s['quarantined']} quarantined files)",
        f"on disk      {s['bytes_on_disk']:,} bytes (cap: {s['disk_cap'] if s['disk_cap'] is not None else 'none'})",
        f"fp16 size    {s['fp16_bytes']:,} bytes" + (f" ({s['ratio_vs_fp16']:.2f}x vs shards)" if s["ratio_vs_fp16"] else ""),
    ]
    rows = [{"namespace": n["namespace"][:12], "chunks": n["chunks"], "tokens": n["tokens"], "bytes": n["bytes"],
             "ratio_vs_fp16": n["ratio_vs_fp16"], "quality": n["quality"] or "custom", "codec": n["codec"]}
            for n in s["namespaces"]]
    return "\n".join(head) + ("\n\n" + format_table(rows) if rows else "")


@click.command("stats")
@vault_option
@json_option
def stats_cmd(vault_path, as_json):
    """Chunks, bytes on disk and their float16 equivalent, per namespace (--remote: and the remote's)."""
    with open_vault(vault_path) as vault:
        stats, text = _stats_json(vault.stats()), _stats_text
        if remote_asked():  # remote tier
            stats["remote"] = vault.remote_stats()
            text = lambda s: _stats_text(s) + "\n\n" + remote_cli.stats_text(s["remote"])  # noqa: E731
        _echo(stats, as_json, text)


def _description_json(d) -> dict:
    chains = [[dataclasses.asdict(c) for c in chain] for chain in d.chains]
    if d.chunk is not None:
        return {"chunk": dataclasses.asdict(d.chunk), "chain": chains[0]}
    return {"label": d.ref, "entries": [{**dataclasses.asdict(w), "chain": c} for w, c in zip(d.warmed, chains)]}


@click.command("inspect")
@click.argument("ref")
@vault_option
@json_option
def inspect_cmd(ref, vault_path, as_json):
    """Show a chunk (KEY or key prefix) or a warmed prompt (LABEL).

    Example: promptvault inspect manual.txt"""
    with open_vault(vault_path) as vault:
        info = _description_json(vault.describe(ref))
    _echo(info, as_json, lambda d: json.dumps(d, indent=1, default=str))


@click.command("verify")
@vault_option
@json_option
def verify_cmd(vault_path, as_json):
    """Check every shard file (indexed or not); quarantine the corrupt, adopt the unindexed.

    --remote: also download and check every chunk object of the remote (reported, not deleted)."""
    with open_vault(vault_path) as vault:
        result = vault.verify()
        remote = vault.remote_verify() if remote_asked() else None  # remote tier
    report = {"checked": result.checked, "corrupt": len(result.bad), "quarantined": len(result.bad),
              "adopted": len(result.adopted), "missing": len(result.missing), "bad_keys": result.bad}
    text = lambda r: (f"checked {r['checked']} chunks: {r['corrupt']} corrupt, {r['quarantined']} "  # noqa: E731
                      f"quarantined, {r['adopted']} unindexed adopted, {r['missing']} missing files")
    if remote is not None:
        report["remote"] = remote
        text = lambda r, local=text: local(r) + "\n" + remote_cli.verify_text(r["remote"])  # noqa: E731
    _echo(report, as_json, text)
    if report["corrupt"] or (remote and remote["bad"]):
        raise SystemExit(1)


@click.command("gc")
@click.option("--max-bytes", "--disk-cap", "cap", type=ByteSize(), default=None,
              help="Shrink the vault to this size now (e.g. 1G) [default: the cap stored by `config`].")
@click.option("--evict-all", is_flag=True, help="Allow a cap so small that every chunk is evicted.")
@click.option("--empty-quarantine", is_flag=True, help="Delete the damaged files kept in quarantine/.")
@vault_option
@json_option
def gc_cmd(cap, evict_all, empty_quarantine, vault_path, as_json):
    """Remove temp files and stale rows, adopt orphan shards, and evict down to the disk cap.

    --remote: also delete the remote's chunks that no warmed prompt uses (older than an hour).

    A cap smaller than one stored block is refused, and one that would evict every chunk needs
    --evict-all (to empty a vault: promptvault rm --all)."""
    with open_vault(vault_path, disk_cap=cap) as vault:
        result = dataclasses.asdict(vault.gc(evict_all=evict_all, empty_quarantine=empty_quarantine))
        if remote_asked():  # remote tier: only when asked
            result["remote"] = vault.remote_gc()
    _echo(result, as_json, lambda r: ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r.items()))


@click.command("config")
@click.option("--disk-cap", "new_disk_cap", type=ByteSize(allow_none=True), default=None,
              help="Disk cap kept by the vault (e.g. 10G, or none).")
@click.option("--ram-cap", "new_ram_cap", type=ByteSize(), default=None, help="RAM tier cap kept by the vault (e.g. 512M).")
@vault_option
@json_option
def config_cmd(new_disk_cap, new_ram_cap, vault_path, as_json):
    """Show or store the vault's caps; every later command uses them unless given its own.

    Example: promptvault config --disk-cap 20G --ram-cap 1G"""
    changes = {}
    if new_disk_cap is not None:
        changes["disk_cap"] = None if new_disk_cap == ByteSize.NONE else new_disk_cap
    if new_ram_cap is not None:
        changes["ram_cap"] = new_ram_cap
    with open_vault(vault_path) as vault:
        settings = dataclasses.asdict(vault.configure(**changes) if changes else vault.settings())
    _echo(settings, as_json, lambda r: "\n".join(f"{k.replace('_', ' '):<11}{'none' if v is None else f'{v:,}'}"
                                                 for k, v in r.items()))


@click.command("rm")
@click.argument("label", required=False)
@click.option("--namespace", default=None, help="Remove every chunk of this namespace (id or prefix).")
@click.option("--all", "everything", is_flag=True, help="Remove every chunk.")
@vault_option
@json_option
def rm_cmd(label, namespace, everything, vault_path, as_json):
    """Remove a warmed prompt (LABEL) and the chunks only it uses, a namespace, or everything."""
    if sum(x is not None and x is not False for x in (label, namespace, everything or None)) != 1:
        raise click.UsageError("give exactly one of LABEL, --namespace or --all")
    with open_vault(vault_path) as vault:
        removed = vault.rm(label=label, namespace=namespace, everything=everything)
    _echo(dataclasses.asdict(removed), as_json, lambda r: f"removed {r['removed_chunks']} chunks")


@click.command("reindex")
@vault_option
@json_option
def reindex_cmd(vault_path, as_json):
    """Rebuild the index from the shard files alone."""
    with open_vault(vault_path) as vault:
        result = dataclasses.asdict(vault.reindex())
    _echo(result, as_json, lambda r: ", ".join(f"{k}: {v}" for k, v in r.items()))


COMMANDS = [ls_cmd, stats_cmd, inspect_cmd, verify_cmd, gc_cmd, rm_cmd, reindex_cmd, config_cmd]
