"""Recorded stream shapes of OpenAI-compatible providers, for the mock's ``raw`` / ``raw_body``.

Each file under tests/fixtures/providers/ is the body one provider sends, as
its public documentation and API references describe it (written for these
tests, not captured from a live service): raw SSE text (``.sse``) or a whole
JSON answer (``.json``). Every text a user would read carries the address
jane@example.com, so a test with an email redaction rule sees whether each
field is moderated. ``SHAPES`` says, per shape, what every text-bearing field
adds up to and what usage the provider reports, so a test can check the
gateway's output and its accounting against it.

    body = {"model": "gpt-4o-mini", "messages": [...], "stream": True,
            "mock": provider_fixtures.steer("deepseek_reasoning")}
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures" / "providers"
EMAIL = "jane@example.com"
# After each blank line that ends an SSE event (LF or CRLF), so that every
# event is one write of the mock, as a provider flushes it.
_EVENT_END = re.compile(r"(?<=\n\n)|(?<=\r\n\r\n)")


@dataclass(frozen=True)
class Shape:
    """One recorded answer.

    ``texts`` maps each text-bearing field to all of its pieces joined:
    "content", "reasoning_content", "reasoning", "refusal",
    "tool_calls[i].arguments", "function_call.arguments", "logprobs.token"
    (the tokens of logprobs.content), with "[n]" appended for choice n > 0.
    ``usage`` is (prompt, completion) tokens as the provider reports them
    (the last usage object, top-level or in ``x_groq``), or None.
    """

    file: str
    what: str
    texts: dict[str, str]
    usage: tuple[int, int] | None = None
    extra_usage: dict[str, int] = field(default_factory=dict)

    @property
    def streamed(self) -> bool:
        return self.file.endswith(".sse")


_ARGS0 = '{"to":"jane@example.com","subject":"Hi"}'
_FRAMED = {"content": f"Framed for {EMAIL}"}
SHAPES: dict[str, Shape] = {
    "azure_openai": Shape(
        "azure_openai.sse",
        "Azure OpenAI: a first chunk with choices [] and prompt_filter_results; content_filter_results per choice",
        {"content": f"Write to {EMAIL} today."},
    ),
    "deepseek_reasoning": Shape(
        "deepseek_reasoning.sse",
        "DeepSeek reasoner: delta.reasoning_content, then delta.content; prompt_cache_hit/miss_tokens in usage",
        {"reasoning_content": f"The user wrote {EMAIL}; answer briefly.", "content": f"Reply to {EMAIL}."},
        (12, 21), {"reasoning_tokens": 13},
    ),
    "vllm_reasoning": Shape(
        "vllm_reasoning.sse",
        "vLLM with a reasoning parser: delta.reasoning (the newer spelling), then delta.content",
        {"reasoning": f"Mail goes to {EMAIL}.", "content": "Sure, done."},
    ),
    "reasoning_and_content_in_one_delta": Shape(
        "reasoning_and_content_in_one_delta.sse",
        "one delta carrying the last reasoning piece and the first content piece",
        {"reasoning_content": f"Think about {EMAIL}.", "content": f"Answer: {EMAIL}"},
    ),
    "parallel_tool_calls": Shape(
        "parallel_tool_calls.sse",
        "two tool calls at once, arguments split mid-token and interleaved",
        {"tool_calls[0].arguments": _ARGS0, "tool_calls[1].arguments": '{"city":"Paris"}'},
    ),
    "legacy_function_call": Shape(
        "legacy_function_call.sse",
        "the legacy delta.function_call (functions=, before tools), finish_reason function_call",
        {"function_call.arguments": '{"to":"jane@example.com"}'},
    ),
    "refusal": Shape("refusal.sse", "delta.refusal pieces, content null", {"refusal": f"I can't share {EMAIL}."}),
    "logprobs": Shape(
        "logprobs.sse",
        "logprobs.content[] per token with token, bytes, logprob and top_logprobs",
        {"content": f"Mail {EMAIL}", "logprobs.token": f"Mail {EMAIL}"},
    ),
    "n2_interleaved": Shape(
        "n2_interleaved.sse",
        "n=2: both choices interleaved, a finish chunk each, then a usage chunk",
        {"content": f"One is {EMAIL}", "content[1]": f"Two says hi {EMAIL}"},
        (14, 13),
    ),
    "ollama_no_usage": Shape(
        "ollama_no_usage.sse", "Ollama's OpenAI endpoint: role on every chunk, no usage at all",
        {"content": f"Contact {EMAIL} for help."},
    ),
    "llamacpp_timings": Shape(
        "llamacpp_timings.sse", "llama.cpp server: the last chunk carries timings and usage",
        {"content": f"Hello {EMAIL}!"}, (9, 7),
    ),
    "groq_x_groq_usage": Shape(
        "groq_x_groq_usage.sse", "Groq: usage only inside x_groq on the last chunk",
        {"content": f"Write to {EMAIL}"}, (44, 11),
    ),
    "vllm_continuous_usage": Shape(
        "vllm_continuous_usage.sse",
        "vLLM/SGLang continuous_usage_stats: cumulative usage on every chunk (take the last, never sum)",
        {"content": f"Reach me at {EMAIL}"}, (20, 9),
    ),
    "finish_reason_empty": Shape(
        "finish_reason_empty.sse", 'finish_reason "" (not null) on every chunk but the last',
        {"content": f"Ping {EMAIL} now"},
    ),
    "framing_no_space": Shape("framing_no_space.sse", "SSE: no space after data:", _FRAMED),
    "framing_crlf": Shape("framing_crlf.sse", "SSE: CRLF line ends", _FRAMED),
    "framing_event_id_retry": Shape(
        "framing_event_id_retry.sse", "SSE: event:, id: and retry: lines, and comments", _FRAMED
    ),
    "whole_cached_and_reasoning_tokens": Shape(
        "whole_cached_and_reasoning_tokens.json",
        "a whole answer with prompt_tokens_details.cached_tokens and completion_tokens_details.reasoning_tokens",
        {"content": f"Write to {EMAIL}."}, (2006, 300), {"cached_tokens": 1920, "reasoning_tokens": 256},
    ),
    "whole_reasoning_content": Shape(
        "whole_reasoning_content.json", "DeepSeek: a whole answer with message.reasoning_content",
        {"content": f"Reply to {EMAIL}.", "reasoning_content": f"The user gave {EMAIL}; keep it short."},
        (12, 24), {"reasoning_tokens": 15},
    ),
}


def text(name: str) -> str:
    """The fixture's exact text (bytes decoded as UTF-8; CRLF kept)."""
    return (FIXTURES / SHAPES[name].file).read_bytes().decode("utf-8")


def stream(name: str) -> list[str]:
    """A streamed shape as the mock's ``raw`` list: one string per SSE event, joined they are the file."""
    return [piece for piece in _EVENT_END.split(text(name)) if piece]


def whole(name: str) -> str:
    """A whole answer as the mock's ``raw_body``."""
    return text(name)


def steer(name: str) -> dict[str, object]:
    """The ``mock`` body field that makes the mock answer with this shape."""
    return {"raw": stream(name)} if SHAPES[name].streamed else {"raw_body": whole(name)}
