"""Completions (``POST /v1/completions``), the legacy text API: the adapter.

An answer's text is each choice's ``text``; its logprobs are four parallel
arrays (``tokens``, ``token_logprobs``, ``top_logprobs``, ``text_offset``),
read here as one entry per token so they can follow their text.
"""

from __future__ import annotations

from typing import Any

from .. import validation
from ..tokens import count_prompt
from .base import AnswerContext, Moderated, ParsedRequest, TextRef, WireFormat
from .chat import usage_request
from .choices import ChoiceShape, FieldKey, moderate_choices
from .choices_stream import ChoicesRewriter
from .prompts import prompt_refs

_ARRAYS = ("tokens", "token_logprobs", "top_logprobs", "text_offset")


class CompletionShape(ChoiceShape):
    def holder(self, choice: dict[str, Any], whole: bool) -> Any:
        return choice

    def fields(self, holder: dict[str, Any]) -> list[tuple[FieldKey, dict[str, Any], str]]:
        text = holder.get("text")
        return [("text", holder, "text")] if text.__class__ is str and text else []

    def place(self, holder: dict[str, Any], key: FieldKey, text: str) -> None:
        holder["text"] = (holder.get("text") or "") + text

    def synthetic(self, index: int, holder: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        return {"index": index, "text": holder.get("text", ""), "logprobs": None, "finish_reason": finish_reason}

    def shows(self, holder: dict[str, Any]) -> bool:
        return bool(holder.get("text"))

    def take_logprobs(self, choice: dict[str, Any]) -> dict[FieldKey, list[Any]]:
        logprobs = choice.get("logprobs")
        if not isinstance(logprobs, dict) or not isinstance(logprobs.get("tokens"), list):
            return {}
        columns = [logprobs.get(name) if isinstance(logprobs.get(name), list) else [] for name in _ARRAYS]
        entries = [
            {name: column[i] if i < len(column) else None for name, column in zip(_ARRAYS, columns)}
            for i in range(len(columns[0]))
        ]
        for name in _ARRAYS:
            logprobs[name] = []
        return {"text": entries}

    def put_logprobs(self, choice: dict[str, Any], due: dict[FieldKey, list[Any]]) -> None:
        entries = due.get("text")
        if not entries and not isinstance(choice.get("logprobs"), dict):
            return
        choice["logprobs"] = {name: [entry[name] for entry in entries or ()] for name in _ARRAYS}

    def token_of(self, entry: Any) -> str | None:
        return entry.get("tokens")

    def filter_alternatives(self, entry: Any, passes: Any) -> Any:
        top = entry.get("top_logprobs")
        if not isinstance(top, dict):
            return entry
        return {**entry, "top_logprobs": {token: value for token, value in top.items() if passes(token)}}


SHAPE = CompletionShape()


class CompletionsFormat(WireFormat):
    endpoint = "completions"
    path = "/completions"

    def parse(self, body: bytes) -> ParsedRequest:
        payload = validation.decode_json_object(body)
        model = validation.check_model(payload)
        validation.check_text_or_tokens(payload.get("prompt"), "prompt")
        stream = validation.check_stream(payload)
        wants_usage = validation.check_stream_options(payload)
        validation.optional_positive_int(payload, "max_tokens")
        return ParsedRequest(payload, model, stream, wants_usage, validation.check_n(payload))

    def prompt_tokens(self, parsed: ParsedRequest) -> int:
        return count_prompt(parsed.model, parsed.payload["prompt"])

    def input_texts(self, parsed: ParsedRequest, input_rules: bool) -> list[TextRef]:
        refs = prompt_refs(parsed.payload, "prompt", parsed.model, input_rules)
        if isinstance(parsed.payload.get("suffix"), str):
            refs.append(TextRef(parsed.payload, "suffix"))
        return refs

    def requested_tokens(self, parsed: ParsedRequest, default: int) -> int:
        # The legacy API's own default is 16 tokens; the reservation keeps the gateway's.
        return (parsed.payload.get("max_tokens") or default) * parsed.n

    def cap_fields(self, parsed: ParsedRequest, per_choice: int) -> dict[str, Any]:
        return {"max_tokens": per_choice}

    def stream_fields(self, parsed: ParsedRequest) -> dict[str, Any]:
        return usage_request(parsed)

    def moderate_whole(self, parsed: ParsedRequest, document: dict[str, Any], ctx: AnswerContext) -> Moderated:
        return moderate_choices(SHAPE, document, ctx, _asks_logprobs(parsed))

    def stream_rewriter(self, parsed: ParsedRequest, ctx: AnswerContext) -> ChoicesRewriter:
        return ChoicesRewriter(SHAPE, ctx, _asks_logprobs(parsed))


def _asks_logprobs(parsed: ParsedRequest) -> bool:
    value = parsed.payload.get("logprobs")
    return isinstance(value, int) and not isinstance(value, bool) and value > 0 or value is True
