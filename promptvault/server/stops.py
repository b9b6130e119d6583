"""Stop strings on streamed text (OpenAI `stop`, Anthropic `stop_sequences`).

Text is released only once no stop string can still start inside it: the longest tail that is
a prefix of some stop string is held back until the next piece decides it. The stop string
itself is never sent, as with OpenAI's API.
"""


class StopText:
    def __init__(self, stops: list[str]):
        self.stops = [s for s in stops if s]
        self.text = ""  # everything generated so far
        self.sent = 0  # characters of `text` already released
        self.matched: str | None = None

    def feed(self, piece: str) -> tuple[str, bool]:
        """Add generated text; returns (text to release now, whether a stop string was hit)."""
        self.text += piece
        tail = self.text[self.sent:]
        hits = [(tail.find(s), s) for s in self.stops if s in tail]
        if hits:
            at, self.matched = min(hits)
            self.sent += at
            return tail[:at], True
        hold = max((k for s in self.stops for k in range(min(len(s) - 1, len(tail)), 0, -1)
                    if tail.endswith(s[:k])), default=0)
        out = tail[: len(tail) - hold]
        self.sent += len(out)
        return out, False

    def flush(self) -> str:
        """The held-back text, once generation ended without a stop string."""
        out, self.sent = self.text[self.sent:], len(self.text)
        return out
