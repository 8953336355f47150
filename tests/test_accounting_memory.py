"""The in-process counters behind the memory and sqlite stores: invariants under any workload, and forgetting."""

from __future__ import annotations

import calendar

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.accounting.memory_store import MemoryQuota
from proxy.accounting.quota import Rejection, Reservation, Subject, plan
from proxy.accounting.store import RESERVATION_MEMORY_SECONDS
from proxy.config import LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))
TEAM = Subject("team", "research", LimitsConfig(tokens_per_minute=3000, tokens_per_day=20_000,
                                                requests_per_minute=40, max_concurrent_requests=4))
KEYS = [Subject("key", "alice", LimitsConfig(tokens_per_minute=1200)),
        Subject("key", "bob", LimitsConfig(max_concurrent_requests=2))]

reserve_op = st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(0, 900), st.integers(0, 1500))
settle_op = st.tuples(st.just("settle"), st.integers(0, 50), st.floats(0, 1))
wait_op = st.tuples(st.just("wait"), st.sampled_from([0.5, 7.0, 45.0]))


@settings(max_examples=60, deadline=None)
@given(st.lists(st.one_of(reserve_op, settle_op, wait_op), max_size=120))
def test_no_limit_is_ever_exceeded(ops):
    quota = MemoryQuota()
    now = float(T0)
    held: list[Reservation] = []
    for op in ops:
        if op[0] == "wait":
            now += op[1]
        elif op[0] == "settle":
            if held:
                reservation = held.pop(op[1] % len(held))
                completion = int(reservation.max_tokens * op[2])  # an answer never exceeds max_tokens
                assert quota.settle(reservation, reservation.prompt_tokens + completion)
        else:
            _, key, prompt, max_tokens = op
            outcome = quota.reserve([KEYS[key], TEAM], prompt, max_tokens, now)
            if isinstance(outcome, Reservation):
                held.append(outcome)
                assert outcome.max_tokens <= max_tokens
        for subject in (*KEYS, TEAM):
            for check in plan([subject], now).checks:
                if check.limit is None:
                    continue
                if check.kind == "concurrency":
                    used = sum(1 for r in held if check.counter in r.slots)
                else:
                    used = quota._counters.get(check.counter, 0)
                assert used <= check.limit, (check.counter, used)


def test_ended_windows_and_expired_slots_are_forgotten():
    quota = MemoryQuota(lease_seconds=60)
    subjects = [KEYS[0], TEAM]
    quota.reserve(subjects, 10, 10, T0)
    first = {c.counter for c in plan(subjects, T0).checks if c.kind != "concurrency"}
    assert set(quota._counters) == first
    later = T0 + 2 * 86400  # the same month, two days on: the sweep runs before this reserve
    quota.reserve(subjects, 10, 10, later)
    assert set(quota._counters) == {c.counter for c in plan(subjects, later).checks if c.kind != "concurrency"}
    assert quota._counters["team:research:tokens_per_month:202501"] == 40  # the month is still running
    assert len(quota._slots["team:research"]) == 1  # the old slot's lease ran out


def test_an_unsettled_reservation_is_forgotten_after_a_day():
    quota = MemoryQuota()
    reservation = quota.reserve([TEAM], 1, 1, T0)
    assert isinstance(reservation, Reservation)
    quota.reserve([TEAM], 1, 1, T0 + RESERVATION_MEMORY_SECONDS + 1)
    assert quota.settle(reservation, 2) is False


def test_a_rejection_leaves_no_trace():
    quota = MemoryQuota()
    team = Subject("team", "t", LimitsConfig(requests_per_minute=0))
    assert isinstance(quota.reserve([KEYS[0], team], 1, 1, T0), Rejection)
    assert quota._counters == {} and quota._open == {}


def test_expired_leases_go_first_whatever_was_settled_in_between():
    """Slots are checked from the oldest lease: settling some in the middle must not hide an expired one."""
    team = Subject("team", "busy", LimitsConfig(max_concurrent_requests=3))
    quota = MemoryQuota(lease_seconds=60)
    first, middle, last = (quota.reserve([team], 1, 1, T0 + i) for i in range(3))
    assert isinstance(quota.reserve([team], 1, 1, T0 + 3), Rejection)  # three slots held
    assert quota.settle(middle, 2)
    fourth = quota.reserve([team], 1, 1, T0 + 4)  # takes the freed slot
    assert isinstance(fourth, Reservation)
    # At T0 + 60.5 only the first lease (taken at T0) has run out.
    assert isinstance(quota.reserve([team], 1, 1, T0 + 60.5), Reservation)
    assert isinstance(quota.reserve([team], 1, 1, T0 + 60.6), Rejection)
    assert quota.settle(last, 2) and quota.settle(fourth, 2)


def test_a_check_does_not_walk_every_held_slot():
    """2,000 open streams must not make each new request scan 2,000 leases."""
    team = Subject("team", "wide", LimitsConfig(max_concurrent_requests=10**6))
    quota = MemoryQuota(lease_seconds=600)
    for i in range(2000):
        assert isinstance(quota.reserve([team], 1, 1, T0 + i / 1000), Reservation)
    probe = quota._slots["team:wide"] = _CountingDict(quota._slots["team:wide"])
    quota.reserve([team], 1, 1, T0 + 3)
    assert probe.items_calls == 0 and probe.first_keys <= 2


class _CountingDict(dict):
    """A slot table that counts how it is read."""

    def __init__(self, data):
        super().__init__(data)
        self.items_calls = 0
        self.first_keys = 0

    def items(self):
        self.items_calls += 1
        return super().items()

    def __iter__(self):
        self.first_keys += 1
        return super().__iter__()
