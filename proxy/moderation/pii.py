"""PII detectors: a pattern, a checksum where one exists, and a tail for the window.

The patterns run on the ``plain`` view (NFKC, case-folded, invisible characters
dropped, whitespace runs shortened to their first character), so they are
written in lower case and fullwidth digits or zero-width characters inside a
number do not hide it. Each pattern checks its own boundaries with lookarounds
of at most two characters (``matchers.RIGHT_CONTEXT``), and consumes only the
characters its ``tail`` allows; that is what makes the tail sound.

The ``tail`` of a detector matches, up to the end of the text, every stretch
that could still grow into a match, or a finished match still waiting for the
characters after it. Prose that cannot be the start of an e-mail address or a
card number is therefore released at once, although the longest address is
254 characters.

Deliberate limits: a phone number needs separators or a "+" (so plain runs of
digits, dates, prices and versions are left alone); a card number needs a
valid Luhn digit; an IBAN needs a known country, its exact length and a valid
mod-97 check; a PEM private key is caught by its header line only; a JWT is
at most about 2,000 characters.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .matchers import PatternMatcher, Validator, regex_width


@dataclass(frozen=True)
class Detector:
    """One PII entity: ``validate`` may reject or shorten a match; ``max_len`` caps an unbounded pattern.

    One of ``needs`` is inside every match ``pattern`` makes: the matcher
    skips text without any of them.
    """

    pattern: str
    tail: str
    needs: tuple[str, ...] | None = None
    validate: Validator | None = None
    max_len: int | None = None  # None: the pattern's own longest match


def _prefixes(*literals: str) -> str:
    """An alternation of every proper prefix of ``literals`` (the empty one included)."""
    parts = {literal[:i] for literal in literals for i in range(len(literal))}
    return "|".join(re.escape(p) for p in sorted(parts, key=len, reverse=True))


# The patterns' own digit class, [0-9] (NFKC has made fullwidth digits ASCII).
_DIGIT = tuple("0123456789")


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


# -- e-mail -------------------------------------------------------------------

_EMAIL = Detector(
    pattern=(
        r"(?<![a-z0-9._%+-])[a-z0-9._%+-]{1,64}@"
        r"(?:[a-z0-9](?:[a-z0-9-]{0,61}[a-z0-9])?\.)+[a-z]{2,24}"
        r"(?![a-z0-9-]|\.[a-z0-9])"
    ),
    # A run of address characters without "@" that has already ended cannot become one.
    tail=r"(?<![a-z0-9._%+-])[a-z0-9._%+-]*(?:@[a-z0-9.-]*.?)?\Z",
    needs=("@",),
    max_len=254,
)


# -- phone --------------------------------------------------------------------


def _phone_digits_ok(match: str) -> int | None:
    """International numbers have 8-15 digits (E.164); national ones 10-11."""
    count = len(_digits(match))
    if match.startswith("+"):
        return len(match) if 8 <= count <= 15 else None
    return len(match) if 10 <= count <= 11 else None


_PHONE = Detector(
    pattern=(
        r"(?<![\w+])(?:"
        r"\+[0-9]{1,3}[ .-]?(?:\([0-9]{1,4}\)|[0-9]{1,4})(?:[ .-]?[0-9]{1,4}){1,5}"  # +44 20 7946 0958
        r"|(?:1[ .-]?)?\([0-9]{3}\)[ .-]?[0-9]{3}[ .-][0-9]{4}"  # (555) 123-4567
        r"|(?:1[.-])?[0-9]{3}[.-][0-9]{3}[.-][0-9]{4}"  # 555-123-4567, 555.123.4567
        r"|[0-9]{3} [0-9]{3} [0-9]{4}"  # 555 123 4567
        r"|0[0-9]{1,4}(?:[ -][0-9]{2,6}){1,4}"  # 020 7946 0958, 07700 900123 (trunk prefix 0)
        r")(?!\w|[ .-][0-9])"
    ),
    tail=r"(?<![\w+])(?:[0-9+(][0-9+() .-]*.?)?\Z",
    needs=_DIGIT,
    validate=_phone_digits_ok,
)


# -- credit card --------------------------------------------------------------


def _luhn_ok(match: str) -> int | None:
    digits = _digits(match)
    if not 13 <= len(digits) <= 19 or len(set(digits)) == 1:
        return None
    total = 0
    for i, digit in enumerate(reversed(digits)):
        value = int(digit)
        if i % 2:
            value = value * 2 - 9 if value > 4 else value * 2
        total += value
    return len(match) if total % 10 == 0 else None


_CREDIT_CARD = Detector(
    pattern=r"(?<![0-9])(?<![0-9]-)[0-9](?:[ -]?[0-9]){12,18}(?![0-9]|[ -][0-9])",
    tail=r"(?<![0-9])(?<![0-9]-)(?:[0-9][0-9 -]*.?)?\Z",
    needs=_DIGIT,
    validate=_luhn_ok,
)


# -- IPv4 ---------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = Detector(
    pattern=rf"(?<![\w.])(?:{_OCTET}\.){{3}}{_OCTET}(?!\w|\.[0-9])",
    tail=r"(?<![\w.])(?:[0-9][0-9.]*.?)?\Z",
    needs=_DIGIT,
)


# -- IBAN ---------------------------------------------------------------------

# The length of an IBAN in each country that issues them (the IBAN registry).
IBAN_LENGTHS = {
    "ad": 24, "ae": 23, "al": 28, "at": 20, "az": 28, "ba": 20, "be": 16, "bg": 22, "bh": 22,
    "br": 29, "by": 28, "ch": 21, "cr": 22, "cy": 28, "cz": 24, "de": 22, "dk": 18, "do": 28,
    "ee": 20, "eg": 29, "es": 24, "fi": 18, "fo": 18, "fr": 27, "gb": 22, "ge": 22, "gi": 23,
    "gl": 18, "gr": 27, "gt": 28, "hr": 21, "hu": 28, "ie": 22, "il": 23, "iq": 23, "is": 26,
    "it": 27, "jo": 30, "kw": 30, "kz": 20, "lb": 28, "lc": 32, "li": 21, "lt": 20, "lu": 20,
    "lv": 21, "ly": 25, "mc": 27, "md": 24, "me": 22, "mk": 19, "mr": 27, "mt": 31, "mu": 30,
    "nl": 18, "no": 15, "pk": 24, "pl": 28, "ps": 29, "pt": 25, "qa": 29, "ro": 24, "rs": 22,
    "sa": 24, "sc": 31, "sd": 18, "se": 24, "si": 19, "sk": 24, "sm": 27, "st": 25, "sv": 28,
    "tl": 23, "tn": 24, "tr": 26, "ua": 29, "va": 22, "vg": 24, "xk": 20,
}


def _iban_ok(match: str) -> int | None:
    """Keep the country's exact length (the pattern may run on into the next word) and check mod 97."""
    length = IBAN_LENGTHS.get(match[:2])
    if length is None:
        return None
    seen = 0
    for cut, char in enumerate(match):
        if char != " ":
            seen += 1
            if seen == length:
                break
    else:
        return None
    rest = match[cut + 1 :]
    if rest and not rest.startswith(" "):
        return None  # the IBAN would end inside a word
    compact = match[: cut + 1].replace(" ", "")
    rearranged = compact[4:] + compact[:4]
    number = "".join(str(int(c, 36)) for c in rearranged)
    return cut + 1 if int(number) % 97 == 1 else None


_IBAN = Detector(
    pattern=r"(?<![a-z0-9])[a-z]{2}[0-9]{2}(?: ?[a-z0-9]{4}){2,7}(?: ?[a-z0-9]{1,4})?(?![a-z0-9])",
    tail=r"(?<![a-z0-9])(?:[a-z]{1,2}|[a-z]{2}[0-9]|[a-z]{2}[0-9]{2}[a-z0-9 ]*.?)?\Z",
    needs=_DIGIT,
    validate=_iban_ok,
)


# -- secrets ------------------------------------------------------------------


_TOKEN_PREFIXES = (
    "sk-", "akia", "asia", "ghp_", "gho_", "ghu_", "ghs_", "ghr_", "github_pat_",
    "xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-", "eyj",
)  # fmt: skip
_PEM_PREFIX = "-----begin "

_SECRET_PATTERN = (
    r"(?<![a-z0-9_-])(?:"
    r"sk-[a-z0-9_-]{20,200}"  # OpenAI (also sk-proj-...)
    r"|a[ks]ia[a-z0-9]{16}"  # AWS access key id
    r"|gh[opusr]_[a-z0-9]{36,251}"  # GitHub tokens
    r"|github_pat_[a-z0-9_]{22,251}"  # GitHub fine-grained tokens
    r"|xox[baprs]-[a-z0-9-]{10,250}"  # Slack
    r"|eyj[a-z0-9_-]{8,400}\.eyj[a-z0-9_-]{8,1200}\.[a-z0-9_-]{0,400}"  # JWT
    r")(?![a-z0-9_-])"
    r"|-----begin (?:[a-z0-9]{1,20} ){0,3}private key-----"  # PEM private key header
)


def _secret_ok(match: str) -> int | None:
    """``sk-`` followed by a hyphenated word is prose; an OpenAI key has digits in it."""
    if match.startswith("sk-") and not any(c.isdigit() for c in match[3:]):
        return None
    return len(match)


_SECRET = Detector(
    pattern=_SECRET_PATTERN,
    tail=(
        r"(?:(?<![a-z0-9_-])(?:" + _prefixes(*_TOKEN_PREFIXES) + "|"
        + r"(?:" + "|".join(re.escape(p) for p in _TOKEN_PREFIXES) + r")[a-z0-9_.-]*.?)"
        r"|(?:" + _prefixes(_PEM_PREFIX) + "|" + re.escape(_PEM_PREFIX) + r"[a-z0-9 -]*.?))\Z"
    ),
    # Every alternative of the pattern contains one of these ("_": the GitHub tokens);
    # fewer, shorter strings than the prefixes themselves, so quicker to look for.
    needs=("sk-", "akia", "asia", "_", "xox", "eyj", "-----"),
    validate=_secret_ok,
)

DETECTORS: dict[str, Detector] = {
    "email": _EMAIL,
    "phone": _PHONE,
    "credit_card": _CREDIT_CARD,
    "ipv4": _IPV4,
    "iban": _IBAN,
    "secret": _SECRET,
}


def pii_matcher(entity: str) -> PatternMatcher:
    """The matcher for one PII entity (compiled once per config load)."""
    detector = DETECTORS[entity]
    pattern = re.compile(detector.pattern)
    max_len = detector.max_len or regex_width(pattern)[1]
    return PatternMatcher(
        pattern,
        max_len,
        view="plain",
        tail=re.compile(detector.tail, re.DOTALL),
        validate=detector.validate,
        needs=detector.needs,
    )
