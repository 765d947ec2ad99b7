"""Incremental, UTF-8 safe detokenization.

Byte-level tokenizers split characters across tokens: decoding a token alone can end in half a character,
which `tokenizers` renders as U+FFFD. Like TGI and vLLM we decode a small window of recent tokens twice (up to
the last emitted token, and up to the new one) and emit only the difference, and only once it no longer
ends in U+FFFD. Decoding a window (not one token) also keeps word-boundary spaces right for tokenizers whose
decoders depend on the previous token. Bytes that never form a character are dropped, never sent as U+FFFD.
"""

from __future__ import annotations

from collections.abc import Sequence

from tokenizers import Tokenizer

REPLACEMENT = "\ufffd"
# Prompt tokens that seed the window, so that the first generated token decodes in context.
CONTEXT_TOKENS = 5


class IncrementalDetokenizer:
    __slots__ = ("ids", "prefix_offset", "read_offset", "tokenizer")

    def __init__(self, tokenizer: Tokenizer, prompt_ids: Sequence[int] = ()) -> None:
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0  # start of the decoding window
        self.read_offset = len(self.ids)  # tokens before this are already emitted

    def add(self, token: int) -> str:
        """Adds one token; returns the new complete text (possibly empty while a character is incomplete)."""
        self.ids.append(token)
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=False)
        if len(text) > len(prefix) and not text.endswith(REPLACEMENT):
            piece = text[len(prefix) :]
            self.prefix_offset = self.read_offset
            self.read_offset = len(self.ids)
            # Keep the list short: only the window is ever decoded again.
            if self.prefix_offset > 64:
                del self.ids[: self.prefix_offset]
                self.read_offset -= self.prefix_offset
                self.prefix_offset = 0
            return piece.replace(REPLACEMENT, "")
        if len(self.ids) - self.read_offset > 8:
            # More than two characters' worth of bytes that never decode: invalid bytes. Drop them.
            self.prefix_offset = self.read_offset = len(self.ids)
        return ""

    def flush(self) -> str:
        """At the end of generation: the complete characters still held back (one token may end a character and
        begin the next; the next never comes); bytes that never formed a character are dropped."""
        if self.read_offset >= len(self.ids):
            return ""
        decode = self.tokenizer.decode
        prefix = decode(self.ids[self.prefix_offset : self.read_offset], skip_special_tokens=False)
        text = decode(self.ids[self.prefix_offset :], skip_special_tokens=False)
        self.prefix_offset = self.read_offset = len(self.ids)
        return text[len(prefix) :].replace(REPLACEMENT, "") if len(text) > len(prefix) else ""
