"""Nobody waits on another client's big prompt or on a reload: /healthz is timed from another client meanwhile.

Before: a 4 MB prompt held other clients up to 270 ms (eight at once:
1.5 s), and a reload of a config with 100,000 blocklist terms, parsed and
compiled on the event loop, froze every client for 0.5-3.9 s. The figures
are printed (``-s``).

The reload now parses and compiles in a thread: the loop answers other
clients meanwhile, though the compile still holds the GIL in turns.

Big prompts were counted and moderated in threads, but moderation is pure
Python holding the GIL, and the loop thread got it back only in turns:
eight 4 MB prompts held /healthz for 3.3 s. Now a big prompt is moderated
on the loop in turns of about 1 ms, one big prompt's turn per loop
iteration, and parsed and counted in one thread of its own (tiktoken
releases the GIL): ``proxy/prompt_turns.py``. /healthz waits about one
turn. The moderation of a prompt in slices is the moderation of the whole
prompt: a match across a slice boundary is found as in one piece.
"""

from __future__ import annotations

import asyncio
import re
import time

import aiohttp
import orjson
from aiohttp import web
from conftest import ADMIN, free_port, gateway_config
from hostile import AUTH, timed_get
from processes import GatewayProcess

from proxy import prompt_turns


async def _healthz_while(url: str, work) -> list[float]:
    """/healthz every 10 ms, from its own connection, until ``work`` is done; the waits."""
    waits: list[float] = []
    async with aiohttp.ClientSession() as session:
        await timed_get(session, url + "/healthz")  # the connection is open before the work starts
        task = asyncio.ensure_future(work)
        while not task.done():
            waits.append(await timed_get(session, url + "/healthz"))
            await asyncio.sleep(0.01)
        await task
    return waits


def _moderated(upstream_url: str, terms_file: str | None = None) -> dict:
    config = gateway_config(upstream_url)
    rule = {"name": "banned", "type": "terms", "terms": ["forbidden phrase"], "action": "block"}
    if terms_file:
        rule["terms_file"] = terms_file
    config["moderation"] = {"rules": [rule]}
    return config


async def _start_big_prompt_upstream() -> tuple[web.AppRunner, str, list[bytes]]:
    """An upstream that reads a prompt of any size without parsing it (so the test process stays idle) and answers "ok".

    It keeps the bodies it was sent, for the tests that check what went upstream.
    """
    bodies: list[bytes] = []

    async def chat(request: web.Request) -> web.Response:
        bodies.append(await request.read())
        return web.json_response(
            {"id": "chatcmpl-big", "object": "chat.completion", "created": 0, "model": "gpt-4o-mini",
             "choices": [{"index": 0, "message": {"role": "assistant", "content": "ok"}, "finish_reason": "stop"}],
             "usage": {"prompt_tokens": 1, "completion_tokens": 1, "total_tokens": 2}}
        )

    app = web.Application(client_max_size=16 << 20)
    app.router.add_post("/v1/chat/completions", chat)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    return runner, f"http://127.0.0.1:{port}/v1", bodies


def _chat_bytes(prompt: str) -> bytes:
    return orjson.dumps({"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], "max_tokens": 5})


async def _post(session: aiohttp.ClientSession, url: str, data: bytes) -> tuple[int, dict]:
    headers = {**AUTH, "Content-Type": "application/json"}
    async with session.post(url + "/v1/chat/completions", data=data, headers=headers) as resp:
        return resp.status, await resp.json()


async def test_eight_4mb_prompts_do_not_stall_other_clients(tmp_path):
    """Before: 3.3 s worst (moderated in threads, holding the GIL); now about one turn of moderation."""
    data = _chat_bytes(("lorem ipsum dolor sit amet " * 150_000)[:4_000_000])  # encoded once, not on the timed loop
    runner, upstream_url, _ = await _start_big_prompt_upstream()
    async with GatewayProcess(_moderated(upstream_url), tmp_path / "sluice.yaml") as gateway:

        async def prompts() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                answers = await asyncio.gather(*(_post(session, gateway.url, data) for _ in range(8)))
            assert [status for status, _ in answers] == [200] * 8, answers

        waits = await _healthz_while(gateway.url, prompts())
    await runner.cleanup()
    print(f"eight 4 MB prompts: /healthz worst {max(waits) * 1000:.0f} ms over {len(waits)} requests")
    # The target is 50 ms; the bound leaves room for this shared VM's noise.
    assert len(waits) > 10 and max(waits) < 0.25, (len(waits), max(waits))


async def test_a_big_prompt_moderated_in_turns_is_moderated_like_a_small_one(tmp_path):
    """A match across every slice boundary is still found: redacted exactly upstream, or blocked."""
    config = gateway_config("")
    config["moderation"] = {"rules": [
        {"name": "banned", "type": "terms", "terms": ["forbidden phrase"], "action": "block"},
        {"name": "email", "type": "pii", "entity": "email", "action": "redact"},
    ]}
    filler = "lorem ipsum dolor sit amet " * 40_000  # about a megabyte: hundreds of slices
    size = prompt_turns.SLICE_CHARS
    # Each address starts 5 characters before a multiple of the slice size: it straddles two slices.
    pieces, length = [], 0
    for k in range(1, 30):
        start = k * size - 5
        address = f"user{k}@example.com "
        pieces += [filler[: start - length - 1] + " ", address]
        length = start + len(address)
    pieces.append(filler[:100_000])
    redacted_prompt = "".join(pieces)
    runner, upstream_url, bodies = await _start_big_prompt_upstream()
    config["upstreams"][0]["base_url"] = upstream_url
    async with GatewayProcess(config, tmp_path / "sluice.yaml") as gateway:
        async with aiohttp.ClientSession() as session:
            status, _ = await _post(session, gateway.url, _chat_bytes(redacted_prompt))
            assert status == 200
            sent = orjson.loads(bodies[-1])["messages"][0]["content"]
            assert "@example.com" not in sent and sent.count("[REDACTED:email]") == 29
            assert sent == re.sub(r"user\d+@example\.com", "[REDACTED:email]", redacted_prompt)

            boundary = 20 * size
            blocked = filler[: boundary - 7] + " forbidden phrase " + filler[boundary - 7 :]
            status, answer = await _post(session, gateway.url, _chat_bytes(blocked))
            assert status == 400 and answer["error"]["code"] == "content_filter", answer
            assert len(bodies) == 1  # the blocked prompt never went upstream
    await runner.cleanup()


async def test_a_reload_of_100000_terms_does_not_stall_other_clients(mock_upstream, tmp_path):
    terms = tmp_path / "terms.txt"
    terms.write_text("\n".join(f"blockedterm{i} variant{i % 97}" for i in range(100_000)) + "\n")
    async with GatewayProcess(_moderated(mock_upstream.url, str(terms)), tmp_path / "sluice.yaml") as gateway:

        took: list[float] = []

        async def reload() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:
                started = time.monotonic()
                async with session.post(gateway.url + "/admin/reload", headers={"Authorization": f"Bearer {ADMIN}"}) as resp:
                    assert resp.status == 200, await resp.text()
                took.append(time.monotonic() - started)

        waits = await _healthz_while(gateway.url, reload())
    print(f"reload of 100,000 terms took {took[0]:.2f} s: /healthz worst {max(waits) * 1000:.0f} ms over {len(waits)} requests")
    # On the loop, the reload answered no one until it was done: one wait as long as the reload.
    assert len(waits) > 5 and max(waits) < took[0] / 2, (took, len(waits), max(waits))
