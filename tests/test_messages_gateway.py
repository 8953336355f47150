"""``POST /v1/messages`` through the real path: the anthropic SDK -> Sluice -> the mock's Messages API.

What each test proves is in its name; the raw-byte tests read the SSE frames
as they left the gateway, so a redacted or blocked span cannot hide in a
frame the SDK would have skipped.
"""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import anthropic
import pytest

from conftest import ALICE, BOB, UPSTREAM_KEY, free_port, gateway_config
from proxy.tokens import count_chat_prompt, count_text

MODEL = "claude-sonnet-4-5"
VERSION = "2023-06-01"
RULES = {
    "rules": [
        {"name": "banned", "type": "terms", "terms": ["bad word"], "action": "block"},
        {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
    ]
}
SECRET_REPLY = "Write to bob@example.com today, then a bad word and more text after it."
BEFORE_BLOCK = "Write to [REDACTED:email] today, then a "


def config(mock_url, moderation=True, anthropic_url=None, **sections):
    cfg = gateway_config(mock_url, **sections)
    cfg["upstreams"].append(
        {
            "name": "claude",
            "api": "anthropic",
            "base_url": anthropic_url or mock_url,
            "api_key_env": "SLUICE_TEST_UPSTREAM_KEY",
            "models": ["claude-*"],
            "connect_timeout_seconds": 2,
            "read_timeout_seconds": 1,
        }
    )
    if moderation:
        cfg["moderation"] = RULES
    return cfg


_CLIENTS: list[anthropic.AsyncAnthropic] = []


def sdk(gw, key=ALICE, **options):
    client = anthropic.AsyncAnthropic(base_url=gw.url, api_key=key, max_retries=0, **options)
    _CLIENTS.append(client)
    return client


@pytest.fixture(autouse=True)
async def _close_clients():
    yield
    while _CLIENTS:
        await _CLIENTS.pop().close()


def user(text):
    return [{"role": "user", "content": text}]


async def post(gw, body, headers=None):
    headers = {"x-api-key": ALICE, "anthropic-version": VERSION} if headers is None else headers
    async with aiohttp.ClientSession() as http:
        async with http.post(f"{gw.url}/v1/messages", json=body, headers=headers) as response:
            return response.status, response.headers, await response.read()


def frames(raw: bytes) -> list[tuple[str, dict]]:
    assert raw.endswith(b"\n\n")
    out = []
    for chunk in raw.decode().split("\n\n")[:-1]:
        event_line, data_line = chunk.split("\n")
        assert event_line.startswith("event: ") and data_line.startswith("data: "), chunk
        out.append((event_line[7:], json.loads(data_line[6:])))
        assert out[-1][1]["type"] == out[-1][0]
    return out


async def usage_of(gw, key="alice"):
    await gw.server.gateway.quotas.drain()
    report = (await gw.server.gateway.quotas.store.usage(now=time.time())).to_dict("day")
    return report["keys"][key]


@pytest.fixture
async def gw(mock_upstream, start_gateway):
    return await start_gateway(config(mock_upstream.url))


# -- answers ------------------------------------------------------------------


async def test_whole_streamed_and_helper_answers_read_by_the_sdk(gw):
    client = sdk(gw)
    text = "The quick brown fox jumps over the lazy dog."
    whole = await client.messages.create(model=MODEL, max_tokens=200, messages=user(text))
    assert whole.content[0].text == text and whole.stop_reason == "end_turn"
    events = [event async for event in await client.messages.create(model=MODEL, max_tokens=200, messages=user(text), stream=True)]
    assert [e.type for e in events][0] == "message_start" and events[-1].type == "message_stop"
    assert "".join(e.delta.text for e in events if e.type == "content_block_delta") == text
    async with client.messages.stream(model=MODEL, max_tokens=200, messages=user(text)) as stream:
        pieces = [piece async for piece in stream.text_stream]
        final = await stream.get_final_message()
    assert len(pieces) > 3 and "".join(pieces) == text
    assert final.content[0].text == text and final.usage.output_tokens == whole.usage.output_tokens


@pytest.mark.parametrize("size", [1, 3, 7])
async def test_redaction_and_block_mid_stream_in_the_raw_bytes(gw, mock_upstream, size):
    body = {"model": MODEL, "max_tokens": 300, "messages": user("x"), "stream": True,
            "mock": {"reply": SECRET_REPLY, "chunk_chars": size, "delay_ms": 20}}
    status, headers, raw = await post(gw, body)
    assert status == 200 and headers["content-type"].startswith("text/event-stream")
    events = frames(raw)
    for secret in (b"bob@", b"example.com", b"bad", b"more text"):
        assert secret not in raw
    text = "".join(d["delta"]["text"] for n, d in events if n == "content_block_delta")
    assert text == BEFORE_BLOCK
    assert [n for n, _ in events][-3:] == ["content_block_stop", "message_delta", "message_stop"]
    assert events[-2][1]["delta"]["stop_reason"] == "refusal"
    assert await mock_upstream.state.wait_for_disconnect()  # the upstream was hung up on at once


async def test_a_block_read_by_the_sdk_helper(gw):
    async with sdk(gw).messages.stream(model=MODEL, max_tokens=300, messages=user("x"),
                                       extra_body={"mock": {"reply": SECRET_REPLY, "chunk_chars": 3}}) as stream:
        text = "".join([piece async for piece in stream.text_stream])
        final = await stream.get_final_message()
    assert text == BEFORE_BLOCK and final.stop_reason == "refusal"


async def test_a_whole_answer_is_cut_the_same_way(gw):
    answer = await sdk(gw).messages.create(model=MODEL, max_tokens=300, messages=user("x"), extra_body={"mock": {"reply": SECRET_REPLY}})
    assert [b.text for b in answer.content] == [BEFORE_BLOCK] and answer.stop_reason == "refusal"


@pytest.mark.parametrize("stream", [False, True])
async def test_tool_use_and_thinking_blocks_are_moderated(gw, stream):
    arguments = json.dumps({"to": "bob@example.com", "subject": "hello"})
    mock = {"thinking": "I should mail bob@example.com now.", "tool_call": {"name": "send", "arguments": arguments}, "chunk_chars": 3}
    tools = [{"name": "send", "description": "Send a mail", "input_schema": {"type": "object"}}]
    client = sdk(gw)
    if stream:
        async with client.messages.stream(model=MODEL, max_tokens=300, messages=user("x"), tools=tools, extra_body={"mock": mock}) as s:
            final = await s.get_final_message()
    else:
        final = await client.messages.create(model=MODEL, max_tokens=300, messages=user("x"), tools=tools, extra_body={"mock": mock})
    thinking, tool = final.content
    assert thinking.type == "thinking" and thinking.thinking == "I should mail [REDACTED:email] now."
    assert thinking.signature  # passed untouched
    assert tool.type == "tool_use" and tool.input == {"to": "[REDACTED:email]", "subject": "hello"}
    assert final.stop_reason == "tool_use"


# -- the prompt ---------------------------------------------------------------


@pytest.mark.parametrize(
    "fields",
    [
        {"system": "never say bad word"},
        {"system": [{"type": "text", "text": "a bad word"}]},
        {"messages": user([{"type": "text", "text": "say bad word"}])},
        {"messages": [
            {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "w", "input": {}}]},
            {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [{"type": "text", "text": "bad word"}]}]},
        ]},
        {"tools": [{"name": "w", "description": "returns a bad word", "input_schema": {"type": "object"}}]},
    ],
)
async def test_a_blocked_prompt_is_a_bad_request_naming_the_rule(gw, mock_upstream, fields):
    request = {"model": MODEL, "max_tokens": 50, "messages": user("hi"), **fields}
    with pytest.raises(anthropic.BadRequestError) as caught:
        await sdk(gw).messages.create(**request)
    assert caught.value.body["type"] == "error"
    assert caught.value.body["error"]["type"] == "invalid_request_error" and "banned" in caught.value.body["error"]["message"]
    assert mock_upstream.state.requests == []


async def test_prompt_redactions_reach_the_upstream_redacted(gw, mock_upstream):
    messages = [
        {"role": "user", "content": "mail bob@example.com"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "send", "input": {"to": ["bob@example.com"]}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": "sent to bob@example.com"}]},
    ]
    await sdk(gw).messages.create(model=MODEL, max_tokens=50, system="from ann@example.org", messages=messages)
    seen = mock_upstream.state.requests[-1]
    assert "example" not in seen["raw"]
    assert seen["body"]["system"] == "from [REDACTED:email]"
    assert seen["body"]["messages"][1]["content"][0]["input"] == {"to": ["[REDACTED:email]"]}


# -- keys and headers ---------------------------------------------------------


async def test_the_key_as_bearer_or_x_api_key_and_what_goes_upstream(gw, mock_upstream):
    await sdk(gw, default_headers={"anthropic-beta": "tools-2024-04-04"}).messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    status, _, _ = await post(gw, {"model": MODEL, "max_tokens": 20, "messages": user("hi")},
                              {"x-api-key": ALICE, "anthropic-version": VERSION, "anthropic-beta": "b2"})
    assert status == 200
    bearer, x_api_key = mock_upstream.state.requests[-2:]
    for seen in (bearer, x_api_key):
        headers = {name.lower(): value for name, value in seen["headers"].items()}
        assert seen["path"] == "/v1/messages"
        assert headers["x-api-key"] == UPSTREAM_KEY and "authorization" not in headers
        assert not any(ALICE in value for value in headers.values())
    assert {k.lower(): v for k, v in bearer["headers"].items()}["anthropic-beta"] == "tools-2024-04-04"
    assert {k.lower(): v for k, v in x_api_key["headers"].items()}["anthropic-version"] == VERSION
    assert {k.lower(): v for k, v in x_api_key["headers"].items()}["anthropic-beta"] == "b2"


# -- errors -------------------------------------------------------------------


async def test_gateway_errors_are_the_sdks_exception_classes(gw):
    request = {"model": MODEL, "max_tokens": 20, "messages": user("hi")}
    cases = [
        (sdk(gw, key="sk-wrong-key"), request, anthropic.AuthenticationError, "authentication_error"),
        (sdk(gw, key=BOB), request, anthropic.PermissionDeniedError, "permission_error"),
        (sdk(gw), {**request, "model": "nobody-serves-this"}, anthropic.NotFoundError, "not_found_error"),
        (sdk(gw), {**request, "model": "gpt-4o-mini"}, anthropic.BadRequestError, "invalid_request_error"),
        (sdk(gw), {**request, "max_tokens": 0}, anthropic.BadRequestError, "invalid_request_error"),
    ]
    for client, body, error_class, error_type in cases:
        with pytest.raises(error_class) as caught:
            await client.messages.create(**body)
        assert caught.value.body["type"] == "error" and caught.value.body["error"]["type"] == error_type
        assert "sk-" not in caught.value.body["error"]["message"]
    status, _, raw = await post(gw, {"model": MODEL, "messages": user("hi")})
    assert status == 400 and json.loads(raw)["error"]["type"] == "invalid_request_error" and b"max_tokens" in raw
    status, _, raw = await post(gw, {"model": MODEL, "max_tokens": 5, "messages": user("hi")}, {"anthropic-version": VERSION})
    assert status == 401 and json.loads(raw)["error"]["type"] == "authentication_error"


async def test_a_claude_model_on_an_openai_endpoint_is_a_400(gw, mock_upstream):
    import openai

    async with openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0) as client:
        with pytest.raises(openai.BadRequestError) as caught:
            await client.chat.completions.create(model=MODEL, messages=user("hi"))
    assert caught.value.body["param"] == "model" and MODEL in caught.value.body["message"]
    assert mock_upstream.state.requests == []


async def test_a_body_too_large_is_anthropics_request_too_large(mock_upstream, start_gateway):
    cfg = config(mock_upstream.url)
    cfg["server"]["max_body_bytes"] = 200
    gw = await start_gateway(cfg)
    with pytest.raises(anthropic.APIStatusError) as caught:
        await sdk(gw).messages.create(model=MODEL, max_tokens=5, messages=user("x" * 500))
    assert caught.value.status_code == 413 and caught.value.body["error"]["type"] == "request_too_large"


async def test_limits_are_rate_limit_errors_with_retry_headers(mock_upstream, start_gateway):
    cfg = config(mock_upstream.url)
    cfg["teams"][0]["limits"] = {"requests_per_minute": 1}
    gw = await start_gateway(cfg)
    await sdk(gw).messages.create(model=MODEL, max_tokens=5, messages=user("hi"))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await sdk(gw).messages.create(model=MODEL, max_tokens=5, messages=user("hi"))
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert int(caught.value.response.headers["retry-after"]) >= 1
    cfg = config(mock_upstream.url)
    cfg["keys"][0]["limits"] = {"tokens_per_day": 40}
    gw = await start_gateway(cfg)
    await sdk(gw).messages.create(model=MODEL, max_tokens=5, messages=user("a few words"))
    with pytest.raises(anthropic.RateLimitError) as caught:
        await sdk(gw).messages.create(model=MODEL, max_tokens=5, messages=user("x " * 60))
    assert caught.value.body["error"]["type"] == "rate_limit_error"
    assert caught.value.response.headers["x-should-retry"] == "false"


async def test_upstream_failures_are_api_and_timeout_errors(mock_upstream, start_gateway):
    unreachable = await start_gateway(config(mock_upstream.url, anthropic_url=f"http://127.0.0.1:{free_port()}/v1"))
    with pytest.raises(anthropic.InternalServerError) as caught:
        await sdk(unreachable).messages.create(model=MODEL, max_tokens=5, messages=user("hi"))
    assert caught.value.status_code == 502 and caught.value.body["error"]["type"] == "api_error"
    gw = await start_gateway(config(mock_upstream.url))
    with pytest.raises(anthropic.GatewayTimeoutError) as caught:
        await sdk(gw).messages.create(model=MODEL, max_tokens=5, messages=user("hi"), extra_body={"mock": {"stall_before_ms": 1500}})
    assert caught.value.body["error"]["type"] == "timeout_error"


async def test_the_upstreams_own_errors_pass_through_unchanged(gw):
    own = '{"type":"error","error":{"type":"overloaded_error","message":"Overloaded, upstream wording"}}'
    for stream in (False, True):
        status, _, raw = await post(gw, {"model": MODEL, "max_tokens": 5, "messages": user("hi"), "stream": stream,
                                         "mock": {"status": 529, "raw_body": own}})
        assert status == 529 and raw.decode() == own
    with pytest.raises(anthropic.OverloadedError):
        await sdk(gw).messages.create(model=MODEL, max_tokens=5, messages=user("hi"), extra_body={"mock": {"status": 529}})


async def test_an_upstream_error_event_mid_stream_reaches_the_sdk(gw):
    with pytest.raises(anthropic.APIStatusError) as caught:
        async with sdk(gw).messages.stream(model=MODEL, max_tokens=300, messages=user("one two three four five"),
                                           extra_body={"mock": {"error_after": 2}}) as stream:
            async for _ in stream.text_stream:
                pass
    assert caught.value.body["error"]["type"] == "overloaded_error"


async def test_an_upstream_dying_mid_stream_ends_with_an_api_error_event(gw):
    status, _, raw = await post(gw, {"model": MODEL, "max_tokens": 300, "messages": user("one two three four five"),
                                     "stream": True, "mock": {"drop_after": 2}})
    events = frames(raw)
    assert status == 200 and events[-1][0] == "error" and events[-1][1]["error"]["type"] == "api_error"
    assert "message_stop" not in [n for n, _ in events]


# -- accounting ---------------------------------------------------------------


async def test_the_ledger_holds_the_upstreams_usage_and_counts_what_was_cut(gw):
    client = sdk(gw)
    whole = await client.messages.create(model=MODEL, max_tokens=200, messages=user("count these words"))
    async with client.messages.stream(model=MODEL, max_tokens=200, messages=user("and these streamed words")) as stream:
        streamed = await stream.get_final_message()
    async with client.messages.stream(model=MODEL, max_tokens=300, messages=user("x"),
                                      extra_body={"mock": {"reply": SECRET_REPLY, "chunk_chars": 3}}) as stream:
        blocked = await stream.get_final_message()
    totals = await usage_of(gw)
    assert totals["requests"] == 3
    assert totals["prompt_tokens"] == whole.usage.input_tokens + streamed.usage.input_tokens + blocked.usage.input_tokens
    # The blocked stream never got the upstream's final count: what the upstream had sent, counted.
    counted = blocked.usage.output_tokens  # the gateway's own message_delta
    assert count_text(MODEL, "Write to bob@example.com today, then a") <= counted < count_text(MODEL, SECRET_REPLY)
    assert totals["completion_tokens"] == whole.usage.output_tokens + streamed.usage.output_tokens + counted
    assert whole.usage.input_tokens == count_chat_prompt(MODEL, user("count these words"))


async def test_cache_reads_count_as_prompt_tokens(gw):
    answer = await sdk(gw).messages.create(model=MODEL, max_tokens=50, messages=user("a b c d e f g h"), extra_body={"mock": {"cached_tokens": 4}})
    totals = await usage_of(gw)
    assert answer.usage.cache_read_input_tokens == 4
    assert totals["prompt_tokens"] == answer.usage.input_tokens + 4


async def test_the_budget_clamps_max_tokens_and_the_gateway_holds_the_cap(mock_upstream, start_gateway):
    cfg = config(mock_upstream.url, moderation=False)
    cfg["teams"][0]["limits"] = {"tokens_per_day": 60}
    gw = await start_gateway(cfg)
    reply = " ".join(f"word{i}" for i in range(80))
    async with sdk(gw).messages.stream(model=MODEL, max_tokens=4000, messages=user("hi"),
                                       extra_body={"mock": {"reply": reply, "ignore_cap": True}}) as stream:
        final = await stream.get_final_message()
    sent = mock_upstream.state.requests[-1]["body"]["max_tokens"]
    assert 1 <= sent < 60
    assert final.stop_reason == "max_tokens" and count_text(MODEL, final.content[0].text) == sent
    totals = await usage_of(gw)
    assert totals["completion_tokens"] == sent


async def test_an_abandoned_stream_is_recorded(gw, mock_upstream):
    client = sdk(gw)
    async with client.messages.stream(model=MODEL, max_tokens=300, messages=user("one two three four five six"),
                                      extra_body={"mock": {"delay_ms": 50}}) as stream:
        async for piece in stream.text_stream:
            break
    assert await mock_upstream.state.wait_for_disconnect()
    for _ in range(50):
        totals = await usage_of(gw)
        if totals["requests"]:
            break
        await asyncio.sleep(0.02)
    assert totals["requests"] == 1 and totals["completion_tokens"] >= 1


async def test_metrics_carry_the_messages_endpoint(gw):
    await sdk(gw).messages.create(model=MODEL, max_tokens=20, messages=user("hi"))
    async with aiohttp.ClientSession() as http:
        async with http.get(f"{gw.url}/metrics") as response:
            text = await response.text()
    assert 'endpoint="messages"' in text and f'model="{MODEL}"' in text
