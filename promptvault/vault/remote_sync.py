"""Moving chunks between a vault's disk tier and its remote tier (remote.py).

- fetch: at restore (and warm), after the local plan, the prompt's chained keys that the local
  disk misses are asked of the remote in parallel; each object found is checked exactly as a
  local shard is (its own checksum, its key recomputed from its own tokens, parent and namespace)
  and only then published into the disk tier with the same first-writer-wins `publish_shard` and
  indexed, so the ordinary local read path serves it. An object that fails is not used and not
  copied (one warning names it; `verify --remote` lists them all).
- write_through: after warm or save published chunks locally, the ones the remote lacks are put
  there with a conditional put (the first complete object wins, as on disk).
- push / pull: the same two moves for whole warmed prompts, by label, on request.

A remote that is down, slow or refusing never breaks a run: the hooks (fetch, write_through)
turn the first RemoteError into ONE warning line and leave the remote alone for a while
(remote.DOWN_S: the rest of a run; a long-lived process asks again later), so local tiers (or a
cold prefill) serve. push and pull, which exist only to
talk to the remote, raise it instead (one-line error, non-zero exit).
"""

from __future__ import annotations

import json
import logging
import time

import numpy as np

from promptvault.vault import compact, ledger
from promptvault.vault.keys import block_keys, chunk_key
from promptvault.vault.lookup import _leaf_keys, plan
from promptvault.vault.namespace import Namespace, canonical_json
from promptvault.vault.remote import RemoteError, RemoteTier
from promptvault.vault.shards import SUFFIX, CorruptShard, Shard, parse_shard, publish_shard, read_shard, relpath

log = logging.getLogger(__name__)


# checking an object

def check_object(shard: Shard, ns_id: str, key: str, parent: str | None = None) -> dict:
    """Raise CorruptShard unless the verified shard is chunk `key` of namespace `ns_id` (and, when
    given, a child of `parent`): its key is recomputed from its own tokens, so an object stored
    under the wrong name, or one whose tokens are not the key's, is caught like a flipped byte.
    Returns the chunk's identity (key, parent, namespace, position, n_tokens)."""
    from promptvault.vault.records import SHARD_FORMAT, TOKENS as _TOKENS

    try:
        if shard.metadata.get("format") != SHARD_FORMAT:
            raise CorruptShard(f"unknown shard format {shard.metadata.get('format')!r}")
        chunk = json.loads(shard.metadata["chunk"])
        ns = Namespace.from_descriptor(compact.unpack(shard.metadata["namespace"]))
        tokens = np.asarray(shard.arrays[_TOKENS]).astype(np.int64)
    except (KeyError, ValueError, TypeError) as e:
        raise CorruptShard(f"unreadable chunk metadata ({type(e).__name__})") from None
    if ns.id != ns_id or chunk.get("namespace") != ns_id:
        raise CorruptShard("another namespace's chunk")
    if chunk.get("key") != key or (parent is not None and chunk.get("parent") != parent):
        raise CorruptShard("stored under another chunk's name")
    if chunk_key(chunk.get("parent"), ns.digest, tokens) != key or chunk.get("n_tokens") != len(tokens):
        raise CorruptShard("its tokens are not its key's")
    return chunk


def _adopt(vault, ns: Namespace, data: bytes, key: str, parent: str | None, remote: RemoteTier) -> bool:
    """Check a remote object and publish it as chunk `key` of the local disk tier; False if it
    failed its check (then nothing is written locally)."""
    path = vault.shards / relpath(key)
    for d in (path.parent.parent, path.parent):
        d.mkdir(mode=0o700, exist_ok=True)
    try:
        shard = parse_shard(data)
        check_object(shard, ns.id, key, parent)
    except CorruptShard as e:
        log.warning("remote %s: chunk %s failed its check (%s): not used (see: promptvault verify --remote)",
                    remote.url, key[:12], e)
        return False
    publish_shard(path, [data], shard.checksum)  # another process may have published it first: fine
    if vault.index.chunk(key) is None:
        vault._index_file(path)
    return True


def _down(remote: RemoteTier, error: RemoteError) -> None:
    """The one warning a run gets about its remote; later hooks skip the remote."""
    if remote.mark_down():
        log.warning("%s: using the local tiers only", error)


# the hooks

def fetch(vault, lm, toks: np.ndarray) -> int:
    """Restore/warm hook: bring the prompt's chunks the local disk misses from the remote into
    the disk tier (checked first); returns how many came. Never raises for the remote."""
    from promptvault.vault.caches import UnsupportedCacheError

    remote = vault.remote
    if remote is None or remote.down or vault.read_only or len(toks) < 2:
        return 0
    try:
        ns = vault.namespace(lm)
    except UnsupportedCacheError:
        return 0
    local = plan(vault.index, ns, toks)
    if local.reuse >= len(toks) - 1:
        return 0  # the local tiers hold every token a restore can use
    B = ns.block_size
    keys = block_keys(ns.digest, toks, B)
    have = vault.index.existing(keys)
    start = next((i for i, k in enumerate(keys) if k not in have), len(keys))
    got = 0
    try:
        todo = keys[start:]
        paths = [remote.chunk_path(ns.id, k, None, False) for k in todo]
        for i, data in enumerate(_gets(remote, paths)):
            if isinstance(data, RemoteError):
                _down(remote, data)
                return got
            if data is None:
                break  # a chain stops at its first gap; a stored tail may continue it
            parent = keys[start + i - 1] if start + i else None
            if not _adopt(vault, ns, data, todo[i], parent, remote):
                return got
            got += 1
        n = start + got  # full blocks now on the local disk
        pos = n * B
        rest = toks[pos : pos + B - 1]
        if len(rest) and pos + len(rest) > local.reuse:
            got += _fetch_leaf(vault, ns, remote, keys[n - 1] if n else None, rest, local.reuse - pos)
    except RemoteError as e:
        _down(remote, e)
    except OSError as e:  # the local disk refused the copy: the remote's chunks are simply not used
        log.warning("cannot keep remote chunks in %s: %s", vault.root, e.strerror or e)
    return got


def _gets(remote: RemoteTier, paths: list[str]):
    """Each object's bytes (None when absent, the RemoteError when its request failed), in order,
    fetched in parallel."""
    def one(path):
        try:
            return remote.get(path)
        except RemoteError as e:
            return e
    return remote.map(one, paths)


def _fetch_leaf(vault, ns: Namespace, remote: RemoteTier, parent: str | None, rest: np.ndarray, have: int) -> int:
    """The longest stored tail of the prompt after `parent` (one LIST, then one GET), if it gives
    more than the `have` tokens the local tiers reuse past `parent`."""
    prefix = remote.leaves_prefix(ns.id, parent)
    names = {o.path[len(prefix):].removesuffix(SUFFIX) for o in remote.list(prefix)}
    if not names:
        return 0
    candidates = _leaf_keys(parent, ns.digest, rest)
    for n in range(len(rest), max(have, 0), -1):
        key = candidates[n - 1]
        if key in names:
            if vault.index.chunk(key) is not None:
                return 0
            data = remote.get(remote.chunk_path(ns.id, key, parent, True))
            return int(data is not None and _adopt(vault, ns, data, key, parent, remote))
    return 0


def write_through(vault, ns: Namespace, keys: list[str], warmed: dict | None = None) -> int:
    """Warm/save hook: put the chunks `keys` (a prompt's chain, stored locally) that the remote
    lacks, and the warmed-prompt record; returns how many chunks were put. Never raises for the
    remote."""
    remote = vault.remote
    if remote is None or remote.down:
        return 0
    try:
        return push_chain(vault, remote, ns, keys, warmed)
    except RemoteError as e:
        _down(remote, e)
        return 0


def push_chain(vault, remote: RemoteTier, ns: Namespace, keys: list[str], warmed: dict | None = None) -> int:
    """Put a chain's chunks the remote lacks (from the local files, checked first: a damaged
    local file must not reach everyone), its namespace descriptor and `warmed`. Raises RemoteError."""
    rows = [r for r in (vault.index.chunk(k) for k in keys) if r is not None]
    paths = [remote.chunk_path(ns.id, r["key"], r["parent"], r["n_tokens"] < ns.block_size) for r in rows]
    items = []
    for row, path, there in zip(rows, paths, remote.exists_many(paths)):
        if there:
            continue
        local = vault.shards / row["file"]
        try:
            check_object(read_shard(local), ns.id, row["key"])
            data = local.read_bytes()  # shard files are immutable: these are the bytes just checked
        except (OSError, CorruptShard):
            continue  # evicted meanwhile, or damaged (the local read path quarantines it)
        items.append((path, data))
    stored = sum(remote.put_many(items))
    if ns.id not in remote.described:
        remote.put_new(remote.namespace_path(ns.id), canonical_json(ns.descriptor).encode())
        remote.described.add(ns.id)
    if warmed is not None and len(rows) == len(keys):
        record = {"namespace": ns.id, "label": warmed.get("label"), "source": warmed.get("source"),
                  "n_tokens": warmed["n_tokens"], "created": warmed.get("created"), "last_key": keys[-1], "keys": keys}
        remote.put_new(remote.warmed_path(ns.id, keys[-1]), canonical_json(record).encode())
    return stored



# push / pull (explicit: errors raise)

def push(vault, labels: list[str] | None = None) -> dict:
    """Put the warmed prompts with these labels (None: all) on the remote; returns counts."""
    remote = _need(vault)
    warmed = [w for w in vault.index.warmed() if labels is None or w["label"] in labels]
    _missing_labels(labels, warmed, "in this vault")
    descriptors = {n["id"]: n["descriptor"] for n in vault.index.namespaces()}
    chunks = 0
    for w in warmed:
        ns = Namespace.from_descriptor(descriptors[w["namespace"]])
        keys = vault._ancestors(w["last_key"])[::-1]
        chunks += push_chain(vault, remote, ns, keys, w)
    return {"prompts": len(warmed), "chunks_put": chunks, "remote": remote.url}


def remote_warmed(remote: RemoteTier) -> list[dict]:
    """Every warmed-prompt record in the bucket (records that do not parse are skipped)."""
    paths = [o.path for ns_id in remote.list_dirs("ns/") for o in remote.list(f"ns/{ns_id}/warmed/")]
    out = []
    for path, data in zip(paths, remote.get_many(paths)):
        try:
            rec = json.loads(data)
            rec["keys"], rec["namespace"], rec["last_key"]
            out.append(rec)
        except (TypeError, ValueError, KeyError):
            log.warning("remote %s: warmed record %s does not parse: skipped", remote.url, path)
    return out


def pull(vault, labels: list[str] | None = None) -> dict:
    """Copy the warmed prompts with these labels (None: all) from the remote into the vault,
    each chunk checked as a fetched one is; returns counts."""
    remote = _need(vault)
    vault.require_writable("pull prompts")
    records = [r for r in remote_warmed(remote) if labels is None or r["label"] in labels]
    _missing_labels(labels, records, f"on {remote.url}")
    stats = {"prompts": 0, "chunks_fetched": 0, "chunks_present": 0, "failed": 0, "skipped_other_block_size": 0,
             "remote": remote.url}
    for rec in records:
        data = remote.get(remote.namespace_path(rec["namespace"]))
        try:
            ns = Namespace.from_descriptor(json.loads(data))
        except (TypeError, ValueError):
            raise RemoteError(f"remote {remote.url}: namespace {rec['namespace'][:12]} has no readable descriptor") from None
        if ns.id != rec["namespace"] or ns.block_size != vault.block_size:
            stats["skipped_other_block_size"] += 1
            continue
        keys = rec["keys"]
        have = vault.index.existing(keys)
        todo = [i for i, k in enumerate(keys) if k not in have]
        stats["chunks_present"] += len(keys) - len(todo)
        paths = [remote.chunk_path(ns.id, keys[i], keys[i - 1] if i else None,
                                   i == len(keys) - 1 and rec["n_tokens"] % ns.block_size != 0) for i in todo]
        ok = True
        for i, data in zip(todo, remote.get_many(paths)):
            if data is None or not _adopt(vault, ns, data, keys[i], keys[i - 1] if i else None, remote):
                stats["failed"] += 1
                ok = False
                break
            stats["chunks_fetched"] += 1
        if ok:
            vault.index.add_namespace(ns)
            added = vault.index.add_warmed(ns.id, rec["label"], rec["source"], rec["n_tokens"], keys[-1],
                                           created=rec.get("created") or time.time())
            if added:
                ledger.record_added(vault.root, added)
            stats["prompts"] += 1
    return stats


def _need(vault) -> RemoteTier:
    if vault.remote is None:
        raise RemoteError("no remote: give --remote s3://bucket/prefix (or set PROMPTVAULT_REMOTE)")
    return vault.remote


def _missing_labels(labels, found, where: str) -> None:
    if labels:
        missing = sorted(set(labels) - {w["label"] for w in found})
        if missing:
            raise RemoteError(f"no warmed prompt {where} is labelled {', '.join(map(repr, missing))}")
