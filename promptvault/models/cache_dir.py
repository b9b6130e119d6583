"""Where converted models live, and how a directory gets there without ever being half-written.

A GGUF conversion takes seconds and writes hundreds of MB; a killed process must not leave a
directory that a later load mistakes for a finished model. Every entry is therefore built in a
unique temporary directory next to its final place and renamed into place in one step.
"""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path

MODELS_ENV = "PROMPTVAULT_MODELS"


def models_cache_dir() -> Path:
    """The model cache: `$PROMPTVAULT_MODELS`, else `~/.cache/promptvault/models`."""
    configured = os.environ.get(MODELS_ENV)
    return Path(configured).expanduser() if configured else Path.home() / ".cache" / "promptvault" / "models"


@contextmanager
def atomic_dir(final: Path):
    """Yield a fresh temporary directory that becomes `final` only if the block succeeds.

    If another process finished the same entry first, its copy wins and ours is discarded:
    entries are keyed by content, so both are identical.
    """
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{final.name}.tmp-", dir=final.parent))
    try:
        yield tmp
        try:
            os.replace(tmp, final)
        except OSError:
            if not final.is_dir():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


@contextmanager
def atomic_file(final: Path):
    """Yield a temporary path in `final`'s directory that replaces `final` if the block succeeds."""
    final.parent.mkdir(parents=True, exist_ok=True)
    fd, name = tempfile.mkstemp(prefix=f".{final.name}.tmp-", dir=final.parent)
    os.close(fd)
    tmp = Path(name)
    try:
        yield tmp
        os.replace(tmp, final)
    finally:
        tmp.unlink(missing_ok=True)


def dir_size_bytes(path: Path) -> int:
    """Total size of the regular files under `path` (0 if it does not exist)."""
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file() and not p.is_symlink())
