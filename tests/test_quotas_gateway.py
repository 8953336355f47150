"""Quotas through the gateway: 429s the SDK understands, clamping, headers, store outages."""

from __future__ import annotations

import asyncio
import json
import time

import aiohttp
import openai
import pytest
from hypothesis import assume, given
from hypothesis import strategies as st

from conftest import ALICE, gateway_config
from proxy.upstream_body import with_leading_members
from proxy.tokens import count_chat_prompt, count_text


def client(gw, key=ALICE):
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0)


def chat(text="hello", **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


def limited(mock_url, team_limits=None, key_limits=None, **accounting):
    config = gateway_config(mock_url)
    if team_limits:
        config["teams"][0]["limits"] = team_limits
    if key_limits:
        config["keys"][0]["limits"] = key_limits
    config["accounting"] = {"store": "memory", **accounting}
    return config


async def test_requests_per_minute_gives_429_with_retry_headers(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url, team_limits={"requests_per_minute": 2}))
    api = client(gw)
    first = await api.chat.completions.with_raw_response.create(**chat())
    assert first.headers["x-ratelimit-limit-requests"] == "2"
    assert first.headers["x-ratelimit-remaining-requests"] == "1"
    assert first.headers["x-ratelimit-reset-requests"].endswith("s")
    await api.chat.completions.create(**chat())
    with pytest.raises(openai.RateLimitError) as caught:
        await api.chat.completions.create(**chat())
    assert caught.value.code == "rate_limit_exceeded"
    headers = caught.value.response.headers
    assert 1 <= int(headers["retry-after"]) <= 60
    assert int(headers["retry-after-ms"]) > 0
    assert headers["x-ratelimit-remaining-requests"] == "0"
    assert len(mock_upstream.state.requests) == 2  # the refused request never went upstream


async def test_daily_budget_is_insufficient_quota_and_not_retryable(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url, key_limits={"tokens_per_day": 40}))
    await client(gw).chat.completions.create(**chat("a few words here", max_tokens=5))
    with pytest.raises(openai.RateLimitError) as caught:
        await client(gw).chat.completions.create(**chat("x " * 60, max_tokens=5))
    assert caught.value.code == "insufficient_quota"
    assert caught.value.response.headers["x-should-retry"] == "false"


async def test_max_tokens_is_clamped_to_what_is_left(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url, team_limits={"tokens_per_day": 100}))
    answer = await client(gw).chat.completions.with_raw_response.create(**chat("hi"))
    sent = mock_upstream.state.requests[-1]["body"]
    # The prompt costs a handful of tokens; the default 4096 does not fit, so the answer is capped.
    assert 1 <= sent["max_tokens"] < 100
    assert int(answer.headers["x-ratelimit-limit-tokens"]) == 100
    await client(gw).chat.completions.create(**chat("hi", max_completion_tokens=3))
    sent = mock_upstream.state.requests[-1]["body"]
    assert sent["max_completion_tokens"] == 3 and "max_tokens" not in sent


async def test_no_token_limit_leaves_the_request_untouched(gateway, mock_upstream):
    await client(gateway).chat.completions.create(**chat("hi"))
    assert "max_tokens" not in mock_upstream.state.requests[-1]["body"]


async def test_concurrency_limit(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url, key_limits={"max_concurrent_requests": 1}))
    api = client(gw)
    slow = asyncio.create_task(api.chat.completions.create(**chat("slow"), extra_body={"mock": {"stall_before_ms": 500}}))
    await asyncio.sleep(0.2)
    with pytest.raises(openai.RateLimitError):
        await api.chat.completions.create(**chat())
    await slow
    await asyncio.sleep(0.05)  # the settle of the slow request runs in the background
    await api.chat.completions.create(**chat())  # the slot was released


async def test_streamed_usage_settles_against_the_budget(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url, team_limits={"tokens_per_minute": 10_000}))
    stream = await client(gw).chat.completions.create(**chat("one two three"), stream=True)
    async for _ in stream:
        pass
    await asyncio.sleep(0.05)
    answer = await client(gw).chat.completions.with_raw_response.create(**chat("x", max_tokens=1))
    remaining = int(answer.headers["x-ratelimit-remaining-tokens"])
    # Settled to the real usage (prompt + 3 answer tokens), not the 4096 reserved.
    assert 10_000 - 60 < remaining < 10_000


async def test_recorded_usage_equals_the_upstream_usage(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url))
    api = client(gw)
    whole = await api.chat.completions.create(**chat("count these words"))
    stream = await api.chat.completions.create(
        **chat("and these streamed words"), stream=True, stream_options={"include_usage": True}
    )
    streamed = [c.usage async for c in stream if c.usage][0]
    # No usage from upstream: the gateway counts with tiktoken, as the mock would have.
    stream = await api.chat.completions.create(**chat("no usage here"), stream=True, extra_body={"mock": {"usage": False}})
    async for _ in stream:
        pass
    messages = [{"role": "user", "content": "no usage here"}]
    fallback_prompt = count_chat_prompt("gpt-4o-mini", messages)
    fallback_completion = count_text("gpt-4o-mini", "no usage here")
    await gw.server.gateway.quotas.drain()
    report = (await gw.server.gateway.quotas.store.usage(now=time.time())).to_dict("day")
    totals = report["keys"]["alice"]
    assert totals["requests"] == 3
    assert totals["prompt_tokens"] == whole.usage.prompt_tokens + streamed.prompt_tokens + fallback_prompt
    assert totals["completion_tokens"] == whole.usage.completion_tokens + streamed.completion_tokens + fallback_completion


async def test_store_down_rejects_or_allows(mock_upstream, start_gateway, redis_server_factory):
    redis = redis_server_factory()
    closed = await start_gateway(limited(mock_upstream.url, team_limits={"requests_per_minute": 100}, store="redis", redis_url=redis.url))
    opened = await start_gateway(
        limited(mock_upstream.url, team_limits={"requests_per_minute": 100}, store="redis", redis_url=redis.url, on_store_error="allow")
    )
    await client(closed).chat.completions.create(**chat())
    redis.stop()
    with pytest.raises(openai.InternalServerError) as caught:
        await client(closed).chat.completions.create(**chat())
    assert caught.value.status_code == 503 and caught.value.code == "store_unavailable"
    await client(opened).chat.completions.create(**chat())  # fail open
    async with aiohttp.ClientSession() as session:
        async with session.get(opened.url + "/metrics") as resp:
            assert 'sluice_store_errors_total{operation="reserve",store="redis"} 1.0' in await resp.text()
    async with aiohttp.ClientSession() as session:
        async with session.get(closed.url + "/readyz") as resp:
            assert resp.status == 503
    redis.start()
    await client(closed).chat.completions.create(**chat())  # recovered by itself
    async with aiohttp.ClientSession() as session:
        async with session.get(closed.url + "/readyz") as resp:
            assert resp.status == 200


async def test_a_settle_the_store_refused_is_retried_once_it_is_back(mock_upstream, start_gateway, redis_server_factory):
    import redis as redis_py

    redis = redis_server_factory()
    gw = await start_gateway(limited(mock_upstream.url, team_limits={"requests_per_minute": 100}, store="redis", redis_url=redis.url))
    quotas = gw.server.gateway.quotas
    # The stream stays open past the pause, so its settle comes while Redis takes no writes.
    stream = await client(gw).chat.completions.create(
        **chat("settled later"), stream=True, extra_body={"mock": {"stall_after": {"chunks": 1, "ms": 300}}}
    )
    with redis_py.Redis.from_url(redis.url) as admin:
        admin.execute_command("CLIENT", "PAUSE", 6000, "WRITE")  # Redis keeps its data but takes no writes
    async for _ in stream:
        pass
    await quotas.drain()  # the settle timed out and now waits
    assert quotas.pending_settles == 1
    await assert_settled_once_back(quotas, "settled later", within_seconds=15)


async def assert_settled_once_back(quotas, answer: str, within_seconds: float) -> None:
    """The waiting settle goes through once the store is back, and the ledger has the request."""
    for _ in range(int(within_seconds * 10)):
        if quotas.pending_settles == 0:
            break
        await asyncio.sleep(0.1)
    assert quotas.pending_settles == 0
    report = (await quotas.store.usage(now=time.time())).to_dict("day")
    assert report["keys"]["alice"]["requests"] == 1
    assert report["keys"]["alice"]["completion_tokens"] == count_text("gpt-4o-mini", answer)


async def test_a_settle_the_sqlite_file_refused_is_written_once_it_is_free(mock_upstream, start_gateway, tmp_path, monkeypatch):
    import sqlite3

    from proxy.accounting import sqlite_ops

    monkeypatch.setattr(sqlite_ops, "BUSY_TIMEOUT_MS", 50)  # fail fast while another process holds the file
    path = str(tmp_path / "sluice.db")
    gw = await start_gateway(limited(mock_upstream.url, team_limits={"tokens_per_day": 10_000}, store="sqlite", sqlite_path=path))
    quotas = gw.server.gateway.quotas
    # Admitted first (a reserve needs the file too), then the file is taken while the stream runs.
    stream = await client(gw).chat.completions.create(
        **chat("written later"), stream=True, extra_body={"mock": {"stall_after": {"chunks": 1, "ms": 300}}}
    )
    blocker = sqlite3.connect(path, isolation_level=None)
    blocker.execute("BEGIN EXCLUSIVE")
    try:
        async for _ in stream:
            pass
        await quotas.drain()
        assert quotas.pending_settles == 1
    finally:
        blocker.execute("ROLLBACK")
        blocker.close()
    await assert_settled_once_back(quotas, "written later", within_seconds=5)


# -- the cap goes upstream in the client's own bytes ---------------------------

# Spacing, a raw "é" and a decimal Python would shorten: re-encoding the payload would change each.
CLIENT_BYTES = '{ "model" : "gpt-4o-mini",\n  "messages": [{"role": "user", "content": "café"}], "top_p": 0.10000000000000001 }'


async def post_raw(gw, body: bytes) -> int:
    headers = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", data=body, headers=headers) as resp:
            await resp.read()
            return resp.status


async def test_the_cap_is_written_in_front_of_the_clients_own_bytes(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url, team_limits={"tokens_per_day": 1000}))
    assert await post_raw(gw, CLIENT_BYTES.encode()) == 200
    sent = mock_upstream.state.requests[-1]
    assert sent["raw"] == '{"max_tokens":%d,' % sent["body"]["max_tokens"] + CLIENT_BYTES[1:]

    streamed = CLIENT_BYTES.replace('"model"', '"stream": true, "model"')
    assert await post_raw(gw, streamed.encode()) == 200
    sent = mock_upstream.state.requests[-1]
    cap = sent["body"]["max_tokens"]
    assert sent["raw"] == '{"max_tokens":%d,"stream_options":{"include_usage":true},' % cap + streamed[1:]


async def test_a_cap_on_a_field_the_client_sent_replaces_it(mock_upstream, start_gateway):
    gw = await start_gateway(limited(mock_upstream.url, team_limits={"tokens_per_day": 1000}))
    assert await post_raw(gw, CLIENT_BYTES.replace('"model"', '"max_tokens": 5000, "model"').encode()) == 200
    sent = mock_upstream.state.requests[-1]
    assert sent["body"]["max_tokens"] < 1000 and sent["raw"].count('"max_tokens"') == 1
    assert sent["body"]["messages"][0]["content"] == "café"


json_scalars = st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False, allow_infinity=False) | st.text()
json_values = st.recursive(
    json_scalars, lambda inner: st.lists(inner, max_size=3) | st.dictionaries(st.text(), inner, max_size=3), max_leaves=6
)


@given(
    document=st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=4),
    members=st.dictionaries(st.text(max_size=8), json_values, min_size=1, max_size=3),
    indent=st.none() | st.integers(0, 2),
    ensure_ascii=st.booleans(),
    leading=st.sampled_from(["", " ", "\n\t \r"]),
)
def test_leading_members_join_any_spelling_of_the_object(document, members, indent, ensure_ascii, leading):
    members = {name: value for name, value in members.items() if name not in document}
    assume(members)
    body = (leading + json.dumps(document, indent=indent, ensure_ascii=ensure_ascii)).encode("utf-8", "surrogatepass")
    assert json.loads(with_leading_members(body, members)) == {**document, **members}
    # Bytes the splice cannot read are left to a full re-encoding.
    assert with_leading_members(body.decode("utf-8", "surrogatepass").encode("utf-16", "surrogatepass"), members) is None
    assert with_leading_members(b"\xef\xbb\xbf" + body, members) is None
