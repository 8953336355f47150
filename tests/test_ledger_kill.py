"""A client that has its answer finds it in the ledger, also after ``kill -9`` of the gateway.

The gateway settles durably before the client's last bytes (``[DONE]``, or a
whole body), so every answer a client received completely is a committed
ledger row when the process dies a moment later.
"""

from __future__ import annotations

import asyncio
import signal
import sqlite3

import aiohttp

from conftest import ALICE, gateway_config
from processes import GatewayProcess

STREAMS = 50
RUNS = 3


async def _one(session: aiohttp.ClientSession, url: str, i: int, stream: bool) -> str | None:
    """The request id of a completed answer, or None if the gateway died first."""
    body = {"model": "gpt-4o-mini", "stream": stream, "messages": [{"role": "user", "content": f"answer {i} " * 5}],
            "mock": {"delay_ms": 2 * (i % 10)}}
    request_id = f"kill-{i}-{stream}"
    try:
        async with session.post(url + "/v1/chat/completions", json=body,
                                headers={"Authorization": f"Bearer {ALICE}", "x-request-id": request_id}) as resp:
            raw = await resp.read()
            if resp.status != 200:
                return None
            if stream and not raw.rstrip().endswith(b"data: [DONE]"):
                return None
            return request_id
    except (aiohttp.ClientError, asyncio.TimeoutError):
        return None


async def test_no_answer_a_client_received_is_lost_on_kill_9(mock_upstream, tmp_path):
    db = tmp_path / "ledger.db"
    config = gateway_config(mock_upstream.url, accounting={"store": "sqlite", "sqlite_path": str(db)},
                            teams=[{"name": "research", "models": ["*"], "limits": {"tokens_per_day": 10_000_000}},
                                   {"name": "interns", "models": ["gpt-4o-mini"]}])
    received: set[str] = set()
    for run in range(RUNS):
        gateway = GatewayProcess(config, tmp_path / f"run{run}.yaml")
        async with gateway:
            async with aiohttp.ClientSession() as session:
                tasks = [asyncio.ensure_future(_one(session, gateway.url, run * 1000 + i, stream=i % 2 == 0))
                         for i in range(STREAMS)]
                done, _ = await asyncio.wait(tasks, return_when=asyncio.FIRST_COMPLETED)
                await asyncio.sleep(0.05)  # some finished, most in flight
                await gateway.stop(signal.SIGKILL)
                results = await asyncio.gather(*tasks)
        received.update(r for r in results if r)
    assert received, "no answer completed before the kills"
    with sqlite3.connect(db) as conn:
        ledger = {row[0] for row in conn.execute("SELECT request_id FROM ledger")}
    assert received <= ledger, sorted(received - ledger)
