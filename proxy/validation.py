"""Validation of the request fields the gateway reads itself.

Each format's adapter checks the fields it reads with these; every other
field is the provider's business and passes through untouched.
"""

from __future__ import annotations

from . import jsonio
from typing import Any

from .errors import invalid_request

_MAX_N = 128


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _type_error(param: str, expected: str) -> Exception:
    return invalid_request(f"'{param}' must be {expected}.", param)


def decode_json_object(body: bytes) -> dict[str, Any]:
    if not body:
        raise invalid_request("The request body is empty; expected a JSON object.")
    try:
        payload = jsonio.loads(body)
    except (UnicodeDecodeError, ValueError) as exc:
        raise invalid_request(f"The request body is not valid JSON: {exc}.") from None
    except RecursionError:
        raise invalid_request("The request body is nested too deeply.") from None
    if not isinstance(payload, dict):
        raise invalid_request("The request body must be a JSON object.")
    return payload


def check_messages(messages: Any) -> None:
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


def is_token_array(value: Any) -> bool:
    return isinstance(value, list) and all(_is_int(t) for t in value)


def check_text_or_tokens(value: Any, param: str) -> None:
    if value is None:
        raise invalid_request(f"Missing required parameter: '{param}'.", param)
    if isinstance(value, str):
        return
    if isinstance(value, list) and value and (
        all(isinstance(v, str) for v in value) or is_token_array(value) or all(is_token_array(v) for v in value)
    ):
        return
    raise _type_error(param, "a string, an array of strings or an array of token arrays")


def optional_positive_int(payload: dict[str, Any], param: str) -> int | None:
    value = payload.get(param)
    if value is None:
        return None
    if not _is_int(value) or value < 1:
        raise _type_error(param, "a positive integer")
    return value


def check_model(payload: dict[str, Any]) -> str:
    model = payload.get("model")
    if model is None:
        raise invalid_request("Missing required parameter: 'model'.", "model")
    if not isinstance(model, str) or not model.strip():
        raise _type_error("model", "a non-empty string")
    return model


def check_stream(payload: dict[str, Any]) -> bool:
    value = payload.get("stream")
    if value is not None and not isinstance(value, bool):
        raise _type_error("stream", "a boolean")
    return bool(value)


def check_stream_options(payload: dict[str, Any]) -> bool:
    """Whether the client asked for the usage chunk (``stream_options.include_usage``)."""
    options = payload.get("stream_options")
    if options is None:
        return False
    if not isinstance(options, dict):
        raise _type_error("stream_options", "an object")
    include = options.get("include_usage")
    if include is not None and not isinstance(include, bool):
        raise _type_error("stream_options.include_usage", "a boolean")
    return bool(include)


def check_n(payload: dict[str, Any]) -> int:
    n = optional_positive_int(payload, "n") or 1
    if n > _MAX_N:
        raise invalid_request(f"'n' must be at most {_MAX_N}.", "n")
    return n
