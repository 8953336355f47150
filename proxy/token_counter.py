"""Counting an answer's tokens as it streams, without keeping its text.

tiktoken splits text into pieces with its encoding's regular expression and
encodes each piece on its own, so a text's token count is the sum over its
pieces. ``StreamingTokenCounter`` keeps only the tail whose pieces may still
change when more text arrives (the last few pieces) and encodes everything
before it once; its memory is bounded by that tail, not by the answer.

Invariant (checked by a property test over random texts and chunkings): for
any split of a text into ``add`` calls, ``total()`` equals ``count_text`` of
the whole text.
"""

from __future__ import annotations

from collections.abc import Iterable

import regex
import tiktoken

from .tokens import SEGMENT_CHARS, _count, encoding_for_model

# Pieces at the end of the tail that more text could still merge or split
# (a contraction, a digit group, a whitespace run that gives its last space
# to the next word). Everything before them is settled.
_UNSETTLED_PIECES = 3
# The tail is settled only once it is this long: a chunk costs one append, and an
# answer shorter than this is never encoded unless the provider reports no usage.
_SETTLE_AT_CHARS = 8192

_patterns: dict[str, regex.Pattern[str]] = {}


def _pieces_pattern(encoding: tiktoken.Encoding) -> regex.Pattern[str]:
    pattern = _patterns.get(encoding.name)
    if pattern is None:
        pattern = _patterns[encoding.name] = regex.compile(encoding._pat_str)  # noqa: SLF001  tiktoken's own split
    return pattern


class StreamingTokenCounter:
    """Tokens of one text that arrives in pieces (one field of one choice)."""

    __slots__ = ("_encoding", "_next_settle", "_pattern", "_settled", "_tail")

    def __init__(self, model: str):
        self._encoding = encoding_for_model(model)
        self._pattern = _pieces_pattern(self._encoding)
        self._settled = 0  # tokens of the text before the tail
        self._tail = ""
        self._next_settle = _SETTLE_AT_CHARS  # doubles while a piece runs on (CJK has no spaces)

    def add(self, text: str) -> None:
        self._tail += text
        if len(self._tail) >= self._next_settle:
            self._settle()

    def _settle(self) -> None:
        tail = self._tail
        starts = [match.start() for match in self._pattern.finditer(tail)]
        cut = 0
        # A cut after whitespace is not certain: alone, the text before it would end in a
        # whitespace piece that, followed by a word, gives its last space to that word.
        for start in reversed(starts[1 : len(starts) - _UNSETTLED_PIECES + 1]):
            if not tail[start - 1].isspace():
                cut = start
                break
        if not cut and len(tail) > 2 * SEGMENT_CHARS:
            cut = len(tail) // 2  # one giant piece: counted in segments, as ``count_text`` does
        if not cut:
            self._next_settle = 2 * len(tail)
            return
        self._settled += _count(self._encoding, tail[:cut])
        self._tail = tail[cut:]
        self._next_settle = max(_SETTLE_AT_CHARS, 2 * len(self._tail))

    def total(self) -> int:
        """The exact count of everything added so far."""
        return self._settled + (_count(self._encoding, self._tail) if self._tail else 0)

    def bound(self) -> int:
        """An upper bound of ``total()`` that costs next to nothing: a token is at least one UTF-8 byte.

        Tight right after ``settle_now``, when the tail is a few pieces.
        """
        tail = self._tail
        return self._settled + (len(tail) if tail.isascii() else 4 * len(tail))

    def fit(self, text: str, budget: int) -> tuple[str, int]:
        """The longest start of ``text`` that keeps ``total()`` within ``budget`` once added, and that total."""
        encoding, tail = self._encoding, self._tail
        room = budget - self._settled
        whole = _count(encoding, tail + text)
        if whole <= room:
            return text, self._settled + whole
        low, high = 0, len(text)  # text[:low] fits, text[:high] does not
        fits = _count(encoding, tail)
        while high - low > 1:
            middle = (low + high) // 2
            count = _count(encoding, tail + text[:middle])
            if count <= room:
                low, fits = middle, count
            else:
                high = middle
        return text[:low], self._settled + fits

    def settle_now(self) -> None:
        """Encode what is settled now (near an answer cap, where ``total`` is asked per chunk)."""
        self._settle()


class AnswerCap:
    """The gateway's answer cap over the text fields of one answer (a choice, a message, a response).

    ``room`` is what the cap surely still allows beyond an upper bound of the
    answer's tokens. A chunk costs at most one token per UTF-8 byte, so most
    chunks only subtract from it; when it runs out, the answer's tokens are
    counted exactly and the room is set again from them. So the cap costs a
    subtraction per chunk until the answer nears it.
    """

    __slots__ = ("cap", "room")

    def __init__(self, cap: int):
        self.cap = cap
        self.room = cap

    def fit(self, counters: Iterable[StreamingTokenCounter], counter: StreamingTokenCounter, text: str) -> str:
        """``text``, or as much of it as the cap leaves; ``counters`` are all the answer's (``counter`` among them)."""
        cost = len(text) if text.isascii() else 4 * len(text)
        if cost <= self.room:
            self.room -= cost
            return text
        counters = list(counters)
        for each in counters:
            each.settle_now()
        others = sum(each.total() for each in counters if each is not counter)
        fitted, total = counter.fit(text, max(0, self.cap - others))
        self.room = self.cap - others - total
        return fitted
