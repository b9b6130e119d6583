"""Shard files: one safetensors file per chunk (a block, or a prompt's tail leaf).

Why one chunk per file: chunks are shared between prompts (dedup), evicted one at a time (leaves
first) and verified and quarantined one at a time. With one file per chunk each of those is a
single `os.replace` / `os.remove` and a bad byte costs one block, never its neighbours; a restore
reads exactly the files it needs. Packing several blocks per file would need rewrites or
reference counting to evict or quarantine part of a file. The price is per-file overhead (a JSON
header, filesystem block rounding), a few KiB against ~1 MiB of codes per 256-token block.

Format: standard safetensors (readable by `safetensors`, `mx.load`), written here directly so the
checksum can cover the exact bytes on disk. `__metadata__["checksum"]` is
"xxh3_64:<hex>" of the whole header (with the checksum hex zeroed) followed by the tensor bytes,
so a flipped byte anywhere in the file is caught on read.
Version 2 (`__metadata__["shard_version"] = "2"`) lays the tensors out by element size, largest
first (then by name), with the JSON header padded to 8 bytes: every tensor starts at a multiple
of its element size from the (8-aligned) data region, with no holes, so a reader can take every
tensor as a view of one buffer. Version 1 files (no "shard_version", tensors by name) read the
same way, with a copy for any tensor that is not aligned.
A file is read with one `readinto` into one buffer and checksummed there; `read_shards` reads
the files of a restore on a small thread pool (file I/O and xxhash release the GIL: the disk
sees several requests at once) and builds the MLX arrays on the calling thread (MLX from
background threads can abort).

A chunk key names one set of bytes forever: the first complete file wins. Two writers of one key
need not compute the same bytes (a lossy codec applied to a prefix one of them restored from its
own lossy copy differs in the last bits), so a writer must never replace a published file: files
are written to a unique temp name in the target directory, fsynced, then hard-linked into place
(`os.link` fails if the name exists), and "exists" means "already stored": the loser drops its
temp file and adopts the winner's checksum. Readers never see half a file. The same rule holds
for every tier: the RAM tier keeps only bytes read from the winning file or written as it, and a
shared remote tier must publish with a conditional put (If-None-Match: *) for the same reason.
Only eviction or quarantine removes a file; a later writer may then publish new bytes for the
key, which are again a complete, self-checking encoding of the same tokens.
"""

from __future__ import annotations

import json
import os
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path

import mlx.core as mx
import numpy as np
import xxhash

SUFFIX = ".safetensors"
VERSION = "2"
_READ_THREADS = 4  # files read at once by read_shards: queue depth for the disk
_PREFIX = "xxh3_64:"
_ZERO = "0" * 16

# safetensors dtype name -> (mlx dtype, numpy dtype used for the raw bytes)
_DTYPES = {
    "F32": (mx.float32, np.float32), "F16": (mx.float16, np.float16),
    "BF16": (mx.bfloat16, np.uint16), "U8": (mx.uint8, np.uint8), "U16": (mx.uint16, np.uint16),
    "U32": (mx.uint32, np.uint32), "U64": (mx.uint64, np.uint64), "I8": (mx.int8, np.int8),
    "I16": (mx.int16, np.int16), "I32": (mx.int32, np.int32), "I64": (mx.int64, np.int64),
    "BOOL": (mx.bool_, np.bool_),
}
_NAMES = {mxd: name for name, (mxd, _) in _DTYPES.items()}


class CorruptShard(Exception):
    """The file does not parse or its checksum does not match (internal; the vault quarantines)."""


@dataclass
class Shard:
    arrays: dict[str, mx.array]
    metadata: dict[str, str]  # without the checksum entry
    checksum: str
    nbytes: int  # file size


def relpath(key: str) -> str:
    """Fan out by hash prefix (two levels of 256) so no directory holds millions of files."""
    return f"{key[:2]}/{key[2:4]}/{key}{SUFFIX}"


def _raw(a: mx.array) -> np.ndarray:
    if a.dtype == mx.bfloat16:
        a = a.view(mx.uint16)
    return np.ascontiguousarray(np.asarray(a)).reshape(-1)


def _encode(arrays: dict[str, mx.array], metadata: dict[str, str]) -> tuple[bytes, str]:
    """The whole file as one bytes object, and its checksum."""
    parts, digest = _encode_parts(arrays, metadata)
    return b"".join(parts), digest


def _encode_parts(arrays: dict[str, mx.array], metadata: dict[str, str]) -> tuple[list[bytes], str]:
    """The file as a list of pieces (length + header, then each tensor's bytes) and its checksum:
    each tensor is copied once (out of MLX), never joined, so a large chunk costs one copy."""
    header: dict = {}
    blobs = []
    offset = 0
    for name in sorted(arrays, key=lambda k: (-arrays[k].itemsize, k)):  # aligned, no holes
        a = arrays[name]
        if a.size == 0:
            raise ValueError(f"safetensors cannot store the size-0 array {name!r}")
        if a.dtype not in _NAMES:
            raise ValueError(f"unsupported dtype {a.dtype} for {name!r}")
        blob = _raw(a).tobytes()
        header[name] = {"dtype": _NAMES[a.dtype], "shape": list(a.shape),
                        "data_offsets": [offset, offset + len(blob)]}
        blobs.append(blob)
        offset += len(blob)
    header["__metadata__"] = {**metadata, "shard_version": VERSION, "checksum": _PREFIX + _ZERO}
    text = json.dumps(header, separators=(",", ":")).encode()
    text += b" " * (-len(text) % 8)
    h = xxhash.xxh3_64(text)
    for blob in blobs:
        h.update(blob)
    digest = h.hexdigest()
    text = text.replace((_PREFIX + _ZERO).encode(), (_PREFIX + digest).encode(), 1)
    return [len(text).to_bytes(8, "little") + text, *blobs], digest


@dataclass
class Written:
    nbytes: int  # size of the file now at the path
    checksum: str  # checksum of the file now at the path (the winner's, if another wrote first)
    published: bool  # True if this call's bytes are the file; False if an existing file won


def encode_shard(arrays: dict[str, mx.array], metadata: dict[str, str]) -> tuple[list[bytes], str]:
    """The shard file's bytes (in pieces, written in order) and checksum. Reads the arrays (MLX
    work): a writer thread gets the bytes from its caller and does only file I/O (MLX from a
    background thread can abort)."""
    return _encode_parts(arrays, metadata)


def write_shard(path: Path, arrays: dict[str, mx.array], metadata: dict[str, str]) -> Written:
    """Publish a shard at `path` unless one is already there (the first complete file wins)."""
    return publish_shard(path, *encode_shard(arrays, metadata))


def publish_shard(path: Path, parts: list[bytes], digest: str) -> Written:
    """Publish encoded shard bytes at `path` unless a file is already there. File I/O only.

    Unique temp file, fsync, then a hard link to the final name, which fails if the name exists;
    the temp name is always removed. When a file was already there, its own header says what was
    stored (raises CorruptShard if that header does not parse: the caller decides what to do).
    """
    for d in (path.parent.parent, path.parent):  # each level 0700 (parents=True would use 0777)
        d.mkdir(mode=0o700, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=SUFFIX)  # mode 0600
    try:
        with os.fdopen(fd, "wb") as f:
            for part in parts:
                f.write(part)
            f.flush()
            os.fsync(f.fileno())
        for _ in range(3):  # the winner's file may be evicted between our link and our look
            if _publish(tmp, path):
                return Written(sum(len(p) for p in parts), digest, True)
            try:
                return Written(path.stat().st_size, read_checksum(path), False)
            except FileNotFoundError:
                continue
        raise OSError(f"could not publish {path}: it kept appearing and vanishing")
    finally:
        try:
            os.unlink(tmp)
        except OSError:
            pass


def _publish(tmp: str, path: Path) -> bool:
    """Give the complete temp file its final name unless that name exists; True if it did."""
    try:
        os.link(tmp, path)
        return True
    except FileExistsError:
        return False
    except OSError:  # a filesystem without hard links: check, then rename (a narrow race remains)
        if path.exists():
            return False
        os.replace(tmp, path)
        return True


def _open(path: Path):
    """Open for reading without touching the access time where the system allows it (Linux,
    files we own): a shard's atime records its chunk's last restore (set explicitly by the
    vault), which an index rebuild reads back, so merely reading a shard must not change it."""
    flags = os.O_RDONLY | getattr(os, "O_NOATIME", 0)
    try:
        fd = os.open(path, flags)
    except PermissionError:  # O_NOATIME on a file we do not own
        fd = os.open(path, os.O_RDONLY)
    return os.fdopen(fd, "rb")


def read_checksum(path: Path) -> str:
    """The checksum a shard's header records (the header only; bytes are checked on use)."""
    with _open(path) as f:
        try:
            _, _, digest = _parse_header(_read_header(f))
        except (ValueError, UnicodeDecodeError) as e:
            raise CorruptShard(str(e)) from e
    return digest


def _read_header(f) -> bytes:
    """The 8-byte length and the JSON header it announces, refusing a length past the file's end."""
    head = f.read(8)
    n = int.from_bytes(head, "little")
    if len(head) < 8 or n > os.fstat(f.fileno()).st_size - 8:
        raise CorruptShard("header length past end of file")
    return head + f.read(n)


def _parse_header(buf: bytes) -> tuple[int, dict, str]:
    n = int.from_bytes(buf[:8], "little")
    if n > len(buf) - 8:
        raise CorruptShard("header length past end of file")
    header = json.loads(buf[8 : 8 + n].decode())
    meta = header.get("__metadata__")
    if not isinstance(meta, dict) or not str(meta.get("checksum", "")).startswith(_PREFIX):
        raise CorruptShard("no checksum in metadata")
    return n, header, meta["checksum"][len(_PREFIX):]


def read_metadata(path: Path, tensor: str) -> tuple[dict[str, str], str, np.ndarray]:
    """Header metadata, checksum and one (small) tensor, without reading or checking the rest:
    enough to index a shard. Bytes are checked when the shard is used."""
    with _open(path) as f:
        buf = _read_header(f)
        n = len(buf) - 8
        try:
            _, header, digest = _parse_header(buf)
            spec = header[tensor]
            start, stop = spec["data_offsets"]
            f.seek(8 + n + start)
            raw = f.read(stop - start)
            array = np.frombuffer(raw, dtype=_DTYPES[spec["dtype"]][1]).reshape(spec["shape"])
        except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
            raise CorruptShard(str(e)) from e
    meta = dict(header["__metadata__"])
    meta.pop("checksum")
    meta.pop("shard_version", None)
    return meta, digest, array


@dataclass
class Timing:
    """Where reading shards went (seconds, summed over files: threads overlap, so the read and
    checksum sums may exceed the wall time), for `bench speed --profile`."""
    read_s: float = 0.0  # readinto (file I/O)
    checksum_s: float = 0.0  # header parse + xxh3 of the buffer
    arrays_s: float = 0.0  # MLX arrays made from the buffers (host copies / uploads)
    files: int = 0
    tensors: int = 0
    nbytes: int = 0


@dataclass
class _Raw:
    """A shard file read and verified, before any MLX array is made from it."""
    buf: np.ndarray  # the whole file
    start: int  # offset of the data region
    header: dict
    digest: str
    times: tuple = field(default=(0.0, 0.0))


def _read_raw(path: Path) -> _Raw:
    """One readinto of the whole file into a fresh buffer, then its checksum. File I/O and
    xxhash only: safe on a worker thread."""
    t0 = time.perf_counter()
    with _open(path) as f:
        size = os.fstat(f.fileno()).st_size
        buf = np.empty(size, dtype=np.uint8)
        got = f.readinto(memoryview(buf))
    if got != size:
        raise CorruptShard(f"short read: {got} of {size} bytes")
    t1 = time.perf_counter()
    raw = _verified(buf)
    raw.times = (t1 - t0, time.perf_counter() - t1)
    return raw


def _verified(buf: np.ndarray) -> _Raw:
    """A whole shard's bytes checked against their checksum (CorruptShard if they do not parse or
    match). xxhash only: safe on a worker thread."""
    size = len(buf)
    view = memoryview(buf)
    try:
        n, header, digest = _parse_header(view[:8 + int.from_bytes(view[:8], "little")].tobytes()
                                          if size >= 8 else b"")
        text = bytes(view[8 : 8 + n]).replace((_PREFIX + digest).encode(), (_PREFIX + _ZERO).encode(), 1)
        h = xxhash.xxh3_64(text)
        h.update(view[8 + n :])
        if h.hexdigest() != digest:
            raise CorruptShard("checksum mismatch")
    except CorruptShard:
        raise
    except (ValueError, KeyError, TypeError, UnicodeDecodeError) as e:
        raise CorruptShard(str(e)) from e
    return _Raw(buf, 8 + n, header, digest)


def _shard(raw: _Raw) -> Shard:
    """MLX arrays from a verified buffer: each tensor a typed numpy view of the buffer, copied
    once into MLX (mx.array copies, so the buffer is free to go)."""
    header = dict(raw.header)
    try:
        meta = dict(header.pop("__metadata__"))
        meta.pop("checksum")
        meta.pop("shard_version", None)
        arrays = {}
        size = len(raw.buf) - raw.start
        for name, spec in header.items():
            mxd, npd = _DTYPES[spec["dtype"]]
            start, stop = spec["data_offsets"]
            item = np.dtype(npd).itemsize
            count = (stop - start) // item
            shape = [int(d) for d in spec["shape"]]
            if not 0 <= start <= stop <= size or count * item != stop - start or int(np.prod(shape)) != count:
                raise CorruptShard(f"tensor {name!r} does not fit the file")
            raw_view = np.frombuffer(raw.buf, dtype=npd, count=count, offset=raw.start + start).reshape(shape)
            a = mx.array(raw_view)
            arrays[name] = a.view(mxd) if mxd == mx.bfloat16 else a
    except CorruptShard:
        raise
    except (ValueError, KeyError, TypeError) as e:
        raise CorruptShard(str(e)) from e
    return Shard(arrays, meta, raw.digest, len(raw.buf))


def read_shard(path: Path) -> Shard:
    """Read and verify a shard; raises CorruptShard on any mismatch, OSError if unreadable."""
    return _shard(_read_raw(path))


def parse_shard(data: bytes) -> Shard:
    """read_shard's checks and arrays for bytes that are not a file yet (e.g. a remote object)."""
    return _shard(_verified(np.frombuffer(data, dtype=np.uint8)))


def read_shards(paths: list[Path], timing: Timing | None = None):
    """Read and verify shards, several files at once; yields (path, Shard or the exception its
    read raised) in the order given, each as soon as it and those before it are read. Stop
    iterating to stop using the results (reads already started finish and are dropped)."""
    if not paths:
        return
    timing = timing if timing is not None else Timing()
    with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(paths))) as pool:
        futures = [pool.submit(_read_raw, p) for p in paths]
        try:
            for path, fut in zip(paths, futures):
                try:
                    raw = fut.result()
                except (CorruptShard, OSError) as e:
                    yield path, e
                    continue
                timing.read_s += raw.times[0]
                timing.checksum_s += raw.times[1]
                t0 = time.perf_counter()
                try:
                    shard = _shard(raw)
                except CorruptShard as e:
                    yield path, e
                    continue
                timing.arrays_s += time.perf_counter() - t0
                timing.files += 1
                timing.tensors += len(shard.arrays)
                timing.nbytes += shard.nbytes
                yield path, shard
        finally:
            for fut in futures:
                fut.cancel()
