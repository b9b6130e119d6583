"""Faults of the remote tier, on a real S3 server (moto's, HTTP on 127.0.0.1) and real
`promptvault` processes: a remote that dies mid-restore or is down, corrupt and truncated
objects, wrong credentials, and many writers racing on one bucket. A run never breaks: local
tiers or a cold prefill serve, with one warning line; no credential appears in any output."""

from __future__ import annotations

import json
import subprocess
import time

import numpy as np
from remote_common import DyingProxy, assert_no_secret, closed_port, monkeypatch_module, s3  # noqa: F401
from test_reliability_common import (BLOCK, CODEC, EXE, LOSSLESS, QUESTION, cold_text, doc_tokens, pv, text,
                                     tokens)

from promptvault.generate import run_prompt
from promptvault.vault import Vault
from promptvault.vault.remote_admin import verify as remote_verify
from promptvault.vault.keys import block_keys


def _warnings(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("promptvault:")]


def _answer(res) -> dict:
    assert res.returncode == 0, res.stderr
    assert "Traceback" not in res.stderr
    assert_no_secret(res.stdout, res.stderr)
    return json.loads(res.stdout[res.stdout.index("{"):])


def _warmed_bucket(smollm, s3, tmp_path, chars=600):
    """A bucket holding one document warmed by machine A; (remote url, doc file, question file)."""
    remote = f"s3://{s3.bucket()}/team"
    doc = tmp_path / "doc.txt"
    doc.write_text(text(0, chars))
    question = tmp_path / "q.txt"
    question.write_text(doc.read_text() + QUESTION)
    with Vault(tmp_path / "A", block_size=BLOCK, codec=CODEC, remote=remote) as a:
        a.warm(smollm, doc_tokens(smollm, doc.read_text()), label="doc")
    return remote, doc, question


def test_remote_stopped_mid_restore(smollm, s3, tmp_path):
    remote, doc, question = _warmed_bucket(smollm, s3, tmp_path)
    proxy = DyingProxy(s3.endpoint, allow=2)
    try:
        start = time.perf_counter()
        res = pv("run", "--prompt-file", question, "--vault", tmp_path / "B", "--block-size", BLOCK, *LOSSLESS,
                 "--remote", remote, "--remote-endpoint", proxy.endpoint, "--max-tokens", 6, "--json",
                 env=s3.env(endpoint=proxy.endpoint))
        seconds = time.perf_counter() - start
    finally:
        proxy.stop()
    answer = _answer(res)
    assert proxy.served == 2
    cold = cold_text(smollm, tokens(smollm, question.read_text()))
    assert answer["text"] == cold
    assert answer["reused_tokens"] <= 2 * BLOCK < len(doc_tokens(smollm, doc.read_text()))
    warnings = _warnings(res.stderr)
    assert len(warnings) == 1 and "unreachable" in warnings[0] and remote in warnings[0], res.stderr
    assert seconds < 120  # model load included; the remote's share is bounded by its 3 s timeout


def test_remote_down_from_the_start(smollm, s3, tmp_path):
    """warm and run against a remote where nothing listens: both complete locally, one warning each."""
    down = closed_port()
    doc = tmp_path / "doc.txt"
    doc.write_text(text(1000, 300))
    common = ["--vault", tmp_path / "B", "--block-size", BLOCK, *LOSSLESS, "--remote", "s3://nobody-home/x",
              "--remote-endpoint", down, "--json"]
    warm = pv("warm", doc, *common, env=s3.env(endpoint=down))
    assert json.loads(warm.stdout)["prompts"][0]["new_chunks"] >= 1, warm.stderr
    question = tmp_path / "q.txt"
    question.write_text(doc.read_text() + QUESTION)
    run = _answer(pv("run", "--prompt-file", question, "--max-tokens", 4, *common, env=s3.env(endpoint=down)))
    assert run["tier"] in ("disk", "ram") and run["reused_tokens"] > 0
    ls = pv("ls", "--vault", tmp_path / "B", "--remote", "s3://nobody-home/x", "--remote-endpoint", down,
            env=s3.env(endpoint=down))
    for res in (warm, ls):
        assert_no_secret(res.stdout, res.stderr)
    assert len(_warnings(warm.stderr)) == 1 and "connection failed" in warm.stderr
    # An explicit remote verb fails with one line instead.
    assert ls.returncode == 1 and ls.stderr.startswith("error: remote s3://nobody-home/x") \
        and ls.stderr.count("\n") == 1, ls.stderr


def test_corrupt_and_truncated_objects_are_not_used(smollm, s3, tmp_path):
    remote, doc, question = _warmed_bucket(smollm, s3, tmp_path)
    bucket = remote.split("/")[2]
    lm = smollm
    ns = Vault(tmp_path / "A", codec=CODEC).namespace(lm)
    doc_toks = np.array(doc_tokens(lm, doc.read_text()))
    keys = block_keys(ns.digest, doc_toks, BLOCK, tail=True)
    client = s3.client()
    paths = [f"team/ns/{ns.id}/blocks/{k}.safetensors" for k in keys[1:3]]
    data = client.get_object(Bucket=bucket, Key=paths[0])["Body"].read()
    flipped = bytearray(data)
    flipped[len(data) // 2] ^= 0x10
    client.put_object(Bucket=bucket, Key=paths[0], Body=bytes(flipped))  # one flipped bit
    data = client.get_object(Bucket=bucket, Key=paths[1])["Body"].read()
    client.put_object(Bucket=bucket, Key=paths[1], Body=data[: len(data) // 3])  # truncated
    q_toks = tokens(lm, question.read_text())
    with Vault(tmp_path / "B", block_size=BLOCK, codec=CODEC, remote=remote) as b:
        r = run_prompt(lm, q_toks, vault=b, save=False, max_tokens=6)
        assert r.text == cold_text(lm, q_toks)
        assert r.reused_tokens == BLOCK and r.tier == "remote"  # block 0 only: block 1 is corrupt
        local = {p.stem for p in (tmp_path / "B" / "shards").rglob("*.safetensors")}
        assert local == {keys[0]}  # the corrupt object was not copied
        assert not [p for p in (tmp_path / "B" / "shards").rglob(".tmp-*")]
    res = pv("verify", "--vault", tmp_path / "B", "--remote", remote, "--json")
    assert res.returncode == 1 and "Traceback" not in res.stderr
    assert_no_secret(res.stdout, res.stderr)
    report = json.loads(res.stdout)
    assert report["corrupt"] == 0 and report["remote"]["checked"] == len(keys)
    assert sorted(b["path"] for b in report["remote"]["bad"]) == sorted(p.removeprefix("team/") for p in paths)


def test_wrong_credentials(smollm, s3, tmp_path):
    """With authentication on, unknown keys: an explicit remote verb fails in one line, a run
    completes with one warning; the key and secret appear nowhere."""
    from moto import settings

    remote, doc, question = _warmed_bucket(smollm, s3, tmp_path, chars=300)
    old = settings.INITIAL_NO_AUTH_ACTION_COUNT
    settings.INITIAL_NO_AUTH_ACTION_COUNT = 0  # moto now checks every request's credentials
    try:
        ls = pv("ls", "--vault", tmp_path / "L", "--remote", remote)
        push = pv("-v", "push", "--all", "--vault", tmp_path / "A", "--remote", remote)
        run = pv("-v", "run", "--prompt-file", question, "--vault", tmp_path / "B", "--block-size", BLOCK,
                 *LOSSLESS, "--remote", remote, "--max-tokens", 4, "--json")
    finally:
        settings.INITIAL_NO_AUTH_ACTION_COUNT = old
    for res in (ls, push):
        assert res.returncode == 1 and res.stderr.count("\n") == 1, res.stderr
        assert res.stderr.startswith(f"error: remote {remote}") and "refused the credentials" in res.stderr
        assert_no_secret(res.stdout, res.stderr)
    answer = _answer(run)
    assert answer["tier"] == "none" and answer["reused_tokens"] == 0
    warnings = [w for w in _warnings(run.stderr) if "remote" in w]
    assert len(warnings) == 1 and "refused the credentials" in warnings[0], run.stderr


def test_two_directories_four_processes_one_bucket(smollm, s3, tmp_path):
    """2 vault directories x 4 processes warm overlapping prompts into one bucket at once: every
    chunk is stored once, every object checks out, and a third machine restores each prompt
    exactly (lossless: its output equals the cold one)."""
    lm = smollm
    remote = f"s3://{s3.bucket()}/race"
    common = text(0, 300)
    prompts = []
    for k in range(4):
        p = tmp_path / f"p{k}.txt"
        p.write_text(common + text(2500 + 700 * k, 200))
        prompts.append(p)
    procs = []
    for i in range(8):
        d = tmp_path / f"dir{i % 2}"
        cmd = [EXE, "warm", str(prompts[(i + i // 2) % 4]), "--vault", str(d), "--block-size", str(BLOCK), *LOSSLESS,
               "--remote", remote, "--json"]
        procs.append(subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=s3.env()))
    for p in procs:
        out, err = p.communicate(timeout=900)
        assert p.returncode == 0 and "Traceback" not in err and not _warnings(err), err
        assert_no_secret(out, err)
    ns = Vault(tmp_path / "dir0", codec=CODEC).namespace(lm)
    wanted = set()
    for p in prompts:
        toks = np.array(doc_tokens(lm, p.read_text()))
        wanted |= set(block_keys(ns.digest, toks, BLOCK, tail=True))
    objects = s3.objects(remote.split("/")[2])
    chunk_names = [k.rsplit("/", 1)[-1].removesuffix(".safetensors") for k in objects if k.endswith(".safetensors")]
    assert sorted(chunk_names) == sorted(wanted)  # each chunk once, nothing else
    with Vault(tmp_path / "C", block_size=BLOCK, codec=CODEC, remote=remote) as c:
        report = remote_verify(c.remote)
        assert report["checked"] == len(wanted) and report["bad"] == []
        for p in prompts:
            q_toks = tokens(lm, p.read_text() + QUESTION)
            r = run_prompt(lm, q_toks, vault=c, save=False, max_tokens=4)
            assert r.reused_tokens == len(doc_tokens(lm, p.read_text()))
            assert r.text == cold_text(lm, q_toks)[: len(r.text)] and r.generation_tokens == 4


def test_a_silent_remote_times_out():
    """A server that accepts connections and never answers: every call ends at the timeout."""
    import socket

    import pytest

    from promptvault.vault.remote import RemoteError, RemoteTier

    with socket.socket() as srv:
        srv.bind(("127.0.0.1", 0))
        srv.listen(16)  # the kernel accepts; nobody ever reads or answers
        remote = RemoteTier("s3://silent-bucket/x", endpoint=f"http://127.0.0.1:{srv.getsockname()[1]}", timeout_s=1)
        for call in (lambda: remote.get("k"), lambda: remote.put_new("k", b"x"), lambda: remote.list("")):
            start = time.perf_counter()
            with pytest.raises(RemoteError, match="is unreachable: timed out after 1 s"):
                call()
            assert time.perf_counter() - start < 5
        remote.close()
