"""The sqlite store: what survives a restart or a kill -9, the file claim, group commit."""

from __future__ import annotations

import asyncio
import calendar
import signal
import sqlite3
import subprocess
import sys
import textwrap

import pytest

from proxy.accounting import LedgerEntry, Reservation, StoreUnavailable, Subject
from proxy.accounting import sqlite_store
from proxy.accounting.sqlite_store import SqliteStore
from proxy.config import LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))


def subjects(tokens_per_day: int = 1000) -> list[Subject]:
    return [Subject("key", "alice", LimitsConfig()),
            Subject("team", "research", LimitsConfig(tokens_per_day=tokens_per_day, tokens_per_minute=100_000))]


def entry(prompt: int, completion: int, request_id: str = "req-1") -> LedgerEntry:
    return LedgerEntry(T0, request_id, "alice", "research", "gpt-4o-mini", prompt, completion, 200)


async def test_ledger_and_day_budget_survive_a_restart_but_unsettled_reservations_do_not(tmp_path):
    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    done = await store.reserve(subjects(), 100, 900, T0)
    await store.settle(done, 100, 500, T0 + 1, entry(100, 500))
    await store.record(LedgerEntry(T0, "req-2", "alice", "research", "gpt-4o-mini", 7, 0, 429))
    await store.reserve(subjects(), 100, 300, T0 + 2)  # still running when the gateway stops
    await store.close()

    store = await SqliteStore.open(path)
    try:
        report = await store.usage(now=T0 + 3)
        assert report.teams["research"].day.requests == 2
        assert report.keys["alice"].day.total_tokens == 607
        after = await store.reserve(subjects(), 100, 900, T0 + 3)
        assert after.max_tokens == 1000 - 600 - 100  # the settled 600 count, the unsettled 400 do not
        assert after.tokens.remaining == 0
    finally:
        await store.close()


CRASHING_GATEWAY = textwrap.dedent(
    """
    import asyncio, sys
    from proxy.accounting import LedgerEntry, Subject
    from proxy.accounting.sqlite_store import SqliteStore
    from proxy.config import LimitsConfig

    async def main(path, now):
        store = await SqliteStore.open(path)
        subjects = [Subject("key", "alice", LimitsConfig()),
                    Subject("team", "research", LimitsConfig(tokens_per_day=1000, tokens_per_minute=100_000))]
        reservation = await store.reserve(subjects, 100, 900, now)
        entry = LedgerEntry(now, "req-1", "alice", "research", "gpt-4o-mini", 100, 200, 200)
        await store.settle(reservation, 100, 200, now + 1, entry)
        await store.reserve(subjects, 100, 600, now + 2)  # never settled: the process dies first
        print("settled", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
    """
)


async def test_a_settled_request_survives_kill_9(tmp_path):
    path = str(tmp_path / "sluice.db")
    child = subprocess.Popen([sys.executable, "-c", CRASHING_GATEWAY, path, str(T0)],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        line = await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=20)
        assert line == b"settled\n", child.stderr.read().decode()
    finally:
        child.send_signal(signal.SIGKILL)
        child.wait()
    assert child.returncode == -signal.SIGKILL

    store = await SqliteStore.open(path)  # the dead process's claim went with it
    try:
        report = await store.usage(now=T0 + 5)
        assert report.keys["alice"].day.requests == 1
        assert report.keys["alice"].day.total_tokens == 300
        after = await store.reserve(subjects(), 100, 900, T0 + 5)
        assert after.max_tokens == 1000 - 300 - 100
    finally:
        await store.close()


async def test_the_file_serves_one_gateway_and_readers_beside_it(tmp_path):
    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    try:
        await store.record(entry(1, 2))
        with pytest.raises(StoreUnavailable, match="in use by another process"):
            await SqliteStore.open(path)
        reader = await SqliteStore.open(path, read_only=True)
        try:
            assert (await reader.usage(now=T0)).teams["research"].day.total_tokens == 3
            with pytest.raises(RuntimeError, match="read-only"):
                await reader.reserve(subjects(), 1, 1, T0)
        finally:
            await reader.close()
    finally:
        await store.close()
    await (await SqliteStore.open(path)).close()  # free again once closed


async def test_unopenable_files_are_store_unavailable(tmp_path):
    with pytest.raises(StoreUnavailable):
        await SqliteStore.open(str(tmp_path / "missing-dir" / "sluice.db"))
    with pytest.raises(StoreUnavailable):
        await SqliteStore.open(str(tmp_path / "never-created.db"), read_only=True)
    store = await SqliteStore.open(str(tmp_path / "sluice.db"))
    await store.close()
    with pytest.raises(StoreUnavailable, match="closed"):
        await store.ping()


async def test_the_writer_survives_a_write_it_cannot_store(tmp_path):
    store = await SqliteStore.open(str(tmp_path / "sluice.db"))
    try:
        with pytest.raises(OverflowError):  # SQLite integers end at 2**63
            await store.record(entry(2**70, 0))
        await store.record(entry(1, 2))
        assert (await store.usage(now=T0)).teams["research"].day.requests == 1
    finally:
        await store.close()


async def test_concurrent_settles_share_commits_and_all_land(tmp_path):
    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    team = [Subject("team", "research", LimitsConfig(max_concurrent_requests=500))]

    async def one_request(i: int) -> None:
        reservation = await store.reserve(team, 10, 10, T0)
        assert isinstance(reservation, Reservation)
        await store.settle(reservation, 10, 5, T0 + 1, entry(10, 5, request_id=f"req-{i}"))

    await asyncio.gather(*(one_request(i) for i in range(300)))
    await store.close()
    store = await SqliteStore.open(path, read_only=True)
    try:
        assert (await store.usage(now=T0)).teams["research"].day.requests == 300
    finally:
        await store.close()


async def test_saved_totals_of_ended_windows_are_pruned(tmp_path):
    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    spent = await store.reserve(subjects(), 50, 50, T0)
    await store.settle(spent, 50, 50, T0)
    await store.close()
    store = await SqliteStore.open(path)
    later = T0 + 40 * 86400
    fresh = await store.reserve(subjects(), 1, 1, later)
    await store.settle(fresh, 1, 1, later)
    await store.close()
    with sqlite3.connect(path) as conn:
        counters = [row[0] for row in conn.execute("SELECT counter FROM quota_usage ORDER BY counter")]
    assert counters == [
        "key:alice:tokens_per_day:20250224",
        "key:alice:tokens_per_month:202502",
        "team:research:tokens_per_day:20250224",
        "team:research:tokens_per_month:202502",
    ]


async def test_a_settle_whose_write_failed_is_written_by_its_retry(tmp_path, monkeypatch):
    # Another process holding the file's write lock past the busy timeout: the write fails,
    # while the counters in memory were already settled. The retry must still write it.
    monkeypatch.setattr(sqlite_store, "_BUSY_TIMEOUT_MS", 50)
    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    try:
        reservation = await store.reserve(subjects(), 10, 20, T0)
        assert isinstance(reservation, Reservation)
        blocker = sqlite3.connect(path, isolation_level=None)
        blocker.execute("BEGIN EXCLUSIVE")
        with pytest.raises(StoreUnavailable):
            await store.settle(reservation, 10, 5, T0, entry(10, 5))
        blocker.execute("ROLLBACK")
        blocker.close()

        for _ in range(2):  # the retry writes it; a second settle writes nothing more
            await store.settle(reservation, 10, 5, T0, entry(10, 5))
            day = (await store.usage(now=T0)).teams["research"].day
            assert (day.requests, day.prompt_tokens, day.completion_tokens) == (1, 10, 5)
    finally:
        await store.close()
    reopened = await SqliteStore.open(path)  # and it is what the file says after a restart
    try:
        assert (await reopened.usage(now=T0)).teams["research"].day.requests == 1
        again = await reopened.reserve(subjects(), 10, 20, T0)
        assert isinstance(again, Reservation) and again.tokens is not None
        assert again.tokens.remaining == 1000 - 15 - 30  # the day budget kept the 15 tokens used
    finally:
        await reopened.close()
