"""A Responses API stream through the pure pipeline, fed whole, byte by byte and split at random.

The streams are written here as OpenAI sends them (the SDK's event types in
``openai/types/responses/``): ``event:`` lines, ``sequence_number`` from 0,
the finished text repeated in every ``*.done`` event, in the finished item
and in the final response. Every check reads the raw bytes of every event.
"""

from __future__ import annotations

import json

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_feeding import feed
from proxy.config import ModerationConfig
from proxy.formats import FORMATS, AnswerContext
from proxy.formats.base import ParsedRequest
from proxy.moderation import ModerationEngine
from proxy.stream.pipeline import StreamPipeline
from proxy.stream.sse import SSEDecoder
from proxy.tokens import count_text

ENGINE = ModerationEngine.from_config(
    ModerationConfig(
        rules=[
            {"name": "banned", "type": "terms", "terms": ["bad word"], "action": "block"},
            {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
            {"name": "cat", "type": "terms", "terms": ["cat"], "action": "redact", "match": "substring"},
        ]
    )
)
MODEL = "gpt-4o-mini"
RESPONSES = FORMATS["/v1/responses"]
# Per kind: (item type, delta event, done event, the done event's text field).
KINDS = {
    "text": ("message", "response.output_text.delta", "response.output_text.done", "text"),
    "refusal": ("message", "response.refusal.delta", "response.refusal.done", "refusal"),
    "reasoning": ("reasoning", "response.reasoning_summary_text.delta", "response.reasoning_summary_text.done", "text"),
    "tool": ("function_call", "response.function_call_arguments.delta", "response.function_call_arguments.done", "arguments"),
}


def _part(kind, text):
    if kind == "reasoning":
        return {"type": "summary_text", "text": text}
    if kind == "refusal":
        return {"type": "refusal", "refusal": text}
    return {"type": "output_text", "annotations": [], "logprobs": [], "text": text}


def _item(kind, index, text, status):
    item_id = f"it_{index}"
    if kind == "tool":
        return {"id": item_id, "type": "function_call", "status": status, "arguments": text or "", "call_id": "call_1", "name": "send"}
    parts = [] if text is None else [_part(kind, text)]
    if kind == "reasoning":
        return {"id": item_id, "type": "reasoning", "summary": parts}
    return {"id": item_id, "type": "message", "status": status, "role": "assistant", "content": parts}


def envelope(status, output, usage=None, **extra):
    return {"id": "resp_1", "object": "response", "created_at": 1, "status": status, "model": MODEL, "output": output,
            "incomplete_details": None, "error": None, "usage": usage, **extra}


def events_of(segments, size, usage=(11, 7), terminal="response.completed"):
    """The events of an answer whose items are ``segments`` [(kind, text)], deltas of ``size`` characters."""
    events = [
        {"type": "response.created", "response": envelope("in_progress", [])},
        {"type": "response.in_progress", "response": envelope("in_progress", [])},
    ]
    done_items = []
    for index, (kind, text) in enumerate(segments):
        _, delta_type, done_type, done_field = KINDS[kind]
        where = {"item_id": f"it_{index}", "output_index": index}
        events.append({"type": "response.output_item.added", "output_index": index, "item": _item(kind, index, None, "in_progress")})
        if kind == "reasoning":
            where["summary_index"] = 0
            events.append({"type": "response.reasoning_summary_part.added", **where, "part": _part(kind, "")})
        elif kind != "tool":
            where["content_index"] = 0
            events.append({"type": "response.content_part.added", **where, "part": _part(kind, "")})
        for i in range(0, len(text), size):
            piece = text[i : i + size]
            extra = {"logprobs": []} if kind == "text" else {}
            events.append({"type": delta_type, **where, "delta": piece, **extra, "obfuscation": "x" * (16 - len(piece) % 16)})
        extra = {"logprobs": []} if kind == "text" else {}
        events.append({"type": done_type, **where, done_field: text, **extra})
        if kind == "reasoning":
            events.append({"type": "response.reasoning_summary_part.done", **where, "part": _part(kind, text)})
        elif kind != "tool":
            events.append({"type": "response.content_part.done", **where, "part": _part(kind, text)})
        item = _item(kind, index, text, "completed")
        events.append({"type": "response.output_item.done", "output_index": index, "item": item})
        done_items.append(item)
    if terminal:
        usage_body = None if usage is None else {
            "input_tokens": usage[0], "input_tokens_details": {"cached_tokens": 0},
            "output_tokens": usage[1], "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": sum(usage)}
        status = {"response.completed": "completed", "response.failed": "failed"}.get(terminal, "incomplete")
        events.append({"type": terminal, "response": envelope(status, done_items, usage_body)})
    return events


def sse(events):
    out = b""
    for number, event in enumerate(events):
        body = event if isinstance(event, str) else json.dumps({**event, "sequence_number": number}, separators=(",", ":"))
        name = event.get("type", "message") if isinstance(event, dict) else "message"
        out += f"event: {name}\ndata: {body}\n\n".encode()
    return out


def pipeline(engine=ENGINE, cap=None, **fields):
    parsed = ParsedRequest({"model": MODEL, "input": "hi", "stream": True, **fields}, MODEL, stream=True)
    return StreamPipeline(RESPONSES.stream_rewriter(parsed, AnswerContext(MODEL, engine, False, cap)), 1 << 20)


def sent_events(out: bytes):
    """(event line, the parsed data) of every event sent; each must have an ``event:`` line naming its type."""
    decoder = SSEDecoder()
    events = decoder.feed(out) + decoder.finish()
    parsed = [(e.event, json.loads(e.data)) for e in events]
    for name, body in parsed:
        assert name == body["type"], (name, body)
    assert [body["sequence_number"] for _, body in parsed] == list(range(len(parsed)))
    return [body for _, body in parsed]


def deltas_of(bodies, delta_type, output_index=0):
    return "".join(b["delta"] for b in bodies if b["type"] == delta_type and b["output_index"] == output_index)


def repeats(bodies, output_index=0):
    """Every place the finished text of item ``output_index`` is repeated, by where it is."""
    found = {}
    for body in bodies:
        kind = body["type"]
        if body.get("output_index") == output_index:
            if kind.endswith(".done") and kind not in ("response.output_item.done",) and "part" not in body:
                found[kind] = body.get("text", body.get("refusal", body.get("arguments")))
            elif "part" in body and kind.endswith(".done"):
                part = body["part"]
                found[kind] = part.get("text", part.get("refusal"))
            elif kind == "response.output_item.done":
                found[kind] = _item_text(body["item"])
        if kind in ("response.completed", "response.incomplete", "response.failed"):
            output = body["response"]["output"]
            if output_index < len(output):
                found[kind] = _item_text(output[output_index])
    return found


def _item_text(item):
    if item["type"] == "function_call":
        return item["arguments"]
    parts = item.get("summary") if item["type"] == "reasoning" else item.get("content")
    return "".join(p.get("text", p.get("refusal", "")) for p in parts)


SAMPLES = {
    "text": "Mail bob@example.com about the cat, then stop.",
    "refusal": "I cannot share bob@example.com or the cat.",
    "reasoning": "The user wants the cat and bob@example.com.",
    "tool": '{"to": "bob@example.com", "note": "the cat"}',
}


@pytest.mark.parametrize("size", [1, 3, 7])
@pytest.mark.parametrize("kind", list(KINDS))
def test_redaction_reaches_every_repeat_and_no_byte_of_the_span(kind, size):
    data = sse(events_of([(kind, SAMPLES[kind])], size))
    out, end = feed(pipeline(), data)
    assert end.kind == "done"
    assert b"bob@" not in out and b"example.com" not in out and b"cat" not in out.replace(b"[REDACTED:cat]", b"")
    bodies = sent_events(out)
    expected = ENGINE.moderate(SAMPLES[kind], "output").text
    assert deltas_of(bodies, KINDS[kind][1]) == expected
    found = repeats(bodies)
    assert found and set(found.values()) == {expected}, found
    assert "response.completed" in found and KINDS[kind][2] in found and "response.output_item.done" in found
    if kind == "tool":
        assert json.loads(expected) == {"to": "[REDACTED:email]", "note": "the [REDACTED:cat]"}


@pytest.mark.parametrize("size", [1, 3, 7])
@pytest.mark.parametrize("kind", list(KINDS))
def test_a_block_closes_the_open_part_and_item_then_response_incomplete(kind, size):
    text = {"tool": '{"q": "a bad word here", "n": 1}'}.get(kind, "This is a bad word here, and more.")
    data = sse(events_of([("reasoning", "Thinking first."), (kind, text), ("text", "Never sent.")], size))
    pipe = pipeline()
    out, end = feed(pipe, data)
    assert end.kind == "blocked"
    assert b"bad" not in out and b"Never sent" not in out
    bodies = sent_events(out)
    before = text[: text.index("bad")]
    assert deltas_of(bodies, KINDS[kind][1], 1) == before
    found = repeats(bodies, 1)
    assert set(found.values()) == {before}, found
    closing = [b["type"] for b in bodies[-4:]]
    part_done = {"reasoning": "response.reasoning_summary_part.done", "tool": None}.get(kind, "response.content_part.done")
    assert closing[-3:] == [part_done or KINDS[kind][2], "response.output_item.done", "response.incomplete"]
    final = bodies[-1]["response"]
    assert final["id"] == "resp_1" and final["status"] == "incomplete"
    assert final["incomplete_details"] == {"reason": "content_filter"}
    assert [item["id"] for item in final["output"]] == ["it_0", "it_1"]
    assert bodies[-2]["item"]["status" if kind != "reasoning" else "id"] in ("incomplete", "it_1")
    assert _item_text(final["output"][0]) == "Thinking first."
    # Tokens: what was fed to the windows; no upstream usage came.
    prompt, completion = pipe.rewriter.usage(5)
    assert prompt == 5 and completion >= count_text(MODEL, "Thinking first.")


SPLIT_TEXT = st.text(alphabet="abcdt @.xyzobadwr\u200b", max_size=50)


@settings(max_examples=120, deadline=None)
@given(text=SPLIT_TEXT, size=st.integers(1, 8), cuts=st.lists(st.integers(0, 20_000), max_size=12),
       kind=st.sampled_from(list(KINDS)))
def test_any_split_of_the_bytes_gives_the_same_bytes_and_end(text, size, cuts, kind):
    data = sse(events_of([(kind, text)], size))
    whole_out, whole_end = feed(pipeline(), data)
    split_out, split_end = feed(pipeline(), data, cuts)
    bytewise_out, bytewise_end = feed(pipeline(), data, range(len(data)))
    assert split_out == whole_out == bytewise_out
    assert split_end == whole_end == bytewise_end
    expected = ENGINE.moderate(text, "output")
    bodies = sent_events(whole_out)
    assert deltas_of(bodies, KINDS[kind][1]) == expected.text
    assert set(repeats(bodies).values()) <= {expected.text}
    assert whole_end.kind == ("blocked" if expected.blocked else "done")
    assert bodies[-1]["type"] == ("response.incomplete" if expected.blocked else "response.completed")


def test_without_rules_the_stream_passes_byte_for_byte_and_is_counted():
    data = sse(events_of([("reasoning", "think"), ("text", "Hello there, friend.")], 4))
    pipe = pipeline(engine=None)
    out, end = feed(pipe, data)
    assert out == data and end.kind == "done"
    assert pipe.rewriter.usage(5) == (11, 7)  # the final event's numbers


def test_held_deltas_leave_no_gap_in_the_sequence_numbers():
    # Every delta but the last is held back (a possible start of "bad word"): they are dropped, not sent empty.
    data = sse(events_of([("text", "bad wo")], 1))
    out, end = feed(pipeline(), data)
    bodies = sent_events(out)  # consecutive from 0
    deltas = [b for b in bodies if b["type"] == "response.output_text.delta"]
    assert all(d["delta"] for d in deltas) and "".join(d["delta"] for d in deltas) == "bad wo"
    assert len(bodies) < len(SSEDecoder().feed(data))


def test_re_cut_deltas_lose_their_obfuscation():
    data = sse(events_of([("text", "a cat")], 5))
    bodies = sent_events(feed(pipeline(), data)[0])
    delta = [b for b in bodies if b["type"] == "response.output_text.delta"]
    assert "".join(d["delta"] for d in delta) == "a [REDACTED:cat]"
    assert all("obfuscation" not in d for d in delta)  # every one was re-cut
    # Unchanged deltas keep theirs (it pads exactly the text sent): see the byte-for-byte test.


def test_text_only_in_the_done_event_is_moderated_and_sent_as_a_delta_first():
    events = events_of([("text", "")], 1)
    for event in events:
        if event["type"] == "response.output_text.done":
            event["text"] = "write to bob@example.com"
        if event["type"] == "response.content_part.done":
            event["part"]["text"] = "write to bob@example.com"
    out, end = feed(pipeline(), sse(events))
    assert b"bob@" not in out
    bodies = sent_events(out)
    assert deltas_of(bodies, "response.output_text.delta") == "write to [REDACTED:email]"
    done = [b for b in bodies if b["type"] == "response.output_text.done"][0]
    assert done["text"] == "write to [REDACTED:email]"
    assert bodies.index(done) > [i for i, b in enumerate(bodies) if b["type"] == "response.output_text.delta"][-1]
    # The final response had the item with no text (as built above): it carries what was sent.
    assert set(repeats(bodies).values()) <= {"write to [REDACTED:email]", ""}


def test_a_text_only_the_final_response_has_is_cut_there():
    events = events_of([("text", "fine")], 2)
    events[-1]["response"]["output"].append(_item("text", 1, "a bad word hidden", "completed"))
    out, end = feed(pipeline(), sse(events))
    assert end.kind == "blocked" and b"bad" not in out
    final = sent_events(out)[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "content_filter"}
    assert _item_text(final["response"]["output"][1]) == "a "


@pytest.mark.parametrize("cap", [1, 5, 12])
def test_the_cap_ends_with_max_output_tokens_and_bills_what_was_sent(cap):
    text = "one two three four five six seven eight nine ten eleven twelve thirteen"
    pipe = pipeline(engine=None, cap=cap)
    out, end = feed(pipe, sse(events_of([("reasoning", "so"), ("text", text)], 3)))
    assert end.kind == "capped"
    bodies = sent_events(out)
    final = bodies[-1]
    assert final["type"] == "response.incomplete"
    assert final["response"]["incomplete_details"] == {"reason": "max_output_tokens"}
    sent = "".join(b["delta"] for b in bodies if b["type"].endswith(".delta"))
    assert count_text(MODEL, sent) <= cap + 1  # two fields: a token may split across them
    assert pipe.rewriter.usage(4) == (4, count_text(MODEL, "so") + count_text(MODEL, deltas_of(bodies, "response.output_text.delta", 1)))
    assert pipe.rewriter.usage(4)[1] <= cap


def test_the_upstreams_error_event_ends_in_an_error_event_of_the_gateways():
    events = events_of([("text", "partial answer")], 4, terminal=None)[:-3]
    events.append({"type": "error", "code": "server_error", "message": "overloaded", "param": None})
    pipe = pipeline()
    out, end = feed(pipe, sse(events))
    assert end.kind == "upstream_error" and end.code == "upstream_error"
    bodies = sent_events(out)
    last = bodies[-1]
    assert last["type"] == "error" and last["code"] == "upstream_error" and "overloaded" in last["message"]
    assert "error" not in {k for b in bodies[:-1] for k in b}  # no top-level error key: the SDK would raise
    assert pipe.rewriter.usage(3) == (3, count_text(MODEL, "partial answer"))


def test_an_upstream_that_closes_early_ends_in_an_error_event():
    events = events_of([("text", "partial a c")], 4, terminal=None)[:-3]
    out, end = feed(pipeline(), sse(events))
    assert end.kind == "upstream_error"
    bodies = sent_events(out)
    assert bodies[-1]["type"] == "error"
    # What the window held went out (moderated) before the error.
    assert deltas_of(bodies, "response.output_text.delta") == "partial a c"


def test_response_failed_passes_through_moderated_as_the_end():
    events = events_of([("text", "the cat sat")], 3, usage=None, terminal="response.failed")
    events[-1]["response"]["error"] = {"code": "server_error", "message": "failed"}
    out, end = feed(pipeline(), sse(events))
    assert end.kind == "done" and b"cat" not in out.replace(b"[REDACTED:cat]", b"")
    final = sent_events(out)[-1]
    assert final["type"] == "response.failed" and _item_text(final["response"]["output"][0]) == "the [REDACTED:cat] sat"


def with_logprobs(events):
    """One logprob entry per delta (the delta is its token), with an alternative that names the cat."""
    entries = []
    for event in events:
        if event["type"] == "response.output_text.delta":
            entry = {"token": event["delta"], "logprob": -0.5, "bytes": list(event["delta"].encode()),
                     "top_logprobs": [{"token": event["delta"], "logprob": -0.5, "bytes": []},
                                      {"token": "cat", "logprob": -2.0, "bytes": []}]}
            event["logprobs"] = [entry]
            entries.append(entry)
        elif event["type"] == "response.output_text.done":
            event["logprobs"] = entries
    return events


LOGPROBS = {"include": ["message.output_text.logprobs"]}


@pytest.mark.parametrize("size", [1, 3, 7])
def test_logprobs_follow_their_text_and_never_spell_what_was_not_sent(size):
    text = "Mail bob@example.com about the cat, then stop."
    out, _ = feed(pipeline(**LOGPROBS), sse(with_logprobs(events_of([("text", text)], size))))
    bodies = sent_events(out)
    sent_text = deltas_of(bodies, "response.output_text.delta")
    assert sent_text == "Mail [REDACTED:email] about the [REDACTED:cat], then stop."
    delta_entries = [e for b in bodies if b["type"] == "response.output_text.delta" for e in b["logprobs"]]
    assert delta_entries, "entries for text that went out unchanged are relayed"
    tokens = [e["token"] for e in delta_entries]
    upstream = iter(text[i : i + size] for i in range(0, len(text), size))
    assert all(token in upstream for token in tokens)  # the upstream's entries, in order, some left out
    assert not any("bob" in t or "example" in t or "cat" in t for t in tokens)
    assert all(alt["token"] != "cat" for e in delta_entries for alt in e["top_logprobs"])
    done = [b for b in bodies if b["type"] == "response.output_text.done"][0]
    final = bodies[-1]["response"]["output"][0]["content"][0]
    assert done["logprobs"] == final["logprobs"] == delta_entries
    # Text no rule touches keeps every entry, in order.
    out, _ = feed(pipeline(**LOGPROBS), sse(with_logprobs(events_of([("text", "all fine here, thanks")], size))))
    bodies = sent_events(out)
    tokens = [e["token"] for b in bodies if b["type"] == "response.output_text.delta" for e in b["logprobs"]]
    assert "".join(tokens) == "all fine here, thanks"


def test_logprobs_not_asked_for_are_not_relayed_under_output_rules():
    events = with_logprobs(events_of([("text", "hi there")], 2))
    out, _ = feed(pipeline(), sse(events))
    assert b'"logprob"' not in out
    out, _ = feed(pipeline(engine=None), sse(events))
    assert b'"logprob"' in out  # without output rules they pass as they came


def test_a_whole_answers_logprobs_are_aligned_too():
    text = "write to bob@example.com now"
    pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
    part = {"type": "output_text", "annotations": [], "text": text,
            "logprobs": [{"token": p, "logprob": -1.0, "bytes": list(p.encode()), "top_logprobs": []} for p in pieces]}
    item = {"id": "m", "type": "message", "status": "completed", "role": "assistant", "content": [part]}
    parsed = ParsedRequest({"model": MODEL, "input": "x", **LOGPROBS}, MODEL, stream=False)
    moderated = RESPONSES.moderate_whole(parsed, envelope("completed", [item]), AnswerContext(MODEL, ENGINE))
    sent = json.loads(moderated.body)["output"][0]["content"][0]
    assert sent["text"] == "write to [REDACTED:email] now"
    assert [e["token"] for e in sent["logprobs"]] == ["writ", "e to", " now"]  # none for the redacted span


def test_whole_answer_is_cut_at_the_first_block():
    items = [_item("reasoning", 0, "mail bob@example.com", "completed"), _item("text", 1, "so a bad word, then", "completed"),
             _item("tool", 2, '{"a": 1}', "completed")]
    document = envelope("completed", items, {"input_tokens": 9, "output_tokens": 30})
    moderated = RESPONSES.moderate_whole(None, document, AnswerContext(MODEL, ENGINE))
    body = json.loads(moderated.body)
    assert b"bad" not in moderated.body and b"bob@" not in moderated.body
    assert body["status"] == "incomplete" and body["incomplete_details"] == {"reason": "content_filter"}
    assert [_item_text(item) for item in body["output"]] == ["mail [REDACTED:email]", "so a "]
    assert body["output"][1]["status"] == "incomplete"
    assert moderated.usage == (9, 30)
    assert [a.rule for a in moderated.actions] == ["email", "banned"]


@pytest.mark.parametrize("bad", [
    {"type": "response.output_text.delta", "item_id": "it_0", "content_index": 0, "delta": "no output index"},
    {"type": "response.output_text.delta", "output_index": 0, "content_index": 0, "delta": ["not", "text"]},
    {"type": "response.output_item.added", "output_index": 1},
    {"type": ["a", "list"], "output_index": 0},
    {"error": {"message": "chat-style error"}},
])
def test_what_cannot_be_relayed_ends_in_an_error_event(bad):
    events = events_of([("text", "hi there")], 3, terminal=None)[:-3] + [bad]
    out, end = feed(pipeline(), sse(events))
    assert end.kind == "upstream_error"
    bodies = sent_events(out)
    assert bodies[-1]["type"] == "error" and bodies[-1]["code"] == "upstream_error"


def test_an_event_without_an_event_line_gets_one_named_by_its_type():
    data = sse(events_of([("text", "hello")], 2)).replace(b"event: response.output_text.delta\n", b"")
    bodies = sent_events(feed(pipeline(), data)[0])  # checks every event line against the type
    assert deltas_of(bodies, "response.output_text.delta") == "hello"
