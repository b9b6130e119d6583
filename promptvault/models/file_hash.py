"""Content hashes of large files, remembered by (path, size, mtime) so repeated loads skip them.

Model files are keyed by content (sha256) so that a renamed or re-downloaded copy maps to the
same conversion, but hashing 100 MB-1 GB on every load would cost seconds. The "stat cache" is
a small JSON file in the model cache; an entry is trusted only while the file's size and
nanosecond mtime are unchanged, so an edited file is hashed again.
"""

import hashlib
import json
import os
from pathlib import Path

from promptvault.models.cache_dir import atomic_file, models_cache_dir

_CHUNK = 1 << 22


def sha256_file(path: Path) -> str:
    """Hex sha256 of the file's bytes, read in 4 MiB chunks."""
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        while chunk := f.read(_CHUNK):
            digest.update(chunk)
    return digest.hexdigest()


def _stat_cache_path() -> Path:
    return models_cache_dir() / "file_hashes.json"


def _read_stat_cache() -> dict:
    try:
        return json.loads(_stat_cache_path().read_text())
    except (OSError, ValueError):
        return {}


def cached_sha256(path: Path) -> str:
    """sha256 of `path`, from the stat cache when the file is unchanged since it was hashed."""
    path = Path(path).resolve()
    st = path.stat()
    stamp = [st.st_size, st.st_mtime_ns]
    entries = _read_stat_cache()
    entry = entries.get(str(path))
    if entry and entry.get("stat") == stamp:
        return entry["sha256"]
    digest = sha256_file(path)
    remember_sha256(path, digest)
    return digest


def remember_sha256(path: Path, digest: str) -> None:
    """Record a hash computed elsewhere (e.g. while writing the file) for `path`."""
    path = Path(path).resolve()
    st = path.stat()
    entries = _read_stat_cache()  # fresh read: another process may have added entries
    entries = {name: entry for name, entry in entries.items() if os.path.exists(name)}  # forget deleted files
    entries[str(path)] = {"stat": [st.st_size, st.st_mtime_ns], "sha256": digest}
    try:
        with atomic_file(_stat_cache_path()) as tmp:
            tmp.write_text(json.dumps(entries, indent=0, sort_keys=True))
    except OSError:
        pass  # a read-only cache only costs speed, never correctness
