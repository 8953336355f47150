"""The moderation core: rules, normalisation and offsets, PII, the window, config errors.

Every case that moderates text also streams it in several chunkings and checks
the stream gives the same text and actions (``moderated``), so the fixed
corpus doubles as a regression suite for the window.
"""

from __future__ import annotations

import random
import time
from pathlib import Path
from typing import Any

import pytest

from proxy.config import ConfigError, ModerationConfig, RuleConfig
from proxy.moderation import Action, ModerationEngine, ModerationResult
from proxy.moderation.normalize import (
    MAX_INVISIBLE_RUN,
    MAX_SEGMENT_CODEPOINTS,
    MAX_WHITESPACE_RUN,
    Normalizer,
)
from proxy.moderation.unidata import lookalike_table

REPO = Path(__file__).resolve().parent.parent


def engine(*rules: dict[str, Any], redaction: str = "[{rule}]") -> ModerationEngine:
    return ModerationEngine.from_config(
        ModerationConfig(redaction=redaction, rules=[RuleConfig(**rule) for rule in rules])
    )


def terms(name: str, *words: str, **extra: Any) -> dict[str, Any]:
    return {"name": name, "type": "terms", "terms": list(words), **extra}


def pii(entity: str, **extra: Any) -> dict[str, Any]:
    return {"name": entity, "type": "pii", "entity": entity, "action": "redact", **extra}


def stream(eng: ModerationEngine, chunks: list[str], direction: str = "output") -> tuple[ModerationResult, int]:
    """Feed ``chunks`` and finish; the combined result and the most text held back at once."""
    window = eng.stream(direction)  # type: ignore[arg-type]
    texts, actions, blocked, held = [], [], None, 0
    for chunk in chunks:
        result = window.feed(chunk)
        held = max(held, window.held_chars)
        texts.append(result.text)
        actions += result.actions
        blocked = blocked or result.blocked
    result = window.finish()
    texts.append(result.text)
    actions += result.actions
    return ModerationResult("".join(texts), tuple(actions), blocked or result.blocked), held


def chunkings(text: str) -> list[list[str]]:
    """Whole, one code point at a time, pairs, thirds, and a few random splits."""
    rng = random.Random(text)
    ways = [[text], list(text), [text[i : i + 2] for i in range(0, len(text), 2)]]
    third = max(1, len(text) // 3)
    ways.append([text[:third], text[third : 2 * third], text[2 * third :]])
    for _ in range(3):
        cuts = sorted(rng.sample(range(len(text) + 1), min(len(text) + 1, rng.randint(1, 6))))
        ways.append([text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])])
    return ways


def moderated(eng: ModerationEngine, text: str, direction: str = "output") -> ModerationResult:
    """``moderate``, after checking that every chunking streams to the same result within the bound."""
    whole = eng.moderate(text, direction)  # type: ignore[arg-type]
    for chunks in chunkings(text):
        streamed, held = stream(eng, chunks, direction)
        assert streamed == whole, chunks
        assert held <= eng.max_window_chars
    return whole


def redact(rule: str = "r") -> ModerationResult:
    return ModerationResult(f"[{rule}]", (Action(rule, "redact"),))


# -- API ----------------------------------------------------------------------


def test_result_and_action_are_plain_hashable_values() -> None:
    assert Action("r", "block") == Action("r", "block")
    assert len({Action("r", "block"), Action("r", "block"), Action("r", "flag")}) == 2
    with pytest.raises(AttributeError):
        Action("r", "block").rule = "other"  # type: ignore[misc]


def test_has_rules_follows_apply_to() -> None:
    eng = engine(terms("in", "x", apply_to=["input"]))
    assert eng.has_rules("input") and not eng.has_rules("output")
    assert eng.moderate("x", "output") == ModerationResult("x")
    assert eng.moderate("x", "input").blocked == Action("in", "block")


def test_no_rules_passes_text_through() -> None:
    eng = ModerationEngine.from_config(ModerationConfig())
    assert eng.max_window_chars == 0
    assert not eng.has_rules("input")
    window = eng.stream("output")
    assert window.feed("abc").text == "abc"
    assert window.finish() == ModerationResult("")


def test_unknown_direction_is_an_error() -> None:
    with pytest.raises(ValueError, match="direction"):
        engine(terms("t", "x")).moderate("x", "sideways")  # type: ignore[arg-type]


def test_after_a_block_the_stream_is_over() -> None:
    window = engine(terms("bad", "bad")).stream("output")
    first = window.feed("ok bad, and")
    assert first == ModerationResult("ok ", (Action("bad", "block"),), Action("bad", "block"))
    assert window.blocked == Action("bad", "block") and window.finished
    assert window.feed("more text") == ModerationResult("")
    assert window.finish() == ModerationResult("")


def test_feed_after_finish_is_a_bug() -> None:
    window = engine(terms("t", "x")).stream("output")
    window.finish()
    with pytest.raises(RuntimeError):
        window.feed("late")


def test_moderate_with_a_block_returns_the_text_before_the_match() -> None:
    eng = engine(terms("pii", "name", action="redact"), terms("bad", "forbidden phrase"))
    result = moderated(eng, "My name is X. Here is the forbidden   phrase and more.")
    assert result == ModerationResult(
        "My [pii] is X. Here is the ",
        (Action("pii", "redact"), Action("bad", "block")),
        Action("bad", "block"),
    )


# -- terms: words, substrings, phrases ------------------------------------------


@pytest.mark.parametrize("text", ["class", "classic", "assassin", "bass", "passage", "Scunthorpe", "asses", "glass-ass3"])
def test_word_mode_leaves_words_that_contain_the_term(text: str) -> None:
    eng = engine(terms("r", "ass", "cunt", action="redact"))
    assert moderated(eng, text) == ModerationResult(text)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("ass", "[r]"),
        ("You ASS!", "You [r]!"),
        ("(ass)", "([r])"),
        ("bad-ass x", "bad-[r] x"),  # a hyphen separates words
        ("bad_ass_x", "bad_ass_x"),  # an underscore joins them: snake_case is one identifier
        ("ass ass", "[r] [r]"),
    ],
)
def test_word_mode_matches_whole_words(text: str, expected: str) -> None:
    eng = engine(terms("r", "ass", action="redact"))
    assert moderated(eng, text).text == expected


def test_substring_mode_matches_inside_words() -> None:
    eng = engine(terms("r", "ass", match="substring", action="redact"))
    assert moderated(eng, "class assassin").text == "cl[r] [r][r]in"


def test_term_edges_that_are_not_letters_need_no_boundary() -> None:
    eng = engine(terms("r", "c++", "@admin", action="redact"))
    assert moderated(eng, "I like c++, ping x@admin.").text == "I like [r], ping x[r]."
    assert moderated(eng, "abc++").text == "abc++"  # the leading "c" still needs a word boundary


@pytest.mark.parametrize(
    "text",
    ["forbidden phrase", "Forbidden  Phrase", "forbidden\n\n\tphrase", "forbidden\u00a0phrase", "forbidden \u200b phrase"],
)
def test_a_phrase_matches_across_any_run_of_whitespace(text: str) -> None:
    eng = engine(terms("r", "forbidden phrase", action="redact"))
    assert moderated(eng, f"x {text} y") == ModerationResult("x [r] y", (Action("r", "redact"),))


def test_whitespace_runs_longer_than_the_cap_break_a_phrase() -> None:
    eng = engine(terms("r", "a b", action="redact"))
    longest = " " * (MAX_WHITESPACE_RUN + 1)
    assert moderated(eng, f"a{longest}b").text == "[r]"
    assert moderated(eng, f"a{longest} b").text == f"a{longest} b"


def test_terms_are_normalised_like_the_text() -> None:
    eng = engine(terms("r", "Straße", "ＢＡＤ", "  spaced   out  ", action="redact"))
    assert moderated(eng, "STRAẞE, bad and spaced\nout").text == "[r], [r] and [r]"
    # "ß" is a letter of its own, not "ss": German words are not rewritten into other words.
    assert moderated(eng, "STRASSE").text == "STRASSE"


def test_non_latin_terms_match() -> None:
    eng = engine(terms("r", "привет", "東京", action="redact"))
    assert moderated(eng, "ПРИВЕТ из 東京").text == "[r] из [r]"


def test_emoji_terms_match_and_emoji_sequences_survive_any_split() -> None:
    family = "\U0001f468\u200d\U0001f469\u200d\U0001f467"
    eng = engine(terms("r", "\U0001f4a9", match="substring", action="redact"))
    assert moderated(eng, f"{family} \U0001f4a9 {family}\U0001f3fd") == ModerationResult(
        f"{family} [r] {family}\U0001f3fd", (Action("r", "redact"),)
    )


# -- normalisation and offsets -------------------------------------------------


@pytest.mark.parametrize(
    ("disguised", "how"),
    [
        ("\u0430ss", "Cyrillic a"),
        ("\u0391\u0405\u0405", "Greek capital alpha, Cyrillic dze"),
        ("ａｓｓ", "fullwidth"),
        ("\U0001d41a\U0001d42c\U0001d42c", "mathematical bold"),
        ("a\u200bs\u200cs", "zero-width space and non-joiner"),
        ("a\u00ads\u00ads", "soft hyphens"),
        ("a\u2060s\ufeffs", "word joiner, BOM"),
        ("a\u202es\u202cs", "bidi override"),
        ("a\u0332s\u0336\u0336s", "combining marks that do not compose"),
        ("a\U000e0061ss", "a tag character"),
        ("A\ufe0fSS", "variation selector"),
    ],
)
def test_disguises_are_seen_through_and_redacted_whole(disguised: str, how: str) -> None:
    eng = engine(terms("r", "ass", action="redact"))
    assert moderated(eng, f"you {disguised}!") == ModerationResult("you [r]!", (Action("r", "redact"),)), how


def test_redaction_removes_exactly_the_characters_of_the_match() -> None:
    eng = engine(terms("r", "ass", action="redact"))
    # Invisible characters around the match stay; those inside it go with it.
    assert moderated(eng, "\u200b\u0430\u200bss\u200b.").text == "\u200b[r]\u200b."
    # A combining mark belongs to the letter before it.
    assert moderated(eng, "ass\u0332 x").text == "[r] x"


def test_diacritics_are_removed_in_the_matching_view() -> None:
    # Precomposed or decomposed, an accent does not hide a term, nor does a term's own accent.
    eng = engine(terms("r", "bad", "café", action="redact"))
    assert moderated(eng, "bäd ba\u0301d cafe café cafe\u0301").text == "[r] [r] [r] [r] [r]"


def test_invisible_runs_of_any_length_do_not_end_a_match() -> None:
    eng = engine(terms("r", "ass", action="redact"))
    for run in (MAX_INVISIBLE_RUN, MAX_INVISIBLE_RUN + 1, 10_000):
        assert moderated(eng, "a" + "\u200b" * run + "ss!").text == "[r]!"
    # Past the cap, the rest of a run is dropped from the text itself (it renders as nothing).
    long_run = "x" + "\u2060" * 100 + "y"
    assert moderated(eng, long_run).text == "x" + "\u2060" * MAX_INVISIBLE_RUN + "y"


def test_zalgo_marks_beyond_a_segment_do_not_hide_a_term_nor_stretch_the_window() -> None:
    eng = engine(terms("r", "ass", action="redact"))
    zalgo = "a" + "\u0316\u0335" * 3 + "s" + "\u0332" * 5 + "s"  # marks that compose with nothing
    assert moderated(eng, zalgo).text == "[r]"
    window = eng.stream("output")
    for _ in range(500):
        window.feed("\u0336")
        assert window.held_chars <= eng.max_window_chars


def test_lookalikes_come_from_unicode_data_and_fold_to_one_ascii_letter() -> None:
    table = lookalike_table()
    assert len(table) > 1000  # UTS #39 confusables, not a hand-made map
    for char, latin in table.items():
        assert len(char) == 1 and not char.isascii() and len(latin) == 1 and latin.isascii() and latin.isalpha()


def test_a_capital_and_its_small_letter_fold_alike() -> None:
    eng = engine(terms("r", "ηλιος", "Πнев", action="redact"))
    assert moderated(eng, "ΗΛΙΟΣ ηλιος πНЕВ").text == "[r] [r] [r]"
    # Capital look-alikes are caught: Greek capital eta and nu, Cyrillic capital en.
    assert moderated(engine(terms("r", "hen", action="redact")), "\u0397EN h\u0435n \u041den").text == "[r] [r] [r]"


def test_the_normalised_view_maps_back_to_the_original() -> None:
    normalizer = Normalizer()
    normalizer.push("Ｓtraße a\u200bb  \t c\u0301ﬁ")
    normalizer.close()
    assert normalizer.plain.text == "straße ab ćfi"
    assert normalizer.folded.text == "straße ab cfi"
    for track in (normalizer.plain, normalizer.folded):
        spans = [normalizer.orig_text(a, b) for a, b in zip(track.starts, track.ends)]
        assert spans == ["Ｓ", "t", "r", "a", "ß", "e", " ", "a", "b", " ", "c\u0301", "ﬁ", "ﬁ"]


def test_a_segment_is_cut_after_its_cap() -> None:
    normalizer = Normalizer()
    normalizer.push("e" + "\u0301" * (MAX_SEGMENT_CODEPOINTS + 3))
    normalizer.close()
    assert normalizer.plain.ends[0] - normalizer.plain.starts[0] == MAX_SEGMENT_CODEPOINTS


# -- leetspeak ------------------------------------------------------------------


@pytest.mark.parametrize("text", ["k1ll", "KI11", "k!ll".replace("!", "1"), "h4ck3r", "$h0ut", "@ss", "a$$", "5h0u7"])
def test_leetspeak_rules_fold_digits_and_symbols(text: str) -> None:
    eng = engine(terms("r", "kill", "hacker", "shout", "ass", leetspeak=True, action="redact"))
    assert moderated(eng, f"go {text} now").text == "go [r] now"


def test_leetspeak_is_only_for_rules_that_ask() -> None:
    eng = engine(terms("r", "kill", action="redact"))
    assert moderated(eng, "k1ll kill").text == "k1ll [r]"


def test_leetspeak_does_not_confuse_i_and_l_in_letters() -> None:
    eng = engine(terms("r", "hall", leetspeak=True, action="redact"))
    assert moderated(eng, "hail hall ha11 hai1").text == "hail [r] [r] hai1"


def test_regex_rules_can_ask_for_leetspeak() -> None:
    eng = engine({"name": "r", "type": "regex", "pattern": "free mon[e]y", "max_match_chars": 10, "leetspeak": True, "action": "redact"})
    assert moderated(eng, "fr33 m0n3y!").text == "[r]!"


# -- overlaps ---------------------------------------------------------------------


def test_leftmost_longest_wins_and_overlapping_later_matches_are_dropped() -> None:
    eng = engine(
        terms("short", "bad", action="redact"),
        terms("long", "bad word", action="flag"),
        terms("later", "word salad", action="redact"),
    )
    assert moderated(eng, "a bad word salad") == ModerationResult("a bad word salad", (Action("long", "flag"),))


def test_on_the_same_span_the_rule_listed_first_wins() -> None:
    eng = engine(terms("first", "same", action="flag"), terms("second", "same", action="redact"))
    assert moderated(eng, "the same") == ModerationResult("the same", (Action("first", "flag"),))


def test_overlapping_substrings_take_the_leftmost() -> None:
    eng = engine(terms("ab", "ab", match="substring", action="redact"), terms("bc", "bc", match="substring", action="redact"))
    assert moderated(eng, "abcbc") == ModerationResult("[ab]c[bc]", (Action("ab", "redact"), Action("bc", "redact")))


def test_a_redaction_inside_a_blocked_span_never_happens() -> None:
    eng = engine(terms("name", "them", action="redact"), terms("threat", "kill them all"))
    assert moderated(eng, "please kill them all now") == ModerationResult(
        "please ", (Action("threat", "block"),), Action("threat", "block")
    )


def test_a_block_wins_over_a_longer_redaction_at_the_same_start() -> None:
    eng = engine(terms("long", "kill them all", action="redact"), terms("threat", "kill"))
    assert moderated(eng, "we kill them all") == ModerationResult("we ", (Action("threat", "block"),), Action("threat", "block"))


def test_a_block_that_starts_inside_a_redaction_keeps_the_replacement() -> None:
    eng = engine(terms("plan", "secret plan", action="redact"), terms("b", "plan b"))
    assert moderated(eng, "the secret plan b is") == ModerationResult(
        "the [plan]", (Action("plan", "redact"), Action("b", "block")), Action("b", "block")
    )


def test_a_block_that_starts_inside_a_flag_cuts_at_the_block() -> None:
    eng = engine(terms("f", "bad wo", match="substring", action="flag"), terms("b", "word", match="substring"))
    assert moderated(eng, "so bad word") == ModerationResult(
        "so bad ", (Action("f", "flag"), Action("b", "block")), Action("b", "block")
    )


# -- the window -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "chunks",
    [
        ["forbidden ph", "rase!"],
        ["forb", "idden phr", "ase!"],
        list("forbidden phrase!"),
        ["f", "orbidden", " ", " ", "\n", "phras", "e", "!"],
    ],
)
def test_a_term_split_across_chunks_is_caught(chunks: list[str]) -> None:
    eng = engine(terms("r", "forbidden phrase", action="redact"))
    result, _ = stream(eng, ["say ", *chunks])
    assert result == ModerationResult("say [r]!", (Action("r", "redact"),))


def test_a_block_split_across_chunks_releases_nothing_of_the_match() -> None:
    eng = engine(terms("b", "forbidden phrase"))
    window = eng.stream("output")
    released = [window.feed(c).text for c in ["ok then. forb", "idden", " phra"]]
    assert "".join(released) == "ok then. "
    assert window.feed("se and more") == ModerationResult("", (Action("b", "block"),), Action("b", "block"))


def test_only_a_possible_start_is_held_back() -> None:
    eng = engine(terms("r", "world peace", action="redact"))
    window = eng.stream("output")
    assert window.feed("hello there ").text == "hello there"  # the last character may still take a mark
    assert window.feed("wor").text == " "
    assert window.held_chars == 3
    assert window.feed("k and ").text == "work and"
    assert window.finish().text == " "


def test_text_ending_in_the_middle_of_a_possible_match_is_flushed() -> None:
    eng = engine(terms("r", "forbidden phrase", action="redact"), pii("email"))
    result, _ = stream(eng, ["write to bob@exa", "mple and the forbidden phr"])
    assert result == ModerationResult("write to bob@example and the forbidden phr")


def test_prose_is_released_at_once_even_with_long_pii_patterns() -> None:
    eng = engine(pii("email"), pii("iban"), pii("secret"), pii("credit_card"), pii("phone"), pii("ipv4"))
    assert eng.max_window_chars > 1000  # the worst case is long...
    window = eng.stream("output")
    tokens = ["The", " quick", " brown", " fox", " jumps", " over", " the", " lazy", " dog", ",", " twice", ";", " then", " it", " rests", "."]
    fed = ""
    for token in tokens:
        window.feed(token)
        fed += token
        last_word = fed.rsplit(" ", 1)[-1]
        assert window.held_chars <= len(last_word) + 1  # ...but prose is held back one word at most


def test_long_streams_trim_their_buffers_and_still_agree_with_moderate() -> None:
    """Thousands of small chunks: the buffers are trimmed many times; lookbehind context survives it."""
    eng = engine(
        terms("t", "ass", "kill them", action="redact"),
        terms("s", "ss", match="substring", action="flag"),
        {"name": "ticket", "type": "regex", "pattern": r"ticket number [0-9]{4}", "max_match_chars": 18, "action": "redact"},
        pii("credit_card"),
        pii("email"),
    )
    rng = random.Random(3)
    parts = ["ass", "class", " ", "kill  them", "ticket number 1234", "ticket 5678", "12 4111 1111 1111 1111", "bob@x.io", "\u200b", "ss"]
    text = "".join(rng.choice(parts) for _ in range(1500))
    whole = eng.moderate(text, "output")
    assert len(whole.actions) > 500
    for size in (1, 3, 7):
        streamed, _ = stream(eng, [text[i : i + size] for i in range(0, len(text), size)])
        assert streamed == whole


def test_max_window_chars_bounds_what_is_held() -> None:
    eng = engine(terms("r", "abcdefghij", match="substring", action="redact"))
    window = eng.stream("output")
    for char in "abcdefghi" + "\u200b" * MAX_INVISIBLE_RUN + "\u0301" * 7:
        window.feed(char)
        assert window.held_chars <= eng.max_window_chars


def test_max_window_chars_of_a_regex_rule_follows_max_match_chars() -> None:
    small = engine({"name": "r", "type": "regex", "pattern": "TCK-[0-9]{6}", "max_match_chars": 10})
    large = engine({"name": "r", "type": "regex", "pattern": "TCK-[0-9]{6}", "max_match_chars": 500})
    assert 0 < small.max_window_chars == large.max_window_chars  # the pattern itself is at most 10 long
    wide = engine({"name": "r", "type": "regex", "pattern": "x+", "max_match_chars": 40})
    assert wide.max_window_chars > small.max_window_chars


# -- regex rules -------------------------------------------------------------------------


def test_regex_rules_match_case_insensitively_with_boundaries() -> None:
    eng = engine({"name": "ticket", "type": "regex", "pattern": r"\bTCK-[0-9]{6}\b", "max_match_chars": 10, "action": "flag"})
    assert moderated(eng, "see tck-123456, not TCK-1234567 or xTCK-123456") == ModerationResult(
        "see tck-123456, not TCK-1234567 or xTCK-123456", (Action("ticket", "flag"),)
    )


@pytest.mark.parametrize(
    ("pattern", "text", "expected"),
    [
        (r"x\b", "xyz x-y", "xyz [r]-y"),  # a word boundary sees the character after the match
        (r"end\z", "end\nx end", "end\nx [r]"),  # the end of the text, not of a line
        (r"(?m)end$", "x end\ny", "x [r]\ny"),
    ],
)
def test_regex_boundaries_see_the_text_after_the_match(pattern: str, text: str, expected: str) -> None:
    eng = engine({"name": "r", "type": "regex", "pattern": pattern, "max_match_chars": 3, "action": "redact"})
    assert moderated(eng, text).text == expected


def test_a_regex_match_longer_than_max_match_chars_is_not_a_match() -> None:
    eng = engine({"name": "r", "type": "regex", "pattern": r"\b[0-9]{4,}\b", "max_match_chars": 6, "action": "redact"})
    assert moderated(eng, "1234 123456 1234567").text == "[r] [r] 1234567"


@pytest.mark.parametrize("pattern", [r"(?<=a)b", r"x(?!y)", r"(a)\1"])
def test_a_pattern_re2_cannot_run_is_a_config_error_naming_the_rule(pattern: str) -> None:
    with pytest.raises(ValueError, match="rule 'ticket'.*RE2"):
        RuleConfig(name="ticket", type="regex", pattern=pattern, max_match_chars=5)


# -- PII -------------------------------------------------------------------------------


PII_TRUE = {
    "email": ["bob@example.com", "first.last+tag@sub.example.co.uk", "BOB@EXAMPLE.ORG", "ｂｏｂ＠example.com"],
    "phone": [
        "+44 20 7946 0958",
        "+1 (555) 123-4567",
        "(555) 123-4567",
        "555-123-4567",
        "555.123.4567",
        "555 123 4567",
        "1-800-555-0199",
        "020 7946 0958",
        "07700 900123",
        "+4915112345678",
        "01 23 45 67 89",
    ],
    "credit_card": ["4111 1111 1111 1111", "4111-1111-1111-1111", "4111111111111111", "3782 822463 10005", "5555555555554444"],
    "ipv4": ["10.0.0.1", "192.168.1.254", "255.255.255.255", "8.8.8.8"],
    "iban": [
        "DE89 3704 0044 0532 0130 00",
        "DE89370400440532013000",
        "GB82 WEST 1234 5698 7654 32",
        "gb82west12345698765432",
        "FR14 2004 1010 0505 0001 3M02 606",
        "NL91ABNA0417164300",
    ],
    "secret": [
        "sk-proj-abc123DEF456ghi789JKL012mno345",
        "sk-" + "aB3" * 16,
        "AKIAIOSFODNN7EXAMPLE",
        "ghp_" + "a1B2c3" * 6,
        "gho_" + "Z9y8X7" * 6,
        "github_pat_11ABCDEFG0123456789_abcdefghijklmnopqrstuvwxyz0123456789ABCDEFGHIJKLMNOPQRSTUVWX",
        "xoxb-1234567890-abcdefghij",
        "-----BEGIN RSA PRIVATE KEY-----",
        "-----BEGIN PRIVATE KEY-----",
        "-----BEGIN OPENSSH PRIVATE KEY-----",
        "eyJhbGciOiJIUzI1NiJ9.eyJzdWIiOiIxMjM0NTY3ODkwIn0.SflKxwRJSMeKKF2QT4fwpMeJf36POk6yJV_adQssw5c",
    ],
}

PII_FALSE = {
    "email": ["bob@localhost", "@handle", "a @ b.com", "mail me at bob(at)example.com", "x@y"],
    "phone": [
        "12345",
        "call 555-1234",
        "2024-01-15",
        "15.01.2024",
        "$1,299.99",
        "version 1.2.3",
        "10:30",
        "3.14159",
        "ISBN 978-3-16-148410-0",
        "PO 0123456789",
        "room 101",
    ],
    "credit_card": ["4111 1111 1111 1112", "0000 0000 0000 0000", "1234", "12345678901234567890123", "4111 1111"],
    "ipv4": ["256.1.1.1", "1.2.3", "1.2.3.4.5", "01.02.03.04", "999.999.999.999"],
    "iban": ["DE89 3704 0044 0532 0130 01", "XX89 3704 0044 0532 0130 00", "DE89 3704", "de89370400440532013000abc"],
    "secret": [
        "sk-learn-is-a-library-not-a-key-ok",
        "AKIA1234",
        "ghp_short",
        "-----BEGIN PUBLIC KEY-----",
        "eyJhbGciOiJIUzI1NiJ9",
        "task-something-else",
        "mask-abcdefghij0123456789abcdef",
    ],
}


@pytest.mark.parametrize(("entity", "value"), [(e, v) for e, values in PII_TRUE.items() for v in values])
def test_pii_is_found(entity: str, value: str) -> None:
    eng = engine(pii(entity))
    assert moderated(eng, f"value: {value}, ok") == ModerationResult(f"value: [{entity}], ok", (Action(entity, "redact"),))


@pytest.mark.parametrize(("entity", "value"), [(e, v) for e, values in PII_FALSE.items() for v in values])
def test_pii_false_positives_are_left_alone(entity: str, value: str) -> None:
    eng = engine(pii(entity))
    assert moderated(eng, f"value: {value}, ok") == ModerationResult(f"value: {value}, ok")


def test_a_card_number_right_after_other_digits_is_still_found() -> None:
    # The 18 digits from "12" on fail the Luhn check; the 16 from "4111" on pass it.
    assert moderated(engine(pii("credit_card")), "ref 12 4111 1111 1111 1111.").text == "ref 12 [credit_card]."


def test_pii_hidden_by_invisible_characters_is_redacted_with_them() -> None:
    eng = engine(pii("credit_card"), pii("email"))
    assert moderated(eng, "card 4111\u200b1111\u00ad1111 １１１１ or b\u200bob@example.com.").text == "card [credit_card] or [email]."


def test_a_pem_key_is_blocked_before_any_of_it_leaks() -> None:
    eng = engine({"name": "secret", "type": "pii", "entity": "secret", "action": "block"})
    key = "Here it is:\n-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7\n-----END RSA PRIVATE KEY-----"
    result = moderated(eng, key)
    assert result.text == "Here it is:\n" and result.blocked == Action("secret", "block")


# -- config problems ----------------------------------------------------------------------


def problems(*rules: dict[str, Any], redaction: str = "[{rule}]") -> list[str]:
    with pytest.raises(ConfigError) as info:
        engine(*rules, redaction=redaction)
    return info.value.problems


def test_an_unreadable_terms_file_is_a_config_problem(tmp_path: Path) -> None:
    missing = tmp_path / "nope.txt"
    (found,) = problems(terms("t", terms_file=str(missing)))
    assert found.startswith("moderation.rules[0].terms_file: cannot read") and str(missing) in found


def test_a_terms_file_that_is_not_utf8_is_a_config_problem(tmp_path: Path) -> None:
    path = tmp_path / "latin1.txt"
    path.write_bytes("caf\xe9\n".encode("latin-1"))
    assert problems({"name": "t", "type": "terms", "terms_file": str(path)}) == [
        f"moderation.rules[0].terms_file: {path} is not UTF-8 text"
    ]


def test_an_empty_term_list_is_a_config_problem(tmp_path: Path) -> None:
    path = tmp_path / "empty.txt"
    path.write_text("# only a comment\n\n   \n", encoding="utf-8")
    assert problems({"name": "t", "type": "terms", "terms_file": str(path)}) == ["moderation.rules[0]: the term list is empty"]


def test_a_term_with_nothing_visible_is_a_config_problem(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_text("fine\n\u200b\u200b\n", encoding="utf-8")
    found = problems({"name": "t", "type": "terms", "terms": ["ok", "\u00ad"], "terms_file": str(path)})
    assert found == [
        "moderation.rules[0].terms[1]: the term '\\xad' has no visible characters",
        f"{path}:2: the term '\\u200b\\u200b' has no visible characters",
    ]


@pytest.mark.parametrize("pattern", ["a*", r"\b", r"\pL*", "x|", "(a?)"])
def test_a_pattern_that_can_match_nothing_is_a_config_problem(pattern: str) -> None:
    (found,) = problems({"name": "r", "type": "regex", "pattern": pattern, "max_match_chars": 5})
    assert found.startswith("moderation.rules[0].pattern: can match the empty string")


def test_max_match_chars_shorter_than_any_match_is_a_config_problem() -> None:
    (found,) = problems({"name": "r", "type": "regex", "pattern": "[0-9]{8}", "max_match_chars": 5})
    assert found.startswith("moderation.rules[0].max_match_chars: 5 is shorter than the shortest match (8")


def test_leetspeak_on_a_pii_rule_is_a_config_problem() -> None:
    assert problems(pii("email", leetspeak=True)) == ["moderation.rules[0].leetspeak: applies to terms and regex rules, not to pii"]


def test_a_bad_redaction_template_is_a_config_problem() -> None:
    (found,) = problems(terms("t", "x"), redaction="[{name}]")
    assert found.startswith("moderation.redaction: not a valid template")


def test_every_problem_is_reported_at_once(tmp_path: Path) -> None:
    found = problems(
        terms("a", terms_file=str(tmp_path / "missing.txt")),
        {"name": "b", "type": "regex", "pattern": "x*", "max_match_chars": 3},
        pii("phone", leetspeak=True),
    )
    assert [p.split(":")[0] for p in found] == [
        "moderation.rules[0].terms_file",
        "moderation.rules[1].pattern",
        "moderation.rules[2].leetspeak",
    ]


def test_terms_files_skip_comments_and_blank_lines_and_keep_inline_hashes(tmp_path: Path) -> None:
    path = tmp_path / "terms.txt"
    path.write_text("\ufeff# heading\n\n  c#  \nfoo bar\n   # indented comment\n", encoding="utf-8")
    eng = engine({"name": "t", "type": "terms", "terms_file": str(path), "action": "redact"})
    assert moderated(eng, "I write c# and foo  bar, # indented comment").text == "I write [t] and [t], # indented comment"


def test_the_example_blocklist_loads() -> None:
    eng = engine({"name": "t", "type": "terms", "terms_file": str(REPO / "config/blocklists/example.txt"), "action": "redact"})
    assert moderated(eng, "The FORBIDDEN\n  phrase is classified, not declassified.").text == "The [t] is [t], not declassified."


# -- large lists -------------------------------------------------------------------------


def _words(count: int, rng: random.Random) -> list[str]:
    return ["".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(5, 12))) for _ in range(count)]


def test_large_term_lists_match_and_report_their_speed(capsys: pytest.CaptureFixture[str]) -> None:
    """10k and 50k terms: correctness is asserted; speed is printed, never asserted (no flaky timings)."""
    rng = random.Random(7)
    prose = " ".join(rng.choice(["the", "cat", "sat", "on", "a", "mat", "and", "then", "left,", "again."]) for _ in range(6000))
    figures = []
    for size in (10_000, 50_000):
        words = _words(size, rng)
        needle = words[size // 2]
        eng = engine(terms("big", *words, "two words", action="redact"))
        text = f"{prose} {needle.upper()} two\n words {prose}"
        started = time.perf_counter()
        result = eng.moderate(text, "output")
        elapsed = time.perf_counter() - started
        assert result.text == f"{prose} [big] [big] {prose}"
        figures.append(f"{size} terms: {1000 * elapsed / (len(text) / 1024):.3f} ms/KB")
        streamed, _ = stream(eng, [text[i : i + 5] for i in range(0, len(text), 5)])
        assert streamed == result
    with capsys.disabled():
        print("\nmoderation, large term lists: " + "; ".join(figures))
