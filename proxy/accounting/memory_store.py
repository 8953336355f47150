"""Counters in the process's memory: the ``memory`` store (one process, tests and the demo).

asyncio runs one coroutine at a time and ``MemoryQuota`` never awaits, so a
reserve reads, decides and writes all counters without anything running in
between: atomic without a lock.
"""

from __future__ import annotations

import os
from typing import Iterable, Sequence

from proxy.accounting.ledger import (
    LedgerEntry,
    UsageReport,
    UsageRow,
    build_report,
    entry_rows,
)
from proxy.accounting.quota import (
    CONCURRENCY,
    REQUESTS,
    Rejection,
    Reservation,
    Subject,
    decide,
    plan,
)
from proxy.accounting.store import (
    DEFAULT_LEASE_SECONDS,
    RESERVATION_MEMORY_SECONDS,
    QuotaStore,
)

_SWEEP_EVERY_SECONDS = 60.0


class MemoryQuota:
    """Window counters, concurrency slots and unsettled reservations of one process."""

    def __init__(self, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        self.lease_seconds = lease_seconds
        self._counters: dict[str, int] = {}
        self._expires: dict[str, float] = {}
        self._slots: dict[str, dict[str, float]] = {}  # subject id -> {reservation id: deadline}
        self._open: dict[str, float] = {}  # reservation id -> when to forget it; insertion order is time order
        self._next_sweep = 0.0

    def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        self._sweep(now)
        request_plan = plan(subjects, now)
        counters = self._counters
        observed = [
            self._active_slots(check.counter, now) if check.kind == CONCURRENCY else counters.get(check.counter, 0)
            for check in request_plan.checks
        ]
        outcome = decide(request_plan, observed, prompt_tokens, max_tokens, now, os.urandom(16).hex())
        if isinstance(outcome, Rejection):
            return outcome
        for check in request_plan.checks:
            if check.kind == CONCURRENCY:
                self._slots.setdefault(check.counter, {})[outcome.id] = now + self.lease_seconds
            else:
                self.add(check.counter, 1 if check.kind == REQUESTS else outcome.reserved_tokens, check.expires)
        self._open[outcome.id] = now + RESERVATION_MEMORY_SECONDS
        return outcome

    def settle(self, reservation: Reservation, used_tokens: int) -> bool:
        """Correct the charged counters to ``used_tokens`` and free the slots; ``False`` if already settled."""
        if self._open.pop(reservation.id, None) is None:
            return False
        delta = used_tokens - reservation.reserved_tokens
        for charge in reservation.charges:
            if charge.counter in self._counters:  # else its window has ended and been swept: nothing to correct
                self._counters[charge.counter] += delta
        for slot in reservation.slots:
            self._slots.get(slot, {}).pop(reservation.id, None)
        return True

    def renew(self, reservation: Reservation, now: float) -> None:
        """Extend the reservation's live slots to ``now`` + the lease; see ``QuotaStore.renew``."""
        for slot in reservation.slots:
            holders = self._slots.get(slot)
            if holders is not None and holders.get(reservation.id, now) > now:
                # Moved to the end: insertion order stays deadline order (see ``_active_slots``).
                del holders[reservation.id]
                holders[reservation.id] = now + self.lease_seconds

    def add(self, counter: str, amount: int, expires: float) -> None:
        """Add to a counter that may be forgotten after ``expires`` (also used to load saved totals)."""
        self._counters[counter] = self._counters.get(counter, 0) + amount
        self._expires[counter] = expires

    def _active_slots(self, subject_id: str, now: float) -> int:
        holders = self._slots.get(subject_id)
        if not holders:
            return 0
        # Every lease is as long as the next, so insertion order is deadline order:
        # expired leases sit at the front, and a check costs O(1) however many are held.
        while holders:
            oldest = next(iter(holders))
            if holders[oldest] > now:
                break
            del holders[oldest]
        return len(holders)

    def _sweep(self, now: float) -> None:
        """Forget ended windows, expired slots and long-unsettled reservations, once a minute."""
        if now < self._next_sweep:
            return
        self._next_sweep = now + _SWEEP_EVERY_SECONDS
        for counter in [c for c, expires in self._expires.items() if expires <= now]:
            del self._counters[counter], self._expires[counter]
        for subject_id in list(self._slots):
            if not self._active_slots(subject_id, now):
                del self._slots[subject_id]
        while self._open:
            oldest = next(iter(self._open))
            if self._open[oldest] > now:
                break
            del self._open[oldest]


class _UsageTotalsTable:
    """Running ledger totals per (period, team, key), in memory."""

    def __init__(self) -> None:
        self._totals: dict[tuple[str, str, str], tuple[int, int, int]] = {}

    def add(self, rows: Iterable[UsageRow]) -> None:
        for row in rows:
            ident = (row.period, row.team, row.key)
            requests, prompt, completion = self._totals.get(ident, (0, 0, 0))
            self._totals[ident] = (requests + row.requests, prompt + row.prompt_tokens,
                                   completion + row.completion_tokens)

    def rows(self) -> list[UsageRow]:
        return [UsageRow(p, t, k, *totals) for (p, t, k), totals in self._totals.items()]


class MemoryStore(QuotaStore):
    """One process, nothing survives a restart: for tests, the demo and a single throwaway gateway."""

    def __init__(self, lease_seconds: float = DEFAULT_LEASE_SECONDS):
        self._quota = MemoryQuota(lease_seconds)
        self._usage = _UsageTotalsTable()

    async def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        return self._quota.reserve(subjects, prompt_tokens, max_tokens, now)

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        now: float,
        entry: LedgerEntry | None = None,
    ) -> None:
        if self._quota.settle(reservation, prompt_tokens + completion_tokens) and entry is not None:
            self._usage.add(entry_rows(entry))

    async def renew(self, reservation: Reservation, now: float) -> None:
        self._quota.renew(reservation, now)

    async def record(self, entry: LedgerEntry) -> None:
        self._usage.add(entry_rows(entry))

    async def usage(self, *, now: float, team: str | None = None, key: str | None = None) -> UsageReport:
        return build_report(self._usage.rows(), now, team=team, key=key)

    async def ping(self) -> None:
        return None

    async def close(self) -> None:
        return None
