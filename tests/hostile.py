"""What the hostile-client tests share: a gateway process's memory and descriptors, raw HTTP, a long-answer upstream.

The gateway runs in a child process (``processes.GatewayProcess``) so that
its memory (``VmRSS``) and its open descriptors (``/proc/<pid>/fd``) are its
own, not the test's. The long-answer upstream runs in the test process: it
streams answers of any length without holding them (the shared mock echoes
a reply that must come in the request, which a 5 MB answer cannot).
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import time
from pathlib import Path
from typing import Any

from aiohttp import web

from conftest import ALICE, free_port
from processes import GatewayProcess
from proxy.app import LISTEN_BACKLOG


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS in /proc")


def fd_count(pid: int) -> int:
    return len(os.listdir(f"/proc/{pid}/fd"))


class PeakRSS:
    """Samples a process's VmRSS every ``interval`` seconds while in the ``async with``."""

    def __init__(self, pid: int, interval: float = 0.05):
        self.pid, self.interval = pid, interval
        self.peak_kb = 0
        self._task: asyncio.Task[None] | None = None

    async def _sample(self) -> None:
        while True:
            self.peak_kb = max(self.peak_kb, rss_kb(self.pid))
            await asyncio.sleep(self.interval)

    async def __aenter__(self) -> PeakRSS:
        self.peak_kb = rss_kb(self.pid)
        self._task = asyncio.create_task(self._sample())
        return self

    async def __aexit__(self, *exc: Any) -> None:
        assert self._task is not None
        self._task.cancel()
        self.peak_kb = max(self.peak_kb, rss_kb(self.pid))


class LimitedGatewayProcess(GatewayProcess):
    """A gateway whose open-file limit is ``limit``, soft and hard: it cannot lift it."""

    def _limit_open_files(self) -> None:
        limit = self.open_files_soft_limit
        resource.setrlimit(resource.RLIMIT_NOFILE, (limit, limit))


def make_room_for_sockets(count: int) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    want = count + 256
    if hard != resource.RLIM_INFINITY and hard < want:
        import pytest

        pytest.skip(f"the hard open-file limit ({hard}) is too low for {count} sockets")
    if soft < want:
        resource.setrlimit(resource.RLIMIT_NOFILE, (want, hard))


# -- raw HTTP ------------------------------------------------------------------


async def raw_exchange(port: int, data: bytes, timeout: float = 5.0) -> bytes:
    """Send ``data``, then read until the server closes (or ``timeout``)."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(data)
        await writer.drain()
        return await asyncio.wait_for(reader.read(), timeout)
    finally:
        writer.close()


def split_response(raw: bytes) -> tuple[int, dict[str, str], bytes]:
    head, _, body = raw.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    status = int(lines[0].split()[1])
    headers = {}
    for line in lines[1:]:
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return status, headers, body


async def timed_get(session: Any, url: str) -> float:
    started = time.monotonic()
    async with session.get(url) as resp:
        assert resp.status == 200
        await resp.read()
    return time.monotonic() - started


def chat_body(stream: bool, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": "go"}], "stream": stream}
    body.update(extra)
    return body


AUTH = {"Authorization": f"Bearer {ALICE}"}


# -- a long-answer upstream ------------------------------------------------------


LONG = web.AppKey("long_state", dict)


async def _long_chat(request: web.Request) -> web.StreamResponse:
    """``long: {"chars": N, "chunk": M, "stall_ms": S}``: N characters of words, M per SSE event, no usage.

    ``stall_ms``: pause that long after the text, before the final chunk.
    """
    body = await request.json()
    spec = body.get("long", {})
    total, size = int(spec.get("chars", 1000)), int(spec.get("chunk", 1000))
    state = request.app[LONG]
    state["started"] += 1
    piece = ("lorem ipsum dolor sit amet " * (size // 27 + 1))[:size]
    head = {"id": "chatcmpl-long", "object": "chat.completion.chunk", "created": 0, "model": body["model"]}
    if not body.get("stream"):
        # A whole answer of ``total`` characters; ``declare_length``: false sends it chunked, with no length.
        text = ("lorem ipsum dolor sit amet " * (total // 27 + 1))[:total]
        answer = {**head, "object": "chat.completion",
                  "choices": [{"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": total // 5, "total_tokens": total // 5 + 5}}
        data = json.dumps(answer).encode()
        del text, answer
        if spec.get("declare_length", True):
            return web.Response(body=data, content_type="application/json")
        response = web.StreamResponse(headers={"Content-Type": "application/json"})
        response.enable_chunked_encoding()
        await response.prepare(request)
        try:
            for start in range(0, len(data), 1 << 16):
                await response.write(data[start : start + (1 << 16)])
            await response.write_eof()
        except (ConnectionError, RuntimeError):
            state["left"] += 1
        return response
    response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
    await response.prepare(request)
    event = b"data: " + json.dumps({**head, "choices": [{"index": 0, "delta": {"content": piece}, "finish_reason": None}]}).encode() + b"\n\n"
    sent = 0
    try:
        while sent < total:
            await response.write(event)
            sent += size
            state["bytes"] += len(event)
        state["sent_all"] += 1
        if spec.get("stall_ms"):  # everything sent but the end: the client may hang up now
            await asyncio.sleep(spec["stall_ms"] / 1000)
        final = {**head, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}]}
        await response.write(b"data: " + json.dumps(final).encode() + b"\n\n")
        await response.write(b"data: [DONE]\n\n")
        await response.write_eof()
        state["finished"] += 1
    except (ConnectionError, RuntimeError):
        state["left"] += 1
    except asyncio.CancelledError:
        state["left"] += 1
        raise
    return response


async def start_long_upstream() -> tuple[web.AppRunner, str, dict[str, int]]:
    app = web.Application(client_max_size=16 << 20)  # big prompts too
    app[LONG] = state = {"started": 0, "finished": 0, "left": 0, "bytes": 0, "sent_all": 0}
    app.router.add_post("/v1/chat/completions", _long_chat)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, backlog=LISTEN_BACKLOG).start()
    return runner, f"http://127.0.0.1:{port}/v1", state


def long_text(chars: int, chunk: int) -> str:
    """The text ``_long_chat`` streams for ``chars`` and ``chunk``."""
    piece = ("lorem ipsum dolor sit amet " * (chunk // 27 + 1))[:chunk]
    return piece * -(-chars // chunk)
