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
result could depend on where chunks were split. The pattern rules with a tail
that read the same view are scanned together (``PatternGroup``): in prose none
of them has anything to decide, and one merged search says so for all.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import ahocorasick

from .normalize import LEET, Normalizer, is_word_char

LEFT_CONTEXT = 16
RIGHT_CONTEXT = 2
# Below this many characters (a streamed chunk's worth), a group searches with
# all its members once any needs string is there, rather than narrowing them
# down one ``needs`` at a time first.
NEEDS_MIN_CHARS = 64

ViewKind = Literal["plain", "folded", "leet_plain", "leet_folded"]
# A candidate: view start and end, and which member of the scanner's matcher found it.
Span = tuple[int, int, int]


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
            # Occurrences ending after ``_done`` are new. One that starts before the
            # last round's text ended starts where a term was live then (that text
            # spelt the beginning of the term), so the automaton starts at the first
            # live position, not ``max_len`` back.
            start = self._live[0] if self._live else self._live_end
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
                spans.append((begin, end, 0))
            self._done = decided
        if final:
            return spans, t
        self._update_live(text, base, t)
        return spans, (self._live[0] if self._live else t)

    def _update_live(self, text: str, base: int, t: int) -> None:
        m = self._m
        start = max(self._live_end, t - m.max_len)
        candidates = [b for b in self._live if b >= t - m.max_len]
        first_chars, word = m.first_chars, m.word
        for begin in range(start, t):
            char = text[begin - base]
            if char not in first_chars:
                continue
            if word and begin > 0:
                # ``isalnum`` first: the same answer as ``is_word_char`` for letters, sooner.
                before = text[begin - 1 - base]
                if (char.isalnum() or is_word_char(char)) and (before.isalnum() or is_word_char(before)):
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
    holding ``max_len`` characters back. What the tail matches must be closed
    under prefixes: text that cannot grow into a match cannot after more text
    either (``PatternGroup`` relies on it).

    ``needs``, when given, lists strings one of which is inside every match
    (an "@" in an e-mail address, a digit in a card number): text without
    any of them is not searched at all, which is most prose. Literal strings,
    looked for with one alternation of them: that search costs a fraction of
    the pattern's own even on a streamed chunk's few characters.
    """

    def __init__(
        self,
        pattern: re.Pattern[str],
        max_len: int,
        *,
        view: ViewKind,
        tail: re.Pattern[str] | None = None,
        validate: Validator | None = None,
        needs: tuple[str, ...] | None = None,
    ):
        self.pattern = pattern
        self.max_len = max_len
        self.view = view
        self.tail = tail
        self.validate = validate
        self.needs = needs
        self._needs_search = None if needs is None else _literal_search(needs)
        self.hold_chars = max_len + RIGHT_CONTEXT - 1

    def may_match(self, text: str, start: int, end: int) -> bool:
        """Whether a match could lie in ``text[start:end]`` (False only if ``needs`` is absent there)."""
        return self._needs_search is None or self._needs_search.search(text, start, end) is not None

    def scanner(self) -> PatternScanner:
        return PatternScanner(self)


class _PatternProgress:
    """What pattern scanners share: view positions before ``_next`` are decided."""

    def __init__(self) -> None:
        self._next = 0

    def needed_from(self) -> int:
        """The first view position a later round may read (what lookbehinds see)."""
        return max(0, self._next - LEFT_CONTEXT)


class PatternScanner(_PatternProgress):
    """One stream's progress through a pattern rule."""

    def __init__(self, matcher: PatternMatcher):
        super().__init__()
        self._m = matcher

    def advance(self, views: Views, t: int, final: bool) -> tuple[list[Span], int]:
        m = self._m
        text = views.text(m.view)
        base = views.base
        frontier = t if final else _frontier(m, text, base, self._next, t)
        spans: list[Span] = []
        if m.may_match(text, self._next - base, t - base):
            _collect(m, 0, text, base, self._next, frontier, t, spans)
        self._next = frontier
        return spans, frontier


def _frontier(m: PatternMatcher, text: str, base: int, start: int, t: int) -> int:
    """The first position from ``start`` on not yet decided: by the window's length, or earlier by the tail."""
    start = max(start, t - m.hold_chars)
    if m.tail is None:
        return start
    live = m.tail.search(text, start - base, t - base)
    return t if live is None else live.start() + base


def _collect(
    m: PatternMatcher, member: int, text: str, base: int, position: int, frontier: int, t: int, spans: list[Span]
) -> None:
    """Append the matches of ``m`` that start from ``position`` to before ``frontier``."""
    while position < frontier:
        # ``search`` skips, in C, the positions where nothing can match.
        found = m.pattern.search(text, position - base, t - base)
        if found is None:
            return
        begin = found.start() + base
        if begin >= frontier:
            return
        hit = m.pattern.match(text, begin - base, min(t, begin + m.max_len + RIGHT_CONTEXT) - base)
        if hit is not None and 0 < hit.end() - hit.start() <= m.max_len:
            keep = m.validate(hit.group()) if m.validate else hit.end() - hit.start()
            if keep:
                spans.append((begin, begin + keep, member))
        position = begin + 1


class PatternGroup:
    """Pattern rules with tails on one view, scanned as one (the PII detectors, typically).

    Scanned one by one, every rule costs two searches and the Python around
    them per round, although in prose none of them usually has anything to
    decide. The group asks that once, of a merged tail and a merged pattern
    (the members as alternatives, so a merged search finds the leftmost
    position where any member's would), and only runs a member's own pattern
    when the merged one finds something to decide. The regular expression
    engine does about the same work either way; the Python is what is saved.

    The members share one ``_next``: the least of their frontiers. A member
    may so search again positions it had already found dead, which gives the
    same frontier because a tail's language is closed under prefixes (text
    that cannot grow into a match cannot after more text either;
    ``test_pii_tails_are_prefix_closed``). A member's matches are reported
    once every member has decided their start, which may be a round later
    than alone, but they are decided then, so they are the same.

    Members whose ``needs`` is absent from the text to search are left out
    of the merged pattern (one merged pattern per set of members, made when
    first needed): prose without a digit or an "@" skips most of the work.
    """

    def __init__(self, matchers: Sequence[PatternMatcher]):
        self.members = tuple(matchers)
        self.view = self.members[0].view
        self.tail = _alternatives([m.tail for m in self.members if m.tail is not None])
        self.hold_chars = max(m.hold_chars for m in self.members)
        self.min_hold_chars = min(m.hold_chars for m in self.members)
        self._everyone = tuple(range(len(self.members)))
        self._merged = {self._everyone: _alternatives([m.pattern for m in self.members])}
        # Members sharing one ``needs`` (a digit, say) are asked about it once.
        self._needless = [i for i, m in enumerate(self.members) if m.needs is None]
        by_needs: dict[tuple[str, ...], list[int]] = {}
        for i, m in enumerate(self.members):
            if m.needs is not None:
                by_needs.setdefault(m.needs, []).append(i)
        self._needs = [(_literal_search(needs), members) for needs, members in by_needs.items()]
        # When every member needs something, one search says whether any of them can match.
        every_need = [needle for m in self.members for needle in m.needs or ()]
        self._any_need = None if self._needless else _literal_search(every_need)

    def possible_members(self, text: str, start: int, end: int) -> tuple[int, ...]:
        """The members that could match in ``text[start:end]``, in order."""
        if self._any_need is not None and self._any_need.search(text, start, end) is None:
            return ()
        if end - start < NEEDS_MIN_CHARS:
            return self._everyone
        possible = list(self._needless)
        for needs, members in self._needs:
            if needs.search(text, start, end) is not None:
                possible.extend(members)
        return tuple(sorted(possible))

    def merged_pattern(self, members: tuple[int, ...]) -> re.Pattern[str]:
        """The patterns of ``members`` as alternatives: a search finds the leftmost start of any of them."""
        merged = self._merged.get(members)
        if merged is None:
            merged = self._merged[members] = _alternatives([self.members[i].pattern for i in members])
        return merged

    @staticmethod
    def can_merge(matchers: Sequence[PatternMatcher]) -> bool:
        """Whether the matchers have tails and can be written as alternatives of one pattern (and tail).

        Capturing groups would renumber backreferences, verbose mode lets a
        comment swallow the closing parenthesis, and the flags must agree.
        """
        first = matchers[0]
        for m in matchers:
            if m.view != first.view or m.tail is None or first.tail is None:
                return False
            for own, model in ((m.pattern, first.pattern), (m.tail, first.tail)):
                if own.groups or own.flags != model.flags or own.flags & re.VERBOSE:
                    return False
        try:
            _alternatives([m.pattern for m in matchers])
            _alternatives([m.tail for m in matchers if m.tail is not None])
        except re.error:
            return False  # e.g. a global inline flag, legal only at the very start
        return True

    def scanner(self) -> PatternGroupScanner:
        return PatternGroupScanner(self)


def _literal_search(needles: Iterable[str]) -> re.Pattern[str]:
    """A pattern that finds any of ``needles`` (none of them: it finds nothing)."""
    alternatives = sorted({re.escape(needle) for needle in needles}, key=lambda n: (-len(n), n))
    return re.compile("|".join(alternatives) if alternatives else "(?!)")


def _alternatives(patterns: Sequence[re.Pattern[str]]) -> re.Pattern[str]:
    return re.compile("|".join(f"(?:{p.pattern})" for p in patterns), patterns[0].flags)


class PatternGroupScanner(_PatternProgress):
    """One stream's progress through a ``PatternGroup``, the same for every member."""

    def __init__(self, group: PatternGroup):
        super().__init__()
        self._g = group

    def advance(self, views: Views, t: int, final: bool) -> tuple[list[Span], int]:
        g = self._g
        text = views.text(g.view)
        base = views.base
        position = self._next
        if final:
            frontier = t
        else:
            # The leftmost position where any member's tail is live bounds every member's
            # frontier from below, and is the least of them if every member's window
            # reaches it (else that member's window decides: ask each member).
            live = g.tail.search(text, max(position, t - g.hold_chars) - base, t - base)
            if live is None:
                frontier = t
            elif live.start() + base >= t - g.min_hold_chars:
                frontier = live.start() + base
            else:
                frontier = min(_frontier(m, text, base, position, t) for m in g.members)
        spans: list[Span] = []
        possible = g.possible_members(text, position - base, t - base) if position < frontier else ()
        if possible:
            found = g.merged_pattern(possible).search(text, position - base, t - base)
            if found is not None and found.start() + base < frontier:
                for member in possible:
                    _collect(g.members[member], member, text, base, found.start() + base, frontier, t, spans)
        self._next = frontier
        return spans, frontier
