"""Faults, each against the real gateway and a real (mock or hand-written) upstream on loopback.

For every fault the client must get a well-formed answer or a well-formed
error, the gateway must serve the next request, nothing may leak (tasks,
in-flight requests, ``sluice_active_streams``), and the usage ledger must
record what was delivered.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import signal
import socket
import struct
import subprocess
import sys
import time
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import yaml
from conftest import ADMIN, ALICE, UPSTREAM_KEY, free_port, gateway_config
from processes import ROOT, GatewayProcess

from proxy.accounting import open_store
from proxy.config import AccountingConfig
from proxy.tokens import count_chat_prompt, count_text

MODEL = "gpt-4o-mini"
RAW_MODEL = "raw-model"  # served by a hand-written upstream where a test needs one


def chat(text: str, **extra: Any) -> dict[str, Any]:
    return {"model": MODEL, "messages": [{"role": "user", "content": text}], **extra}


def prompt_tokens(body: dict[str, Any]) -> int:
    return count_chat_prompt(body["model"], body["messages"])


def auth(key: str = ALICE) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


async def post(url: str, body: Any, key: str = ALICE, timeout: float = 15) -> tuple[int, Any, str]:
    """POST and read everything: (status, headers, text)."""
    client_timeout = aiohttp.ClientTimeout(total=timeout)
    async with aiohttp.ClientSession(timeout=client_timeout) as session:
        async with session.post(url, json=body, headers=auth(key)) as resp:
            return resp.status, resp.headers, (await resp.read()).decode("utf-8", "replace")


def assert_openai_error(status: int, text: str, expected_status: int, code: str) -> dict[str, Any]:
    assert status == expected_status, text
    body = json.loads(text)
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["code"] == code, body
    assert isinstance(body["error"]["message"], str) and body["error"]["message"], body
    return body["error"]


def sse_payloads(raw: str) -> list[str]:
    return [line[len("data: ") :] for line in raw.split("\n") if line.startswith("data: ")]


def parse_stream(raw: str) -> tuple[list[dict[str, Any]], str | dict[str, Any]]:
    """Check SSE framing and the ending; returns (chunks, "done" or the final error object).

    Well-formed: every event is ``data: <JSON object>``, and the stream ends
    either with ``data: [DONE]`` or with one error event (and no [DONE]).
    """
    assert raw.endswith("\n\n"), raw[-200:]
    payloads = sse_payloads(raw)
    assert payloads, raw[:500]
    if payloads[-1] == "[DONE]":
        ending: str | dict[str, Any] = "done"
        body = payloads[:-1]
    else:
        error = json.loads(payloads[-1])
        assert set(error) == {"error"}, error
        assert set(error["error"]) == {"message", "type", "param", "code"}, error
        ending = error["error"]
        body = payloads[:-1]
    chunks = []
    for payload in body:
        assert payload != "[DONE]", "[DONE] before the end of the stream"
        chunk = json.loads(payload)
        # An SDK stops at any event with a truthy "error": only the last event may be one.
        assert isinstance(chunk, dict) and not chunk.get("error"), chunk
        chunks.append(chunk)
    return chunks, ending


def text_of(chunks: list[dict[str, Any]]) -> str:
    return "".join(
        choice.get("delta", {}).get("content") or ""
        for chunk in chunks
        for choice in chunk.get("choices") or []
    )


# -- what must hold after every fault -------------------------------------------


async def task_baseline() -> int:
    await asyncio.sleep(0.1)
    return len(asyncio.all_tasks())


async def metrics_text(gw) -> str:
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/metrics") as resp:
            assert resp.status == 200
            return await resp.text()


def metric_value(text: str, name: str, labels: str = "") -> float | None:
    match = re.search(rf"^{re.escape(name + labels)} (\S+)$", text, re.MULTILINE)
    return float(match.group(1)) if match else None


def upstream_connections_in_use(gateway) -> int:
    """Connections to upstreams still checked out of their pools (aiohttp keeps no public count)."""
    return sum(
        len(upstream._session.connector._acquired)
        for upstream in gateway.runtime.router.upstreams
        if upstream._session is not None
    )


async def assert_no_leaks(gw, baseline_tasks: int, timeout: float = 3.0) -> None:
    """In flight 0, no active stream, no upstream connection held, no more tasks than before the fault."""
    gateway = gw.server.gateway
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        active = gateway.metrics.registry.get_sample_value("sluice_active_streams")
        tasks = asyncio.all_tasks()
        held = upstream_connections_in_use(gateway)
        if gateway.inflight == 0 and active == 0 and held == 0 and len(tasks) <= baseline_tasks:
            break
        if loop.time() > deadline:
            names = sorted(str(t.get_coro()) for t in tasks)
            raise AssertionError(
                f"leak: inflight={gateway.inflight} active_streams={active} upstream_connections={held} "
                f"tasks={len(tasks)} > baseline {baseline_tasks}: {names}"
            )
        await asyncio.sleep(0.05)
    assert metric_value(await metrics_text(gw), "sluice_active_streams") == 0.0


async def usage_of(gw, key: str = "alice") -> dict[str, int]:
    """The ledger's totals for today, once every settle has landed."""
    quotas = gw.server.gateway.quotas
    await quotas.drain()
    report = (await quotas.store.usage(now=time.time())).to_dict("day")
    row = report["keys"].get(key) or {}
    return {name: row.get(name, 0) for name in ("requests", "prompt_tokens", "completion_tokens")}


def added(before: dict[str, int], after: dict[str, int]) -> dict[str, int]:
    return {name: after[name] - before[name] for name in before}


async def assert_keeps_serving(gw) -> None:
    status, _, text = await post(gw.v1 + "/chat/completions", chat("still here"))
    assert status == 200, text
    assert json.loads(text)["choices"][0]["message"]["content"] == "still here"
    status, _, raw = await post(gw.v1 + "/chat/completions", chat("still streaming", stream=True))
    assert status == 200
    chunks, ending = parse_stream(raw)
    assert ending == "done" and text_of(chunks) == "still streaming"


async def warm_up(gw) -> None:
    """One request first, so the pooled upstream connection is part of the task baseline."""
    status, _, _ = await post(gw.v1 + "/chat/completions", chat("warm"))
    assert status == 200


# -- a hand-written upstream, for faults the mock cannot script ----------------


Script = Callable[[asyncio.StreamReader, asyncio.StreamWriter, dict[str, Any]], Awaitable[None]]

SSE_HEAD = (
    b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
    b"Connection: close\r\n\r\n"
)


def http_chunk(data: bytes) -> bytes:
    return f"{len(data):x}\r\n".encode() + data + b"\r\n"


def sse_chunk(content: str | None = None, finish: str | None = None, index: Any = 0) -> bytes:
    delta = {} if content is None else {"content": content}
    event = {
        "id": "chatcmpl-raw",
        "object": "chat.completion.chunk",
        "created": 1,
        "model": RAW_MODEL,
        "choices": [{"index": index, "delta": delta, "finish_reason": finish}],
    }
    return b"data: " + json.dumps(event).encode() + b"\n\n"


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with SO_LINGER 0: the peer gets a TCP RST, not a FIN."""
    sock = writer.get_extra_info("socket")
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class RawUpstream:
    """An HTTP/1.1 server on loopback that answers every request with ``script``."""

    def __init__(self, script: Script):
        self.script = script
        self.requests = 0
        self.server: asyncio.Server | None = None
        self.port = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    async def __aenter__(self) -> RawUpstream:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self.server is not None
        self.server.close()
        await self.server.wait_closed()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = re.search(rb"(?im)^content-length: *(\d+)", head)
            body = await reader.readexactly(int(length.group(1))) if length else b""
            self.requests += 1
            await self.script(reader, writer, json.loads(body))
        except (ConnectionError, asyncio.IncompleteReadError):
            pass
        finally:
            if not writer.transport.is_closing():
                writer.close()


def mixed_config(mock_url: str, raw_url: str, **sections: Any) -> dict[str, Any]:
    """The mock serves the usual models; ``raw-*`` goes to the hand-written upstream."""
    config = gateway_config(mock_url, **sections)
    config["upstreams"].append({**config["upstreams"][0], "name": "raw", "base_url": raw_url, "models": ["raw-*"]})
    return config


# -- 1. the upstream refuses connections --------------------------------------


async def test_upstream_refuses_connections(mock_upstream, start_gateway):
    dead = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there: connection refused
    gw = await start_gateway(mixed_config(mock_upstream.url, dead))
    await warm_up(gw)
    baseline = await task_baseline()
    before = await usage_of(gw)
    for path, body in [
        ("/chat/completions", {**chat("x"), "model": RAW_MODEL}),
        ("/chat/completions", {**chat("x", stream=True), "model": RAW_MODEL}),
        ("/completions", {"model": RAW_MODEL, "prompt": "x"}),
        ("/completions", {"model": RAW_MODEL, "prompt": "x", "stream": True}),
        ("/embeddings", {"model": RAW_MODEL, "input": "x"}),
    ]:
        status, headers, text = await post(gw.v1 + path, body)
        assert_openai_error(status, text, 502, "upstream_error")
        assert headers["x-request-id"]
    await assert_no_leaks(gw, baseline)
    await assert_keeps_serving(gw)
    spent = added(before, await usage_of(gw))
    assert spent["requests"] == 5 + 2  # the five refused ones are in the ledger, with the two that worked
    assert spent["completion_tokens"] == count_text(MODEL, "still here") + count_text(MODEL, "still streaming")


async def test_a_request_the_upstream_never_received_is_not_charged(mock_upstream, start_gateway):
    """Nothing reached the provider, so nothing may be billed: not even the prompt."""
    dead = f"http://127.0.0.1:{free_port()}/v1"
    config = mixed_config(mock_upstream.url, dead)
    config["teams"][0]["limits"] = {"tokens_per_day": 100_000}
    gw = await start_gateway(config)
    before = await usage_of(gw)
    status, _, text = await post(gw.v1 + "/chat/completions", {**chat("a prompt of a few tokens"), "model": RAW_MODEL})
    assert_openai_error(status, text, 502, "upstream_error")
    spent = added(before, await usage_of(gw))
    assert spent == {"requests": 1, "prompt_tokens": 0, "completion_tokens": 0}, spent


# -- 2. the upstream resets the connection --------------------------------------


async def test_upstream_resets_mid_stream(mock_upstream, start_gateway):
    sent = ["one ", "two ", "three "]

    async def script(reader, writer, body):
        writer.write(SSE_HEAD)
        for piece in sent:
            writer.write(http_chunk(sse_chunk(piece)))
        await writer.drain()
        await asyncio.sleep(0.2)  # let the gateway read and relay all of it
        reset(writer)

    async with RawUpstream(script) as raw:
        gw = await start_gateway(mixed_config(mock_upstream.url, raw.url))
        await warm_up(gw)
        baseline = await task_baseline()
        before = await usage_of(gw)
        body = {**chat("reset me", stream=True), "model": RAW_MODEL}
        status, _, raw_text = await post(gw.v1 + "/chat/completions", body)
        assert status == 200
        chunks, ending = parse_stream(raw_text)
        assert ending != "done" and ending["code"] == "upstream_error"
        assert text_of(chunks) == "".join(sent)  # nothing delivered is lost, nothing is invented
        await assert_no_leaks(gw, baseline)
        spent = added(before, await usage_of(gw))
        assert spent == {
            "requests": 1,
            "prompt_tokens": prompt_tokens(body),
            "completion_tokens": count_text(RAW_MODEL, "".join(sent)),
        }
        await assert_keeps_serving(gw)


async def test_upstream_resets_before_answering(mock_upstream, start_gateway):
    async def script(reader, writer, body):
        reset(writer)

    async with RawUpstream(script) as raw:
        gw = await start_gateway(mixed_config(mock_upstream.url, raw.url))
        await warm_up(gw)
        baseline = await task_baseline()
        for stream in (False, True):
            status, _, text = await post(gw.v1 + "/chat/completions", {**chat("x", stream=stream), "model": RAW_MODEL})
            assert_openai_error(status, text, 502, "upstream_error")
        assert raw.requests == 2
        await assert_no_leaks(gw, baseline)
        await assert_keeps_serving(gw)


# -- 3. the upstream stalls ---------------------------------------------------------


async def test_upstream_stalls_before_and_after_the_first_byte(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["upstreams"][0]["read_timeout_seconds"] = 0.3
    gw = await start_gateway(config)
    await warm_up(gw)
    baseline = await task_baseline()
    before = await usage_of(gw)
    for stream in (False, True):
        status, _, text = await post(gw.v1 + "/chat/completions", chat("x", stream=stream, mock={"stall_before_ms": 1500}))
        assert_openai_error(status, text, 504, "upstream_timeout")
    body = chat("a b c d", stream=True, mock={"stall_after": {"chunks": 2, "ms": 1500}})
    status, _, raw = await post(gw.v1 + "/chat/completions", body)
    assert status == 200
    chunks, ending = parse_stream(raw)
    assert ending != "done" and ending["code"] == "upstream_timeout"
    assert text_of(chunks) == "a b "
    assert await mock_upstream.state.wait_for_disconnect(timeout=2.0, count=3)  # the gateway hung up each time
    await assert_no_leaks(gw, baseline)
    spent = added(before, await usage_of(gw))
    assert spent["requests"] == 3
    assert spent["completion_tokens"] == count_text(MODEL, "a b ")
    await assert_keeps_serving(gw)


# -- 4. the upstream sends a broken stream ------------------------------------------

GOOD = 'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{"content":"ok "},"finish_reason":null}]}\n\n'
FINISH = 'data: {"id":"c1","object":"chat.completion.chunk","created":1,"model":"gpt-4o-mini","choices":[{"index":0,"delta":{},"finish_reason":"stop"}]}\n\n'
OVERSIZED = 'data: {"choices":[{"index":0,"delta":{"content":"' + "B" * 5000 + '"}}]}\n\n'  # over max_event_bytes 2000

# (name, raw SSE pieces the mock writes, expected ending, expected delivered text)
BROKEN_STREAMS = [
    # Where a good event and a bad one arrive in one read, the good one must still reach the client.
    ("invalid JSON in a data line", [GOOD + "data: {not json\n\n", FINISH, "data: [DONE]\n\n"], "error", "ok "),
    ("a JSON array, not an object", [GOOD + "data: [1, 2]\n\n", FINISH, "data: [DONE]\n\n"], "error", "ok "),
    ("an event over max_event_bytes", [GOOD + OVERSIZED, FINISH, "data: [DONE]\n\n"], "error", "ok "),
    ("an upstream error event", [GOOD + 'data: {"error": {"message": "overloaded"}}\n\n'], "error", "ok "),
    ("no [DONE], answer unfinished", [GOOD], "error", "ok "),
    ("no [DONE], answer finished", [GOOD, FINISH], "done", "ok "),
    ("an empty body", [], "error", ""),
    ("not SSE at all", ["<html>502 Bad Gateway</html>"], "error", ""),
    (
        "odd but legal framing",  # CR and CRLF line ends, no space after the colon, comments, unknown fields, a BOM
        ["\ufeff: hello\r\n\r\nevent: x\rretry: 5\r", GOOD.replace("data: ", "data:").replace("\n", "\r\n"),
         "id: 7\nunknown: y\n\n", FINISH.replace("\n", "\r"), "data: [DONE]\n\n"],
        "done",
        "ok ",
    ),
    (
        "an event split across writes",
        [GOOD[:20], GOOD[20:41], GOOD[41:], FINISH[:-1], FINISH[-1:], "data: [DO", "NE]\n\n"],
        "done",
        "ok ",
    ),
    (
        "invalid UTF-8 inside a data line",  # a lone surrogate goes out as the bytes ED B3 BF
        [GOOD.replace("ok ", "ok\udcff "), FINISH, "data: [DONE]\n\n"],
        "done",
        "ok\ufffd\ufffd\ufffd ",
    ),
    (
        "a choice index that is not a number",  # refused with an error event (or relayed as it came)
        [GOOD + GOOD.replace('"index":0', '"index":[]'), FINISH, "data: [DONE]\n\n"],
        "error|done",
        "ok |ok ok ",
    ),
]


@pytest.mark.parametrize("raw_events, ending, delivered", [c[1:] for c in BROKEN_STREAMS], ids=[c[0] for c in BROKEN_STREAMS])
async def test_broken_upstream_streams(mock_upstream, start_gateway, raw_events, ending, delivered):
    config = gateway_config(mock_upstream.url)
    config["server"]["max_event_bytes"] = 2000
    gw = await start_gateway(config)
    await warm_up(gw)
    baseline = await task_baseline()
    before = await usage_of(gw)
    body = chat("x", stream=True, mock={"raw": raw_events})
    status, _, raw = await post(gw.v1 + "/chat/completions", body)
    assert status == 200
    chunks, got = parse_stream(raw)
    # Where two outcomes are acceptable, they are given as "a|b" and pair up in order.
    outcomes = list(zip(ending.split("|"), delivered.split("|"), strict=True))
    outcome = "done" if got == "done" else got["code"]
    assert outcome in {"done" if e == "done" else "upstream_error" for e, _ in outcomes}, got
    delivered = dict(outcomes)["done" if got == "done" else "error"]
    assert text_of(chunks) == delivered, (text_of(chunks), got)
    assert "BBBB" not in raw  # nothing of an oversized event reaches the client
    await assert_no_leaks(gw, baseline)
    spent = added(before, await usage_of(gw))
    assert spent == {
        "requests": 1,
        "prompt_tokens": prompt_tokens(body),
        "completion_tokens": count_text(MODEL, delivered),
    }
    await assert_keeps_serving(gw)


async def test_an_event_larger_than_1_mib_ends_the_stream(mock_upstream, start_gateway):
    """The default max_event_bytes (1 MiB); the mock cannot send this much (its body limit is 1 MiB)."""
    big = b'data: {"choices":[{"index":0,"delta":{"content":"' + b"B" * (1024 * 1024 + 100) + b'"}}]}\n\n'

    async def script(reader, writer, body):
        writer.write(SSE_HEAD + http_chunk(sse_chunk("ok ")))
        await writer.drain()
        for start in range(0, len(big), 65536):
            writer.write(http_chunk(big[start : start + 65536]))
        writer.write(http_chunk(sse_chunk(None, "stop")) + http_chunk(b"data: [DONE]\n\n") + b"0\r\n\r\n")
        await writer.drain()

    async with RawUpstream(script) as raw:
        gw = await start_gateway(mixed_config(mock_upstream.url, raw.url))
        assert gw.server.settings.server.max_event_bytes == 1024 * 1024
        await warm_up(gw)
        baseline = await task_baseline()
        before = await usage_of(gw)
        body = {**chat("big", stream=True), "model": RAW_MODEL}
        status, _, raw_text = await post(gw.v1 + "/chat/completions", body)
        assert status == 200
        assert len(raw_text) < 10_000 and "BBBB" not in raw_text
        chunks, ending = parse_stream(raw_text)
        assert ending != "done" and ending["code"] == "upstream_error"
        assert text_of(chunks) == "ok "
        await assert_no_leaks(gw, baseline)
        spent = added(before, await usage_of(gw))
        assert spent == {"requests": 1, "prompt_tokens": prompt_tokens(body), "completion_tokens": count_text(RAW_MODEL, "ok ")}
        await assert_keeps_serving(gw)


# -- 5. the client disconnects at every stage -------------------------------------------


async def raw_post(port: int, body: bytes, path: str = "/v1/chat/completions", content_length: int | None = None):
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    head = (
        f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer {ALICE}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body) if content_length is None else content_length}\r\n\r\n"
    )
    writer.write(head.encode() + body)
    await writer.drain()
    return reader, writer


async def read_until(reader: asyncio.StreamReader, needle: bytes, timeout: float = 5.0) -> bytes:
    received = b""
    try:
        async with asyncio.timeout(timeout):
            while needle not in received:
                data = await reader.read(65536)
                assert data, f"EOF before {needle!r}: {received[-500:]!r}"
                received += data
    except TimeoutError:
        raise AssertionError(f"no {needle!r} within {timeout}s: {received[-1000:]!r}") from None
    return received


async def hang_up(writer: asyncio.StreamWriter) -> None:
    writer.close()
    try:
        await writer.wait_closed()
    except ConnectionError:
        pass


async def wait_for(predicate: Callable[[], bool], timeout: float = 3.0) -> None:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while not predicate():
        assert loop.time() < deadline, "condition not reached in time"
        await asyncio.sleep(0.02)


BLOCK_RULES = [{"name": "banned", "type": "terms", "terms": ["launch codes"], "action": "block"}]


@pytest.mark.parametrize(
    "stage", ["while sending the body", "before upstream answers", "before upstream answers (stream)", "mid-stream", "while the window holds text"]
)
async def test_client_disconnects(mock_upstream, start_gateway, stage):
    gw = await start_gateway(gateway_config(mock_upstream.url, moderation={"rules": BLOCK_RULES}))
    await warm_up(gw)
    baseline = await task_baseline()
    before = await usage_of(gw)
    mock_upstream.state.reset()
    expected_completion = 0
    reaches_upstream = True
    if stage == "while sending the body":
        body = json.dumps(chat("never finished")).encode()
        reader, writer = await raw_post(gw.server.port, body[:10], content_length=len(body))
        await asyncio.sleep(0.2)
        reaches_upstream = False
    elif stage.startswith("before upstream answers"):
        body = chat("wait for it", stream=stage.endswith("(stream)"), mock={"stall_before_ms": 10_000})
        reader, writer = await raw_post(gw.server.port, json.dumps(body).encode())
        await wait_for(lambda: len(mock_upstream.state.requests) == 1)
    elif stage == "mid-stream":
        words = " ".join(f"w{i}" for i in range(10))
        body = chat(words, stream=True, mock={"stall_after": {"chunks": 3, "ms": 10_000}})
        reader, writer = await raw_post(gw.server.port, json.dumps(body).encode())
        await read_until(reader, b"w2")  # (the window may hold back the space after it)
        expected_completion = count_text(MODEL, "w0 w1 w2 ")
    else:
        # "launch " may be the start of "launch codes": the window must hold it back.
        body = chat("x", stream=True, mock={"reply": "hello launch codes now", "stall_after": {"chunks": 2, "ms": 10_000}})
        reader, writer = await raw_post(gw.server.port, json.dumps(body).encode())
        received = await read_until(reader, b'"hello')
        await asyncio.sleep(0.3)  # "launch " has reached the gateway and sits in the window
        try:
            received += await asyncio.wait_for(reader.read(65536), 0.1)
        except TimeoutError:
            pass
        assert b"launch" not in received
        expected_completion = count_text(MODEL, "hello launch ")
    await hang_up(writer)
    if reaches_upstream:
        assert await mock_upstream.state.wait_for_disconnect(timeout=1.0), "the upstream request was not cancelled"
    await assert_no_leaks(gw, baseline)
    spent = added(before, await usage_of(gw))
    if reaches_upstream:
        assert spent == {"requests": 1, "prompt_tokens": prompt_tokens(body), "completion_tokens": expected_completion}
    else:
        assert spent["completion_tokens"] == 0 and spent["prompt_tokens"] == 0
    text = await metrics_text(gw)
    assert 'status="500"' not in text, "a client leaving was counted as a gateway failure"
    await assert_keeps_serving(gw)


# -- 6. Redis goes away and comes back ----------------------------------------------------


async def test_redis_goes_away_mid_stream_and_comes_back(mock_upstream, start_gateway, redis_server_factory):
    redis = redis_server_factory()
    config = gateway_config(mock_upstream.url)
    config["teams"][0]["limits"] = {"requests_per_minute": 1000, "tokens_per_day": 1_000_000}
    config["accounting"] = {"store": "redis", "redis_url": redis.url, "on_store_error": "reject"}
    gw = await start_gateway(config)
    await warm_up(gw)
    baseline = await task_baseline()

    words = " ".join(f"w{i}" for i in range(6))
    body = chat(words, stream=True, mock={"stall_after": {"chunks": 2, "ms": 600}})
    async with aiohttp.ClientSession() as session:
        resp = await session.post(gw.v1 + "/chat/completions", json=body, headers=auth())
        assert resp.status == 200
        first = await resp.content.readany()  # admitted and streaming
        redis.stop()
        status, _, text = await post(gw.v1 + "/chat/completions", chat("during the outage"))
        assert_openai_error(status, text, 503, "store_unavailable")
        async with session.get(gw.url + "/readyz") as ready:
            assert ready.status == 503
        async with session.get(gw.url + "/admin/usage", headers=auth(ADMIN)) as usage:
            assert_openai_error(usage.status, await usage.text(), 503, "store_unavailable")
        raw = (first + await resp.read()).decode()
    chunks, ending = parse_stream(raw)
    assert ending == "done" and text_of(chunks) == words  # an admitted stream outlives the outage
    await gw.server.gateway.quotas.drain()
    errors = metric_value(await metrics_text(gw), "sluice_store_errors_total", '{operation="settle",store="redis"}')
    assert errors == 1.0  # its settle failed, and was counted

    redis.start()  # a fresh, empty Redis on the same port
    status, _, text = await post(gw.v1 + "/chat/completions", chat("after the outage"))
    assert status == 200, text
    async with aiohttp.ClientSession() as session:
        async with session.get(gw.url + "/readyz") as ready:
            assert ready.status == 200
        await gw.server.gateway.quotas.drain()
        async with session.get(gw.url + "/admin/usage?period=day", headers=auth(ADMIN)) as usage:
            assert usage.status == 200
            alice = (await usage.json())["keys"]["alice"]
    after = chat("after the outage")
    assert alice["requests"] == 1
    assert alice["prompt_tokens"] == prompt_tokens(after)
    assert alice["completion_tokens"] == count_text(MODEL, "after the outage")
    await assert_no_leaks(gw, baseline)
    await assert_keeps_serving(gw)


# -- 7. the SQLite store cannot be used -------------------------------------------------------


def sluice(*args: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "proxy", *args], capture_output=True, text=True, cwd=ROOT, timeout=timeout,
        env={**os.environ, "SLUICE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
    )


@pytest.mark.parametrize("where", ["in a directory that does not exist", "a directory"])
def test_serve_with_an_unusable_sqlite_path_fails_cleanly(tmp_path, where):
    db = tmp_path / "missing" / "sluice.db" if where.startswith("in") else tmp_path
    config = gateway_config("http://127.0.0.1:9/v1")
    config["server"]["port"] = free_port()
    config["accounting"] = {"store": "sqlite", "sqlite_path": str(db)}
    path = tmp_path / "sluice.yaml"
    path.write_text(yaml.safe_dump(config))
    result = sluice("serve", "--config", str(path))
    assert result.returncode == 1, result
    assert "Traceback" not in result.stderr, result.stderr
    assert str(db) in result.stderr, result.stderr  # says which file, so the operator can fix it
    assert len(result.stderr.strip().splitlines()) <= 3, result.stderr


def _immutable(paths: list[Path], on: bool) -> None:
    subprocess.run(["chattr", "+i" if on else "-i", *map(str, paths)], check=True, capture_output=True)


async def test_sqlite_store_unwritable_at_runtime_then_fixed(mock_upstream, start_gateway, tmp_path):
    """The ledger file turns unwritable under a running gateway, then is fixed.

    Running as root, file modes do not stop writes; the immutable attribute
    does. Only the database and its WAL are frozen: the -shm file is mapped
    into memory, and freezing it would kill the process with SIGBUS.
    """
    probe = tmp_path / "probe"
    probe.write_text("x")
    try:
        _immutable([probe], True)
        _immutable([probe], False)
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("chattr +i is not available here")
    store_dir = tmp_path / "store"
    store_dir.mkdir()
    db = store_dir / "sluice.db"
    gw = await start_gateway(gateway_config(mock_upstream.url, accounting={"store": "sqlite", "sqlite_path": str(db)}))
    await warm_up(gw)
    await gw.server.gateway.quotas.drain()
    baseline = await task_baseline()
    frozen = [db, Path(f"{db}-wal")]
    assert all(p.exists() for p in frozen)
    _immutable(frozen, True)
    try:
        # The limits live in the file (shared by every worker), so a reserve needs it writable:
        # with on_store_error: reject (the default) the request is refused, cleanly.
        status, _, text = await post(gw.v1 + "/chat/completions", chat("while frozen"))
        assert_openai_error(status, text, 503, "store_unavailable")
        await gw.server.gateway.quotas.drain()
        errors = metric_value(await metrics_text(gw), "sluice_store_errors_total", '{operation="reserve",store="sqlite"}')
        assert errors == 1.0
        async with aiohttp.ClientSession() as session:
            async with session.get(gw.url + "/readyz") as ready:  # a probe, as Kubernetes sends them
                ready_status = ready.status
    finally:
        _immutable(frozen, False)
    for text in ("fixed one", "fixed two"):
        status, _, body = await post(gw.v1 + "/chat/completions", chat(text))
        assert status == 200, body
        await gw.server.gateway.quotas.drain()  # one settle per write batch
    spent = await usage_of(gw)
    # The warm-up and both requests after the fix; the one while frozen was refused (and counted as a store error).
    assert spent["requests"] == 3, f"{spent} (/readyz said {ready_status} while frozen)"
    await assert_no_leaks(gw, baseline)


# -- 8. SIGTERM under 200 live streams ---------------------------------------------------------


async def open_live_streams(
    session: aiohttp.ClientSession, url: str, body: dict[str, Any], count: int
) -> tuple[list[aiohttp.ClientResponse], list[bytes]]:
    """``count`` streams at once, each past its first bytes, and the gateway counting them all as active."""
    responses = await asyncio.gather(
        *(session.post(url + "/v1/chat/completions", json=body, headers=auth()) for _ in range(count))
    )
    assert [r.status for r in responses] == [200] * count
    firsts = await asyncio.gather(*(r.content.readany() for r in responses))
    async with session.get(url + "/metrics") as resp:
        assert metric_value(await resp.text(), "sluice_active_streams") == count
    return responses, firsts


async def test_sigterm_under_200_live_streams(mock_upstream, tmp_path):
    streams = 200
    db = tmp_path / "sluice.db"
    config = gateway_config(mock_upstream.url, accounting={"store": "sqlite", "sqlite_path": str(db)})
    config["server"]["shutdown_grace_seconds"] = 30
    words = " ".join(f"w{i}" for i in range(24))
    # Each stream pauses 3 s after its first word: all 200 are live when the signal comes, however slow the start.
    body = chat(words, stream=True, mock={"delay_ms": 10, "stall_after": {"chunks": 1, "ms": 3000}})
    async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            responses, firsts = await open_live_streams(session, gateway.url, body, streams)
            gateway.process.send_signal(signal.SIGTERM)
            rests = await asyncio.gather(*(r.read() for r in responses))
        for first, rest in zip(firsts, rests, strict=True):
            chunks, ending = parse_stream((first + rest).decode())
            assert ending == "done" and text_of(chunks) == words
        code = await asyncio.wait_for(gateway.process.wait(), 30)
        stderr = gateway.stderr()
    assert code == 0, stderr
    assert "Traceback" not in stderr, stderr
    store = await open_store(AccountingConfig(store="sqlite", sqlite_path=str(db)), read_only=True)
    try:
        report = (await store.usage(now=time.time())).to_dict("day")
    finally:
        await store.close()
    assert report["keys"]["alice"] == {
        "team": "research",
        "requests": streams,
        "prompt_tokens": streams * prompt_tokens(body),
        "completion_tokens": streams * count_text(MODEL, words),
        "total_tokens": streams * (prompt_tokens(body) + count_text(MODEL, words)),
    }
