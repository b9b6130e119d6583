"""The disk says no: a full filesystem (a small tmpfs) or a file-size limit during a warm, and a
vault that cannot be written at all (a read-only mount; another user's vault). A failing write is
one line on stderr with exit 1, nothing stored is damaged, and reads keep working."""

from __future__ import annotations

import json
import os
import resource
import signal
import subprocess

import pytest

from test_reliability_common import (BLOCK, LOSSLESS, QUESTION, cold_text, index_rows, pv, record,
                                     shard_files, temp_files, text, tokens, vault_run, doc_tokens)
from promptvault.vault import Vault


def _one_line_error(res, *fragments) -> str:
    err = res.stderr.strip()
    assert res.returncode == 1, (res.returncode, res.stderr)
    assert err.startswith("error: ") and "\n" not in err and "Traceback" not in err, err
    for f in fragments:
        assert f in err, err
    return err


def _mount(*args) -> bool:
    return subprocess.run(["mount", *args], capture_output=True).returncode == 0


@pytest.fixture
def prompts(smollm, tmp_path):
    small = tmp_path / "small.txt"
    small.write_text(text(0, 400))  # ~85 tokens (~110 with the chat template's header): 4 chunks
    big = tmp_path / "big.txt"
    big.write_text(text(3000, 1500))  # ~330 tokens: 11 chunks
    q_toks = tokens(smollm, small.read_text() + QUESTION)
    return {"small": small, "big": big, "q_toks": q_toks, "cold": cold_text(smollm, q_toks),
            "small_chunks": -(-len(doc_tokens(smollm, small.read_text())) // BLOCK)}


def _check_intact(lm, vault, before: set, prompts) -> int:
    """Earlier entries are all there, verify is clean, no temp file left; returns chunks lost."""
    with Vault(vault) as v:
        assert v.verify().bad == []
        rows = v.index.all_chunks()
    assert {r["file"] for r in rows} == shard_files(vault) and not temp_files(vault)
    got, reused = vault_run(lm, vault, prompts["q_toks"])
    assert got == prompts["cold"] and reused >= BLOCK
    return len(before - {r["key"] for r in rows})


@pytest.mark.parametrize("how", ["tmpfs", "file-size-limit"])
def test_disk_full_during_warm(smollm, prompts, tmp_path, how):
    mnt = tmp_path / "mnt"
    mnt.mkdir()
    limit = None
    if how == "tmpfs" and _mount("-t", "tmpfs", "-o", "size=6m", "tmpfs", str(mnt)):
        mounted = True
    else:  # no mount here: the same failure through a file-size limit (EFBIG instead of ENOSPC)
        mounted, limit = False, 1_000_000
    try:
        vault = mnt / "v"
        pv("warm", prompts["small"], "--vault", vault, "--block-size", BLOCK, *LOSSLESS, check=True)
        before = {r["key"] for r in index_rows(vault)}

        def child():
            if limit:
                signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
                resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

        res = pv("warm", prompts["big"], "--vault", vault, "--block-size", BLOCK, *LOSSLESS, preexec_fn=child)
        _one_line_error(res, "cannot write to vault", "No space left on device" if mounted else "File too large")
        lost = _check_intact(smollm, vault, before, prompts)
        assert lost == 0
        # Room again (the limit lifted / space freed): the same warm completes.
        if mounted:
            assert _mount("-o", "remount,size=64m", str(mnt))
        res = pv("warm", prompts["big"], "--vault", vault, "--block-size", BLOCK, *LOSSLESS)
        assert res.returncode == 0, res.stderr
        assert pv("verify", "--vault", vault).returncode == 0
    finally:
        if mounted:
            subprocess.run(["umount", str(mnt)], check=True)
    record(f"disk full during warm ({how if mounted or how != 'tmpfs' else 'file-size-limit'})", injected=1,
           detected=1, repaired=1, wrong_outputs=0, data_lost=lost)


def test_read_only_mount(smollm, prompts, tmp_path):
    vault = tmp_path / "v"
    pv("warm", prompts["small"], "--vault", vault, "--block-size", BLOCK, *LOSSLESS, check=True)
    with Vault(vault) as v:
        v.index.checkpoint()
    ro = tmp_path / "ro"
    ro.mkdir()
    assert _mount("--bind", str(vault), str(ro)) and _mount("-o", "remount,ro,bind", str(ro))
    try:
        before = sorted(p.name + str(p.stat().st_mtime_ns) for p in vault.rglob("*"))
        q = tmp_path / "q.txt"
        q.write_text(prompts["small"].read_text() + QUESTION)
        out = pv("run", "--prompt-file", q, "--vault", ro, "--max-tokens", 6, *LOSSLESS, "--json")
        assert out.returncode == 0, out.stderr
        assert "read-only" in out.stderr and "Traceback" not in out.stderr
        answer = json.loads(out.stdout)
        assert answer["text"] == prompts["cold"] and answer["reused_tokens"] >= BLOCK
        for verb in ("ls", "stats", "verify"):
            assert pv(verb, "--vault", ro, "--json").returncode == 0
        _one_line_error(pv("warm", prompts["big"], "--vault", ro, *LOSSLESS), "read-only", "cannot warm")
        for verb in (["gc"], ["reindex"], ["rm", "--all"]):
            _one_line_error(pv(*verb, "--vault", ro), "read-only")
        assert sorted(p.name + str(p.stat().st_mtime_ns) for p in vault.rglob("*")) == before
    finally:
        subprocess.run(["umount", str(ro)], check=True)
    record("read-only vault (read-only mount)", injected=1, detected=1, repaired=0, wrong_outputs=0, data_lost=0)


# root without capabilities: file permissions apply to it as to any user (tests run as root in CI).
NO_CAPS = ("setpriv", "--inh-caps=-all", "--bounding-set=-all")


def test_vault_without_write_permission_is_read_only(smollm, prompts, tmp_path):
    """A vault the user may read but not write (another user's, shared 0755/0644; here 0555/0444
    for a root without capabilities): reads work, writes fail with one clear line."""
    vault = tmp_path / "v"
    pv("warm", prompts["small"], "--vault", vault, "--block-size", BLOCK, *LOSSLESS, check=True)
    with Vault(vault) as v:
        v.index.checkpoint()
    for p in [vault, *vault.rglob("*")]:
        os.chmod(p, 0o555 if p.is_dir() else 0o444)
    try:
        probe = subprocess.run([*NO_CAPS, "touch", str(vault / "probe")], capture_output=True)
        assert probe.returncode != 0, "permissions do not apply: the test would prove nothing"
        q = tmp_path / "q.txt"
        q.write_text(prompts["small"].read_text() + QUESTION)
        out = pv("run", "--prompt-file", q, "--vault", vault, "--max-tokens", 6, *LOSSLESS, "--json", prefix=NO_CAPS)
        assert out.returncode == 0 and "read-only" in out.stderr, out.stderr
        answer = json.loads(out.stdout)
        assert answer["text"] == prompts["cold"] and answer["reused_tokens"] >= BLOCK
        for verb in ("ls", "stats", "verify"):
            res = pv(verb, "--vault", vault, "--json", prefix=NO_CAPS)
            assert res.returncode == 0, (verb, res.stderr)
        assert json.loads(pv("stats", "--vault", vault, "--json", prefix=NO_CAPS).stdout)["chunks"] == prompts["small_chunks"]
        _one_line_error(pv("warm", prompts["big"], "--vault", vault, prefix=NO_CAPS), "read-only", "cannot warm")
        _one_line_error(pv("gc", "--vault", vault, prefix=NO_CAPS), "read-only")
    finally:
        for p in [vault, *vault.rglob("*")]:
            os.chmod(p, 0o700 if p.is_dir() else 0o600)
    assert pv("verify", "--vault", vault).returncode == 0
    record("read-only vault (no write permission)", injected=1, detected=1, repaired=0, wrong_outputs=0,
           data_lost=0)
