"""``POST /v1/completions``, streamed and not: the prompt (the first of several) echoed back."""

from __future__ import annotations

import time
from typing import Any

from aiohttp import web

from proxy import tokens

from .control import MockControl, bad
from .fields import choice_count, max_tokens, model_of, stream_pieces, usage_block, wants_stream, wants_usage
from .plan import plan_answer
from .state import MOCK_STATE
from .wire import EventStream, Pacer, before_answer, no_answer, pause, read_json, verbatim


def _prompt_text(prompt: Any) -> str:
    """What a completion echoes: the prompt, or the first of several; token-id prompts echo nothing."""
    if isinstance(prompt, str):
        return prompt
    if isinstance(prompt, list) and prompt and isinstance(prompt[0], str):
        return prompt[0]
    return ""


async def completions(request: web.Request) -> web.StreamResponse:
    body = await read_json(request)
    model = model_of(body)
    prompt = body.get("prompt")
    if not isinstance(prompt, (str, list)):
        raise bad("prompt", "`prompt` must be a string or an array")
    stream_wanted = wants_stream(body)
    control = MockControl.parse(body.get("mock"))
    n = choice_count(body)
    cap = max_tokens(body)
    include_usage = stream_wanted and wants_usage(body, control)

    delay_ms = await before_answer(request, control)
    if (early := await verbatim(request, control, delay_ms, stream_wanted)) is not None:
        return early

    reply = control.reply if control.reply is not None else _prompt_text(prompt)
    answer = plan_answer(model, reply, cap, control, "stop")
    completion_id = f"cmpl-mock-{request.app[MOCK_STATE].next_answer_number()}"
    created = int(time.time())

    def usage() -> dict[str, Any]:
        return usage_block(tokens.count_prompt(model, prompt), tokens.count_text(model, answer.text) * n)

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
    if not await stream_pieces(stream, Pacer(request, control, delay_ms), answer.pieces, n, chunk):
        return stream.response
    for index in range(n):
        await stream.send(chunk(index, "", answer.finish_reason))
    if include_usage:
        final = completion([])
        final["usage"] = usage()
        await stream.send(final)
    return await stream.finish(with_done=not control.no_done)
