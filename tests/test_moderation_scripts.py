"""Moderation that holds in every script and against what a reader still reads.

One test per disguise class of issue 20 (and the clean text each must leave
alone), the PII formats, RE2's linear time on hostile patterns, and
hypothesis properties of the new views: any chunking of a text with CJK,
diacritics, markdown inside words, default-ignorables and look-alikes
moderates exactly like the whole text, and holds back no more than
``max_window_chars``.
"""

from __future__ import annotations

import time
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ModerationConfig, RuleConfig
from proxy.moderation import ModerationEngine, ModerationResult
from proxy.moderation.unidata import default_ignorables

SETTINGS = settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])


def engine(*rules: dict[str, Any], redaction: str = "[{rule}]") -> ModerationEngine:
    return ModerationEngine.from_config(
        ModerationConfig(redaction=redaction, rules=[RuleConfig(**rule) for rule in rules])
    )


def terms(*words: str, **extra: Any) -> dict[str, Any]:
    return {"name": "r", "type": "terms", "terms": list(words), "action": "redact", **extra}


def pii(entity: str) -> dict[str, Any]:
    return {"name": entity, "type": "pii", "entity": entity, "action": "redact"}


def out(eng: ModerationEngine, text: str) -> str:
    return eng.moderate(text, "output").text


def streamed(eng: ModerationEngine, chunks: list[str]) -> ModerationResult:
    window = eng.stream("output")
    texts, actions, blocked = [], [], None
    for chunk in chunks:
        result = window.feed(chunk)
        assert window.held_chars <= eng.max_window_chars
        texts.append(result.text)
        actions += result.actions
        blocked = blocked or result.blocked
    result = window.finish()
    texts.append(result.text)
    actions += result.actions
    return ModerationResult("".join(texts), tuple(actions), blocked or result.blocked)


# -- CJK ----------------------------------------------------------------------------


def test_a_cjk_term_matches_wherever_it_occurs_in_word_mode() -> None:
    eng = engine(terms("秘密", "パスワード"))
    assert out(eng, "他说这是秘密文件") == "他说这是[r]文件"
    assert out(eng, "新しいパスワードを教えて") == "新しい[r]を教えて"


def test_a_cjk_character_is_a_word_boundary_for_a_latin_term() -> None:
    eng = engine(terms("secret"))
    assert out(eng, "他说secret是秘密") == "他说[r]是秘密"
    assert out(eng, "secretary 的 secrets") == "secretary 的 secrets"  # still whole words in Latin


def test_hangul_is_written_with_spaces_and_keeps_whole_words() -> None:
    eng = engine(terms("비밀"))
    assert out(eng, "그것은 비밀 입니다") == "그것은 [r] 입니다"
    assert out(eng, "비밀번호") == "비밀번호"


# -- diacritics -----------------------------------------------------------------------


@pytest.mark.parametrize(
    "disguised",
    ["bädwörd", "ba\u0308dwo\u0308rd", "BÄDWÖRD", "b\u0336a\u0337d\u0338w" + "\u0300\u0301\u0302" * 20 + "ord"],
)
def test_accents_precomposed_decomposed_or_zalgo_do_not_hide_a_term(disguised: str) -> None:
    assert out(engine(terms("badword")), f"a {disguised}!") == "a [r]!"


def test_a_letter_under_hundreds_of_zalgo_marks_is_still_the_letter() -> None:
    eng = engine(terms("kill"))
    assert out(eng, "k" + "\u0336\u0334" * 200 + "ill") == "[r]"


def test_marks_of_scripts_that_need_them_are_kept() -> None:
    # Devanagari vowel signs are letters of the word: "कमल" is not "कमला".
    eng = engine(terms("कमल"))
    assert out(eng, "कमला आई") == "कमला आई"
    assert out(eng, "एक कमल है") == "एक [r] है"


# -- markdown inside a word ----------------------------------------------------------


@pytest.mark.parametrize("disguised", ["**ab**cd", "_ab_cd", "a**bc**d", "~~abc~~d", "a*b*c*d", "ab__cd"])
def test_markdown_emphasis_inside_a_word_does_not_hide_a_term(disguised: str) -> None:
    result = engine(terms("abcd", action="block")).moderate(f"say {disguised} now", "output")
    assert result.blocked is not None, disguised


def test_snake_case_identifiers_are_one_word() -> None:
    eng = engine(terms("kill", "drop table"))
    code = "def kill_switch(): return my_kill_count  # kill_all\n"
    assert out(eng, code) == code
    assert out(eng, "then kill it") == "then [r] it"


def test_markers_standing_alone_separate_words() -> None:
    eng = engine(terms("ab"))
    assert out(eng, "x * ab * y") == "x * [r] * y"
    assert out(eng, "**ab**") == "**[r]**"


# -- invisible characters ------------------------------------------------------------


@pytest.mark.parametrize("char", ["\u206a", "\u206f", "\u180b", "\u180f", "\U0001bca0", "\U0001bca3", "\U0001d173", "\U0001d17a", "\u115f", "\U000e0041"])
def test_every_default_ignorable_is_dropped(char: str) -> None:
    assert out(engine(terms("badword")), f"b{char}adw{char}ord") == "[r]"


def test_the_whole_default_ignorable_set_is_known() -> None:
    ignorables = default_ignorables()
    assert len(ignorables) > 4000 and "\u200b" in ignorables and " " not in ignorables and "a" not in ignorables


@pytest.mark.parametrize("run", [17, 100, 5000])
def test_no_run_of_invisibles_opens_a_gap(run: int) -> None:
    eng = engine(terms("badword", action="block"))
    text = "bad" + "\u200b\u2060\u00ad" * run + "word"
    assert eng.moderate(text, "output").blocked is not None
    chunks = [text[i : i + 7] for i in range(0, len(text), 7)]
    result = streamed(eng, chunks)
    assert result.blocked is not None and result.text == ""


# -- look-alikes -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("disguised", "how"),
    [
        ("c\u043ep", "Cyrillic o inside a Latin word"),
        ("\u0441\u043e\u0440", "a whole Cyrillic look-alike word amid Latin"),
        ("c\u03bfp", "Greek omicron"),
        ("c\u0585p", "Armenian oh"),
        ("\u13dfo\u13e2", "Cherokee C and P around a Latin o"),
        ("\u1d04\u1d0f\u1d18", "small capitals"),
        ("ｃｏｐ", "fullwidth"),
    ],
)
def test_look_alike_letters_amid_latin_text_are_a_disguise(disguised: str, how: str) -> None:
    eng = engine(terms("cop", action="block"))
    assert eng.moderate(f"call the {disguised} now", "output").blocked is not None, how


def test_a_russian_word_in_a_russian_sentence_is_russian() -> None:
    eng = engine(terms("cop", "pop", "xe", action="block"))
    for sentence in ("В углу лежал сор.", "Сор лежал в углу.", "Хе-хе, поп!", "сор"[:0] + "Поп сказал: хе."):
        assert eng.moderate(sentence, "output") == ModerationResult(sentence), sentence


def test_a_russian_term_does_not_block_latin_text() -> None:
    eng = engine(terms("сор", action="block"))  # Cyrillic
    assert eng.moderate("the cop came", "output").blocked is None
    assert eng.moderate("В углу сор", "output").blocked is not None
    assert eng.moderate("В углу cop", "output").blocked is not None  # Latin look-alikes amid Russian


def test_german_sharp_s_is_not_folded_into_other_words() -> None:
    eng = engine(terms("mass", "masse", "busse", action="block"))
    for clean in ("Das Maß ist voll.", "Er zahlt Buße.", "Die Straße ist groß."):
        assert eng.moderate(clean, "output").blocked is None, clean


# -- leetspeak -------------------------------------------------------------------------


def test_a_number_alone_is_not_leetspeak() -> None:
    eng = engine(terms("hate", "lol", leetspeak=True, action="block"))
    for clean in ("flight 4473 leaves", "room 101 and 707", "call 1010"):
        assert eng.moderate(clean, "output").blocked is None, clean
    assert eng.moderate("i h4t3 it", "output").blocked is not None
    assert eng.moderate("l0l", "output").blocked is not None


# -- PII --------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "phone",
    [
        "+86 138 0013 8000", "138 0013 8000", "010-6552 9988", "+33 1 42 68 53 00", "01 42 68 53 00",
        "06 12 34 56 78", "+49 30 12345678", "030 12345678", "0049 30 12345678", "+44 20 7946 0958",
        "(212) 555-0123", "+81 3-1234-5678", "+34 612 34 56 78",
    ],
)  # fmt: skip
def test_phones_of_many_countries_are_redacted(phone: str) -> None:
    assert out(engine(pii("phone")), f"call {phone} today") == "call [phone] today"


@pytest.mark.parametrize(
    "clean", ["+40.712776, -74.005974", "on 2023-10-15", "version 1.2.3.4", "order 20231015001", "4111 1111 1111 1111"]
)
def test_coordinates_dates_versions_and_cards_are_not_phones(clean: str) -> None:
    assert out(engine(pii("phone")), clean) == clean


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("mail o'brien@example.ie now", "mail [email] now"),
        ("mail josé@exämple.de now", "mail [email] now"),
        ("写信给 用户@例子.中国", "写信给 [email]"),
        ("mail иван@пример.рф.", "mail [email]."),
        ("see icon@2x.png and logo@3x.webp", "see icon@2x.png and logo@3x.webp"),
    ],
)
def test_email_addresses_in_any_script_and_asset_names(text: str, expected: str) -> None:
    assert out(engine(pii("email")), text) == expected


PEM = "-----BEGIN RSA PRIVATE KEY-----\nMIIEpAIBAAKCAQEA7bq\nZ2V0IG91dCBvZiBoZXJl\nYWJjZGVmZ2hpams=\n-----END RSA PRIVATE KEY-----"
PGP = (
    "-----BEGIN PGP PRIVATE KEY BLOCK-----\nVersion: GnuPG v2\n\nlQOYBF1234567890abcdef\n=abcd\n"
    "-----END PGP PRIVATE KEY BLOCK-----"
)


@pytest.mark.parametrize("block", [PEM, PGP, PEM.replace("RSA ", ""), PEM.replace("RSA", "ENCRYPTED")])
def test_a_private_key_block_is_redacted_whole(block: str) -> None:
    eng = engine(pii("secret"))
    assert out(eng, f"key:\n{block}\nthanks") == "key:\n[secret]\nthanks"
    chunks = [f"key:\n{block}\nthanks"[i : i + 4] for i in range(0, len(block) + 12, 4)]
    assert streamed(eng, chunks).text == "key:\n[secret]\nthanks"


@pytest.mark.parametrize(
    "key",
    [
        "AIzaSyD-1234567890abcdefghijklmnopqrstu", "sk_live_51H8abcdefghijklmnopqrstuv", "rk_live_51H8abcdefghijklmnop",
        "hf_abcdefghijklmnopqrstuvwxyz01234567", "glpat-abcdefghij0123456789", "sk-ant-api03-abcdefghijklmnop_0123456789-xyz",
        "sk-proj-abc123def456ghi789jkl0", "ghp_" + "a1" * 18, "AKIAABCDEFGHIJKLMNOP", "xoxb-1234567890-abcdef",
    ],
)  # fmt: skip
def test_secret_formats_are_redacted(key: str) -> None:
    assert out(engine(pii("secret")), f"use {key} here") == "use [secret] here"


def test_a_long_number_is_not_held_whole() -> None:
    eng = engine(*(pii(e) for e in ("email", "phone", "credit_card", "ipv4", "iban", "secret")))
    window = eng.stream("output")
    window.feed("x " + "9" * 199)
    assert window.held_chars <= 70  # about the longest match that could still start (an e-mail's local part)


# -- RE2: no pattern stalls the loop ----------------------------------------------------


@pytest.mark.parametrize(
    ("pattern", "hostile"),
    [(r"(a+)+$", "a" * 5000 + "!"), (r"([a-z0-9]+[._-]?)+@corp\.example", "a" * 5000 + "!")],
)
def test_catastrophic_patterns_finish_quickly_whole_and_streamed(pattern: str, hostile: str) -> None:
    eng = engine({"name": "r", "type": "regex", "pattern": pattern, "max_match_chars": 200, "action": "block"})
    started = time.perf_counter()
    assert eng.moderate(hostile, "input").blocked is None or pattern == r"(a+)+$"
    streamed(eng, [hostile[i : i + 4] for i in range(0, len(hostile), 4)])
    # Python's backtracking engine takes seconds on 30 characters of this; RE2 is linear.
    assert time.perf_counter() - started < 5


# -- properties of the new views ---------------------------------------------------------

PIECES = [
    "a", "b", "c", "d", "o", "p", " ", "  ", "\n", "abcd", "cop", "秘密", "他说", "是", "の",
    "ä", "a\u0308", "\u0301", "\u0336" * 5, "*", "**", "_", "~~", "\u200b", "\u2060" * 40, "\u180b", "\U000e0041",
    "\u0430", "\u043e", "\u0441\u043e\u0440", "\u0440", "\u03bf", "\u1d04", "В углу ", "ß", "h4", "7",
    "bob@x.io", "+86 138 0013 8000", "-----BEGIN RSA PRIVATE KEY-----\nabc\n-----END RSA PRIVATE KEY-----", "\ud800",
]  # fmt: skip
texts = st.lists(st.sampled_from(PIECES), max_size=25).map("".join)

SCRIPTS_BLOCK = engine(
    terms("abcd", "cop", "秘密", "ab cd", action="block"),
    {"name": "leet", "type": "terms", "terms": ["hate"], "leetspeak": True, "action": "flag"},
    pii("email"),
    pii("phone"),
)
SCRIPTS_REDACT = engine(
    terms("abcd", "cop", "秘密", "рор", match="substring"),
    {"name": "w", "type": "terms", "terms": ["bad", "a b"], "action": "flag"},
    pii("secret"),
    pii("email"),
)


@st.composite
def split_texts(draw: st.DrawFn) -> tuple[str, list[str]]:
    text = draw(texts)
    cuts = sorted(draw(st.sets(st.integers(0, len(text)), max_size=12)))
    return text, [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]


@SETTINGS
@given(split_texts(), st.sampled_from([SCRIPTS_BLOCK, SCRIPTS_REDACT]))
def test_any_chunking_of_text_in_any_script_equals_the_whole(case: tuple[str, list[str]], eng) -> None:
    text, chunks = case
    assert streamed(eng, chunks) == eng.moderate(text, "output")


@SETTINGS
@given(texts)
def test_one_code_point_at_a_time_equals_the_whole_in_any_script(text: str) -> None:
    for eng in (SCRIPTS_BLOCK, SCRIPTS_REDACT):
        assert streamed(eng, list(text)) == eng.moderate(text, "output")


@SETTINGS
@given(
    st.lists(st.sampled_from(["", "*", "**", "_", "~~", "***"]), min_size=3, max_size=3),
    st.sampled_from(["", "\u200b", "\u0301", "\u2060" * 50]),
)
def test_markers_and_invisibles_between_the_letters_of_a_term_never_hide_it(markers: list[str], invisible: str) -> None:
    word = "a" + markers[0] + "b" + invisible + "c" + markers[1] + "d" + markers[2].replace("*", "")
    result = SCRIPTS_BLOCK.moderate(f"say {word} now", "output")
    assert result.blocked is not None, word


def test_check_config_names_a_regex_rule_re2_cannot_run(tmp_path) -> None:
    import subprocess
    import sys

    config = tmp_path / "sluice.yaml"
    config.write_text(
        "upstreams: [{name: main, base_url: 'http://127.0.0.1:9/v1', models: ['*']}]\n"
        "teams: [{name: t, models: ['*']}]\n"
        "accounting: {store: memory}\n"
        "moderation:\n  rules:\n"
        "    - {name: ticket-lookbehind, type: regex, pattern: '(?<=ticket )[0-9]{4}', max_match_chars: 4}\n",
        encoding="utf-8",
    )
    done = subprocess.run(
        [sys.executable, "-m", "proxy", "check-config", str(config)], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "rule 'ticket-lookbehind'" in done.stdout + done.stderr and "RE2" in done.stdout + done.stderr
