"""The warmed-prompts ledger: labels that must survive an index rebuild.

Shards carry everything about a chunk, but a warmed prompt (its label, source and last chunk) is
a fact about a *set* of chunks that no single shard holds, so before this file existed an index
rebuild (`reindex`, or the automatic repair of a corrupt or emptied index) forgot every label:
`ls` came back empty and `rm LABEL` stopped working. The ledger is an append-only JSON-lines file
beside the index (`warmed.jsonl`): one line per warmed prompt added or removed, each written with
a single O_APPEND write, so processes sharing a vault can append without a lock. A rebuild replays
it; a line that does not parse (a torn last line after a crash) is skipped.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

NAME = "warmed.jsonl"
_FIELDS = ("namespace", "label", "source", "n_tokens", "last_key", "created")


def _append(root: Path, record: dict) -> None:
    line = (json.dumps(record, separators=(",", ":"), sort_keys=True) + "\n").encode()
    fd = os.open(root / NAME, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


def record_added(root: Path, row: dict) -> None:
    _append(root, {"op": "add", **{k: row[k] for k in _FIELDS}})


def record_removed(root: Path, rows: list[dict]) -> None:
    for row in rows:
        _append(root, {"op": "rm", **{k: row[k] for k in ("last_key", "label", "source")}})


def replay(root: Path) -> list[dict]:
    """The warmed prompts the ledger says exist now, oldest first."""
    live: dict[tuple, dict] = {}
    try:
        lines = (root / NAME).read_bytes().splitlines()
    except FileNotFoundError:
        return []
    for line in lines:
        try:
            rec = json.loads(line)
            ident = (rec["last_key"], rec["label"], rec["source"])
            if rec["op"] == "add":
                live.setdefault(ident, {k: rec[k] for k in _FIELDS})
            elif rec["op"] == "rm":
                live.pop(ident, None)
        except (ValueError, KeyError, TypeError):
            continue
    return list(live.values())
