"""OpenAI's Responses API (``POST /v1/responses``): the adapter's request side and whole answers.

Text a model reads in a request: ``instructions``; ``input`` as a string or
as items: messages (string content or text parts, earlier assistant
``output_text`` and ``refusal`` parts included), ``function_call`` arguments,
``function_call_output`` and ``custom_tool_call_output`` outputs,
``custom_tool_call`` inputs, ``mcp_call`` arguments and outputs, reasoning
summaries and reasoning text in the history; the tools' descriptions; a
reusable prompt's string variables.

The answer cap is ``max_output_tokens``, which the API refuses below 16, so a
budget with less than that left is refused here rather than sent upstream to
be refused there. Usage always comes back in the final response (the API
refuses ``stream_options``), so a stream asks for nothing extra.

An answer's text, streamed or whole, is moderated by ``responses_output``; a
block ends it with ``status: "incomplete"`` and
``incomplete_details.reason: "content_filter"``, OpenAI's own signal.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import jsonio, validation
from ..errors import GatewayError, invalid_request
from ..tokens import count_chat_prompt, count_text
from .base import AnswerContext, Moderated, ParsedRequest, TextRef, Usage, WireFormat, usage_from
from .responses_output import MAX_OUTPUT_TOKENS, OutputTexts, settle_output
from .responses_stream import ResponsesRewriter

MIN_OUTPUT_TOKENS = 16  # the API refuses a smaller max_output_tokens
_TEXT_PART_TYPES = ("input_text", "output_text", "text", "summary_text", "reasoning_text")


class ResponsesFormat(WireFormat):
    endpoint = "responses"
    path = "/responses"
    input_param = "input"

    def parse(self, body: bytes) -> ParsedRequest:
        payload = validation.decode_json_object(body)
        model = validation.check_model(payload)
        value = payload.get("input")
        if value is not None and not isinstance(value, str):
            if not isinstance(value, list):
                raise invalid_request("'input' must be a string or an array of input items.", "input")
            for i, item in enumerate(value):
                if not isinstance(item, dict):
                    raise invalid_request(f"'input[{i}]' must be an object.", f"input[{i}]")
        instructions = payload.get("instructions")
        if instructions is not None and not isinstance(instructions, str):
            raise invalid_request("'instructions' must be a string.", "instructions")
        stream = validation.check_stream(payload)
        validation.optional_positive_int(payload, "max_output_tokens")
        return ParsedRequest(payload, model, stream)

    def prompt_tokens(self, parsed: ParsedRequest) -> int:
        """An estimate to reserve with (the final response's ``input_tokens`` is what is billed)."""
        messages: list[dict[str, Any]] = []
        tools = 0
        for role, ref in _texts(parsed.payload):
            if role is None:
                tools += count_text(parsed.model, ref.get())
            else:
                messages.append({"role": role, "content": ref.get()})
        return count_chat_prompt(parsed.model, messages) + tools

    def input_texts(self, parsed: ParsedRequest, input_rules: bool) -> list[TextRef]:
        return [ref for _, ref in _texts(parsed.payload)]

    def requested_tokens(self, parsed: ParsedRequest, default: int) -> int:
        return parsed.payload.get("max_output_tokens") or default

    def cap_fields(self, parsed: ParsedRequest, per_choice: int) -> dict[str, Any]:
        return {"max_output_tokens": per_choice}

    def check_cap(self, per_choice: int) -> None:
        if per_choice < MIN_OUTPUT_TOKENS:
            raise GatewayError(
                429,
                "insufficient_quota",
                f"Only {per_choice} tokens are left of the token budget, and the Responses API needs room for "
                f"at least {MIN_OUTPUT_TOKENS} output tokens (max_output_tokens).",
                headers={"x-should-retry": "false"},
            )

    def moderate_whole(self, parsed: ParsedRequest, document: dict[str, Any], ctx: AnswerContext) -> Moderated:
        texts = OutputTexts(ctx, _asks_logprobs(parsed))
        output = document.get("output")
        changed = settle_output(texts, output) if isinstance(output, list) else False
        if texts.cut is not None:
            document["status"] = "incomplete"
            document["incomplete_details"] = {"reason": texts.cut}
        usage = usage_from(document.get("usage"), "input_tokens", "output_tokens")
        counted = texts.completion_tokens()
        if texts.cut == MAX_OUTPUT_TOKENS and usage is not None:
            usage = Usage(usage.prompt, counted)  # the upstream ignored the cap: bill what was delivered
        return Moderated(jsonio.dumps(document) if changed else b"", texts.actions, usage, counted)

    def stream_rewriter(self, parsed: ParsedRequest, ctx: AnswerContext) -> ResponsesRewriter:
        return ResponsesRewriter(ctx, _asks_logprobs(parsed))


def _asks_logprobs(parsed: ParsedRequest | None) -> bool:
    """Logprobs come back only when ``include`` asks for them."""
    include = parsed.payload.get("include") if parsed is not None else None
    return isinstance(include, list) and "message.output_text.logprobs" in include


def _texts(payload: dict[str, Any]) -> Iterator[tuple[str | None, TextRef]]:
    """(the role it is read in, or None for a tool's description; the text) for every prompt text."""
    if isinstance(payload.get("instructions"), str):
        yield "system", TextRef(payload, "instructions")
    value = payload.get("input")
    if isinstance(value, str):
        yield "user", TextRef(payload, "input")
    elif isinstance(value, list):
        for item in value:
            if isinstance(item, dict):
                yield from _item_texts(item)
    for tool in _list(payload.get("tools")):
        if isinstance(tool, dict) and isinstance(tool.get("description"), str):
            yield None, TextRef(tool, "description")
    prompt = payload.get("prompt")
    variables = prompt.get("variables") if isinstance(prompt, dict) else None
    if isinstance(variables, dict):
        for name, variable in variables.items():
            if isinstance(variable, str):
                yield "user", TextRef(variables, name)
            elif isinstance(variable, dict) and isinstance(variable.get("text"), str):
                yield "user", TextRef(variable, "text")


def _item_texts(item: dict[str, Any]) -> Iterator[tuple[str, TextRef]]:
    kind = item.get("type", "message")
    if kind == "message":
        role = item.get("role") if isinstance(item.get("role"), str) else "user"
        yield from _content_texts(role, item, "content")
    elif kind == "reasoning":
        for name in ("summary", "content"):
            for part in _list(item.get(name)):
                if isinstance(part, dict) and isinstance(part.get("text"), str):
                    yield "assistant", TextRef(part, "text")
    elif kind in ("function_call", "mcp_call", "custom_tool_call"):
        for name in ("arguments", "input", "output"):
            if isinstance(item.get(name), str):
                yield "assistant" if name != "output" else "tool", TextRef(item, name)
    elif kind in ("function_call_output", "custom_tool_call_output"):
        yield from _content_texts("tool", item, "output")


def _content_texts(role: str, holder: dict[str, Any], name: str) -> Iterator[tuple[str, TextRef]]:
    content = holder.get(name)
    if isinstance(content, str):
        yield role, TextRef(holder, name)
        return
    for part in _list(content):
        if not isinstance(part, dict):
            continue
        if part.get("type") in _TEXT_PART_TYPES and isinstance(part.get("text"), str):
            yield role, TextRef(part, "text")
        elif part.get("type") == "refusal" and isinstance(part.get("refusal"), str):
            yield role, TextRef(part, "refusal")


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
