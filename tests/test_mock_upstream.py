"""The mock upstream, driven over real loopback sockets by the openai SDK and aiohttp."""

from __future__ import annotations

import asyncio
import json
import socket
import subprocess
import sys
import time
from dataclasses import dataclass

import aiohttp
import openai
import pytest
from aiohttp import web
from hypothesis import given
from hypothesis import strategies as st

from proxy import tokens
from proxy.devtools.mock import (
    MOCK_MODELS,
    MOCK_STATE,
    MockControl,
    MockState,
    create_mock_app,
    plan_answer,
    run_mock_upstream,
)
from proxy.devtools.mock.plan import plan_segments, segment_tokens

USER_TEXT = "The quick brown fox jumps over the lazy dog."
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": USER_TEXT},
]


@dataclass
class Mock:
    url: str
    state: MockState


async def start_mock(delay_ms: float = 0.0):
    """A mock on a free loopback port, run the plain way (no handler_cancellation)."""
    app = create_mock_app(delay_ms)
    runner = web.AppRunner(app)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    port = runner.addresses[0][1]
    return runner, Mock(f"http://127.0.0.1:{port}", app[MOCK_STATE])


@pytest.fixture
async def mock():
    runner, server = await start_mock()
    yield server
    await runner.cleanup()


@pytest.fixture
async def client(mock):
    # Plain HTTP on loopback: skipping TLS setup (loading CA certificates)
    # saves a tenth of a second per test.
    http_client = openai.DefaultAsyncHttpxClient(verify=False)
    async with openai.AsyncOpenAI(
        base_url=f"{mock.url}/v1", api_key="x", max_retries=0, http_client=http_client
    ) as sdk:
        yield sdk


@pytest.fixture
async def http():
    async with aiohttp.ClientSession() as session:
        yield session


async def sse_events(response: aiohttp.ClientResponse) -> list[str]:
    """The ``data:`` payloads of an SSE body, in order."""
    body = (await response.read()).decode()
    assert body.endswith("\n\n")
    return [block.removeprefix("data: ") for block in body.split("\n\n") if block]


# --- streaming chat ---------------------------------------------------------


async def test_stream_echoes_the_last_user_message_word_by_word_with_usage(client):
    stream = await client.chat.completions.create(
        model="gpt-4o-mini", messages=MESSAGES, stream=True, stream_options={"include_usage": True}
    )
    chunks = [chunk async for chunk in stream]
    content_chunks = [c for c in chunks if c.choices and c.choices[0].delta.content]
    assert "".join(c.choices[0].delta.content for c in content_chunks) == USER_TEXT
    assert len(content_chunks) == len(USER_TEXT.split())
    assert chunks[0].choices[0].delta.role == "assistant"
    assert {c.id for c in chunks} == {chunks[0].id} and chunks[0].id.startswith("chatcmpl-mock-")
    assert {c.model for c in chunks} == {"gpt-4o-mini"}
    assert chunks[-2].choices[0].finish_reason == "stop"
    usage = chunks[-1].usage
    assert chunks[-1].choices == []
    assert usage.prompt_tokens == tokens.count_chat_prompt("gpt-4o-mini", MESSAGES)
    assert usage.completion_tokens == tokens.count_text("gpt-4o-mini", USER_TEXT)
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens


async def test_stream_wire_format_without_usage(mock, http):
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    async with http.post(f"{mock.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert response.headers["Content-Type"] == "text/event-stream"
        events = await sse_events(response)
    assert events[-1] == "[DONE]"
    chunks = [json.loads(e) for e in events[:-1]]
    assert all("usage" not in c and c["object"] == "chat.completion.chunk" for c in chunks)
    assert chunks[0]["choices"][0] == {
        "index": 0,
        "delta": {"role": "assistant", "content": "", "refusal": None},
        "logprobs": None,
        "finish_reason": None,
    }
    assert chunks[-1]["choices"][0]["delta"] == {}


async def test_non_ascii_streams_as_raw_utf8_and_lone_surrogates_are_replaced(mock, http):
    body = {"model": "gpt-4o", "messages": [{"role": "user", "content": "naïve 東京 \ud800!"}], "stream": True}
    async with http.post(f"{mock.url}/v1/chat/completions", json=body) as response:
        raw = await response.read()
    assert "東京".encode() in raw
    pieces = [
        json.loads(block.removeprefix(b"data: "))["choices"][0]["delta"].get("content") or ""
        for block in raw.split(b"\n\n")
        if block.startswith(b"data: {")
    ]
    assert "".join(pieces) == "naïve 東京 \ufffd!"


async def test_reply_and_chunk_chars(client):
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_body={"mock": {"reply": "abcdefghij", "chunk_chars": 3}}
    )
    pieces = [c.choices[0].delta.content async for c in stream if c.choices and c.choices[0].delta.content]
    assert pieces == ["abc", "def", "ghi", "j"]


async def test_n_choices_are_interleaved(client):
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, n=2, stream=True, stream_options={"include_usage": True}
    )
    texts = {0: "", 1: ""}
    order = []
    usage = None
    async for chunk in stream:
        if chunk.usage:
            usage = chunk.usage
        for choice in chunk.choices:
            if choice.delta.content:
                texts[choice.index] += choice.delta.content
                order.append(choice.index)
    assert texts == {0: USER_TEXT, 1: USER_TEXT}
    assert order[:4] == [0, 1, 0, 1]
    assert usage.completion_tokens == 2 * tokens.count_text("gpt-4o", USER_TEXT)


async def test_tool_call_arguments_stream_in_pieces(client):
    arguments = '{"city": "Paris", "unit": "celsius"}'
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        stream_options={"include_usage": True},
        extra_body={"mock": {"tool_call": {"name": "get_weather", "arguments": arguments}}},
    )
    chunks = [c async for c in stream]
    calls = [c.choices[0].delta.tool_calls[0] for c in chunks if c.choices and c.choices[0].delta.tool_calls]
    assert calls[0].function.name == "get_weather" and calls[0].id and calls[0].type == "function"
    assert len(calls) > 2
    assert "".join(call.function.arguments for call in calls) == arguments
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["tool_calls"]
    expected = tokens.count_text("gpt-4o", arguments) + tokens.count_text("gpt-4o", "get_weather")
    assert chunks[-1].usage.completion_tokens == expected


async def test_max_tokens_truncates_with_finish_reason_length(client):
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, max_tokens=3, stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    encoding = tokens.encoding_for_model("gpt-4o")
    assert text == encoding.decode(encoding.encode(USER_TEXT)[:3])
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["length"]
    assert chunks[-1].usage.completion_tokens == 3


@pytest.mark.parametrize("field", ["reasoning_content", "reasoning"])
async def test_reasoning_streams_before_the_content_in_either_spelling(client, field):
    steer = {"mock": {"reasoning": "Think of the fox.", "reasoning_field": field}}
    if field == "reasoning_content":
        del steer["mock"]["reasoning_field"]  # the default spelling (DeepSeek's)
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, extra_body=steer
    )
    deltas = [c.to_dict()["choices"][0]["delta"] async for c in stream if c.choices]
    kinds = [next(iter(k for k in d if k in (field, "content")), None) for d in deltas[1:-1]]
    assert kinds == [field] * 4 + ["content"] * len(USER_TEXT.split())
    assert "".join(d.get(field, "") for d in deltas) == "Think of the fox."
    assert "".join(d.get("content") or "" for d in deltas) == USER_TEXT

    whole = (await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body=steer)).to_dict()
    assert whole["choices"][0]["message"][field] == "Think of the fox."
    thought = tokens.count_text("gpt-4o", "Think of the fox.")
    assert whole["usage"]["completion_tokens"] == thought + tokens.count_text("gpt-4o", USER_TEXT)
    assert whole["usage"]["completion_tokens_details"]["reasoning_tokens"] == thought


async def test_reasoning_counts_against_max_tokens(client):
    steer = {"mock": {"reasoning": "one two three four five six seven eight"}}
    whole = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, max_tokens=3, extra_body=steer)
    choice = whole.choices[0]
    assert choice.finish_reason == "length" and choice.message.content == ""
    assert whole.to_dict()["choices"][0]["message"]["reasoning_content"] == "one two three"


async def test_a_refusal_streams_in_the_refusal_field(client):
    steer = {"mock": {"refusal": "I can't help with that."}}
    stream = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True, extra_body=steer)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.refusal or "" for c in chunks) == "I can't help with that."
    assert all(c.choices[0].delta.content is None for c in chunks)
    whole = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body=steer)
    assert whole.choices[0].message.refusal == "I can't help with that." and whole.choices[0].message.content is None


async def test_logprobs_give_every_piece_its_entry(client):
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, logprobs=True, top_logprobs=2
    )
    entries = [c.choices[0].logprobs.content for c in stream_chunks(await collect(stream)) if c.choices[0].delta.content]
    assert all(len(e) == 1 for e in entries)
    assert "".join(e[0].token for e in entries) == USER_TEXT
    assert all(bytes(e[0].bytes).decode() == e[0].token and len(e[0].top_logprobs) == 2 for e in entries)
    whole = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, logprobs=True)
    assert "".join(e.token for e in whole.choices[0].logprobs.content) == USER_TEXT
    plain = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert plain.choices[0].logprobs is None


async def collect(stream):
    return [chunk async for chunk in stream]


def stream_chunks(chunks):
    return [c for c in chunks if c.choices]


@given(text=st.text(max_size=60), chunk_chars=st.none() | st.integers(min_value=1, max_value=7))
def test_stream_pieces_always_rebuild_the_reply(text, chunk_chars):
    answer = plan_answer("gpt-4o", text, None, MockControl(chunk_chars=chunk_chars), "stop")
    assert "".join(answer.pieces) == text
    assert all(answer.pieces)


_SEGMENT = st.tuples(st.sampled_from(["reasoning", "text", "refusal", "tool"]), st.text(max_size=40))


@given(
    wanted=st.lists(_SEGMENT, min_size=1, max_size=3),
    cap=st.none() | st.integers(min_value=0, max_value=30),
    chunk_chars=st.none() | st.integers(min_value=1, max_value=7),
)
def test_planned_segments_fit_the_cap_and_rebuild_their_text(wanted, cap, chunk_chars):
    control = MockControl(chunk_chars=chunk_chars)
    segments, cut = plan_segments("gpt-4o", wanted, cap, control, tool_name="f")
    assert len(segments) <= len(wanted)
    for segment, (kind, text) in zip(segments, wanted):
        assert segment.kind == kind and "".join(segment.pieces) == segment.text and all(segment.pieces)
        whole = text.encode("utf-16", "surrogatepass").decode("utf-16", "replace")
        assert whole.startswith(segment.text) and (segment.text == whole) != segment.cut
        assert kind != "tool" or not segment.cut  # a tool call is all or nothing
    spent = sum(segment_tokens("gpt-4o", s, "f") for s in segments)
    if cap is None:
        assert not cut and len(segments) == len(wanted)
    else:
        assert spent <= cap
        assert cut == (len(segments) < len(wanted) or any(s.cut for s in segments))
    assert plan_segments("gpt-4o", wanted, cap, MockControl(chunk_chars=chunk_chars, ignore_cap=True))[1] is False


# --- non-streamed -----------------------------------------------------------


async def test_non_streamed_chat_has_true_usage(client):
    completion = await client.chat.completions.create(model="gpt-3.5-turbo", messages=MESSAGES, n=2)
    assert completion.object == "chat.completion"
    assert [c.message.content for c in completion.choices] == [USER_TEXT, USER_TEXT]
    assert completion.choices[1].index == 1 and completion.choices[0].finish_reason == "stop"
    assert completion.usage.prompt_tokens == tokens.count_chat_prompt("gpt-3.5-turbo", MESSAGES)
    assert completion.usage.completion_tokens == 2 * tokens.count_text("gpt-3.5-turbo", USER_TEXT)


async def test_non_streamed_tool_call(client):
    completion = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, extra_body={"mock": {"tool_call": {"name": "f", "arguments": "{}"}}}
    )
    choice = completion.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert choice.message.tool_calls[0].function.name == "f"
    assert choice.message.tool_calls[0].function.arguments == "{}"


async def test_content_parts_are_echoed(client):
    messages = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "parts"}]}]
    completion = await client.chat.completions.create(model="gpt-4o", messages=messages)
    assert completion.choices[0].message.content == "hello parts"


async def test_usage_false_omits_usage(client):
    no_usage = {"mock": {"usage": False}}
    completion = await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body=no_usage)
    assert completion.usage is None
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, stream_options={"include_usage": True}, extra_body=no_usage
    )
    assert [c.usage async for c in stream if c.usage is not None] == []


# --- completions, embeddings, models ----------------------------------------


async def test_completions_stream_and_not(client):
    stream = await client.completions.create(
        model="gpt-3.5-turbo-instruct", prompt="say this back", stream=True, stream_options={"include_usage": True}
    )
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].text for c in chunks if c.choices) == "say this back"
    assert chunks[0].object == "text_completion"
    assert chunks[-2].choices[0].finish_reason == "stop"
    assert chunks[-1].usage.prompt_tokens == tokens.count_prompt("gpt-3.5-turbo-instruct", "say this back")

    completion = await client.completions.create(model="gpt-4o", prompt=[[1, 2, 3], [4, 5]], max_tokens=0)
    assert completion.choices[0].text == ""
    assert completion.usage.prompt_tokens == 5


async def test_embeddings_are_deterministic_in_both_formats(client):
    first = await client.embeddings.create(model="text-embedding-3-small", input=["alpha", "beta"])  # SDK asks base64
    again = await client.embeddings.create(
        model="text-embedding-3-small", input=["alpha", "beta"], encoding_format="float"
    )
    assert len(first.data) == 2 and len(first.data[0].embedding) == 8
    assert first.data[0].embedding == pytest.approx(again.data[0].embedding, abs=1e-6)
    assert first.data[0].embedding != first.data[1].embedding
    assert first.usage.prompt_tokens == tokens.count_prompt("text-embedding-3-small", ["alpha", "beta"])
    wide = await client.embeddings.create(model="text-embedding-3-small", input="alpha", dimensions=32)
    assert len(wide.data[0].embedding) == 32


async def test_models_list(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == list(MOCK_MODELS)
    required = {"gpt-4o-mini", "gpt-4o", "gpt-4.1", "gpt-3.5-turbo", "text-embedding-3-small", "mock-model"}
    assert required <= set(MOCK_MODELS)


# --- errors -----------------------------------------------------------------


async def test_status_500_is_an_openai_server_error(client):
    with pytest.raises(openai.InternalServerError) as caught:
        await client.chat.completions.create(
            model="gpt-4o", messages=MESSAGES, stream=True, extra_body={"mock": {"status": 500}}
        )
    assert caught.value.status_code == 500
    assert set(caught.value.body) == {"message", "type", "param", "code"}


async def test_status_429_is_a_rate_limit_error(client):
    with pytest.raises(openai.RateLimitError) as caught:
        await client.completions.create(model="gpt-4o", prompt="x", extra_body={"mock": {"status": 429}})
    assert caught.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    "path, payload, param",
    [
        ("chat/completions", b"{not json", None),
        ("chat/completions", b"[1, 2]", None),
        ("chat/completions", json.dumps({"messages": MESSAGES}).encode(), "model"),
        ("chat/completions", json.dumps({"model": "gpt-4o"}).encode(), "messages"),
        ("chat/completions", json.dumps({"model": "gpt-4o", "messages": MESSAGES, "n": 0}).encode(), "n"),
        ("chat/completions", json.dumps({"model": "gpt-4o", "messages": MESSAGES, "mock": {"replay": "x"}}).encode(),
         "mock.replay"),
        ("chat/completions", json.dumps({"model": "gpt-4o", "messages": MESSAGES, "mock": {"drop_after": "1"}}).encode(),
         "mock.drop_after"),
        ("chat/completions", json.dumps({"model": "gpt-4o", "messages": MESSAGES, "mock": {"reasoning_field": "x"}}).encode(),
         "mock.reasoning_field"),
        ("chat/completions", json.dumps({"model": "gpt-4o", "messages": MESSAGES, "top_logprobs": 2}).encode(),
         "top_logprobs"),
        ("completions", json.dumps({"model": "gpt-4o", "prompt": "x", "mock": {"refusal": "no"}}).encode(), "mock.refusal"),
        ("completions", json.dumps({"model": "gpt-4o"}).encode(), "prompt"),
        ("embeddings", json.dumps({"model": "gpt-4o", "input": []}).encode(), "input"),
    ],
)
async def test_bad_requests_are_openai_shaped_400s(mock, http, path, payload, param):
    headers = {"Content-Type": "application/json"}
    async with http.post(f"{mock.url}/v1/{path}", data=payload, headers=headers) as response:
        assert response.status == 400
        error = (await response.json())["error"]
    assert set(error) == {"message", "type", "param", "code"}
    assert error["type"] == "invalid_request_error" and error["param"] == param


# --- broken streams ---------------------------------------------------------


async def test_drop_after_breaks_the_connection(client, mock):
    stream = await client.chat.completions.create(
        model="gpt-4o", messages=MESSAGES, stream=True, extra_body={"mock": {"drop_after": 2}}
    )
    received = []
    with pytest.raises(openai.APIConnectionError):
        async for chunk in stream:
            received.append(chunk.choices[0].delta.content)
    assert "".join(received) == "The quick "
    assert mock.state.disconnects == 0  # the mock hung up, not the client


async def test_drop_after_without_streaming_sends_no_response(client):
    with pytest.raises(openai.APIConnectionError):
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body={"mock": {"drop_after": 0}})
    with pytest.raises(openai.APIConnectionError):
        await client.completions.create(model="gpt-4o", prompt="x", extra_body={"mock": {"drop_after": 0}})


async def test_raw_is_written_verbatim_and_no_done(mock, http):
    raw = ['data: {"broken": ', "\n\n", "data: not json\n\n", ": comment\n"]
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "mock": {"raw": raw}}
    async with http.post(f"{mock.url}/v1/chat/completions", json=body) as response:
        assert response.status == 200
        assert (await response.read()).decode() == "".join(raw)

    body["mock"] = {"no_done": True, "reply": "ok"}
    async with http.post(f"{mock.url}/v1/chat/completions", json=body) as response:
        events = await sse_events(response)
    assert "[DONE]" not in events and json.loads(events[-1])["choices"][0]["finish_reason"] == "stop"


async def test_stalls_and_delays(mock, http):
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "mock": {"stall_before_ms": 150}}
    started = time.monotonic()
    async with http.post(f"{mock.url}/v1/chat/completions", json=body) as response:
        assert time.monotonic() - started >= 0.15
        await response.read()

    body["mock"] = {"reply": "a b c", "stall_after": {"chunks": 1, "ms": 250}}
    async with http.post(f"{mock.url}/v1/chat/completions", json=body) as response:
        times = []
        async for line in response.content:
            if line.startswith(b"data: {") and b'"content":"' in line and b'"content":""' not in line:
                times.append(time.monotonic())
    # One stall only, after the first chunk: the second gap is shorter than the stall.
    assert len(times) == 3 and times[1] - times[0] >= 0.24 and times[2] - times[1] < times[1] - times[0]

    body["mock"] = {"reply": "a b c d", "delay_ms": 40}
    started = time.monotonic()
    async with http.post(f"{mock.url}/v1/chat/completions", json=body) as response:
        await response.read()
    assert time.monotonic() - started >= 0.16


async def test_app_level_delay_applies_to_non_streamed_answers():
    runner, slow = await start_mock(delay_ms=120)
    try:
        async with aiohttp.ClientSession() as http:
            started = time.monotonic()
            body = {"model": "m", "messages": MESSAGES}
            async with http.post(f"{slow.url}/v1/chat/completions", json=body) as response:
                assert response.status == 200
                # The model's own time, as OpenAI reports it: the wait and the work, not the network.
                processing_ms = float(response.headers["openai-processing-ms"])
            elapsed = time.monotonic() - started
            assert 120 <= processing_ms <= elapsed * 1000
            async with http.post(f"{slow.url}/v1/chat/completions", json={**body, "stream": True}) as response:
                await response.read()
                assert "openai-processing-ms" not in response.headers  # a stream's headers precede the work
    finally:
        await runner.cleanup()


# --- observability ----------------------------------------------------------


async def test_client_leaving_mid_stream_is_recorded(mock, http):
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "mock": {"delay_ms": 100}}
    response = await http.post(f"{mock.url}/v1/chat/completions", json=body)
    await response.content.readline()  # the role chunk is out: the stream is under way
    response.close()
    assert await mock.state.wait_for_disconnect(1.0)
    assert mock.state.disconnects == 1


async def test_client_leaving_is_recorded_when_aiohttp_cancels_the_handler(aiohttp_server, http):
    # aiohttp's test server runs with handler_cancellation=True, as run_mock_upstream does.
    app = create_mock_app()
    server = await aiohttp_server(app)
    stall = {"stall_after": {"chunks": 0, "ms": 10_000}}
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "mock": stall}
    response = await http.post(str(server.make_url("/v1/chat/completions")), json=body)
    await response.content.readline()
    response.close()
    assert await app[MOCK_STATE].wait_for_disconnect(1.0)


async def test_client_leaving_during_a_stall_is_recorded(mock, http):
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True, "mock": {"stall_before_ms": 10_000}}
    with pytest.raises(asyncio.TimeoutError):
        await http.post(f"{mock.url}/v1/chat/completions", json=body, timeout=aiohttp.ClientTimeout(total=0.1))
    assert await mock.state.wait_for_disconnect(1.0)


async def test_sdk_closing_a_stream_is_recorded(client, mock):
    stream = await client.chat.completions.create(
        model="gpt-4o",
        messages=MESSAGES,
        stream=True,
        extra_body={"mock": {"stall_after": {"chunks": 1, "ms": 10_000}}},
    )
    async for chunk in stream:
        if chunk.choices[0].delta.content:
            break
    await stream.close()
    assert await mock.state.wait_for_disconnect(1.0)


async def test_wait_for_disconnect_times_out(mock):
    assert not await mock.state.wait_for_disconnect(0.05)  # returns False rather than raising


async def test_requests_are_recorded_with_their_headers(client, mock, http):
    await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, extra_body={"mock": {"reply": "hi"}})
    recorded = mock.state.requests[-1]
    assert recorded["method"] == "POST" and recorded["path"] == "/v1/chat/completions"
    assert recorded["headers"]["Authorization"] == "Bearer x"
    assert recorded["body"]["mock"] == {"reply": "hi"} and recorded["body"]["messages"] == MESSAGES

    async with http.get(f"{mock.url}/mock/requests") as response:
        served = await response.json()
    assert served["requests"][-1]["body"] == recorded["body"]
    assert served["disconnects"] == 0

    mock.state.reset()
    assert not mock.state.requests


async def test_run_mock_upstream_serves_until_cancelled():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    server = asyncio.create_task(run_mock_upstream("127.0.0.1", port, 0.0))
    try:
        async with aiohttp.ClientSession() as http:
            for _ in range(100):
                try:
                    async with http.get(f"http://127.0.0.1:{port}/v1/models") as response:
                        assert response.status == 200
                        break
                except aiohttp.ClientConnectionError:
                    await asyncio.sleep(0.02)
            else:
                pytest.fail("the mock never started listening")
    finally:
        server.cancel()
        with pytest.raises(asyncio.CancelledError):
            await server


def test_the_gateway_never_imports_the_mock():
    # `sluice serve` loads proxy.cli and the server; the mock and the demo stay out of that process.
    code = (
        "import sys, proxy.cli, proxy.app; "
        "loaded = sorted(m for m in sys.modules if m.startswith('proxy.devtools')); "
        "print(loaded); sys.exit(1 if loaded else 0)"
    )
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
