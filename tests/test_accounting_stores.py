"""What every store must do alike (memory, sqlite, redis on a real redis-server)."""

from __future__ import annotations

import calendar
import random
from typing import Any

import pytest

from proxy.accounting import LedgerEntry, QuotaStore, Rejection, Reservation, Subject, open_store
from proxy.accounting.store import DEFAULT_LEASE_SECONDS
from proxy.config import AccountingConfig, LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))
STORES = ["memory", "sqlite", "redis"]


async def make_store(kind: str, request: pytest.FixtureRequest, tmp_path) -> QuotaStore:
    cfg: dict[str, Any] = {"store": kind, "sqlite_path": str(tmp_path / f"{kind}.db")}
    if kind == "redis":
        cfg["redis_url"] = request.getfixturevalue("redis_url")
    return await open_store(AccountingConfig(**cfg))


@pytest.fixture(params=STORES)
async def store(request, tmp_path):
    store = await make_store(request.param, request, tmp_path)
    yield store
    await store.close()


def team_with(**limits: int) -> list[Subject]:
    return [Subject("key", "alice", LimitsConfig()), Subject("team", "research", LimitsConfig(**limits))]


def entry(prompt: int, completion: int, key: str = "alice", at: float = T0) -> LedgerEntry:
    return LedgerEntry(at, f"req-{prompt}-{completion}", key, "research", "gpt-4o-mini", prompt, completion, 200)


async def test_reserve_settle_and_usage(store):
    subjects = team_with(tokens_per_minute=1000, requests_per_minute=5)
    first = await store.reserve(subjects, 100, 500, T0)
    assert isinstance(first, Reservation)
    assert (first.max_tokens, first.reserved_tokens) == (500, 600)
    assert first.headers() == {
        "x-ratelimit-limit-requests": "5",
        "x-ratelimit-remaining-requests": "4",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "1000",
        "x-ratelimit-remaining-tokens": "400",
        "x-ratelimit-reset-tokens": "30s",
    }
    await store.settle(first, 100, 50, T0 + 1, entry(100, 50))
    second = await store.reserve(subjects, 100, 4096, T0 + 2)
    assert second.max_tokens == 750  # 1000 - 150 settled - 100 prompt
    assert second.requests.remaining == 3  # requests are not given back by settle

    report = await store.usage(now=T0 + 3)
    assert report.teams["research"].day.requests == 1
    assert report.keys["alice"].month.total_tokens == 150


async def test_a_rejection_counts_nothing_in_any_limit(store):
    key = Subject("key", "alice", LimitsConfig(requests_per_minute=1))
    team = Subject("team", "research", LimitsConfig(tokens_per_minute=1000))
    assert isinstance(await store.reserve([key, team], 100, 100, T0), Reservation)
    rejected = await store.reserve([key, team], 100, 100, T0 + 1)
    assert isinstance(rejected, Rejection)
    assert (rejected.subject.id, rejected.limit_name) == ("key:alice", "requests_per_minute")
    other_key = Subject("key", "bob", LimitsConfig())
    admitted = await store.reserve([other_key, team], 100, 100, T0 + 2)
    assert admitted.tokens.remaining == 1000 - 200 - 200  # the rejected request reserved no tokens


async def test_settle_twice_corrects_and_releases_once(store):
    subjects = team_with(tokens_per_minute=1000, max_concurrent_requests=1)
    first = await store.reserve(subjects, 100, 400, T0)
    await store.settle(first, 100, 50, T0 + 1, entry(100, 50))
    await store.settle(first, 100, 50, T0 + 1, entry(100, 50))
    second = await store.reserve(subjects, 100, 100, T0 + 2)
    assert second.tokens.remaining == 1000 - 150 - 200
    await store.settle(first, 100, 50, T0 + 3)  # must not free the slot `second` holds
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + 4), Rejection)
    assert (await store.usage(now=T0)).teams["research"].day.requests == 1


async def test_settle_after_the_minute_rolled_over_corrects_the_window_it_was_charged_to(store):
    subjects = team_with(tokens_per_minute=1000, tokens_per_day=10_000)
    old = await store.reserve(subjects, 100, 400, T0)  # 500 in minute m
    new = await store.reserve(subjects, 100, 200, T0 + 60)  # 300 in minute m+1
    await store.settle(old, 100, 0, T0 + 61)
    probe = await store.reserve(subjects, 0, 1, T0 + 62)
    # minute m+1 still holds 300 (+1 probe); the day holds 100 + 300 + 1
    assert probe.tokens.remaining == min(1000 - 300 - 1, 10_000 - 100 - 300 - 1)
    await store.settle(new, 100, 0, T0 + 63)
    probe2 = await store.reserve(subjects, 0, 1, T0 + 64)
    assert probe2.tokens.remaining == 1000 - 100 - 1 - 1


async def test_concurrency_slots_are_released_by_settle_and_expire_with_their_lease(store):
    subjects = team_with(max_concurrent_requests=2)
    a = await store.reserve(subjects, 1, 1, T0)
    await store.reserve(subjects, 1, 1, T0)
    refused = await store.reserve(subjects, 1, 1, T0 + 1)
    assert isinstance(refused, Rejection)
    assert (refused.limit_name, refused.code, refused.headers()["Retry-After"]) == (
        "max_concurrent_requests", "rate_limit_exceeded", "1")
    await store.settle(a, 1, 1, T0 + 2)
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + 2), Reservation)
    # nobody settles now (a crashed replica): each slot frees when its lease ends
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + DEFAULT_LEASE_SECONDS - 0.5), Rejection)
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + DEFAULT_LEASE_SECONDS), Reservation)
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + DEFAULT_LEASE_SECONDS + 1), Rejection)


async def test_a_small_budget_is_shared_out_by_clamping_until_it_is_spent(store):
    subjects = team_with(tokens_per_day=1000)
    granted = []
    while isinstance(outcome := await store.reserve(subjects, 100, 300, T0), Reservation):
        granted.append(outcome.max_tokens)
    assert granted == [300, 300, 100]
    assert outcome.code == "insufficient_quota"
    assert outcome.headers()["x-should-retry"] == "false"


async def test_the_last_token_of_a_budget_is_still_granted(store):
    subjects = team_with(tokens_per_minute=1000)
    await store.reserve(subjects, 0, 899, T0)
    last = await store.reserve(subjects, 100, 50, T0)
    assert isinstance(last, Reservation) and last.max_tokens == 1 and last.tokens.remaining == 0
    assert isinstance(await store.reserve(subjects, 0, 1, T0), Rejection)
    assert isinstance(await store.reserve(subjects, 0, 0, T0), Reservation)  # nothing asked, nothing needed


async def test_record_without_reservation_and_usage_filters(store):
    await store.record(entry(10, 0, key="alice"))
    await store.record(entry(20, 5, key="bob"))
    await store.record(entry(1, 1, key="bob", at=T0 - 40 * 86400))  # last month
    report = await store.usage(now=T0, key="bob")
    assert list(report.keys) == ["bob"] and report.teams == {}
    assert report.keys["bob"].month.requests == 1
    assert (await store.usage(now=T0, team="research")).teams["research"].day.prompt_tokens == 30
    await store.ping()


def _comparable(outcome: Reservation | Rejection) -> tuple:
    if isinstance(outcome, Reservation):
        return ("admit", outcome.max_tokens, outcome.reserved_tokens, outcome.charges, outcome.slots,
                outcome.requests, outcome.tokens)
    return ("reject", outcome.subject.id, outcome.limit_name, outcome.code, outcome.retry_after,
            outcome.requests, outcome.tokens)


async def test_all_stores_decide_alike(request, tmp_path):
    """The Lua script, the SQLite store and the memory store agree on a long random workload."""
    stores = [await make_store(kind, request, tmp_path) for kind in STORES]
    rng = random.Random(7)
    team = Subject("team", "research", LimitsConfig(requests_per_minute=12, tokens_per_minute=6000,
                                                     tokens_per_day=150_000, max_concurrent_requests=6))
    keys = [Subject("key", "alice", LimitsConfig(tokens_per_minute=2500)),
            Subject("key", "bob", LimitsConfig(requests_per_minute=5, max_concurrent_requests=3))]
    open_reservations: list[list[Reservation]] = []
    now = float(T0)
    try:
        for _ in range(400):
            now += rng.choice([0.0, 0.5, 3.0, 20.0, 250.0])
            if open_reservations and rng.random() < 0.15:  # a long stream renews its lease
                for store, reservation in zip(stores, rng.choice(open_reservations)):
                    await store.renew(reservation, now)
                continue
            if open_reservations and rng.random() < 0.45:
                held = open_reservations.pop(rng.randrange(len(open_reservations)))
                prompt = held[0].prompt_tokens
                completion = rng.randint(0, held[0].max_tokens)
                for store, reservation in zip(stores, held):
                    await store.settle(reservation, prompt, completion, now)
                continue
            subjects = [rng.choice(keys), team]
            prompt, max_tokens = rng.randint(0, 600), rng.randint(0, 2000)
            outcomes = [await store.reserve(subjects, prompt, max_tokens, now) for store in stores]
            assert len({_comparable(o) for o in outcomes}) == 1, outcomes
            if isinstance(outcomes[0], Reservation):
                open_reservations.append(outcomes)
    finally:
        for store in stores:
            await store.close()


async def test_a_renewed_reservation_keeps_its_slot_past_the_first_lease(store):
    subjects = team_with(max_concurrent_requests=1)
    held = await store.reserve(subjects, 1, 1, T0)
    third = DEFAULT_LEASE_SECONDS / 3
    for renewal in range(1, 7):  # a stream open for two leases, renewed every third of one
        await store.renew(held, T0 + renewal * third)
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + 2 * DEFAULT_LEASE_SECONDS + 1), Rejection)
    # unrenewed from here: the slot frees a lease after the last renewal
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + 3 * DEFAULT_LEASE_SECONDS - 0.5), Rejection)
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + 3 * DEFAULT_LEASE_SECONDS), Reservation)


async def test_renew_never_takes_back_a_slot_that_was_freed(store):
    subjects = team_with(max_concurrent_requests=1)
    expired = await store.reserve(subjects, 1, 1, T0)
    successor = await store.reserve(subjects, 1, 1, T0 + DEFAULT_LEASE_SECONDS)  # the lease ended: room again
    assert isinstance(successor, Reservation)
    await store.renew(expired, T0 + DEFAULT_LEASE_SECONDS + 1)  # too late: not held any more
    await store.settle(successor, 1, 1, T0 + DEFAULT_LEASE_SECONDS + 2)
    assert isinstance(await store.reserve(subjects, 1, 1, T0 + DEFAULT_LEASE_SECONDS + 3), Reservation)
    settled = await store.reserve(team_with(max_concurrent_requests=5), 1, 1, T0)
    await store.settle(settled, 1, 1, T0 + 1)
    await store.renew(settled, T0 + 2)  # settled: nothing to renew, and no error
    no_slots = await store.reserve(team_with(), 1, 1, T0)
    await store.renew(no_slots, T0 + 1)
