"""Hot reload: a new config for new requests, the old one for streams in flight, counters kept."""

from __future__ import annotations

import asyncio
import json
import signal

import aiohttp
import openai
import pytest
import yaml

from conftest import ADMIN, ALICE, BOB, free_port, gateway_config
from processes import GatewayProcess


def api(gw, key=ALICE):
    return openai.AsyncOpenAI(base_url=gw.v1, api_key=key, max_retries=0)


def chat(text="hello"):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}]}


async def reload(gw, config, key=ADMIN):
    gw.server.gateway.config_path.write_text(yaml.safe_dump(config))
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.url + "/admin/reload", headers={"Authorization": f"Bearer {key}"}) as resp:
            return resp.status, await resp.json()


async def test_reload_changes_keys_and_limits_for_new_requests(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["teams"][0]["limits"] = {"requests_per_minute": 2}
    gw = await start_gateway(config)
    await api(gw).chat.completions.create(**chat())
    await api(gw).chat.completions.create(**chat())

    config["teams"][0]["limits"] = {"requests_per_minute": 3}
    config["keys"] = [k for k in config["keys"] if k["id"] != "bob"]
    status, answer = await reload(gw, config)
    assert (status, answer) == (200, {"status": "reloaded"})
    await api(gw).chat.completions.create(**chat())  # the raised limit: one more, not three more
    with pytest.raises(openai.RateLimitError):
        await api(gw).chat.completions.create(**chat())
    with pytest.raises(openai.AuthenticationError):
        await api(gw, BOB).chat.completions.create(**chat())


async def test_an_invalid_config_is_refused_and_the_old_one_stays(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    gw = await start_gateway(config)
    broken = json.loads(json.dumps(config))
    broken["teams"][0]["limits"] = {"tokens_per_day": "lots"}
    broken["keys"][0]["team"] = "nobody"
    status, answer = await reload(gw, broken)
    assert status == 400 and answer["error"]["code"] == "invalid_config"
    assert "teams[0].limits.tokens_per_day" in answer["error"]["message"]
    await api(gw).chat.completions.create(**chat())  # still served by the old config

    moved = json.loads(json.dumps(config))
    moved["accounting"] = {"store": "sqlite", "sqlite_path": "elsewhere.db"}
    status, answer = await reload(gw, moved)
    assert status == 400 and "accounting.store" in answer["error"]["message"]


async def test_reload_needs_the_admin_key(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    gw = await start_gateway(config)
    status, answer = await reload(gw, config, key=ALICE)
    assert status == 401


async def test_streams_in_flight_finish_on_the_old_config(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    gw = await start_gateway(config)
    words = "alpha beta gamma delta epsilon zeta eta theta"
    stream = await api(gw).chat.completions.create(
        **chat(words), stream=True, extra_body={"mock": {"delay_ms": 60}}
    )
    received = []
    async for chunk in stream:
        received.extend(c.delta.content or "" for c in chunk.choices)
        if "".join(received).startswith("alpha"):
            break
    config["moderation"] = {"rules": [{"name": "greek", "type": "terms", "terms": ["theta"], "action": "block"}]}
    config["upstreams"][0]["models"] = ["gpt-4o-mini"]
    status, _ = await reload(gw, config)
    assert status == 200
    async for chunk in stream:
        received.extend(c.delta.content or "" for c in chunk.choices)
    assert "".join(received) == words  # the old config had no rule: nothing blocked mid-flight
    with pytest.raises(openai.BadRequestError):  # a new request meets the new rule
        await api(gw).chat.completions.create(**chat("say theta"))
    with pytest.raises(openai.NotFoundError):  # and the new routes
        await api(gw).chat.completions.create(**{**chat(), "model": "gpt-4.1"})


async def test_sighup_reloads_the_config_file(mock_upstream, tmp_path):
    config = gateway_config(mock_upstream.url)
    config["keys"] = [k for k in config["keys"] if k["id"] != "bob"]
    async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
        async with aiohttp.ClientSession() as session:
            async def status_for(key):
                async with session.post(gateway.url + "/v1/chat/completions", json=chat(), headers={"Authorization": f"Bearer {key}"}) as resp:
                    return resp.status

            assert await status_for(BOB) == 401
            full = gateway_config(mock_upstream.url)
            full["server"]["port"] = gateway.port
            gateway.path.write_text(yaml.safe_dump(full))
            gateway.process.send_signal(signal.SIGHUP)
            for _ in range(100):
                if await status_for(BOB) == 200:
                    break
                await asyncio.sleep(0.05)
            assert await status_for(BOB) == 200


async def test_metrics_port_keeps_metrics_off_the_public_port(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["server"]["metrics_port"] = free_port()
    gw = await start_gateway(config)
    await api(gw).chat.completions.create(**chat())
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            assert resp.status == 404
        async with session.get(f"http://127.0.0.1:{gw.server.metrics_port}/metrics") as resp:
            assert resp.status == 200
            assert 'sluice_requests_total{' in await resp.text()
