"""Shared helpers of the remote-tier tests: a real S3 server (moto's, over HTTP on 127.0.0.1),
buckets, the environment a `promptvault` process needs to reach it, and the secrets that must
never appear in any output. No tests here."""

from __future__ import annotations

import http.client
import logging
import os
import socket
import threading
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import pytest

ACCESS_KEY = "AKIAPVTESTKEY7Q3X9Z1W"
SECRET_KEY = "pvTestSecret/9f8e7d6c5b4a3210zyxwvu"
SESSION_TOKEN = "pvSessionToken-0123456789-secret"
SECRETS = (ACCESS_KEY, SECRET_KEY, SESSION_TOKEN)


class S3:
    """A running moto S3 server and the settings that reach it."""

    def __init__(self, endpoint: str):
        self.endpoint = endpoint

    def bucket(self) -> str:
        """A fresh, empty bucket; its name."""
        import boto3

        name = f"pv-{uuid.uuid4().hex[:12]}"
        boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY, aws_secret_access_key=SECRET_KEY,
                     region_name="us-east-1").create_bucket(Bucket=name)
        return name

    def client(self):
        import boto3

        return boto3.client("s3", endpoint_url=self.endpoint, aws_access_key_id=ACCESS_KEY,
                            aws_secret_access_key=SECRET_KEY, region_name="us-east-1")

    def env(self, endpoint: str | None = None, **extra) -> dict:
        """os.environ plus the AWS variables for this server (for a `promptvault` process)."""
        return {**os.environ, "AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY,
                "AWS_SESSION_TOKEN": SESSION_TOKEN, "AWS_REGION": "us-east-1",
                "AWS_ENDPOINT_URL": endpoint or self.endpoint, "PROMPTVAULT_REMOTE_TIMEOUT": "3", **extra}

    def objects(self, bucket: str) -> dict[str, bytes]:
        c = self.client()
        keys = [o["Key"] for page in c.get_paginator("list_objects_v2").paginate(Bucket=bucket)
                for o in page.get("Contents", [])]
        return {k: c.get_object(Bucket=bucket, Key=k)["Body"].read() for k in keys}


@pytest.fixture(scope="module")
def s3(monkeypatch_module):
    from moto.server import ThreadedMotoServer

    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    s = S3(f"http://{host}:{port}")
    for k, v in s.env().items():
        monkeypatch_module.setenv(k, v)
    yield s
    server.stop()


@pytest.fixture(scope="module")
def monkeypatch_module():
    mp = pytest.MonkeyPatch()
    yield mp
    mp.undo()


def assert_no_secret(*texts: str) -> None:
    for text in texts:
        for secret in SECRETS:
            assert secret not in (text or ""), "a credential appeared in the output"


def closed_port() -> str:
    """An endpoint where nothing listens (connection refused)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"


class DyingProxy:
    """An HTTP proxy in front of the S3 server that serves `allow` chunk downloads and then dies
    (drops every connection and stops listening): a remote that goes away mid-restore."""

    def __init__(self, upstream: str, allow: int):
        self.upstream = upstream.removeprefix("http://")
        self.allow = allow
        self.served = 0
        self.lock = threading.Lock()
        proxy = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def _forward(self):
                with proxy.lock:
                    chunk = self.command == "GET" and self.path.split("?")[0].endswith(".safetensors")
                    dead = proxy.served >= proxy.allow and chunk
                    if chunk and not dead:
                        proxy.served += 1
                if dead:
                    threading.Thread(target=proxy.stop, daemon=True).start()
                    self.close_connection = True
                    self.connection.shutdown(socket.SHUT_RDWR)
                    return
                body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
                conn = http.client.HTTPConnection(proxy.upstream, timeout=30)
                conn.request(self.command, self.path, body=body or None, headers=dict(self.headers))
                resp = conn.getresponse()
                data = resp.read()
                self.send_response(resp.status)
                for k, v in resp.getheaders():
                    if k.lower() not in ("content-length", "transfer-encoding", "connection"):
                        self.send_header(k, v)
                self.send_header("Content-Length", str(len(data)))
                self.end_headers()
                if self.command != "HEAD":
                    self.wfile.write(data)

            do_GET = do_PUT = do_HEAD = do_POST = do_DELETE = _forward

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.endpoint = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()
        self._stopped = False

    def stop(self):
        with self.lock:
            if self._stopped:
                return
            self._stopped = True
        self.server.shutdown()
        self.server.server_close()
