"""A streamed chunk's bytes around its one text: how most chunks are handled without parsing them.

After a stream's first plain text chunk, the next ones are usually that chunk
again with another word in it. ``TextSlot`` remembers the JSON before and
after the text; a chunk spelt ``prefix`` + a JSON string + ``suffix`` parses
to that chunk with the other text (a JSON string is one token: swapping it
leaves the rest of the parse as it was), so its text can be read, moderated
and written back without ``json.loads`` or ``json.dumps``.

Measured with ``tests/bench/instructions.py`` this saves about a tenth of
Sluice's instructions per streamed chunk; everything it does not recognise
(escapes, a changed id or usage, a finish, a second choice) takes the
general path, so it can only be skipped, never wrong.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from typing import Any

import orjson


def json_string(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``, quoting a plain word directly (a fraction of the call)."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    try:
        return orjson.dumps(text).decode()
    except TypeError:  # a lone surrogate: only an escape can carry it
        return json.dumps(text)


def _plain(text: str) -> bool:
    """A text whose JSON string is its characters between quotes: nothing to escape or unescape."""
    return text.isprintable() and '"' not in text and "\\" not in text


class TextSlot:
    __slots__ = ("key", "keep_when_held", "prefix", "suffix")

    def __init__(self, prefix: str, suffix: str, key: Any, keep_when_held: bool):
        self.prefix = prefix
        self.suffix = suffix
        self.key = key  # the field's window key
        self.keep_when_held = keep_when_held  # the chunk shows more than its text (a role): sent even when all is held

    @classmethod
    def find(cls, data: str, text: str, key: Any, keep_when_held: bool, locate: Callable[[Any], Any]) -> TextSlot | None:
        """The slot of ``text`` in ``data``, if the text is plain and its place certain.

        ``locate`` reads the field back from a parsed chunk. Each place the
        text's JSON string stands is proved by parsing the chunk with a text
        no slot can have (a NUL: a slot's text is printable) in its stead.
        """
        if not text or not _plain(text):
            return None
        literal = f'"{text}"'
        at = data.rfind(literal)
        while at != -1:
            prefix, suffix = data[:at], data[at + len(literal) :]
            try:
                found = locate(orjson.loads(prefix + '"\\u0000"' + suffix)) == "\0"
            except (orjson.JSONDecodeError, LookupError, TypeError, AttributeError):
                found = False
            if found:
                return cls(prefix, suffix, key, keep_when_held)
            at = data.rfind(literal, 0, at)
        return None

    def text_of(self, data: str) -> str | None:
        """The text of ``data`` if it is this slot's chunk with a plain text, else None."""
        prefix, suffix = self.prefix, self.suffix
        if not (data.startswith(prefix) and data.endswith(suffix)):
            return None
        end = len(data) - len(suffix)
        if end - len(prefix) < 3 or data[len(prefix)] != '"' or data[end - 1] != '"':
            return None
        text = data[len(prefix) + 1 : end - 1]
        return text if text.isprintable() and '"' not in text and "\\" not in text else None  # ``_plain``, inlined

    def chunk_with(self, text: str) -> bytes:
        try:
            return (self.prefix + json_string(text) + self.suffix).encode()
        except UnicodeEncodeError:  # a lone surrogate from a rule's replacement
            return (self.prefix + json.dumps(text) + self.suffix).encode()
