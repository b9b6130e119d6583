"""A prefill progress line on stderr: tokens done, tokens/s and time left, redrawn per step.

Only for a person at a terminal: when stderr is not a TTY (pipes, logs, --json runs) it draws
nothing. `delay_s` keeps short prefills quiet: the line appears only once a prefill has run
that long and is not about to finish, so a run that restores almost everything prints nothing.
"""

import sys
import time

_WIDTH = 24


def _duration(seconds: float) -> str:
    seconds = int(round(seconds))
    return f"{seconds // 60}m{seconds % 60:02d}s" if seconds >= 60 else f"{seconds}s"


class Progress:
    def __init__(self, label: str, *, delay_s: float = 0.0, enabled: bool = True, stream=None):
        self.label = label
        self.delay_s = delay_s
        self.stream = stream or sys.stderr
        self.enabled = enabled and self.stream.isatty()
        self.start = None  # time and tokens of the first report: the rate counts what follows
        self.first_done = 0
        self.drawn = False

    def __call__(self, done: int, total: int) -> None:
        """Report `done` of `total` tokens (a prefill step just finished)."""
        if not self.enabled:
            return
        now = time.perf_counter()
        if self.start is None:
            self.start, self.first_done = now, done
            if not self.delay_s:
                self._draw(done, total, now)
            return
        if not self.drawn and (now - self.start < self.delay_s or done >= total):
            return
        self._draw(done, total, now)

    def _draw(self, done: int, total: int, now: float) -> None:
        elapsed = now - self.start
        rate = (done - self.first_done) / elapsed if elapsed > 0 else 0.0
        filled = int(_WIDTH * done / total) if total else _WIDTH
        left = f", {_duration((total - done) / rate)} left" if rate > 0 and done < total else ""
        speed = f", {rate:,.0f} tok/s" if rate > 0 else ""
        line = f"{self.label} [{'#' * filled}{'-' * (_WIDTH - filled)}] {done:,}/{total:,} tokens{speed}{left}"
        self.stream.write("\r" + line + "\033[K")
        self.stream.flush()
        self.drawn = True

    def close(self) -> None:
        """End the line (if one was drawn), so the next output starts on a fresh line."""
        if self.drawn:
            self.stream.write("\r\033[K")
            self.stream.flush()
            self.drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()
