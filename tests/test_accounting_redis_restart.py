"""Redis killed and restarted empty while requests are in flight: no settle is lost, none counts twice.

A real redis-server, ``kill -9``-ed and started again on the same port with
nothing persisted, is what a crashed or evicted Redis pod looks like to the
gateway: every reservation marker, counter and ledger row is gone.
"""

from __future__ import annotations

import asyncio
import calendar
import time

import redis as redis_py
from structlog.testing import capture_logs

from proxy.accounting import LedgerEntry, Reservation, Subject
from proxy.accounting.quota import windows
from proxy.accounting.redis_store import LEDGER_STREAM, RedisStore
from proxy.config import AccountingConfig, LimitsConfig
from proxy.quotas import SETTLE_RETRY_SECONDS, Quotas

SUBJECTS = [Subject("key", "alice", LimitsConfig()),
            Subject("team", "research", LimitsConfig(tokens_per_minute=1_000_000, tokens_per_day=10_000_000,
                                                     max_concurrent_requests=100))]


def entry(i: int, at: float, completion: int) -> LedgerEntry:
    return LedgerEntry(at, f"req-{i}", "alice", "research", "gpt-4o-mini", 100, completion, 200)


def counter(admin: redis_py.Redis, limit: str, now: float) -> int:
    minute, day, _ = windows(now)
    window = minute.id if limit == "tokens_per_minute" else day.id
    return int(admin.get(f"sluice:q:team:research:{limit}:{window}") or 0)


async def test_settles_after_an_empty_restart_write_their_rows_and_counters_once(redis_server_factory):
    server = redis_server_factory()
    replicas = [RedisStore(server.url), RedisStore(server.url)]
    now = time.time()  # real time: the counters' TTLs are computed from it
    try:
        held = await asyncio.gather(*(replicas[i % 2].reserve(SUBJECTS, 100, 500, now) for i in range(20)))
        assert all(isinstance(r, Reservation) for r in held)
        server.kill()
        server.start()  # the same port, empty

        with capture_logs() as logs:
            await asyncio.gather(*(replicas[i % 2].settle(r, 100, 10 + i, now + 1, entry(i, now, 10 + i))
                                   for i, r in enumerate(held)))
        assert sum(1 for line in logs if line["log_level"] == "warning" and "lost a reservation" in line["event"]) == 20
        used = sum(100 + 10 + i for i in range(20))
        with redis_py.Redis.from_url(server.url) as admin:
            assert admin.xlen(LEDGER_STREAM) == 20
            assert counter(admin, "tokens_per_minute", now) == used
            assert counter(admin, "tokens_per_day", now) == used
            day = (await replicas[0].usage(now=now)).teams["research"].day
            assert (day.requests, day.total_tokens) == (20, used)

            # settled again (a retried settle whose reply was lost): each is a repeat
            await asyncio.gather(*(replicas[(i + 1) % 2].settle(r, 100, 10 + i, now + 2, entry(i, now, 10 + i))
                                   for i, r in enumerate(held)))
            assert admin.xlen(LEDGER_STREAM) == 20
            assert counter(admin, "tokens_per_day", now) == used
    finally:
        for store in replicas:
            await store.close()


async def test_a_normal_settle_logs_nothing_and_a_repeat_does_nothing(redis_url):
    store = RedisStore(redis_url)
    now = time.time()
    try:
        reservation = await store.reserve(SUBJECTS, 100, 500, now)
        with capture_logs() as logs:
            await store.settle(reservation, 100, 50, now, entry(1, now, 50))
            await store.settle(reservation, 100, 50, now, entry(1, now, 50))
        assert logs == []
        with redis_py.Redis.from_url(redis_url) as admin:
            assert admin.xlen(LEDGER_STREAM) == 1
            assert counter(admin, "tokens_per_day", now) == 150
    finally:
        await store.close()


async def test_the_retry_queue_lands_on_a_redis_that_came_back_empty(redis_server_factory):
    server = redis_server_factory()
    errors: list[str] = []
    quotas = Quotas(RedisStore(server.url, timeout_seconds=0.5),
                    AccountingConfig(store="redis", redis_url=server.url), errors.append)
    now = time.time()
    try:
        held = [await quotas.store.reserve(SUBJECTS, 100, 500, now) for _ in range(5)]
        server.kill()
        started = time.monotonic()
        for i, reservation in enumerate(held):  # the request path's call: returns, never raises
            await quotas.settle_durably(reservation, entry(i, now, 40))
        assert time.monotonic() - started < 5 * 2.5  # each within its bound (generous: no hang)
        assert quotas.pending_settles == 5 and errors == ["settle"] * 5
        await asyncio.sleep(SETTLE_RETRY_SECONDS * 1.5)  # a retry while Redis is still down
        assert quotas.pending_settles == 5

        server.start()  # back, empty
        for _ in range(100):
            if quotas.pending_settles == 0:
                break
            await asyncio.sleep(0.1)
        assert quotas.pending_settles == 0
        with redis_py.Redis.from_url(server.url) as admin:
            assert admin.xlen(LEDGER_STREAM) == 5
            assert counter(admin, "tokens_per_day", now) == 5 * 140
        day = (await quotas.store.usage(now=now)).keys["alice"].day
        assert (day.requests, day.completion_tokens) == (5, 5 * 40)
    finally:
        await quotas.close()


async def test_a_settle_more_than_a_day_late_still_reaches_the_ledger(redis_url):
    # The reservation marker expires after a day; the request was served all the same.
    store = RedisStore(redis_url)
    t0 = calendar.timegm((2025, 1, 15, 12, 34, 30))
    try:
        reservation = await store.reserve(SUBJECTS, 100, 500, t0)
        with redis_py.Redis.from_url(redis_url) as admin:
            admin.delete(f"sluice:r:{reservation.id}")  # what its expiry does
            await store.settle(reservation, 100, 20, t0 + 86400 + 5, entry(1, t0, 20))
            assert admin.xlen(LEDGER_STREAM) == 1
        month = (await store.usage(now=t0)).teams["research"].month
        assert (month.requests, month.total_tokens) == (1, 120)
    finally:
        await store.close()


async def test_a_renewal_while_redis_is_down_is_counted_not_raised(redis_server_factory):
    server = redis_server_factory()
    errors: list[str] = []
    quotas = Quotas(RedisStore(server.url, timeout_seconds=0.5),
                    AccountingConfig(store="redis", redis_url=server.url), errors.append)
    try:
        held = await quotas.store.reserve(SUBJECTS, 1, 1, time.time())
        await quotas.renew(held)
        assert errors == []
        server.kill()
        await quotas.renew(held)
        assert errors == ["renew"]
        await quotas.renew(None)  # admitted unmetered (store down, fail open): nothing to renew
    finally:
        server.start()
        await quotas.close()
