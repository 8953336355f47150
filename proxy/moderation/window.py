"""The moderation window of one stream: decide matches as early as possible, release the rest.

Which matches act, for a whole text and for any chunking of it alike:

* Every rule reports *candidates*, mapped back to spans of the original text
  (compared there, not in the normalised view, because one original
  character can become several view characters: "ß" is "ss").
* Candidates are taken in order of their start. At one start, a block beats
  everything; otherwise the longest candidate wins and ties go to the rule
  listed first in the config (**leftmost-longest**). A redact or flag
  candidate that overlaps one already taken is dropped, not merged.
* The first block ends the text: what was released before its start (with
  redactions applied) is all that remains, and nothing of the blocked match
  is ever released. If the block starts inside a redaction already taken,
  that redaction's replacement stays (it reveals nothing) and the text ends
  after it.
* ``redact`` replaces the original characters of the match (all of them,
  including invisible ones between its letters, and none around it) with the
  rule's replacement; ``flag`` leaves the text as it is.

A stream releases text as soon as every rule has decided every candidate that
could start in it, so it holds back only what could still be the start of a
match: at most ``max_window_chars`` original characters, usually just the
unfinished word. The text of every ``feed`` and of ``finish``, put together,
is what ``ModerationEngine.moderate`` gives for the whole text, and the
actions are the same, in the same order.
"""

from __future__ import annotations

from collections.abc import Sequence

from .matchers import SCRIPT_CONTEXT, PatternGroup, PatternMatcher, TermsMatcher, Views
from .normalize import Normalizer, original_chars_bound
from .result import Action, ModerationResult
from .rules import CompiledRule

_NOTHING = ModerationResult("")

# Trimming the buffers asks every scanner what it still needs, which costs more
# than a small chunk's own work, so it is only tried once this many more original
# characters have arrived. The buffers stay bounded: ``Normalizer.discard`` keeps
# at most twice the live part, plus what arrived since the last try.
_TRIM_EVERY = 64

Matcher = TermsMatcher | PatternMatcher | PatternGroup


class _Candidate:
    """One rule's match, as a span of the original text."""

    __slots__ = ("end", "rule", "start")

    def __init__(self, start: int, end: int, rule: CompiledRule):
        self.start = start
        self.end = end
        self.rule = rule

    def order(self) -> tuple[int, bool, int, int]:
        """Sort key: by start, blocks first, then longest, then the rule listed first."""
        return (self.start, self.rule.action != "block", self.start - self.end, self.rule.index)


class WindowPlan:
    """What every stream of one rule set shares, built once (per engine and direction).

    Each entry of ``scans`` is a matcher and the rules it finds matches for:
    one rule, or all the pattern rules with a tail that read one view (the PII
    detectors), scanned together as a ``PatternGroup`` when they can be.
    """

    def __init__(self, rules: Sequence[CompiledRule]):
        self.rules = tuple(rules)
        self.scans: list[tuple[tuple[CompiledRule, ...], Matcher]] = []
        with_tails: dict[str, list[tuple[CompiledRule, PatternMatcher]]] = {}
        for rule in self.rules:
            matcher = rule.matcher
            if isinstance(matcher, PatternMatcher) and matcher.tail is not None:
                with_tails.setdefault(matcher.view, []).append((rule, matcher))
            else:
                self.scans.append(((rule,), matcher))
        for members in with_tails.values():
            matchers = [matcher for _, matcher in members]
            if len(members) > 1 and PatternGroup.can_merge(matchers):
                self.scans.append((tuple(rule for rule, _ in members), PatternGroup(matchers)))
            else:
                self.scans.extend(((rule,), matcher) for rule, matcher in members)
        self.max_window_chars = (
            original_chars_bound(max(rule.matcher.hold_chars for rule in self.rules)) if self.rules else 0
        )


class ModerationStream:
    """One window (per choice, per tool call's arguments): ``feed`` text in, moderated text out.

    After a block the stream is over: ``feed`` and ``finish`` return an empty
    result (the block was reported once, by the call that found it). A second
    ``finish()`` returns an empty result too; ``feed`` after ``finish``, or a
    second ``finish`` with more text, is a bug in the caller and raises
    ``RuntimeError``.
    """

    def __init__(self, rules: Sequence[CompiledRule] | WindowPlan):
        plan = rules if isinstance(rules, WindowPlan) else WindowPlan(rules)
        self._plan = plan
        self._rules = plan.rules
        self._scanners = [(members, matcher.scanner()) for members, matcher in plan.scans]
        self._normalizer = Normalizer()
        self._candidates: list[_Candidate] = []
        self._released = 0  # original text before this has been released (or replaced)
        self._taken_end = 0  # end of the last redact/flag match taken
        self._blocked: Action | None = None
        self._finished = False
        self._trim_at = _TRIM_EVERY  # trim the buffers once the text reaches this length

    @property
    def max_window_chars(self) -> int:
        """The most original characters this stream can hold back at once."""
        return self._plan.max_window_chars

    @property
    def held_chars(self) -> int:
        """Original characters received but not yet released."""
        if self._blocked is not None:
            return 0
        return self._normalizer.orig_end - self._released

    @property
    def blocked(self) -> Action | None:
        return self._blocked

    @property
    def finished(self) -> bool:
        return self._finished or self._blocked is not None

    def feed(self, text: str) -> ModerationResult:
        """Take the next chunk; return the text that is now safe to release."""
        if self._blocked is not None:
            return _NOTHING
        if self._finished:
            raise RuntimeError("feed() after finish()")
        if not self._rules:
            return ModerationResult(text)
        self._normalizer.push(text)
        return self._round(final=False)

    def finish(self, last: str = "") -> ModerationResult:
        """The text has ended, with ``last`` if given: decide what is left and release it.

        ``finish(text)`` on a new stream is the cheapest way to moderate a whole
        text: one round, in which nothing has to be held back.
        """
        if self._finished or self._blocked is not None:
            if last and self._blocked is None:
                raise RuntimeError("finish() with more text after finish()")
            self._finished = True
            return _NOTHING
        self._finished = True
        if not self._rules:
            return ModerationResult(last)
        self._normalizer.push(last)
        self._normalizer.close()
        return self._round(final=True)

    def _round(self, final: bool) -> ModerationResult:
        """Collect what the new text decided, act on it, release what is safe, trim the buffers."""
        normalizer = self._normalizer
        views = Views(normalizer)
        limit = normalizer.pending_start
        plain, folded = normalizer.plain, normalizer.folded
        for members, scanner in self._scanners:
            spans, frontier = scanner.advance(views, final)
            track = plain if scanner.track == "plain" else folded
            base = track.base
            for begin, end, member in spans:
                self._candidates.append(_Candidate(track.starts[begin - base], track.ends[end - 1 - base], members[member]))
            # Every candidate of this scanner that starts before its frontier is known.
            if frontier - base < len(track.text):
                start = track.starts[frontier - base]
                if start < limit:
                    limit = start
        if self._candidates:
            result = self._act(limit)
        elif limit > self._released:  # ``_release``, inlined for the common case
            result = ModerationResult(normalizer.orig_text(self._released, limit))
            self._released = limit
        else:
            result = _NOTHING
        if result.blocked is None and normalizer.orig_base + len(normalizer.orig) >= self._trim_at:
            plain, folded = normalizer.plain.end, normalizer.folded.end
            for _, scanner in self._scanners:
                if scanner.track == "plain":
                    plain = min(plain, scanner.needed_from())
                else:
                    folded = min(folded, scanner.needed_from())
            # The text before what is still held stays for a look-alike word's context.
            normalizer.discard(plain, folded, self._released - SCRIPT_CONTEXT)
            self._trim_at = normalizer.orig_end + _TRIM_EVERY
        return result

    def _act(self, limit: int) -> ModerationResult:
        """Decide the candidates that start before ``limit``, in order, and release up to it."""
        ready = [c for c in self._candidates if c.start < limit]
        self._candidates = [c for c in self._candidates if c.start >= limit]
        ready.sort(key=_Candidate.order)
        out: list[str] = []
        actions: list[Action] = []
        start = None
        for candidate in ready:
            if candidate.start == start:
                continue  # the first at this start has been decided on
            start = candidate.start
            rule = candidate.rule
            if rule.action == "block":
                out.append(self._release(start))  # nothing, if it starts inside a redaction
                self._blocked = Action(rule.name, "block")
                actions.append(self._blocked)
                self._candidates = []
                return ModerationResult("".join(out), tuple(actions), self._blocked)
            if start < self._taken_end:
                continue  # overlaps a match already taken
            self._taken_end = candidate.end
            actions.append(Action(rule.name, rule.action))
            if rule.action == "redact":
                out.append(self._release(start))
                out.append(rule.replacement)
                self._released = candidate.end
        out.append(self._release(limit))
        return ModerationResult("".join(out), tuple(actions))

    def _release(self, until: int) -> str:
        """The original text from what was released so far up to ``until`` (nothing if already past it)."""
        if until <= self._released:
            return ""
        text = self._normalizer.orig_text(self._released, until)
        self._released = until
        return text
