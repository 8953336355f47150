"""The redis store on a real redis-server: replicas share limits exactly, and outages heal by themselves."""

from __future__ import annotations

import asyncio
import calendar
import dataclasses
import json
import random
import sys
import textwrap
import time

import pytest
import redis.asyncio as aioredis

from proxy.accounting import (
    LedgerEntry,
    Rejection,
    Reservation,
    StoreUnavailable,
    Subject,
    redis_scripts,
)
from proxy.accounting.quota import plan
from proxy.accounting.redis_store import RedisStore
from proxy.config import LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))


def team_with(key: str = "alice", **limits: int) -> list[Subject]:
    return [Subject("key", key, LimitsConfig()), Subject("team", "research", LimitsConfig(**limits))]


@pytest.fixture
async def replicas(redis_url):
    """Two stores on one Redis, as two gateway replicas would have."""
    stores = [RedisStore(redis_url), RedisStore(redis_url)]
    yield stores
    for store in stores:
        await store.close()


async def test_two_replicas_admit_exactly_the_request_limit(replicas):
    subjects = team_with(requests_per_minute=50)
    outcomes = await asyncio.gather(*(replicas[i % 2].reserve(subjects, 10, 10, T0) for i in range(200)))
    admitted = [o for o in outcomes if isinstance(o, Reservation)]
    assert len(admitted) == 50
    assert all(o.limit_name == "requests_per_minute" for o in outcomes if isinstance(o, Rejection))
    assert sorted(o.requests.remaining for o in admitted) == list(range(50))


async def test_two_replicas_never_reserve_past_a_token_limit(replicas):
    rng = random.Random(3)
    subjects = team_with(tokens_per_minute=10_000)
    requests = [(rng.randint(0, 400), rng.randint(1, 800)) for _ in range(200)]
    outcomes = await asyncio.gather(
        *(replicas[i % 2].reserve(subjects, p, m, T0) for i, (p, m) in enumerate(requests))
    )
    admitted = [o for o in outcomes if isinstance(o, Reservation)]
    assert sum(o.reserved_tokens for o in admitted) <= 10_000
    assert any(o.max_tokens < m for o, (_, m) in zip(outcomes, requests) if isinstance(o, Reservation))
    # settling half from the other replica, then filling up again, still never passes the limit
    await asyncio.gather(*(replicas[1].settle(o, o.prompt_tokens, 0, T0 + 1) for o in admitted[::2]))
    refill = await asyncio.gather(*(replicas[0].reserve(subjects, 50, 800, T0 + 2) for _ in range(100)))
    held = sum(o.reserved_tokens for o in admitted[1::2]) + sum(o.prompt_tokens for o in admitted[::2])
    held += sum(o.reserved_tokens for o in refill if isinstance(o, Reservation))
    assert held <= 10_000
    assert min(o.tokens.remaining for o in refill if isinstance(o, Reservation)) >= 0


ANOTHER_GATEWAY = textwrap.dedent(
    """
    import asyncio, sys
    import redis.asyncio as aioredis
    from proxy.accounting import Reservation, Subject
    from proxy.accounting.redis_store import RedisStore
    from proxy.config import LimitsConfig

    async def main(url, now):
        store = RedisStore(url)
        subjects = [Subject("key", "bob", LimitsConfig()),
                    Subject("team", "research", LimitsConfig(requests_per_minute=50))]
        control = aioredis.Redis.from_url(url)
        print("ready", flush=True)
        await control.blpop(["test:go"], timeout=20)
        outcomes = await asyncio.gather(*(store.reserve(subjects, 5, 5, now) for _ in range(100)))
        print(sum(isinstance(o, Reservation) for o in outcomes), flush=True)
        await control.aclose()
        await store.close()

    asyncio.run(main(sys.argv[1], float(sys.argv[2])))
    """
)


async def test_two_processes_admit_exactly_the_request_limit(redis_url):
    child = await asyncio.create_subprocess_exec(
        sys.executable, "-c", ANOTHER_GATEWAY, redis_url, str(T0),
        stdout=asyncio.subprocess.PIPE, stderr=asyncio.subprocess.PIPE,
    )
    store = RedisStore(redis_url)
    control = aioredis.Redis.from_url(redis_url)
    try:
        ready = await asyncio.wait_for(child.stdout.readline(), timeout=20)
        assert ready == b"ready\n", (await child.stderr.read()).decode()
        await control.rpush("test:go", 1)
        mine = await asyncio.gather(*(store.reserve(team_with(requests_per_minute=50), 5, 5, T0) for _ in range(100)))
        theirs = int(await asyncio.wait_for(child.stdout.readline(), timeout=20))
        assert sum(isinstance(o, Reservation) for o in mine) + theirs == 50
        assert int(await control.get("sluice:q:team:research:requests_per_minute:202501151234")) == 50
    finally:
        if child.returncode is None:
            child.kill()
        await child.wait()
        await control.aclose()
        await store.close()


async def test_settle_from_another_replica_happens_once(replicas, redis_url):
    subjects = team_with(tokens_per_minute=1000, max_concurrent_requests=1)
    reservation = await replicas[0].reserve(subjects, 100, 400, T0)
    entry = LedgerEntry(T0, "req-1", "alice", "research", "gpt-4o-mini", 100, 50, 200, moderated=True)
    await replicas[1].settle(reservation, 100, 50, T0 + 1, entry)
    await replicas[0].settle(reservation, 100, 50, T0 + 1, entry)
    probe = await replicas[0].reserve(subjects, 0, 1, T0 + 2)
    assert probe.tokens.remaining == 1000 - 150 - 1
    assert (await replicas[1].usage(now=T0 + 2)).teams["research"].day.requests == 1
    control = aioredis.Redis.from_url(redis_url)
    try:
        rows = await control.xrange("sluice:ledger")
        assert len(rows) == 1
        assert json.loads(rows[0][1][b"entry"]) == dataclasses.asdict(entry)
        assert all(key.startswith(b"sluice:") for key in await control.keys("*"))
    finally:
        await control.aclose()


async def test_a_reserve_run_twice_counts_once(replicas):
    """The store resends a batch once when its connection broke; the script must not count it twice."""
    store = replicas[0]
    subjects = team_with(requests_per_minute=10, tokens_per_minute=1000, max_concurrent_requests=3)
    request_plan = plan(subjects, T0)
    keys, args = store._reserve_arguments(request_plan, "retried", 100, 200, T0)
    first = await store._run(redis_scripts.RESERVE, keys, args)
    again = await store._run(redis_scripts.RESERVE, keys, args)
    assert first == again
    probe = await store.reserve(subjects, 0, 1, T0)
    assert probe.requests.remaining == 10 - 2
    assert probe.tokens.remaining == 1000 - 300 - 1


async def test_an_outage_is_store_unavailable_and_heals_by_itself(redis_server_factory):
    server = redis_server_factory()
    store = RedisStore(server.url, timeout_seconds=1.0)
    subjects = team_with(requests_per_minute=10, max_concurrent_requests=5)
    try:
        held = await store.reserve(subjects, 1, 1, T0)
        assert isinstance(held, Reservation)
        server.stop()
        started = time.monotonic()
        with pytest.raises(StoreUnavailable):
            await store.reserve(subjects, 1, 1, T0)
        with pytest.raises(StoreUnavailable):
            await store.settle(held, 1, 1, T0)
        with pytest.raises(StoreUnavailable):
            await store.usage(now=T0)
        with pytest.raises(StoreUnavailable):
            await store.ping()
        assert time.monotonic() - started < 4
        server.start()  # same port, empty: the scripts are loaded again on first use
        await store.ping()
        again = await store.reserve(subjects, 1, 1, T0)
        assert isinstance(again, Reservation) and again.requests.remaining == 9
        await store.settle(again, 1, 1, T0)
    finally:
        await store.close()
