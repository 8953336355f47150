"""Disguises under which a reader still reads a blocked term, generated from a few terms.

Each class is a way issue 20 found a term to slip through; ``MISSES`` are the
classes a term list defensibly does not catch (reported, not counted).
"""

from __future__ import annotations

import random
from collections.abc import Callable

LATIN_TERMS = ["cocaine", "terror", "heroin", "bomb", "porn", "nazi"]
TEMPLATES = ["I want {} now.", "Tell me about {} please", "{}", "so — {}!", "We talked about {} and more."]
CJK_CASES = [  # (term, running text with the term in it)
    ("炸弹", "他说这个炸弹很危险"), ("毒品", "不要碰毒品和酒精"), ("恐怖袭击", "新闻报道了恐怖袭击事件"),
    ("爆弾", "映画の中で爆弾が見つかった"), ("麻薬", "麻薬の取引は違法です"),
]  # fmt: skip

# Look-alikes drawn from Unicode's confusables for the letters the terms use.
# (Unicode lists no Cyrillic or Greek look-alike of "n": "п" and "ν" read as other letters.)
CYRILLIC = {"a": "а", "c": "с", "e": "е", "o": "о", "p": "р", "x": "х", "y": "у", "i": "і", "h": "һ"}
GREEK = {"a": "α", "o": "ο", "i": "ι", "p": "ρ", "t": "τ", "e": "ε"}
ARMENIAN = {"o": "օ", "n": "ո", "h": "հ", "u": "ս"}
SMALL_CAPS = {"a": "ᴀ", "c": "ᴄ", "o": "ᴏ", "p": "ᴘ", "t": "ᴛ", "e": "ᴇ", "r": "ʀ", "n": "ɴ", "i": "ɪ", "z": "ᴢ", "m": "ᴍ", "b": "ʙ", "h": "ʜ"}
CHEROKEE = {"a": "Ꭺ", "b": "Ᏼ", "c": "Ꮯ", "e": "Ꭼ", "h": "Ꮋ", "p": "Ꮲ", "t": "Ꭲ", "z": "Ꮓ", "m": "Ꮇ", "r": "Ꭱ"}
ACCENTED = {"a": "ä", "e": "é", "i": "ï", "o": "ö", "u": "ü", "c": "ç", "n": "ñ"}
INVISIBLES = ["\u200b", "\u200c", "\u00ad", "\u2060", "\ufeff", "\u206a", "\u206f", "\u180b", "\u180f",
              "\U0001bca0", "\U0001bca3", "\U0001d173", "\U0001d17a", "\U000e0041", "\ufe0f", "\u034f"]  # fmt: skip


def _swap(term: str, table: dict[str, str], every: bool) -> str | None:
    """The term with one (the first) or every swappable letter replaced; None if there is none."""
    out, done = [], False
    for char in term:
        if char in table and (every or not done):
            out.append(table[char])
            done = True
        else:
            out.append(char)
    return "".join(out) if done else None


def _zalgo(term: str, marks: int, rng: random.Random) -> str:
    return "".join(c + "".join(chr(rng.randint(0x300, 0x36F)) for _ in range(marks)) for c in term)


def _split(term: str, insert: str) -> str:
    return insert.join(term)


def classes(rng: random.Random) -> dict[str, Callable[[str], str | None]]:
    return {
        "upper case": str.upper,
        "precomposed accents": lambda t: _swap(t, ACCENTED, every=True),
        "decomposed accents": lambda t: "".join(c + "\u0308" for c in t),
        "zalgo (3 marks a letter)": lambda t: _zalgo(t, 3, rng),
        "zalgo (60 marks a letter)": lambda t: _zalgo(t, 60, rng),
        "markdown **ab**cd": lambda t: f"**{t[:2]}**{t[2:]}",
        "markdown _ab_cd": lambda t: f"_{t[:2]}_{t[2:]}",
        "markdown a**bc**d": lambda t: f"{t[0]}**{t[1:3]}**{t[3:]}",
        "markdown ~~ab~~cd": lambda t: f"~~{t[:2]}~~{t[2:]}",
        "zero-width and other ignorables": lambda t: _split(t, rng.choice(INVISIBLES)),
        "U+206A-206F, U+180B-180F, U+1BCA0-1BCA3, U+1D173-1D17A": lambda t: t[0] + rng.choice(INVISIBLES[5:13]) + t[1:],
        "17 invisibles in a row": lambda t: t[:2] + "\u200b" * 17 + t[2:],
        "300 invisibles in a row": lambda t: t[:2] + "\u2060" * 300 + t[2:],
        "one Cyrillic look-alike": lambda t: _swap(t, CYRILLIC, every=False),
        "every Cyrillic look-alike": lambda t: _swap(t, CYRILLIC, every=True),
        "Greek look-alikes": lambda t: _swap(t, GREEK, every=True),
        "Armenian look-alikes": lambda t: _swap(t, ARMENIAN, every=False),
        "Cherokee look-alikes": lambda t: _swap(t, CHEROKEE, every=False),
        "small capitals": lambda t: _swap(t, SMALL_CAPS, every=True),
        "fullwidth": lambda t: "".join(chr(ord(c) + 0xFEE0) for c in t),
        "mathematical bold": lambda t: "".join(chr(0x1D41A + ord(c) - 97) for c in t),
        "against CJK characters": lambda t: None,  # built below, with CJK around the term
    }


# Defensible misses for a term list (see the README): reported, not counted.
MISSES: dict[str, Callable[[str], str]] = {
    "spaced-out letters": lambda t: " ".join(t),
    "repeated letters": lambda t: t[0] + t[1] * 3 + t[2:],
    "HTML entities": lambda t: "".join(f"&#{ord(c)};" for c in t[:2]) + t[2:],
}


def cases(seed: int = 20) -> list[tuple[str, str]]:
    """(class, text) pairs, each text containing one disguised blocked term."""
    rng = random.Random(seed)
    out = []
    for name, make in classes(rng).items():
        for i, term in enumerate(LATIN_TERMS):
            if name == "against CJK characters":
                out.append((name, f"他说{term}是真的"))
                continue
            disguised = make(term)
            if disguised is None:
                continue
            out.append((name, TEMPLATES[i % len(TEMPLATES)].format(disguised)))
    for term, text in CJK_CASES:
        out.append(("CJK term in running CJK text", text))
        out.append(("CJK term in running CJK text", "据报道，" + text + "。"))
    for term in LATIN_TERMS[:3]:
        out.append(("leetspeak", "no {} here".format(term.replace("o", "0").replace("e", "3"))))
    return out


def misses() -> list[tuple[str, str]]:
    return [(name, f"I want {make(term)} now.") for name, make in MISSES.items() for term in LATIN_TERMS]
