"""A background thread that publishes warm's shard files while the next prefill step runs.

Why only file I/O here: MLX work from a background thread can abort (NOTES §2), so the caller
turns arrays into bytes (shards.encode_shard) and this thread only writes, fsyncs and publishes
them (shards.publish_shard). Index rows stay with the caller too (its SQLite connection belongs to
its thread): it collects the results, in submission order, and indexes a chunk only after its
file is published.

The first write error stops the writer: jobs queued after it are returned unwritten, so the files
published are a prefix of the submitted chunks (each one's parent is there) and the caller raises
one error. A damaged file already under a key (CorruptShard) is not an error here: the result says
so and the caller, which owns the index, quarantines it and publishes again.
"""

from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from promptvault.vault.shards import CorruptShard, Written, publish_shard


@dataclass
class Result:
    job: Any  # what the caller submitted with the bytes
    written: Written | None  # None: not published (error, or skipped after an earlier error)
    error: Exception | None  # OSError, or CorruptShard for a damaged file already at the path
    seconds: float  # time spent writing this file (0 when skipped)


class ShardWriter:
    """One writer thread; at most `max_pending` encoded shards wait for it (memory bound: submit
    blocks while the queue is full)."""

    def __init__(self, max_pending: int = 16):
        self._jobs: queue.Queue = queue.Queue(maxsize=max_pending)
        self._results: queue.Queue = queue.Queue()
        self._submitted = self._collected = 0
        self._failed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="promptvault-shard-writer", daemon=True)
        self._thread.start()

    def submit(self, job: Any, path: Path, parts: list[bytes], digest: str) -> None:
        self._jobs.put((job, path, parts, digest))
        self._submitted += 1

    def ready(self) -> list[Result]:
        """Results finished so far, in submission order, without waiting."""
        out = []
        while True:
            try:
                out.append(self._results.get_nowait())
            except queue.Empty:
                break
        self._collected += len(out)
        return out

    def wait(self) -> list[Result]:
        """Every result not yet collected, waiting for the writes still under way."""
        out = []
        while self._collected + len(out) < self._submitted:
            out.append(self._results.get())
        self._collected += len(out)
        return out

    def stop(self) -> list[Result]:
        """Skip the jobs not started, finish the one under way, end the thread; the results not
        yet collected (skipped ones have written=None, error=None)."""
        self._failed.set()
        out = self.wait()
        self._jobs.put(None)
        self._thread.join()
        return out

    def _run(self) -> None:
        while True:
            item = self._jobs.get()
            if item is None:
                return
            job, path, parts, digest = item
            if self._failed.is_set():
                self._results.put(Result(job, None, None, 0.0))
                continue
            t0 = time.perf_counter()
            try:
                written, error = publish_shard(path, parts, digest), None
            except CorruptShard as e:
                written, error = None, e
            except OSError as e:  # disk full, file too large, I/O error: nothing more is written
                written, error = None, e
                self._failed.set()
            except BaseException as e:  # a bug must reach the caller, not kill the thread silently
                written, error = None, e
                self._failed.set()
            self._results.put(Result(job, written, error, time.perf_counter() - t0))
