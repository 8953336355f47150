"""What goes upstream: the client's bytes, with the gateway's fields set and the prompt as moderation left it."""

from __future__ import annotations

import json
from typing import Any

from . import jsonio
from .formats import ParsedRequest


def upstream_body(parsed: ParsedRequest, body: bytes, prompt_changed: bool, fields: dict[str, Any]) -> bytes:
    """The body to send; ``parsed.payload`` is updated to match.

    When the fields are all new to the body and the prompt is unchanged,
    they are written in front of the client's own bytes instead of
    re-encoding the whole payload: a large prompt is not encoded again on
    the event loop, and the client's numbers and escapes reach the provider
    exactly as sent.
    """
    payload = parsed.payload
    if not prompt_changed and not fields:
        return body
    spliced = None if prompt_changed or not fields.keys().isdisjoint(payload) else with_leading_members(body, fields)
    payload.update(fields)
    if "max_completion_tokens" in fields:
        payload.pop("max_tokens", None)  # the reasoning models refuse both
    return spliced if spliced is not None else jsonio.dumps(payload)


def with_leading_members(body: bytes, members: dict[str, Any]) -> bytes | None:
    """``body``, a JSON object without any of ``members``' names, with them added at its start.

    None when the bytes are not UTF-8 (``json.loads`` also reads UTF-16 and
    UTF-32, and a UTF-8 BOM) or do not start with ``{``.
    """
    start = len(body) - len(body.lstrip(b" \t\r\n"))
    if body[start : start + 1] != b"{" or json.detect_encoding(body) != "utf-8":
        return None
    added = jsonio.dumps(members)
    return body[: start + 1] + added[1:-1] + b"," + body[start + 1 :]
