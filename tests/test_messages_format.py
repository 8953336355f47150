"""The Messages adapter's pure side: request validation, the texts a model reads, the cap, errors, whole answers."""

from __future__ import annotations

import json

import pytest

from proxy.errors import GatewayError
from proxy.formats import FORMATS, AnswerContext
from proxy.formats.messages import MessagesFormat
from proxy.tokens import count_text

from test_messages_stream import ENGINE, MODEL

FORMAT = MessagesFormat()


def parse(**fields):
    body = {"model": MODEL, "max_tokens": 100, "messages": [{"role": "user", "content": "hi"}], **fields}
    return FORMAT.parse(json.dumps({k: v for k, v in body.items() if v is not ...}).encode())


def test_registered_for_anthropic_upstreams():
    fmt = FORMATS["/v1/messages"]
    assert isinstance(fmt, MessagesFormat) and fmt.api == "anthropic" and fmt.path == "/messages"


@pytest.mark.parametrize(
    ("fields", "param"),
    [
        ({"max_tokens": ...}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"max_tokens": "5"}, "max_tokens"),
        ({"max_tokens": True}, "max_tokens"),
        ({"model": ...}, "model"),
        ({"messages": ...}, "messages"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "user", "content": 5}]}, "messages.0.content"),
        ({"messages": [{"role": "user", "content": [{"type": "text", "text": 1}]}]}, "messages.0.content.0.text"),
        ({"messages": [{"role": "user", "content": [{"text": "x"}]}]}, "messages.0.content.0"),
        (
            {"messages": [{"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t", "content": 3}]}]},
            "messages.0.content.0.content",
        ),
        ({"system": 3}, "system"),
        ({"system": [{"type": "image"}]}, "system.0"),
        ({"stream": "yes"}, "stream"),
        ({"tools": {"name": "x"}}, "tools"),
    ],
)
def test_bad_fields_are_a_400_naming_the_field_in_anthropics_shape(fields, param):
    with pytest.raises(GatewayError) as caught:
        parse(**fields)
    error = caught.value
    assert error.status == 400 and error.param == param and param in error.message
    body = json.loads(FORMAT.error_body(error))
    assert body == {"type": "error", "error": {"type": "invalid_request_error", "message": error.message}}


def test_every_text_a_model_reads_is_moderated():
    parsed = parse(
        system=[{"type": "text", "text": "sys one"}, {"type": "text", "text": "sys two"}],
        messages=[
            {"role": "user", "content": "plain"},
            {
                "role": "assistant",
                "content": [
                    {"type": "thinking", "thinking": "a thought", "signature": "sig"},
                    {"type": "text", "text": "said"},
                    {"type": "tool_use", "id": "t1", "name": "send", "input": {"to": "x", "cc": ["y", {"z": "w"}], "n": 3}},
                ],
            },
            {
                "role": "user",
                "content": [
                    {"type": "tool_result", "tool_use_id": "t1", "content": "result string"},
                    {"type": "tool_result", "tool_use_id": "t2", "content": [{"type": "text", "text": "result block"}]},
                    {"type": "document", "source": {"type": "text", "media_type": "text/plain", "data": "doc text"}},
                    {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AAAA"}},
                ],
            },
        ],
        tools=[{"name": "send", "description": "sends mail", "input_schema": {"type": "object"}}],
    )
    texts = [ref.get() for ref in FORMAT.input_texts(parsed, True)]
    assert texts == [
        "sys one", "sys two", "plain", "a thought", "said", "x", "y", "w",
        "result string", "result block", "doc text", "sends mail",
    ]
    system_string = parse(system="be brief")
    assert [ref.get() for ref in FORMAT.input_texts(system_string, True)] == ["be brief", "hi"]


def test_the_cap_is_max_tokens_and_keeps_a_thinking_budget_below_it():
    parsed = parse(max_tokens=8000)
    assert FORMAT.requested_tokens(parsed, 4096) == 8000
    assert FORMAT.cap_fields(parsed, 50) == {"max_tokens": 50}
    thinking = parse(max_tokens=8000, thinking={"type": "enabled", "budget_tokens": 4000})
    assert FORMAT.cap_fields(thinking, 3000) == {"max_tokens": 3000, "thinking": {"type": "enabled", "budget_tokens": 2999}}
    assert FORMAT.cap_fields(thinking, 6000) == {"max_tokens": 6000}


@pytest.mark.parametrize(
    ("status", "code", "kind"),
    [
        (400, "content_filter", "invalid_request_error"),
        (401, "invalid_api_key", "authentication_error"),
        (403, "model_not_allowed", "permission_error"),
        (404, "model_not_found", "not_found_error"),
        (413, "request_too_large", "request_too_large"),
        (429, "rate_limit_exceeded", "rate_limit_error"),
        (429, "insufficient_quota", "rate_limit_error"),
        (502, "upstream_error", "api_error"),
        (503, "shutting_down", "overloaded_error"),
        (503, "store_unavailable", "api_error"),
        (504, "upstream_timeout", "timeout_error"),
        (500, "internal_error", "api_error"),
    ],
)
def test_gateway_errors_map_to_anthropics_types(status, code, kind):
    body = json.loads(FORMAT.error_body(GatewayError(status, code, "why")))
    assert body == {"type": "error", "error": {"type": kind, "message": "why"}}


def whole(*blocks, output_tokens=40):
    return {
        "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": list(blocks),
        "stop_reason": "end_turn", "stop_sequence": None,
        "usage": {"input_tokens": 10, "cache_read_input_tokens": 4, "output_tokens": output_tokens},
    }


def test_a_whole_answer_is_moderated_in_every_block():
    document = whole(
        {"type": "thinking", "thinking": "mail bob@example.com", "signature": "sig"},
        {"type": "tool_use", "id": "t", "name": "send", "input": {"to": "bob@example.com", "n": 1}},
        {"type": "text", "text": "sent to bob@example.com"},
    )
    moderated = FORMAT.moderate_whole(parse(), document, AnswerContext(MODEL, ENGINE))
    answer = json.loads(moderated.body)
    assert answer["content"] == [
        {"type": "thinking", "thinking": "mail [REDACTED:email]", "signature": "sig"},
        {"type": "tool_use", "id": "t", "name": "send", "input": {"to": "[REDACTED:email]", "n": 1}},
        {"type": "text", "text": "sent to [REDACTED:email]"},
    ]
    assert answer["stop_reason"] == "end_turn"
    assert moderated.usage == (14, 40) and len(moderated.actions) == 3


def test_a_block_in_a_whole_answer_drops_what_follows_with_refusal():
    document = whole(
        {"type": "text", "text": "fine, then a bad word here"},
        {"type": "tool_use", "id": "t", "name": "send", "input": {}},
    )
    moderated = FORMAT.moderate_whole(parse(), document, AnswerContext(MODEL, ENGINE))
    answer = json.loads(moderated.body)
    assert answer["content"] == [{"type": "text", "text": "fine, then a "}]
    assert answer["stop_reason"] == "refusal" and b"bad" not in moderated.body
    blocked_tool = whole({"type": "tool_use", "id": "t", "name": "send", "input": {"say": "bad word"}})
    answer = json.loads(FORMAT.moderate_whole(parse(), blocked_tool, AnswerContext(MODEL, ENGINE)).body)
    assert answer["content"] == [] and answer["stop_reason"] == "refusal"


def test_a_whole_answer_past_the_cap_is_cut_like_max_tokens():
    text = " ".join(f"word{i}" for i in range(50))
    moderated = FORMAT.moderate_whole(parse(), whole({"type": "text", "text": text}), AnswerContext(MODEL, None, cap=6))
    answer = json.loads(moderated.body)
    assert answer["stop_reason"] == "max_tokens"
    assert count_text(MODEL, answer["content"][0]["text"]) == 6 and text.startswith(answer["content"][0]["text"])
    assert moderated.usage == (14, 6)


def test_an_untouched_whole_answer_is_sent_as_it_came():
    moderated = FORMAT.moderate_whole(parse(), whole({"type": "text", "text": "all fine"}), AnswerContext(MODEL, ENGINE))
    assert moderated.body == b"" and moderated.counted_completion == count_text(MODEL, "all fine")
