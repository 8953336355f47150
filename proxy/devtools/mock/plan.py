"""What the mock answers, planned before a byte is sent: pure functions, no I/O.

Invariants (property-tested in tests/test_mock_upstream.py): the pieces of a
segment join to exactly its text and none is empty; a cut text is a prefix of
the original that is valid Unicode and counts at most the budget's tokens; the
tokens charged to a plan are what ``proxy.tokens`` counts for its texts, so
the mock's usage is exactly what the gateway would count itself.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from proxy import tokens

from .control import MockControl

# One word and the whitespace after it; a whitespace-only text is one chunk.
_WORD = re.compile(r"\s*\S+\s*|\s+")
# The block and part types that carry a message's text, in every format the mock speaks.
_TEXT_PARTS = ("text", "input_text", "output_text")


def clean(text: str) -> str:
    """A lone surrogate (valid JSON, invalid Unicode) becomes U+FFFD, so every chunk encodes as UTF-8."""
    return text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")


def split(text: str, chunk_chars: int | None) -> list[str]:
    """Stream pieces: ``chunk_chars`` characters each, else one word and its trailing whitespace."""
    if chunk_chars is not None:
        return [text[i : i + chunk_chars] for i in range(0, len(text), chunk_chars)]
    return _WORD.findall(text)


def cut_to_tokens(model: str, text: str, budget: int) -> tuple[str, bool]:
    """``text`` cut to at most ``budget`` tokens, and whether it was cut."""
    encoding = tokens.encoding_for_model(model)
    ids = encoding.encode_ordinary(text)
    if len(ids) <= budget:
        return text, False
    # Dropping a torn multi-byte character keeps the text valid UTF-8.
    return encoding.decode_bytes(ids[:budget]).decode("utf-8", "ignore"), True


@dataclass(frozen=True)
class Answer:
    """What every chat/completions choice says: the text (content or tool arguments) and why it ended."""

    text: str
    finish_reason: str
    pieces: list[str]


def plan_answer(model: str, text: str, max_tokens: int | None, control: MockControl, natural_finish: str) -> Answer:
    """Cut ``text`` to ``max_tokens`` (finish_reason "length") and split it into stream chunks."""
    text = clean(text)
    finish_reason = natural_finish
    if max_tokens is not None and not control.ignore_cap:
        text, was_cut = cut_to_tokens(model, text, max_tokens)
        if was_cut:
            finish_reason = "length"
    return Answer(text, finish_reason, split(text, control.chunk_chars))


@dataclass(frozen=True)
class Segment:
    """One output block of a Responses or Messages answer.

    ``kind`` is "reasoning", "text", "refusal" or "tool"; ``text`` is the summary,
    the text, the refusal or the tool's arguments JSON as sent.
    """

    kind: str
    text: str
    pieces: list[str]
    cut: bool = False


def plan_segments(
    model: str, wanted: list[tuple[str, str]], cap: int | None, control: MockControl, tool_name: str = ""
) -> tuple[list[Segment], bool]:
    """Fit the segments, in order, into ``cap`` output tokens; True if the cap cut the answer.

    Reasoning counts against the cap as the real APIs count it. A text is cut
    mid-way; a tool call is all or nothing (half a JSON object helps no test),
    and nothing follows a cut. A tool call costs its name and its arguments,
    as the chat mock counts it (``segment_tokens``).
    """
    planned: list[Segment] = []
    left = None if cap is None or control.ignore_cap else cap
    for kind, text in wanted:
        text = clean(text)
        if left is not None:
            need = tokens.count_text(model, text)
            if kind == "tool":
                need += tokens.count_text(model, tool_name)
            if need > left:
                if kind != "tool" and left > 0:
                    text, _ = cut_to_tokens(model, text, left)
                    planned.append(Segment(kind, text, split(text, control.chunk_chars), cut=True))
                return planned, True
            left -= need
        planned.append(Segment(kind, text, split(text, control.chunk_chars)))
    return planned, False


def text_of(content: Any) -> str:
    """The text of a message's content: a string, or the text of its text-bearing parts or blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and part.get("type") in _TEXT_PARTS and isinstance(part.get("text"), str)
        )
    return ""


def last_user_text(messages: list[Any]) -> str:
    """What the mock echoes: the text of the last user message (chat, Responses items, Anthropic)."""
    for message in reversed(messages):
        if isinstance(message, dict) and message.get("role") == "user":
            return text_of(message.get("content"))
    return ""


def segment_tokens(model: str, segment: Segment, tool_name: str = "") -> int:
    """The output tokens a segment costs; a tool call's name counts too."""
    extra = tokens.count_text(model, tool_name) if segment.kind == "tool" else 0
    return tokens.count_text(model, segment.text) + extra
