"""Finding each rule's matches in the normalised views, a stream at a time.

A matcher is compiled once per config load; ``scanner()`` gives the state one
stream needs. Each round the window hands every scanner the views built so
far (all of them when ``final``) and gets back, in the coordinates of the
scanner's own view (``track``: "plain" or "folded"):

* the rule's *candidates* that are now decided, as view spans ``(start, end)``,
  each reported once; and
* its *frontier*: every candidate starting before it has been reported, so
  text before it can be released as far as this rule is concerned.

A candidate is decided when no text that may still arrive can change it. That
is what makes a stream's result independent of how it was chunked.

Terms (``TermsMatcher``) are found with one Aho-Corasick automaton per rule, so
the cost per character does not grow with the size of the list. A term
occurrence is decided once the character after it is known (``match: word``
checks it); one whose letters are all look-alikes from another script (see
``script_verdict``) and that has no letter before it also waits for up to
``SCRIPT_CONTEXT`` characters after it. The frontier is the earliest place
where the text seen so far is still the beginning of some term.

Patterns (``PatternMatcher``: ``regex`` rules and the PII detectors) run in
RE2, a linear-time engine, so no pattern and no text can stall the event
loop. A match at view position ``s`` is the pattern matched at ``s`` on at
most ``max_len + RIGHT_CONTEXT`` characters of text from ``s`` on (``groups``
say which group is the match, the first that took part: a PII pattern may
consume one character after it, RE2's stand-in for a lookahead), accepted when it is 1 to ``max_len``
characters long and the character before ``s`` is not in ``left`` (RE2's
stand-in for a lookbehind). That is decided once ``s + max_len +
RIGHT_CONTEXT`` characters exist, or earlier when a ``tail`` pattern says so
(see ``pii``). The google-re2 binding encodes its whole subject string on
every call, so searches are given slices of at most ``BLOCK`` characters plus
one match, never the whole buffer: the cost stays linear in the text.
"""

from __future__ import annotations

import codecs
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Literal

import ahocorasick

from .linear_regex import LinearPattern, alternatives
from .normalize import LEET, Normalizer, Track, is_word_char, letter_scripts

LEFT_CONTEXT = 16
RIGHT_CONTEXT = 2
# Original characters either side of a look-alike word that say which script surrounds it.
SCRIPT_CONTEXT = 16
BLOCK = 256
SEARCH_REACH = 2100  # the longest match whose beginning alone is no match (a JWT)

ViewKind = Literal["plain", "folded", "leet_plain", "leet_folded"]
# A candidate: view start and end, and which member of the scanner's matcher found it.
Span = tuple[int, int, int]


class Views:
    """The views of one round; leetspeak forms made only if a rule reads them."""

    __slots__ = ("_leet", "folded", "normalizer", "plain")

    def __init__(self, normalizer: Normalizer):
        self.normalizer = normalizer
        self.plain = normalizer.plain
        self.folded = normalizer.folded
        self._leet: dict[str, str] = {}

    def track(self, kind: ViewKind) -> Track:
        return self.folded if kind.endswith("folded") else self.plain

    def text(self, kind: ViewKind) -> str:
        if kind == "folded":
            return self.folded.text
        if kind == "plain":
            return self.plain.text
        leet = self._leet.get(kind)
        if leet is None:
            leet = self._leet[kind] = self.track(kind).text.translate(LEET)
        return leet


def script_verdict(term_script: str | None, span: str, before: str, after: str | None) -> bool | None:
    """Whether a term found in the folded view is really there, judged by the scripts of its letters.

    UTS #39's distinction: a word spelt in its own script is the word; a
    look-alike letter of another script inside it (mixed script) is a
    disguise; a word spelt wholly in another script's look-alikes is a
    disguise amid text of the term's script, and that script's own word amid
    its own text (a Russian word in a Russian sentence is Russian). The
    surrounding text is the nearest letter before the span, or, with none,
    the nearest after it (``after`` None: not known yet, the answer is None).
    A look-alike word with no letter near it at all counts as a disguise.
    """
    if term_script is None:
        return True
    scripts = letter_scripts(span)
    if scripts <= {term_script} or len(scripts) > 1:
        return True
    (foreign,) = scripts
    for char in reversed(before):
        near = letter_scripts(char)
        if near:
            return foreign not in near
    if after is None:
        return None
    for char in after:
        near = letter_scripts(char)
        if near:
            return foreign not in near
    return True


class TermsMatcher:
    """A list of terms (already in view form) matched in one pass by an Aho-Corasick automaton.

    ``terms`` maps each view form to the script its configured term is
    written in (see ``script_verdict``). With ``leet``, an occurrence with no
    letter in it (a flight or room number) is not leetspeak and is ignored.
    """

    def __init__(self, terms: dict[str, str | None], *, word: bool, view: ViewKind):
        self.word = word
        self.view = view
        self.track = "folded" if view.endswith("folded") else "plain"
        self.leet = view.startswith("leet")
        self.automaton = ahocorasick.Automaton()
        longest = 0
        first_chars = set()
        for term, script in terms.items():
            # The value says which edges of the term need a word boundary, and its script.
            self.automaton.add_word(term, (len(term), is_word_char(term[0]), is_word_char(term[-1]), script))
            longest = max(longest, len(term))
            first_chars.add(term[0])
        self.automaton.make_automaton()
        self.first_chars = frozenset(first_chars)
        self.max_len = longest
        # A whole term waiting for the character after it is the most a rule holds back;
        # a look-alike word may wait for SCRIPT_CONTEXT more.
        self.hold_chars = longest + SCRIPT_CONTEXT

    def scanner(self) -> TermsScanner:
        return TermsScanner(self)


class TermsScanner:
    """One stream's progress through a terms rule.

    Every occurrence ending by ``_done`` has been reported or is ``_pending``
    (waiting for the text after it). ``_live`` holds the positions (before
    ``_live_end``) where the text so far still spells the beginning of a
    term; since every beginning of a term is itself spelt by a shorter
    beginning, it only ever needs the new characters checked.
    """

    def __init__(self, matcher: TermsMatcher):
        self._m = matcher
        self.track = matcher.track
        self._done = 0
        self._live: list[int] = []
        self._live_end = 0
        self._pending: list[tuple[int, int, str | None]] = []

    def needed_from(self) -> int:
        """The first view position a later round may read (the character before a term, for ``word``)."""
        start = min(self._done, self._live_end) - self._m.max_len
        if self._pending:
            start = min(start, self._pending[0][0])
        return max(0, start)

    def advance(self, views: Views, final: bool) -> tuple[list[Span], int]:
        m = self._m
        track = views.folded if m.track == "folded" else views.plain
        text = track.text if m.view == m.track else views.text(m.view)
        base = track.base
        t = base + len(text)
        # In word mode an occurrence is decided once the character after it is known.
        decided = t if final or not m.word else t - 1
        spans: list[Span] = []
        if self._pending:
            self._settle_pending(views, track, final, spans)
        if decided > self._done:
            # Occurrences ending after ``_done`` are new. One that starts before the
            # last round's text ended starts where a term was live then (that text
            # spelt the beginning of the term), so the automaton starts at the first
            # live position, not ``max_len`` back.
            start = self._live[0] if self._live else self._live_end
            for last, (length, word_start, word_end, script) in m.automaton.iter(text, start - base, decided - base):
                end = last + 1 + base
                if end <= self._done:
                    continue
                begin = end - length
                if m.word:
                    if word_start and begin > 0 and is_word_char(text[begin - 1 - base]):
                        continue
                    if word_end and end < t and is_word_char(text[end - base]):
                        continue
                if m.leet and not any(c.isalpha() for c in track.text[begin - base : end - base]):
                    continue  # a number alone is not leetspeak
                if script is None or (script == "LATIN" and _orig_span(views.normalizer, track, begin, end).isascii()):
                    spans.append((begin, end, 0))  # ASCII is Latin: no look-alike to judge
                else:
                    self._pending.append((begin, end, script))
            self._done = decided
            if self._pending:
                self._settle_pending(views, track, final, spans)
        if final:
            return spans, t
        self._update_live(text, base, t)
        frontier = self._live[0] if self._live else t
        if self._pending:
            frontier = min(frontier, self._pending[0][0])
        return spans, frontier

    def _settle_pending(self, views: Views, track: Track, final: bool, spans: list[Span]) -> None:
        """Judge the occurrences whose letters need ``script_verdict``, as far as the text allows."""
        normalizer = views.normalizer
        waiting = []
        for begin, end, script in self._pending:
            start = track.starts[begin - track.base]
            stop = track.ends[end - 1 - track.base]
            before = normalizer.orig_text(max(0, start - SCRIPT_CONTEXT), start)
            after = None
            if final or normalizer.orig_end >= stop + SCRIPT_CONTEXT:
                after = normalizer.orig_text(stop, stop + SCRIPT_CONTEXT)
            verdict = script_verdict(script, normalizer.orig_text(start, stop), before, after)
            if verdict is None:
                waiting.append((begin, end, script))
            elif verdict:
                spans.append((begin, end, 0))
        self._pending = waiting

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
                before = text[begin - 1 - base]
                # ASCII answered inline: the same as ``is_word_char``, sooner.
                if (char.isalnum() if char < "\x80" else is_word_char(char)) and (
                    before.isalnum() if before < "\x80" else is_word_char(before)
                ):
                    continue  # inside a word: no word-mode term starts here
            candidates.append(begin)
        self._live = [b for b in candidates if m.automaton.match(text[b - base : t - base])]
        self._live_end = t


def _orig_span(normalizer: Normalizer, track: Track, begin: int, end: int) -> str:
    return normalizer.orig_text(track.starts[begin - track.base], track.ends[end - 1 - track.base])


Validator = Callable[[str], "int | None"]
# The tail's answer on quiet text, in Python (see ``pii.Detector``).
Quiet = Callable[[str, int, int, int], int]


class PatternMatcher:
    """An RE2 pattern with a maximum match length, tried at every view position.

    ``validate`` (PII checksums) gets the matched text and returns how much of
    it to keep, or None to reject it. ``left`` lists characters that may not
    come just before a match. ``tail``, when given, is an RE2 pattern that
    matches (up to the end of the text, ``\\z``) every stretch of text that
    could still begin a match or be followed by what decides one; anywhere
    else a match is already decided, which lets a stream release prose at
    once instead of holding ``max_len`` characters back. What the tail
    matches must be closed under prefixes: text that cannot grow into a match
    cannot after more text either (``PatternGroup`` relies on it). A tail may
    match more than that (holding back more is safe), never less.

    ``needs``, when given, lists strings one of which is inside every match
    (an "@" in an e-mail address, a digit in a card number): text without
    any of them is not searched at all, which is most prose. Literal strings,
    looked for with one alternation of them (literals only, so Python's own
    engine finds them in linear time, and faster than a call into RE2).
    """

    def __init__(
        self,
        pattern: LinearPattern,
        max_len: int,
        *,
        view: ViewKind,
        tail: LinearPattern | None = None,
        validate: Validator | None = None,
        needs: tuple[str, ...] | None = None,
        quiet: Quiet | None = None,
        left: str | frozenset[str] = "",
        groups: tuple[int, ...] = (0,),
    ):
        self.pattern = pattern
        self.max_len = max_len
        self.view = view
        self.track = "folded" if view.endswith("folded") else "plain"
        self.tail = tail
        self.validate = validate
        self.needs = needs
        self.quiet = quiet
        self.left = left if isinstance(left, frozenset) else frozenset(left)
        self.groups = groups
        self._needs_search = None if needs is None else _literal_search(needs)
        self.hold_chars = max_len + RIGHT_CONTEXT - 1
        self.tail_chars = _longest(tail.pattern) if tail is not None else 0

    def may_match(self, text: str, start: int, end: int) -> bool:
        """Whether a match could lie in ``text[start:end]`` (False only if ``needs`` is absent there)."""
        return self._needs_search is None or self._needs_search.search(text, start, end) is not None

    def scanner(self) -> PatternScanner:
        return PatternScanner(self)


class _PatternProgress:
    """What pattern scanners share: view positions before ``_next`` are decided."""

    track = "plain"

    def __init__(self) -> None:
        self._next = 0

    def needed_from(self) -> int:
        """The first view position a later round may read (the character before a match)."""
        return max(0, self._next - LEFT_CONTEXT)


class PatternScanner(_PatternProgress):
    """One stream's progress through a pattern rule."""

    def __init__(self, matcher: PatternMatcher):
        super().__init__()
        self._m = matcher
        self.track = matcher.track

    def advance(self, views: Views, final: bool) -> tuple[list[Span], int]:
        m = self._m
        text = views.text(m.view)
        track = views.track(m.view)
        base, t = track.base, track.end
        frontier = t if final else _frontier(m, text, base, self._next, t)
        spans: list[Span] = []
        if m.may_match(text, self._next - base, t - base):
            _collect(m, 0, text, base, self._next, frontier, t, spans)
        self._next = frontier
        return spans, frontier


def _longest(pattern: str) -> int:
    """The most characters ``pattern`` can match, by Python's parser (RE2's syntax here is a subset)."""
    try:
        return re._parser.parse(pattern.replace("\\z", "\\Z")).getwidth()[1]  # type: ignore[attr-defined]
    except (re.error, OverflowError):
        return 1 << 30


# An encoding error handler: each run of non-ASCII characters becomes as many "%".
codecs.register_error("sluice-percent", lambda exc: ("%" * (exc.end - exc.start), exc.end))


def ascii_shadow(piece: str) -> str:
    """``piece`` with every non-ASCII character as "%": to every tail the same as itself.

    A tail reads non-ASCII characters only as possible letters of an e-mail
    address's local part (and as any character, "."), where "%" stands too,
    and no other tail reads "%" at all; so a quiet answer computed on the
    shadow is the tail's answer on the text.
    """
    return piece if piece.isascii() else piece.encode("ascii", "sluice-percent").decode("ascii")


def _frontier(m: PatternMatcher, text: str, base: int, start: int, t: int) -> int:
    """The first position from ``start`` on not yet decided: by the window's length, or earlier by the tail."""
    start = max(start, t - m.hold_chars)
    if m.tail is None:
        return start
    piece = text[start - base : t - base]
    if m.quiet is not None and not m.may_match(text, start - base, t - base):
        return m.quiet(ascii_shadow(piece), start, start, t)
    live = m.tail.search(piece)
    return t if live is None else start + live[0][0]


def _collect(
    m: PatternMatcher, member: int, text: str, base: int, position: int, frontier: int, t: int, spans: list[Span]
) -> None:
    """Append the matches of ``m`` that start from ``position`` to before ``frontier``."""
    reach = m.max_len + RIGHT_CONTEXT
    # Where a match starts is found on a slice of at most SEARCH_REACH past the block: a
    # longer match (a key block) is found by its beginning, and then matched in full.
    search_reach = min(reach, SEARCH_REACH)
    while position < frontier:
        block_end = min(frontier, position + BLOCK)
        # One character before the slice, so "\\b" and "^" see what precedes it.
        lo = position - 1 if position > base else position
        found = m.pattern.search(text[lo - base : min(t, block_end + search_reach) - base], position - lo)
        if found is None:
            position = block_end
            continue
        begin = lo + _span(m, found)[0]
        if begin >= block_end:
            position = block_end
            continue
        position = begin + 1
        if m.left and begin > base and text[begin - 1 - base] in m.left:
            continue
        lo = begin - 1 if begin > base else begin
        piece = text[lo - base : min(t, begin + reach) - base]
        hit = m.pattern.match(piece, begin - lo)
        if hit is None:
            continue
        start, end = _span(m, hit)
        if start != begin - lo:
            continue
        length = end - start
        if 0 < length <= m.max_len:
            keep = m.validate(piece[start:end]) if m.validate else length
            if keep:
                spans.append((begin, begin + keep, member))


def _span(m: PatternMatcher, spans: list[tuple[int, int]]) -> tuple[int, int]:
    """The span of the first of the matcher's groups that took part in the match."""
    for group in m.groups:
        if spans[group][0] >= 0:
            return spans[group]
    return spans[0]


class PatternGroup:
    """Pattern rules with tails on one view, scanned as one (the PII detectors, typically).

    Scanned one by one, every rule costs two searches and the Python around
    them per round, although in prose none of them usually has anything to
    decide. The group asks that once, of a merged tail (the members' tails as
    alternatives, so a merged search finds the leftmost position where any
    member's would), and only runs the members' own patterns when some
    member's ``needs`` is in the text to decide.

    The members share one ``_next``: the least of their frontiers. A member
    may so search again positions it had already found dead, which gives the
    same frontier because a tail's language is closed under prefixes. A
    member's matches are reported once every member has decided their start,
    which may be a round later than alone, but they are decided then, so they
    are the same.
    """

    def __init__(self, matchers: Sequence[PatternMatcher]):
        self.members = tuple(matchers)
        self.view = self.members[0].view
        self.track = self.members[0].track
        self.tail = alternatives([m.tail for m in self.members])
        self.hold_chars = max(m.hold_chars for m in self.members)
        self.min_hold_chars = min(m.hold_chars for m in self.members)
        # When no member's tail is live farther back than its own window, the merged tail's
        # leftmost live position is every member's frontier's least: one search decides.
        self.exact = all(m.tail_chars <= m.hold_chars for m in self.members if m.hold_chars < self.hold_chars)
        self._everyone = tuple(range(len(self.members)))
        self._needless = [i for i, m in enumerate(self.members) if m.needs is None]
        by_needs: dict[tuple[str, ...], list[int]] = {}
        for i, m in enumerate(self.members):
            if m.needs is not None:
                by_needs.setdefault(m.needs, []).append(i)
        self._needs = [(_literal_search(needs), members) for needs, members in by_needs.items()]
        every_need = [needle for m in self.members for needle in m.needs or ()]
        self._any_need = None if self._needless else _literal_search(every_need)
        self.quiet = self._any_need is not None and all(m.quiet is not None for m in self.members)
        # Members whose tail can be live on quiet text at all (a card's or address's cannot).
        # Members whose tail can be live on quiet text at all (a card's or address's cannot),
        # less those whose live stretch lies inside another's (the e-mail local part's).
        covered = any(getattr(m.quiet, "covers_local_runs", False) for m in self.members)
        self.quiet_members = tuple(
            m
            for m in self.members
            if m.quiet is not None
            and not getattr(m.quiet, "never_live", False)
            and not (covered and getattr(m.quiet, "local_run", False))
        )

    def may_match(self, text: str, start: int, end: int) -> bool:
        """Whether any member's ``needs`` is in ``text[start:end]``."""
        return self._any_need is None or self._any_need.search(text, start, end) is not None

    def possible_members(self, text: str, start: int, end: int) -> tuple[int, ...]:
        """The members that could match in ``text[start:end]``, in order."""
        if self._any_need is not None and self._any_need.search(text, start, end) is None:
            return ()
        possible = list(self._needless)
        for needs, members in self._needs:
            if needs.search(text, start, end) is not None:
                possible.extend(members)
        return tuple(sorted(possible))

    @staticmethod
    def can_merge(matchers: Sequence[PatternMatcher]) -> bool:
        """Whether the matchers all have tails on one view (their tails become one alternation)."""
        first = matchers[0]
        return all(m.view == first.view and m.tail is not None for m in matchers)

    def scanner(self) -> PatternGroupScanner:
        return PatternGroupScanner(self)


def _literal_search(needles: Iterable[str]) -> re.Pattern[str]:
    """A pattern that finds any of ``needles`` (none of them: it finds nothing)."""
    alternatives = sorted({re.escape(needle) for needle in needles}, key=lambda n: (-len(n), n))
    return re.compile("|".join(alternatives) if alternatives else "(?!)")


class PatternGroupScanner(_PatternProgress):
    """One stream's progress through a ``PatternGroup``, the same for every member."""

    def __init__(self, group: PatternGroup):
        super().__init__()
        self._g = group
        self.track = group.track

    def advance(self, views: Views, final: bool) -> tuple[list[Span], int]:
        g = self._g
        text = views.text(g.view)
        track = views.track(g.view)
        base, t = track.base, track.end
        position = self._next
        if final:
            frontier = t
        else:
            # The leftmost position where any member's tail is live bounds every member's
            # frontier from below, and is the least of them if every member's window
            # reaches it (else that member's window decides: ask each member).
            start = max(position, t - g.hold_chars)
            piece = text[start - base : t - base]
            if g.quiet and not g.may_match(text, start - base, t - base):
                # Quiet text (most prose): each member's tail answered in Python.
                shadow = ascii_shadow(piece)
                frontier = t
                for m in g.quiet_members:
                    live = m.quiet(shadow, start, max(position, t - m.hold_chars), t)
                    if live < frontier:
                        frontier = live
            else:
                live = g.tail.search(piece)
                if live is None:
                    frontier = t
                elif g.exact or start + live[0][0] >= t - g.min_hold_chars:
                    frontier = start + live[0][0]
                else:
                    frontier = min(_frontier(m, text, base, position, t) for m in g.members)
        spans: list[Span] = []
        possible = g.possible_members(text, position - base, t - base) if position < frontier else ()
        for member in possible:
            _collect(g.members[member], member, text, base, position, frontier, t, spans)
        self._next = frontier
        return spans, frontier
