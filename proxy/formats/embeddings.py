"""Embeddings (``POST /v1/embeddings``): the adapter. Text goes in; numbers come out, so only input is moderated."""

from __future__ import annotations

from typing import Any

from .. import validation
from ..tokens import count_prompt
from .base import AnswerContext, Moderated, ParsedRequest, TextRef, Usage, WireFormat, usage_from
from .prompts import prompt_refs


class EmbeddingsFormat(WireFormat):
    endpoint = "embeddings"
    path = "/embeddings"
    streams = False

    def parse(self, body: bytes) -> ParsedRequest:
        payload = validation.decode_json_object(body)
        model = validation.check_model(payload)
        validation.check_text_or_tokens(payload.get("input"), "input")
        return ParsedRequest(payload, model, stream=False)

    def prompt_tokens(self, parsed: ParsedRequest) -> int:
        return count_prompt(parsed.model, parsed.payload["input"])

    def input_texts(self, parsed: ParsedRequest, input_rules: bool) -> list[TextRef]:
        return prompt_refs(parsed.payload, "input", parsed.model, input_rules)

    def moderate_whole(self, parsed: ParsedRequest, document: dict[str, Any], ctx: AnswerContext) -> Moderated:
        usage = usage_from(document.get("usage"), "prompt_tokens", "completion_tokens")
        return Moderated(b"", usage=Usage(usage.prompt, 0) if usage else None)
