"""An index written by an older schema (m001, the first release) is migrated in place by
`migrations/` when a newer promptvault opens it: every row survives and the vault serves the same
restores; opened read-only, it is not touched and the error says why."""

from __future__ import annotations

import json
import sqlite3

import sqlite_utils

from test_reliability_common import BLOCK, LOSSLESS, MAX_TOKENS, QUESTION, doc_tokens, pv, record, text
from promptvault.migrations import migrations

TABLES = ("namespaces", "chunks", "warmed", "snapshots")


def _dump(path) -> dict:
    with sqlite3.connect(path) as db:
        return {t: sorted(db.execute(f"SELECT * FROM {t}").fetchall()) for t in TABLES}


def test_index_from_an_older_schema_is_migrated_without_loss(smollm, tmp_path):
    doc = tmp_path / "doc.txt"
    doc.write_text(text(0, 900))
    question = tmp_path / "q.txt"
    question.write_text(doc.read_text() + QUESTION)
    vault = tmp_path / "v"
    pv("warm", doc, "--vault", vault, "--block-size", BLOCK, "--label", "doc", *LOSSLESS, check=True)
    pv("warm", question, "--vault", vault, "--label", "q", *LOSSLESS, check=True)
    rows = _dump(vault / "index.sqlite")
    assert rows["chunks"] and rows["warmed"] and rows["namespaces"]
    # The same rows in an index at schema m001, as the first release wrote it.
    old = tmp_path / "old.sqlite"
    db = sqlite_utils.Database(str(old))
    db.enable_wal()
    later = [m.name for m in migrations.pending(db)][1:]
    assert later, "no migration after m001 to test"
    migrations.apply(db, stop_before=later[0])
    for table, values in rows.items():
        if values:  # later migrations add columns at the end: m001 has the first ones
            n = len(db[table].columns)
            db.conn.executemany(f"INSERT INTO {table} VALUES ({','.join('?' * n)})", [v[:n] for v in values])
    db.conn.commit()
    db.close()
    for suffix in ("", "-wal", "-shm"):
        (vault / f"index.sqlite{suffix}").unlink(missing_ok=True)
    old.rename(vault / "index.sqlite")
    with sqlite3.connect(vault / "index.sqlite") as con:
        applied = {r[0] for r in con.execute("SELECT name FROM _sqlite_migrations")}
    assert applied == {"m001_initial"}
    # A newer promptvault opens it (read-write), migrates it and serves from it.
    out = pv("run", "--prompt-file", question, "--vault", vault, "--max-tokens", MAX_TOKENS, "--no-save",
             *LOSSLESS, "--json")
    assert out.returncode == 0, out.stderr
    answer = json.loads(out.stdout)
    cold = json.loads(pv("run", "--prompt-file", question, "--max-tokens", MAX_TOKENS, "--no-vault", "--json",
                         check=True).stdout)
    # `warm question` stored it as a document: all of it, up to the template's closing tokens.
    assert answer["reused_tokens"] == len(doc_tokens(smollm, question.read_text())) and answer["text"] == cold["text"]
    with sqlite3.connect(vault / "index.sqlite") as con:
        applied = {r[0] for r in con.execute("SELECT name FROM _sqlite_migrations")}
    assert applied == {m.name for m in migrations.applied(sqlite_utils.Database(str(vault / "index.sqlite")))}
    assert applied >= {"m001_initial", *later}
    after = _dump(vault / "index.sqlite")
    for table in TABLES:  # nothing lost (hit counts and last use may have moved with the run)
        if table == "chunks":
            strip = lambda rs: sorted(r[:9] for r in rs)  # noqa: E731  key … checksum
            assert strip(after[table]) == strip(rows[table])
        else:
            assert after[table] == rows[table], table
    ls = json.loads(pv("ls", "--vault", vault, "--json", check=True).stdout)
    assert sorted(w["label"] for w in ls) == ["doc", "q"]
    assert pv("verify", "--vault", vault).returncode == 0
    record("index from an older schema", injected=1, detected=1, repaired=1, wrong_outputs=0, data_lost=0)
