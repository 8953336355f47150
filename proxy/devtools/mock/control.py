"""The ``mock`` body field that steers the mock, and the mock's error answers.

A test asks for exactly the misbehaviour it wants the gateway to survive by
putting a ``mock`` object in the request body; the gateway passes unknown body
fields through untouched. Each endpoint accepts the fields that make sense for
its wire format, and a typo'd, mistyped or misplaced field is a 400 naming it
(``mock.<field>``), never silently ignored: a test that meant to provoke
something must not pass because nothing happened. The fields are listed in the
package docstring (``proxy/devtools/mock/__init__.py``).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from aiohttp import web

# Anthropic's error type for each status it answers (its errors page); others
# fall back to invalid_request_error (4xx) or api_error (5xx).
_ANTHROPIC_ERROR_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    500: "api_error",
    504: "timeout_error",
    529: "overloaded_error",
}


def anthropic_error_type(status: int) -> str:
    return _ANTHROPIC_ERROR_TYPES.get(status, "api_error" if status >= 500 else "invalid_request_error")


def anthropic_error_body(error_type: str, message: str) -> dict[str, Any]:
    return {"type": "error", "error": {"type": error_type, "message": message}}


class MockError(Exception):
    """An error answer, raised anywhere in a handler and shaped for the endpoint's API."""

    def __init__(
        self,
        status: int,
        message: str,
        param: str | None = None,
        code: str | None = None,
        anthropic_type: str | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.anthropic_type = anthropic_type

    def response(self, api: str = "openai") -> web.Response:
        if api == "anthropic":
            error_type = self.anthropic_type or anthropic_error_type(self.status)
            message = f"{self.param}: {self.message}" if self.param else self.message
            return web.json_response(anthropic_error_body(error_type, message), status=self.status)
        if self.status == 429:
            error_type = "requests"
        elif self.status >= 500:
            error_type = "server_error"
        else:
            error_type = "invalid_request_error"
        body = {"error": {"message": self.message, "type": error_type, "param": self.param, "code": self.code}}
        return web.json_response(body, status=self.status)


def bad(param: str, message: str) -> MockError:
    return MockError(400, message, param=param, code="invalid_value")


def is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def is_number(value: Any) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


@dataclass(frozen=True)
class ToolCall:
    name: str
    arguments: str


# Which ``mock`` fields each endpoint reads.
_BASE = frozenset(
    {"reply", "chunk_chars", "delay_ms", "status", "drop_after", "stall_before_ms", "stall_after", "raw",
     "raw_body", "usage", "ignore_cap"}
)
OPENAI_FIELDS = _BASE | {"no_done", "tool_call"}  # completions, embeddings
CHAT_FIELDS = OPENAI_FIELDS | {"reasoning", "reasoning_field", "refusal"}
RESPONSES_FIELDS = _BASE | {"tool_call", "reasoning", "refusal", "error_after", "fail_after", "cached_tokens"}
# Anthropic always reports usage (its SDK needs it), so ``usage: false`` is not offered there.
MESSAGES_FIELDS = (_BASE - {"usage"}) | {"tool_call", "thinking", "error_after", "cached_tokens"}


@dataclass(frozen=True)
class MockControl:
    """The parsed ``mock`` body field; see the package docstring for each field."""

    reply: str | None = None
    chunk_chars: int | None = None
    delay_ms: float | None = None
    status: int | None = None
    drop_after: int | None = None
    stall_before_ms: float = 0.0
    stall_after_chunks: int | None = None
    stall_after_ms: float = 0.0
    raw: tuple[str, ...] | None = None
    raw_body: str | None = None
    no_done: bool = False
    usage: bool = True
    ignore_cap: bool = False
    tool_call: ToolCall | None = None
    reasoning: str | None = None  # chat reasoning, a Responses reasoning summary, or Anthropic's thinking
    reasoning_field: str = "reasoning_content"  # chat: the delta/message field reasoning goes in
    refusal: str | None = None
    error_after: int | None = None
    fail_after: int | None = None
    cached_tokens: int = 0

    @classmethod
    def parse(cls, value: Any, allowed: frozenset[str] = OPENAI_FIELDS) -> MockControl:
        """Validate ``mock``; a typo'd, mistyped or misplaced field is a 400 naming it."""
        if value is None:
            return cls()
        if not isinstance(value, dict):
            raise bad("mock", "`mock` must be an object")
        fields: dict[str, Any] = {}
        for key, item in value.items():
            param = f"mock.{key}"
            if key not in allowed:
                known = key in CHAT_FIELDS | RESPONSES_FIELDS | MESSAGES_FIELDS
                raise bad(param, "not supported on this endpoint" if known else f"unknown mock field {key!r}")
            if key in ("reply", "raw_body", "refusal", "reasoning", "thinking"):
                if not isinstance(item, str):
                    raise bad(param, "must be a string")
                fields["reasoning" if key == "thinking" else key] = item
            elif key in ("chunk_chars", "drop_after", "error_after", "fail_after", "cached_tokens"):
                minimum = 1 if key == "chunk_chars" else 0
                if not is_int(item) or item < minimum:
                    raise bad(param, f"must be an integer >= {minimum}")
                fields[key] = item
            elif key in ("delay_ms", "stall_before_ms"):
                if not is_number(item) or item < 0:
                    raise bad(param, "must be a number >= 0")
                fields[key] = float(item)
            elif key == "status":
                if not is_int(item) or not 400 <= item <= 599:
                    raise bad(param, "must be an HTTP error status (400-599)")
                fields["status"] = item
            elif key == "stall_after":
                chunks = item.get("chunks") if isinstance(item, dict) else None
                ms = item.get("ms") if isinstance(item, dict) else None
                if not (is_int(chunks) and chunks >= 0 and is_number(ms) and ms >= 0):
                    raise bad(param, 'must be {"chunks": integer >= 0, "ms": number >= 0}')
                fields["stall_after_chunks"] = chunks
                fields["stall_after_ms"] = float(ms)
            elif key == "raw":
                if not isinstance(item, list) or not all(isinstance(piece, str) for piece in item):
                    raise bad(param, "must be a list of strings")
                fields["raw"] = tuple(item)
            elif key == "reasoning_field":
                if item not in ("reasoning_content", "reasoning"):
                    raise bad(param, 'must be "reasoning_content" or "reasoning"')
                fields[key] = item
            elif key in ("no_done", "usage", "ignore_cap"):
                if not isinstance(item, bool):
                    raise bad(param, "must be true or false")
                fields[key] = item
            else:  # tool_call
                fields["tool_call"] = _tool_call(param, item, json_object=allowed is MESSAGES_FIELDS)
        control = cls(**fields)
        if control.refusal is not None and control.tool_call is not None:
            raise bad("mock.refusal", "cannot be combined with mock.tool_call")
        return control


def _tool_call(param: str, item: Any, json_object: bool) -> ToolCall:
    name = item.get("name") if isinstance(item, dict) else None
    arguments = item.get("arguments", "{}" if json_object else "") if isinstance(item, dict) else None
    if not (isinstance(name, str) and name and isinstance(arguments, str)):
        raise bad(param, 'must be {"name": non-empty string, "arguments": string}')
    if json_object:
        # Anthropic's tool_use.input is an object; its stream sends that object's JSON.
        try:
            parsed = json.loads(arguments)
        except ValueError:
            parsed = None
        if not isinstance(parsed, dict):
            raise bad(f"{param}.arguments", "must be the JSON text of an object")
    return ToolCall(name, arguments)
