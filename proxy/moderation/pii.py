"""PII detectors: an RE2 pattern, a check where one exists, and a tail for the window.

The patterns run on the ``plain`` view (NFKC, case-folded, invisible characters
dropped, whitespace runs shortened to their first character), so they are
written in lower case and fullwidth digits or zero-width characters inside a
number do not hide it. RE2 has no lookarounds: each pattern's group 1 is the
match, and it may consume one or two characters after it to check its right
edge (``matchers.RIGHT_CONTEXT``); ``left`` says which characters may not
come just before it.

The ``tail`` of a detector matches, up to the end of the text, every stretch
that could still grow into a match, or a finished match still waiting for the
characters after it; each is bounded by its detector's ``hold_chars`` (the
longest match and one character), so a 199-digit number is not held whole,
and a group of detectors can ask one merged tail (``PatternGroup``). Prose that cannot be the start of an e-mail address
or a card number is released at once.

What each finds:

* ``email``: internationalised addresses too (letters of any script, an IDN
  or punycode domain), apostrophes in the local part ("o'brien@"); a domain
  whose last label is a file extension is an asset name ("icon@2x.png").
* ``phone``: a run of digits and separators checked by Google's
  libphonenumber (the ``phonenumbers`` package): "+" or "00" and a country
  code, or a national number with a trunk "0" (Europe, China, Japan...), a
  North American 3-3-4 form, a Chinese mobile or a Spanish 9-digit form.
  Coordinates ("+40.712776"), dates, versions and card numbers are not
  valid numbers there and are left alone.
* ``credit_card``: 13-19 digits with a valid Luhn digit.
* ``ipv4``, ``iban`` (known country, exact length, mod-97 check).
* ``secret``: API keys by their documented prefixes (OpenAI, Anthropic, AWS,
  GitHub, GitLab, Slack, Stripe, Google, Hugging Face, JWTs), and whole PEM
  and PGP private key blocks, header to footer (the header alone when the
  footer does not come within ``SECRET_MAX_CHARS``).
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import phonenumbers

from .linear_regex import LinearPattern, options
from .matchers import PatternMatcher, Quiet, Validator


@dataclass(frozen=True)
class Detector:
    """One PII entity. One of ``needs`` is inside every match: the matcher skips text without any.

    ``quiet(text, base, start, t)`` is what the tail's search from ``start``
    would answer, computed in Python, for ASCII text with none of ``needs``
    in ``text[start:t]`` (most prose): a call into RE2 costs more than a
    streamed chunk's whole round. ``test_quiet_frontiers_equal_the_tails``
    checks each against its tail.
    """

    pattern: str
    tail: str
    max_len: int
    left: frozenset[str] | str = ""
    needs: tuple[str, ...] | None = None
    validate: Validator | None = None
    quiet: Quiet | None = None


def _prefixes(*literals: str) -> str:
    """An alternation of every proper prefix of ``literals`` (the empty one included)."""
    parts = {literal[:i] for literal in literals for i in range(len(literal))}
    return "|".join(re.escape(p) for p in sorted(parts, key=len, reverse=True))


_DIGIT = tuple("0123456789")
_ASCII_ALNUM = "abcdefghijklmnopqrstuvwxyz0123456789"


def _digits(text: str) -> str:
    return "".join(c for c in text if c.isdigit())


def _trailing_run(text: str, start: int, stop: int, chars: str, cap: int) -> int:
    """How many of the characters before ``stop`` (none before ``start``) are in ``chars``, at most ``cap``."""
    piece = text[max(start, stop - cap) : stop]
    return len(piece) - len(piece.rstrip(chars))


def _quiet_nothing(text: str, base: int, start: int, t: int) -> int:
    return t


_quiet_nothing.never_live = True  # type: ignore[attr-defined]


def _quiet_email(text: str, base: int, start: int, t: int) -> int:
    # No "@": the tail is a local part of at most 64 characters, then any one character.
    if t <= start:
        return t
    return t - 1 - _trailing_run(text, start - base, t - 1 - base, TAIL_LOCAL_ASCII, 64)


# Its stretch covers every shorter one of local-part characters ending at the text's end.
_quiet_email.covers_local_runs = True  # type: ignore[attr-defined]


def _quiet_phone(text: str, base: int, start: int, t: int) -> int:
    # No digit: a "+" or "(" that may begin a number, then any one character.
    if t - 2 >= start and text[t - 2 - base] in "+(":
        return t - 2
    return t - 1 if t > start else t


def _quiet_iban(text: str, base: int, start: int, t: int) -> int:
    # No digit: one or two letters that may begin a country code.
    return t - _trailing_run(text, start - base, t - base, "abcdefghijklmnopqrstuvwxyz", 2)


_quiet_iban.local_run = True  # type: ignore[attr-defined]  # letters only, at most 2


class _WordChars(frozenset):
    """A ``left`` set that also holds every letter and digit of any script."""

    def __contains__(self, char: object) -> bool:
        return isinstance(char, str) and (char.isalnum() or frozenset.__contains__(self, char))


# -- e-mail -------------------------------------------------------------------

# Last labels that name a file, not a domain: "icon@2x.png" is an image.
_ASSET_EXTENSIONS = frozenset(
    "png jpg jpeg gif svg webp bmp ico tif tiff avif heic css js mjs map woff woff2 ttf otf eot "
    "mp3 mp4 wav webm mov pdf json yaml yml lock".split()
)
# What a local part may hold, as the tail sees it (``PatternGroup`` has it in Python too).
TAIL_LOCAL_ASCII = "abcdefghijklmnopqrstuvwxyz0123456789._%+'-"
_TAIL_LOCAL = r"(?:[a-z0-9._%+'-]|[^\x00-\x7f])"


def _email_ok(match: str) -> int | None:
    """RFC 5321's bounds (the pattern leaves them out: RE2's automaton for them is a hundred times larger)."""
    local, _, domain = match.rpartition("@")
    labels = domain.split(".")
    if (
        len(local) > 64
        or local.endswith(".")
        or ".." in local
        or any(len(label) > 63 or label.endswith("-") for label in labels)
        or not (labels[-1].startswith("xn--") or 2 <= len(labels[-1]) <= 24)
        or labels[-1] in _ASSET_EXTENSIONS
    ):
        return None
    return len(match)


_EMAIL = Detector(
    pattern=(
        r"([\pL\pN_%+-][\pL\pN\pM._%+'-]*@(?:[\pL\pN][\pL\pN\pM-]*\.)+(?:\pL[\pL\pM]+|xn--[a-z0-9-]+))"
        r"(?:[^\pL\pN\pM.-]|\.[^\pL\pN]|\.?\z)"
    ),
    # ASCII classes and "any non-ASCII" rather than \\pL: the same live stretches for
    # the window (a tail may hold more, never less), and a DFA a thousand times smaller.
    tail=rf"{_TAIL_LOCAL}{{0,64}}(?:@(?:[a-z0-9.-]|[^\x00-\x7f]){{0,189}})?.?\z",
    max_len=254,
    left=_WordChars("._%+-"),
    needs=("@",),
    validate=_email_ok,
    quiet=_quiet_email,
)


# -- phone --------------------------------------------------------------------

# Regions tried for a national number with a trunk "0", in order.
_TRUNK_ZERO_REGIONS = ("GB", "DE", "FR", "IT", "NL", "BE", "CH", "AT", "CN", "JP", "AU", "IN", "SE", "IE", "TR")
_NANP = re.compile(r"(?:1[ .-]?)?(?:\([2-9][0-9]{2}\) ?|[2-9][0-9]{2}[ .-])[0-9]{3}[ .-][0-9]{4}")
_CN_MOBILE = re.compile(r"1[3-9][0-9](?:[ -]?[0-9]{4}){2}")
_ES_NINE = re.compile(r"[6-9][0-9]{2}(?: [0-9]{2} [0-9]{2} [0-9]{2}| [0-9]{3} [0-9]{3})")
_RU_EIGHT = re.compile(r"8 ?\([0-9]{3,5}\) ?[0-9 -]{5,10}")
_SEPARATOR = re.compile(r"[ ().-]")


@functools.lru_cache(maxsize=4096)
def _valid_phone(text: str) -> bool:
    digits = len(_digits(text))
    if not 7 <= digits <= 15:
        return False
    try:
        if text.startswith(("+", "00")):
            number = phonenumbers.parse("+" + text[2:] if text.startswith("00") else text, None)
            return phonenumbers.is_valid_number(number) or (
                number.country_code == 1 and _NANP.fullmatch(text[2:].lstrip(" ")) is not None
            )
        if _NANP.fullmatch(text):
            return phonenumbers.is_possible_number(phonenumbers.parse(text, "US"))
        if _SEPARATOR.search(text) is None and _CN_MOBILE.fullmatch(text) is None:
            return False  # a bare run of digits is an order number, not a phone
        regions: tuple[str, ...] = ()
        if text.lstrip("(").startswith("0"):
            regions = _TRUNK_ZERO_REGIONS
        elif _CN_MOBILE.fullmatch(text):
            regions = ("CN",)
        elif _ES_NINE.fullmatch(text):
            regions = ("ES",)
        elif _RU_EIGHT.fullmatch(text):
            regions = ("RU",)
        return any(phonenumbers.is_valid_number(phonenumbers.parse(text, region)) for region in regions)
    except phonenumbers.NumberParseException:
        return False


def _phone_ok(match: str) -> int | None:
    """The longest prefix of the run (cut before a separator) that libphonenumber calls a number."""
    cut = len(match)
    for _ in range(4):
        candidate = match[:cut].rstrip(" ().-")
        if candidate.count("(") != candidate.count(")"):
            candidate = candidate.rstrip("(")
        if _valid_phone(candidate):
            return len(candidate)
        separator = max(candidate.rfind(" "), candidate.rfind("-"), candidate.rfind("."))
        if separator <= 0:
            return None
        cut = separator
    return None


_PHONE = Detector(
    pattern=r"((?:\+|00|\()?[0-9][0-9 ()./-]{4,24}[0-9])(?:[^\pL\pN]|\z)",
    tail=r"[+(]?(?:[0-9][0-9 ()./-]{0,25})?.?\z",
    max_len=28,
    left=_WordChars("+"),
    needs=_DIGIT,
    validate=_phone_ok,
    quiet=_quiet_phone,
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
    pattern=r"([0-9](?:[ -]?[0-9]){12,18})(?:[^0-9 -]|[ -](?:[^0-9]|\z)|\z)",
    tail=r"(?:[0-9][0-9 -]{0,36}.?)?\z",
    max_len=37,
    left=frozenset("0123456789-"),
    needs=_DIGIT,
    validate=_luhn_ok,
    quiet=_quiet_nothing,
)


# -- IPv4 ---------------------------------------------------------------------

_OCTET = r"(?:25[0-5]|2[0-4][0-9]|1[0-9]{2}|[1-9]?[0-9])"
_IPV4 = Detector(
    pattern=rf"((?:{_OCTET}\.){{3}}{_OCTET})(?:[^\pL\pN_.]|\.(?:[^0-9]|\z)|\z)",
    tail=r"(?:[0-9][0-9.]{0,14}.?)?\z",
    max_len=15,
    left=_WordChars("._"),
    needs=_DIGIT,
    quiet=_quiet_nothing,
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
}  # fmt: skip


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
    pattern=r"([a-z]{2}[0-9]{2}(?: ?[a-z0-9]{4}){2,7}(?: ?[a-z0-9]{1,4})?)(?:[^a-z0-9]|\z)",
    tail=r"(?:[a-z]{1,2}|[a-z]{2}[0-9]|[a-z]{2}[0-9]{2}[a-z0-9 ]{0,40}.?)?\z",
    max_len=44,
    left=frozenset(_ASCII_ALNUM),
    needs=_DIGIT,
    validate=_iban_ok,
    quiet=_quiet_iban,
)


# -- secrets ------------------------------------------------------------------

SECRET_MAX_CHARS = 8000  # a PEM block of an 8192-bit RSA key is about 6,400 characters

_TOKEN_PREFIXES = (
    "sk-", "sk_live_", "rk_live_", "sk_test_", "rk_test_", "akia", "asia", "ghp_", "gho_", "ghu_", "ghs_",
    "ghr_", "github_pat_", "glpat-", "hf_", "aiza", "xoxb-", "xoxa-", "xoxp-", "xoxr-", "xoxs-", "eyj",
)  # fmt: skip
_PEM_PREFIX = "-----begin "
_KEY_LABEL = r"(?:[a-z0-9]{1,20} ){0,3}private key(?: block)?-----"

_SECRET_PATTERN = (
    r"((?:sk-[a-z0-9_-]{20,250}"  # OpenAI (sk-proj-...), Anthropic (sk-ant-api03-...)
    r"|[rs]k_(?:live|test)_[a-z0-9]{10,99}"  # Stripe secret and restricted keys
    r"|a[ks]ia[a-z0-9]{16}"  # AWS access key id
    r"|gh[opusr]_[a-z0-9]{36,251}"  # GitHub tokens
    r"|github_pat_[a-z0-9_]{22,251}"  # GitHub fine-grained tokens
    r"|glpat-[a-z0-9_-]{20,50}"  # GitLab personal access tokens
    r"|hf_[a-z0-9]{30,40}"  # Hugging Face tokens
    r"|aiza[a-z0-9_-]{35}"  # Google API keys
    r"|xox[baprs]-[a-z0-9-]{10,250}"  # Slack
    r"|eyj[a-z0-9_-]{8,400}\.eyj[a-z0-9_-]{8,999}\.[a-z0-9_-]{0,400}"  # JWT
    r"))(?:[^a-z0-9_-]|\z)"
    # PEM and PGP private key blocks, header to footer (the header alone without a footer); the
    # body has no run of five dashes, so a block ends at its own footer, as its tail says.
    rf"|(-----begin {_KEY_LABEL}(?:(?:[^-]|-{{1,4}}[^-])*-----end {_KEY_LABEL})?)"
)


def _secret_ok(match: str) -> int | None:
    """``sk-`` followed by a hyphenated word is prose; a key has digits in it."""
    if match.startswith("sk-") and not any(c.isdigit() for c in match[3:]):
        return None
    return len(match)


_SECRET_PARTIALS = frozenset(p[:i] for p in (*_TOKEN_PREFIXES, _PEM_PREFIX) for i in range(1, len(p)))
_LONGEST_PARTIAL = max(map(len, _SECRET_PARTIALS))


_PARTIAL_ENDS = frozenset(p[-1] for p in _SECRET_PARTIALS)


def _quiet_secret(text: str, base: int, start: int, t: int) -> int:
    # No prefix whole: the end of the text may be the beginning of one.
    if t <= start or text[t - 1 - base] not in _PARTIAL_ENDS:
        return t
    for size in range(min(_LONGEST_PARTIAL, t - start), 0, -1):
        if text[t - size - base : t - base] in _SECRET_PARTIALS:
            return t - size
    return t


_quiet_secret.local_run = True  # type: ignore[attr-defined]  # letters and "-", at most 10


_SECRET = Detector(
    pattern=_SECRET_PATTERN,
    tail=(
        r"(?:" + _prefixes(*_TOKEN_PREFIXES) + "|"
        r"(?:" + "|".join(re.escape(p) for p in _TOKEN_PREFIXES) + r")[a-z0-9_.-]*.?"
        r"|" + _prefixes(_PEM_PREFIX) + "|" + re.escape(_PEM_PREFIX) + r"[a-z0-9 ]*(?:-{1,5}"
        # a key block until its footer is complete: no run of five dashes in the body
        r"(?:(?:[^-]|-{1,4}[^-])*(?:-{1,5}(?:e(?:n(?:d(?: [a-z0-9 ]*-{0,5})?)?)?)?)?)?)?.?"
        r")\z"
    ),
    max_len=SECRET_MAX_CHARS,
    left=frozenset(_ASCII_ALNUM + "_-"),
    needs=("sk", "rk_", "akia", "asia", "_", "glpat", "aiza", "xox", "eyj", "-----"),
    validate=_secret_ok,
    quiet=_quiet_secret,
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
    return PatternMatcher(
        LinearPattern(detector.pattern, options()),
        detector.max_len,
        view="plain",
        tail=LinearPattern(detector.tail, options(dot_nl=True)),  # a tail's "." is any character
        validate=detector.validate,
        needs=detector.needs,
        quiet=detector.quiet,
        left=detector.left,
        groups=(1, 2) if entity == "secret" else (1,),
    )
