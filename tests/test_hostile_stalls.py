"""Nobody waits on another client's big prompt or on a reload: /healthz is timed from another client meanwhile.

Before: a 4 MB prompt held other clients up to 270 ms (eight at once:
1.5 s), and a reload of a config with 100,000 blocklist terms, parsed and
compiled on the event loop, froze every client for 0.5-3.9 s. The figures
are printed (``-s``).

The reload now parses and compiles in a thread: the loop answers other
clients meanwhile, though the compile still holds the GIL in turns. Big
prompts were already counted and moderated in threads, but that work is
pure Python holding the GIL, and the loop thread waits for it in turns:
eight 4 MB prompts still hold /healthz up to about 0.7-1 s on this shared
2-core machine (baseline worst: about 15 ms). That test is an expected
failure until the prompt work leaves the GIL (a process, or a native
matcher that releases it).
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
import pytest
from conftest import ADMIN, gateway_config
from hostile import AUTH, start_long_upstream, timed_get
from processes import GatewayProcess


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


@pytest.mark.xfail(reason="prompt moderation in threads still holds the GIL: see the module docstring", strict=False)
async def test_eight_4mb_prompts_do_not_stall_other_clients(tmp_path):
    prompt = ("lorem ipsum dolor sit amet " * 150_000)[:4_000_000]
    body = {"model": "gpt-4o-mini", "messages": [{"role": "user", "content": prompt}], "max_tokens": 5,
            "long": {"chars": 10}}
    runner, upstream_url, _ = await start_long_upstream()  # the shared mock takes bodies of 1 MB at most
    async with GatewayProcess(_moderated(upstream_url), tmp_path / "sluice.yaml") as gateway:

        async def prompts() -> None:
            async with aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=120)) as session:

                async def one() -> int:
                    async with session.post(gateway.url + "/v1/chat/completions", json=body, headers=AUTH) as resp:
                        await resp.read()
                        return resp.status

                assert await asyncio.gather(*(one() for _ in range(8))) == [200] * 8

        waits = await _healthz_while(gateway.url, prompts())
    await runner.cleanup()
    print(f"eight 4 MB prompts: /healthz worst {max(waits) * 1000:.0f} ms over {len(waits)} requests")
    assert max(waits) < 0.5, max(waits)


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
