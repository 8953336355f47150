"""The normalised views that rules match on, built incrementally, each with a map back.

Rules must not be dodged by text that a reader still reads as the word but
that is spelt with other code points, so matching happens on normalised views
of the text. Redaction must still remove exactly what the reader would have
seen, so every view character remembers which original characters it came
from (``Track.starts``/``Track.ends``).

Two views, made one *segment* at a time (a starter and the combining marks or
composing characters that follow it, so NFKC never has to look across a
segment boundary):

* ``plain`` (regex and PII rules): NFKC (fullwidth and mathematical letters,
  ligatures, NBSP...), lower case (``str.casefold``, but "ß" stays "ß" so
  German words are not rewritten), every Default_Ignorable_Code_Point dropped
  (zero-width characters, soft hyphens, bidi controls, variation selectors,
  Mongolian and shorthand format controls, tag characters...), the combining
  marks of scripts whose marks are diacritics dropped where NFKC left them
  apart ("Zalgo" marks), and every whitespace character after the first of
  a run skipped (so ``"a \\n\\t b"`` is ``"a b"``).
* ``folded`` (terms rules): the plain view with, per character, diacritics
  removed ("é", "ü", "ñ" read as "e", "u", "n"; only in scripts whose marks
  are diacritics, so Japanese voicing marks stay), letters that Unicode's
  confusables table (UTS #39) lists as look-alikes of an ASCII letter folded
  to it ("а" Cyrillic, "ο" Greek, "օ" Armenian, "Ꭺ" Cherokee, "ᴀ" small
  capital), whitespace as " ", and markdown emphasis markers (``* _ ~``) that
  follow a letter or digit dropped, at most ``MAX_MARKER_RUN`` in a row (so
  ``a**bc**d`` is ``abcd`` and ``snake_case`` one word). Whether a
  look-alike was a disguise or just the other script's own word is for the
  terms matcher to judge (``matchers.TermsScanner``); the view folds them all.

Every plain character becomes one folded character or, for a dropped marker,
none; so the folded view has its own map.

Bounds, and why no run of invisible characters can open a gap:

* ``MAX_SEGMENT_CODEPOINTS``: a segment stops growing after 8 code points; a
  further combining mark starts a segment of its own (and is dropped like
  any mark, so a letter under 100 Zalgo marks is still the letter).
* ``MAX_INVISIBLE_RUN``: between two visible characters the text keeps at
  most 32 invisible code points (default-ignorables and combining marks);
  the rest of a longer run is removed from the text itself, before anything
  else looks at it, and so from what the window releases. A reader sees the
  same text (those characters render as nothing), and every run, however
  long, is skipped by the views: a term matches across it. This is what
  keeps the window bounded: a match's original text is at most
  ``original_chars_bound`` of its view length.
* ``MAX_WHITESPACE_RUN``: whitespace after the first of a run is skipped up
  to 16 characters; the next one is kept, so a multi-word term does not span
  a run longer than 17 whitespace characters (spaced-out text is a
  documented miss).

The views are made left to right and a closed segment never changes, so they
do not depend on how the text was split into chunks: only the last (open)
segment is provisional until the next character or the end arrives.
"""

from __future__ import annotations

import functools
import itertools
import re
import unicodedata

import regex

from .unidata import DIACRITIC_SCRIPTS, default_ignorables, is_no_space_char, latin_lookalike, script_of

MAX_SEGMENT_CODEPOINTS = 8
MAX_INVISIBLE_RUN = 32
MAX_WHITESPACE_RUN = 16
MAX_MARKER_RUN = 3

# Positions of a leetspeak term that may be written "1" (see ``leet_variants``).
MAX_LEET_AMBIGUOUS_POSITIONS = 6

MARKERS = frozenset("*_~")
_MARKER = re.compile(r"[*_~]")  # a fixed character class, found in linear time
# A code point that counts toward an invisible run (a fixed class, not a rule).
_INVISIBLE_CHAR = regex.compile(r"[\p{Default_Ignorable_Code_Point}\p{M}]")

_ASCII_RUN = re.compile(r"[\x00-\x7f]+")
# ``\s`` is ``str.isspace``: for ASCII that is \t\n\v\f\r, \x1c-\x1f and the space.
_WHITESPACE_RUN = re.compile(r"\s{2,}")
_ASCII_WHITESPACE = "".join(c for c in map(chr, range(128)) if c.isspace())
_ASCII_WHITESPACE_TO_SPACE = str.maketrans({c: " " for c in _ASCII_WHITESPACE})
_ASCII_WHITESPACE_PAIR = re.compile(r"[\t\n\v\f\r\x1c-\x1f ]{2}")

# Leetspeak, for rules that ask for it. "1" stays "1" in the view because it
# stands for two letters ("i" and "l"); ``leet_variants`` spells terms both ways.
LEET = str.maketrans({"0": "o", "3": "e", "4": "a", "5": "s", "7": "t", "@": "a", "$": "s"})
_LEET_ONE = {"i": "i1", "l": "l1", "1": "1il"}


@functools.cache
def _is_word_char_slow(char: str) -> bool:
    if is_no_space_char(char):
        return False  # CJK, Thai...: each character stands as a word of its own
    return char.isalnum() or unicodedata.category(char)[0] == "M"


def is_word_char(char: str) -> bool:
    """Letters, digits and their marks make words; the rest separates them, and so does every CJK character."""
    if char < "\x80":
        return char.isalnum()
    return _is_word_char_slow(char)


def original_chars_bound(view_chars: int) -> int:
    """How many original characters can stand behind ``view_chars`` view characters, plus the open segment.

    Each view character comes from a segment of at most ``MAX_SEGMENT_CODEPOINTS``
    and is followed by at most ``MAX_WHITESPACE_RUN`` skipped whitespace
    characters, ``MAX_INVISIBLE_RUN`` kept invisible ones and (folded view)
    ``MAX_MARKER_RUN`` dropped markers; the last, still open, segment is held
    back too.
    """
    per_char = MAX_SEGMENT_CODEPOINTS + MAX_WHITESPACE_RUN + MAX_INVISIBLE_RUN + MAX_MARKER_RUN
    return view_chars * per_char + MAX_SEGMENT_CODEPOINTS


class Track:
    """One view: its text from absolute position ``base`` on, and each character's original span."""

    __slots__ = ("base", "ends", "starts", "text")

    def __init__(self) -> None:
        self.text = ""
        self.base = 0
        self.starts: list[int] = []
        self.ends: list[int] = []

    @property
    def end(self) -> int:
        return self.base + len(self.text)

    def discard(self, before: int) -> None:
        """Forget characters before ``before``, once that is at least half of what is kept (amortised O(1))."""
        dead = before - self.base
        if dead > 0 and dead >= len(self.text) - dead:
            self.text = self.text[dead:]
            del self.starts[:dead]
            del self.ends[:dead]
            self.base = before


@functools.cache
def _fold_char(char: str) -> tuple[str, str]:
    """One visible NFKC code point as (plain, folded) text of equal length."""
    if char in "ßẞ":
        plain = "ß"
    else:
        plain = char.casefold()
        if len(plain) > 1:  # "İ" folds to "i" plus a dot: keep the letter
            plain = "".join(c for c in plain if not unicodedata.combining(c)) or plain
    folded = []
    for lower in plain:
        # The small letter's look-alike first, so a capital and its small letter fold
        # alike (a Greek term matches in capitals); the capital's only if it has none.
        base = _strip_diacritics(lower)
        upper = base.upper()
        folded.append(latin_lookalike(base) or (len(upper) == 1 and latin_lookalike(upper)) or base)
    return plain, "".join(folded)


def _strip_diacritics(char: str) -> str:
    decomposed = unicodedata.normalize("NFD", char)
    if (
        len(decomposed) > 1
        and all(unicodedata.combining(c) for c in decomposed[1:])
        and script_of(decomposed[0]) in DIACRITIC_SCRIPTS
    ):
        return decomposed[0]
    return char


class Normalizer:
    """Builds the views of one text as it arrives; the caller trims what it no longer needs.

    ``orig`` holds the text (after ``MAX_INVISIBLE_RUN``) from ``orig_base`` on.
    Only closed segments are in the views; the open one waits in ``_open``
    until a character that cannot join it (or ``close()``).
    """

    def __init__(self) -> None:
        self.orig = ""
        self.orig_base = 0
        self.plain = Track()
        self.folded = Track()
        self._open = ""
        self._open_start = 0
        self._ws_run = 0  # whitespace characters skipped since the last view character
        self._after_space = False  # the last plain character is whitespace
        self._invisible_run = 0  # invisible code points kept since the last visible one
        self._marker_run = 0  # markers dropped from ``folded`` in a row
        self._folded_word = False  # the last folded character is a letter or digit
        self._pieces: tuple[list[str], list[str], list[int], list[int]] | None = None

    @property
    def orig_end(self) -> int:
        return self.orig_base + len(self.orig)

    @property
    def pending_start(self) -> int:
        """Where the text not yet in the views (the open segment) starts."""
        return self._open_start if self._open else self.orig_end

    def orig_text(self, start: int, end: int) -> str:
        return self.orig[start - self.orig_base : end - self.orig_base]

    def push(self, text: str) -> None:
        """Append text; every segment that can no longer grow enters the views."""
        if text.isascii():
            if self._invisible_run and text and not text.isspace():
                self._invisible_run = 0
        else:
            text = self._drop_long_invisible_runs(text)
        position = self.orig_base + len(self.orig)
        self.orig += text
        segment, segment_start = self._open, self._open_start
        if text.isascii() and len(segment) <= 1 and segment < "\x80":
            # The common chunk: nothing joins an ASCII segment, so all but the last
            # character close, as one run with the open segment before them.
            if text:
                self._push_ascii(segment + text[:-1], position - len(segment))
                self._open, self._open_start = text[-1], position + len(text) - 1
            return
        pieces: tuple[list[str], list[str], list[int], list[int]] = ([], [], [], [])
        self._pieces = pieces
        i = 0
        while i < len(text):
            char = text[i]
            if segment and char >= "\x80" and _joins(segment, char):
                segment += char
                i += 1
                continue
            if segment:
                self._close_segment(segment, segment_start)
            if char < "\x80":
                # An ASCII run is one segment per character: do all but its last at once
                # (the last may still be joined by a combining mark).
                run_end = _ASCII_RUN.match(text, i).end() - 1
                if run_end > i:
                    self._close_ascii(text[i:run_end], position + i)
                    i = run_end
                    char = text[i]
            segment, segment_start = char, position + i
            i += 1
        self._open, self._open_start = segment, segment_start
        self._flush()

    def close(self) -> None:
        """The text has ended: the open segment is final."""
        if self._open:
            self._pieces = ([], [], [], [])
            self._close_segment(self._open, self._open_start)
            self._flush()
            self._open = ""
            self._open_start = self.orig_end

    def discard(self, plain_before: int, folded_before: int, orig_before: int) -> None:
        """Forget view characters before the given positions, and original text before ``orig_before``."""
        self.plain.discard(plain_before)
        self.folded.discard(folded_before)
        dead = orig_before - self.orig_base
        if dead > 0 and dead >= len(self.orig) - dead:
            self.orig = self.orig[dead:]
            self.orig_base = orig_before

    # -- building ---------------------------------------------------------------

    def _drop_long_invisible_runs(self, text: str) -> str:
        """``MAX_INVISIBLE_RUN``: keep at most that many invisible code points between visible ones."""
        if _INVISIBLE_CHAR.search(text) is None:
            if not text.isspace():
                self._invisible_run = 0
            return text
        kept = []
        run = self._invisible_run
        search = _INVISIBLE_CHAR.match
        for char in text:
            if search(char):
                if run >= MAX_INVISIBLE_RUN:
                    continue
                run += 1
            elif not char.isspace():
                run = 0
            kept.append(char)
        self._invisible_run = run
        return "".join(kept)

    def _append(self, plain: str, folded: str, starts: list[int] | range, ends: list[int] | range) -> None:
        """Add characters to both views (one folded per plain character), dropping markers from ``folded``."""
        if not plain:
            return
        p = self.plain
        p.text += plain
        p.starts.extend(starts)
        p.ends.extend(ends)
        f = self.folded
        if "*" not in folded and "_" not in folded and "~" not in folded:
            f.text += folded
            f.starts.extend(starts)
            f.ends.extend(ends)
            last = folded[-1]
            self._folded_word = last.isalnum() if last < "\x80" else is_word_char(last)
            self._marker_run = 0
            return
        kept: list[str] = []
        done = 0
        for marker in _MARKER.finditer(folded):
            at = marker.start()
            if at > done:  # the characters since the last marker, in bulk
                kept.append(folded[done:at])
                f.starts.extend(starts[done:at])
                f.ends.extend(ends[done:at])
                last = folded[at - 1]
                self._folded_word = last.isalnum() if last < "\x80" else is_word_char(last)
                self._marker_run = 0
            if (self._folded_word or self._marker_run) and self._marker_run < MAX_MARKER_RUN:
                self._marker_run += 1  # inside or at the end of a word: dropped
            else:
                kept.append(folded[at])
                f.starts.append(starts[at])
                f.ends.append(ends[at])
                self._folded_word = False
                self._marker_run = 0
            done = at + 1
        if done < len(folded):
            kept.append(folded[done:])
            f.starts.extend(starts[done:])
            f.ends.extend(ends[done:])
            last = folded[-1]
            self._folded_word = last.isalnum() if last < "\x80" else is_word_char(last)
            self._marker_run = 0
        f.text += "".join(kept)

    def _flush(self) -> None:
        plain, folded, starts, ends = self._pieces
        self._pieces = None
        self._append("".join(plain), "".join(folded), starts, ends)

    def _emit(self, plain: str, folded: str, start: int, end: int) -> None:
        pieces = self._pieces
        pieces[0].append(plain)
        pieces[1].append(folded)
        pieces[2].extend([start] * len(plain))
        pieces[3].extend([end] * len(plain))

    def _whitespace(self, char: str, start: int, end: int) -> None:
        """A whitespace character: the first of a run is kept, then one in every ``MAX_WHITESPACE_RUN + 1``."""
        if self._after_space and self._ws_run < MAX_WHITESPACE_RUN:
            self._ws_run += 1
            return
        self._emit(char, " ", start, end)
        self._after_space = True
        self._ws_run = 0

    def _close_segment(self, segment: str, start: int) -> None:
        end = start + len(segment)
        if len(segment) == 1 and segment < "\x80":  # the common case, kept short
            if segment.isspace():
                self._whitespace(segment, start, end)
            else:
                lower = segment.lower()
                self._emit(lower, lower, start, end)
                self._after_space = False
                self._ws_run = 0
            return
        ignorable = default_ignorables()
        marks_are_diacritics = script_of(segment[0]) in DIACRITIC_SCRIPTS
        for char in unicodedata.normalize("NFKC", segment):
            if char.isspace():
                self._whitespace(char, start, end)
            elif char in ignorable:
                continue
            elif marks_are_diacritics and unicodedata.category(char)[0] == "M":
                continue
            else:
                plain, folded = _fold_char(char)
                self._emit(plain, folded, start, end)
                self._after_space = False
                self._ws_run = 0

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
            self._pieces = ([], [], [], [])
            self._close_ascii(text, start)
            self._flush()
            return
        lower = text.lower()
        positions = range(start, start + len(text))
        self._append(
            lower,
            lower if printable else lower.translate(_ASCII_WHITESPACE_TO_SPACE),
            positions,
            range(start + 1, start + len(text) + 1),
        )
        self._after_space = text[-1].isspace()
        self._ws_run = 0

    def _close_ascii(self, text: str, start: int) -> None:
        """Close a run of ASCII characters in bulk; the same views as closing them one by one."""
        while text and self._after_space and text[0].isspace():
            self._close_segment(text[0], start)
            text, start = text[1:], start + 1
        if not text:
            return
        lower = text.lower()
        kept: list[tuple[int, int]] = []  # ranges of ``text`` that stay
        cursor = 0
        for run in _WHITESPACE_RUN.finditer(text):
            first, stop = run.span()
            # The first whitespace character of a run stays; then one in every
            # MAX_WHITESPACE_RUN + 1, as one by one (see ``_whitespace``).
            kept.append((cursor, first + 1))
            kept.extend((i, i + 1) for i in range(first + 1 + MAX_WHITESPACE_RUN, stop, MAX_WHITESPACE_RUN + 1))
            cursor = stop
        if cursor < len(text):
            kept.append((cursor, len(text)))
        view = "".join(lower[a:b] for a, b in kept)
        pieces = self._pieces
        pieces[0].append(view)
        pieces[1].append(view.translate(_ASCII_WHITESPACE_TO_SPACE))
        for a, b in kept:
            pieces[2].extend(range(start + a, start + b))
            pieces[3].extend(range(start + a + 1, start + b + 1))
        self._after_space = text[-1].isspace()
        self._ws_run = len(text) - kept[-1][1]


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
    return normalizer.folded.text.strip(" ")


def term_script(term: str) -> str | None:
    """The one script a term's letters are written in, or None (none, or several)."""
    scripts = letter_scripts(term)
    return next(iter(scripts)) if len(scripts) == 1 else None


def letter_scripts(text: str) -> set[str]:
    """The scripts of the letters in ``text`` (Common and Inherited ones, like digits, left out)."""
    scripts = set()
    for char in text:
        if char.isalpha():
            if char < "\x80":
                scripts.add("LATIN")
            else:
                script = script_of(char)
                if script not in ("COMMON", "INHERITED"):
                    scripts.add(script)
    return scripts


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
