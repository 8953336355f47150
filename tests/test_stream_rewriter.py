"""The pure core of streaming: chunked upstream events in, client bytes out."""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.config import ModerationConfig
from proxy.moderation import ModerationEngine
from proxy.sse import SSEDecoder
from proxy.stream_rewriter import StreamRewriter, _json_string

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
