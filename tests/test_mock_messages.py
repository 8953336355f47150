"""The mock's Anthropic Messages API (POST /v1/messages), read by the real anthropic SDK and in raw bytes."""

from __future__ import annotations

import json

import aiohttp
import anthropic
import httpx2
import pytest

from proxy import tokens

MODEL = "claude-sonnet-4-5"
TEXT = "The quick brown fox jumps over the lazy dog."
LONG = " ".join(f"word{i}" for i in range(60))
MESSAGES = [{"role": "user", "content": TEXT}]
HEADERS = {"x-api-key": "sk-ant-mock", "anthropic-version": "2023-06-01"}


@pytest.fixture
async def client(mock_upstream):
    base = mock_upstream.url.removesuffix("/v1")  # the SDK adds /v1/messages itself
    http_client = anthropic.DefaultAsyncHttpxClient(verify=False)
    async with anthropic.AsyncAnthropic(
        base_url=base, api_key="sk-ant-mock", max_retries=0, http_client=http_client
    ) as sdk:
        yield sdk


async def post(mock_upstream, body: dict, headers: dict | None = None) -> tuple[int, bytes]:
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{mock_upstream.url}/messages", json=body, headers=HEADERS if headers is None else headers) as response:
            return response.status, await response.read()


async def raw_events(mock_upstream, body: dict) -> list[tuple[str, dict]]:
    """(event line, data) of every SSE frame, checking the framing on the way."""
    status, raw = await post(mock_upstream, {**body, "stream": True})
    assert status == 200
    text = raw.decode()
    assert text.endswith("\n\n")
    frames = []
    for block in text.split("\n\n")[:-1]:
        event_line, data_line = block.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: ")
        frames.append((event_line.removeprefix("event: "), json.loads(data_line.removeprefix("data: "))))
    return frames


def body(**fields) -> dict:
    return {"model": MODEL, "max_tokens": 1024, "messages": MESSAGES, **fields}


async def test_a_whole_message_echoes_the_last_user_turn_with_true_usage(client, mock_upstream):
    message = await client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES, system="Be terse.")
    assert message.type == "message" and message.role == "assistant" and message.id.startswith("msg_mock_")
    assert [block.type for block in message.content] == ["text"] and message.content[0].text == TEXT
    assert message.stop_reason == "end_turn"
    counted = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": TEXT}]
    assert message.usage.input_tokens == tokens.count_chat_prompt(MODEL, counted)
    assert message.usage.output_tokens == tokens.count_text(MODEL, TEXT)
    assert message.usage.cache_read_input_tokens == 0 and message.usage.cache_creation_input_tokens == 0
    seen = mock_upstream.state.requests[-1]
    assert seen["path"] == "/v1/messages" and seen["headers"]["anthropic-version"]


async def test_system_blocks_and_content_blocks(client):
    system = [{"type": "text", "text": "Be "}, {"type": "text", "text": "terse."}]
    messages = [
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "weather", "input": {"city": "Paris"}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "Sunny, 21 C"}]},
    ]
    message = await client.messages.create(model=MODEL, max_tokens=100, system=system, messages=messages)
    assert message.content[0].text == "Sunny, 21 C"  # a turn of tool results echoes the results
    counted = [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is the weather?"},
        {"role": "assistant", "content": 'weather{"city": "Paris"}'},
        {"role": "user", "content": "Sunny, 21 C"},
    ]
    assert message.usage.input_tokens == tokens.count_chat_prompt(MODEL, counted)
    blocks = [{"role": "user", "content": [{"type": "text", "text": "hello "}, {"type": "text", "text": "blocks"}]}]
    assert (await client.messages.create(model=MODEL, max_tokens=100, messages=blocks)).content[0].text == "hello blocks"


async def test_a_stream_has_every_event_in_order(client, mock_upstream):
    frames = await raw_events(mock_upstream, body())
    assert all(name == data["type"] for name, data in frames)
    words = len(TEXT.split())
    assert [name for name, _ in frames] == [
        "message_start", "ping", "content_block_start", *["content_block_delta"] * words,
        "content_block_stop", "message_delta", "message_stop",
    ]
    start = frames[0][1]["message"]
    assert start["content"] == [] and start["stop_reason"] is None
    assert start["usage"]["input_tokens"] == tokens.count_chat_prompt(MODEL, MESSAGES)
    assert "".join(d["delta"]["text"] for n, d in frames if n == "content_block_delta") == TEXT
    delta = frames[-2][1]
    assert delta["delta"]["stop_reason"] == "end_turn"
    assert delta["usage"]["output_tokens"] == tokens.count_text(MODEL, TEXT)  # cumulative: the whole answer
    assert start["usage"]["output_tokens"] <= delta["usage"]["output_tokens"]

    stream = await client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES, stream=True)
    events = [event async for event in stream]  # the SDK drops ping
    assert [e.type for e in events] == [n for n, _ in frames if n != "ping"]


async def test_the_stream_helper_gives_text_and_the_final_message(client):
    async with client.messages.stream(model=MODEL, max_tokens=1024, messages=MESSAGES) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == TEXT and len(pieces) == len(TEXT.split())
    assert final.content[0].text == TEXT and final.stop_reason == "end_turn"
    assert final.usage.output_tokens == tokens.count_text(MODEL, TEXT)


async def test_thinking_comes_first_with_a_signature(client, mock_upstream):
    steer = {"mock": {"thinking": "Compare the fox and the dog."}}
    whole = await client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES, extra_body=steer)
    assert [b.type for b in whole.content] == ["thinking", "text"]
    assert whole.content[0].thinking == "Compare the fox and the dog." and whole.content[0].signature
    thought = tokens.count_text(MODEL, "Compare the fox and the dog.")
    assert whole.usage.output_tokens == thought + tokens.count_text(MODEL, TEXT)

    frames = await raw_events(mock_upstream, body(**steer))
    deltas = [d["delta"] for n, d in frames if n == "content_block_delta"]
    thinking = [d["thinking"] for d in deltas if d["type"] == "thinking_delta"]
    assert "".join(thinking) == "Compare the fox and the dog."
    signatures = [d["signature"] for d in deltas if d["type"] == "signature_delta"]
    assert signatures == [whole.content[0].signature]
    assert [d["index"] for n, d in frames if n == "content_block_stop"] == [0, 1]

    async with client.messages.stream(model=MODEL, max_tokens=1024, messages=MESSAGES, extra_body=steer) as stream:
        assert "".join([t async for t in stream.text_stream]) == TEXT
        final = await stream.get_final_message()
    assert final.content[0].thinking == "Compare the fox and the dog." and final.content[0].signature == signatures[0]


async def test_tool_use_streams_its_input_json(client, mock_upstream):
    arguments = '{"city": "Paris", "unit": "celsius"}'
    steer = {"mock": {"tool_call": {"name": "get_weather", "arguments": arguments}, "chunk_chars": 4}}
    whole = await client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES, extra_body=steer)
    [block] = whole.content
    assert block.type == "tool_use" and block.name == "get_weather" and block.input == json.loads(arguments)
    assert block.id.startswith("toolu_mock_") and whole.stop_reason == "tool_use"

    frames = await raw_events(mock_upstream, body(**steer))
    assert frames[2][1]["content_block"] == {"type": "tool_use", "id": frames[2][1]["content_block"]["id"],
                                             "name": "get_weather", "input": {}}
    partial = [d["delta"]["partial_json"] for n, d in frames if n == "content_block_delta"]
    assert len(partial) > 2 and "".join(partial) == arguments

    async with client.messages.stream(model=MODEL, max_tokens=1024, messages=MESSAGES, extra_body=steer) as stream:
        final = await stream.get_final_message()
    assert final.content[0].input == json.loads(arguments) and final.stop_reason == "tool_use"


async def test_max_tokens_cuts_with_stop_reason_max_tokens(client, mock_upstream):
    encoding = tokens.encoding_for_model(MODEL)
    cut = encoding.decode(encoding.encode(LONG)[:7])
    long_messages = [{"role": "user", "content": LONG}]
    whole = await client.messages.create(model=MODEL, max_tokens=7, messages=long_messages)
    assert whole.stop_reason == "max_tokens" and whole.content[0].text == cut and whole.usage.output_tokens == 7

    async with client.messages.stream(model=MODEL, max_tokens=7, messages=long_messages) as stream:
        assert "".join([t async for t in stream.text_stream]) == cut
        final = await stream.get_final_message()
    assert final.stop_reason == "max_tokens" and final.usage.output_tokens == 7

    # A tool call that does not fit is left out whole.
    steer = {"mock": {"tool_call": {"name": "f", "arguments": json.dumps({"text": LONG})}}}
    dropped = await client.messages.create(model=MODEL, max_tokens=7, messages=MESSAGES, extra_body=steer)
    assert dropped.content == [] and dropped.stop_reason == "max_tokens" and dropped.usage.output_tokens == 0


async def test_an_error_event_mid_stream_raises_the_sdks_exception(client, mock_upstream):
    steer = {"mock": {"error_after": 2}}
    frames = await raw_events(mock_upstream, body(**steer))
    assert frames[-1] == ("error", {"type": "error", "error": {"type": "overloaded_error", "message": "Overloaded"}})
    assert sum(n == "content_block_delta" for n, _ in frames) == 2

    received = []
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with client.messages.stream(model=MODEL, max_tokens=1024, messages=MESSAGES, extra_body=steer) as stream:
            async for text in stream.text_stream:
                received.append(text)
    assert "".join(received) == "The quick " and caught.value.body["error"]["type"] == "overloaded_error"

    with pytest.raises(anthropic.OverloadedError):  # not streamed: the API's 529
        await client.messages.create(model=MODEL, max_tokens=1024, messages=MESSAGES, extra_body=steer)


async def test_drop_after_cuts_the_connection(client):
    # This SDK lets the transport's own error out of a stream that breaks mid-body.
    with pytest.raises((anthropic.APIConnectionError, httpx2.RemoteProtocolError)):
        async with client.messages.stream(
            model=MODEL, max_tokens=1024, messages=MESSAGES, extra_body={"mock": {"drop_after": 1}}
        ) as stream:
            async for _ in stream.text_stream:
                pass


@pytest.mark.parametrize(
    "status, error, kind",
    [
        (400, anthropic.BadRequestError, "invalid_request_error"),
        (401, anthropic.AuthenticationError, "authentication_error"),
        (403, anthropic.PermissionDeniedError, "permission_error"),
        (404, anthropic.NotFoundError, "not_found_error"),
        (429, anthropic.RateLimitError, "rate_limit_error"),
        (500, anthropic.InternalServerError, "api_error"),
        (529, anthropic.OverloadedError, "overloaded_error"),
    ],
)
async def test_status_answers_in_anthropics_error_shape(client, status, error, kind):
    with pytest.raises(error) as caught:
        await client.messages.create(
            model=MODEL, max_tokens=10, messages=MESSAGES, stream=True, extra_body={"mock": {"status": status}}
        )
    assert caught.value.status_code == status
    assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == kind


async def test_the_key_and_anthropic_version_are_required_and_recorded(mock_upstream):
    status, raw = await post(mock_upstream, body(), headers={"anthropic-version": "2023-06-01"})
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"
    status, raw = await post(mock_upstream, body(), headers={"x-api-key": "k"})
    assert status == 400 and json.loads(raw) == {
        "type": "error", "error": {"type": "invalid_request_error", "message": "anthropic-version: header is required"}
    }
    beta = {**HEADERS, "anthropic-beta": "interleaved-thinking-2025-05-14"}
    status, _ = await post(mock_upstream, body(), headers=beta)
    assert status == 200
    seen = mock_upstream.state.requests[-1]["headers"]
    assert seen["x-api-key"] == "sk-ant-mock" and seen["anthropic-beta"] == "interleaved-thinking-2025-05-14"
    assert "Authorization" not in seen


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"max_tokens": None}, "max_tokens"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"messages": []}, "messages"),
        ({"messages": [{"role": "system", "content": "x"}]}, "messages.0.role"),
        ({"system": 5}, "system"),
        ({"model": ""}, "model"),
        ({"stream": "yes"}, "stream"),
        ({"mock": {"usage": False}}, "mock.usage"),
        ({"mock": {"reasoning": "x"}}, "mock.reasoning"),  # that is /v1/responses' name for it
        ({"mock": {"tool_call": {"name": "f", "arguments": "[1]"}}}, "mock.tool_call.arguments"),
    ],
)
async def test_bad_requests_are_anthropic_shaped_400s(mock_upstream, fields, words):
    request = {key: value for key, value in body(**fields).items() if value is not None}
    status, raw = await post(mock_upstream, request)
    error = json.loads(raw)
    assert status == 400 and error["type"] == "error" and error["error"]["type"] == "invalid_request_error"
    assert error["error"]["message"].startswith(words)


async def test_not_json_is_an_anthropic_shaped_400(mock_upstream):
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{mock_upstream.url}/messages", data=b"{nope", headers=HEADERS) as response:
            assert response.status == 400
            assert (await response.json())["error"]["type"] == "invalid_request_error"


async def test_cached_tokens_are_read_from_the_cache(client):
    whole = await client.messages.create(
        model=MODEL, max_tokens=100, messages=MESSAGES, extra_body={"mock": {"cached_tokens": 4}}
    )
    assert whole.usage.cache_read_input_tokens == 4
    assert whole.usage.input_tokens == tokens.count_chat_prompt(MODEL, MESSAGES) - 4
