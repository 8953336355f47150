"""Connections that hold the gateway without a key: slowloris, stalled bodies, idle sockets, too many sockets.

Each test runs the gateway in a child process and counts its descriptors in
``/proc/<pid>/fd``: before the header, body and idle timeouts and the
connection cap, every one of these sockets stayed open for aiohttp's
3,630 s, and past the open-file limit no new client was served at all.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time

import aiohttp
import pytest
from conftest import gateway_config
from hostile import AUTH, LimitedGatewayProcess, fd_count, make_room_for_sockets, split_response, timed_get
from processes import GatewayProcess

PARTIAL_HEADERS = b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nX-Slow: "


def _config(upstream_url: str, **server: object) -> dict:
    config = gateway_config(upstream_url)
    config["server"].update(server)
    return config


async def _wait_for(predicate, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        await asyncio.sleep(0.1)
    return predicate()


async def _open(port: int, count: int, first_bytes: bytes) -> list[tuple[asyncio.StreamReader, asyncio.StreamWriter]]:
    async def one() -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
        reader, writer = await asyncio.open_connection("127.0.0.1", port)
        if first_bytes:
            writer.write(first_bytes)
        return reader, writer

    connections = []
    for start in range(0, count, 200):  # in waves, as a real attacker's connects arrive
        connections += await asyncio.gather(*(one() for _ in range(min(200, count - start))))
    return connections


async def test_slowloris_and_idle_sockets_do_not_starve_others_and_are_closed(mock_upstream, tmp_path):
    """2,000 half-sent headers and 300 unused sockets: a new client is served within 1 s; all 2,300 are closed."""
    make_room_for_sockets(2600)
    config = _config(mock_upstream.url, header_timeout_seconds=4, idle_timeout_seconds=4)
    async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
        pid = gateway.process.pid
        baseline = fd_count(pid)
        slow = await _open(gateway.port, 2000, PARTIAL_HEADERS)
        idle = await _open(gateway.port, 300, b"")
        assert await _wait_for(lambda: fd_count(pid) >= baseline + 2290, 3), fd_count(pid)
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=10)) as session:
            waits = [await timed_get(session, gateway.url + "/healthz") for _ in range(5)]
        print(f"2,000 slowloris + 300 idle: /healthz worst {max(waits) * 1000:.0f} ms")
        assert max(waits) < 1.0, waits
        # Past the header and idle timeouts the gateway closes every one of them.
        assert await _wait_for(lambda: fd_count(pid) <= baseline + 10, 15), fd_count(pid) - baseline
        slow_answer = await asyncio.wait_for(slow[0][0].read(), 2)
        idle_answer = await asyncio.wait_for(idle[0][0].read(), 2)
        for _, writer in slow + idle:
            writer.close()
    status, headers, body = split_response(slow_answer)
    assert status == 408 and headers["server"] == "sluice" and headers["connection"] == "close"
    assert json.loads(body)["error"]["code"] == "request_timeout"
    assert idle_answer == b""  # a socket that never sent a byte is closed without an answer


async def test_a_stalled_body_is_answered_408_and_closed(mock_upstream, tmp_path):
    config = _config(mock_upstream.url, body_timeout_seconds=1)
    async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "hi"}]}).encode()
        head = (
            f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body) + 990}\r\n\r\n"
        ).encode()
        writer.write(head + body)  # 990 bytes short, forever
        started = time.monotonic()
        answer = await asyncio.wait_for(reader.read(), 10)
        waited = time.monotonic() - started
        writer.close()
    status, headers, payload = split_response(answer)
    assert status == 408 and json.loads(payload)["error"]["code"] == "request_timeout"
    assert 0.8 < waited < 5, waited


async def test_a_body_that_keeps_trickling_is_not_cut(mock_upstream, tmp_path):
    """The body timeout bounds a pause, not the upload: a slow but steady body is served."""
    config = _config(mock_upstream.url, body_timeout_seconds=1)
    async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        body = json.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "steady"}]}).encode()
        writer.write(
            (
                f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
                f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\nConnection: close\r\n\r\n"
            ).encode()
        )
        for start in range(0, len(body), 8):  # about 3 s in all, 0.4 s between pieces
            writer.write(body[start : start + 8])
            await asyncio.sleep(0.4)
        answer = await asyncio.wait_for(reader.read(), 10)
        writer.close()
    status, _, payload = split_response(answer)
    assert status == 200, payload
    assert json.loads(payload)["choices"][0]["message"]["content"] == "steady"


async def test_a_kept_alive_connection_is_closed_when_idle(mock_upstream, tmp_path):
    config = _config(mock_upstream.url, idle_timeout_seconds=1)
    async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
        reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
        writer.write(b"GET /healthz HTTP/1.1\r\nHost: x\r\n\r\n")
        first = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 5)
        assert b" 200 " in first.split(b"\r\n")[0]
        started = time.monotonic()
        rest = await asyncio.wait_for(reader.read(), 10)  # the body, then the close
        waited = time.monotonic() - started
        writer.close()
    assert rest.endswith(b"}") and 0.8 < waited < 5, (rest, waited)


async def test_past_the_connection_cap_new_connections_are_refused_at_once(mock_upstream, tmp_path):
    """With a 300-file limit, 1,000 sockets: the gateway never runs out of descriptors and refuses clearly.

    Before the cap, connections past the limit waited in the listen queue
    while asyncio failed to accept them (EMFILE): every new client timed out.
    The gateway is stopped while the 1,000 connect, so that they wait in the
    listen queue together, as on a loaded machine: then asyncio must not
    accept more in one pass than the spare descriptors hold.
    """
    make_room_for_sockets(1300)
    limit = 300
    config = _config(mock_upstream.url, header_timeout_seconds=2, idle_timeout_seconds=2, max_connections=10_000)
    async with LimitedGatewayProcess(config, tmp_path / "sluice.yaml", open_files_soft_limit=limit) as gateway:
        pid = gateway.process.pid
        os.kill(pid, signal.SIGSTOP)
        try:
            idle = await _open(gateway.port, 1000, b"")
        finally:
            os.kill(pid, signal.SIGCONT)
        await asyncio.sleep(0.5)
        assert fd_count(pid) < limit, gateway.stderr()[-3000:]
        # A new client, now: answered at once (503, in OpenAI's shape), not left hanging.
        async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=5)) as session:
            started = time.monotonic()
            try:
                async with session.get(gateway.url + "/healthz") as resp:
                    status, body = resp.status, await resp.read()
            except aiohttp.ClientConnectionError:
                status, body = None, b""  # the refusal can reach the client as a reset
            refused_in = time.monotonic() - started
            print(f"300-file limit, 1,000 sockets: a new client got {status} in {refused_in * 1000:.0f} ms")
            assert refused_in < 1.0 and status in (503, None), (status, refused_in)
            # asyncio pauses accepting for a second whenever accept() finds no descriptor free.
            assert "out of system resource" not in gateway.stderr(), gateway.stderr()[-3000:]
            if status == 503:
                assert json.loads(body)["error"]["code"] == "server_busy"
            for _, writer in idle:
                writer.close()
            # Once the idle ones are gone, the gateway serves again.
            await asyncio.sleep(0.5)
            assert await timed_get(session, gateway.url + "/healthz") < 1.0


@pytest.mark.parametrize("limit, configured, expected", [(None, 100, 100), (1024, 8192, 464), (100_000, 8192, 8192)])
def test_the_cap_fits_the_file_limit(limit, configured, expected):
    from proxy.connections import connection_cap

    assert connection_cap(configured, limit) == expected
