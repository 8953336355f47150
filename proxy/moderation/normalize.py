"""The normalised view that rules match on, built incrementally, with a map back.

Rules must not be dodged by text that *looks* the same but is spelt with other
code points, so matching happens on a normalised view of the text. Redaction
must still remove exactly what the reader would have seen, so every view
character remembers which original characters it came from.

How the view is made, one *segment* at a time (a starter and the combining
marks or composing characters that follow it, so NFKC never has to look across
a segment boundary):

* Unicode NFKC (fullwidth and mathematical letters, ligatures, NBSP...).
* Case folding, then letters that look like Latin ones (Cyrillic, Greek, a
  few Latin variants) are folded to them in the ``folded`` view; the
  ``plain`` view keeps them.
* Invisible characters are dropped: zero-width characters, soft hyphens, bidi
  controls, variation selectors, tag characters, the generic combining
  diacritics that NFKC could not compose (the "Zalgo" marks), and every
  whitespace character after the first of a run (so ``"a \\n\\t b"`` is
  ``"a b"``). The first whitespace character of a run stays: as itself in
  ``plain`` and as ``" "`` in ``folded``.

Both views have the same length and share one offset map: view character ``i``
came from the original characters ``starts[i]:ends[i]`` (its whole segment).
A match on view ``[a, b)`` therefore covers original ``[starts[a], ends[b-1])``,
with any invisible characters between its first and last letter.

Two caps keep the moderation window bounded however hostile the text is:

* ``MAX_SEGMENT_CODEPOINTS``: a segment stops growing after 8 code points; a
  further combining mark starts a segment of its own. Real orthographies need
  far fewer; only "Zalgo" text is cut.
* ``MAX_INVISIBLE_RUN``: at most 16 invisible code points (outside a segment
  that has a visible letter) are skipped in a row; the next invisible segment
  is kept in the view as itself, where it is not a letter and so ends any
  match. A match can therefore stretch over at most 16 invisible characters
  between two of its letters, and a multi-word term over a run of at most 17
  whitespace characters.

The view is made left to right and a closed segment never changes, so the view
of a text does not depend on how the text was split into chunks: only the last
(open) segment is provisional until the next character or the end arrives.
"""

from __future__ import annotations

import itertools
import re
import unicodedata

MAX_SEGMENT_CODEPOINTS = 8
MAX_INVISIBLE_RUN = 16

# Positions of a leetspeak term that may be written "1" (see ``leet_variants``).
MAX_LEET_AMBIGUOUS_POSITIONS = 6

_INVISIBLE = frozenset(
    "\u00ad"  # soft hyphen
    "\u034f"  # combining grapheme joiner
    "\u061c"  # Arabic letter mark
    "\u115f\u1160\u3164\uffa0"  # Hangul fillers
    "\u17b4\u17b5"  # Khmer inherent vowels
    "\u180e"  # Mongolian vowel separator
    "\u200b\u200c\u200d\u200e\u200f"  # zero-width space, non-joiner, joiner; LRM, RLM
    "\u202a\u202b\u202c\u202d\u202e"  # bidi embeddings and overrides
    "\u2060\u2061\u2062\u2063\u2064"  # word joiner, invisible operators
    "\u2066\u2067\u2068\u2069"  # bidi isolates
    "\ufeff"  # zero-width no-break space (BOM)
)

# Generic combining diacritics: the marks "Zalgo" text piles onto letters. Marks
# of particular scripts (Indic viramas, Arabic harakat...) are part of their
# words and stay in the view.
_DIACRITIC_RANGES = (
    ("\u0300", "\u036f"),
    ("\u1ab0", "\u1aff"),
    ("\u1dc0", "\u1dff"),
    ("\u20d0", "\u20ff"),
    ("\ufe20", "\ufe2f"),
)

_ASCII_RUN = re.compile(r"[\x00-\x7f]+")
# ``\s`` is ``str.isspace``: for ASCII that is \t\n\v\f\r, \x1c-\x1f and the space.
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_ASCII_WHITESPACE = "".join(c for c in map(chr, range(128)) if c.isspace())
_ASCII_WHITESPACE_TO_SPACE = str.maketrans({c: " " for c in _ASCII_WHITESPACE})
# Two whitespace characters in a row, in ASCII text (where ``\s`` is exactly these).
_ASCII_WHITESPACE_PAIR = re.compile(r"[\t\n\v\f\r\x1c-\x1f ]{2}")


def _is_invisible(char: str) -> bool:
    """True for a code point that renders as nothing (or as part of its neighbour)."""
    if char in _INVISIBLE:
        return True
    if "\ufe00" <= char <= "\ufe0f" or "\U000e0000" <= char <= "\U000e0fff":
        return True  # variation selectors; tag characters ("ASCII smuggling")
    return any(low <= char <= high for low, high in _DIACRITIC_RANGES)


# Look-alike letters folded to Latin in the ``folded`` view, after case folding
# (so a capital and its small letter always fold alike, and non-Latin terms
# still match in any case). Where the capital and the small letter resemble
# different Latin letters, the capital wins (Greek eta is "h", as "H").
# Each key is one case-folded code point and each value one ASCII letter, so
# both views keep the same length.
HOMOGLYPHS: dict[str, str] = {
    # Cyrillic
    "\u0430": "a", "\u0432": "b", "\u0433": "r", "\u0435": "e", "\u043a": "k", "\u043c": "m",
    "\u043d": "h", "\u043e": "o", "\u043f": "n", "\u0440": "p", "\u0441": "c", "\u0442": "t",
    "\u0443": "y", "\u0445": "x", "\u044c": "b", "\u0455": "s", "\u0456": "i", "\u0458": "j",
    "\u0475": "v", "\u04af": "y", "\u04bb": "h", "\u04cf": "l", "\u0501": "d", "\u051b": "q",
    "\u051d": "w",
    # Greek
    "\u03b1": "a", "\u03b2": "b", "\u03b5": "e", "\u03b6": "z", "\u03b7": "h", "\u03b9": "i",
    "\u03ba": "k", "\u03bc": "m", "\u03bd": "n", "\u03bf": "o", "\u03c1": "p", "\u03c4": "t",
    "\u03c5": "y", "\u03c7": "x", "\u03c9": "w", "\u03f2": "c", "\u03f3": "j",
    # Latin look-alikes (dotless i and j, script a and g, small capitals)
    "\u0131": "i", "\u0237": "j", "\u0251": "a", "\u0261": "g", "\u026a": "i", "\u0274": "n",
    "\u0280": "r", "\u028f": "y", "\u1d00": "a", "\u1d04": "c", "\u1d05": "d", "\u1d07": "e",
    "\u1d0b": "k", "\u1d0d": "m", "\u1d0f": "o", "\u1d18": "p", "\u1d1b": "t", "\u1d1c": "u",
}  # fmt: skip

# Leetspeak, for rules that ask for it. "1" stays "1" in the view because it
# stands for two letters ("i" and "l"); ``leet_variants`` spells terms both ways.
LEET = str.maketrans({"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_ONE = {"i": "i1", "l": "l1", "1": "1il"}


def is_word_char(char: str) -> bool:
    """Letters, digits and the marks that belong to them make words; the rest separates them."""
    if char < "\x80":
        return char.isalnum()
    return char.isalnum() or unicodedata.category(char)[0] == "M"


def original_chars_bound(view_chars: int) -> int:
    """How many original characters can stand behind ``view_chars`` view characters, plus the open segment.

    Each view character comes from a segment of at most ``MAX_SEGMENT_CODEPOINTS``
    and is followed by at most ``MAX_INVISIBLE_RUN`` skipped ones; the last,
    still open, segment is held back too.
    """
    return view_chars * (MAX_SEGMENT_CODEPOINTS + MAX_INVISIBLE_RUN) + MAX_SEGMENT_CODEPOINTS


class Normalizer:
    """Builds the views of one text as it arrives; the caller trims what it no longer needs.

    Positions are absolute: ``orig`` holds the original text from ``orig_base``
    on, ``plain``/``folded``/``starts``/``ends`` hold view characters from
    ``view_base`` on. Only closed segments are in the views; the open one
    waits in ``_open`` until a character that cannot join it (or ``close()``).
    """

    def __init__(self) -> None:
        self.orig = ""
        self.orig_base = 0
        self.plain = ""
        self.folded = ""
        self.view_base = 0
        self.starts: list[int] = []
        self.ends: list[int] = []
        self._open = ""
        self._open_start = 0
        self._run = 0  # invisible code points skipped since the last visible segment
        self._after_space = False  # the last view character is whitespace

    @property
    def view_end(self) -> int:
        return self.view_base + len(self.plain)

    @property
    def orig_end(self) -> int:
        return self.orig_base + len(self.orig)

    def orig_pos(self, view_pos: int) -> int:
        """Where in the original text a match starting at ``view_pos`` would start."""
        if view_pos < self.view_end:
            return self.starts[view_pos - self.view_base]
        return self._open_start if self._open else self.orig_end

    def orig_text(self, start: int, end: int) -> str:
        return self.orig[start - self.orig_base : end - self.orig_base]

    def push(self, text: str) -> None:
        """Append original text; every segment that can no longer grow enters the views."""
        position = self.orig_end
        self.orig += text
        segment, segment_start = self._open, self._open_start
        if text.isascii() and len(segment) <= 1 and segment < "\x80":
            # The common chunk: nothing joins an ASCII segment, so all but the last
            # character close, as one run with the open segment before them.
            if text:
                self._push_ascii(segment + text[:-1], position - len(segment))
                self._open, self._open_start = text[-1], position + len(text) - 1
            return
        plain: list[str] = []
        folded: list[str] = []
        i = 0
        while i < len(text):
            char = text[i]
            if segment and char >= "\x80" and _joins(segment, char):
                segment += char
                i += 1
                continue
            if segment:
                self._close_segment(segment, segment_start, plain, folded)
            if char < "\x80":
                # An ASCII run is one segment per character: do all but its last at once
                # (the last may still be joined by a combining mark).
                run_end = _ASCII_RUN.match(text, i).end() - 1
                if run_end > i:
                    self._close_ascii(text[i:run_end], position + i, plain, folded)
                    i = run_end
                    char = text[i]
            segment, segment_start = char, position + i
            i += 1
        self._open, self._open_start = segment, segment_start
        self.plain += "".join(plain)
        self.folded += "".join(folded)

    def close(self) -> None:
        """The text has ended: the open segment is final."""
        if self._open:
            plain: list[str] = []
            folded: list[str] = []
            self._close_segment(self._open, self._open_start, plain, folded)
            self.plain += "".join(plain)
            self.folded += "".join(folded)
            self._open = ""
            self._open_start = self.orig_end

    def discard(self, view_before: int, orig_before: int) -> None:
        """Forget view characters before ``view_before`` and original text before ``orig_before``.

        Trimming copies what is kept, so it only happens once the dead part is
        at least as long as the live one: amortised O(1) per character.
        """
        dead_view = view_before - self.view_base
        if dead_view > 0 and dead_view >= len(self.plain) - dead_view:
            self.plain = self.plain[dead_view:]
            self.folded = self.folded[dead_view:]
            del self.starts[:dead_view]
            del self.ends[:dead_view]
            self.view_base = view_before
        dead_orig = orig_before - self.orig_base
        if dead_orig > 0 and dead_orig >= len(self.orig) - dead_orig:
            self.orig = self.orig[dead_orig:]
            self.orig_base = orig_before

    def _close_segment(self, segment: str, start: int, plain: list[str], folded: list[str]) -> None:
        end = start + len(segment)
        if len(segment) == 1 and segment < "\x80":  # the common case, kept short
            if segment.isspace():
                if self._after_space:
                    self._skip(segment, start, end, plain, folded)
                    return
                self._emit(segment, " ", start, end, plain, folded)
                self._after_space = True
            else:
                lower = segment.lower()
                self._emit(lower, lower, start, end, plain, folded)
                self._after_space = False
            self._run = 0
            return
        normal = unicodedata.normalize("NFKC", segment)
        visible = False
        for char in normal:
            if char.isspace():
                if self._after_space:
                    continue
                self._emit(char, " ", start, end, plain, folded)
                self._after_space = True
            elif _is_invisible(char):
                continue
            else:
                lower = _casefold(char)
                self._emit(lower, HOMOGLYPHS.get(lower, lower), start, end, plain, folded)
                self._after_space = False
            visible = True
        if visible:
            self._run = 0
        else:
            self._skip(normal, start, end, plain, folded)

    def _push_ascii(self, text: str, start: int) -> None:
        """Close a run of ASCII characters into the views, as ``_close_ascii`` does.

        Usually (a chunk of prose) every character is kept as itself, lower
        case, and only spaces are whitespace, so the views need no more than that.
        """
        if not text:
            return
        # Printable ASCII has no whitespace but the space (the only one ``folded`` keeps).
        printable = text.isprintable()
        whitespace_pair = "  " in text if printable else _ASCII_WHITESPACE_PAIR.search(text) is not None
        if whitespace_pair or (self._after_space and text[0].isspace()):
            plain: list[str] = []
            folded: list[str] = []
            self._close_ascii(text, start, plain, folded)
            self.plain += "".join(plain)
            self.folded += "".join(folded)
            return
        lower = text.lower()
        self.plain += lower
        self.folded += lower if printable else lower.translate(_ASCII_WHITESPACE_TO_SPACE)
        self.starts.extend(range(start, start + len(text)))
        self.ends.extend(range(start + 1, start + len(text) + 1))
        self._after_space = text[-1].isspace()
        self._run = 0

    def _close_ascii(self, text: str, start: int, plain: list[str], folded: list[str]) -> None:
        """Close a run of ASCII characters in bulk; the same view as closing them one by one."""
        while text and self._after_space and text[0].isspace():
            self._close_segment(text[0], start, plain, folded)
            text, start = text[1:], start + 1
        if not text:
            return
        lower = text.lower()
        kept: list[str] = []
        cursor = 0
        for run in _WHITESPACE_RUN.finditer(text):
            first, stop = run.span()
            # The first whitespace character of a run stays; then one in every
            # MAX_INVISIBLE_RUN + 1, as one by one (see ``_skip``).
            self._keep_ascii(lower, cursor, first + 1, start, kept)
            for overflow in range(first + 1 + MAX_INVISIBLE_RUN, stop, MAX_INVISIBLE_RUN + 1):
                self._keep_ascii(lower, overflow, overflow + 1, start, kept)
            cursor = stop
        self._keep_ascii(lower, cursor, len(text), start, kept)
        view = "".join(kept)
        plain.append(view)
        folded.append(view.translate(_ASCII_WHITESPACE_TO_SPACE))
        self._after_space = text[-1].isspace()
        last_kept = self.starts[-1] - start
        self._run = len(text) - 1 - last_kept

    def _keep_ascii(self, lower: str, begin: int, stop: int, start: int, kept: list[str]) -> None:
        kept.append(lower[begin:stop])
        self.starts.extend(range(start + begin, start + stop))
        self.ends.extend(range(start + begin + 1, start + stop + 1))

    def _skip(self, normal: str, start: int, end: int, plain: list[str], folded: list[str]) -> None:
        """An all-invisible segment: skipped, unless the run of skipped ones would grow too long.

        Past ``MAX_INVISIBLE_RUN`` the segment is kept in the view as itself: not
        a letter, so no term runs across it, and the window stays bounded.
        """
        if self._run + (end - start) <= MAX_INVISIBLE_RUN:
            self._run += end - start
            return
        for char in normal:
            if char.isspace():
                self._emit(char, " ", start, end, plain, folded)
                self._after_space = True
            else:
                self._emit(char, char, start, end, plain, folded)
                self._after_space = False
        self._run = 0

    def _emit(
        self, plain_text: str, folded_text: str, start: int, end: int, plain: list[str], folded: list[str]
    ) -> None:
        plain.append(plain_text)
        folded.append(folded_text)
        if len(plain_text) == 1:
            self.starts.append(start)
            self.ends.append(end)
        else:
            self.starts.extend([start] * len(plain_text))
            self.ends.extend([end] * len(plain_text))


def _casefold(char: str) -> str:
    """Case-fold one code point, dropping a diacritic that folding itself adds (``İ`` is ``i``)."""
    folded = char.casefold()
    if len(folded) > 1:
        folded = "".join(c for c in folded if not _is_invisible(c)) or folded
    return folded


def _joins(segment: str, char: str) -> bool:
    """Whether ``char`` belongs to the open segment: NFKC could combine or reorder them."""
    if len(segment) >= MAX_SEGMENT_CODEPOINTS:
        return False
    if unicodedata.combining(char):
        return True
    nfkc = unicodedata.normalize
    return nfkc("NFKC", segment + char) != nfkc("NFKC", segment) + nfkc("NFKC", char)


def fold_term(term: str) -> str:
    """A configured term as it must appear in the ``folded`` view (empty if nothing visible is left)."""
    normalizer = Normalizer()
    normalizer.push(term)
    normalizer.close()
    return normalizer.folded.strip(" ")


def leet_variants(term: str) -> set[str]:
    """Every spelling of a leetspeak-folded term with "1" for "i" or "l" (and back).

    Only the first ``MAX_LEET_AMBIGUOUS_POSITIONS`` such positions vary, which
    caps a term at 64 spellings.
    """
    choices = []
    ambiguous = 0
    for char in term:
        if char in _LEET_ONE and ambiguous < MAX_LEET_AMBIGUOUS_POSITIONS:
            ambiguous += 1
            choices.append(_LEET_ONE[char])
        else:
            choices.append(char)
    return {"".join(spelling) for spelling in itertools.product(*choices)}
