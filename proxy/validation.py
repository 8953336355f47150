"""Validation of the request fields the gateway reads itself.

Only the fields the gateway acts on are checked (model, messages, prompt,
input, stream, stream_options, max_tokens, max_completion_tokens, n); every
other field is the provider's business and passes through untouched.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import invalid_request

CHAT = "chat.completions"
COMPLETIONS = "completions"
EMBEDDINGS = "embeddings"

_MAX_N = 128


@dataclass(slots=True)
class ParsedRequest:
    endpoint: str
    payload: dict[str, Any]
    model: str
    stream: bool
    client_wants_usage: bool  # stream_options.include_usage as the client sent it
    n: int


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_error(param: str, expected: str) -> Exception:
    return invalid_request(f"'{param}' must be {expected}.", param)


def decode_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise invalid_request("The request body is empty; expected a JSON object.")
    try:
        payload = json.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise invalid_request("The request body must be a JSON object.")
    return payload


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise invalid_request("Missing required parameter: 'messages'.", "messages")
    if not isinstance(messages, list) or not messages:
        raise _type_error("messages", "a non-empty array of message objects")
    for i, message in enumerate(messages):
        param = f"messages[{i}]"
        if not isinstance(message, dict):
            raise _type_error(param, "an object")
        if not isinstance(message.get("role"), str):
            raise _type_error(f"{param}.role", "a string")
        content = message.get("content")
        if content is None or isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _type_error(f"{param}.content", "a string, an array of content parts or null")
        for j, part in enumerate(content):
            if not isinstance(part, dict) or not isinstance(part.get("type"), str):
                raise _type_error(f"{param}.content[{j}]", "a content part object with a 'type'")
            if part["type"] == "text" and not isinstance(part.get("text"), str):
                raise _type_error(f"{param}.content[{j}].text", "a string")


def _is_token_array(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) for t in value)


def _check_text_or_tokens(value: Any, param: str) -> None:
    if value is None:
        raise invalid_request(f"Missing required parameter: '{param}'.", param)
    if isinstance(value, str):
        return
    if isinstance(value, list) and value and (
        all(isinstance(v, str) for v in value) or _is_token_array(value) or all(_is_token_array(v) for v in value)
    ):
        return
    raise _type_error(param, "a string, an array of strings or an array of token arrays")


def _optional_positive_int(payload: dict[str, Any], param: str) -> int | None:
    value = payload.get(param)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _type_error(param, "a positive integer")
    return value


def parse_request(endpoint: str, body: bytes) -> ParsedRequest:
    payload = decode_json_object(body)
    model = payload.get("model")
    if model is None:
        raise invalid_request("Missing required parameter: 'model'.", "model")
    if not isinstance(model, str) or not model.strip():
        raise _type_error("model", "a non-empty string")
    if endpoint == CHAT:
        _check_messages(payload.get("messages"))
    elif endpoint == COMPLETIONS:
        _check_text_or_tokens(payload.get("prompt"), "prompt")
    else:
        _check_text_or_tokens(payload.get("input"), "input")

    stream = False
    client_wants_usage = False
    n = 1
    if endpoint != EMBEDDINGS:
        stream_value = payload.get("stream")
        if stream_value is not None and not isinstance(stream_value, bool):
            raise _type_error("stream", "a boolean")
        stream = bool(stream_value)
        options = payload.get("stream_options")
        if options is not None:
            if not isinstance(options, dict):
                raise _type_error("stream_options", "an object")
            include = options.get("include_usage")
            if include is not None and not isinstance(include, bool):
                raise _type_error("stream_options.include_usage", "a boolean")
            client_wants_usage = bool(include)
        _optional_positive_int(payload, "max_tokens")
        _optional_positive_int(payload, "max_completion_tokens")
        n = _optional_positive_int(payload, "n") or 1
        if n > _MAX_N:
            raise invalid_request(f"'n' must be at most {_MAX_N}.", "n")
    return ParsedRequest(endpoint, payload, model, stream, client_wants_usage, n)
