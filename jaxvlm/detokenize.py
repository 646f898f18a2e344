"""Incremental detokenization: the text of each new token from a bounded window, never the whole output again.

A token's text depends on its left neighbour (SentencePiece drops the leading space of the first token it is
asked to decode, and one character may span several byte tokens), so each step decodes a short window twice:
from `prefix` to `read` (text already given out) and from `prefix` to the end. The difference is the new
text; once it is complete (no half character at its end) the window moves on. This is the scheme of
text-generation-inference and vLLM, written for our tokenizer wrapper.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence

_INCOMPLETE = "\ufffd"  # what a tokenizer gives for a character whose bytes have not all arrived


class IncrementalDetokenizer:
    def __init__(self, decode: Callable[[Sequence[int]], str]):
        self._decode = decode
        self._prefix = 0  # first token of the window (context for the tokens after it)
        self._read = 0  # tokens whose text has been given out

    def step(self, ids: Sequence[int]) -> str:
        """New text of `ids` (the whole output so far) since the last call; "" while a character is unfinished."""
        old = self._decode(ids[self._prefix : self._read])
        new = self._decode(ids[self._prefix :])
        if len(new) <= len(old) or new.endswith(_INCOMPLETE):
            return ""
        self._prefix, self._read = self._read, len(ids)
        return new[len(old) :]


def tail_text(decode: Callable[[Sequence[int]], str], ids: Sequence[int], chars: int) -> str:
    """Text of the last tokens of `ids`, enough to hold any `chars`-character string that ends there.

    A character is at most 4 byte tokens, and one more token keeps the window's first-token quirks (a dropped
    leading space) out of the part that matters."""
    return decode(ids[-(4 * chars + 1) :])
