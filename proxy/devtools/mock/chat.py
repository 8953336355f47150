"""``POST /v1/chat/completions``, streamed and not.

The reply echoes the last user message, one word per chunk; ``n`` gives that
many choices, interleaved in the stream; ``max_completion_tokens`` (else
``max_tokens``) cuts the answer with finish_reason "length", reasoning first;
``stream_options.include_usage`` adds the usage chunk. ``mock.reasoning``
streams reasoning before the answer (as ``delta.reasoning_content``, or
``delta.reasoning`` with ``mock.reasoning_field``), ``mock.refusal`` answers
with ``delta.refusal`` instead of content, and the request's ``logprobs`` /
``top_logprobs`` give every content or refusal piece its logprobs entry (one
entry per streamed piece, whose token is that piece).
"""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy import tokens

from .control import CHAT_FIELDS, MockControl, bad, is_int
from .fields import choice_count, max_tokens, model_of, stream_pieces, usage_block, wants_stream, wants_usage
from .plan import Answer, last_user_text, plan_answer
from .state import MOCK_STATE
from .wire import EventStream, Pacer, before_answer, no_answer, pause, read_json, verbatim

MAX_TOP_LOGPROBS = 20


def _top_logprobs(body: dict[str, Any]) -> int | None:
    """None without ``logprobs: true``, else how many alternatives each entry lists."""
    logprobs = body.get("logprobs")
    top = body.get("top_logprobs")
    if logprobs is not None and not isinstance(logprobs, bool):
        raise bad("logprobs", "must be a boolean")
    if top is not None and (not is_int(top) or not 0 <= top <= MAX_TOP_LOGPROBS):
        raise bad("top_logprobs", f"must be an integer from 0 to {MAX_TOP_LOGPROBS}")
    if top is not None and logprobs is not True:
        raise bad("top_logprobs", "`logprobs` must be true when `top_logprobs` is set")
    return (top or 0) if logprobs else None


def _logprob_entry(piece: str, top: int) -> dict[str, Any]:
    """A logprobs entry for ``piece``: the piece itself is the most likely token, variants follow."""
    variants = [piece, piece.upper(), piece.title(), *(f"{piece}{k}" for k in range(3, top))][:top]
    return {
        "token": piece,
        "logprob": -0.01,
        "bytes": list(piece.encode()),
        "top_logprobs": [
            {"token": t, "logprob": -0.01 - rank, "bytes": list(t.encode())} for rank, t in enumerate(variants)
        ],
    }


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "`messages` must be a non-empty array")
    stream_wanted = wants_stream(body)
    control = MockControl.parse(body.get("mock"), CHAT_FIELDS)
    n = choice_count(body)
    cap = max_tokens(body)
    include_usage = stream_wanted and wants_usage(body, control)
    top = _top_logprobs(body)

    delay_ms = await before_answer(request, control)
    if (early := await verbatim(request, control, delay_ms, stream_wanted)) is not None:
        return early

    reasoning = Answer("", "stop", [])
    if control.reasoning is not None:
        reasoning = plan_answer(model, control.reasoning, cap, control, "stop")
        if cap is not None:
            cap = max(0, cap - tokens.count_text(model, reasoning.text))
    tool = control.tool_call
    if tool is not None:
        kind, answer = "tool", plan_answer(model, tool.arguments, cap, control, "tool_calls")
    elif control.refusal is not None:
        kind, answer = "refusal", plan_answer(model, control.refusal, cap, control, "stop")
    else:
        reply = control.reply if control.reply is not None else last_user_text(messages)
        kind, answer = "content", plan_answer(model, reply, cap, control, "stop")
    if reasoning.finish_reason == "length":
        answer = Answer("", "length", [])  # the cap ran out while reasoning
    number = request.app[MOCK_STATE].next_answer_number()
    completion_id = f"chatcmpl-mock-{number}"
    call_id = f"call_mock_{number}"
    created = int(time.time())

    def usage() -> dict[str, Any]:
        thought = tokens.count_text(model, reasoning.text)
        per_choice = thought + tokens.count_text(model, answer.text)
        if tool is not None:
            per_choice += tokens.count_text(model, tool.name)
        block = usage_block(tokens.count_chat_prompt(model, messages), per_choice * n)
        if control.reasoning is not None:
            block["completion_tokens_details"] = {"reasoning_tokens": thought * n}
        return block

    def logprobs(pieces: list[str]) -> dict[str, Any] | None:
        if top is None or kind == "tool":
            return None
        entries = [_logprob_entry(piece, top) for piece in pieces]
        return {"content": entries, "refusal": None} if kind == "content" else {"content": None, "refusal": entries}

    if not stream_wanted:
        await pause(request, delay_ms)
        if control.drop_after is not None:
            return no_answer(request)
        if tool is not None:
            function = {"name": tool.name, "arguments": answer.text}
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [{"id": call_id, "type": "function", "function": function}],
            }
        elif kind == "refusal":
            message = {"role": "assistant", "content": None, "refusal": answer.text}
        else:
            message = {"role": "assistant", "content": answer.text, "refusal": None}
        if control.reasoning is not None:
            message[control.reasoning_field] = reasoning.text
        choice = {"message": message, "logprobs": logprobs(answer.pieces), "finish_reason": answer.finish_reason}
        result: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [{"index": i, **choice} for i in range(n)],
            "system_fingerprint": None,
        }
        if control.usage:
            result["usage"] = usage()
        return web.json_response(result)

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None, lp: Any = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": lp, "finish_reason": finish_reason}],
        }
        if include_usage:
            event["usage"] = None
        return event

    if tool is not None:
        opening = {"index": 0, "id": call_id, "type": "function", "function": {"name": tool.name, "arguments": ""}}
        first_delta: dict[str, Any] = {"role": "assistant", "content": None, "tool_calls": [opening]}
    elif kind == "refusal":
        first_delta = {"role": "assistant", "content": None, "refusal": ""}
    else:
        first_delta = {"role": "assistant", "content": "", "refusal": None}

    def piece_chunk(index: int, step: tuple[str, str]) -> dict[str, Any]:
        field, piece = step
        if field == "tool":
            return chunk(index, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})
        if field == "reasoning":
            return chunk(index, {control.reasoning_field: piece})
        return chunk(index, {field: piece}, lp=logprobs([piece]))

    steps = [("reasoning", piece) for piece in reasoning.pieces] + [(kind, piece) for piece in answer.pieces]
    stream = EventStream(request)
    await stream.open()
    for index in range(n):
        await stream.send(chunk(index, first_delta))
    if not await stream_pieces(stream, Pacer(request, control, delay_ms), steps, n, piece_chunk):
        return stream.response
    for index in range(n):
        await stream.send(chunk(index, {}, answer.finish_reason))
    if include_usage:
        final = chunk(0, {})
        final["choices"] = []
        final["usage"] = usage()
        await stream.send(final)
    return await stream.finish(with_done=not control.no_done)
