"""The Responses API's stream events that carry an output field's text, and where that text is.

Pure tables, read by ``responses_stream``; a field is named as in
``responses_output``: (output_index, kind, index).
"""

from __future__ import annotations

from typing import Any

# delta event -> (field kind, its index field, done event, the done event's text field)
DELTAS = {
    "response.output_text.delta": ("content", "content_index", "response.output_text.done", "text"),
    "response.refusal.delta": ("content", "content_index", "response.refusal.done", "refusal"),
    "response.reasoning_text.delta": ("content", "content_index", "response.reasoning_text.done", "text"),
    "response.reasoning_summary_text.delta": (
        "summary",
        "summary_index",
        "response.reasoning_summary_text.done",
        "text",
    ),
    "response.function_call_arguments.delta": ("arguments", None, "response.function_call_arguments.done", "arguments"),
    "response.custom_tool_call_input.delta": ("input", None, "response.custom_tool_call_input.done", "input"),
    "response.mcp_call_arguments.delta": ("arguments", None, "response.mcp_call_arguments.done", "arguments"),
}
DONES = {done: (kind, index, name, delta) for delta, (kind, index, done, name) in DELTAS.items()}
# part event -> (field kind, its index field, the part's list in the item)
PARTS = {
    "response.content_part.added": ("content", "content_index", "content"),
    "response.content_part.done": ("content", "content_index", "content"),
    "response.reasoning_summary_part.added": ("summary", "summary_index", "summary"),
    "response.reasoning_summary_part.done": ("summary", "summary_index", "summary"),
}
# The delta event of a field, known from its part's or its item's type.
DELTA_OF_PART = {
    "output_text": "response.output_text.delta",
    "text": "response.output_text.delta",
    "refusal": "response.refusal.delta",
    "reasoning_text": "response.reasoning_text.delta",
    "summary_text": "response.reasoning_summary_text.delta",
}
DELTA_OF_ITEM = {
    "function_call": "response.function_call_arguments.delta",
    "mcp_call": "response.mcp_call_arguments.delta",
    "custom_tool_call": "response.custom_tool_call_input.delta",
}
LIFECYCLE = ("response.created", "response.queued", "response.in_progress")
TERMINAL = ("response.completed", "response.incomplete", "response.failed")


def is_index(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0
