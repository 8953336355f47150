"""Regular expressions in RE2, a linear-time engine: no pattern and no text can stall the event loop.

Every moderation pattern (regex rules, PII detectors and their tails) is a
``LinearPattern``. google-re2's Python wrapper is general and costs about
4 microseconds a call, more than a streamed chunk's whole moderation round;
most calls here are on short slices, so they go straight to the compiled
RE2 object underneath (UTF-8 bytes in, byte offsets out, converted back to
characters; for ASCII they are the same), about half a microsecond. A
google-re2 without that object takes the wrapper: the same answers
(``test_linear_regex_fast_path_agrees``).

Results are span lists: ``spans[g]`` is group ``g``'s ``(start, end)`` in
characters, ``(-1, -1)`` when it took no part.
"""

from __future__ import annotations

import codecs

import re2

Spans = list[tuple[int, int]]

_UNANCHORED = getattr(getattr(re2, "_Anchor", None), "UNANCHORED", None)
_ANCHOR_START = getattr(getattr(re2, "_Anchor", None), "ANCHOR_START", None)
_NULL = (-1, -1)
codecs.register_error("sluice-fffd", lambda exc: (b"\xef\xbf\xbd" * (exc.end - exc.start), exc.end))


def options(*, case_sensitive: bool = True, dot_nl: bool = False) -> re2.Options:
    """RE2 options for moderation: no logging to stderr, a generous but bounded memory budget."""
    opts = re2.Options()
    opts.case_sensitive = case_sensitive
    opts.dot_nl = dot_nl
    opts.log_errors = False
    opts.max_mem = 64 << 20
    return opts


def error_text(exc: Exception) -> str:
    """RE2's message for a pattern it cannot compile (it comes as bytes)."""
    reason = exc.args[0] if exc.args else exc
    return reason.decode(errors="replace") if isinstance(reason, bytes) else str(reason)


class LinearPattern:
    """A compiled RE2 pattern; raises ``re2.error`` if RE2 cannot compile it."""

    __slots__ = ("_raw", "_wrapped", "groups", "options", "pattern")

    def __init__(self, pattern: str, opts: re2.Options):
        self.pattern = pattern
        self.options = opts
        self._wrapped = re2.compile(pattern, opts)
        self.groups = self._wrapped.groups
        raw = getattr(self._wrapped, "_regexp", None)
        self._raw = raw if raw is not None and _UNANCHORED is not None and hasattr(raw, "Match") else None

    def search(self, text: str, pos: int = 0) -> Spans | None:
        """The leftmost match starting at ``pos`` or later (text before ``pos`` is context for ``\\b``)."""
        return self._run(text, pos, anchored=False)

    def match(self, text: str, pos: int = 0) -> Spans | None:
        """A match starting exactly at ``pos``."""
        return self._run(text, pos, anchored=True)

    def _run(self, text: str, pos: int, *, anchored: bool) -> Spans | None:
        if self._raw is not None:
            anchor = _ANCHOR_START if anchored else _UNANCHORED
            if text.isascii():
                data = text.encode("ascii")
                spans = self._raw.Match(anchor, data, pos, len(data))
                return None if spans[0] == _NULL else list(spans)
            # UTF-8: byte offsets in and out, converted at the (few) boundaries that matter.
            # A lone surrogate (JSON can carry one) reads as U+FFFD, one character for one.
            data = text.encode("utf-8", "sluice-fffd")
            spans = self._raw.Match(anchor, data, len(text[:pos].encode("utf-8", "sluice-fffd")), len(data))
            if spans[0] == _NULL:
                return None
            return [span if span == _NULL else (len(data[: span[0]].decode()), len(data[: span[1]].decode())) for span in spans]
        if not text.isascii():
            text = text.encode("utf-8", "sluice-fffd").decode("utf-8")
        found = (self._wrapped.match if anchored else self._wrapped.search)(text, pos)
        if found is None:
            return None
        return [found.span(group) for group in range(self.groups + 1)]


def alternatives(patterns: list[LinearPattern]) -> LinearPattern:
    """One pattern matching wherever any of ``patterns`` does (the first one's options)."""
    return LinearPattern("|".join(f"(?:{p.pattern})" for p in patterns), patterns[0].options)
