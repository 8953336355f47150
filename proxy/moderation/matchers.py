"""Finding each rule's matches in the normalised view, a stream at a time.

A matcher is compiled once per config load; ``scanner()`` gives the state one
stream needs. Each round the window hands every scanner the views built so
far (``t`` view characters, or all of them when ``final``) and gets back:

* the rule's *candidates* that are now decided, as view spans ``(start, end)``,
  each reported once; and
* its *frontier*: every candidate starting before it has been reported, so
  text before it can be released as far as this rule is concerned.

A candidate is decided when no text that may still arrive can change it. That
is what makes a stream's result independent of how it was chunked.

Terms (``TermsMatcher``) are found with one Aho-Corasick automaton per rule, so
the cost per character does not grow with the size of the list. A term
occurrence is decided once the character after it is known (``match: word``
checks it) and the frontier is the earliest place where the text seen so far
is still the beginning of some term.

Patterns (``PatternMatcher``: ``regex`` rules and the PII detectors) define a
match at view position ``s`` as ``pattern.match`` tried at ``s`` with at most
``max_len + RIGHT_CONTEXT`` characters of text from ``s`` on, accepted only
when it is 1 to ``max_len`` characters long. That is decided once
``s + max_len + RIGHT_CONTEXT`` characters exist, or earlier when a ``tail``
pattern says so (see ``pii``). Lookarounds may look at most ``LEFT_CONTEXT``
characters before a match and ``RIGHT_CONTEXT`` after it; beyond that the
result could depend on where chunks were split.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable
from typing import Literal

import ahocorasick

from .normalize import LEET, Normalizer, is_word_char

LEFT_CONTEXT = 16
RIGHT_CONTEXT = 2

ViewKind = Literal["plain", "folded", "leet_plain", "leet_folded"]
Span = tuple[int, int]


class Views:
    """The view texts of one round, leetspeak forms made only if a rule reads them."""

    __slots__ = ("_leet_folded", "_leet_plain", "base", "folded", "plain")

    def __init__(self, normalizer: Normalizer):
        self.base = normalizer.view_base
        self.plain = normalizer.plain
        self.folded = normalizer.folded
        self._leet_plain: str | None = None
        self._leet_folded: str | None = None

    def text(self, kind: ViewKind) -> str:
        if kind == "folded":
            return self.folded
        if kind == "plain":
            return self.plain
        if kind == "leet_folded":
            if self._leet_folded is None:
                self._leet_folded = self.folded.translate(LEET)
            return self._leet_folded
        if self._leet_plain is None:
            self._leet_plain = self.plain.translate(LEET)
        return self._leet_plain


def regex_width(pattern: re.Pattern[str]) -> tuple[int, int]:
    """The shortest and longest text ``pattern`` can match (huge when unbounded).

    Only CPython's own regex parser knows this, so it is asked directly.
    """
    parsed = re._parser.parse(pattern.pattern, pattern.flags)  # type: ignore[attr-defined]
    return parsed.getwidth()


class TermsMatcher:
    """A list of terms (already in view form) matched in one pass by an Aho-Corasick automaton."""

    def __init__(self, terms: Iterable[str], *, word: bool, view: ViewKind):
        self.word = word
        self.view = view
        self.automaton = ahocorasick.Automaton()
        longest = 0
        first_chars = set()
        for term in terms:
            # The value says which edges of the term need a word boundary.
            self.automaton.add_word(term, (len(term), is_word_char(term[0]), is_word_char(term[-1])))
            longest = max(longest, len(term))
            first_chars.add(term[0])
        self.automaton.make_automaton()
        self.first_chars = frozenset(first_chars)
        self.max_len = longest
        # A whole term waiting for the character after it is the most a rule holds back.
        self.hold_chars = longest

    def scanner(self) -> TermsScanner:
        return TermsScanner(self)


class TermsScanner:
    """One stream's progress through a terms rule.

    Every occurrence ending by ``_done`` has been reported. ``_live`` holds the
    positions (before ``_live_end``) where the text so far still spells the
    beginning of a term; since every beginning of a term is itself spelt by a
    shorter beginning, it only ever needs the new characters checked.
    """

    def __init__(self, matcher: TermsMatcher):
        self._m = matcher
        self._done = 0
        self._live: list[int] = []
        self._live_end = 0

    def needed_from(self) -> int:
        """The first view position a later round may read (the character before a term, for ``word``)."""
        return max(0, min(self._done, self._live_end) - self._m.max_len)

    def advance(self, views: Views, t: int, final: bool) -> tuple[list[Span], int]:
        m = self._m
        text = views.text(m.view)
        base = views.base
        # In word mode an occurrence is decided once the character after it is known.
        decided = t if final or not m.word else t - 1
        spans: list[Span] = []
        if decided > self._done:
            start = max(0, self._done + 1 - m.max_len)
            for last, (length, word_start, word_end) in m.automaton.iter(text, start - base, decided - base):
                end = last + 1 + base
                if end <= self._done:
                    continue
                begin = end - length
                if m.word:
                    if word_start and begin > 0 and is_word_char(text[begin - 1 - base]):
                        continue
                    if word_end and end < t and is_word_char(text[end - base]):
                        continue
                spans.append((begin, end))
            self._done = decided
        if final:
            return spans, t
        self._update_live(text, base, t)
        return spans, (self._live[0] if self._live else t)

    def _update_live(self, text: str, base: int, t: int) -> None:
        m = self._m
        start = max(self._live_end, t - m.max_len)
        candidates = [b for b in self._live if b >= t - m.max_len]
        for begin in range(start, t):
            char = text[begin - base]
            if char not in m.first_chars:
                continue
            if m.word and begin > 0 and is_word_char(char) and is_word_char(text[begin - 1 - base]):
                continue  # inside a word: no word-mode term starts here
            candidates.append(begin)
        self._live = [b for b in candidates if m.automaton.match(text[b - base : t - base])]
        self._live_end = t


Validator = Callable[[str], "int | None"]


class PatternMatcher:
    """A regular expression with a maximum match length, tried at every view position.

    ``validate`` (PII checksums) gets the matched text and returns how much of
    it to keep, or None to reject it. ``tail``, when given, is a pattern that
    matches (up to the end of the text) every stretch of text that could still
    begin a match or be followed by what decides one; anywhere else a match is
    already decided, which lets a stream release prose at once instead of
    holding ``max_len`` characters back.
    """

    def __init__(
        self,
        pattern: re.Pattern[str],
        max_len: int,
        *,
        view: ViewKind,
        tail: re.Pattern[str] | None = None,
        validate: Validator | None = None,
    ):
        self.pattern = pattern
        self.max_len = max_len
        self.view = view
        self.tail = tail
        self.validate = validate
        self.hold_chars = max_len + RIGHT_CONTEXT - 1

    def scanner(self) -> PatternScanner:
        return PatternScanner(self)


class PatternScanner:
    """One stream's progress through a pattern rule: positions before ``_next`` are decided."""

    def __init__(self, matcher: PatternMatcher):
        self._m = matcher
        self._next = 0

    def needed_from(self) -> int:
        """The first view position a later round may read (what lookbehinds see)."""
        return max(0, self._next - LEFT_CONTEXT)

    def advance(self, views: Views, t: int, final: bool) -> tuple[list[Span], int]:
        m = self._m
        text = views.text(m.view)
        base = views.base
        frontier = t if final else self._frontier(text, base, t)
        spans: list[Span] = []
        position = self._next
        while position < frontier:
            # ``search`` skips, in C, the positions where nothing can match.
            found = m.pattern.search(text, position - base, t - base)
            if found is None:
                break
            begin = found.start() + base
            if begin >= frontier:
                break
            hit = m.pattern.match(text, begin - base, min(t, begin + m.max_len + RIGHT_CONTEXT) - base)
            if hit is not None and 0 < hit.end() - hit.start() <= m.max_len:
                keep = m.validate(hit.group()) if m.validate else hit.end() - hit.start()
                if keep:
                    spans.append((begin, begin + keep))
            position = begin + 1
        self._next = frontier
        return spans, frontier

    def _frontier(self, text: str, base: int, t: int) -> int:
        """The first position not yet decided: by the window's length, or earlier by the tail."""
        m = self._m
        start = max(self._next, t - m.max_len - RIGHT_CONTEXT + 1)
        if m.tail is None:
            return start
        live = m.tail.search(text, start - base, t - base)
        return t if live is None else live.start() + base
