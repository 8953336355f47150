"""A stream's memory does not grow with its answer, and a client that stops reading is let go.

The gateway runs as ``sluice serve`` in a child process; its ``VmRSS`` is
sampled from ``/proc`` while the answers flow. Before the fix every relayed
chunk's text was kept until the stream ended: one 71 MB answer cost +64 MB,
200 clients that did not read 5 MB answers took the gateway from 170 MB to
1.05 GB, and a whole 100 MB answer cost +295 MB.
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
from conftest import gateway_config
from hostile import AUTH, PeakRSS, chat_body, fd_count, make_room_for_sockets, rss_kb, split_response, start_long_upstream
from processes import GatewayProcess

MB = 1024


def _request_bytes(body: dict) -> bytes:
    data = json.dumps(body).encode()
    return (
        f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: {AUTH['Authorization']}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(data)}\r\n\r\n"
    ).encode() + data


async def _read_stream(session: aiohttp.ClientSession, url: str, chars: int) -> int:
    async with session.post(url, json=chat_body(True, long={"chars": chars, "chunk": 4000}), headers=AUTH) as resp:
        assert resp.status == 200
        size = 0
        async for chunk in resp.content.iter_any():
            size += len(chunk)
        return size


async def test_one_long_stream_to_a_fast_reader_does_not_grow_memory(tmp_path):
    """A 4 MB answer, then a 40 MB one: the long one costs no more memory than the short one."""
    runner, upstream_url, _ = await start_long_upstream()
    try:
        async with GatewayProcess(gateway_config(upstream_url), tmp_path / "sluice.yaml") as gateway:
            pid = gateway.process.pid
            url = gateway.url + "/v1/chat/completions"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                await _read_stream(session, url, 4_000_000)  # warm: encodings, buffers, the allocator's arenas
                warm = rss_kb(pid)
                async with PeakRSS(pid) as peak:
                    received = await _read_stream(session, url, 40_000_000)
        assert received > 40_000_000
        grown = (peak.peak_kb - warm) / MB
        print(f"one 40 MB streamed answer to a fast reader: +{grown:.1f} MB peak")
        assert grown < 15, f"+{grown:.1f} MB for a 40 MB answer"
    finally:
        await runner.cleanup()


async def test_200_clients_that_do_not_read_5mb_answers(tmp_path):
    """Each stream holds what is in flight (a read, its rewrite, the socket's buffer), not its answer."""
    make_room_for_sockets(600)
    runner, upstream_url, state = await start_long_upstream()
    config = gateway_config(upstream_url)
    config["server"]["send_timeout_seconds"] = 120  # they stay for the whole measurement
    # This machine is shared: the upstream in this process may be slow to accept and answer.
    config["upstreams"][0].update(connect_timeout_seconds=30, read_timeout_seconds=60)
    sockets = []
    try:
        async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
            pid = gateway.process.pid
            async with aiohttp.ClientSession() as session:
                await _read_stream(session, gateway.url + "/v1/chat/completions", 1_000_000)
            before = rss_kb(pid)
            request = _request_bytes(chat_body(True, long={"chars": 5_000_000, "chunk": 4000}))
            loop = asyncio.get_running_loop()
            async with PeakRSS(pid) as peak:
                for _ in range(200):
                    sock = socket.socket()
                    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # and it never reads
                    sock.setblocking(False)
                    await loop.sock_connect(sock, ("127.0.0.1", gateway.port))
                    await loop.sock_sendall(sock, request)
                    sockets.append(sock)
                deadline = time.monotonic() + 90
                while state["started"] < 201 and time.monotonic() < deadline:
                    await asyncio.sleep(0.2)
                await asyncio.sleep(3)  # all 200 streams open, and blocked on their clients
            pushed_mb = state["bytes"] / MB / MB
            assert state["started"] == 201
            assert fd_count(pid) > 200 + 50  # the 200 client sockets are all still open
            for sock in sockets:
                sock.close()
        grown = (peak.peak_kb - before) / MB
        print(f"200 non-reading clients: +{grown:.1f} MB peak, {pushed_mb:.0f} MB pushed by the upstream")
        assert grown < 50, f"+{grown:.1f} MB with {pushed_mb:.0f} MB pushed to 200 clients that do not read"
    finally:
        for sock in sockets:
            sock.close()  # again, when an assertion left early
        await runner.cleanup()


async def test_a_whole_answer_past_max_response_bytes_is_refused_not_buffered(tmp_path):
    """100 MB, with and without Content-Length: a 502 in OpenAI's shape, and no +100 MB."""
    runner, upstream_url, _ = await start_long_upstream()
    config = gateway_config(upstream_url)
    config["server"]["max_response_bytes"] = 8 * 1024 * 1024
    config["upstreams"][0]["read_timeout_seconds"] = 60
    try:
        async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
            pid = gateway.process.pid
            url = gateway.url + "/v1/chat/completions"
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                before = rss_kb(pid)
                async with PeakRSS(pid) as peak:
                    for declare_length in (True, False):
                        body = chat_body(False, long={"chars": 100_000_000, "declare_length": declare_length})
                        async with session.post(url, json=body, headers=AUTH) as resp:
                            assert resp.status == 502
                            error = (await resp.json())["error"]
                        assert error["code"] == "upstream_error" and "larger than" in error["message"]
                # A whole answer within the bound still passes.
                async with session.post(url, json=chat_body(False, long={"chars": 1_000_000}), headers=AUTH) as resp:
                    assert resp.status == 200
                    assert len((await resp.json())["choices"][0]["message"]["content"]) == 1_000_000
        grown = (peak.peak_kb - before) / MB
        print(f"two 100 MB whole answers refused at 8 MB: +{grown:.1f} MB peak")
        assert grown < 40, f"+{grown:.1f} MB"
    finally:
        await runner.cleanup()


async def test_a_client_that_stops_reading_is_dropped_and_its_upstream_closed(tmp_path):
    """It reads the headers, then nothing: after send_timeout_seconds the gateway lets it and its upstream go."""
    runner, upstream_url, state = await start_long_upstream()
    config = gateway_config(upstream_url)
    config["server"]["send_timeout_seconds"] = 1
    try:
        async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
            pid = gateway.process.pid
            baseline = fd_count(pid)
            reader, writer = await asyncio.open_connection("127.0.0.1", gateway.port)
            writer.write(_request_bytes(chat_body(True, long={"chars": 200_000_000, "chunk": 4000})))
            head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            started = time.monotonic()
            status, _, _ = split_response(head)
            assert status == 200
            # ... and now it reads nothing.
            deadline = time.monotonic() + 20
            while state["left"] == 0 and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            left_after = time.monotonic() - started
            print(f"a client that stopped reading: its upstream closed {left_after:.1f} s after the headers")
            assert state["left"] == 1 and state["finished"] == 0, state
            assert left_after < 10, left_after
            # The gateway has closed both sockets of that stream.
            while fd_count(pid) > baseline and time.monotonic() < deadline:
                await asyncio.sleep(0.1)
            assert fd_count(pid) <= baseline
            # The client's side sees the end once it drains what the kernel buffered.
            drained = 0
            while chunk := await asyncio.wait_for(reader.read(1 << 20), 10):
                drained += len(chunk)
            assert drained < 200_000_000
            writer.close()
    finally:
        await runner.cleanup()
