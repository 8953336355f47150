"""The Unicode data the normaliser needs and the standard library lacks: scripts, confusables, ignorables.

All three come from maintained packages that ship Unicode's own tables, read
once per process (``functools.cache``), never from the network:

* **Scripts** (``Scripts.txt``) and **confusables** (UTS #39
  ``confusables.txt``): the ``confusable-homoglyphs`` package ships both as
  JSON generated from Unicode's files.
* **Default_Ignorable_Code_Point** (``DerivedCoreProperties.txt``): the
  ``regex`` package (already needed by tiktoken) knows the property.

``latin_lookalike`` is drawn from the confusables table, not written by hand:
a letter folds to the ASCII letter that Unicode lists as its prototype,
directly or through a case variant (Cherokee small letters are confusable
with Latin capitals), or, for Latin small capitals, to the letter it is a
small capital of. ASCII itself never folds: "1" and "l" are not merged.
"""

from __future__ import annotations

import bisect
import functools
import json
import unicodedata
from importlib import resources

import regex

# Scripts written without spaces between words: each of their characters is a
# word boundary, so a term in them is found wherever it occurs.
NO_SPACE_SCRIPTS = frozenset(
    {"HAN", "HIRAGANA", "KATAKANA", "BOPOMOFO", "THAI", "LAO", "KHMER", "MYANMAR", "TANGUT", "NUSHU", "YI"}
)
# Scripts whose combining marks are diacritics on letters (so "é" is read as "e"
# and Zalgo marks as nothing); marks of other scripts (Indic vowel signs, Arabic
# harakat, Hebrew points) are part of their words and stay.
DIACRITIC_SCRIPTS = frozenset({"LATIN", "GREEK", "CYRILLIC", "ARMENIAN", "COMMON", "INHERITED", "CHEROKEE"})


def _load_json(name: str):
    return json.loads(resources.files("confusable_homoglyphs").joinpath(name).read_text(encoding="utf-8"))


@functools.cache
def _script_table() -> tuple[list[int], list[int], list[str]]:
    data = _load_json("categories.json")
    aliases = data["iso_15924_aliases"]
    starts, ends, names = [], [], []
    for low, high, script, _category in data["code_points_ranges"]:
        starts.append(low)
        ends.append(high)
        names.append(aliases[script])
    return starts, ends, names


@functools.cache
def script_of(char: str) -> str:
    """The Unicode script of one code point ("LATIN", "CYRILLIC", "HAN", "COMMON", ...)."""
    starts, ends, names = _script_table()
    code = ord(char)
    i = bisect.bisect_right(starts, code) - 1
    if i >= 0 and code <= ends[i]:
        return names[i]
    return "UNKNOWN"


@functools.cache
def is_no_space_char(char: str) -> bool:
    """A character of a script written without spaces (CJK, Thai...): a word of its own."""
    return char >= "\u0e00" and script_of(char) in NO_SPACE_SCRIPTS


@functools.cache
def default_ignorables() -> frozenset[str]:
    """Every Default_Ignorable_Code_Point: characters that render as nothing (about 4,200)."""
    every = "".join(map(chr, range(0x110000)))
    return frozenset(regex.findall(r"\p{Default_Ignorable_Code_Point}", every))


def _strip_bidi(text: str) -> str:
    return text.replace("\u200e", "").replace("\u200f", "")


@functools.cache
def _latin_lookalikes() -> dict[str, str]:
    graph: dict[str, list[str]] = {}
    for char, entries in _load_json("confusables.json").items():
        graph[_strip_bidi(char)] = [_strip_bidi(entry["c"]) for entry in entries]

    def ascii_letter(text: str) -> str | None:
        text = unicodedata.normalize("NFKC", text)
        if len(text) == 1 and text.isascii() and text.isalpha():
            return text.lower()
        return None

    def ascii_neighbours(char: str) -> set[str]:
        return {a for a in map(ascii_letter, graph.get(char, ())) if a}

    lookalikes: dict[str, str] = {}
    for char in graph:
        if len(char) != 1 or char.isascii() or not unicodedata.category(char).startswith("L"):
            continue
        # The char's own entries first; only without any, its other case's (so the
        # capital "I", confusable with "l", does not pull "ı" away from "i").
        found = ascii_neighbours(char)
        if not found:
            for variant in {char.upper(), char.lower()} - {char}:
                if len(variant) == 1:
                    found |= ascii_neighbours(variant)
        if len(found) == 1:
            lookalikes[char] = found.pop()
    # Latin small capitals read as their letter ("ᴀ" is "a"): Unicode names them so.
    for low, high in ((0x0180, 0x02AF), (0x1D00, 0x1DBF), (0xA720, 0xA7FF)):
        for code in range(low, high + 1):
            name = unicodedata.name(chr(code), "")
            if name.startswith("LATIN LETTER SMALL CAPITAL ") and len(name) == 28:
                lookalikes.setdefault(chr(code), name[-1].lower())
    return lookalikes


def latin_lookalike(char: str) -> str | None:
    """The ASCII letter ``char`` (a letter outside ASCII) is confusable with, or None."""
    return _latin_lookalikes().get(char)


def lookalike_table() -> dict[str, str]:
    """Every letter that folds to an ASCII look-alike (read-only use)."""
    return _latin_lookalikes()
