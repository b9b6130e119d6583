"""kill -9 of a real `promptvault warm` at random moments: the vault opens, verify is clean, no
partially written block is ever served (a lossless restore gives exactly the cold run's text),
entries stored before are intact, and re-running the warm completes.

Moments are drawn two ways: a uniformly random time since the process started (start-up, vault
open, migrations, prefill, writes), and a random delay after the process logs the prefill of a
random block (so kills land inside encode / write / fsync / rename / index insert of that block).
"""

from __future__ import annotations

import random
import shutil
import signal
import subprocess
import time

import pytest

from test_reliability_common import (BLOCK, CODEC, EXE, LOSSLESS, QUESTION, cold_text, doc_tokens, index_rows,
                                     is_long, pv, record, shard_files, temp_files, text, tokens, vault_run)
from promptvault import DEFAULT_CODEC
from promptvault.vault import Vault


@pytest.fixture(scope="module", params=["lossless", "default codec"])
def setup(smollm, tmp_path_factory, request):
    codec_args = LOSSLESS if request.param == "lossless" else []
    base = tmp_path_factory.mktemp("kill")
    doc = base / "doc.txt"
    doc.write_text(text(0, 1300))  # ~300 tokens: ~10 blocks of 32
    other = base / "other.txt"
    other.write_text(text(6000, 500))
    seed = base / "seed"  # a vault already holding another prompt: it must survive every kill
    pv("warm", other, "--vault", seed, "--block-size", BLOCK, *codec_args, check=True)
    # One full warm, timed, to place the kill moments.
    ref = base / "ref"
    shutil.copytree(seed, ref)
    t0 = time.monotonic()
    proc = subprocess.Popen([EXE, "-vv", "warm", str(doc), "--vault", str(ref), "--block-size", str(BLOCK),
                             *codec_args], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    marks = [time.monotonic() - t0 for line in proc.stderr if "prefilled tokens" in line]
    assert proc.wait() == 0
    total = time.monotonic() - t0
    lm = smollm
    doc_toks = doc_tokens(lm, doc.read_text())
    q_toks = tokens(lm, doc.read_text() + QUESTION)
    codec = CODEC if codec_args else DEFAULT_CODEC
    return {
        "lm": lm, "doc": doc, "other": other, "seed": seed, "ref_keys": {r["key"] for r in index_rows(ref)},
        "ref_checksums": {r["key"]: r["checksum"] for r in index_rows(ref)}, "codec_args": codec_args,
        "codec": codec, "lossless": bool(codec_args),
        "seed_keys": {r["key"] for r in index_rows(seed)}, "marks": marks, "total": total,
        "q_toks": q_toks, "cold": cold_text(lm, q_toks), "doc_tokens": len(doc_toks),
        "other_toks": tokens(lm, other.read_text() + QUESTION),
        "other_cold": cold_text(lm, tokens(lm, other.read_text() + QUESTION)),
        "other_stored": vault_run(lm, seed, tokens(lm, other.read_text() + QUESTION), codec)[0],
    }


def _kill_once(setup, vault, rng) -> dict:
    """Start a warm, SIGKILL it at a random moment; returns what happened."""
    cmd = [EXE, "-vv", "warm", str(setup["doc"]), "--vault", str(vault), "--block-size", str(BLOCK),
           *setup["codec_args"]]
    marks = setup["marks"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    if rng.random() < 0.4:
        how = f"t={rng.uniform(0, setup['total']):.2f}s"
        time.sleep(float(how[2:-1]))
    else:
        block = rng.randrange(len(marks))
        per_block = (marks[-1] - marks[0]) / max(1, len(marks) - 1)
        delay = rng.uniform(0, per_block)
        seen = 0
        for line in proc.stderr:
            if "prefilled tokens" in line:
                seen += 1
                if seen > block:
                    break
        time.sleep(delay)
        how = f"block {block} + {delay * 1e3:.0f} ms"
    killed = proc.poll() is None
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    proc.stderr.close()
    return {"how": how, "killed": killed}


def test_kill_9_during_warm(setup, tmp_path, request):
    n = 20 if is_long(request) else 4
    rng = random.Random(int(time.time()))
    lm, kills, wrong, lost, partial_states = setup["lm"], 0, 0, 0, 0
    attempts = 0
    while kills < n:
        attempts += 1
        assert attempts < 3 * n, "the warm keeps finishing before the kill"
        vault = tmp_path / f"v{attempts}"
        shutil.copytree(setup["seed"], vault)
        event = _kill_once(setup, vault, rng)
        if not event["killed"]:
            shutil.rmtree(vault)
            continue
        kills += 1
        # The vault opens and verifies clean; every indexed row has its complete file.
        with Vault(vault) as v:
            report = v.verify()
            rows = v.index.all_chunks()
        assert report.bad == [], event
        files = shard_files(vault)
        assert {r["file"] for r in rows} <= files, event
        assert not any(r["file"].rsplit("/", 1)[-1].startswith(".tmp-") for r in rows)
        keys = {r["key"] for r in rows}
        stored = len(keys - setup["seed_keys"])
        if 0 < stored < len(setup["ref_keys"] - setup["seed_keys"]) or temp_files(vault) or len(files) != len(rows):
            partial_states += 1  # the kill interrupted the writes: a partial state was left
        # Earlier entries intact: every seed chunk is still there and restores exactly as before.
        missing = setup["seed_keys"] - keys
        lost += len(missing)
        got, _ = vault_run(lm, vault, setup["other_toks"], setup["codec"])
        wrong += got != setup["other_stored"]
        if setup["lossless"]:
            # Whatever the kill left is served only if complete: the text equals the cold run's.
            got, reused = vault_run(lm, vault, setup["q_toks"])
            wrong += got != setup["cold"]
            assert got == setup["cold"], (event, reused)
        else:
            # Lossy: every chunk the killed warm stored holds exactly the bytes of an uninterrupted
            # warm (it prefilled from scratch, deterministically): nothing torn, nothing half-stored.
            torn = [r["key"] for r in rows if r["key"] in setup["ref_checksums"]
                    and r["checksum"] != setup["ref_checksums"][r["key"]]]
            wrong += len(torn)
            assert not torn, event
        # Re-running the warm completes and stores everything.
        again = pv("warm", setup["doc"], "--vault", vault, "--block-size", BLOCK, *setup["codec_args"])
        assert again.returncode == 0, (event, again.stderr)
        assert {r["key"] for r in index_rows(vault)} >= setup["ref_keys"], event
        got, reused = vault_run(lm, vault, setup["q_toks"], setup["codec"])
        assert reused >= setup["doc_tokens"] // BLOCK * BLOCK, event
        assert got == setup["cold"] or not setup["lossless"], event
        with Vault(vault) as v:
            assert v.verify().bad == [] and not list((vault / "quarantine").glob("*")), event
        shutil.rmtree(vault)
    assert lost == 0 and wrong == 0
    # detected: every kill was followed by the checks above (vault opens, verify clean, exact
    # output); partial_states: kills that interrupted the writes (temp file, unindexed shard, part
    # of the prompt stored); repaired: re-runs of the warm that completed.
    record(f"kill -9 during warm ({'lossless' if setup['lossless'] else 'default codec'})", injected=kills, detected=kills, repaired=kills, wrong_outputs=wrong,
           data_lost=lost, partial_states=partial_states)
