"""JSON in and out: orjson where it can, the standard library where only it can.

orjson parses and writes a typical streamed chunk in a fraction of the
standard library's time. It refuses a few things JSON allows or providers
send (lone surrogate escapes, integers past 64 bits, NaN, UTF-16 bodies):
those take the standard library's path, so nothing a client or provider
sends is refused that was accepted before.
"""

from __future__ import annotations

import json
from typing import Any

import orjson


def loads(data: bytes | str) -> Any:
    """Parse JSON; ``ValueError`` (or ``RecursionError``) on what neither parser accepts."""
    try:
        return orjson.loads(data)
    except orjson.JSONDecodeError:
        return json.loads(data)


def dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as providers write it; non-ASCII text stays as it is."""
    try:
        return orjson.dumps(value)
    except TypeError:  # a lone surrogate or an integer past 64 bits: only the standard library writes them
        return json.dumps(value, separators=(",", ":")).encode()
