"""Verbs that look after a vault: ls, stats, inspect, verify, gc, rm, reindex, config."""

import json
import time
from pathlib import Path

import click

from promptvault.cli import remote as remote_cli
from promptvault.cli.common import ByteSize, json_option, open_vault, vault_options
from promptvault.cli.quality import quality_of
from promptvault.errors import PromptvaultError
from promptvault.tables import format_table
from promptvault.vault.sizes import fp16_bytes_per_token


def _echo(data, as_json: bool, human) -> None:
    click.echo(json.dumps(data, indent=1, default=str) if as_json else human(data))


def _when(ts) -> str:
    return time.strftime("%Y-%m-%d %H:%M", time.localtime(ts)) if ts else "-"


@click.command("ls")
@vault_options
@json_option
def ls_cmd(vault_path, block_size, ram_cap, disk_cap, as_json):
    """List warmed prompts (--remote: those the remote holds)."""
    with open_vault(vault_path, block_size, ram_cap, disk_cap) as vault:
        if remote_cli.asked():  # remote tier
            return _echo(remote_cli.ls(vault), as_json, lambda r: format_table(r, remote_cli.LS_COLUMNS))
        rows = [
            {"label": w["label"], "source": w["source"], "tokens": w["n_tokens"],
             "namespace": w["namespace"][:12], "created": _when(w["created"]), "last_key": w["last_key"]}
            for w in vault.index.warmed()
        ]
    _echo(rows, as_json, lambda r: format_table(r, ["label", "source", "tokens", "namespace", "created"]))


def vault_stats(vault) -> dict:
    """Totals for the whole vault and per namespace, with the float16 size of what is stored."""
    raw = vault.stats()
    descriptors = {n["id"]: n["descriptor"] for n in vault.index.namespaces()}
    namespaces = []
    for ns in raw["namespaces"]:
        descriptor = descriptors[ns["namespace"]]
        descriptor = json.loads(descriptor) if isinstance(descriptor, str) else descriptor
        fp16 = ns["tokens"] * fp16_bytes_per_token(descriptor)
        namespaces.append({**ns, "fp16_bytes": fp16, "ratio_vs_fp16": fp16 / ns["bytes"] if ns["bytes"] else None,
                           "quality": quality_of(ns["codec"])})
    chunks = sum(ns["chunks"] for ns in namespaces)
    fp16_total = sum(ns["fp16_bytes"] for ns in namespaces)
    return {
        "path": raw["path"], "block_size": raw["block_size"], "chunks": chunks,
        "bytes_on_disk": raw["disk_bytes"], "shard_bytes": raw["shard_bytes"], "fp16_bytes": fp16_total,
        "ratio_vs_fp16": fp16_total / raw["shard_bytes"] if raw["shard_bytes"] else None,
        "disk_cap": raw["disk_cap"], "warmed": raw["warmed"], "quarantined": raw["quarantined"],
        "namespaces": namespaces,
    }


def _stats_text(s: dict) -> str:
    head = [
        f"vault        {s['path']}",
        f"block size   {s['block_size']} tokens",
        f"chunks       {s['chunks']} ({s['warmed']} warmed prompts, {s['quarantined']} quarantined files)",
        f"on disk      {s['bytes_on_disk']:,} bytes (cap: {s['disk_cap'] if s['disk_cap'] is not None else 'none'})",
        f"fp16 size    {s['fp16_bytes']:,} bytes" + (f" ({s['ratio_vs_fp16']:.2f}x vs shards)" if s["ratio_vs_fp16"] else ""),
    ]
    rows = [{"namespace": n["namespace"][:12], "chunks": n["chunks"], "tokens": n["tokens"], "bytes": n["bytes"],
             "ratio_vs_fp16": n["ratio_vs_fp16"], "quality": n["quality"] or "custom", "codec": json.dumps(n["codec"], separators=(",", ":"))}
            for n in s["namespaces"]]
    return "\n".join(head) + ("\n\n" + format_table(rows) if rows else "")


@click.command("stats")
@vault_options
@json_option
def stats_cmd(vault_path, block_size, ram_cap, disk_cap, as_json):
    """Chunks, bytes on disk and their float16 equivalent, per namespace (--remote: and the remote's)."""
    with open_vault(vault_path, block_size, ram_cap, disk_cap) as vault:
        stats = vault_stats(vault)
        text = _stats_text
        if remote_cli.asked():  # remote tier
            stats["remote"] = remote_cli.stats(vault)
            text = lambda s: _stats_text(s) + "\n\n" + remote_cli.stats_text(s["remote"])  # noqa: E731
        _echo(stats, as_json, text)


def describe(vault, ref: str) -> dict:
    """A chunk (by key or unique key prefix) or a warmed label: its rows and chain."""
    warmed = [w for w in vault.index.warmed() if w["label"] == ref]
    if warmed:
        return {"label": ref, "entries": [{**w, "chain": _chain(vault, w["last_key"])} for w in warmed]}
    keys = [r["key"] for r in vault.index.all_chunks() if r["key"].startswith(ref)]
    if len(keys) != 1:
        raise PromptvaultError(f"{ref!r} matches {len(keys)} chunks and no warmed label")
    return {"chunk": _chunk_row(vault.index.chunk(keys[0])), "chain": _chain(vault, keys[0])}


def _chunk_row(row: dict) -> dict:
    return {k: v for k, v in row.items() if k != "tokens"}


def _chain(vault, key) -> list[dict]:
    chain = []
    while key:
        row = vault.index.chunk(key)
        if row is None:
            break
        chain.append({"key": row["key"], "position": row["position"], "n_tokens": row["n_tokens"], "bytes": row["bytes"]})
        key = row["parent"]
    return chain[::-1]


@click.command("inspect")
@click.argument("ref")
@vault_options
@json_option
def inspect_cmd(ref, vault_path, block_size, ram_cap, disk_cap, as_json):
    """Show a chunk (KEY or key prefix) or a warmed prompt (LABEL)."""
    with open_vault(vault_path, block_size, ram_cap, disk_cap) as vault:
        info = describe(vault, ref)
    _echo(info, as_json, lambda d: json.dumps(d, indent=1, default=str))


@click.command("verify")
@vault_options
@json_option
def verify_cmd(vault_path, block_size, ram_cap, disk_cap, as_json):
    """Check every shard file (indexed or not); quarantine the corrupt, adopt the unindexed.

    --remote: also download and check every chunk object of the remote (reported, not deleted)."""
    with open_vault(vault_path, block_size, ram_cap, disk_cap) as vault:
        result = vault.verify()
        remote = remote_cli.verify(vault) if remote_cli.asked() else None  # remote tier
    report = {"checked": result["checked"], "corrupt": len(result["bad"]), "quarantined": len(result["bad"]),
              "adopted": len(result["adopted"]), "missing": len(result["missing"]), "bad_keys": result["bad"]}
    text = lambda r: (f"checked {r['checked']} chunks: {r['corrupt']} corrupt, {r['quarantined']} "  # noqa: E731
                      f"quarantined, {r['adopted']} unindexed adopted, {r['missing']} missing files")
    if remote is not None:
        report["remote"] = remote
        text = lambda r, local=text: local(r) + "\n" + remote_cli.verify_text(r["remote"])  # noqa: E731
    _echo(report, as_json, text)
    if report["corrupt"] or (remote and remote["bad"]):
        raise SystemExit(1)


@click.command("gc")
@click.option("--max-bytes", type=ByteSize(), default=None, help="Shrink the vault to this size now (e.g. 1G).")
@click.option("--evict-all", is_flag=True, help="Allow a cap so small that every chunk is evicted.")
@click.option("--empty-quarantine", is_flag=True, help="Delete the damaged files kept in quarantine/.")
@vault_options
@json_option
def gc_cmd(max_bytes, evict_all, empty_quarantine, vault_path, block_size, ram_cap, disk_cap, as_json):
    """Remove temp files and stale rows, adopt orphan shards, and evict down to the disk cap.

    --remote: also delete the remote's chunks that no warmed prompt uses (older than an hour).

    A cap smaller than one stored block is refused, and one that would evict every chunk needs
    --evict-all (to empty a vault: promptvault rm --all)."""
    cap = max_bytes if max_bytes is not None else disk_cap
    with open_vault(vault_path, block_size, ram_cap, cap) as vault:
        result = vault.gc(evict_all=evict_all, empty_quarantine=empty_quarantine)
        result["bytes_on_disk"] = vault.stats()["disk_bytes"]
        if remote_cli.asked():  # remote tier: only when asked
            result["remote"] = remote_cli.gc(vault)
    _echo(result, as_json, lambda r: ", ".join(f"{k.replace('_', ' ')}: {v}" for k, v in r.items()))


class _Cap(ByteSize):
    """A byte size, or `none` (kept as that word: no cap)."""

    def convert(self, value, param, ctx):
        if str(value).lower() == "none":
            return "none"
        return super().convert(value, param, ctx)


@click.command("config")
@click.option("--disk-cap", "new_disk_cap", type=_Cap(), default=None, help="Disk cap kept by the vault (e.g. 10G, or none).")
@click.option("--ram-cap", "new_ram_cap", type=ByteSize(), default=None, help="RAM tier cap kept by the vault (e.g. 512M).")
@click.option("--vault", "vault_path", type=click.Path(path_type=Path), default=None,
              help="Vault directory [default: $PROMPTVAULT_HOME or ~/.cache/promptvault].")
@json_option
def config_cmd(new_disk_cap, new_ram_cap, vault_path, as_json):
    """Show or store the vault's caps; every later command uses them unless given its own.

    Example: promptvault config --disk-cap 20G --ram-cap 1G"""
    changes = {}
    if new_disk_cap is not None:
        changes["disk_cap"] = None if new_disk_cap == "none" else new_disk_cap
    if new_ram_cap is not None:
        changes["ram_cap"] = new_ram_cap
    with open_vault(vault_path, None, None, None) as vault:
        settings = vault.configure(**changes) if changes else {
            "block_size": vault.block_size, "disk_cap": vault.disk.cap, "ram_cap": vault.ram.cap}
    _echo(settings, as_json, lambda r: "\n".join(f"{k.replace('_', ' '):<11}{'none' if v is None else f'{v:,}'}"
                                                 for k, v in r.items()))


@click.command("rm")
@click.argument("label", required=False)
@click.option("--namespace", default=None, help="Remove every chunk of this namespace (id or prefix).")
@click.option("--all", "everything", is_flag=True, help="Remove every chunk.")
@vault_options
@json_option
def rm_cmd(label, namespace, everything, vault_path, block_size, ram_cap, disk_cap, as_json):
    """Remove a warmed prompt (LABEL) and the chunks only it uses, a namespace, or everything."""
    if sum(x is not None and x is not False for x in (label, namespace, everything or None)) != 1:
        raise click.UsageError("give exactly one of LABEL, --namespace or --all")
    with open_vault(vault_path, block_size, ram_cap, disk_cap) as vault:
        if label is not None and not any(w["label"] == label for w in vault.index.warmed()):
            raise PromptvaultError(f"no warmed prompt is labelled {label!r} (see: promptvault ls)")
        removed = vault.rm(label=label, namespace=namespace, everything=everything)
    _echo({"removed_chunks": removed}, as_json, lambda r: f"removed {r['removed_chunks']} chunks")


@click.command("reindex")
@vault_options
@json_option
def reindex_cmd(vault_path, block_size, ram_cap, disk_cap, as_json):
    """Rebuild the index from the shard files alone."""
    with open_vault(vault_path, block_size, ram_cap, disk_cap) as vault:
        result = vault.reindex()
    _echo(result, as_json, lambda r: ", ".join(f"{k}: {v}" for k, v in r.items()))


COMMANDS = [ls_cmd, stats_cmd, inspect_cmd, verify_cmd, gc_cmd, rm_cmd, reindex_cmd, config_cmd]
