"""``POST /v1/messages``: Anthropic's Messages API, streamed and not.

As the real API does, the mock wants the key (``x-api-key``, or the
``Authorization: Bearer`` that the current anthropic SDK sends) and an
``anthropic-version`` header, and answers 401 / 400 in Anthropic's error
shape otherwise; every header it got is recorded (``anthropic-beta`` too), so
a test can check what reached the upstream. ``max_tokens`` is required.

The answer's content blocks, in order: a ``thinking`` block with a
``signature`` when ``mock.thinking`` gives its text, then a ``tool_use``
block (``mock.tool_call``, whose arguments are the JSON of its ``input``) or
a ``text`` block (``mock.reply``, else the text of the last user message).
``max_tokens`` cuts it (thinking counts) with stop_reason "max_tokens".
Streamed, each event is an ``event: <type>`` / ``data: <json>`` pair:
message_start (usage.input_tokens), ping, per block content_block_start,
content_block_delta ..., content_block_stop, then message_delta (stop_reason,
cumulative usage.output_tokens) and message_stop.
"""

from __future__ import annotations

import base64
import hashlib
import json
from typing import Any

from aiohttp import web

from proxy import tokens

from .control import MESSAGES_FIELDS, MockControl, MockError, anthropic_error_body, is_int
from .fields import wants_stream
from .plan import Segment, plan_segments, segment_tokens, text_of
from .state import MOCK_STATE
from .wire import EventStream, Pacer, before_answer, no_answer, pause, read_json, verbatim

# Per segment kind: the content_block_delta type and the field holding its piece.
_DELTAS = {
    "reasoning": ("thinking_delta", "thinking"),
    "text": ("text_delta", "text"),
    "tool": ("input_json_delta", "partial_json"),
}


def _invalid(message: str) -> MockError:
    return MockError(400, message, anthropic_type="invalid_request_error")


def _check_headers(request: web.Request) -> None:
    authorization = request.headers.get("Authorization", "")
    if not request.headers.get("x-api-key") and not authorization.startswith("Bearer "):
        raise MockError(401, "x-api-key header is required", anthropic_type="authentication_error")
    if not request.headers.get("anthropic-version"):
        raise _invalid("anthropic-version: header is required")


def _block_text(block: Any) -> str:
    """Every text a block carries: text, thinking, a tool's input, a tool result's content."""
    if not isinstance(block, dict):
        return ""
    kind = block.get("type")
    if kind == "text":
        return block.get("text") if isinstance(block.get("text"), str) else ""
    if kind == "thinking":
        return block.get("thinking") if isinstance(block.get("thinking"), str) else ""
    if kind == "tool_use":
        return f"{block.get('name', '')}{json.dumps(block.get('input', {}))}"
    if kind == "tool_result":
        content = block.get("content")
        return content if isinstance(content, str) else text_of(content)
    return ""


def _prompt_messages(body: dict[str, Any]) -> tuple[list[dict[str, Any]], str]:
    """``system`` and ``messages`` as chat messages with string content (to count), and the text to echo.

    The echo is the last user message's text blocks, or, for a turn of tool
    results only, the results' text.
    """
    system = body.get("system")
    if system is not None and not isinstance(system, (str, list)):
        raise _invalid("system: Input should be a valid string or a list of text blocks")
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise _invalid("messages: Field required (a non-empty list)")
    flat: list[dict[str, Any]] = [{"role": "system", "content": text_of(system)}] if system else []
    echo = ""
    for index, message in enumerate(messages):
        role = message.get("role") if isinstance(message, dict) else None
        if role not in ("user", "assistant"):
            raise _invalid(f"messages.{index}.role: Input should be 'user' or 'assistant'")
        content = message.get("content")
        if isinstance(content, str):
            flat.append({"role": role, "content": content})
            shown = content
        elif isinstance(content, list):
            flat.append({"role": role, "content": "".join(map(_block_text, content))})
            shown = text_of(content) or "".join(_block_text(b) for b in content if isinstance(b, dict)
                                                and b.get("type") == "tool_result")
        else:
            raise _invalid(f"messages.{index}.content: Input should be a valid string or a list of blocks")
        if role == "user":
            echo = shown
    return flat, echo


def _signature(text: str) -> str:
    """A stand-in for Anthropic's opaque thinking signature: deterministic, base64."""
    return base64.b64encode(hashlib.sha256(text.encode("utf-8", "surrogatepass")).digest()).decode()


def _block(segment: Segment, text: str | None, tool_id: str, tool_name: str) -> dict[str, Any]:
    """A content block holding ``text``; None: as ``content_block_start`` announces it, empty."""
    if segment.kind == "reasoning":
        return {"type": "thinking", "thinking": text or "", "signature": "" if text is None else _signature(text)}
    if segment.kind == "tool":
        return {"type": "tool_use", "id": tool_id, "name": tool_name, "input": {} if text is None else json.loads(text)}
    return {"type": "text", "text": text or ""}


async def messages(request: web.Request) -> web.StreamResponse:
    try:
        body = await read_json(request)
    except MockError:
        _check_headers(request)
        raise
    _check_headers(request)
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise _invalid("model: Field required")
    cap = body.get("max_tokens")
    if not is_int(cap) or cap < 1:
        raise _invalid("max_tokens: Field required (an integer >= 1)")
    try:
        stream_wanted = wants_stream(body)
    except MockError:
        raise _invalid("stream: Input should be a valid boolean") from None
    flat, echo = _prompt_messages(body)
    control = MockControl.parse(body.get("mock"), MESSAGES_FIELDS)

    delay_ms = await before_answer(request, control)
    if (early := await verbatim(request, control, delay_ms, stream_wanted)) is not None:
        return early

    tool = control.tool_call
    wanted = [("reasoning", control.reasoning)] if control.reasoning is not None else []
    if tool is not None:
        wanted.append(("tool", tool.arguments))
    else:
        wanted.append(("text", control.reply if control.reply is not None else echo))
    tool_name = tool.name if tool is not None else ""
    segments, truncated = plan_segments(model, wanted, cap, control, tool_name)
    number = request.app[MOCK_STATE].next_answer_number()
    tool_id = f"toolu_mock_{number}"
    stop_reason = "max_tokens" if truncated else ("tool_use" if tool is not None else "end_turn")
    prompt = tokens.count_chat_prompt(model, flat)
    cached = min(control.cached_tokens, prompt)
    output_tokens = sum(segment_tokens(model, s, tool_name) for s in segments)
    usage = {
        "input_tokens": prompt - cached,
        "cache_creation_input_tokens": 0,
        "cache_read_input_tokens": cached,
        "output_tokens": output_tokens,
        "service_tier": "standard",
    }

    def message(content: list[dict[str, Any]], reason: str | None, usage: dict[str, Any]) -> dict[str, Any]:
        return {"id": f"msg_mock_{number}", "type": "message", "role": "assistant", "model": model,
                "content": content, "stop_reason": reason, "stop_sequence": None, "usage": usage}

    overloaded = anthropic_error_body("overloaded_error", "Overloaded")
    if not stream_wanted:
        await pause(request, delay_ms)
        if control.drop_after is not None:
            return no_answer(request)
        if control.error_after is not None:
            return web.json_response(overloaded, status=529)
        content = [_block(s, s.text, tool_id, tool_name) for s in segments]
        return web.json_response(message(content, stop_reason, usage))

    stream = EventStream(request)

    async def emit(kind: str, **fields: Any) -> None:
        await stream.send_named(kind, {"type": kind, **fields})

    await stream.open()
    await emit("message_start", message=message([], None, {**usage, "output_tokens": min(1, output_tokens)}))
    await emit("ping")
    pacer = Pacer(request, control, delay_ms)
    for index, segment in enumerate(segments):
        await emit("content_block_start", index=index, content_block=_block(segment, None, tool_id, tool_name))
        delta_type, field = _DELTAS[segment.kind]
        for piece in segment.pieces:
            if (halt := await pacer.next()) is not None:
                if halt == "drop":
                    return stream.cut()
                await emit("error", error=overloaded["error"])
                return await stream.finish()
            await emit("content_block_delta", index=index, delta={"type": delta_type, field: piece})
            pacer.sent()
        if segment.kind == "reasoning":
            await emit("content_block_delta", index=index,
                       delta={"type": "signature_delta", "signature": _signature(segment.text)})
        await emit("content_block_stop", index=index)
    if (halt := await pacer.end()) is not None:
        if halt == "drop":
            return stream.cut()
        await emit("error", error=overloaded["error"])
        return await stream.finish()
    await emit("message_delta", delta={"stop_reason": stop_reason, "stop_sequence": None},
               usage={"output_tokens": output_tokens})
    await emit("message_stop")
    return await stream.finish()
