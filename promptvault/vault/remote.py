"""The remote tier: an S3-compatible bucket (AWS S3, R2, MinIO, Ceph, moto…) shared by many vaults.

Why no remote index: chunks are immutable and named by their chained key (keys.py), so a vault
that computed a prompt's keys locally can ask the bucket for exactly those objects; nothing on
the remote has to be kept consistent with anything else. Objects under `s3://bucket/prefix/`:

    ns/<namespace id>/namespace.json                  the namespace descriptor (what `ls`/`stats` list)
    ns/<namespace id>/blocks/<key>.safetensors        a full block: the shard file's bytes, unchanged
    ns/<namespace id>/leaves/<parent|root>/<key>.safetensors   a prompt's tail (shorter than a block),
                                                      under its parent so one LIST finds a prompt's tails
    ns/<namespace id>/warmed/<last key>.json          a warmed prompt: label, source, tokens, chain of keys

Every object is written with a conditional put (`If-None-Match: *`): the first complete object
wins, as on disk (shards.py), so any number of machines can race on one chunk.

This module is the client only: it knows the layout and the protocol, never the vault. Every
call is bounded (a connect and a request timeout, one quick retry); many keys go through a small
thread pool. Errors become RemoteError with a one-line message built here from the error's kind
and the S3 error code — never from the raw error text, which can echo an access key id — so no
credential reaches a message, a log line or JSON output. Credentials, region and endpoint come
from the standard AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY, AWS_SESSION_TOKEN,
AWS_REGION / AWS_DEFAULT_REGION, AWS_ENDPOINT_URL), else from the shared credentials and config
files (AWS_PROFILE, default `default`); `endpoint` (the CLI's --remote-endpoint) wins over both.
"""

from __future__ import annotations

import configparser
import datetime
import os
import re
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

from promptvault.vault.errors import VaultError

DEFAULT_TIMEOUT_S = 10.0  # one request, connect included (PROMPTVAULT_REMOTE_TIMEOUT overrides)
CONNECT_TIMEOUT_S = 3.0
DOWN_S = 300.0  # after a failure, the restore/write hooks leave the remote alone this long
WORKERS = 8  # parallel requests: enough to hide a round trip per chunk, polite to the server
SUFFIX = ".safetensors"
_URL = re.compile(r"^s3://([a-z0-9][a-z0-9.\-]{1,61}[a-z0-9])(?:/(.*))?$")
_CODE = re.compile(r"<Code>([A-Za-z]+)</Code>")


class RemoteError(VaultError):
    """The remote tier failed or refused a request (one line, never a credential)."""


class RemoteAccessError(RemoteError):
    """The remote refused the credentials (wrong key, expired token, no permission)."""


@dataclass
class Listed:
    path: str  # relative to the remote's prefix
    size: int
    modified: datetime.datetime


def parse_url(url: str) -> tuple[str, str]:
    """`s3://bucket/prefix` -> (bucket, prefix without slashes at either end)."""
    m = _URL.match(url or "")
    if not m:
        raise RemoteError(f"{url!r} is not a remote: give s3://bucket or s3://bucket/prefix")
    return m.group(1), (m.group(2) or "").strip("/")


def _profile() -> dict:
    """Credentials, region and endpoint of the AWS profile (AWS_PROFILE, else `default`) from the
    shared files, for what the environment does not set. object_store reads only the variables."""
    name = os.environ.get("AWS_PROFILE") or "default"
    out = {}
    creds = configparser.ConfigParser()
    creds.read(os.environ.get("AWS_SHARED_CREDENTIALS_FILE") or Path.home() / ".aws" / "credentials")
    if creds.has_section(name):
        s = creds[name]
        for ours, theirs in (("access_key_id", "aws_access_key_id"), ("secret_access_key", "aws_secret_access_key"),
                             ("token", "aws_session_token")):
            if s.get(theirs):
                out[ours] = s[theirs]
    config = configparser.ConfigParser()
    config.read(os.environ.get("AWS_CONFIG_FILE") or Path.home() / ".aws" / "config")
    section = "default" if name == "default" else f"profile {name}"
    if config.has_section(section):
        for key in ("region", "endpoint_url"):
            if config[section].get(key):
                out[key] = config[section][key]
    return out


class RemoteTier:
    """One bucket prefix, reached through obstore (Rust object_store) with bounded calls."""

    def __init__(self, url: str, *, endpoint: str | None = None, timeout_s: float | None = None):
        try:
            from obstore.store import S3Store
        except ImportError:
            raise RemoteError("the remote tier needs obstore: pip install 'promptvault[s3]'") from None
        self.bucket, self.prefix = parse_url(url)
        self.url = f"s3://{self.bucket}/{self.prefix}".rstrip("/")
        if timeout_s is None:
            timeout_s = float(os.environ.get("PROMPTVAULT_REMOTE_TIMEOUT") or DEFAULT_TIMEOUT_S)
        self.timeout_s = timeout_s
        env = os.environ
        profile = {} if env.get("AWS_ACCESS_KEY_ID") else _profile()
        config = {}
        if not env.get("AWS_ACCESS_KEY_ID"):
            config.update({k: v for k, v in profile.items() if k in ("access_key_id", "secret_access_key", "token")})
        region = env.get("AWS_REGION") or env.get("AWS_DEFAULT_REGION") or profile.get("region")
        if region:
            config["region"] = region
        endpoint = endpoint or env.get("AWS_ENDPOINT_URL_S3") or env.get("AWS_ENDPOINT_URL") or profile.get("endpoint_url")
        if endpoint:
            config["endpoint"] = endpoint
        self.endpoint = endpoint
        self._secrets = [v for v in (config.get("secret_access_key"), config.get("token"), config.get("access_key_id"),
                                     env.get("AWS_SECRET_ACCESS_KEY"), env.get("AWS_SESSION_TOKEN"),
                                     env.get("AWS_ACCESS_KEY_ID")) if v]
        client = {"timeout": f"{timeout_s}s", "connect_timeout": f"{min(CONNECT_TIMEOUT_S, timeout_s)}s",
                  "allow_http": bool(endpoint and endpoint.startswith("http://"))}
        # One quick retry, and never past the timeout: a remote that is down must cost a run
        # a bounded, small time, not object_store's default of 10 retries over 3 minutes.
        retry = {"max_retries": 1, "retry_timeout": datetime.timedelta(seconds=timeout_s),
                 "backoff": {"init_backoff": datetime.timedelta(milliseconds=50),
                             "max_backoff": datetime.timedelta(milliseconds=500), "base": 2}}
        try:
            self.store = S3Store(self.bucket, prefix=self.prefix or None, config=config, client_options=client,
                                 retry_config=retry)
        except Exception as e:  # a bad endpoint or configuration value
            raise RemoteError(self._message("cannot be configured", e)) from None
        self._pool = ThreadPoolExecutor(WORKERS, thread_name_prefix="promptvault-remote")
        self.described: set[str] = set()  # namespaces whose descriptor this process has put
        self._down_until = 0.0  # time.monotonic() before which the hooks do not ask (see mark_down)

    def __repr__(self) -> str:
        return f"RemoteTier({self.url!r})"

    @property
    def down(self) -> bool:
        return time.monotonic() < self._down_until

    def mark_down(self) -> bool:
        """Stop the hooks asking for DOWN_S (a run's whole life; a long-lived server asks again
        later); True if it was up, i.e. this is news worth one warning."""
        news = not self.down
        self._down_until = time.monotonic() + DOWN_S
        return news

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)

    # layout

    @staticmethod
    def chunk_path(ns_id: str, key: str, parent: str | None, leaf: bool) -> str:
        if leaf:
            return f"ns/{ns_id}/leaves/{parent or 'root'}/{key}{SUFFIX}"
        return f"ns/{ns_id}/blocks/{key}{SUFFIX}"

    @staticmethod
    def leaves_prefix(ns_id: str, parent: str | None) -> str:
        return f"ns/{ns_id}/leaves/{parent or 'root'}/"

    @staticmethod
    def namespace_path(ns_id: str) -> str:
        return f"ns/{ns_id}/namespace.json"

    @staticmethod
    def warmed_path(ns_id: str, last_key: str) -> str:
        return f"ns/{ns_id}/warmed/{last_key}.json"

    # calls (each bounded; errors are RemoteError)

    def get(self, path: str) -> bytes | None:
        """The object's bytes, or None when there is no such object."""
        import obstore

        try:
            return bytes(obstore.get(self.store, path).bytes())
        except FileNotFoundError:
            return None
        except Exception as e:
            raise self._error("read", e) from None

    def map(self, fn, items):
        """fn over items on the remote's thread pool (lazily, in order): for requests only."""
        return self._pool.map(fn, items)

    def get_many(self, paths: list[str]) -> list[bytes | None]:
        """get() of each path, in parallel, in order."""
        return list(self._pool.map(self.get, paths))

    def exists_many(self, paths: list[str]) -> list[bool]:
        return list(self._pool.map(self._exists, paths))

    def _exists(self, path: str) -> bool:
        import obstore

        try:
            obstore.head(self.store, path)
            return True
        except FileNotFoundError:
            return False
        except Exception as e:
            raise self._error("read", e) from None

    def put_new(self, path: str, data: bytes) -> bool:
        """Store `data` unless an object is already there (If-None-Match: *): True if ours is it."""
        import obstore
        from obstore.exceptions import AlreadyExistsError, PreconditionError

        try:
            obstore.put(self.store, path, data, mode="create", use_multipart=False)
            return True
        except (AlreadyExistsError, PreconditionError):
            return False
        except Exception as e:
            raise self._error("write", e) from None

    def put_many(self, items: list[tuple[str, bytes]]) -> list[bool]:
        return list(self._pool.map(lambda item: self.put_new(*item), items))

    def delete_many(self, paths: list[str]) -> None:
        import obstore

        try:
            for start in range(0, len(paths), 1000):  # S3's DeleteObjects takes 1,000 keys at most
                obstore.delete(self.store, paths[start : start + 1000])
        except FileNotFoundError:
            pass
        except Exception as e:
            raise self._error("delete", e) from None

    def list(self, prefix: str) -> list[Listed]:
        """Every object under `prefix` (relative to the remote's own prefix)."""
        import obstore

        try:
            return [Listed(o["path"], o["size"], o["last_modified"])
                    for batch in obstore.list(self.store, prefix=prefix) for o in batch]
        except Exception as e:
            raise self._error("list", e) from None

    def list_dirs(self, prefix: str) -> list[str]:
        """The 'directory' names directly under `prefix` (a delimiter list)."""
        import obstore

        try:
            found = obstore.list_with_delimiter(self.store, prefix=prefix.rstrip("/") or None)
        except Exception as e:
            raise self._error("list", e) from None
        return [p.rstrip("/").rsplit("/", 1)[-1] for p in found["common_prefixes"]]

    # errors

    def _error(self, what: str, e: Exception) -> RemoteError:
        from obstore.exceptions import PermissionDeniedError, UnauthenticatedError

        code = _CODE.search(str(e))
        code = code.group(1) if code else None
        if isinstance(e, (PermissionDeniedError, UnauthenticatedError)) or code in _ACCESS_CODES:
            return RemoteAccessError(self._message(f"refused the credentials ({code or type(e).__name__}); check "
                                                   "AWS_ACCESS_KEY_ID / AWS_SECRET_ACCESS_KEY or AWS_PROFILE", None))
        if code == "NoSuchBucket":
            return RemoteError(self._message(f"has no bucket {self.bucket!r}", None))
        if code:
            return RemoteError(self._message(f"{what} failed ({code})", None))
        text = str(e).lower()
        if any(t in text for t in ("timed out", "timedout", "kind: timeout")):  # not "retry_timeout": in every message
            why = f"timed out after {self.timeout_s:g} s"
        elif "error sending request" in text or "connect" in text or "dns" in text:
            why = "connection failed"
        else:
            why = f"{what} failed ({type(e).__name__})"
        return RemoteError(self._message(f"is unreachable: {why}", None))

    def _message(self, what: str, e: Exception | None) -> str:
        where = f" at {self.endpoint}" if self.endpoint else ""
        text = f"remote {self.url}{where} {what}" + (f" ({type(e).__name__})" if e is not None else "")
        for secret in self._secrets:  # belt and braces: nothing above quotes a secret
            if len(secret) >= 8:  # a real one; "x" or "test" would only mangle the message
                text = text.replace(secret, "***")
        return text


_ACCESS_CODES = {"InvalidAccessKeyId", "SignatureDoesNotMatch", "AccessDenied", "ExpiredToken", "InvalidToken",
                 "InvalidClientTokenId", "AuthorizationHeaderMalformed"}


def open_remote(remote, endpoint: str | None = None) -> RemoteTier | None:
    """A RemoteTier from a URL (or one given ready-made), or None."""
    if remote is None or isinstance(remote, RemoteTier):
        return remote
    return RemoteTier(str(remote), endpoint=endpoint)
