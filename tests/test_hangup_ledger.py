"""A client that hangs up mid-stream: its ledger row bills exactly what the upstream had sent.

End to end: a gateway on the sqlite store, the mock upstream on loopback,
an aiohttp client that reads the first bytes and closes the connection.
The mock sends a known number of pieces at once, then stalls (so by the
time the client leaves, every one of them has been read off the upstream,
some never relayed), and sends no usage, so the gateway counts what it read.
The row is read from the sqlite file by the request's id: its
``completion_tokens`` must equal tiktoken's count of the text the upstream
sent, to the token; its status is 499.
"""

from __future__ import annotations

import asyncio
import sqlite3

import aiohttp
import pytest
from conftest import ALICE, gateway_config

from proxy.tokens import count_chat_prompt, count_text

MODEL = "gpt-4o-mini"
AUTH = {"Authorization": f"Bearer {ALICE}"}


def _ledger_row(db, request_id: str) -> tuple[int, int, int] | None:
    with sqlite3.connect(db) as conn:
        return conn.execute(
            "SELECT prompt_tokens, completion_tokens, status FROM ledger WHERE request_id = ?", (request_id,)
        ).fetchone()


@pytest.mark.parametrize(("sent_pieces", "read_first"), [(40, True), (7, True), (120, False)],
                         ids=["40-pieces", "7-pieces", "120-pieces-left-before-reading"])
async def test_a_hang_up_is_billed_what_the_upstream_sent(mock_upstream, start_gateway, tmp_path, sent_pieces, read_first):
    db = tmp_path / "ledger.db"
    gw = await start_gateway(gateway_config(mock_upstream.url, accounting={"store": "sqlite", "sqlite_path": str(db)}))
    reply = "".join(f"piece{i:03d} " for i in range(200))
    sent_text = reply[: sent_pieces * 9]
    messages = [{"role": "user", "content": "go"}]
    request_id = f"hangup-{sent_pieces}"
    body = {"model": MODEL, "messages": messages, "stream": True,
            "mock": {"reply": reply, "chunk_chars": 9, "usage": False,
                     "stall_after": {"chunks": sent_pieces, "ms": 5000}}}
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
        async with session.post(gw.v1 + "/chat/completions", json=body,
                                headers={**AUTH, "x-request-id": request_id}) as resp:
            assert resp.status == 200
            if read_first:
                assert (await resp.content.readany()).startswith(b"data: ")
            await asyncio.sleep(0.3)  # every piece before the stall is off the upstream by now
        # Leaving the block closes the connection mid-stream.
    assert await mock_upstream.state.wait_for_disconnect(timeout=10, count=1)  # the gateway hung up upstream too
    row = None
    for _ in range(100):
        row = _ledger_row(db, request_id)
        if row is not None:
            break
        await asyncio.sleep(0.05)
    assert row is not None, "no ledger row for the request"
    prompt_tokens, completion_tokens, status = row
    assert status == 499
    assert prompt_tokens == count_chat_prompt(MODEL, messages)
    assert completion_tokens == count_text(MODEL, sent_text), (completion_tokens, count_text(MODEL, sent_text))

