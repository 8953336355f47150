"""Anthropic's Messages API (``POST /v1/messages``): the adapter, for upstreams with ``api: anthropic``.

Text a model reads in a request: ``system`` (a string or text blocks), every
message's content (a string, or blocks: ``text``, ``thinking`` in the
history, the string values of a ``tool_use`` block's ``input``, a
``tool_result``'s content as a string or blocks, a ``document`` whose source
is text), and the tools' descriptions. Images and other binary sources are
not text and are not read.

Text a user reads in an answer: every content block's ``text``, ``thinking``
and ``tool_use`` input; the stream's side is ``messages_stream``.

The answer cap is ``max_tokens`` (required by the API). Usage always comes
back (``usage.input_tokens`` with the cache counts, ``usage.output_tokens``);
nothing has to be asked for. A block is Anthropic's own safety stop,
``stop_reason: "refusal"``. Errors are ``{"type": "error", "error": {"type",
"message"}}``.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

from .. import jsonio, validation
from ..errors import GatewayError, invalid_request
from ..token_counter import StreamingTokenCounter
from ..tokens import count_chat_prompt, count_text
from .base import AnswerContext, Moderated, ParsedRequest, TextRef, Usage, WireFormat
from .messages_stream import MessagesRewriter, input_tokens

# Anthropic's error type for each of the gateway's codes; by status where no code is listed.
_ERROR_TYPES = {
    "invalid_request": "invalid_request_error",
    "content_filter": "invalid_request_error",
    "method_not_allowed": "invalid_request_error",
    "invalid_api_key": "authentication_error",
    "model_not_allowed": "permission_error",
    "model_not_found": "not_found_error",
    "not_found": "not_found_error",
    "request_too_large": "request_too_large",
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "rate_limit_error",
    "upstream_error": "api_error",
    "upstream_timeout": "timeout_error",
    # A replica going away is capacity, not a fault: clients (Claude Code, the SDK) retry an
    # overloaded_error. A quota store that is down is a fault inside the gateway: api_error.
    "shutting_down": "overloaded_error",
    "store_unavailable": "api_error",
    "internal_error": "api_error",
}
_TYPES_BY_STATUS = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    504: "timeout_error",
}
# Extended thinking: the smallest budget the API takes, which must stay below max_tokens.
_MIN_THINKING_BUDGET = 1024


def _bad(param: str, expected: str) -> GatewayError:
    return invalid_request(f"{param}: must be {expected}.", param)


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


class MessagesFormat(WireFormat):
    endpoint = "messages"
    path = "/messages"
    api = "anthropic"
    input_param = "messages"

    def parse(self, body: bytes) -> ParsedRequest:
        payload = validation.decode_json_object(body)
        model = validation.check_model(payload)
        max_tokens = payload.get("max_tokens")
        if max_tokens is None:
            raise invalid_request("max_tokens: Field required (the most tokens the answer may have).", "max_tokens")
        if not _is_int(max_tokens) or max_tokens < 1:
            raise _bad("max_tokens", "a positive integer")
        _check_system(payload.get("system"))
        _check_messages(payload.get("messages"))
        tools = payload.get("tools")
        if tools is not None and not (isinstance(tools, list) and all(isinstance(tool, dict) for tool in tools)):
            raise _bad("tools", "an array of tool objects")
        return ParsedRequest(payload, model, validation.check_stream(payload))

    def prompt_tokens(self, parsed: ParsedRequest) -> int:
        """An estimate with the model's (or the default) tiktoken encoding: Anthropic's tokenizer is not public.

        Used to reserve against the limits; the upstream's own count settles them.
        """
        payload = parsed.payload
        flat = [{"role": "system", "content": "".join(_texts(payload.get("system")))}]
        for message in payload["messages"]:
            flat.append({"role": message["role"], "content": "".join(_texts(message.get("content")))})
        for tool in payload.get("tools") or ():
            schema = tool.get("input_schema")
            parts = [tool.get("name"), tool.get("description"), jsonio.dumps(schema).decode() if schema else None]
            flat.append({"role": "system", "content": "".join(p for p in parts if isinstance(p, str))})
        return count_chat_prompt(parsed.model, flat)

    def input_texts(self, parsed: ParsedRequest, input_rules: bool) -> list[TextRef]:
        payload = parsed.payload
        refs: list[TextRef] = []
        system = payload.get("system")
        if isinstance(system, str):
            refs.append(TextRef(payload, "system"))
        else:
            refs.extend(_block_refs(system))
        for message in payload["messages"]:
            if isinstance(message.get("content"), str):
                refs.append(TextRef(message, "content"))
            else:
                refs.extend(_block_refs(message.get("content")))
        for tool in payload.get("tools") or ():
            if isinstance(tool.get("description"), str):
                refs.append(TextRef(tool, "description"))
        return refs

    def requested_tokens(self, parsed: ParsedRequest, default: int) -> int:
        return parsed.payload["max_tokens"]

    def cap_fields(self, parsed: ParsedRequest, per_choice: int) -> dict[str, Any]:
        fields: dict[str, Any] = {"max_tokens": per_choice}
        thinking = parsed.payload.get("thinking")
        budget = thinking.get("budget_tokens") if isinstance(thinking, dict) else None
        if _is_int(budget) and budget >= per_choice and per_choice - 1 >= _MIN_THINKING_BUDGET:
            # The API wants the thinking budget below max_tokens; a cap under its minimum is
            # sent as it is and the upstream's own 400 explains it.
            fields["thinking"] = {**thinking, "budget_tokens": per_choice - 1}
        return fields

    def moderate_whole(self, parsed: ParsedRequest, document: dict[str, Any], ctx: AnswerContext) -> Moderated:
        return moderate_message(document, ctx)

    def stream_rewriter(self, parsed: ParsedRequest, ctx: AnswerContext) -> MessagesRewriter:
        return MessagesRewriter(ctx)

    def error_body(self, error: GatewayError) -> bytes:
        kind = _ERROR_TYPES.get(error.code) or _TYPES_BY_STATUS.get(error.status)
        if kind is None:
            kind = "api_error" if error.status >= 500 else "invalid_request_error"
        return jsonio.dumps({"type": "error", "error": {"type": kind, "message": error.message}})


# -- the request --------------------------------------------------------------


def _check_system(system: Any) -> None:
    if system is None or isinstance(system, str):
        return
    if not isinstance(system, list):
        raise _bad("system", "a string or an array of text blocks")
    for i, block in enumerate(system):
        if not isinstance(block, dict) or block.get("type") != "text" or not isinstance(block.get("text"), str):
            raise _bad(f"system.{i}", 'a text block ({"type": "text", "text": "..."})')


def _check_messages(messages: Any) -> None:
    if messages is None:
        raise invalid_request("messages: Field required.", "messages")
    if not isinstance(messages, list) or not messages:
        raise _bad("messages", "a non-empty array of message objects")
    for i, message in enumerate(messages):
        param = f"messages.{i}"
        if not isinstance(message, dict):
            raise _bad(param, "an object")
        if not isinstance(message.get("role"), str):
            raise _bad(f"{param}.role", "a string")
        content = message.get("content")
        if isinstance(content, str):
            continue
        if not isinstance(content, list):
            raise _bad(f"{param}.content", "a string or an array of content blocks")
        _check_blocks(content, f"{param}.content")


def _check_blocks(blocks: list[Any], param: str) -> None:
    for j, block in enumerate(blocks):
        where = f"{param}.{j}"
        if not isinstance(block, dict) or not isinstance(block.get("type"), str):
            raise _bad(where, "a content block object with a 'type'")
        kind = block["type"]
        if kind in ("text", "thinking") and not isinstance(block.get(kind), str):
            raise _bad(f"{where}.{kind}", "a string")
        if kind == "tool_result":
            content = block.get("content")
            if content is not None and not isinstance(content, str):
                if not isinstance(content, list):
                    raise _bad(f"{where}.content", "a string or an array of content blocks")
                _check_blocks(content, f"{where}.content")


def _block_refs(blocks: Any) -> Iterator[TextRef]:
    """Every text a model reads in a list of content blocks, writable in place."""
    if not isinstance(blocks, list):
        return
    for block in blocks:
        if not isinstance(block, dict):
            continue
        kind = block.get("type")
        if kind in ("text", "thinking") and isinstance(block.get(kind), str):
            # A thinking block's signature covers its text: a redaction here makes the API refuse it.
            yield TextRef(block, kind)
        elif kind == "tool_use":
            yield from _json_strings(block, "input")
        elif kind == "tool_result":
            if isinstance(block.get("content"), str):
                yield TextRef(block, "content")
            else:
                yield from _block_refs(block.get("content"))
        elif kind == "document":
            source = block.get("source")
            if isinstance(source, dict) and source.get("type") == "text" and isinstance(source.get("data"), str):
                yield TextRef(source, "data")
            elif isinstance(source, dict) and source.get("type") == "content":
                yield from _block_refs(source.get("content"))


def _json_strings(container: Any, key: Any) -> Iterator[TextRef]:
    """Every string value inside ``container[key]`` (a tool's JSON input): redacted, the JSON stays valid."""
    value = container[key]
    if isinstance(value, str):
        yield TextRef(container, key)
    elif isinstance(value, dict):
        for name in value:
            yield from _json_strings(value, name)
    elif isinstance(value, list):
        for index in range(len(value)):
            yield from _json_strings(value, index)


def _texts(content: Any) -> Iterator[str]:
    """The text of a ``system`` or a message's content, tool inputs as their JSON, to count."""
    if isinstance(content, str):
        yield content
        return
    for ref in _block_refs(content):
        yield ref.get()
    for block in content if isinstance(content, list) else ():
        if isinstance(block, dict) and block.get("type") == "tool_use" and isinstance(block.get("name"), str):
            yield block["name"]


# -- the whole answer ---------------------------------------------------------


def moderate_message(document: dict[str, Any], ctx: AnswerContext) -> Moderated:
    """A whole answer: every block moderated as a stream's window would, capped at ``ctx.cap``, counted.

    A block ends the answer at the match: the blocked text or thinking block
    keeps what comes before the match (a blocked ``tool_use`` is dropped: half
    an input is no input), every later block is dropped and ``stop_reason``
    becomes ``"refusal"``. At the cap the answer is cut the same way with
    ``"max_tokens"`` (a ``tool_use`` that does not fit whole is dropped).
    """
    engine = ctx.engine if ctx.engine is not None and ctx.engine.has_rules("output") else None
    usage = _usage(document.get("usage"))
    content = document.get("content")
    if not isinstance(content, list):
        return Moderated(b"", [], usage, 0)
    actions: list[Any] = []
    kept: list[Any] = []
    counted = 0
    stop: str | None = None
    changed = False
    for block in content:
        kind = block.get("type") if isinstance(block, dict) else None
        if kind == "tool_use":
            refs = list(_json_strings(block, "input")) if "input" in block else []
            cost = count_text(ctx.model, jsonio.dumps(block.get("input")).decode()) + count_text(
                ctx.model, str(block.get("name") or "")
            )
            if ctx.cap is not None and counted + cost > ctx.cap:
                stop = "max_tokens"
                break
            counted += cost
        elif kind in ("text", "thinking") and isinstance(block.get(kind), str):
            refs = [TextRef(block, kind)]
            text = block[kind]
            if ctx.cap is not None:
                fitted, _ = StreamingTokenCounter(ctx.model).fit(text, ctx.cap - counted)
                if fitted != text:
                    block[kind], stop, changed = fitted, "max_tokens", True
            counted += count_text(ctx.model, block[kind])
        else:
            kept.append(block)
            continue
        blocked = False
        for ref in refs if engine is not None else ():
            result = engine.moderate(ref.get(), "output")
            actions.extend(result.actions)
            if result.text != ref.get():
                ref.set(result.text)
                changed = True
            if result.blocked is not None:
                blocked = True
                break
        if blocked:
            stop = "refusal"
            if kind != "tool_use" and block[kind]:
                kept.append(block)
            break
        if stop is None or block.get(kind):
            kept.append(block)
        if stop is not None:
            break
    if stop is not None:
        changed = True
        document["content"] = kept
        document["stop_reason"] = stop
        document["stop_sequence"] = None
        if stop == "max_tokens" and usage is not None:
            usage = Usage(usage.prompt, counted)  # billed for what the client got
    return Moderated(jsonio.dumps(document) if changed else b"", actions, usage, counted)


def _usage(value: Any) -> Usage | None:
    if not isinstance(value, dict):
        return None
    output = value.get("output_tokens")
    completion = output if _is_int(output) and output >= 0 else None
    prompt = input_tokens(value)
    if prompt is None and completion is None:
        return None
    return Usage(prompt, completion)
