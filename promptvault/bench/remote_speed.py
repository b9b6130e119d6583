"""`promptvault bench speed --remote`: restoring from a shared remote tier vs local disk vs cold.

Per prefix of P tokens (random token ids, as `bench speed`):
  - cold prefill of P tokens (bench/speed.py's cold_prefill);
  - machine A warms the prefix into its own vault (not timed here: `bench speed` measures warm),
    then `push` puts its chunks on the remote: upload_s (HEAD + conditional PUT per chunk, in
    parallel);
  - machine B, an empty vault with the remote set and the RAM tier off, restores the prefix:
    restore_remote_s is the whole call (remote GETs in parallel, each object checked and
    published into B's disk tier, then the ordinary local read + decode), remote_fetch_s its
    remote part;
  - B again without the remote, page cache dropped: restore_disk_s, the local disk tier;
  - ratios cold / remote restore and remote / disk restore.
The remote is a real S3 server: with no URL, moto's on 127.0.0.1 (loopback: no network latency,
but the full S3 protocol over HTTP, signing and moto's Python request handling), else the bucket
given (a fresh prefix under it, deleted afterwards).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
import uuid
from pathlib import Path

import numpy as np

from promptvault.bench.speed import _sync, _vocab, _warm_up, cold_prefill, drop_page_cache, environment, load_lm


def _loopback_moto():
    """moto's S3 server on 127.0.0.1 with one bucket: (server, s3 url, endpoint)."""
    try:
        import boto3
        from moto.server import ThreadedMotoServer
    except ImportError:
        from promptvault.vault.remote import RemoteError

        raise RemoteError("bench speed --remote without a URL needs moto: pip install 'moto[server]'") from None
    import logging

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    endpoint = f"http://{host}:{port}"
    creds = {"aws_access_key_id": "bench", "aws_secret_access_key": "bench"}
    boto3.client("s3", endpoint_url=endpoint, region_name="us-east-1", **creds).create_bucket(Bucket="pv-bench")
    os.environ.setdefault("AWS_ACCESS_KEY_ID", "bench")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "bench")
    return server, "s3://pv-bench/speed", endpoint


def bench_remote_prefix(lm, n: int, workdir: Path, url: str, endpoint: str | None, *, seed: int = 0) -> dict:
    from promptvault.vault import Vault
    from promptvault.vault.remote import RemoteTier
    from promptvault.vault.remote_sync import push

    rng = np.random.default_rng(seed + n)
    tokens = rng.integers(0, _vocab(lm), size=n + 1, dtype=np.int64)
    row = {"tokens": n}
    cold_prefill(lm.model, tokens[: min(n, 64)])
    _, row["cold_prefill_s"] = cold_prefill(lm.model, tokens[:n])
    prefix = f"{url.rstrip('/')}/{uuid.uuid4().hex[:8]}"
    a, b = workdir / f"A-{n}", workdir / f"B-{n}"
    with Vault(a) as va:
        va.warm(lm, tokens[:n])
    with Vault(a, remote=RemoteTier(prefix, endpoint=endpoint)) as va:
        t0 = time.perf_counter()
        pushed = push(va)
        row["upload_s"] = time.perf_counter() - t0
        row["chunks"] = len(va.index.all_chunks())
        row["vault_bytes"] = sum(r["bytes"] for r in va.index.all_chunks())
    with Vault(b, ram_cap=0, remote=RemoteTier(prefix, endpoint=endpoint)) as vb:
        _sync()
        t0 = time.perf_counter()
        r = vb.restore(lm, tokens)
        _sync()
        row["restore_remote_s"] = time.perf_counter() - t0
        if r.tokens_reused != n or r.tier != "remote":
            raise RuntimeError(f"remote restore gave {r.tokens_reused} tokens from {r.tier!r}, expected {n}")
        row["remote_fetch_s"] = row["restore_remote_s"] - r.seconds
        del r
    with Vault(b, ram_cap=0) as vb:
        row["page_cache_dropped"] = drop_page_cache([p for p in b.rglob("*") if p.is_file()])
        _sync()
        r = vb.restore(lm, tokens)
        _sync()
        if r.tokens_reused != n or r.tier != "disk":
            raise RuntimeError(f"disk restore gave {r.tokens_reused} tokens from {r.tier!r}, expected {n}")
        row["restore_disk_s"] = r.seconds
        del r
    with Vault(a, remote=RemoteTier(prefix, endpoint=endpoint)) as va:  # leave the bucket as found
        va.remote.delete_many([o.path for o in va.remote.list("")])
    shutil.rmtree(a, ignore_errors=True)
    shutil.rmtree(b, ignore_errors=True)
    row["chunks_put"] = pushed["chunks_put"]
    row["cold_over_restore_remote"] = row["cold_prefill_s"] / row["restore_remote_s"]
    row["restore_remote_over_disk"] = row["restore_remote_s"] / row["restore_disk_s"]
    return row


def run_remote_bench(model: str, lengths: list[int], url: str | None, endpoint: str | None, *, seed: int = 0,
                     workdir: str | None = None) -> dict:
    server = None
    if not url:
        server, url, endpoint = _loopback_moto()
    lm = load_lm(model)
    tmp = Path(tempfile.mkdtemp(prefix="pv-remote-speed-", dir=workdir))
    try:
        _warm_up(lm, tmp)
        rows = [bench_remote_prefix(lm, n, tmp, url, endpoint, seed=seed) for n in lengths]
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
        if server is not None:
            server.stop()
    where = "moto on 127.0.0.1 (loopback)" if server is not None else (endpoint or "AWS S3")
    return {"model": getattr(lm, "name", model), "env": environment(), "remote": where, "rows": rows}


COLUMNS = [("tokens", "tokens"), ("chunks", "chunks"), ("vault_bytes", "vault MB"), ("cold_prefill_s", "cold s"),
           ("upload_s", "push s"), ("restore_remote_s", "remote restore s"), ("remote_fetch_s", "  fetch"),
           ("restore_disk_s", "disk restore s"), ("cold_over_restore_remote", "cold/remote"),
           ("restore_remote_over_disk", "remote/disk")]


def format_table(result: dict) -> str:
    from promptvault.bench.speed import _fmt

    env = result["env"]
    head = (f"model {result['model']} | remote: {result['remote']} | {env['device']} | {env['processor']} "
            f"({env['cpus']} cpus) | {env['date']}")
    lines = [head, "| " + " | ".join(h.strip() for _, h in COLUMNS) + " |", "|" + "---|" * len(COLUMNS)]
    for row in result["rows"]:
        lines.append("| " + " | ".join(str(row[k]) if k == "chunks" else _fmt(k, row.get(k)) for k, _ in COLUMNS) + " |")
    return "\n".join(lines)
