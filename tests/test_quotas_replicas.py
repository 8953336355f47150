"""Limits that hold across gateway processes: two replicas on one Redis or on one SQLite file, restarts on SQLite."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import sys

import aiohttp

from conftest import ADMIN, ALICE, BOB, UPSTREAM_KEY, gateway_config
from processes import ROOT, GatewayProcess


def chat(text="hi", **extra):
    return {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": text}], **extra}


async def fire(session, url, n, key=ALICE, body=None):
    async def one():
        async with session.post(url + "/v1/chat/completions", json=body or chat(), headers={"Authorization": f"Bearer {key}"}) as resp:
            await resp.read()
            return resp.status

    return await asyncio.gather(*(one() for _ in range(n)))


async def test_two_replicas_on_one_redis_hold_one_request_limit(mock_upstream, redis_url, tmp_path):
    config = gateway_config(mock_upstream.url)
    config["teams"][0]["limits"] = {"requests_per_minute": 50}
    config["accounting"] = {"store": "redis", "redis_url": redis_url}
    async with GatewayProcess(config, tmp_path / "a.yaml") as a, GatewayProcess(config, tmp_path / "b.yaml") as b:
        connector = aiohttp.TCPConnector(limit=400)
        async with aiohttp.ClientSession(connector=connector) as session:
            statuses = [s for batch in await asyncio.gather(fire(session, a.url, 100), fire(session, b.url, 100)) for s in batch]
    # A minute boundary in the middle of the burst would open a new window; the burst takes well under a second.
    assert statuses.count(200) == 50, statuses
    assert statuses.count(429) == 150


async def test_two_replicas_never_admit_past_a_token_limit(mock_upstream, redis_url, tmp_path):
    config = gateway_config(mock_upstream.url)
    config["teams"][0]["limits"] = {"tokens_per_minute": 2000}
    config["accounting"] = {"store": "redis", "redis_url": redis_url}
    body = chat("tokens please", max_tokens=50)
    async with GatewayProcess(config, tmp_path / "a.yaml") as a, GatewayProcess(config, tmp_path / "b.yaml") as b:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as session:
            await asyncio.gather(fire(session, a.url, 60, body=body), fire(session, b.url, 60, body=body))
            await asyncio.sleep(0.2)
            async with session.get(a.url + "/admin/usage?period=day", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
                report = await resp.json()
    used = report["teams"]["research"]
    assert 0 < used["total_tokens"] <= 2000
    assert mock_upstream.state.requests and len(mock_upstream.state.requests) == used["requests"]


async def test_two_gateways_on_one_sqlite_file_hold_one_request_limit(mock_upstream, tmp_path):
    config = gateway_config(mock_upstream.url)
    config["teams"][0]["limits"] = {"requests_per_minute": 20}
    config["accounting"] = {"store": "sqlite", "sqlite_path": str(tmp_path / "shared.db")}
    async with GatewayProcess(config, tmp_path / "a.yaml") as a, GatewayProcess(config, tmp_path / "b.yaml") as b:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as session:
            statuses = [s for batch in await asyncio.gather(fire(session, a.url, 30), fire(session, b.url, 30)) for s in batch]
    assert statuses.count(200) == 20, statuses
    assert statuses.count(429) == 40


async def test_two_gateways_on_one_sqlite_file_never_admit_past_a_token_limit(mock_upstream, tmp_path):
    config = gateway_config(mock_upstream.url)
    config["teams"][0]["limits"] = {"tokens_per_minute": 2000}
    config["accounting"] = {"store": "sqlite", "sqlite_path": str(tmp_path / "shared.db")}
    body = chat("tokens please", max_tokens=50)
    async with GatewayProcess(config, tmp_path / "a.yaml") as a, GatewayProcess(config, tmp_path / "b.yaml") as b:
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=400)) as session:
            await asyncio.gather(fire(session, a.url, 60, body=body), fire(session, b.url, 60, body=body))
            await asyncio.sleep(0.2)
            async with session.get(b.url + "/admin/usage?period=day", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
                report = await resp.json()
    used = report["teams"]["research"]
    assert 0 < used["total_tokens"] <= 2000
    assert len(mock_upstream.state.requests) == used["requests"]


async def test_sqlite_day_budget_survives_a_restart_and_a_kill(mock_upstream, tmp_path):
    config = gateway_config(mock_upstream.url)
    config["keys"][0]["limits"] = {"tokens_per_day": 100_000}
    config["accounting"] = {"store": "sqlite", "sqlite_path": str(tmp_path / "sluice.db")}
    headers = {"Authorization": f"Bearer {ALICE}"}
    async with aiohttp.ClientSession() as session:
        gateway = GatewayProcess(config, tmp_path / "a.yaml")
        async with gateway:
            await fire(session, gateway.url, 3)
            async with session.post(gateway.url + "/v1/chat/completions", json=chat(max_tokens=1), headers=headers) as resp:
                before = int(resp.headers["x-ratelimit-remaining-tokens"])
            await asyncio.sleep(0.2)  # the settle is written
            await gateway.stop(signal.SIGKILL)
        async with GatewayProcess(config, tmp_path / "a.yaml") as again:
            async with session.post(again.url + "/v1/chat/completions", json=chat(max_tokens=1), headers=headers) as resp:
                after = int(resp.headers["x-ratelimit-remaining-tokens"])
    assert after < before < 100_000  # what was used before the kill is still used


async def test_admin_usage_and_the_usage_command(mock_upstream, tmp_path):
    config = gateway_config(mock_upstream.url)
    config["accounting"] = {"store": "sqlite", "sqlite_path": str(tmp_path / "ledger.db")}
    async with aiohttp.ClientSession() as session:
        async with GatewayProcess(config, tmp_path / "a.yaml") as gateway:
            await fire(session, gateway.url, 2)
            await fire(session, gateway.url, 1, key=BOB)
            await asyncio.sleep(0.2)
            url = gateway.url + "/admin/usage"
            async with session.get(url, headers={"Authorization": f"Bearer {ALICE}"}) as resp:
                assert resp.status == 401  # a client key is not the admin key
            async with session.get(url + "?team=research&period=month", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
                assert resp.status == 200
                month = await resp.json()
            assert month["teams"]["research"]["requests"] == 2
            assert set(month["keys"]) == {"alice"}
    usage = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "usage", "--config", str(tmp_path / "a.yaml"), "--json",
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
        env={**os.environ, "SLUICE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
    )
    out, err = await usage.communicate()
    assert usage.returncode == 0, err.decode()
    report = json.loads(out)
    assert report["keys"]["alice"]["day"]["requests"] == 2
    assert report["keys"]["bob"]["day"]["requests"] == 1
    table = await asyncio.create_subprocess_exec(
        sys.executable, "-m", "proxy", "usage", "--config", str(tmp_path / "a.yaml"), "--team", "interns",
        stdout=asyncio.subprocess.PIPE, cwd=ROOT, env={**os.environ, "SLUICE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
    )
    text = (await table.communicate())[0].decode()
    assert "interns" in text and "bob" in text and "alice" not in text
