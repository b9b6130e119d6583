"""A real `promptvault serve` process on 127.0.0.1 for the server tests (and the serve bench's idea
of one): start on a free port, wait for /health, stop with SIGTERM or kill -9."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx

EXE = shutil.which("promptvault", path=str(Path(sys.executable).parent))
LOSSLESS = ["--key-bits", "lossless", "--value-bits", "lossless"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class Server:
    def __init__(self, vault: Path, log: Path, *args: str):
        self.vault, self.log, self.args = vault, log, [str(a) for a in args]
        self.proc: subprocess.Popen | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self, timeout: float = 180) -> "Server":
        self.port = free_port()
        with open(self.log, "a") as log:
            self.proc = subprocess.Popen([EXE, "-v", "serve", "--vault", str(self.vault), "--port", str(self.port),
                                          *self.args], stdout=log, stderr=subprocess.STDOUT, env=os.environ.copy())
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"server exited with {self.proc.returncode}: {self.log.read_text()[-2000:]}")
            try:
                if httpx.get(self.url + "/health", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        self.kill()
        raise RuntimeError(f"server did not answer /health within {timeout} s")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self.kill()
        self.proc = None

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None

    def wait_for_log(self, fragment: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if fragment in self.log.read_text():
                return True
            time.sleep(0.2)
        return False
