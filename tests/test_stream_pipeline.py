"""The stream pipeline, fed bytes as h11's tests feed them: whole, byte by byte, split anywhere.

Whatever the split, the bytes out and the end are the same; every text field
of every choice is moderated like the whole field; nothing of a blocked or
redacted span is in any byte sent.
"""

from __future__ import annotations

import json

from hypothesis import given, settings
from hypothesis import strategies as st

from pipeline_feeding import feed
from proxy.config import ModerationConfig
from proxy.formats import AnswerContext
from proxy.formats.base import ParsedRequest
from proxy.formats.chat import ChatFormat
from proxy.formats.completions import CompletionsFormat
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
CHAT = ChatFormat()


def chunk(delta=None, index=0, finish=None, **extra):
    choice = {"index": index, "delta": delta or {}, "finish_reason": finish, **extra}
    return {"id": "c1", "object": "chat.completion.chunk", "created": 1, "model": "m", "choices": [choice]}


def sse(events, framing="data: ", end=b"\n\n"):
    out = b""
    for event in events:
        data = event if isinstance(event, str) else json.dumps(event)
        out += framing.encode() + data.encode() + end
    return out


def pipeline(engine=ENGINE, fmt=CHAT, cap=None, wants_usage=False, payload=None):
    parsed = ParsedRequest(payload or {}, MODEL, stream=True, client_wants_usage=wants_usage)
    return StreamPipeline(fmt.stream_rewriter(parsed, AnswerContext(MODEL, engine, wants_usage, cap)), 1 << 20)


def decoded(out: bytes):
    decoder = SSEDecoder()
    return [e.data for e in decoder.feed(out) + decoder.finish()]


def field_text(payloads, name, index=0):
    text = ""
    for payload in payloads:
        if payload == "[DONE]":
            continue
        body = json.loads(payload)
        for choice in body.get("choices") or ():
            if choice.get("index") == index:
                value = (choice.get("delta") or {}).get(name)
                text += value or ""
    return text


def stream_of(pieces, name="content"):
    events = [chunk({"role": "assistant", "content": ""})]
    events += [chunk({name: piece}) for piece in pieces]
    events += [chunk({}, finish="stop"), {"id": "c1", "choices": [], "usage": {"prompt_tokens": 3, "completion_tokens": 4}}]
    return sse(events + ["[DONE]"])


TEXT = st.text(alphabet="abcdt @.xyzobadwr\u200b", max_size=60)


@settings(max_examples=150, deadline=None)
@given(text=TEXT, cuts=st.lists(st.integers(0, 10_000), max_size=12), name=st.sampled_from(
    ["content", "reasoning_content", "reasoning", "refusal"]))
def test_any_split_of_the_bytes_gives_the_same_bytes_and_end(text, cuts, name):
    words = [text[i : i + 3] for i in range(0, len(text), 3)]
    data = stream_of(words, name)
    whole_out, whole_end = feed(pipeline(), data)
    split_out, split_end = feed(pipeline(), data, cuts)
    bytewise_out, bytewise_end = feed(pipeline(), data, range(len(data)))
    assert split_out == whole_out == bytewise_out
    assert split_end == whole_end == bytewise_end
    expected = ENGINE.moderate(text, "output")
    assert field_text(decoded(whole_out), name) == expected.text
    assert whole_end.kind == ("blocked" if expected.blocked else "done")
    if expected.blocked is None:
        assert decoded(whole_out)[-1] == "[DONE]"


def test_every_text_field_has_its_own_window():
    events = [
        chunk({"role": "assistant", "reasoning_content": "mail a@b.co th"}),
        chunk({"reasoning_content": "en", "content": "the c"}),  # the last reasoning piece and the first content piece
        chunk({"content": "at sat", "refusal": "no c"}),
        chunk({"refusal": "at"}, finish="stop"),
        "[DONE]",
    ]
    out, end = feed(pipeline(), sse(events))
    payloads = decoded(out)
    assert end.kind == "done"
    assert field_text(payloads, "reasoning_content") == "mail [REDACTED:email] then"
    assert field_text(payloads, "content") == "the [REDACTED:cat] sat"
    assert field_text(payloads, "refusal") == "no [REDACTED:cat]"
    assert b"a@b.co" not in out and b"cat" not in out.replace(b"[REDACTED:cat]", b"")


def test_tool_and_legacy_function_arguments_are_moderated_and_stay_json():
    calls = [
        chunk({"tool_calls": [{"index": 0, "id": "t0", "function": {"name": "mail", "arguments": '{"to": "a@'}},
                              {"index": 1, "id": "t1", "function": {"name": "note", "arguments": '{"x": "c'}}]}),
        chunk({"tool_calls": [{"index": 1, "function": {"arguments": 'at"}'}}]}),
        chunk({"tool_calls": [{"index": 0, "function": {"arguments": 'b.co"}'}}]}, finish="tool_calls"),
        "[DONE]",
    ]
    out, end = feed(pipeline(), sse(calls))
    assert b"a@b.co" not in out and b'"cat' not in out.replace(b'[REDACTED:cat]', b'')
    args: dict[int, str] = {}
    for payload in decoded(out)[:-1]:
        for call in json.loads(payload)["choices"][0]["delta"].get("tool_calls") or ():
            args[call["index"]] = args.get(call["index"], "") + call["function"].get("arguments", "")
    assert json.loads(args[0]) == {"to": "[REDACTED:email]"}
    assert json.loads(args[1]) == {"x": "[REDACTED:cat]"}
    legacy = [chunk({"function_call": {"name": "f", "arguments": '{"q": "bad '}}), chunk({"function_call": {"arguments": 'word"}'}}), "[DONE]"]
    out, end = feed(pipeline(), sse(legacy))
    assert end.kind == "blocked" and b"bad" not in out
    assert json.loads(decoded(out)[-2])["choices"][0]["finish_reason"] == "content_filter"


def test_unchanged_chunks_are_forwarded_byte_for_byte():
    data = stream_of(["hello ", "world"])
    out, _ = feed(pipeline(), data)
    assert out.startswith(sse([chunk({"role": "assistant", "content": ""})]))
    out, _ = feed(pipeline(engine=None), data)
    assert sse([chunk({"content": "hello "}), chunk({"content": "world"})]) in out


def test_the_usage_chunk_is_hidden_unless_the_client_asked():
    data = stream_of(["hi"])
    assert b'"usage"' not in feed(pipeline(), data)[0]
    assert b'"usage"' in feed(pipeline(wants_usage=True), data)[0]


def test_provider_usage_variants():
    # Groq: usage inside x_groq on the last chunk.
    groq = sse([chunk({"content": "hi"}), {**chunk({}, finish="stop"), "x_groq": {"usage": {"prompt_tokens": 44, "completion_tokens": 11}}}, "[DONE]"])
    pipe = pipeline(engine=None)
    feed(pipe, groq)
    assert pipe.rewriter.usage(5) == (44, 11)
    # Cumulative usage on every chunk (vLLM continuous_usage_stats): the last, never the sum.
    cumulative = [{**chunk({"content": w}), "usage": {"prompt_tokens": 7, "completion_tokens": i + 1}} for i, w in enumerate("abc")]
    pipe = pipeline()
    feed(pipe, sse(cumulative + [chunk({}, finish="stop"), "[DONE]"]))
    assert pipe.rewriter.usage(5) == (7, 3)
    # A partial usage object: what it lacks is counted.
    pipe = pipeline()
    feed(pipe, sse([chunk({"content": "one two"}), chunk({}, finish="stop"), {"choices": [], "usage": {"prompt_tokens": 9}}, "[DONE]"]))
    assert pipe.rewriter.usage(5) == (9, count_text(MODEL, "one two"))
    # No usage at all (Ollama): every field is counted, reasoning too.
    pipe = pipeline()
    feed(pipe, sse([chunk({"reasoning_content": "think hard"}), chunk({"content": "answer"}, finish="stop"), "[DONE]"]))
    assert pipe.rewriter.usage(5) == (5, count_text(MODEL, "think hard") + count_text(MODEL, "answer"))


def test_an_empty_finish_reason_is_not_a_finish():
    events = [chunk({"content": "a c"}, finish=""), chunk({"content": "at"}, finish=""), chunk({}, finish="stop"), "[DONE]"]
    out, end = feed(pipeline(), sse(events))
    assert end.kind == "done"
    assert field_text(decoded(out), "content") == "a [REDACTED:cat]"


def test_azure_prompt_filter_chunk_passes_through():
    first = {"id": "", "object": "", "created": 0, "model": "", "choices": [], "prompt_filter_results": [{"prompt_index": 0}]}
    out, end = feed(pipeline(), sse([first, chunk({"content": "hi"}, content_filter_results={}), chunk({}, finish="stop"), "[DONE]"]))
    assert b"prompt_filter_results" in out and end.kind == "done"


def test_a_break_flushes_held_text_before_the_error():
    pipe = pipeline()
    out, end = pipe.feed(sse([chunk({"content": "hello wor"})]))
    more, end = pipe.upstream_failed("broke")
    payloads = decoded(out + more)
    assert field_text(payloads, "content") == "hello wor"
    assert json.loads(payloads[-1])["error"]["code"] == "upstream_error"
    assert end.kind == "upstream_error"


def test_bad_json_and_early_close_end_with_an_error():
    out, end = feed(pipeline(), sse([chunk({"content": "hi"}), "{not json"]))
    assert end == ("upstream_error", "upstream_error")
    out, end = feed(pipeline(), sse([chunk({"content": "hi"})]))
    assert end.kind == "upstream_error" and b"before it was complete" in out


def test_text_after_a_choice_finished_is_refused():
    out, end = feed(pipeline(), sse([chunk({"content": "a"}, finish="stop"), chunk({"content": " cat"}), "[DONE]"]))
    assert end.kind == "upstream_error" and b"cat" not in out


def test_two_choices_interleaved_each_with_its_window():
    events = [chunk({"content": "a c"}, index=0), chunk({"content": "b bad "}, index=1), chunk({"content": "at"}, index=0),
              chunk({"content": "word"}, index=1), "[DONE]"]
    out, end = feed(pipeline(), sse(events))
    payloads = decoded(out)
    assert end.kind == "blocked" and b"bad" not in out
    finishes = {json.loads(p)["choices"][0]["index"]: json.loads(p)["choices"][0]["finish_reason"] for p in payloads[:-1]}
    assert finishes == {0: "content_filter", 1: "content_filter"}


def test_sse_framings_decode_alike():
    events = [chunk({"content": "x c"}), chunk({"content": "at"}, finish="stop"), "[DONE]"]
    plain = feed(pipeline(), sse(events))[0]
    for framing, end in (("data:", b"\n\n"), ("data: ", b"\r\n\r\n")):
        assert feed(pipeline(), sse(events, framing, end))[0] == plain
    noisy = b": comment\n\nretry: 100\nid: 7\nevent: message\n" + sse(events)
    assert feed(pipeline(), noisy)[0] == plain


LOGPROB_TEXT = ["The", " cat", " sat", " on", " a", "@b.co", " mat"]


def with_logprobs(tokens):
    out = []
    for token in tokens:
        entry = {"token": token, "logprob": -0.1, "bytes": list(token.encode()),
                 "top_logprobs": [{"token": token, "logprob": -0.1, "bytes": list(token.encode())},
                                  {"token": " cat", "logprob": -3.0, "bytes": list(b" cat")}]}
        out.append(chunk({"content": token}, logprobs={"content": [entry], "refusal": None}))
    return out + [chunk({}, finish="stop"), "[DONE]"]


@settings(max_examples=40, deadline=None)
@given(cuts=st.lists(st.integers(0, 5000), max_size=8))
def test_logprobs_never_spell_what_was_not_sent_and_follow_their_text(cuts):
    out, end = feed(pipeline(payload={"logprobs": True}), sse(with_logprobs(LOGPROB_TEXT)), cuts)
    sent = ""
    for payload in decoded(out)[:-1]:
        choice = json.loads(payload)["choices"][0]
        text = (choice.get("delta") or {}).get("content") or ""
        entries = (choice.get("logprobs") or {}).get("content") or []
        # Every entry sent is text sent, in this chunk or an earlier one, in order.
        for entry in entries:
            assert entry["token"] in sent + text
            assert all(alt["token"] != " cat" for alt in entry["top_logprobs"])
        sent += text
    assert sent == "The [REDACTED:cat] sat on [REDACTED:email] mat"
    tokens = [e["token"] for p in decoded(out)[:-1] for e in ((json.loads(p)["choices"][0].get("logprobs") or {}).get("content") or [])]
    assert tokens == ["The", " sat", " on", " mat"]


def test_the_answer_cap_ends_a_choice_with_length():
    words = [" word"] * 50
    pipe = pipeline(engine=None, cap=10)
    out, end = feed(pipe, stream_of(words))
    payloads = decoded(out)
    assert end.kind == "capped"
    assert count_text(MODEL, field_text(payloads, "content")) == 10
    assert json.loads(payloads[-2])["choices"][0]["finish_reason"] == "length"
    assert pipe.rewriter.usage(3) == (3, 10)


def test_completions_text_and_legacy_logprobs():
    fmt = CompletionsFormat()
    events = [{"id": "x", "object": "text_completion", "choices": [
        {"index": 0, "text": piece, "finish_reason": None,
         "logprobs": {"tokens": [piece], "token_logprobs": [-0.1], "top_logprobs": [{piece: -0.1, " cat": -2.0}], "text_offset": [0]}}]}
        for piece in ["a", " cat", " b"]]
    events.append({"id": "x", "object": "text_completion", "choices": [{"index": 0, "text": "", "finish_reason": "stop"}]})
    out, end = feed(pipeline(fmt=fmt, payload={"logprobs": 2}), sse(events + ["[DONE]"]))
    assert b"cat" not in out.replace(b"[REDACTED:cat]", b"")
    text = "".join(json.loads(p)["choices"][0]["text"] for p in decoded(out)[:-1])
    assert text == "a [REDACTED:cat] b"
