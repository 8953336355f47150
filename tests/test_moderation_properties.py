"""Properties of moderation, checked with hypothesis on texts built to contain matches.

The central one: however a text is split into chunks, streaming it gives the
same text, the same actions in the same order, and the same block as
moderating it whole, and never holds back more than ``max_window_chars``.
Two independent oracles (Python's ``re``) check the leftmost-longest rule and
the block cut on plain ASCII text.
"""

from __future__ import annotations

import re

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ModerationConfig, RuleConfig
from proxy.moderation import Action, ModerationEngine, ModerationResult

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def _engine(redaction: str = "[{rule}]", **rules: dict) -> ModerationEngine:
    return ModerationEngine.from_config(
        ModerationConfig(redaction=redaction, rules=[RuleConfig(name=name, **rule) for name, rule in rules.items()])
    )


MIXED = _engine(
    bad={"type": "terms", "terms": ["ass", "as s", "kill them"], "action": "redact"},
    ss={"type": "terms", "terms": ["ss", "sa"], "match": "substring", "action": "flag"},
    kill={"type": "terms", "terms": ["kill", "ill"], "leetspeak": True, "action": "block"},
    num={"type": "regex", "pattern": r"a[0-9]+\b", "max_match_chars": 5, "action": "redact"},
    email={"type": "pii", "entity": "email", "action": "redact"},
    card={"type": "pii", "entity": "credit_card", "action": "flag"},
)
NO_BLOCK = _engine(
    bad={"type": "terms", "terms": ["ass", "s a", "lla"], "match": "substring", "action": "redact"},
    word={"type": "terms", "terms": ["kill", "as"], "leetspeak": True, "action": "flag"},
    phone={"type": "pii", "entity": "phone", "action": "redact"},
    ip={"type": "pii", "entity": "ipv4", "action": "flag"},
    secret={"type": "pii", "entity": "secret", "action": "redact"},
    iban={"type": "pii", "entity": "iban", "action": "redact"},
)
FLAG_AND_BLOCK = _engine(
    seen={"type": "terms", "terms": ["ass", "sas"], "match": "substring", "action": "flag"},
    stop={"type": "terms", "terms": ["kill", "s s"], "leetspeak": True, "action": "block"},
    secret={"type": "pii", "entity": "secret", "action": "block"},
)

# Pieces that make matches (and near misses) likely: term letters, leetspeak,
# whitespace runs, invisible characters, look-alikes, combining marks,
# expanding and composing characters, emoji sequences, and PII shapes.
PIECES = [
    "a", "s", "i", "l", "k", "1", "4", "$", "@", ".", "-", " ", "  ", "\n", "\t",
    "ass", "kill", "k1ll", "them", "sa", "lla",
    "\u200b", "\u00ad", "\u200d", "\ufe0f", "\u0301", "\u0332", "\u0336",
    "\u0430", "\u03bf", "\u0405", "ａ", "ß", "ﬁ", "İ", "e\u0301", "\u1100", "\u1161",
    "\U0001f468", "\U0001f469", "\U0001f3fd",
    "a12", "bob@x.io", "4111 1111 1111 1111", "10.0.0.1", "555-123-4567", "+44 20 7946 0958",
    "sk-abc123def456ghi789jkl0", "AKIAABCDEFGHIJKLMNOP", "DE89 3704 0044 0532 0130 00",
    "-----BEGIN RSA PRIVATE KEY-----",
]  # fmt: skip

texts = st.lists(st.sampled_from(PIECES), max_size=30).map("".join)


@st.composite
def split_texts(draw: st.DrawFn, source: st.SearchStrategy[str] = texts) -> tuple[str, list[str]]:
    text = draw(source)
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=12)))
    return text, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


def streamed(engine: ModerationEngine, chunks: list[str]) -> ModerationResult:
    window = engine.stream("output")
    texts, actions, blocked = [], [], None
    for chunk in chunks:
        result = window.feed(chunk)
        assert window.held_chars <= window.max_window_chars <= engine.max_window_chars
        texts.append(result.text)
        actions += result.actions
        blocked = blocked or result.blocked
    result = window.finish()
    texts.append(result.text)
    actions += result.actions
    return ModerationResult("".join(texts), tuple(actions), blocked or result.blocked)


def _same_as_whole(engine: ModerationEngine, text: str, chunks: list[str]) -> ModerationResult:
    whole = engine.moderate(text, "output")
    assert streamed(engine, chunks) == whole
    if whole.blocked is not None:
        assert whole.actions[-1] == whole.blocked
    return whole


@SETTINGS
@given(split_texts(), st.sampled_from([MIXED, NO_BLOCK, FLAG_AND_BLOCK]))
def test_the_last_chunk_given_to_finish_counts_as_fed(case: tuple[str, list[str]], engine: ModerationEngine) -> None:
    _, chunks = case
    fed, given_last = engine.stream("output"), engine.stream("output")
    for chunk in chunks[:-1]:
        assert fed.feed(chunk) == given_last.feed(chunk)
    last = chunks[-1] if chunks else ""
    head = fed.feed(last)
    tail = fed.finish()
    if head.blocked is None:
        head = ModerationResult(head.text + tail.text, head.actions + tail.actions, tail.blocked)
    assert given_last.finish(last) == head


@SETTINGS
@given(split_texts())
def test_any_chunking_equals_the_whole_text_mixed_rules(case: tuple[str, list[str]]) -> None:
    _same_as_whole(MIXED, *case)


@SETTINGS
@given(split_texts())
def test_any_chunking_equals_the_whole_text_redact_and_flag(case: tuple[str, list[str]]) -> None:
    _same_as_whole(NO_BLOCK, *case)


@SETTINGS
@given(texts)
def test_one_code_point_at_a_time_equals_the_whole_text(text: str) -> None:
    for engine in (MIXED, NO_BLOCK, FLAG_AND_BLOCK):
        _same_as_whole(engine, text, list(text))


@SETTINGS
@given(split_texts())
def test_flags_and_blocks_never_change_text_only_cut_it(case: tuple[str, list[str]]) -> None:
    text, chunks = case
    whole = _same_as_whole(FLAG_AND_BLOCK, text, chunks)
    if whole.blocked is None:
        assert whole.text == text
    else:
        assert text.startswith(whole.text) and len(whole.text) < len(text)


# -- oracles on plain ASCII -------------------------------------------------------

# Markdown markers ("_", "*", "~") join the letters around them in the folded view;
# ``test_moderation_scripts`` checks them with an oracle of their own.
ASCII = st.text(alphabet="abAB. -\n", max_size=40)
ORACLE_TERMS = ["ab", "bab", "b a", "aa"]
# Leftmost-longest, case-insensitive, a phrase across up to 17 whitespace characters (the cap).
_ALTERNATIVES = "|".join(re.escape(t).replace(r"\ ", r"\s{1,17}") for t in sorted(ORACLE_TERMS, key=len, reverse=True))
SUBSTRING_ORACLE = re.compile(_ALTERNATIVES, re.IGNORECASE)
WORD_ORACLE = re.compile(rf"(?<![^\W_])(?:{_ALTERNATIVES})(?![^\W_])", re.IGNORECASE)


def _oracle_redact(pattern: re.Pattern[str], text: str) -> ModerationResult:
    count = len(pattern.findall(text))
    return ModerationResult(pattern.sub("[r]", text), (Action("r", "redact"),) * count)


@SETTINGS
@given(split_texts(ASCII))
def test_substring_redaction_is_leftmost_longest(case: tuple[str, list[str]]) -> None:
    text, chunks = case
    engine = _engine(r={"type": "terms", "terms": ORACLE_TERMS, "match": "substring", "action": "redact"})
    assert _same_as_whole(engine, text, chunks) == _oracle_redact(SUBSTRING_ORACLE, text)


@SETTINGS
@given(split_texts(ASCII))
def test_word_redaction_matches_whole_words_only(case: tuple[str, list[str]]) -> None:
    text, chunks = case
    engine = _engine(r={"type": "terms", "terms": ORACLE_TERMS, "action": "redact"})
    assert _same_as_whole(engine, text, chunks) == _oracle_redact(WORD_ORACLE, text)


@SETTINGS
@given(split_texts(ASCII))
def test_a_block_releases_exactly_the_text_before_the_first_match(case: tuple[str, list[str]]) -> None:
    text, chunks = case
    engine = _engine(r={"type": "terms", "terms": ORACLE_TERMS, "match": "substring", "action": "block"})
    first = SUBSTRING_ORACLE.search(text)
    expected = (
        ModerationResult(text)
        if first is None
        else ModerationResult(text[: first.start()], (Action("r", "block"),), Action("r", "block"))
    )
    assert _same_as_whole(engine, text, chunks) == expected
