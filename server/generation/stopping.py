"""Stop sequences found in the text, even when they span tokens; their text is never emitted.

Text that could be the beginning of a stop sequence is held back until the next token decides: either the
stop sequence completes (generation ends, the held text is dropped) or it cannot (the text is released).
"""

from __future__ import annotations

from collections.abc import Sequence


class StopMatcher:
    __slots__ = ("_held", "_longest", "stops")

    def __init__(self, stops: Sequence[str]) -> None:
        self.stops = tuple(s for s in stops if s)
        self._held = ""
        self._longest = max((len(s) for s in self.stops), default=0)

    def push(self, piece: str) -> tuple[str, bool]:
        """Adds newly decoded text; returns (text safe to emit now, whether a stop sequence was found)."""
        if not self.stops:
            return piece, False
        text = self._held + piece
        found = -1
        for stop in self.stops:
            # Only the held text and the new piece can hold a new match; the held text held none on its own.
            i = text.find(stop)
            if i >= 0 and (found < 0 or i < found):
                found = i
        if found >= 0:
            self._held = ""
            return text[:found], True
        keep = self._partial(text)
        self._held = text[len(text) - keep :] if keep else ""
        return text[: len(text) - keep], False

    def flush(self) -> str:
        """At the end of generation: the held text was not a stop sequence after all."""
        text, self._held = self._held, ""
        return text

    def _partial(self, text: str) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of some stop sequence."""
        for k in range(min(len(text), self._longest - 1), 0, -1):
            suffix = text[-k:]
            if any(s.startswith(suffix) for s in self.stops):
                return k
        return 0
