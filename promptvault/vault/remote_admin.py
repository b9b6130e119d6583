"""Looking after a remote tier (remote.py): what it holds, checking it, and removing what no
warmed prompt uses. These run only when asked (`ls/stats/verify/gc --remote`); errors raise
RemoteError (one line)."""

from __future__ import annotations

import json
import time

from promptvault.vault.remote import SUFFIX, RemoteTier
from promptvault.vault.remote_sync import check_object, remote_warmed
from promptvault.vault.shards import CorruptShard, parse_shard

GC_MIN_AGE_S = 3600  # a chunk younger than this may belong to a warm still putting its record
_BATCH = 32  # objects held in memory at once while verifying


def _chunk_objects(remote: RemoteTier, ns_id: str):
    """(listed object, key, parent or None) of every chunk object of a namespace; for blocks the
    parent is unknown from the name (None: taken from the object itself)."""
    for o in remote.list(f"ns/{ns_id}/blocks/"):
        yield o, o.path.rsplit("/", 1)[-1].removesuffix(SUFFIX), None
    for o in remote.list(f"ns/{ns_id}/leaves/"):
        parent, name = o.path.split("/")[-2:]
        yield o, name.removesuffix(SUFFIX), None if parent == "root" else parent


def ls(remote: RemoteTier) -> list[dict]:
    """The warmed prompts the bucket holds."""
    return [{"label": r["label"], "source": r["source"], "tokens": r["n_tokens"], "namespace": r["namespace"][:12],
             "created": time.strftime("%Y-%m-%d %H:%M", time.localtime(r["created"])) if r.get("created") else "-",
             "chunks": len(r["keys"])} for r in remote_warmed(remote)]


def stats(remote: RemoteTier) -> dict:
    """Per namespace: chunk objects, bytes, warmed prompts, and what the descriptor says."""
    warmed = remote_warmed(remote)
    rows = []
    for ns_id in remote.list_dirs("ns/"):
        objs = list(_chunk_objects(remote, ns_id))
        try:
            desc = json.loads(remote.get(remote.namespace_path(ns_id)) or b"null") or {}
        except ValueError:
            desc = {}
        rows.append({"namespace": ns_id, "chunks": len(objs), "bytes": sum(o.size for o, _, _ in objs),
                     "warmed": sum(r["namespace"] == ns_id for r in warmed), "model": desc.get("model"),
                     "codec": desc.get("codec"), "block_size": desc.get("block_size")})
    return {"remote": remote.url, "chunks": sum(r["chunks"] for r in rows), "bytes": sum(r["bytes"] for r in rows),
            "warmed": len(warmed), "namespaces": rows}


def verify(remote: RemoteTier) -> dict:
    """Download and check every chunk object (checksum, name, key vs its own tokens); the bad
    ones are reported, not deleted (a corrupt object blocks its key for everyone: delete it by
    hand, or with gc --remote once no warmed prompt uses it)."""
    checked, bad = 0, []
    for ns_id in remote.list_dirs("ns/"):
        objs = list(_chunk_objects(remote, ns_id))
        for start in range(0, len(objs), _BATCH):
            batch = objs[start : start + _BATCH]
            for (o, key, parent), data in zip(batch, remote.get_many([o.path for o, _, _ in batch])):
                if data is None:  # removed meanwhile
                    continue
                checked += 1
                try:
                    check_object(parse_shard(data), ns_id, key, parent)
                except CorruptShard as e:
                    bad.append({"path": o.path, "bytes": o.size, "problem": str(e)})
    return {"remote": remote.url, "checked": checked, "ok": checked - len(bad), "bad": bad}


def gc(remote: RemoteTier, *, min_age_s: float = GC_MIN_AGE_S) -> dict:
    """Delete chunk objects that no warmed prompt's chain uses, unless younger than `min_age_s`
    (a warm on another machine puts its chunks before its record)."""
    live = {k for r in remote_warmed(remote) for k in r["keys"]}
    now = time.time()
    doomed, kept_young, total = [], 0, 0
    for ns_id in remote.list_dirs("ns/"):
        for o, key, _ in _chunk_objects(remote, ns_id):
            total += 1
            if key in live:
                continue
            if now - o.modified.timestamp() < min_age_s:
                kept_young += 1
                continue
            doomed.append(o)
    remote.delete_many([o.path for o in doomed])
    return {"remote": remote.url, "chunks": total, "removed": len(doomed), "bytes_removed": sum(o.size for o in doomed),
            "kept_too_young": kept_young}
