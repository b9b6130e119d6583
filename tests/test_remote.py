"""The remote tier on a real S3 server (moto's, HTTP on 127.0.0.1): two vault directories stand
for two machines sharing one bucket; real `promptvault` processes, the real default model
(SmolLM2-135M), a lossless codec so that outputs compare exactly with a cold run."""

from __future__ import annotations

import json

import pytest
from remote_common import ACCESS_KEY, SECRET_KEY, assert_no_secret, monkeypatch_module, s3  # noqa: F401
from test_reliability_common import BLOCK, CODEC, LOSSLESS, QUESTION, cold_text, doc_tokens, pv, text, tokens

import mlx.core as mx
import numpy as np
from mlx_lm.models.cache import make_prompt_cache

from promptvault.vault import Vault
from promptvault.vault.remote import RemoteError, RemoteTier, parse_url
from promptvault.vault.remote_admin import gc as remote_gc
from promptvault.vault.remote_admin import ls as remote_ls
from promptvault.vault.remote_sync import pull, push, remote_warmed
from promptvault.vault.keys import block_keys


def _json(res):
    assert res.returncode == 0, res.stderr
    assert_no_secret(res.stdout, res.stderr)
    out = res.stdout
    return json.loads(out[out.index("{"):])


def test_url_and_conditional_put(s3):
    assert parse_url("s3://team-bucket/a/b/") == ("team-bucket", "a/b")
    assert parse_url("s3://team-bucket") == ("team-bucket", "")
    for bad in ("team-bucket/x", "s3://", "http://x/y", "s3://UPPER/x"):
        with pytest.raises(RemoteError):
            parse_url(bad)
    remote = RemoteTier(f"s3://{s3.bucket()}/p")
    # If-None-Match: * on the real protocol: the first complete object wins, the second put is refused.
    assert remote.put_new("x/one", b"first") is True
    assert remote.put_new("x/one", b"second") is False
    assert remote.get("x/one") == b"first" and remote.get("x/none") is None
    assert remote.exists_many(["x/one", "x/none"]) == [True, False]
    assert [o.path for o in remote.list("x/")] == ["x/one"]
    remote.close()


def test_two_machines_share_one_bucket(smollm, s3, tmp_path):
    """A warms into the bucket; B (an empty vault) restores from it with A's greedy output, then
    from its own disk; B's stats and ls show the remote tier."""
    remote = f"s3://{s3.bucket()}/team"
    doc = tmp_path / "doc.txt"
    doc.write_text(text(0, 600))
    question = tmp_path / "q.txt"
    question.write_text(doc.read_text() + QUESTION)
    a, b = tmp_path / "A", tmp_path / "B"
    common = ["--block-size", BLOCK, *LOSSLESS, "--remote", remote, "--json"]
    warm = _json(pv("warm", doc, "--vault", a, "--label", "doc", *common))
    assert warm["prompts"][0]["new_chunks"] >= 4
    run = ["run", "--prompt-file", question, "--max-tokens", 6, "--no-save", *common]
    on_a = _json(pv(*run, "--vault", a))
    first = _json(pv(*run, "--vault", b))
    again = _json(pv(*run, "--vault", b))
    n_doc = len(doc_tokens(smollm, doc.read_text()))
    assert on_a["tier"] in ("disk", "ram") and first["tier"] == "remote" and again["tier"] == "disk"
    assert first["reused_tokens"] == again["reused_tokens"] == on_a["reused_tokens"] == n_doc
    cold = cold_text(smollm, tokens(smollm, question.read_text()))
    assert first["text"] == again["text"] == on_a["text"] == cold
    # B keeps exactly A's bytes (the first complete object wins everywhere).
    a_files = {p.name: p.read_bytes() for p in (a / "shards").rglob("*.safetensors")}
    b_files = {p.name: p.read_bytes() for p in (b / "shards").rglob("*.safetensors")}
    assert b_files and all(a_files[name] == data for name, data in b_files.items())
    stats = _json(pv("stats", "--vault", b, "--remote", remote, "--json"))
    assert stats["chunks"] == len(b_files)
    assert stats["remote"]["remote"] == remote and stats["remote"]["chunks"] == len(a_files)
    assert stats["remote"]["warmed"] == 1 and stats["remote"]["namespaces"][0]["block_size"] == BLOCK
    text_stats = pv("stats", "--vault", b, "--remote", remote)
    assert "remote" in text_stats.stdout and remote in text_stats.stdout
    listed = pv("ls", "--vault", b, "--remote", remote, "--json")
    assert [r["label"] for r in json.loads(listed.stdout)] == ["doc"]
    assert_no_secret(listed.stdout, listed.stderr, text_stats.stdout, text_stats.stderr)


def test_push_pull_and_gc(smollm, s3, tmp_path):
    """push/pull move whole warmed prompts by label; gc --remote removes only the chunks no
    warmed prompt uses."""
    remote = f"s3://{s3.bucket()}/pp"
    one, two = doc_tokens(smollm, text(0, 300)), doc_tokens(smollm, text(3000, 300))
    with Vault(tmp_path / "A", block_size=BLOCK, codec=CODEC) as a:  # warmed without a remote
        a.warm(smollm, one, label="one")
        a.warm(smollm, two, label="two")
    with Vault(tmp_path / "A", codec=CODEC, remote=remote) as a:
        with pytest.raises(RemoteError, match="labelled 'nope'"):
            push(a, ["nope"])
        pushed = push(a, ["one"])
        assert pushed["prompts"] == 1 and pushed["chunks_put"] == len(a._ancestors(a.index.warmed()[0]["last_key"]))
        assert [r["label"] for r in remote_ls(a.remote)] == ["one"]
        assert push(a, None)["chunks_put"] >= 1  # the rest; "one" is skipped chunk by chunk
    with Vault(tmp_path / "B", block_size=BLOCK, codec=CODEC, remote=remote) as b:
        got = pull(b, None)
        assert got["prompts"] == 2 and got["failed"] == 0
        assert sorted(w["label"] for w in b.index.warmed()) == ["one", "two"]
        assert pull(b, ["one"])["chunks_fetched"] == 0  # already here
    with Vault(tmp_path / "B", codec=CODEC) as b:  # no remote: everything from B's own disk
        r = b.restore(smollm, one + [1, 2, 3])
        assert r.tokens_reused == len(one) and r.tier in ("disk", "ram")
    # Chunks no warmed prompt uses (a run's write-through) go; warmed chains stay.
    with Vault(tmp_path / "C", block_size=BLOCK, codec=CODEC, remote=remote) as c:
        c.warm(smollm, doc_tokens(smollm, text(6000, 200)))  # no label, but warmed: kept
        stray = tokens(smollm, text(9000, 200))
        cache = make_prompt_cache(smollm.model)
        smollm.model(mx.array(stray)[None], cache=cache)
        c.save(smollm, cache, stray)
        ns = c.namespace(smollm)
        stray_keys = set(block_keys(ns.digest, np.array(stray), c.block_size, tail=True))
        live = {k for r in remote_warmed(c.remote) for k in r["keys"]}
        assert stray_keys - live
        bucket = remote.split("/")[2]
        before = set(s3.objects(bucket))
        assert remote_gc(c.remote)["removed"] == 0  # everything is younger than an hour
        assert remote_gc(c.remote, min_age_s=0)["removed"] == len(stray_keys - live)
        gone = before - set(s3.objects(bucket))
        assert {p.rsplit("/", 1)[-1].removesuffix(".safetensors") for p in gone} == stray_keys - live
    with Vault(tmp_path / "D", block_size=BLOCK, codec=CODEC, remote=remote) as d:  # warmed prompts intact
        assert pull(d, None)["prompts"] == 3


def test_cli_usage_errors_are_one_line(s3, tmp_path):
    for args, fragment in ((["ls", "--remote", "gs://x/y"], "s3://bucket/prefix"),
                           (["push", "--remote", "s3://b-x/y"], "LABEL… or --all"),
                           (["pull", "x", "--all", "--remote", "s3://b-x/y"], "LABEL… or --all")):
        res = pv(*args, "--vault", tmp_path / "v")
        assert res.returncode == 2 and res.stderr.startswith("error: ") and res.stderr.count("\n") == 1, res.stderr
        assert fragment in res.stderr
    res = pv("push", "--all", "--vault", tmp_path / "v", env={k: v for k, v in s3.env().items()
                                                                 if k != "PROMPTVAULT_REMOTE"})
    assert res.returncode == 2 and "no remote" in res.stderr
    assert_no_secret(res.stdout, res.stderr)
    assert ACCESS_KEY and SECRET_KEY


def test_bench_speed_remote(smollm, s3):
    """`bench speed --remote S3_URL`: a restore from the remote, then from disk, of the same prefix."""
    from click.testing import CliRunner

    from promptvault.cli import main

    res = CliRunner().invoke(main, ["bench", "speed", "--remote", f"s3://{s3.bucket()}/bench", "--lengths", "64",
                                    "--json"])
    assert res.exit_code == 0, res.output
    row = json.loads(res.stdout)["rows"][0]
    assert row["tokens"] == 64 and row["chunks"] == 1 and row["chunks_put"] == 1
    assert 0 < row["remote_fetch_s"] < row["restore_remote_s"] and row["restore_disk_s"] > 0
    assert_no_secret(res.output)


def test_credentials_region_and_endpoint_from_a_profile(s3, tmp_path, monkeypatch):
    """Without AWS_ACCESS_KEY_ID, the profile in the shared files gives credentials, region and
    endpoint (object_store reads only the variables); the secret never reaches a message."""
    bucket = s3.bucket()  # before the variables change (boto3 caches the profiles it read)
    (tmp_path / "credentials").write_text("[team]\naws_access_key_id = AKIAPROFILEKEY\n"
                                          "aws_secret_access_key = profile/secret/value\n")
    (tmp_path / "config").write_text(f"[profile team]\nregion = eu-west-1\nendpoint_url = {s3.endpoint}\n")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN", "AWS_REGION", "AWS_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(tmp_path / "credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(tmp_path / "config"))
    monkeypatch.setenv("AWS_PROFILE", "team")
    remote = RemoteTier(f"s3://{bucket}/p")
    assert remote.endpoint == s3.endpoint and remote.store.config["region"] == "eu-west-1"
    assert remote.put_new("x", b"1") and remote.get("x") == b"1"
    message = remote._message("failed", None)
    assert "profile/secret/value" not in message and "AKIAPROFILEKEY" not in message
    remote.close()


def test_live_caches_read_the_remote_when_memory_and_the_disk_miss(smollm, s3, tmp_path):
    """A server's LiveCaches over a vault with a remote tier: a prompt this machine never saw comes
    from the bucket, as Vault.restore would bring it."""
    from promptvault.vault.live import LiveCaches

    remote = f"s3://{s3.bucket()}/live"
    doc = doc_tokens(smollm, text(0, 300))
    with Vault(tmp_path / "A", block_size=BLOCK, codec=CODEC, remote=remote) as a:
        stored = a.warm(smollm, doc).tokens
    with Vault(tmp_path / "B", block_size=BLOCK, codec=CODEC, remote=remote) as b:
        got = LiveCaches(b).fetch(smollm, doc + [7])
        assert (got.cached, got.source) == (stored, "remote")
