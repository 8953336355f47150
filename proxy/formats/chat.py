"""Chat Completions (``POST /v1/chat/completions``): the adapter.

Text a user reads in an answer: ``content``, reasoning in both spellings
(``reasoning_content`` from DeepSeek and older vLLM, ``reasoning`` from newer
vLLM), ``refusal``, each tool call's ``function.arguments`` and the legacy
``function_call.arguments``; in a delta while streaming, in ``message`` when
whole. Logprobs: ``logprobs.content`` belongs to ``content``,
``logprobs.refusal`` to ``refusal``.

Text a model reads in a request: every message's content (a string or text
parts), earlier assistant tool calls' arguments, refusals and reasoning in
the history, and the tools' descriptions.
"""

from __future__ import annotations

import re
from typing import Any

from .. import validation
from ..tokens import count_chat_prompt
from .base import AnswerContext, Moderated, ParsedRequest, TextRef, WireFormat
from .choices import ChoiceShape, FieldKey, moderate_choices
from .choices_stream import ChoicesRewriter

TEXT_FIELDS = ("content", "reasoning_content", "reasoning", "refusal")
_TEXT_SET = frozenset(TEXT_FIELDS)
_LOGPROB_FIELDS = ("content", "refusal")
_QUIET = (None, "", [], {})
# Models that take only ``max_completion_tokens`` (OpenAI's reasoning families).
_COMPLETION_TOKENS_ONLY = re.compile(r"^(o\d|gpt-5)")


class ChatShape(ChoiceShape):
    def holder(self, choice: dict[str, Any], whole: bool) -> Any:
        return choice.get("message" if whole else "delta")

    def fields(self, holder: dict[str, Any]) -> list[tuple[FieldKey, dict[str, Any], str]]:
        found = []
        for name, value in holder.items():  # a delta holds a field or two: walk it, not the list of names
            if name in _TEXT_SET:
                if value.__class__ is str:
                    if value:
                        found.append((name, holder, name))
                elif name == "content" and isinstance(value, list):
                    for i, part in enumerate(value):  # some providers answer with content parts
                        if isinstance(part, dict) and isinstance(part.get("text"), str) and part["text"]:
                            found.append((("part", i), part, "text"))
            elif name == "tool_calls" and isinstance(value, list):
                for position, call in enumerate(value):
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(function, dict) and isinstance(function.get("arguments"), str) and function["arguments"]:
                        index = call.get("index", position)
                        found.append((("tool", index if isinstance(index, int) else position), function, "arguments"))
            elif name == "function_call" and isinstance(value, dict):
                if isinstance(value.get("arguments"), str) and value["arguments"]:
                    found.append(("function_call", value, "arguments"))
        return found

    def place(self, holder: dict[str, Any], key: FieldKey, text: str) -> None:
        if isinstance(key, str) and key in TEXT_FIELDS:
            holder[key] = (holder.get(key) or "") + text
        elif key == "function_call":
            function_call = holder.setdefault("function_call", {})
            function_call["arguments"] = (function_call.get("arguments") or "") + text
        elif isinstance(key, tuple) and key[0] == "tool":
            holder.setdefault("tool_calls", []).append({"index": key[1], "function": {"arguments": text}})

    def synthetic(self, index: int, holder: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "delta": holder, "finish_reason": finish_reason}

    def shows(self, holder: dict[str, Any]) -> bool:
        for name, value in holder.items():
            if name == "tool_calls" and isinstance(value, list):
                for call in value:
                    function = call.get("function") if isinstance(call, dict) else None
                    if isinstance(call, dict) and (
                        call.get("id") or isinstance(function, dict) and (function.get("name") or function.get("arguments"))
                    ):
                        return True
            elif name == "function_call" and isinstance(value, dict):
                if value.get("name") or value.get("arguments"):
                    return True
            elif value not in _QUIET:
                return True
        return False

    def take_logprobs(self, choice: dict[str, Any]) -> dict[FieldKey, list[Any]]:
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict):
            return {}
        taken = {}
        for name in _LOGPROB_FIELDS:
            entries = logprobs.get(name)
            if isinstance(entries, list):
                taken[name] = entries
                logprobs[name] = []
        return taken

    def put_logprobs(self, choice: dict[str, Any], due: dict[FieldKey, list[Any]]) -> None:
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict):
            if not due:
                return
            logprobs = choice["logprobs"] = {"content": None, "refusal": None}
        for name in _LOGPROB_FIELDS:
            if name in due:
                logprobs[name] = due[name]

    def filter_alternatives(self, entry: Any, passes: Any) -> Any:
        alternatives = entry.get("top_logprobs") if isinstance(entry, dict) else None
        if not isinstance(alternatives, list):
            return entry
        kept = [alt for alt in alternatives if isinstance(alt, dict) and passes(alt.get("token"))]
        return entry if len(kept) == len(alternatives) else {**entry, "top_logprobs": kept}


SHAPE = ChatShape()


class ChatFormat(WireFormat):
    endpoint = "chat.completions"
    path = "/chat/completions"
    input_param = "messages"

    def parse(self, body: bytes) -> ParsedRequest:
        payload = validation.decode_json_object(body)
        model = validation.check_model(payload)
        validation.check_messages(payload.get("messages"))
        stream = validation.check_stream(payload)
        wants_usage = validation.check_stream_options(payload)
        validation.optional_positive_int(payload, "max_tokens")
        validation.optional_positive_int(payload, "max_completion_tokens")
        return ParsedRequest(payload, model, stream, wants_usage, validation.check_n(payload))

    def prompt_tokens(self, parsed: ParsedRequest) -> int:
        return count_chat_prompt(parsed.model, parsed.payload["messages"])

    def input_texts(self, parsed: ParsedRequest, input_rules: bool) -> list[TextRef]:
        refs: list[TextRef] = []
        for message in parsed.payload["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                refs.append(TextRef(message, "content"))
            elif isinstance(content, list):
                refs.extend(TextRef(part, "text") for part in content if part.get("type") == "text")
            for name in TEXT_FIELDS[1:]:
                if isinstance(message.get(name), str):
                    refs.append(TextRef(message, name))
            refs.extend(TextRef(container, name) for _, container, name in SHAPE.fields(_calls_only(message)))
        for tool in _list(parsed.payload.get("tools")):
            function = tool.get("function") if isinstance(tool, dict) else None
            if isinstance(function, dict) and isinstance(function.get("description"), str):
                refs.append(TextRef(function, "description"))
        for function in _list(parsed.payload.get("functions")):
            if isinstance(function, dict) and isinstance(function.get("description"), str):
                refs.append(TextRef(function, "description"))
        return refs

    def requested_tokens(self, parsed: ParsedRequest, default: int) -> int:
        payload = parsed.payload
        per_choice = payload.get("max_completion_tokens") or payload.get("max_tokens") or default
        return per_choice * parsed.n

    def cap_fields(self, parsed: ParsedRequest, per_choice: int) -> dict[str, Any]:
        payload = parsed.payload
        if "max_completion_tokens" in payload or (
            "max_tokens" not in payload and _COMPLETION_TOKENS_ONLY.match(parsed.model)
        ):
            return {"max_completion_tokens": per_choice}
        return {"max_tokens": per_choice}

    def stream_fields(self, parsed: ParsedRequest) -> dict[str, Any]:
        return usage_request(parsed)

    def moderate_whole(self, parsed: ParsedRequest, document: dict[str, Any], ctx: AnswerContext) -> Moderated:
        return moderate_choices(SHAPE, document, ctx, parsed.payload.get("logprobs") is True)

    def stream_rewriter(self, parsed: ParsedRequest, ctx: AnswerContext) -> ChoicesRewriter:
        return ChoicesRewriter(SHAPE, ctx, parsed.payload.get("logprobs") is True)


def usage_request(parsed: ParsedRequest) -> dict[str, Any]:
    """Ask for the usage chunk; the client does not see it unless it asked too."""
    if parsed.client_wants_usage:
        return {}
    return {"stream_options": {**(parsed.payload.get("stream_options") or {}), "include_usage": True}}


def _calls_only(message: dict[str, Any]) -> dict[str, Any]:
    return {name: message[name] for name in ("tool_calls", "function_call") if name in message}


def _list(value: Any) -> list[Any]:
    return value if isinstance(value, list) else []
