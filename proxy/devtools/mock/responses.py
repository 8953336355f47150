"""``POST /v1/responses``: OpenAI's Responses API, streamed and not.

The answer is a list of output items, in order: a ``reasoning`` item when
``mock.reasoning`` gives a summary, then a ``function_call`` (``mock.tool_call``),
or a ``message`` whose one content part is a ``refusal`` (``mock.refusal``) or
``output_text`` (``mock.reply``, else the text of the last user input).
``max_output_tokens`` cuts it (reasoning counts) with ``status: "incomplete"``
and ``incomplete_details.reason: "max_output_tokens"``. Streamed, each event
is an ``event: <type>`` / ``data: <json>`` pair with ``sequence_number`` from 0
and no ``[DONE]``; the finished text is repeated in every ``*.done`` event,
``response.output_item.done`` and the final response, as OpenAI does.

As the real API does, the mock refuses ``stream_options``, ``max_tokens`` and
a ``max_output_tokens`` below 16, so a gateway that injects them is caught.
"""

from __future__ import annotations

import itertools
import time
from typing import Any

from aiohttp import web

from proxy import tokens

from .control import RESPONSES_FIELDS, MockControl, MockError, bad, is_int
from .fields import model_of, wants_stream
from .plan import Segment, last_user_text, plan_segments, segment_tokens, text_of
from .state import MOCK_STATE
from .wire import EventStream, Pacer, before_answer, no_answer, pause, read_json, verbatim

MIN_OUTPUT_TOKENS = 16
# Padding that evens out the length of a delta event (OpenAI's ``obfuscation``).
_OBFUSCATION = "Zq8fK2mXw4Lr9TbN"
# Per segment kind: (delta event, done event, the done event's text field).
_EVENTS = {
    "reasoning": ("response.reasoning_summary_text.delta", "response.reasoning_summary_text.done", "text"),
    "text": ("response.output_text.delta", "response.output_text.done", "text"),
    "refusal": ("response.refusal.delta", "response.refusal.done", "refusal"),
    "tool": ("response.function_call_arguments.delta", "response.function_call_arguments.done", "arguments"),
}


def _prompt_messages(body: dict[str, Any]) -> list[dict[str, Any]]:
    """``instructions`` and ``input`` as chat messages, to count and to find what to echo."""
    instructions = body.get("instructions")
    if instructions is not None and not isinstance(instructions, str):
        raise bad("instructions", "must be a string")
    value = body.get("input")
    if value is None:
        items: list[Any] = []
    elif isinstance(value, str):
        items = [{"role": "user", "content": value}]
    elif isinstance(value, list):
        items = value
    else:
        raise bad("input", "must be a string or an array of input items")
    messages: list[dict[str, Any]] = [{"role": "system", "content": instructions}] if instructions else []
    for index, item in enumerate(items):
        if not isinstance(item, dict):
            raise bad(f"input[{index}]", "must be an object")
        kind = item.get("type", "message")
        if kind == "message":
            messages.append({"role": item.get("role", "user"), "content": text_of(item.get("content"))})
        elif kind == "function_call_output":
            output = item.get("output")
            messages.append({"role": "tool", "content": output if isinstance(output, str) else text_of(output)})
        elif kind == "function_call":
            function = {"name": item.get("name"), "arguments": item.get("arguments")}
            messages.append({"role": "assistant", "tool_calls": [{"function": function}]})
        elif kind == "reasoning":
            summary = item.get("summary") or []
            text = "".join(s.get("text", "") for s in summary if isinstance(s, dict))
            messages.append({"role": "assistant", "content": text})
    return messages


def _cap(body: dict[str, Any]) -> int | None:
    for refused in ("stream_options", "max_tokens"):
        if refused in body:
            raise MockError(400, f"Unsupported parameter: '{refused}'.", param=refused, code="unsupported_parameter")
    cap = body.get("max_output_tokens")
    if cap is None:
        return None
    if not is_int(cap) or cap < MIN_OUTPUT_TOKENS:
        raise bad("max_output_tokens", f"integer below minimum value; expected a value >= {MIN_OUTPUT_TOKENS}")
    return cap


class _Answer:
    """The items of one answer and the JSON of each at every stage (added, partial, done)."""

    def __init__(self, number: int, segments: list[Segment], tool_name: str):
        self.segments = segments
        self.tool_name = tool_name
        self.call_id = f"call_mock_{number}"
        prefix = {"reasoning": "rs", "text": "msg", "refusal": "msg", "tool": "fc"}
        self.ids = [f"{prefix[s.kind]}_mock_{number}_{i}" for i, s in enumerate(segments)]

    def part(self, segment: Segment, text: str) -> dict[str, Any]:
        if segment.kind == "reasoning":
            return {"type": "summary_text", "text": text}
        if segment.kind == "refusal":
            return {"type": "refusal", "refusal": text}
        return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}

    def item(self, index: int, text: str | None, status: str) -> dict[str, Any]:
        """Output item ``index`` holding ``text``; None: as first announced, with no part yet."""
        segment, item_id = self.segments[index], self.ids[index]
        if segment.kind == "tool":
            return {"id": item_id, "type": "function_call", "status": status, "arguments": text or "",
                    "call_id": self.call_id, "name": self.tool_name}
        parts = [] if text is None else [self.part(segment, text)]
        if segment.kind == "reasoning":
            return {"id": item_id, "type": "reasoning", "summary": parts}
        return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}

    def done_items(self) -> list[dict[str, Any]]:
        return [self.item(i, s.text, "incomplete" if s.cut else "completed") for i, s in enumerate(self.segments)]


async def responses(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(body)
    stream_wanted = wants_stream(body)
    messages = _prompt_messages(body)
    cap = _cap(body)
    control = MockControl.parse(body.get("mock"), RESPONSES_FIELDS)

    delay_ms = await before_answer(request, control)
    if (early := await verbatim(request, control, delay_ms, stream_wanted)) is not None:
        return early

    tool = control.tool_call
    wanted = [("reasoning", control.reasoning)] if control.reasoning is not None else []
    if tool is not None:
        wanted.append(("tool", tool.arguments))
    elif control.refusal is not None:
        wanted.append(("refusal", control.refusal))
    else:
        wanted.append(("text", control.reply if control.reply is not None else last_user_text(messages)))
    tool_name = tool.name if tool is not None else ""
    segments, truncated = plan_segments(model, wanted, cap, control, tool_name)
    number = request.app[MOCK_STATE].next_answer_number()
    answer = _Answer(number, segments, tool_name)
    created = int(time.time())

    def usage() -> dict[str, Any] | None:
        if not control.usage:
            return None
        prompt = tokens.count_chat_prompt(model, messages)
        output = sum(segment_tokens(model, s, tool_name) for s in segments)
        reasoning = sum(segment_tokens(model, s) for s in segments if s.kind == "reasoning")
        return {
            "input_tokens": prompt,
            "input_tokens_details": {"cached_tokens": min(control.cached_tokens, prompt)},
            "output_tokens": output,
            "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": prompt + output,
        }

    def envelope(status: str, output: list[dict[str, Any]], **fields: Any) -> dict[str, Any]:
        response: dict[str, Any] = {
            "id": f"resp_mock_{number}", "object": "response", "created_at": created, "status": status,
            "background": False, "error": None, "incomplete_details": None,
            "instructions": body.get("instructions"), "max_output_tokens": cap, "max_tool_calls": None,
            "model": model, "output": output, "parallel_tool_calls": True,
            "previous_response_id": body.get("previous_response_id"),
            "reasoning": {"effort": None, "summary": None}, "service_tier": "default", "store": body.get("store", True),
            "temperature": 1.0, "text": {"format": {"type": "text"}, "verbosity": "medium"},
            "tool_choice": body.get("tool_choice", "auto"), "tools": body.get("tools") or [], "top_p": 1.0,
            "truncation": "disabled", "usage": None, "user": None, "metadata": body.get("metadata") or {},
        }
        response.update(fields)
        return response

    def final() -> dict[str, Any]:
        if truncated:
            return envelope("incomplete", answer.done_items(), usage=usage(),
                            incomplete_details={"reason": "max_output_tokens"})
        return envelope("completed", answer.done_items(), usage=usage(), completed_at=int(time.time()))

    failure = {"code": "server_error", "message": "The mock model failed while generating the response."}
    if not stream_wanted:
        await pause(request, delay_ms)
        if control.drop_after is not None:
            return no_answer(request)
        if control.error_after is not None:
            raise MockError(500, "The server had an error while processing your request.", code="server_error")
        if control.fail_after is not None:
            return web.json_response(envelope("failed", [], error=failure))
        return web.json_response(final())

    stream = EventStream(request)
    sequence = itertools.count()

    async def emit(kind: str, **fields: Any) -> None:
        await stream.send_named(kind, {"type": kind, "sequence_number": next(sequence), **fields})

    async def stop(kind: str, output: list[dict[str, Any]]) -> web.StreamResponse:
        if kind == "drop":
            return stream.cut()
        if kind == "error":
            await emit("error", code="server_error", message="The mock model had an error mid-stream.", param=None)
        else:
            await emit("response.failed", response=envelope("failed", output, error=failure))
        return await stream.finish()

    await stream.open()
    await emit("response.created", response=envelope("in_progress", []))
    await emit("response.in_progress", response=envelope("in_progress", []))
    pacer = Pacer(request, control, delay_ms)
    done: list[dict[str, Any]] = []
    for index, segment in enumerate(answer.segments):
        item_id = answer.ids[index]
        delta_event, done_event, done_field = _EVENTS[segment.kind]
        where: dict[str, Any] = {"item_id": item_id, "output_index": index}
        await emit("response.output_item.added", output_index=index, item=answer.item(index, None, "in_progress"))
        if segment.kind == "reasoning":
            where["summary_index"] = 0
            await emit("response.reasoning_summary_part.added", **where, part=answer.part(segment, ""))
        elif segment.kind != "tool":
            where["content_index"] = 0
            await emit("response.content_part.added", **where, part=answer.part(segment, ""))
        sent = ""
        for piece in segment.pieces:
            if (halt := await pacer.next()) is not None:
                return await stop(halt, [*done, answer.item(index, sent, "incomplete")])
            extra = {"logprobs": []} if segment.kind == "text" else {}
            await emit(delta_event, **where, delta=piece, **extra, obfuscation=_OBFUSCATION[: 16 - len(piece) % 16])
            sent += piece
            pacer.sent()
        extra = {"logprobs": []} if segment.kind == "text" else {}
        await emit(done_event, **where, **{done_field: segment.text}, **extra)
        if segment.kind == "reasoning":
            await emit("response.reasoning_summary_part.done", **where, part=answer.part(segment, segment.text))
        elif segment.kind != "tool":
            await emit("response.content_part.done", **where, part=answer.part(segment, segment.text))
        item = answer.done_items()[index]
        await emit("response.output_item.done", output_index=index, item=item)
        done.append(item)
    if (halt := await pacer.end()) is not None:
        return await stop(halt, done)
    response = final()
    await emit("response.incomplete" if truncated else "response.completed", response=response)
    return await stream.finish()
