"""The pure core of streaming: chunked upstream events in, client bytes out."""

from __future__ import annotations

import json

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from proxy.config import ModerationConfig
from proxy.moderation import ModerationEngine
from proxy.sse import SSEDecoder
from proxy.stream_rewriter import StreamRewriter, UpstreamStreamError, _json_string

ENGINE = ModerationEngine.from_config(
    ModerationConfig(
        rules=[
            {"name": "banned", "type": "terms", "terms": ["bad word"], "action": "block"},
            {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
            {"name": "cat", "type": "terms", "terms": ["cat"], "action": "redact", "match": "substring"},
        ]
    )
)


def upstream_events(pieces, n=1, usage=True):
    events = [{"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
               "choices": [{"index": i, "delta": {"role": "assistant", "content": ""}, "finish_reason": None} for i in range(n)]}]
    for piece in pieces:
        for i in range(n):
            events.append({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                           "choices": [{"index": i, "delta": {"content": piece}, "finish_reason": None}]})
    for i in range(n):
        events.append({"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m",
                       "choices": [{"index": i, "delta": {}, "finish_reason": "stop"}]})
    if usage:
        events.append({"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
    return [json.dumps(e) for e in events] + ["[DONE]"]


def run(rewriter, events):
    out = b"".join(rewriter.event(e) for e in events)
    decoder = SSEDecoder()
    return [e.data for e in decoder.feed(out) + decoder.finish()]


def texts(payloads, n=1):
    chunks = [json.loads(p) for p in payloads if p != "[DONE]"]
    return ["".join(c["delta"].get("content") or "" for ch in chunks for c in ch["choices"] if c["index"] == i) for i in range(n)]


def split(text, cuts):
    points = sorted({c % (len(text) + 1) for c in cuts})
    return [text[a:b] for a, b in zip([0, *points], [*points, len(text)]) if text[a:b]]


@settings(max_examples=200, deadline=None)
@given(
    text=st.text(alphabet="abcdt @.xyzobadwr\u200b", max_size=60),
    cuts=st.lists(st.integers(0, 100), max_size=15),
    n=st.integers(1, 3),
)
def test_any_chunking_streams_what_moderate_gives_for_the_whole(text, cuts, n):
    whole = ENGINE.moderate(text, "output")
    rewriter = StreamRewriter(ENGINE, chat=True, client_wants_usage=False)
    payloads = run(rewriter, upstream_events(split(text, cuts), n=n))
    assert payloads[-1] == "[DONE]"
    assert texts(payloads, n) == [whole.text] * n
    chunks = [json.loads(p) for p in payloads[:-1]]
    reasons = [c["finish_reason"] for ch in chunks for c in ch["choices"] if c["finish_reason"]]
    assert reasons == ["content_filter" if whole.blocked else "stop"] * n
    assert all(ch.get("usage") is None for ch in chunks)  # the client did not ask for usage
    assert rewriter.completion_texts() == [text] * n or whole.blocked


def test_unchanged_chunks_are_forwarded_byte_for_byte():
    rewriter = StreamRewriter(None, chat=True, client_wants_usage=True)
    events = upstream_events(["hello ", "world"])
    out = b"".join(rewriter.event(e) for e in events)
    assert out == b"".join(b"data: " + e.encode() + b"\n\n" for e in events)
    assert rewriter.usage == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}


def test_the_usage_chunk_is_hidden_from_a_client_that_did_not_ask():
    rewriter = StreamRewriter(None, chat=True, client_wants_usage=False)
    payloads = run(rewriter, upstream_events(["hi"]))
    assert not any('"usage"' in p for p in payloads)
    assert rewriter.usage["completion_tokens"] == 4


def test_a_break_flushes_held_text_before_the_error():
    rewriter = StreamRewriter(ENGINE, chat=True, client_wants_usage=False)
    out = b"".join(rewriter.event(e) for e in upstream_events(["say ca"])[:2])
    out += rewriter.flush_before_error()
    decoder = SSEDecoder()
    assert texts([e.data for e in decoder.feed(out)]) == ["say ca"]


def swapped_in_place(rewriter, event, old_text):
    """``event``'s output, checked to be ``event`` byte for byte except its text; returns the new text."""
    out = rewriter.event(event).decode()
    assert out.startswith("data: ") and out.endswith("\n\n")
    new_text = json.loads(out[len("data: "):])["choices"][0]["delta"]["content"]
    assert out == "data: " + event.replace(old_text, json.dumps(new_text, ensure_ascii=False)) + "\n\n"
    return new_text


def test_a_chunk_whose_text_changes_keeps_the_upstreams_own_bytes_elsewhere():
    """Only the text is swapped: the rest of the event goes out exactly as the provider wrote it."""
    rewriter = StreamRewriter(ENGINE, chat=True, client_wants_usage=False)
    template = ('{"id":"c1","object":"chat.completion.chunk","created":1.0e9,"x_vendor":{"a":[1, 2]},'
                '"choices":[{"index":0,"delta":{"content":%s},"finish_reason":null}]}')
    first = swapped_in_place(rewriter, template % '"a cat "', '"a cat "')
    second = swapped_in_place(rewriter, template % '"more "', '"more "')
    assert first + second == "a [REDACTED:cat] "


def test_texts_spelled_with_escapes_or_spaces_are_swapped_in_place_too():
    rewriter = StreamRewriter(ENGINE, chat=True, client_wants_usage=False)
    template = '{"id": "c1", "choices": [{"index": 0, "delta": {"content": %s}, "finish_reason": null}]}'
    first = swapped_in_place(rewriter, template % '"caf\\u00e9 cat "', '"caf\\u00e9 cat "')
    second = swapped_in_place(rewriter, template % '"\\u00e0 "', '"\\u00e0 "')
    assert first + second == "caf\u00e9 [REDACTED:cat] \u00e0"


def test_with_two_choices_a_changed_chunk_is_encoded_again():
    """Two choices could spell the same text; the splice only runs when the text field is unambiguous."""
    rewriter = StreamRewriter(ENGINE, chat=True, client_wants_usage=False)
    for text in ("cat ", "more "):
        choice = {"index": 0, "delta": {"content": text}, "finish_reason": None}
        out = rewriter.event(json.dumps({"id": "c1", "choices": [choice, {**choice, "index": 1}]})).decode()
    chunk = json.loads(out[len("data: "):])
    assert [c["delta"]["content"] for c in chunk["choices"]] == ["[REDACTED:cat] ", "[REDACTED:cat] "]


@given(st.text(alphabet=st.characters(codec="utf-8") | st.sampled_from('"\\\x7f\x1f\u2028'), max_size=12))
def test_the_quick_json_spelling_of_a_text_is_json_dumps_own(text: str) -> None:
    assert _json_string(text) == json.dumps(text, ensure_ascii=False)


def content_chunk(text, *, index=0, role=False, extra=None, compact=True, ascii_only=False, note=None):
    delta = {"role": "assistant", "content": text} if role else {"content": text}
    if note is not None:
        delta["note"] = note  # a field after the text: the slot's suffix must not swallow it
    chunk = {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", **(extra or {}),
             "choices": [{"index": index, "delta": delta, "logprobs": None, "finish_reason": None}]}
    data = json.dumps(chunk, separators=(",", ":") if compact else (", ", ": "), ensure_ascii=ascii_only)
    try:
        data.encode()
    except UnicodeEncodeError:  # a lone surrogate travels as its escape: it is not UTF-8
        data = json.dumps(chunk, separators=(",", ":") if compact else (", ", ": "))
    return data


def rewrite_each(events, *, known_shapes=True, engine=ENGINE):
    rewriter = StreamRewriter(engine, chat=True, client_wants_usage=False)
    if not known_shapes:
        rewriter._slot_searches = 0  # the general path only: parse every chunk
    outs = []
    for event in events:
        outs.append([json.loads(e.data) if e.data != "[DONE]" else e.data for e in SSEDecoder().feed(rewriter.event(event))])
    return outs, rewriter


def test_chunks_shaped_like_the_last_are_handled_without_parsing_them(monkeypatch):
    parsed = []
    real_loads = json.loads
    monkeypatch.setattr(json, "loads", lambda data, *a, **k: parsed.append(data) or real_loads(data, *a, **k))
    words = [f" word{i}" for i in range(50)] + [" a cat", " and", " more"]
    rewriter = StreamRewriter(ENGINE, chat=True, client_wants_usage=False)
    out = b"".join(rewriter.event(e) for e in upstream_events(words))
    # The role chunk, the first text chunk and the probe of its shape, the finish and the usage chunks.
    assert len(parsed) == 5
    monkeypatch.undo()
    decoder = SSEDecoder()
    assert texts([e.data for e in decoder.feed(out)]) == ["".join(words).replace("cat", "[REDACTED:cat]")]
    assert rewriter.completion_texts() == ["".join(words)]


_TEXT = st.lists(st.sampled_from(list('ab t@.c"\\é\x01\u2028\ud800') + ["bad word", "cat"]), max_size=6).map("".join)


@settings(max_examples=300, deadline=None)
@given(st.lists(
    st.one_of(
        st.tuples(st.just("text"), _TEXT, st.booleans(), st.booleans(), st.booleans()),
        st.tuples(st.just("other choice"), _TEXT),
        st.tuples(st.just("nonce"), _TEXT, st.integers(0, 3)),
        st.tuples(st.just("note"), _TEXT, _TEXT),
        st.tuples(st.just("raw control character"), _TEXT),  # not valid JSON
        st.tuples(st.just("tool"), _TEXT),
        st.tuples(st.just("finish"), st.sampled_from(["stop", "length"])),
    ),
    max_size=25,
))
@example([("text", "a", False, True, False), ("note", "b", "c")])  # a field after the text
@example([("text", "a", False, True, False), ("raw control character", "b")])
@example([("text", "a ", True, True, False), ("text", "c", True, True, False)])  # a role, and the text all held
def test_known_shapes_give_what_parsing_every_chunk_gives(steps):
    """The shortcut for chunks shaped like the last is an optimisation only: the same events, the same accounting."""
    events = []
    for step in steps:
        kind = step[0]
        if kind == "text":
            _, text, role, compact, ascii_only = step
            events.append(content_chunk(text, role=role, compact=compact, ascii_only=ascii_only))
        elif kind == "other choice":
            events.append(content_chunk(step[1], index=1))
        elif kind == "nonce":
            events.append(content_chunk(step[1], extra={"obfuscation": "x" * step[2]}))
        elif kind == "note":
            events.append(content_chunk(step[1], note=step[2]))
        elif kind == "raw control character":
            events.append(content_chunk(step[1] + "\x01").replace("\\u0001", "\x01"))
        elif kind == "tool":
            call = {"index": 0, "function": {"arguments": step[1]}}
            events.append(json.dumps({"id": "c1", "choices": [{"index": 0, "delta": {"tool_calls": [call]}, "finish_reason": None}]}))
        else:
            events.append(json.dumps({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": step[1]}]}))
    events.append("[DONE]")
    results = []
    for known_shapes in (True, False):
        try:
            outs, rewriter = rewrite_each(events, known_shapes=known_shapes)
            results.append((outs, rewriter.completion_texts(), rewriter.actions, rewriter.blocked, None))
        except UpstreamStreamError as exc:
            results.append((None, None, None, None, str(exc)))
    assert results[0] == results[1]


def test_a_chunk_whose_text_field_is_spelt_elsewhere_first_still_finds_the_right_one():
    """The same ``"content":"..."`` inside another field is never mistaken for the choice's text:
    taken for it, the next chunk (the other field changed, the text the same) would pass unread."""
    pairs = [("cat", "cat"), (" bad word", "cat"), ("x", " more"), ("y", " more")]
    events = [content_chunk(text, extra={"meta": {"content": meta}}) for meta, text in pairs]
    outs, rewriter = rewrite_each(events)
    sent = [chunk for out in outs for chunk in out]
    assert "".join(c["choices"][0]["delta"]["content"] for c in sent) == "[REDACTED:cat][REDACTED:cat] more "  # the last word still held
    assert rewriter.blocked is None and rewriter._slot is not None
    assert rewriter.completion_texts() == ["catcat more more"]


def test_text_for_a_choice_that_has_finished_is_refused_not_passed_on_unmoderated():
    rewriter = StreamRewriter(ENGINE, chat=True, client_wants_usage=False)
    rewriter.event(content_chunk("hi "))
    rewriter.event(json.dumps({"id": "c1", "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}))
    with pytest.raises(UpstreamStreamError, match="already finished"):
        rewriter.event(content_chunk("bad word"))
