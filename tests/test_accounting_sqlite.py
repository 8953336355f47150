"""The sqlite store: what survives a restart or a kill -9, several stores on one file, group commit."""

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
from proxy.accounting import sqlite_ops
from proxy.accounting.sqlite_store import SqliteStore
from proxy.config import LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))


def subjects(tokens_per_day: int = 1000) -> list[Subject]:
    return [Subject("key", "alice", LimitsConfig()),
            Subject("team", "research", LimitsConfig(tokens_per_day=tokens_per_day, tokens_per_minute=100_000))]


def entry(prompt: int, completion: int, request_id: str = "req-1") -> LedgerEntry:
    return LedgerEntry(T0, request_id, "alice", "research", "gpt-4o-mini", prompt, completion, 200)


async def test_the_ledger_the_budgets_and_open_reservations_survive_a_restart(tmp_path):
    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    done = await store.reserve(subjects(2000), 100, 900, T0)
    await store.settle(done, 100, 500, T0 + 1, entry(100, 500))
    await store.record(LedgerEntry(T0, "req-2", "alice", "research", "gpt-4o-mini", 7, 0, 429))
    running = await store.reserve(subjects(2000), 100, 300, T0 + 2)  # still running when this process stops
    await store.close()

    store = await SqliteStore.open(path)
    try:
        report = await store.usage(now=T0 + 3)
        assert report.teams["research"].day.requests == 2
        assert report.keys["alice"].day.total_tokens == 607
        after = await store.reserve(subjects(2000), 100, 900, T0 + 3)
        # the settled 600 count, and so do the 400 reserved by the request still open
        assert after.max_tokens == 2000 - 600 - 400 - 100
        await store.settle(running, 100, 50, T0 + 4, entry(100, 50, "req-3"))  # settled by the next process
        probe = await store.reserve(subjects(2000), 0, 1, T0 + 5)
        assert probe.tokens.remaining == 2000 - 600 - 150 - 1000 - 1
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
                    Subject("team", "research", LimitsConfig(tokens_per_day=5000, tokens_per_minute=100_000))]
        reservation = await store.reserve(subjects, 100, 900, now)
        entry = LedgerEntry(now, "req-1", "alice", "research", "gpt-4o-mini", 100, 200, 200)
        await store.settle(reservation, 100, 200, now + 1, entry)
        await store.reserve(subjects, 100, 600, now + 2)  # never settled: the process dies first
        print("settled", flush=True)
        await asyncio.sleep(60)

    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
    """
)


async def test_a_settled_request_survives_kill_9_and_an_open_one_holds_its_window(tmp_path):
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

    store = await SqliteStore.open(path)
    try:
        report = await store.usage(now=T0 + 5)
        assert report.keys["alice"].day.requests == 1
        assert report.keys["alice"].day.total_tokens == 300
        after = await store.reserve(subjects(5000), 100, 9000, T0 + 5)
        assert after.max_tokens == 5000 - 300 - 700 - 100  # the dead process's 700 hold until the day ends
        tomorrow = await store.reserve(subjects(5000), 100, 9000, T0 + 86400)
        assert tomorrow.max_tokens == 5000 - 100
    finally:
        await store.close()


async def test_several_stores_share_one_file_and_readers_sit_beside_them(tmp_path):
    path = str(tmp_path / "sluice.db")
    first, second = await SqliteStore.open(path), await SqliteStore.open(path)
    try:
        limited = [Subject("team", "research", LimitsConfig(requests_per_minute=3))]
        outcomes = [await store.reserve(limited, 1, 1, T0) for store in (first, second, first, second)]
        assert [isinstance(o, Reservation) for o in outcomes] == [True, True, True, False]
        await first.record(entry(1, 2))
        reader = await SqliteStore.open(path, read_only=True)
        try:
            assert (await reader.usage(now=T0)).teams["research"].day.total_tokens == 3
            with pytest.raises(RuntimeError, match="read-only"):
                await reader.reserve(subjects(), 1, 1, T0)
        finally:
            await reader.close()
    finally:
        await first.close()
        await second.close()


async def test_a_file_of_the_previous_schema_keeps_its_day_budget(tmp_path):
    path = str(tmp_path / "old.db")
    with sqlite3.connect(path) as conn:
        conn.execute("CREATE TABLE quota_usage (counter TEXT PRIMARY KEY, tokens INTEGER NOT NULL, "
                     "expires REAL NOT NULL) WITHOUT ROWID")
        conn.execute("INSERT INTO quota_usage VALUES ('team:research:tokens_per_day:20250115', 400, ?)",
                     (T0 + 86400,))
    conn.close()
    store = await SqliteStore.open(path)
    try:
        admitted = await store.reserve(subjects(1000), 100, 900, T0)
        assert admitted.max_tokens == 1000 - 400 - 100
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        assert conn.execute("SELECT name FROM sqlite_master WHERE name = 'quota_usage'").fetchone() is None
    conn.close()


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


async def test_ended_windows_expired_slots_and_old_reservations_are_pruned(tmp_path):
    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    held = subjects() + [Subject("key", "bob", LimitsConfig(max_concurrent_requests=2))]
    spent = await store.reserve(held, 50, 50, T0)
    await store.settle(spent, 50, 50, T0)
    await store.reserve(held, 1, 1, T0)  # never settled: its slot and tokens go with their lease and windows
    await store.close()
    store = await SqliteStore.open(path)
    later = T0 + 40 * 86400
    fresh = await store.reserve(subjects(), 1, 1, later)  # the first reserve of a process prunes
    await store.settle(fresh, 1, 1, later)
    await store.close()
    with sqlite3.connect(path) as conn:
        counters = dict(conn.execute("SELECT counter, value FROM quota_counters ORDER BY counter"))
        slots = conn.execute("SELECT count(*) FROM quota_slots").fetchone()[0]
    conn.close()
    # the never-settled reservation's marker, slot and windows are gone; bob's slot count is back at zero
    assert counters == {
        "key:alice:tokens_per_day:20250224": 2,
        "key:alice:tokens_per_month:202502": 2,
        "key:bob": 0,
        "team:research:tokens_per_day:20250224": 2,
        "team:research:tokens_per_minute:202502241234": 2,
        "team:research:tokens_per_month:202502": 2,
    }
    assert slots == 0


async def test_a_settle_whose_write_failed_is_written_by_its_retry(tmp_path, monkeypatch):
    # Another process holding the file's write lock past the busy timeout: the write fails,
    # while the counters in memory were already settled. The retry must still write it.
    monkeypatch.setattr(sqlite_ops, "BUSY_TIMEOUT_MS", 50)
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


async def test_a_bad_settle_fails_its_caller_alone(tmp_path):
    store = await SqliteStore.open(str(tmp_path / "sluice.db"))
    try:
        good = [await store.reserve(subjects(), 10, 10, T0) for _ in range(3)]
        rejected = await store.reserve([Subject("team", "research", LimitsConfig(tokens_per_day=1))], 10, 10, T0)
        outcomes = await asyncio.gather(
            *(store.settle(r, 10, 5, T0, entry(10, 5, f"ok-{i}")) for i, r in enumerate(good)),
            store.settle(rejected, 10, 5, T0, entry(10, 5, "bad")),  # a caller's bug: not a reservation
            return_exceptions=True,
        )
        assert outcomes[:3] == [None] * 3
        assert isinstance(outcomes[3], AttributeError)
        assert (await store.usage(now=T0)).teams["research"].day.requests == 3
    finally:
        await store.close()


async def test_a_gateway_of_the_version_that_claimed_the_file_is_kept_out(tmp_path):
    import fcntl
    import os

    path = str(tmp_path / "sluice.db")
    old = os.open(f"{path}.lock", os.O_RDWR | os.O_CREAT, 0o644)
    try:
        fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)  # what the previous version held while it ran
        with pytest.raises(StoreUnavailable, match="older version"):
            await SqliteStore.open(path)
        fcntl.flock(old, fcntl.LOCK_UN)
        store = await SqliteStore.open(path)
        try:  # and the other way round: the previous version's claim now fails
            with pytest.raises(BlockingIOError):
                fcntl.flock(old, fcntl.LOCK_EX | fcntl.LOCK_NB)
        finally:
            await store.close()
    finally:
        os.close(old)


async def test_counters_expire_with_their_window_and_slot_counts_never(tmp_path):
    from proxy.accounting.quota import plan

    path = str(tmp_path / "sluice.db")
    store = await SqliteStore.open(path)
    held = subjects() + [Subject("key", "bob", LimitsConfig(max_concurrent_requests=2))]
    try:
        reservation = await store.reserve(held, 10, 10, T0)
        await store.settle(reservation, 10, 5, T0 + 1)
    finally:
        await store.close()
    with sqlite3.connect(path) as conn:
        expires = dict(conn.execute("SELECT counter, expires FROM quota_counters"))
    conn.close()
    wanted = {check.counter: check.expires for check in plan(held, T0).checks}
    assert expires == wanted  # concurrency counts: math.inf
