"""Incremental detokenisation: new text per token in O(1) (a short window is decoded, not the whole answer)."""

from __future__ import annotations

from typing import Any


class IncrementalText:
    """Text of a growing token list, emitted piece by piece as it becomes printable.

    ``(prefix, read)``: the text of tokens[prefix:read] was already emitted; decoding from ``prefix`` gives the
    new piece its context, and an incomplete UTF-8 sequence (U+FFFD at the end) waits for more tokens.
    """

    def __init__(self, tokenizer: Any) -> None:
        self.tok = tokenizer
        self.tokens: list[int] = []
        self.sent = ""
        self._prefix = 0
        self._read = 0

    def push(self, token: int) -> str:
        """Add one token; return the newly printable text ("" while a character is incomplete)."""
        self.tokens.append(token)
        before = str(self.tok.decode(self.tokens[self._prefix : self._read], skip_special_tokens=True))
        now = str(self.tok.decode(self.tokens[self._prefix :], skip_special_tokens=True))
        if len(now) > len(before) and not now.endswith("\ufffd") and now.startswith(before):
            piece = now[len(before) :]
            self.sent += piece
            self._prefix, self._read = self._read, len(self.tokens)
            return piece
        return ""

    def final(self, text: str) -> str:
        """The part of the complete answer ``text`` not emitted yet (and mark it emitted)."""
        tail = text[len(self.sent) :] if text.startswith(self.sent) else ""
        self.sent = text
        return tail
