"""The window's shortcuts give exactly what the plain way gives, chunk by chunk.

``test_moderation_properties`` checks that any chunking adds up to the whole
text; these check the invariants the window's fast paths rely on, and that
they release the same text at the same time as the plain way.
"""

from __future__ import annotations

from dataclasses import replace

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ModerationConfig, RuleConfig
from proxy.moderation import ModerationEngine, matchers, pii
from proxy.moderation.matchers import PatternGroup, ascii_shadow
from proxy.moderation.normalize import Normalizer
from proxy.moderation.pii import DETECTORS, pii_matcher

SETTINGS = settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])

PII_PIECES = [
    "a", "s", "k", "x", "e", "gb", "1", "4", "0", "9", "+", "(", ")", "@", ".", "-", "_", "%", " ", "  ", "\n",
    "bob@x.io", "4111 1111 1111 1111", "10.0.0.1", "555-123-4567", "+44 20 7946 0958", "(555) 123-4567",
    "sk-abc123def456ghi789jkl0", "akiaabcdefghijklmnop", "gb82 west 1234 5698 7654 32", "eyj", "xoxb-",
    "-----begin rsa private key-----", "the", "quick", "\u200b", "é",
]  # fmt: skip
pii_texts = st.lists(st.sampled_from(PII_PIECES), max_size=25).map("".join)


@SETTINGS
@given(pii_texts, st.data())
@pytest.mark.parametrize("entity", sorted(DETECTORS))
def test_pii_tails_are_prefix_closed(entity: str, text: str, data: st.DataObject) -> None:
    """A position the tail rejects stays rejected as text arrives (``PatternGroup`` relies on it)."""
    tail = pii_matcher(entity).tail
    assert tail is not None
    start = data.draw(st.integers(0, len(text)))
    dead = [end for end in range(start, len(text) + 1) if tail.match(text[start:end]) is None]
    if dead:
        assert dead == list(range(dead[0], len(text) + 1))


def _engine(*, merge: bool, needs: bool = True) -> ModerationEngine:
    """The six detectors and a terms rule; with ``merge=False`` each detector is scanned on its own.

    ``needs=False`` drops the detectors' ``needs``, so every text is searched.
    """
    rules = [RuleConfig(name=entity, type="pii", entity=entity, action="redact") for entity in sorted(DETECTORS)]
    rules.append(RuleConfig(name="t", type="terms", terms=["quick", "bob"], action="flag"))
    with pytest.MonkeyPatch.context() as monkeypatch:
        if not merge:
            monkeypatch.setattr(PatternGroup, "can_merge", staticmethod(lambda matchers: False))
        if not needs:
            without = {entity: replace(detector, needs=None) for entity, detector in DETECTORS.items()}
            monkeypatch.setattr(pii, "DETECTORS", without)
        return ModerationEngine.from_config(ModerationConfig(rules=rules))


def test_the_pii_detectors_are_scanned_as_one_group() -> None:
    assert len(_engine(merge=True)._plans["output"].scans) == 2  # the terms rule, and the six detectors
    assert len(_engine(merge=False)._plans["output"].scans) == 7


@SETTINGS
@given(pii_texts, st.lists(st.integers(0, 12), max_size=40))
def test_grouped_detectors_release_the_same_text_at_the_same_time(text: str, sizes: list[int]) -> None:
    one, other = _engine(merge=False).stream("output"), _engine(merge=True).stream("output")
    position = 0
    for size in [*sizes, len(text)]:
        chunk, position = text[position : position + size], position + size
        assert one.feed(chunk) == other.feed(chunk)
        assert one.held_chars == other.held_chars
    assert one.finish() == other.finish()


@SETTINGS
@given(pii_texts, st.lists(st.integers(0, 12), max_size=40), st.booleans())
def test_skipping_text_without_a_detectors_needs_changes_nothing(text: str, sizes: list[int], merge: bool) -> None:
    """Every match contains its detector's ``needs``, so skipping text without it loses none.

    """
    searched, skipping = _engine(merge=merge, needs=False).stream("output"), _engine(merge=merge).stream("output")
    position = 0
    for size in sizes:
        chunk, position = text[position : position + size], position + size
        assert searched.feed(chunk) == skipping.feed(chunk)
        assert searched.held_chars == skipping.held_chars
    assert searched.finish(text[position:]) == skipping.finish(text[position:])


def test_a_group_searches_only_the_detectors_whose_needs_are_in_the_text() -> None:
    group = next(m for _, m in _engine(merge=True)._plans["output"].scans if isinstance(m, PatternGroup))
    entities = sorted(DETECTORS)

    def possible(text: str) -> list[str]:
        return [entities[i] for i in group.possible_members(text, 0, len(text))]

    assert possible("the quick brown fox, twice over.") == []
    assert possible("call me on the 3rd") == ["credit_card", "iban", "ipv4", "phone"]
    assert possible("write to bob@x") == ["email"]
    assert possible("use sk-proj") == ["secret"]
    assert possible("bob@x, 3rd, eyj") == entities
    prose = "words, and more words. " * 5 + "3"
    assert group.possible_members(prose, 0, len(prose) - 1) == ()  # only the given range is read
    # However short the range: a literal search costs a fraction of a call into RE2.
    assert possible("at 3") == ["credit_card", "iban", "ipv4", "phone"]


ASCII_PIECES = ["a", "B", " ", "  ", "\t", "\n", "\r\n", "\x0b", "\x1c", ".", "x y", "\x00", "~", "_", "**", "7"]


@SETTINGS
@given(st.lists(st.sampled_from(ASCII_PIECES), max_size=40).map("".join), st.lists(st.integers(0, 9), max_size=30))
def test_ascii_chunks_build_the_views_the_general_way_does(text: str, sizes: list[int]) -> None:
    """ASCII after an ASCII character takes a short cut; after "é" it goes the general way."""
    fast, general = Normalizer(), Normalizer()
    fast.push("é")
    general.push("é" + text)
    position = 0
    for size in [*sizes, len(text)]:
        fast.push(text[position : position + size])
        position += size
    for normalizer in (fast, general):
        normalizer.close()
    for view in ("plain", "folded"):
        for field in ("text", "starts", "ends", "base"):
            assert getattr(getattr(fast, view), field) == getattr(getattr(general, view), field), (view, field)
    for field in ("orig", "_ws_run", "_after_space", "_marker_run", "_folded_word"):
        assert getattr(fast, field) == getattr(general, field), field


QUIET_PIECES = ["中", "é", "a", "s", "k", "x", "o", "gi", "th", "-", "--", "(", "+", ".", " ", "'", "%", "ey", "xo", "ak", "gl", "hf", "ai", "sk", "_", "1", "@"]


@SETTINGS
@given(st.lists(st.sampled_from(QUIET_PIECES), max_size=30).map("".join), st.data())
@pytest.mark.parametrize("entity", sorted(DETECTORS))
def test_quiet_frontiers_equal_the_tails(entity: str, text: str, data: st.DataObject) -> None:
    """On text without the detector's needs, the Python answer (on the ASCII shadow) is the tail's own."""
    matcher = pii_matcher(entity)
    start = data.draw(st.integers(0, len(text)))
    if matcher.may_match(text, start, len(text)):
        return  # not quiet: the tail itself is asked
    live = matcher.tail.search(text[start:])
    expected = len(text) if live is None else start + live[0][0]
    assert matcher.quiet(ascii_shadow(text[start:]), start, start, len(text)) == expected


LINEAR_PIECES = ["a", "Z", "0", "7", " ", "@", ".", "-", "_", "é", "中", "\n", "bob@x.io", "4111 1111 1111 1111", "sk-"]


@SETTINGS
@given(st.lists(st.sampled_from(LINEAR_PIECES), max_size=20).map("".join), st.data())
@pytest.mark.parametrize("entity", sorted(DETECTORS))
def test_linear_regex_fast_path_agrees(entity: str, text: str, data: st.DataObject) -> None:
    """The direct call into RE2 on ASCII gives what google-re2's own wrapper gives."""
    pattern = pii_matcher(entity).pattern
    pos = data.draw(st.integers(0, len(text)))
    for run in (pattern.search, pattern.match):
        fast = run(text, pos)
        wrapped = (pattern._wrapped.search if run == pattern.search else pattern._wrapped.match)(text, pos)
        assert fast == (None if wrapped is None else [wrapped.span(g) for g in range(pattern.groups + 1)])


def test_the_detectors_tails_fit_their_windows() -> None:
    """What lets the group decide with one merged tail search (``PatternGroup.exact``)."""
    for entity in DETECTORS:
        matcher = pii_matcher(entity)
        assert entity == "secret" or matcher.tail_chars <= matcher.hold_chars, entity
    group = next(m for _, m in _engine(merge=True)._plans["output"].scans if isinstance(m, PatternGroup))
    assert group.exact
