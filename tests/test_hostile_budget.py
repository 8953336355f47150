"""An upstream that ignores max_tokens cannot spend past a budget, and a hang-up is billed for what was produced.

Before: against a 300-token day budget one request's upstream streamed
2,000 tokens, all forwarded, and the ledger showed 2,008; 23 hang-ups were
billed 140 tokens short of what the upstream had sent (what aiohttp had
read but the relay had not yet fed was never counted).
"""

from __future__ import annotations

import asyncio
import json
import socket
import time

import aiohttp
import pytest
from conftest import ALICE, gateway_config
from hostile import long_text, start_long_upstream
from proxy.tokens import count_chat_prompt, count_text

MODEL = "gpt-4o-mini"
LONG_REPLY = " ".join(f"word{i}" for i in range(1000))  # about 2,000 tokens
AUTH = {"Authorization": f"Bearer {ALICE}"}


def _budgeted(upstream_url: str, tokens_per_day: int) -> dict:
    config = gateway_config(upstream_url)
    config["teams"][0]["limits"] = {"tokens_per_day": tokens_per_day}
    return config


async def _usage(gw) -> dict:
    report = await gw.server.gateway.quotas.store.usage(now=time.time())
    return report.to_dict("day")["keys"].get("alice", {"prompt_tokens": 0, "completion_tokens": 0, "requests": 0})


def _messages(text: str) -> list[dict]:
    return [{"role": "user", "content": text}]


def _sse_content(raw: str) -> tuple[str, list[str]]:
    text, finishes = "", []
    for line in raw.split("\n"):
        if not line.startswith("data: ") or line == "data: [DONE]":
            continue
        event = json.loads(line[6:])
        for choice in event.get("choices", []):
            text += choice.get("delta", {}).get("content") or ""
            if choice.get("finish_reason"):
                finishes.append(choice["finish_reason"])
    return text, finishes


@pytest.mark.parametrize("stream", [True, False], ids=["streamed", "whole"])
async def test_an_upstream_that_ignores_max_tokens_is_cut_at_the_budget(mock_upstream, start_gateway, stream):
    budget = 300
    gw = await start_gateway(_budgeted(mock_upstream.url, budget))
    messages = _messages("go")
    prompt = count_chat_prompt(MODEL, messages)
    body = {"model": MODEL, "messages": messages, "stream": stream,
            "mock": {"reply": LONG_REPLY, "ignore_cap": True, "chunk_chars": 7}}
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=body, headers=AUTH) as resp:
            assert resp.status == 200
            if stream:
                text, finishes = _sse_content(await resp.text())
            else:
                answer = await resp.json()
                text = answer["choices"][0]["message"]["content"]
                finishes = [answer["choices"][0]["finish_reason"]]
    sent_upstream = mock_upstream.state.requests[-1]["body"]
    cap = sent_upstream.get("max_completion_tokens", sent_upstream.get("max_tokens"))
    assert cap is not None and cap <= budget - prompt
    # The mock sent all 2,000 tokens; the client got at most the cap, cut as "length".
    assert count_text(MODEL, LONG_REPLY) > 5 * budget
    assert 0 < count_text(MODEL, text) <= cap and LONG_REPLY.startswith(text)
    assert finishes == ["length"]
    usage = await _usage(gw)
    assert usage["prompt_tokens"] + usage["completion_tokens"] <= budget
    assert usage["completion_tokens"] == count_text(MODEL, text)
    # And the budget is spent: the next request is refused.
    async with aiohttp.ClientSession() as session:
        async with session.post(gw.v1 + "/chat/completions", json=body, headers=AUTH) as resp:
            assert resp.status == 429
            assert (await resp.json())["error"]["code"] == "insufficient_quota"


async def test_hang_ups_are_billed_for_what_the_upstream_sent(mock_upstream, start_gateway):
    """Many clients leave mid-stream; each is billed what the upstream had sent before the gateway hung up.

    The mock sends its first 40 pieces at once, then pauses: by the time the
    client leaves, the gateway has read all 40 off the upstream (some still
    in aiohttp's buffer, never relayed). The mock sends no usage, so the
    gateway counts.
    """
    gw = await start_gateway(gateway_config(mock_upstream.url))
    reply = "".join(f"piece{i:03d} " for i in range(200))
    sent_pieces = 40
    expected = count_text(MODEL, reply[: sent_pieces * 9])
    clients = 20

    async def hang_up(session: aiohttp.ClientSession) -> None:
        body = {"model": MODEL, "messages": _messages("go"), "stream": True,
                "mock": {"reply": reply, "chunk_chars": 9, "usage": False,
                         "stall_after": {"chunks": sent_pieces, "ms": 3000}}}
        async with session.post(gw.v1 + "/chat/completions", json=body, headers=AUTH) as resp:
            assert resp.status == 200
            await resp.content.readany()  # the first bytes
            await asyncio.sleep(0.3)  # the 40 pieces are all off the upstream by now
        # Leaving the block closes the connection: the client has gone.

    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        await asyncio.gather(*(hang_up(session) for _ in range(clients)))
    assert await mock_upstream.state.wait_for_disconnect(timeout=10, count=clients)
    for _ in range(50):
        usage = await _usage(gw)
        if usage["requests"] == clients:
            break
        await asyncio.sleep(0.1)
    assert usage["requests"] == clients
    billed = usage["completion_tokens"]
    assert abs(billed - clients * expected) <= clients, (billed, clients * expected)


async def test_a_slow_reader_that_hangs_up_is_billed_for_what_the_gateway_had_read(tmp_path, start_gateway):
    """The client reads nothing and leaves while the relay waits on it: what aiohttp had buffered counts too.

    The upstream sends its whole text (about 700 KB of events), then pauses
    before its final chunk; the clients' tiny receive buffers stop the relay
    part way, the rest waits in aiohttp's read buffer. Before the fix only
    what had been fed to the pipeline was billed.
    """
    runner, upstream_url, state = await start_long_upstream()
    try:
        gw = await start_gateway(gateway_config(upstream_url))
        spec = {"chars": 200_000, "chunk": 2000, "stall_ms": 5000}
        body = json.dumps({"model": MODEL, "messages": _messages("go"), "stream": True, "long": spec}).encode()
        request = (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {ALICE}\r\n"
                   f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n").encode() + body
        loop = asyncio.get_running_loop()
        clients = 8
        sockets = []
        for _ in range(clients):
            sock = socket.socket()
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 2048)
            sock.setblocking(False)
            await loop.sock_connect(sock, ("127.0.0.1", gw.server.port))
            await loop.sock_sendall(sock, request)
            sockets.append(sock)
        deadline = time.monotonic() + 20
        while state["sent_all"] < clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        assert state["sent_all"] == clients
        await asyncio.sleep(0.5)  # the gateway has read what it will read
        for sock in sockets:
            sock.close()
        while state["left"] < clients and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        for _ in range(50):
            usage = await _usage(gw)
            if usage["requests"] == clients:
                break
            await asyncio.sleep(0.1)
    finally:
        await runner.cleanup()
    produced = count_text(MODEL, long_text(spec["chars"], spec["chunk"]))
    billed = usage["completion_tokens"]
    assert usage["requests"] == clients
    assert abs(billed - clients * produced) <= clients * produced * 0.01, (billed, clients * produced)
