"""Damaged vault files: random byte flips across shard files, truncated shards, deleted shards
whose index rows are live, a deleted, garbled or lying index. Every case must be detected or
repaired, and generation must give exactly the cold run's text (lossless codec), through the
library and through the real `promptvault run` executable.
"""

from __future__ import annotations

import json
import random
import shutil
import sqlite3
import time
from pathlib import Path

import numpy as np
import pytest

from test_reliability_common import (BLOCK, CODEC, LOSSLESS, MAX_TOKENS, QUESTION, cold_text, index_rows, is_long, pv,
                                     record, text, tokens, vault_run, doc_tokens)
from promptvault import DEFAULT_CODEC
from promptvault.vault import Vault


@pytest.fixture(scope="module")
def base(smollm, tmp_path_factory):
    root = tmp_path_factory.mktemp("corrupt")
    doc = root / "doc.txt"
    doc.write_text(text(0, 1300))
    question = root / "question.txt"
    question.write_text(doc.read_text() + QUESTION)
    vault = root / "vault"
    pv("warm", doc, "--vault", vault, "--block-size", BLOCK, *LOSSLESS, check=True)
    q_toks = tokens(smollm, question.read_text())
    return {"lm": smollm, "doc": doc, "question": question, "vault": vault, "q_toks": q_toks,
            "doc_toks": doc_tokens(smollm, doc.read_text()), "cold": cold_text(smollm, q_toks),
            "keys": {r["key"] for r in index_rows(vault)}, "rows": index_rows(vault)}


def _copy(base, dest: Path) -> Path:
    shutil.copytree(base["vault"], dest)
    return dest


def _cli_run(base, vault) -> dict:
    res = pv("run", "--prompt-file", base["question"], "--vault", vault, "--max-tokens", MAX_TOKENS, "--no-save",
             *LOSSLESS, "--json")
    assert res.returncode == 0 and "Traceback" not in res.stderr, res.stderr
    return json.loads(res.stdout)


def _rewarm(base, vault) -> bool:
    """Repair: warm the document again; True when every chunk is back and verify is clean."""
    with Vault(vault, codec=CODEC) as v:
        v.warm(base["lm"], base["doc_toks"])
        keys = {r["key"] for r in v.index.all_chunks()}
        return keys >= base["keys"] and v.verify().bad == []


def _flip(shard: Path, rng, in_header: bool) -> int:
    """XOR one random byte of a shard, in its header (length, JSON, metadata, checksum) or in its
    tensor bytes; returns the offset."""
    data = bytearray(shard.read_bytes())
    n_head = 8 + int.from_bytes(data[:8], "little")
    at = rng.randrange(n_head) if in_header else rng.randrange(n_head, len(data))
    data[at] ^= rng.randrange(1, 256)
    shard.write_bytes(bytes(data))
    return at


def test_random_byte_flips_in_shards(base, tmp_path, request):
    n = 100 if is_long(request) else 6
    rng = random.Random(int(time.time()))
    detected = repaired = wrong = lost = 0
    for i in range(n):
        vault = _copy(base, tmp_path / f"v{i}")
        row = rng.choice(base["rows"])
        shard = vault / "shards" / row["file"]
        at = _flip(shard, rng, in_header=bool(i % 2))
        if i % 10 == 0:  # through the real executable
            out = _cli_run(base, vault)
            got = out["text"]
        else:
            got, _ = vault_run(base["lm"], vault, base["q_toks"])
        wrong += got != base["cold"]
        assert got == base["cold"], (row["file"], at)
        with Vault(vault, codec=CODEC) as v:
            v.verify()
            still_indexed = v.index.chunk(row["key"]) is not None
            lost += len(base["keys"] - {row["key"]} - {r["key"] for r in v.index.all_chunks()})
        quarantined = [p for p in (vault / "quarantine").glob("*") if row["key"] in p.name]
        assert not still_indexed and not shard.exists() and quarantined, (row["file"], at)
        detected += 1
        repaired += _rewarm(base, vault)
        got, reused = vault_run(base["lm"], vault, base["q_toks"])
        assert got == base["cold"] and reused >= len(base["doc_toks"]) - BLOCK, reused
        shutil.rmtree(vault)
    assert detected == repaired == n and wrong == lost == 0
    record("byte flip in a shard", injected=n, detected=detected, repaired=repaired, wrong_outputs=wrong,
           data_lost=lost)


@pytest.fixture(scope="module")
def lossy(smollm, tmp_path_factory):
    """The same document warmed with the default (lossy) codec."""
    root = tmp_path_factory.mktemp("corrupt-lossy")
    doc = root / "doc.txt"
    doc.write_text(text(0, 1300))
    vault = root / "vault"
    pv("warm", doc, "--vault", vault, "--block-size", BLOCK, check=True)
    return {"lm": smollm, "vault": vault, "q_toks": tokens(smollm, doc.read_text() + QUESTION),
            "rows": index_rows(vault)}


def test_random_byte_flips_in_shards_default_codec(lossy, tmp_path, request):
    """A flipped byte in a lossy vault: the damaged chunk (and only it) is quarantined, and the
    answer equals a restore from the same vault with that chunk's file simply gone (the intact
    chunks before it serve the run; no wrong bytes are ever decoded)."""
    n = 40 if is_long(request) else 4
    rng = random.Random(int(time.time()) + 7)
    detected = wrong = lost = 0
    for i in range(n):
        vault = _copy(lossy, tmp_path / f"v{i}")
        ref = _copy(lossy, tmp_path / f"ref{i}")
        row = rng.choice(lossy["rows"])
        shard = vault / "shards" / row["file"]
        at = _flip(shard, rng, in_header=bool(i % 2))
        (ref / "shards" / row["file"]).unlink()
        got = vault_run(lossy["lm"], vault, lossy["q_toks"], DEFAULT_CODEC)
        want = vault_run(lossy["lm"], ref, lossy["q_toks"], DEFAULT_CODEC)
        wrong += got != want
        assert got == want, (row["file"], at)
        with Vault(vault) as v:
            assert v.verify().bad == []  # the run already set it aside: nothing else is bad
            left = {r["key"] for r in v.index.all_chunks()}
        quarantined = sorted(p.name for p in (vault / "quarantine").glob("*"))
        assert len(quarantined) == 1 and row["key"] in quarantined[0], (quarantined, row["key"])
        lost += len({r["key"] for r in lossy["rows"]} - {row["key"]} - left)
        detected += 1
        shutil.rmtree(vault)
        shutil.rmtree(ref)
    assert wrong == lost == 0
    record("byte flip in a shard (default codec)", injected=n, detected=detected, repaired=0, wrong_outputs=wrong,
           data_lost=lost)


def test_truncated_and_deleted_shards(base, tmp_path, request):
    n = 20 if is_long(request) else 2
    rng = random.Random(int(time.time()) + 1)
    detected = repaired = wrong = lost = 0
    for i in range(n):
        vault = _copy(base, tmp_path / f"v{i}")
        victims = rng.sample(base["rows"], rng.randint(1, 3))
        for row in victims:
            shard = vault / "shards" / row["file"]
            if i % 2:
                shard.unlink()  # its index row stays live
            else:
                size = shard.stat().st_size
                with open(shard, "r+b") as f:
                    f.truncate(rng.choice([0, 7, 8 + rng.randrange(200), rng.randrange(size), size - 1]))
        out = _cli_run(base, vault)
        wrong += out["text"] != base["cold"]
        assert out["text"] == base["cold"]
        res = pv("verify", "--vault", vault, "--json")
        with Vault(vault) as v:
            left = {r["key"] for r in v.index.all_chunks()}
        # Each damaged shard was caught by the run or by verify; none is indexed any more.
        assert not left & {r["key"] for r in victims}, res.stdout
        lost += len(base["keys"] - {r["key"] for r in victims} - left)
        assert pv("verify", "--vault", vault).returncode == 0
        detected += len(victims)
        repaired += len(victims) if _rewarm(base, vault) else 0
        shutil.rmtree(vault)
    assert wrong == lost == 0 and repaired == detected
    record("truncated or deleted shard", injected=detected, detected=detected, repaired=repaired,
           wrong_outputs=wrong, data_lost=lost)


def _index_damage(vault: Path, how: str, rng) -> None:
    db = vault / "index.sqlite"
    if how == "deleted":
        for suffix in ("", "-wal", "-shm"):
            Path(f"{db}{suffix}").unlink(missing_ok=True)
    elif how == "garbage":
        db.write_bytes(rng.randbytes(db.stat().st_size or 4096))
    elif how == "header":
        data = bytearray(db.read_bytes())
        for _ in range(16):
            data[rng.randrange(0, 100)] ^= 0xFF
        db.write_bytes(bytes(data))
    elif how == "truncated":
        with open(db, "r+b") as f:
            f.truncate(rng.randrange(1, 100))


@pytest.mark.parametrize("how", ["deleted", "garbage", "header", "truncated"])
def test_lost_or_garbled_index_is_rebuilt_from_shards(base, tmp_path, how):
    rng = random.Random(int(time.time()))
    vault = _copy(base, tmp_path / "v")
    with Vault(vault) as v:
        v.index.checkpoint()  # everything in the main file, as after any clean exit
    _index_damage(vault, how, rng)
    # `run` through the executable opens the vault, notices, rebuilds, and reuses the blocks.
    out = _cli_run(base, vault)
    assert out["text"] == base["cold"] and out["reused_tokens"] >= len(base["doc_toks"]) - BLOCK, out
    assert {r["key"] for r in index_rows(vault)} == base["keys"]
    # `reindex` also rebuilds from scratch after a second round of damage.
    _index_damage(vault, how, rng)
    res = pv("reindex", "--vault", vault, "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["indexed"] == len(base["keys"])
    assert pv("verify", "--vault", vault).returncode == 0
    lost = len(base["keys"] - {r["key"] for r in index_rows(vault)})
    assert lost == 0
    record(f"index {how}", injected=2, detected=2, repaired=2, wrong_outputs=0, data_lost=lost)


def test_index_that_lies_about_tokens_is_not_trusted(base, tmp_path):
    """Silent damage inside an index row (SQLite cannot see it): the tail leaf's token copy is
    changed to match a different prompt. The restore must check the shard's own tokens."""
    lm = base["lm"]
    vault = _copy(base, tmp_path / "v")
    leaf = max(base["rows"], key=lambda r: index_position(vault, r["key"]))  # the tail leaf
    with sqlite3.connect(vault / "index.sqlite") as db:
        pos, n, blob = db.execute("SELECT position, n_tokens, tokens FROM chunks WHERE key = ?",
                                  (leaf["key"],)).fetchone()
    # A prompt that shares the document up to the leaf, then differs in the leaf's tokens.
    other = list(base["doc_toks"][:pos]) + [t + 1 for t in base["doc_toks"][pos : pos + n]] + base["q_toks"][-5:]
    fake = np.asarray(other[pos : pos + n], dtype="<u4").tobytes()
    with sqlite3.connect(vault / "index.sqlite") as db:
        db.execute("UPDATE chunks SET tokens = ? WHERE key = ?", (fake, leaf["key"]))
    got, reused = vault_run(lm, vault, other)
    assert reused <= pos and got == cold_text(lm, other), reused
    with sqlite3.connect(vault / "index.sqlite") as db:  # the row was re-read from its file
        assert db.execute("SELECT tokens FROM chunks WHERE key = ?", (leaf["key"],)).fetchone()[0] == blob
    got, reused = vault_run(lm, vault, base["q_toks"])
    assert got == base["cold"] and reused >= pos
    record("index row with wrong tokens", injected=1, detected=1, repaired=1, wrong_outputs=0, data_lost=0)


def index_position(vault: Path, key: str) -> int:
    with sqlite3.connect(vault / "index.sqlite") as db:
        return db.execute("SELECT position FROM chunks WHERE key = ?", (key,)).fetchone()[0]
