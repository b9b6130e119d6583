"""The one thread that owns MLX: it loads the model, opens the vault and runs every generation.

MLX streams and the vault's SQLite connection belong to the thread that made them, so the HTTP
side never touches either: it hands work to this thread through a bounded queue (`submit` raises
`Busy` when it is full, which the app answers with 503) and gets events back on its own asyncio
loop. A generation sends ("start", cached prompt tokens) once the prefix is restored, ("text",
str) pieces, then ("done", Finished) as soon as the answer is complete.

The answered request's cache is kept live for the next turn, and its store in the vault waits
until the queue has been empty for `STORE_IDLE_S` (a store costs an encode of the new blocks: a
client that sends the next request right after an answer must not wait for it), or until
`MAX_PENDING_STORES` answers wait (their caches are held in memory meanwhile; a conversation's
next turn replaces its previous one, so under a steady stream of turns this counts conversations). A cache endpoint
and a graceful stop run every pending store first; kill -9 loses the pending ones (the vault
stays consistent: a store is a chunk's file, then its row).

A request whose client went away sets `cancelled`: the prefill (between steps) or the decoding
loop (between tokens) stops and nothing is kept or stored.
"""

from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Callable

import mlx.core as mx
from mlx_lm.generate import stream_generate
from mlx_lm.sample_utils import make_sampler

from promptvault.generate import PREFILL_STEP
from promptvault.server import prefix_cache
from promptvault.server.stops import StopText
from promptvault.vault.live import LiveCaches

log = logging.getLogger(__name__)

STORE_IDLE_S = 0.5  # an idle queue this long means no request is about to wait for a store
MAX_PENDING_STORES = 4  # beyond this many answers waiting, the oldest is stored before the next request


class Busy(Exception):
    """The request queue is full."""


class _Cancelled(Exception):
    pass


@dataclass
class Generation:
    """One request, validated and tokenized: what the MLX thread needs to answer it."""

    tokens: list[int]
    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    cancelled: threading.Event = field(default_factory=threading.Event)


@dataclass
class Finished:
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int  # prompt tokens restored from the vault instead of prefilled
    finish_reason: str  # "stop" (end of sequence or a stop string) or "length"
    stop_sequence: str | None


class Worker:
    """Owns the model and the vault; runs jobs one at a time, in arrival order."""

    def __init__(self, open_model: Callable, open_vault: Callable, max_queue: int, *,
                 live_size: int = 10, live_bytes: int | None = None):
        self._open_model, self._open_vault = open_model, open_vault
        self._live_limits = {"max_size": live_size, "max_bytes": live_bytes}
        self._pending: deque = deque()  # (cache, tokens) of answers not yet stored, oldest first
        self._jobs: queue.Queue = queue.Queue(maxsize=max_queue)
        self._ready = threading.Event()
        self._error: BaseException | None = None
        self.lm = None
        self.vault = None
        self.live: LiveCaches | None = None
        self._thread = threading.Thread(target=self._run, name="promptvault-mlx", daemon=True)

    def start(self) -> None:
        """Load the model and open the vault on the worker thread; re-raise what failed there."""
        self._thread.start()
        self._ready.wait()
        if self._error is not None:
            raise self._error

    def stop(self) -> None:
        """After the queued jobs (and the store of the last answer): a graceful shutdown loses no
        stored block. (kill -9 may; the vault stays consistent either way.)"""
        self._jobs.put(None)
        self._thread.join()

    def alive(self) -> bool:
        return self._thread.is_alive()

    def queued(self) -> int:
        return self._jobs.qsize()

    def call(self, fn: Callable, emit: Callable | None = None) -> None:
        """Queue `fn(emit)` for the MLX thread (Busy when the queue is full)."""
        try:
            self._jobs.put_nowait((fn, emit))
        except queue.Full:
            raise Busy(f"the server is busy: {self._jobs.maxsize} requests are already queued") from None

    async def run(self, fn: Callable):
        """`fn()` on the MLX thread, awaited (for the cache endpoints)."""
        loop = asyncio.get_running_loop()
        done = loop.create_future()

        def job(_emit):
            try:
                self._store_pending()  # the vault as every answered request left it
                result = fn()
            except Exception as e:  # noqa: BLE001 - handed to the awaiting request
                loop.call_soon_threadsafe(_settle, done, None, e)
            else:
                loop.call_soon_threadsafe(_settle, done, result, None)

        self.call(job)
        return await done

    def generate(self, gen: Generation, events: asyncio.Queue) -> None:
        """Queue a generation whose events go to `events` (on the caller's loop)."""
        loop = asyncio.get_running_loop()

        def emit(kind, value):
            try:
                loop.call_soon_threadsafe(events.put_nowait, (kind, value))
            except RuntimeError:  # the loop is gone (shutdown): nobody is listening
                pass

        self.call(lambda e: self._generate(gen, e), emit)

    # on the MLX thread

    def _run(self) -> None:
        try:
            self.lm = self._open_model()
            self.vault = self._open_vault()
            self.live = LiveCaches(self.vault, **self._live_limits)
        except BaseException as e:  # noqa: BLE001 - re-raised by start() on the main thread
            self._error = e
            self._ready.set()
            return
        self._ready.set()
        while True:
            try:
                item = self._jobs.get(timeout=STORE_IDLE_S) if self._pending else self._jobs.get()
            except queue.Empty:
                self._store_pending(1)
                continue
            if item is None:
                break
            if len(self._pending) > MAX_PENDING_STORES:
                self._store_pending(len(self._pending) - MAX_PENDING_STORES)
            fn, emit = item
            try:
                fn(emit)
            except Exception as e:  # noqa: BLE001 - one request failed; the server goes on
                log.exception("request failed")
                if emit is not None:
                    emit("error", f"{type(e).__name__}: {e}")
        self._store_pending()
        if self.vault is not None:
            self.vault.close()

    def _store_pending(self, count: int | None = None) -> None:
        """Store the oldest `count` pending answers (all by default) in the vault."""
        for _ in range(len(self._pending) if count is None else min(count, len(self._pending))):
            cache, tokens = self._pending.popleft()
            log.info("storing %d tokens", len(tokens))
            t0 = time.perf_counter()
            try:
                written = prefix_cache.store(self.vault, self.lm, cache, tokens)
            except Exception as e:  # noqa: BLE001 - a full or read-only disk: the answers stand, the server goes on
                log.warning("the new blocks were not stored: %s: %s", type(e).__name__, e)
                continue
            log.info("stored %d new chunks of %d tokens in %.2f s", written, len(tokens), time.perf_counter() - t0)

    def _generate(self, gen: Generation, emit: Callable) -> None:
        if gen.cancelled.is_set():
            return
        start = time.perf_counter()
        fetched = self.live.fetch(self.lm, gen.tokens)
        cache, cached = fetched.cache, fetched.cached
        emit("start", cached)
        if gen.seed is not None:
            mx.random.seed(gen.seed)
        stops = StopText(gen.stop)
        answer: list[int] = []
        finish, ttft = "length", 0.0

        def progress(_done, _total):
            if gen.cancelled.is_set():
                raise _Cancelled

        try:
            for response in stream_generate(
                self.lm.model, self.lm.tokenizer, mx.array(gen.tokens[cached:]), max_tokens=gen.max_tokens,
                sampler=make_sampler(temp=gen.temperature, top_p=gen.top_p), prompt_cache=cache,
                prefill_step_size=PREFILL_STEP, prompt_progress_callback=progress,
            ):
                if gen.cancelled.is_set():
                    raise _Cancelled
                if not answer:
                    ttft = time.perf_counter() - start
                answer.append(int(response.token))
                text, hit = stops.feed(response.text)
                if text:
                    emit("text", text)
                if hit:
                    finish = "stop"
                    break
                if response.finish_reason is not None:
                    finish = response.finish_reason
        except _Cancelled:
            log.info("client went away: generation stopped after %d tokens, nothing stored", len(answer))
            return
        if finish != "stop" or stops.matched is None:
            rest = stops.flush()
            if rest:
                emit("text", rest)
        emit("done", Finished(len(gen.tokens), len(answer), cached, finish, stops.matched))
        held = prefix_cache.held_tokens(cache, gen.tokens, answer)
        self.live.keep(self.lm, cache, held)  # no copy: the request is over
        self._pending = prefix_cache.queue_store(self._pending, cache, held)
        log.info("reused %d of %d prompt tokens (%s), first token after %.2f s", cached, len(gen.tokens),
                 fetched.source, ttft)


def _settle(future: asyncio.Future, result, error) -> None:
    if future.done():
        return
    if error is not None:
        future.set_exception(error)
    else:
        future.set_result(result)
