"""Failover between upstreams that serve one model, and the circuit breaker."""

from __future__ import annotations

import asyncio

import aiohttp
import openai
import pytest
from aiohttp import web

from conftest import ALICE, free_port, gateway_config, start_mock
from proxy.circuit import CircuitBreaker, CircuitState


def test_circuit_breaker_states():
    breaker = CircuitBreaker(failure_threshold=2, cooldown_seconds=10)
    assert breaker.allows(0)
    breaker.record_failure(0)
    assert breaker.allows(1) and breaker.state is CircuitState.CLOSED
    breaker.record_failure(1)
    assert breaker.state is CircuitState.OPEN and not breaker.allows(5)
    assert breaker.allows(11) and breaker.state is CircuitState.HALF_OPEN  # one trial after the cool-down
    breaker.record_failure(11)
    assert not breaker.allows(12)  # the trial failed: another cool-down
    assert breaker.allows(21)
    breaker.record_success()
    assert breaker.state is CircuitState.CLOSED and breaker.allows(21)


@pytest.fixture
async def failing_upstream():
    """An upstream that answers every request with a 503 of its own."""
    hits = []

    async def fail(request):
        hits.append(request.path)
        return web.json_response({"error": {"message": "overloaded", "type": "server_error", "param": None, "code": None}}, status=503)

    app = web.Application()
    app.router.add_post("/v1/{tail:.*}", fail)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    yield f"http://127.0.0.1:{port}/v1", hits
    await runner.cleanup()


def two_upstreams(first_url, second_url, **first):
    config = gateway_config(second_url)
    backup = config["upstreams"][0]
    primary = {**backup, "name": "primary", "base_url": first_url, **first}
    config["upstreams"] = [primary, {**backup, "name": "backup"}]
    return config


async def metric(gw, line_start):
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            text = await resp.text()
    return [line for line in text.splitlines() if line.startswith(line_start)]


def chat(**extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "fail over"}], **extra}


async def test_a_connect_error_fails_over_to_the_next_upstream(mock_upstream, start_gateway):
    gw = await start_gateway(two_upstreams(f"http://127.0.0.1:{free_port()}/v1", mock_upstream.url))
    api = openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
    answer = await api.chat.completions.create(**chat())
    assert answer.choices[0].message.content == "fail over"
    stream = await api.chat.completions.create(**chat(), stream=True)
    assert "".join([c.choices[0].delta.content or "" async for c in stream if c.choices]) == "fail over"
    assert await metric(gw, 'sluice_upstream_retries_total{upstream="primary"}') == [
        'sluice_upstream_retries_total{upstream="primary"} 2.0'
    ]


async def test_a_5xx_before_the_first_byte_fails_over(failing_upstream, mock_upstream, start_gateway):
    url, hits = failing_upstream
    gw = await start_gateway(two_upstreams(url, mock_upstream.url))
    api = openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
    answer = await api.chat.completions.create(**chat())
    assert answer.choices[0].message.content == "fail over"
    assert hits == ["/v1/chat/completions"]


async def test_the_last_upstreams_5xx_passes_through(failing_upstream, start_gateway):
    url, hits = failing_upstream
    gw = await start_gateway(two_upstreams(url, url))
    with pytest.raises(openai.InternalServerError) as caught:
        await openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0).chat.completions.create(**chat())
    assert caught.value.status_code == 503 and caught.value.message.endswith("overloaded")
    assert len(hits) == 2  # bounded: max_upstream_attempts is 2


async def test_no_retry_after_the_first_byte(mock_upstream, start_gateway):
    runner, second = await start_mock()
    try:
        gw = await start_gateway(two_upstreams(mock_upstream.url, second.url))
        async with aiohttp.ClientSession() as session:
            async with session.post(
                gw.v1 + "/chat/completions", json=chat(stream=True, mock={"drop_after": 1}),
                headers={"Authorization": f"Bearer {ALICE}"},
            ) as resp:
                raw = (await resp.read()).decode()
        assert '"code":"upstream_error"' in raw.replace(" ", "")
        assert list(second.state.requests) == []
    finally:
        await runner.cleanup()


async def test_an_open_circuit_skips_the_failing_upstream(mock_upstream, start_gateway):
    gw = await start_gateway(
        two_upstreams(f"http://127.0.0.1:{free_port()}/v1", mock_upstream.url, circuit_failures=2, circuit_cooldown_seconds=0.5)
    )
    api = openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
    for _ in range(4):
        await api.chat.completions.create(**chat())
    # Two failures opened the circuit; the next two requests went straight to the backup.
    assert await metric(gw, 'sluice_upstream_retries_total{upstream="primary"}') == [
        'sluice_upstream_retries_total{upstream="primary"} 2.0'
    ]
    assert await metric(gw, 'sluice_upstream_circuit_open{upstream="primary"}') == [
        'sluice_upstream_circuit_open{upstream="primary"} 1.0'
    ]
    await asyncio.sleep(0.6)
    await api.chat.completions.create(**chat())  # the cool-down is over: one trial, which fails over again
    assert await metric(gw, 'sluice_upstream_retries_total{upstream="primary"}') == [
        'sluice_upstream_retries_total{upstream="primary"} 3.0'
    ]


async def test_every_circuit_open_fails_fast(start_gateway):
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = gateway_config(dead)
    config["upstreams"][0].update(circuit_failures=1, circuit_cooldown_seconds=60)
    gw = await start_gateway(config)
    api = openai.AsyncOpenAI(base_url=gw.v1, api_key=ALICE, max_retries=0)
    with pytest.raises(openai.InternalServerError):
        await api.chat.completions.create(**chat())
    with pytest.raises(openai.InternalServerError) as caught:
        await api.chat.completions.create(**chat())
    assert caught.value.status_code == 502 and "failing" in caught.value.message
