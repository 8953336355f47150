"""The OpenAI request fields the mock reads, validated as OpenAI does, and the shared stream loop."""

from __future__ import annotations

from typing import Any, Callable

from .control import MockControl, bad, is_int
from .wire import EventStream, Pacer

MAX_CHOICES = 128


def model_of(body: dict[str, Any]) -> str:
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise bad("model", "you must provide a model parameter")
    return model


def wants_stream(body: dict[str, Any]) -> bool:
    stream = body.get("stream")
    if stream is not None and not isinstance(stream, bool):
        raise bad("stream", "must be a boolean")
    return stream is True


def wants_usage(body: dict[str, Any], control: MockControl) -> bool:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    return control.usage and isinstance(options, dict) and options.get("include_usage") is True


def choice_count(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise bad("n", f"must be an integer from 1 to {MAX_CHOICES}")
    return n


def max_tokens(body: dict[str, Any]) -> int | None:
    """The completion token limit: max_completion_tokens, else max_tokens."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not is_int(value) or value < 0:
            raise bad(field, "must be an integer >= 0")
        return value
    return None


def usage_block(prompt_tokens: int, completion_tokens: int) -> dict[str, Any]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


async def stream_pieces(
    stream: EventStream, pacer: Pacer, pieces: list[Any], n: int, make_chunk: Callable[[int, Any], dict[str, Any]]
) -> bool:
    """Send each piece to every choice in turn; False if ``drop_after`` cut the stream."""
    for piece in pieces:
        for index in range(n):
            if await pacer.next() is not None:
                stream.cut()
                return False
            await stream.send(make_chunk(index, piece))
            pacer.sent()
    if await pacer.end() is not None:
        # Fewer chunks than drop_after: still no final chunk and no [DONE].
        stream.cut()
        return False
    return True
