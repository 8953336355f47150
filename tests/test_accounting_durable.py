"""A settle that ``Quotas.settle_durably`` returned from survives ``kill -9`` of the process.

The child stands in for a gateway: it keeps 20 requests in flight, and as
each one's ``settle_durably`` returns (the moment the gateway would send the
client its last bytes) it prints the request id. The parent ``kill -9``-s it
in the middle of that, then opens the store itself: every printed request
must be in the ledger and in the day totals, with the day budget charged.
"""

from __future__ import annotations

import asyncio
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import pytest
import redis as redis_py

from proxy.accounting import Reservation, Subject, open_store
from proxy.accounting.redis_store import LEDGER_STREAM
from proxy.config import AccountingConfig, LimitsConfig

ROOT = Path(__file__).resolve().parent.parent

CHILD = textwrap.dedent(
    """
    import asyncio, json, sys, time
    from proxy.accounting import LedgerEntry, Subject, open_store
    from proxy.config import AccountingConfig, LimitsConfig
    from proxy.quotas import Quotas

    async def main(config, run):
        cfg = AccountingConfig(**config)
        quotas = Quotas(await open_store(cfg), cfg, lambda operation: None)
        subjects = [Subject("key", "alice", LimitsConfig()),
                    Subject("team", "research", LimitsConfig(tokens_per_day=10**9, max_concurrent_requests=10**6))]
        queue = iter(range(10**6))

        async def client():
            for i in queue:
                now = time.time()
                reservation = await quotas.store.reserve(subjects, 10, 20, now)
                entry = LedgerEntry(now, f"{run}-req-{i}", "alice", "research", "gpt-4o-mini", 10, 7, 200)
                await quotas.settle_durably(reservation, entry)
                print(f"{run}-req-{i}", flush=True)  # the client has its answer now

        await asyncio.gather(*(client() for _ in range(20)))

    asyncio.run(main(json.loads(sys.argv[1]), sys.argv[2]))
    """
)


def ledger_ids(config: dict) -> list[str]:
    if config["store"] == "sqlite":
        with sqlite3.connect(config["sqlite_path"]) as conn:
            ids = [row[0] for row in conn.execute("SELECT request_id FROM ledger")]
        conn.close()
        return ids
    with redis_py.Redis.from_url(config["redis_url"]) as admin:
        return [json.loads(fields[b"entry"])["request_id"] for _, fields in admin.xrange(LEDGER_STREAM)]


@pytest.mark.parametrize("kind", ["sqlite", "redis"])
async def test_every_request_whose_settle_returned_survives_kill_9(kind, request, tmp_path):
    config = {"store": kind, "sqlite_path": str(tmp_path / "sluice.db")}
    if kind == "redis":
        config["redis_url"] = request.getfixturevalue("redis_url")
    for run in range(3):  # three kills, each in the middle of the traffic
        child = subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(config), str(run)],
                                 stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
        answered: list[str] = []
        try:
            while len(answered) < 150:
                line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=30)
                assert line, child.stderr.read().decode()
                text = line.decode().strip()
                assert text.startswith(f"{run}-req-"), text  # anything else is a log line: a settle failed
                answered.append(text)
        finally:
            child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()
        assert child.returncode == -signal.SIGKILL

        ids = ledger_ids(config)
        assert len(ids) == len(set(ids))  # each request recorded once
        assert set(answered) <= set(ids), f"run {run}: {len(set(answered) - set(ids))} answered requests lost"

    store = await open_store(AccountingConfig(**config))
    try:
        now = time.time()
        day = (await store.usage(now=now)).keys["alice"].day
        assert day.requests == len(ids)  # the totals agree with the ledger
        assert day.total_tokens == 17 * len(ids)
        probe = await store.reserve([Subject("team", "research", LimitsConfig(tokens_per_day=10**9))], 0, 1, now)
        assert isinstance(probe, Reservation)
        # the budget holds at least every settled request (reservations of the killed processes hold more)
        assert probe.tokens.remaining <= 10**9 - 17 * len(ids) - 1
    finally:
        await store.close()


async def test_settle_durably_returns_within_its_bound_and_the_settle_lands_later(tmp_path, monkeypatch):
    from proxy import quotas as quotas_module
    from proxy.accounting import LedgerEntry
    from proxy.quotas import Quotas

    monkeypatch.setattr(quotas_module, "SETTLE_WAIT_SECONDS", 0.3)
    path = str(tmp_path / "sluice.db")
    cfg = AccountingConfig(store="sqlite", sqlite_path=path)
    quotas = Quotas(await open_store(cfg), cfg, lambda operation: None)
    subjects = [Subject("team", "research", LimitsConfig(max_concurrent_requests=5))]
    now = time.time()
    try:
        first, second = [await quotas.store.reserve(subjects, 10, 10, now) for _ in range(2)]
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")  # another process holds the file (for less than the busy timeout)
        try:
            started = time.monotonic()
            await quotas.settle_durably(first, LedgerEntry(now, "slow", "alice", "research", "m", 10, 3, 200))
            assert time.monotonic() - started < 3.0  # the bound, not sqlite's 5 s busy timeout
            # a caller cancelled while waiting (the client left) does not cancel the settle
            waiting = asyncio.ensure_future(
                quotas.settle_durably(second, LedgerEntry(now, "gone", "alice", "research", "m", 10, 4, 200)))
            await asyncio.sleep(0.05)
            waiting.cancel()
        finally:
            blocker.execute("ROLLBACK")
            blocker.close()
        await quotas.drain()
        assert quotas.pending_settles == 0  # both committed once the file was free, without a retry
        day = (await quotas.store.usage(now=now)).teams["research"].day
        assert (day.requests, day.completion_tokens) == (2, 7)
    finally:
        await quotas.close()
