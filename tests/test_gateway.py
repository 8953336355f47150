"""The gateway end to end: the openai SDK -> Sluice -> the mock model, all on loopback."""

from __future__ import annotations

import asyncio
import json

import aiohttp
import openai
import pytest

from conftest import ALICE, BOB, UPSTREAM_KEY, gateway_config


def client(gw, key=ALICE):
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0)


def chat(text, **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def post(gw, path, body, key=ALICE, headers=None):
    """POST with aiohttp; returns (status, headers, parsed JSON or raw text)."""
    all_headers = {"Authorization": f"Bearer {key}"} if key else {}
    all_headers.update(headers or {})
    async with aiohttp.ClientSession() as session:
        data = body if isinstance(body, (bytes, str)) else json.dumps(body)
        async with session.post(gw.v1 + path, data=data, headers=all_headers) as resp:
            text = await resp.text()
            try:
                parsed = json.loads(text)
            except ValueError:
                parsed = text
            return resp.status, resp.headers, parsed


async def stream_raw(gw, body, key=ALICE):
    """Stream with aiohttp and return (status, headers, the raw SSE text)."""
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=body, headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status, resp.headers, (await resp.read()).decode()


def sse_payloads(raw):
    return [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]


# -- the happy paths ------------------------------------------------------------


async def test_non_streamed_chat_through_the_openai_sdk(gateway, mock_upstream):
    answer = await client(gateway).chat.completions.with_raw_response.create(**chat("Hello there, gateway"))
    completion = answer.parse()
    assert completion.choices[0].message.content == "Hello there, gateway"
    assert completion.usage.prompt_tokens > 0 and completion.usage.completion_tokens > 0
    assert answer.headers["x-request-id"]
    assert float(answer.headers["x-sluice-overhead-ms"]) >= 0


async def test_streamed_chat_through_the_openai_sdk(gateway):
    stream = await client(gateway).chat.completions.create(**chat("one two three four five"), stream=True)
    pieces, usages, finish = [], [], None
    async for chunk in stream:
        if chunk.usage:
            usages.append(chunk.usage)
        for choice in chunk.choices:
            pieces.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    assert "".join(pieces) == "one two three four five"
    assert len([p for p in pieces if p]) >= 5  # streamed word by word, not buffered
    assert finish == "stop"
    assert usages == []  # the gateway asked upstream for usage, but the client did not


async def test_stream_usage_chunk_reaches_a_client_that_asked(gateway, mock_upstream):
    stream = await client(gateway).chat.completions.create(
        **chat("count me"), stream=True, stream_options={"include_usage": True}
    )
    usages = [chunk.usage async for chunk in stream if chunk.usage]
    assert len(usages) == 1 and usages[0].completion_tokens == 2


async def test_stream_headers_and_sse_framing(gateway):
    status, headers, raw = await stream_raw(gateway, chat("hi you", stream=True))
    assert status == 200
    assert headers["Content-Type"].startswith("text/event-stream")
    assert headers["Cache-Control"] == "no-cache"
    assert headers["x-request-id"]
    assert raw.endswith("data: [DONE]\n\n")
    chunks = [json.loads(p) for p in sse_payloads(raw) if p != "[DONE]"]
    assert {c["id"] for c in chunks} == {chunks[0]["id"]}  # id, created and model kept
    assert chunks[0]["choices"][0]["delta"]["role"] == "assistant"


async def test_completions_embeddings_and_models(gateway):
    api = client(gateway)
    completion = await api.completions.create(model="gpt-3.5-turbo", prompt="legacy prompt")
    assert completion.choices[0].text == "legacy prompt"
    streamed = await api.completions.create(model="gpt-3.5-turbo", prompt="legacy streamed prompt", stream=True)
    assert "".join([c.choices[0].text async for c in streamed if c.choices]) == "legacy streamed prompt"
    embedding = await api.embeddings.create(model="text-embedding-3-small", input=["a", "b"])
    assert len(embedding.data) == 2 and embedding.data[0].embedding
    models = {m.id async for m in api.models.list()}
    assert "gpt-4.1" in models and "gpt-3.5-turbo" in models
    bob_models = {m.id async for m in client(gateway, BOB).models.list()}
    assert bob_models == set()  # interns may use gpt-4o-mini, which the config names only by glob


async def test_models_lists_only_what_the_team_may_use(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["upstreams"][0]["models"] = ["gpt-4o-mini", "gpt-4.1", "mock-*"]
    gw = await start_gateway(config)
    assert {m.id async for m in client(gw, BOB).models.list()} == {"gpt-4o-mini"}
    assert {m.id async for m in client(gw).models.list()} == {"gpt-4o-mini", "gpt-4.1"}


# -- keys, routing, headers ---------------------------------------------------


async def test_client_key_never_goes_upstream_and_upstream_key_does(gateway, mock_upstream):
    await client(gateway).chat.completions.create(**chat("secret handling"))
    await (await client(gateway).chat.completions.create(**chat("streamed"), stream=True)).close()
    await client(gateway).embeddings.create(model="text-embedding-3-small", input="x")
    seen = [r["headers"] for r in mock_upstream.state.requests]
    assert len(seen) == 3
    for headers in seen:
        lowered = {k.lower(): v for k, v in headers.items()}
        assert lowered["authorization"] == f"Bearer {UPSTREAM_KEY}"
        assert ALICE not in json.dumps(headers)


async def test_first_matching_upstream_wins(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    # A dead upstream listed second must never be used for models the first one serves.
    config["upstreams"].append({**config["upstreams"][0], "name": "dead", "base_url": "http://127.0.0.1:9/v1", "models": ["*"]})
    gw = await start_gateway(config)
    status, _, body = await post(gw, "/chat/completions", chat("routed"))
    assert status == 200
    status, _, body = await post(gw, "/chat/completions", {**chat("x"), "model": "claude-3"})
    assert status == 502  # claude-3 only matches the dead upstream's "*"


async def test_hop_by_hop_and_unlisted_headers_are_dropped_both_ways(gateway, mock_upstream):
    headers = {
        "Connection": "keep-alive, x-secret-hop",
        "x-secret-hop": "1",
        "Proxy-Authorization": "Basic abc",
        "TE": "trailers",
        "Cookie": "session=1",
        "OpenAI-Beta": "assistants=v2",
    }
    status, response_headers, _ = await post(gateway, "/chat/completions", chat("headers"), headers=headers)
    assert status == 200
    seen = {k.lower(): v for k, v in mock_upstream.state.requests[-1]["headers"].items()}
    for name in ("x-secret-hop", "proxy-authorization", "te", "cookie"):
        assert name not in seen
    assert seen["openai-beta"] == "assistants=v2"
    assert "Set-Cookie" not in response_headers


async def test_the_models_own_time_comes_back_to_the_client(gateway):
    status, headers, _ = await post(gateway, "/chat/completions", chat("timed"))
    assert status == 200
    # The upstream's openai-processing-ms is on the allow-list of response headers.
    assert float(headers["openai-processing-ms"]) >= 0


async def test_request_id_is_echoed_when_valid_and_replaced_when_not(gateway):
    _, headers, _ = await post(gateway, "/chat/completions", chat("id"), headers={"x-request-id": "abc.DEF-123_x"})
    assert headers["x-request-id"] == "abc.DEF-123_x"
    _, headers, _ = await post(gateway, "/chat/completions", chat("id"), headers={"x-request-id": "bad id\u00e9"})
    assert headers["x-request-id"] != "bad id" and len(headers["x-request-id"]) == 32
    async with aiohttp.ClientSession() as session:
        for url in (gateway.url + "/healthz", gateway.url + "/nope"):
            async with session.get(url, headers={"x-request-id": "probe-1"}) as resp:
                assert resp.headers["x-request-id"] == "probe-1"


async def test_health_and_readiness(gateway):
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.url + "/healthz") as resp:
            assert resp.status == 200
        async with session.get(gateway.url + "/readyz") as resp:
            assert resp.status == 200


# -- the error table ----------------------------------------------------------


def assert_openai_error(status, body, expected_status, code, param=None):
    assert status == expected_status, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["code"] == code
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param


@pytest.mark.parametrize(
    "body, param",
    [
        (b"{not json", None),
        (b"[1, 2]", None),
        (b"", None),
        (b"\xff\xfe", None),
        ({"messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-4o-mini"}, "messages"),
        ({"model": 42, "messages": [{"role": "user", "content": "x"}]}, "model"),
        ({"model": "gpt-4o-mini", "messages": "hi"}, "messages"),
        ({"model": "gpt-4o-mini", "messages": [{"content": "x"}]}, "messages[0].role"),
        (chat("x", stream="yes"), "stream"),
        (chat("x", max_tokens=0), "max_tokens"),
        (chat("x", max_tokens=True), "max_tokens"),
        (chat("x", max_completion_tokens="10"), "max_completion_tokens"),
        (chat("x", n=0), "n"),
        (chat("x", stream_options=[]), "stream_options"),
    ],
)
async def test_invalid_requests_are_400_naming_the_field(gateway, mock_upstream, body, param):
    status, _, error = await post(gateway, "/chat/completions", body)
    assert_openai_error(status, error, 400, "invalid_request", param)
    assert list(mock_upstream.state.requests) == []


async def test_unknown_fields_pass_through_untouched(gateway, mock_upstream):
    body = chat("x", temperature=0.3, seed=7, response_format={"type": "text"}, user="u-1")
    status, _, _ = await post(gateway, "/chat/completions", body)
    assert status == 200
    sent = mock_upstream.state.requests[-1]["body"]
    assert sent["temperature"] == 0.3 and sent["seed"] == 7 and sent["response_format"] == {"type": "text"}


async def test_body_over_max_body_bytes_is_413(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["server"]["max_body_bytes"] = 1000
    gw = await start_gateway(config)
    status, _, error = await post(gw, "/chat/completions", chat("x" * 2000))
    assert_openai_error(status, error, 413, "request_too_large")

    async def chunked():
        for _ in range(5):
            yield b" " * 400  # no Content-Length: the limit holds on a chunked body too

    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", data=chunked(), headers={"Authorization": f"Bearer {ALICE}"}) as resp:
            assert resp.status == 413


async def test_missing_and_unknown_keys_are_401_through_the_sdk(gateway):
    status, _, error = await post(gateway, "/chat/completions", chat("x"), key=None)
    assert_openai_error(status, error, 401, "invalid_api_key")
    with pytest.raises(openai.AuthenticationError) as caught:
        await client(gateway, "sk-not-a-key").chat.completions.create(**chat("x"))
    assert caught.value.code == "invalid_api_key"
    assert "sk-not-a-key" not in str(caught.value)


async def test_model_not_allowed_is_403(gateway):
    with pytest.raises(openai.PermissionDeniedError) as caught:
        await client(gateway, BOB).chat.completions.create(**{**chat("x"), "model": "gpt-4.1"})
    assert caught.value.code == "model_not_allowed"


async def test_no_upstream_for_the_model_is_404(gateway):
    with pytest.raises(openai.NotFoundError) as caught:
        await client(gateway).chat.completions.create(**{**chat("x"), "model": "llama-unknown"})
    assert caught.value.code == "model_not_found"


async def test_upstream_unreachable_is_502(start_gateway):
    from conftest import free_port

    gw = await start_gateway(gateway_config(f"http://127.0.0.1:{free_port()}/v1"))
    for stream in (False, True):
        status, _, error = await post(gw, "/chat/completions", chat("x", stream=stream))
        assert_openai_error(status, error, 502, "upstream_error")


async def test_upstream_silent_before_first_byte_is_504(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["upstreams"][0]["read_timeout_seconds"] = 0.3
    gw = await start_gateway(config)
    for stream in (False, True):
        status, _, error = await post(gw, "/chat/completions", chat("x", stream=stream, mock={"stall_before_ms": 1500}))
        assert_openai_error(status, error, 504, "upstream_timeout")


@pytest.mark.parametrize("status", [400, 429, 500, 503])
async def test_upstream_errors_pass_through_untouched(gateway, status):
    for stream in (False, True):
        got, headers, body = await post(gateway, "/chat/completions", chat("x", stream=stream, mock={"status": status}))
        assert got == status
        assert body["error"]["message"]  # the upstream's own body, as it sent it
        assert headers["x-request-id"]


async def test_unknown_route_and_method_are_openai_shaped(gateway):
    async with aiohttp.ClientSession() as session:
        async with session.get(gateway.v1 + "/chat/completions") as resp:
            assert resp.status == 405
            assert (await resp.json())["error"]["code"] == "method_not_allowed"
        async with session.get(gateway.v1 + "/nothing") as resp:
            assert resp.status == 404
            assert (await resp.json())["error"]["code"] == "not_found"


# -- streams that go wrong ----------------------------------------------------


async def test_keepalive_comment_during_upstream_silence(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["server"]["keepalive_seconds"] = 0.1
    gw = await start_gateway(config)
    status, _, raw = await stream_raw(gw, chat("a b c", stream=True, mock={"stall_after": {"chunks": 1, "ms": 450}}))
    assert status == 200
    # One comment per silent 0.1 s: it repeats through the stall, and never floods the client.
    assert 2 <= raw.count(": keep-alive\n\n") <= 6
    assert raw.endswith("data: [DONE]\n\n")
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(json.loads, sse_payloads(raw)[:-1])
        if c["choices"]
    )
    assert text == "a b c"


async def test_keepalives_go_out_until_the_read_timeout_ends_the_stream(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["server"]["keepalive_seconds"] = 0.1
    config["upstreams"][0]["read_timeout_seconds"] = 0.45
    gw = await start_gateway(config)
    # Chunks 40 ms apart, each its own read, then a stall far past the read timeout: once
    # a stream runs, only the gateway's own silence timer can notice it (not aiohttp's).
    body = chat("a b c d e", stream=True, mock={"delay_ms": 40, "stall_after": {"chunks": 3, "ms": 5000}})
    started = asyncio.get_running_loop().time()
    status, _, raw = await stream_raw(gw, body)
    elapsed = asyncio.get_running_loop().time() - started
    assert status == 200
    assert 2 <= raw.count(": keep-alive\n\n") <= 6  # keep-alives do not reset the read timeout
    ending = json.loads(sse_payloads(raw)[-1])
    assert ending["error"]["code"] == "upstream_timeout"
    text = "".join(
        c["choices"][0]["delta"].get("content") or ""
        for c in map(json.loads, sse_payloads(raw)[:-1])
        if c.get("choices")
    )
    assert text == "a b c "
    assert elapsed < 3  # the timeout, not the end of the stall


async def test_upstream_silent_after_first_byte_ends_with_an_error_event(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["upstreams"][0]["read_timeout_seconds"] = 0.3
    gw = await start_gateway(config)
    status, _, raw = await stream_raw(gw, chat("a b c d", stream=True, mock={"stall_after": {"chunks": 2, "ms": 2000}}))
    assert status == 200
    payloads = sse_payloads(raw)
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["error"]["code"] == "upstream_timeout"
    delivered = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1])
    assert delivered == "a b "


async def test_upstream_dies_mid_stream(gateway):
    status, _, raw = await stream_raw(gateway, chat("one two three four five", stream=True, mock={"drop_after": 2}))
    assert status == 200
    payloads = sse_payloads(raw)
    assert "[DONE]" not in payloads
    assert json.loads(payloads[-1])["error"]["code"] == "upstream_error"
    delivered = "".join(json.loads(p)["choices"][0]["delta"].get("content") or "" for p in payloads[:-1])
    assert delivered == "one two "


async def test_the_sdk_sees_a_mid_stream_error_as_an_error(gateway):
    stream = await client(gateway).chat.completions.create(
        **chat("a b c d"), stream=True, extra_body={"mock": {"drop_after": 1}}
    )
    with pytest.raises(openai.APIError):
        async for _ in stream:
            pass


@pytest.mark.parametrize(
    "raw_events",
    [
        ["data: {not json}\n\n"],
        ['data: {"id": "x", "choices": [{"index": 0, "delta": {"content": "partial"}}]}\n\n'],  # no [DONE], unfinished
    ],
)
async def test_malformed_upstream_streams_end_with_an_error_event(gateway, raw_events):
    status, _, raw = await stream_raw(gateway, chat("x", stream=True, mock={"raw": raw_events}))
    assert status == 200
    last = json.loads(sse_payloads(raw)[-1])
    assert last["error"]["code"] == "upstream_error"


async def test_event_over_max_event_bytes_ends_the_stream(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["server"]["max_event_bytes"] = 2000
    gw = await start_gateway(config)
    big = json.dumps({"id": "x", "choices": [{"index": 0, "delta": {"content": "y" * 5000}}]})
    status, _, raw = await stream_raw(gw, chat("x", stream=True, mock={"raw": [f"data: {big}\n\n", "data: [DONE]\n\n"]}))
    assert json.loads(sse_payloads(raw)[-1])["error"]["code"] == "upstream_error"
    assert "y" * 5000 not in raw


async def test_client_disconnect_cancels_the_upstream_within_a_second(mock_upstream, start_gateway):
    gw = await start_gateway(gateway_config(mock_upstream.url))
    words = " ".join(f"w{i}" for i in range(200))
    async with aiohttp.ClientSession() as session:
        resp = await session.post(
            gw.v1 + "/chat/completions",
            json=chat(words, stream=True, mock={"delay_ms": 50}),
            headers={"Authorization": f"Bearer {ALICE}"},
        )
        await resp.content.readany()  # the stream has started
        resp.close()  # the client goes away mid-stream
    assert await mock_upstream.state.wait_for_disconnect(timeout=1.0)
    status, _, _ = await post(gw, "/chat/completions", chat("still serving"))
    assert status == 200
    await asyncio.sleep(0.05)
    assert gw.server.gateway.inflight == 0
