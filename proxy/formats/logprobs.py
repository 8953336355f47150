"""Keeping a text field's logprob entries in step with what its window releases.

A logprob entry spells out its token (``token``, ``bytes``) and the tokens
the model nearly chose (``top_logprobs``). Sent as the provider sent them,
they would reveal the text the window holds back, redacts or blocks, and
they would arrive with a chunk whose text is not theirs. So each entry is
held until the window has released the original text it covers, and then:

* sent, if that text went out unchanged;
* dropped, if any of it was redacted, blocked or never released;
* its alternatives are kept only if each, read alone, triggers no rule.

Positions are counted in original characters, as the window counts them. An
entry whose token is part of one character (a byte of an emoji) covers that
whole character. A provider whose entries do not add up to the text they
came with cannot be aligned: that field's entries are dropped from then on,
never guessed.

Pure: plain values in and out.
"""

from __future__ import annotations

import codecs
from collections import deque
from collections.abc import Callable
from typing import Any

# An entry: the provider's dict; its text is read with ``token_of``.
Entry = Any


def _bytes_of(entry: Any) -> bytes | None:
    raw = entry.get("bytes") if isinstance(entry, dict) else None
    if isinstance(raw, list) and all(isinstance(b, int) and 0 <= b < 256 for b in raw):
        return bytes(raw)
    return None


class LogprobsAligner:
    """One field's pending entries, by the span of original text each covers."""

    __slots__ = ("_changed", "_decoder", "_pending", "_pos", "broken")

    def __init__(self, start: int):
        self._pos = start  # where the next entry's text begins
        self._pending: deque[tuple[int, int, Entry]] = deque()
        self._changed: list[tuple[int, int]] = []  # spans released changed (or cut), still overlapping pending entries
        self._decoder = codecs.getincrementaldecoder("utf-8")("replace")
        self.broken = False

    def push(self, entries: list[Entry], text: str, token_of: Callable[[Entry], str | None]) -> None:
        """Entries that came with ``text`` (this chunk's original text of the field)."""
        if self.broken:
            return
        covered = 0
        for entry in entries:
            raw = _bytes_of(entry)
            if raw is not None:
                chars = len(self._decoder.decode(raw))
                partial = bool(self._decoder.getstate()[0])
            else:
                token = token_of(entry)
                if not isinstance(token, str):
                    self.broken = True
                    break
                chars, partial = len(token), False
            start = self._pos
            self._pos += chars
            covered += chars
            self._pending.append((start, self._pos + (1 if partial else 0), entry))
        if self.broken or covered != len(text) and not self._decoder.getstate()[0]:
            # The entries do not spell this chunk's text: their places are unknown from here on.
            self.broken = True
            self._pending.clear()

    def release(self, start: int, end: int, original: str, sent: str) -> list[Entry]:
        """The window released original ``[start, end)`` (``original``) as ``sent``: the entries now due."""
        if original != sent:
            prefix = _common_prefix(original, sent)
            suffix = _common_prefix(original[prefix:][::-1], sent[prefix:][::-1])
            self._changed.append((start + prefix, end - suffix))
        due: list[Entry] = []
        pending = self._pending
        while pending and pending[0][1] <= end:
            lo, hi, entry = pending.popleft()
            if not any(c_lo < hi and lo < c_hi for c_lo, c_hi in self._changed):
                due.append(entry)
        if self._changed:
            first = pending[0][0] if pending else end
            self._changed = [span for span in self._changed if span[1] > first]
        return due

    def cut(self) -> None:
        """The field ended early (a block, the answer cap): what is pending never goes out."""
        self._pending.clear()


def _common_prefix(a: str, b: str) -> int:
    n = min(len(a), len(b))
    i = 0
    while i < n and a[i] == b[i]:
        i += 1
    return i


class AlternativesFilter:
    """Keeps a token's alternatives only where the rules pass them, read alone (cached per stream)."""

    __slots__ = ("_clean", "_verdicts")

    def __init__(self, clean: Callable[[str], bool]):
        self._clean = clean
        self._verdicts: dict[str, bool] = {}

    def passes(self, token: Any) -> bool:
        if not isinstance(token, str):
            return False
        verdict = self._verdicts.get(token)
        if verdict is None:
            verdict = self._verdicts[token] = self._clean(token)
        return verdict
