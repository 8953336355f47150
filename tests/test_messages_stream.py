"""The Messages API stream through the pure pipeline, fed bytes whole, byte by byte and split anywhere.

Whatever the split, the bytes out and the end are the same; every frame goes
out with its ``event:`` line; each content block is moderated in its own
window like the whole block; nothing of a blocked or redacted span is in any
byte sent; nothing follows ``message_stop``.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_feeding import feed
from proxy.config import ModerationConfig
from proxy.formats import AnswerContext
from proxy.formats.base import ParsedRequest
from proxy.formats.messages import MessagesFormat
from proxy.moderation import ModerationEngine
from proxy.stream.pipeline import StreamPipeline
from proxy.tokens import count_text

ENGINE = ModerationEngine.from_config(
    ModerationConfig(
        rules=[
            {"name": "banned", "type": "terms", "terms": ["bad word"], "action": "block"},
            {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
        ]
    )
)
MODEL = "claude-sonnet-4-5"
FORMAT = MessagesFormat()
TEXT = "Write to bob@example.com today, then a bad word and more text after it."
REDACTED_UNTIL_BLOCK = "Write to [REDACTED:email] today, then a "


def frame(name, data, with_event=True):
    head = f"event: {name}\n" if with_event else ""
    return f"{head}data: {json.dumps(data)}\n\n".encode()


def message_start(input_tokens=20, **usage):
    message = {
        "id": "msg_1", "type": "message", "role": "assistant", "model": MODEL, "content": [],
        "stop_reason": None, "stop_sequence": None, "usage": {"input_tokens": input_tokens, "output_tokens": 1, **usage},
    }
    return frame("message_start", {"type": "message_start", "message": message})


def block_start(index, block):
    return frame("content_block_start", {"type": "content_block_start", "index": index, "content_block": block})


def delta(index, kind, field, piece):
    return frame("content_block_delta", {"type": "content_block_delta", "index": index, "delta": {"type": kind, field: piece}})


def block_stop(index):
    return frame("content_block_stop", {"type": "content_block_stop", "index": index})


def message_end(stop_reason="end_turn", output_tokens=30):
    return frame(
        "message_delta",
        {"type": "message_delta", "delta": {"stop_reason": stop_reason, "stop_sequence": None}, "usage": {"output_tokens": output_tokens}},
    ) + frame("message_stop", {"type": "message_stop"})


def pieces(text, size):
    return [text[i : i + size] for i in range(0, len(text), size)]


def text_block(index, text, size):
    out = block_start(index, {"type": "text", "text": ""})
    for piece in pieces(text, size):
        out += delta(index, "text_delta", "text", piece)
    return out + block_stop(index)


def stream(text=TEXT, size=3, thinking=None, tool=None):
    out = message_start() + frame("ping", {"type": "ping"})
    index = 0
    if thinking is not None:
        out += block_start(0, {"type": "thinking", "thinking": "", "signature": ""})
        for piece in pieces(thinking, size):
            out += delta(0, "thinking_delta", "thinking", piece)
        out += delta(0, "signature_delta", "signature", "c2lnbmF0dXJl") + block_stop(0)
        index = 1
    if tool is not None:
        out += block_start(index, {"type": "tool_use", "id": "toolu_1", "name": "send", "input": {}})
        for piece in pieces(tool, size):
            out += delta(index, "input_json_delta", "partial_json", piece)
        out += block_stop(index)
    else:
        out += text_block(index, text, size)
    return out + message_end("tool_use" if tool is not None else "end_turn")


def pipeline(engine=ENGINE, cap=None):
    parsed = ParsedRequest({}, MODEL, stream=True)
    return StreamPipeline(FORMAT.stream_rewriter(parsed, AnswerContext(MODEL, engine, False, cap)), 1 << 20)


def frames(raw: bytes) -> list[tuple[str, dict]]:
    """Every frame as (event line, data); each must have both, in that order, and nothing else."""
    assert raw.endswith(b"\n\n")
    out = []
    for chunk in raw.decode().split("\n\n")[:-1]:
        event_line, data_line = chunk.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: "), chunk
        name, data = event_line[7:], json.loads(data_line[6:])
        assert data["type"] == name
        out.append((name, data))
    return out


def block_texts(raw: bytes) -> dict[int, str]:
    texts: dict[int, str] = {}
    for name, data in frames(raw):
        if name == "content_block_delta":
            d = data["delta"]
            field = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}.get(d["type"])
            if field:
                texts[data["index"]] = texts.get(data["index"], "") + d[field]
    return texts


@pytest.mark.parametrize("size", [1, 3, 7])
def test_a_block_mid_stream_ends_with_refusal_and_nothing_of_the_match(size):
    pipe = pipeline()
    raw, end = feed(pipe, stream(size=size))
    assert end.kind == "blocked"
    events = frames(raw)
    assert block_texts(raw) == {0: REDACTED_UNTIL_BLOCK}
    for secret in (b"bob@", b"example.com", b"bad", b"more text"):
        assert secret not in raw
    names = [name for name, _ in events]
    assert names[-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "refusal"
    assert events[-2][1]["usage"]["output_tokens"] == pipe.rewriter.usage(0)[1]
    assert names.count("content_block_stop") == 1 and names[:2] == ["message_start", "ping"]
    assert [(a.rule, a.action) for a in pipe.rewriter.actions] == [("email", "redact"), ("banned", "block")]


@pytest.mark.parametrize("size", [1, 3, 7])
def test_redaction_of_every_block_kind_keeps_the_tool_input_valid_json(size):
    tool = json.dumps({"to": "bob@example.com", "body": "hello there"})
    raw, end = feed(pipeline(), stream(size=size, thinking="I will mail bob@example.com now.", tool=tool))
    assert end.kind == "done"
    texts = block_texts(raw)
    assert texts[0] == "I will mail [REDACTED:email] now."
    assert json.loads(texts[1]) == {"to": "[REDACTED:email]", "body": "hello there"}
    assert b"bob@" not in raw and b"example.com" not in raw
    events = frames(raw)
    signatures = [d["delta"] for n, d in events if n == "content_block_delta" and d["delta"]["type"] == "signature_delta"]
    assert signatures == [{"type": "signature_delta", "signature": "c2lnbmF0dXJl"}]
    assert [n for n, _ in events][-2:] == ["message_delta", "message_stop"]


def test_held_text_goes_out_before_its_block_stops():
    # "bob@exa" could still grow into an address: held until the block ends, then released in one delta.
    data = message_start() + block_start(0, {"type": "text", "text": ""})
    data += delta(0, "text_delta", "text", "mail bob@exa") + block_stop(0) + message_end()
    events = frames(feed(pipeline(), data)[0])
    assert [n for n, _ in events] == [
        "message_start", "content_block_start", "content_block_delta", "content_block_delta", "content_block_stop",
        "message_delta", "message_stop",
    ]
    assert events[2][1]["delta"]["text"] == "mail " and events[3][1]["delta"]["text"] == "bob@exa"


def test_without_rules_the_stream_is_the_upstream_bytes():
    data = stream(size=4, thinking="some thought", tool='{"a": "b"}')
    raw, end = feed(pipeline(engine=None), data)
    assert raw == data and end.kind == "done"


def test_a_frame_without_its_event_line_gets_it_back():
    data = message_start() + frame("ping", {"type": "ping"}, with_event=False) + text_block(0, "hi", 1) + message_end()
    events = frames(feed(pipeline(), data)[0])
    assert [n for n, _ in events][:2] == ["message_start", "ping"]


def test_output_tokens_are_the_last_message_delta_never_summed():
    data = message_start(input_tokens=20, cache_read_input_tokens=5, cache_creation_input_tokens=2) + text_block(0, "hi there", 3)
    data += frame("message_delta", {"type": "message_delta", "delta": {"stop_reason": None}, "usage": {"output_tokens": 3}})
    data += message_end(output_tokens=10)
    pipe = pipeline()
    _, end = feed(pipe, data)
    assert end.kind == "done"
    assert pipe.rewriter.usage(999) == (27, 10)


def test_the_cap_ends_the_answer_like_max_tokens():
    text = " ".join(f"word{i}" for i in range(100))
    pipe = pipeline(cap=5)
    raw, end = feed(pipe, stream(text=text, size=7))
    assert end.kind == "capped"
    events = frames(raw)
    assert [n for n, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "max_tokens"
    sent = block_texts(raw)[0]
    assert count_text(MODEL, sent) == 5 and text.startswith(sent)
    assert pipe.rewriter.usage(0)[1] == 5 == events[-2][1]["usage"]["output_tokens"]


def test_an_upstream_error_event_is_relayed_unchanged_as_the_last_frame():
    error = frame("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    data = message_start() + block_start(0, {"type": "text", "text": ""}) + delta(0, "text_delta", "text", "partial ")
    pipe = pipeline()
    raw, end = feed(pipe, data + error + message_end())
    assert end.kind == "upstream_error"
    assert raw.endswith(error)
    assert [n for n, _ in frames(raw)][-1] == "error"
    assert pipe.rewriter.usage(0) == (20, count_text(MODEL, "partial "))


def test_a_stream_cut_before_message_stop_ends_with_an_api_error():
    data = message_start() + block_start(0, {"type": "text", "text": ""}) + delta(0, "text_delta", "text", "mail bob@exa")
    pipe = pipeline()
    raw, end = feed(pipe, data)
    assert end.kind == "upstream_error"
    events = frames(raw)
    assert events[-1][1]["error"]["type"] == "api_error"
    assert block_texts(raw) == {0: "mail bob@exa"}  # the held text went out, moderated, before the error


def test_a_silent_upstream_ends_with_a_timeout_error():
    pipe = pipeline()
    pipe.feed(message_start())
    raw, end = pipe.upstream_failed("The upstream went silent.", "upstream_timeout")
    assert end.kind == "timeout" and frames(raw)[-1][1]["error"]["type"] == "timeout_error"


def test_invalid_json_ends_with_an_api_error():
    raw, end = feed(pipeline(), message_start() + b"event: content_block_delta\ndata: {nope\n\n")
    assert end.kind == "upstream_error" and frames(raw)[-1][1]["error"]["type"] == "api_error"


def test_nothing_is_sent_after_message_stop():
    data = stream(text="fine", size=2) + message_end() + text_block(5, "late text", 2)
    raw, end = feed(pipeline(), data)
    assert end.kind == "done"
    assert [n for n, _ in frames(raw)].count("message_stop") == 1 and b"late" not in raw
    assert frames(raw)[-1][0] == "message_stop"


@settings(max_examples=60, deadline=None)
@given(
    cuts=st.lists(st.integers(min_value=0, max_value=10_000), max_size=40),
    size=st.sampled_from([1, 3, 7]),
    crlf=st.booleans(),
)
def test_any_split_gives_the_same_bytes_and_end(cuts, size, crlf):
    data = stream(size=size, thinking="Thinking of bob@example.com.", tool=None)
    if crlf:
        data = data.replace(b"\n", b"\r\n")
    whole, whole_end = feed(pipeline(), data)
    split, split_end = feed(pipeline(), data, cuts)
    assert split == whole and split_end == whole_end
    bytewise, bytewise_end = feed(pipeline(), data, range(len(data)))
    assert bytewise == whole and bytewise_end == whole_end


@settings(max_examples=40, deadline=None)
@given(text=st.text(alphabet="ab @.xyzbadword", min_size=1, max_size=60), size=st.integers(min_value=1, max_value=9))
def test_any_delta_split_moderates_like_the_whole_text(text, size):
    whole = ENGINE.moderate(text, "output")
    data = message_start() + text_block(0, text, size) + message_end()
    raw, end = feed(pipeline(), data)
    assert block_texts(raw).get(0, "") == whole.text
    assert end.kind == ("blocked" if whole.blocked else "done")


def test_text_that_comes_in_content_block_start_goes_through_the_window():
    data = message_start() + block_start(0, {"type": "text", "text": "mail bob@example.com"})
    data += delta(0, "text_delta", "text", " now") + block_stop(0) + message_end()
    raw, end = feed(pipeline(), data)
    events = frames(raw)
    assert end.kind == "done" and b"bob@" not in raw
    assert events[1][1]["content_block"] == {"type": "text", "text": ""}
    assert block_texts(raw) == {0: "mail [REDACTED:email] now"}


def test_a_delta_for_a_block_never_started_is_an_api_error():
    raw, end = feed(pipeline(), message_start() + delta(3, "text_delta", "text", "stray") + message_end())
    assert end.kind == "upstream_error" and frames(raw)[-1][1]["error"]["type"] == "api_error"
    assert b"stray" not in raw
