"""The redis store's batching (``_Pipeline``), on a real redis-server.

Many callers share one connection and one write per loop turn; each still
gets its own answer, failures reach every caller they concern, and a broken
connection or forgotten scripts heal without an error.
"""

from __future__ import annotations

import asyncio
import calendar
import time

import pytest
import redis as redis_py
import redis.asyncio as aioredis

from proxy.accounting import (
    LedgerEntry,
    Rejection,
    Reservation,
    StoreUnavailable,
    Subject,
)
from proxy.accounting.quota import plan
from proxy.accounting.redis_store import RedisStore
from proxy.config import LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))


def team(name: str = "research", key: str = "alice", **limits: int) -> list[Subject]:
    return [Subject("key", key, LimitsConfig()), Subject("team", name, LimitsConfig(**limits))]


def entry(i: int, team_name: str = "research") -> LedgerEntry:
    return LedgerEntry(T0, f"req-{i}", "alice", team_name, "gpt-4o-mini", 10, 5, 200)


@pytest.fixture
async def store(redis_url):
    store = RedisStore(redis_url)
    yield store
    await store.close()


def count_writes(store: RedisStore) -> list[int]:
    """Counts the pipeline's socket writes (a spy on the real connection, not a mock of Redis)."""
    connection = store._pipeline._connection
    send = connection.send_packed_command
    writes = [0]

    async def counting(command, check_health=True):
        writes[0] += 1
        await send(command, check_health=check_health)

    connection.send_packed_command = counting
    return writes


async def test_concurrent_callers_share_writes_and_each_gets_its_own_answer(store):
    await store.ping()  # connected
    writes = count_writes(store)
    teams = [team(f"t{i % 4}", requests_per_minute=10 * (i % 4 + 1)) for i in range(4)]
    outcomes = await asyncio.gather(*(store.reserve(teams[i % 4], 10, 10, T0) for i in range(200)))
    assert writes[0] <= 3
    for i in range(4):
        mine = [o for n, o in enumerate(outcomes) if n % 4 == i]
        admitted = [o for o in mine if isinstance(o, Reservation)]
        assert len(admitted) == 10 * (i + 1)
        assert sorted(o.requests.remaining for o in admitted) == list(range(10 * (i + 1)))
        assert all(isinstance(o, Rejection) for o in mine if not isinstance(o, Reservation))
    settles = [
        store.settle(o, 10, 5, T0, entry(n, f"t{n % 4}")) for n, o in enumerate(outcomes) if isinstance(o, Reservation)
    ]
    await asyncio.gather(*settles)
    usage = await store.usage(now=T0)
    assert sum(usage.teams[f"t{i}"].day.requests for i in range(4)) == 100


async def test_a_settle_queued_before_a_reserve_is_applied_before_it(store):
    """Commands reach Redis in the order they were queued, so a freed slot is free for the next reserve."""
    subjects = team(max_concurrent_requests=1)
    held = await store.reserve(subjects, 1, 1, T0)
    settled = asyncio.ensure_future(store.settle(held, 1, 1, T0))
    await asyncio.sleep(0)  # the settle is queued (as the gateway's settle task is, long before the next request)
    again = await store.reserve(subjects, 1, 1, T0)
    await settled
    assert isinstance(again, Reservation)


async def test_a_broken_connection_is_replaced_without_an_error(store, redis_url):
    subjects = team(requests_per_minute=10)
    await store.reserve(subjects, 1, 1, T0)
    with redis_py.Redis.from_url(redis_url) as admin:
        assert admin.client_kill_filter(_type="normal", skipme=True) >= 1
    outcomes = await asyncio.gather(*(store.reserve(subjects, 1, 1, T0) for _ in range(5)))
    assert [o.requests.remaining for o in outcomes] == [8, 7, 6, 5, 4]


async def test_forgotten_scripts_are_loaded_again(store, redis_url):
    subjects = team(requests_per_minute=10, tokens_per_minute=1000)
    held = await store.reserve(subjects, 100, 100, T0)
    with redis_py.Redis.from_url(redis_url) as admin:
        admin.script_flush()
    outcome, _ = await asyncio.gather(store.reserve(subjects, 10, 10, T0), store.settle(held, 100, 50, T0, entry(1)))
    assert outcome.requests.remaining == 8
    await store.record(entry(2))
    assert (await store.usage(now=T0)).teams["research"].day.requests == 2


async def test_a_paused_redis_fails_the_whole_batch_and_a_retried_settle_counts_once(redis_url):
    store = RedisStore(redis_url, timeout_seconds=0.5)
    subjects = team(requests_per_minute=10, tokens_per_minute=1000, max_concurrent_requests=1)
    try:
        held = await store.reserve(subjects, 100, 400, T0)
        with redis_py.Redis.from_url(redis_url) as admin:
            admin.execute_command("CLIENT", "PAUSE", 1500, "WRITE")
        started = time.monotonic()
        results = await asyncio.gather(
            store.settle(held, 100, 50, T0, entry(1)), store.reserve(subjects, 1, 1, T0), return_exceptions=True
        )
        assert time.monotonic() - started < 1.4
        assert all(isinstance(r, StoreUnavailable) and "no reply within 0.5s" in str(r) for r in results)
        await asyncio.sleep(1.2)  # the pause is over
        await store.settle(held, 100, 50, T0, entry(1))  # what Quotas' retry does
        await store.settle(held, 100, 50, T0, entry(1))  # and once more: nothing happens
        probe = await store.reserve(subjects, 0, 1, T0)
        assert probe.tokens.remaining == 1000 - 150 - 1
        assert (await store.usage(now=T0)).teams["research"].day.requests == 1
    finally:
        await store.close()


async def test_a_caller_that_leaves_does_not_disturb_the_others(store):
    subjects = team(requests_per_minute=100)
    await store.ping()
    calls = [asyncio.ensure_future(store.reserve(subjects, 1, 1, T0)) for _ in range(20)]
    await asyncio.sleep(0)  # all queued, none answered
    calls[3].cancel()
    done = await asyncio.gather(*calls, return_exceptions=True)
    assert isinstance(done[3], asyncio.CancelledError)
    answered = [o for o in done if isinstance(o, Reservation)]
    assert len(answered) == 19
    # the cancelled one reached Redis anyway, as a reserve cancelled mid-command always could
    assert len({o.requests.remaining for o in answered}) == 19


async def test_close_sends_what_is_queued(redis_url):
    store = RedisStore(redis_url)
    held = await store.reserve(team(), 1, 1, T0)
    settling = asyncio.ensure_future(store.settle(held, 1, 1, T0, entry(1)))
    await asyncio.sleep(0)
    await store.close()
    await settling
    reader = RedisStore(redis_url)
    try:
        assert (await reader.usage(now=T0)).teams["research"].day.requests == 1
    finally:
        await reader.close()


async def test_counters_beyond_lua_number_formatting_stay_exact(store, redis_url):
    """Lua prints numbers from 1e14 up in exponent notation; the scripts format integers with %d."""
    subjects = team(tokens_per_month=10**16)
    month = next(c for c in plan(subjects, T0).checks if c.limit_name == "tokens_per_month" and c.subject.kind == "team")
    control = aioredis.Redis.from_url(redis_url)
    try:
        await control.set(f"sluice:q:{month.counter}", 123_456_789_012_345)
        outcome = await store.reserve(subjects, 1000, 0, T0)
        assert outcome.tokens.remaining == 10**16 - 123_456_789_012_345 - 1000
        again = await store.reserve(subjects, 5 * 10**14, 0, T0)
        await store.settle(again, 5 * 10**14 - 3, 0, T0)
        assert int(await control.get(f"sluice:q:{month.counter}")) == 123_456_789_012_345 + 1000 + 5 * 10**14 - 3
    finally:
        await control.aclose()
