"""``POST /v1/chat/completions`` and ``POST /v1/completions``, streamed and not.

The reply echoes the last user message (for completions, the prompt), one word
per chunk; ``n`` gives that many choices, interleaved in the stream;
``max_completion_tokens`` (else ``max_tokens``) cuts the reply with
finish_reason "length"; ``stream_options.include_usage`` adds the usage chunk.
"""

from __future__ import annotations

import time
from typing import Any, Callable

from aiohttp import web

from proxy import tokens

from .control import MockControl, bad, is_int
from .plan import Answer, last_user_text, plan_answer
from .state import MOCK_STATE
from .wire import EventStream, Pacer, before_answer, no_answer, pause, read_json, verbatim

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


def _wants_usage(body: dict[str, Any], control: MockControl) -> bool:
    options = body.get("stream_options")
    if options is not None and not isinstance(options, dict):
        raise bad("stream_options", "must be an object")
    return control.usage and isinstance(options, dict) and options.get("include_usage") is True


def _choice_count(body: dict[str, Any]) -> int:
    n = body.get("n")
    if n is None:
        return 1
    if not is_int(n) or not 1 <= n <= MAX_CHOICES:
        raise bad("n", f"must be an integer from 1 to {MAX_CHOICES}")
    return n


def _max_tokens(body: dict[str, Any]) -> int | None:
    """The completion token limit: max_completion_tokens, else max_tokens."""
    for field in ("max_completion_tokens", "max_tokens"):
        value = body.get(field)
        if value is None:
            continue
        if not is_int(value) or value < 0:
            raise bad(field, "must be an integer >= 0")
        return value
    return None


def _prompt_text(prompt: Any) -> str:
    """What a completion echoes: the prompt, or the first of several; token-id prompts echo nothing."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def _answer_options(body: dict[str, Any]) -> tuple[bool, MockControl, int, int | None, bool]:
    """What chat and completions read alike: stream, the mock controls, n, max tokens, usage."""
    stream_wanted = wants_stream(body)
    control = MockControl.parse(body.get("mock"))
    return stream_wanted, control, _choice_count(body), _max_tokens(body), stream_wanted and _wants_usage(body, control)


async def _stream_content(
    stream: EventStream, pacer: Pacer, answer: Answer, n: int, make_chunk: Callable[[int, str], dict[str, Any]]
) -> bool:
    """Send each piece to every choice in turn; False if ``drop_after`` cut the stream."""
    for piece in answer.pieces:
        for index in range(n):
            if await pacer.next() is not None:
                stream.cut()
                return False
            await stream.send(make_chunk(index, piece))
            await pacer.sent()
    if await pacer.end() is not None:
        # Fewer chunks than drop_after: still no final chunk and no [DONE].
        stream.cut()
        return False
    return True


async def chat_completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(body)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad("messages", "`messages` must be a non-empty array")
    stream_wanted, control, n, max_tokens, include_usage = _answer_options(body)

    delay_ms = await before_answer(request, control)
    if (early := await verbatim(request, control, delay_ms, stream_wanted)) is not None:
        return early

    tool = control.tool_call
    if tool is not None:
        answer = plan_answer(model, tool.arguments, max_tokens, control, "tool_calls")
    else:
        reply = control.reply if control.reply is not None else last_user_text(messages)
        answer = plan_answer(model, reply, max_tokens, control, "stop")
    number = request.app[MOCK_STATE].next_answer_number()
    completion_id = f"chatcmpl-mock-{number}"
    call_id = f"call_mock_{number}"
    created = int(time.time())

    def usage() -> dict[str, int]:
        per_choice = tokens.count_text(model, answer.text)
        if tool is not None:
            per_choice += tokens.count_text(model, tool.name)
        return _usage(tokens.count_chat_prompt(model, messages), per_choice * n)

    if not stream_wanted:
        await pause(request, delay_ms)
        if control.drop_after is not None:
            return no_answer(request)
        if tool is not None:
            message: dict[str, Any] = {
                "role": "assistant",
                "content": None,
                "tool_calls": [
                    {"id": call_id, "type": "function", "function": {"name": tool.name, "arguments": answer.text}}
                ],
            }
        else:
            message = {"role": "assistant", "content": answer.text, "refusal": None}
        result: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion",
            "created": created,
            "model": model,
            "choices": [
                {"index": i, "message": message, "logprobs": None, "finish_reason": answer.finish_reason}
                for i in range(n)
            ],
            "system_fingerprint": None,
        }
        if control.usage:
            result["usage"] = usage()
        return web.json_response(result)

    def chunk(index: int, delta: dict[str, Any], finish_reason: str | None = None) -> dict[str, Any]:
        event: dict[str, Any] = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": finish_reason}],
        }
        if include_usage:
            event["usage"] = None
        return event

    if tool is not None:
        first_delta: dict[str, Any] = {
            "role": "assistant",
            "content": None,
            "tool_calls": [
                {"index": 0, "id": call_id, "type": "function", "function": {"name": tool.name, "arguments": ""}}
            ],
        }

        def piece_chunk(index: int, piece: str) -> dict[str, Any]:
            return chunk(index, {"tool_calls": [{"index": 0, "function": {"arguments": piece}}]})

    else:
        first_delta = {"role": "assistant", "content": "", "refusal": None}

        def piece_chunk(index: int, piece: str) -> dict[str, Any]:
            return chunk(index, {"content": piece})

    stream = EventStream(request)
    await stream.open()
    for index in range(n):
        await stream.send(chunk(index, first_delta))
    if not await _stream_content(stream, Pacer(request, control, delay_ms), answer, n, piece_chunk):
        return stream.response
    for index in range(n):
        await stream.send(chunk(index, {}, answer.finish_reason))
    if include_usage:
        final = chunk(0, {})
        final["choices"] = []
        final["usage"] = usage()
        await stream.send(final)
    return await stream.finish(with_done=not control.no_done)


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)):
        raise bad("prompt", "`prompt` must be a string or an array")
    stream_wanted, control, n, max_tokens, include_usage = _answer_options(body)

    delay_ms = await before_answer(request, control)
    if (early := await verbatim(request, control, delay_ms, stream_wanted)) is not None:
        return early

    reply = control.reply if control.reply is not None else _prompt_text(prompt)
    answer = plan_answer(model, reply, max_tokens, control, "stop")
    completion_id = f"cmpl-mock-{request.app[MOCK_STATE].next_answer_number()}"
    created = int(time.time())

    def usage() -> dict[str, int]:
        return _usage(tokens.count_prompt(model, prompt), tokens.count_text(model, answer.text) * n)

    def completion(choices: list[dict[str, Any]]) -> dict[str, Any]:
        return {
            "id": completion_id,
            "object": "text_completion",
            "created": created,
            "model": model,
            "system_fingerprint": None,
            "choices": choices,
        }

    def choice(index: int, text: str, finish_reason: str | None) -> dict[str, Any]:
        return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}

    if not stream_wanted:
        await pause(request, delay_ms)
        if control.drop_after is not None:
            return no_answer(request)
        result = completion([choice(i, answer.text, answer.finish_reason) for i in range(n)])
        if control.usage:
            result["usage"] = usage()
        return web.json_response(result)

    def chunk(index: int, text: str, finish_reason: str | None = None) -> dict[str, Any]:
        event = completion([choice(index, text, finish_reason)])
        if include_usage:
            event["usage"] = None
        return event

    stream = EventStream(request)
    await stream.open()
    if not await _stream_content(stream, Pacer(request, control, delay_ms), answer, n, chunk):
        return stream.response
    for index in range(n):
        await stream.send(chunk(index, "", answer.finish_reason))
    if include_usage:
        final = completion([])
        final["usage"] = usage()
        await stream.send(final)
    return await stream.finish(with_done=not control.no_done)
