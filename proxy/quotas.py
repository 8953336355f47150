"""Holding a request to its quotas: the shell between the request path and the store.

The arithmetic lives in ``proxy.accounting`` and is pure; this module only
turns a caller into the subjects limits apply to, maps the store's answers to
HTTP (429 with the retry headers, 503 when the store is down and the config
says fail closed), and settles on the way out whatever happened.
"""

from __future__ import annotations

import asyncio
import functools
import time
from collections import deque
from collections.abc import Callable

from .accounting import (
    DEFAULT_LEASE_SECONDS,
    LedgerEntry,
    QuotaStore,
    Rejection,
    Reservation,
    StoreUnavailable,
    Subject,
)
from .auth import Caller
from .config import AccountingConfig
from .errors import GatewayError
from .logs import log

# Settles that failed are retried this often, oldest first, while the store stays down.
SETTLE_RETRY_SECONDS = 1.0
# The longest ``settle_durably`` holds a request before its last bytes. A settle
# takes well under a millisecond when the store works, and a store that is down
# fails within its own timeout (redis: 2 s per batch, retried once on a new
# connection; sqlite: a lock held elsewhere for 5 s), after which the settle is
# queued for retry. The bound stops a store that hangs from holding every
# client's answer: past it, the settle carries on in the background.
SETTLE_WAIT_SECONDS = 2.0
# How often a running request should ``renew`` its concurrency lease: a third of
# the lease, so two renewals can fail before the slot is freed.
LEASE_RENEW_SECONDS = DEFAULT_LEASE_SECONDS / 3
# At most this many failed settles wait for the store; beyond it the oldest are dropped (and logged).
MAX_PENDING_SETTLES = 100_000


def _wake(waiter: asyncio.Future[bool]) -> None:
    """The wait bound passed: ``settle_durably`` returns ``True`` (timed out) to its caller's code."""
    if not waiter.done():
        waiter.set_result(True)


class QuotaRejected(GatewayError):
    """A 429 from a limit; ``limit`` names it for the rejection metric."""

    def __init__(self, rejection: Rejection):
        super().__init__(429, rejection.code, rejection.message, headers=rejection.headers())
        self.limit = rejection.limit_name


@functools.lru_cache(maxsize=1024)
def subjects_of(caller: Caller) -> tuple[Subject, Subject]:
    return Subject("key", caller.key_id, caller.key.limits), Subject("team", caller.team_name, caller.team.limits)


def limits_tokens(caller: Caller) -> bool:
    """Whether any token budget applies, so the answer's length must be capped upstream."""
    return any(
        limit is not None
        for limits in (caller.key.limits, caller.team.limits)
        for limit in (limits.tokens_per_minute, limits.tokens_per_day, limits.tokens_per_month)
    )


class Quotas:
    """Reserve before the upstream call, settle after it; the store decides."""

    def __init__(self, store: QuotaStore, config: AccountingConfig, on_store_error: Callable[[str], None]):
        self.store = store
        self.config = config
        self._on_store_error = on_store_error  # called with the failed operation, for the metric
        # Settles run as tasks of their own so a client that leaves cannot cancel them.
        self._settling: set[asyncio.Task[None]] = set()
        # Settles the store refused, kept for when it is back: a store settles a
        # reservation at most once, so a retry of one that did get through is harmless.
        self._pending: deque[tuple[Reservation | None, LedgerEntry]] = deque()
        self._retrying: asyncio.Task[None] | None = None

    async def reserve(self, caller: Caller, prompt_tokens: int, max_tokens: int) -> Reservation | None:
        """Admit or raise 429/503. ``None`` means admitted unmetered (store down, fail open)."""
        try:
            decision = await self.store.reserve(subjects_of(caller), prompt_tokens, max_tokens, time.time())
        except StoreUnavailable as exc:
            self._on_store_error("reserve")
            if self.config.on_store_error == "reject":
                log.warning("quota store unavailable; request refused", error=str(exc))
                raise GatewayError(
                    503, "store_unavailable", "The quota store is unavailable; the request was not admitted."
                ) from None
            log.warning("quota store unavailable; request admitted unmetered", error=str(exc))
            return None
        if isinstance(decision, Rejection):
            raise QuotaRejected(decision)
        return decision

    async def settle_durably(self, reservation: Reservation | None, entry: LedgerEntry) -> None:
        """Settle, and return once the ledger row and the counters are committed.

        For the request path, before the client's final bytes (``[DONE]``, or
        a non-streamed body): a client that has its answer is then in the
        ledger even if the process is killed the next moment. Committed means
        what the store can promise: memory applied, sqlite committed in the
        WAL, redis the script ran.

        Never raises into the request path and never waits longer than
        ``SETTLE_WAIT_SECONDS``: when the store is unavailable the settle is
        queued for retry (as ``settle`` does) and this returns; when the store
        is slow past the bound, the settle carries on in the background (and
        is retried if it then fails) and this returns. Cancelling the caller
        (the client left) does not cancel the settle.
        """
        # A bare future, woken by the settle task as it ends or by the timer: cheaper than
        # wait_for and shield (each costs loop turns), and cancelling it leaves the task alone.
        loop = asyncio.get_running_loop()
        waiter: asyncio.Future[bool] = loop.create_future()
        self._start(reservation, entry, waiter)
        timer = loop.call_later(SETTLE_WAIT_SECONDS, _wake, waiter)
        try:
            timed_out = await waiter
        finally:
            timer.cancel()
        if timed_out:
            log.warning("settle still running after the wait bound; it continues in the background",
                        request_id=entry.request_id, bound_seconds=SETTLE_WAIT_SECONDS)

    def settle(self, reservation: Reservation | None, entry: LedgerEntry) -> None:
        """Settle in the background (for paths that cannot wait, e.g. a client that left);
        ``drain`` waits for every settle at shutdown."""
        self._start(reservation, entry)

    def _start(self, reservation: Reservation | None, entry: LedgerEntry,
               waiter: asyncio.Future[bool] | None = None) -> None:
        task = asyncio.get_running_loop().create_task(self._settle(reservation, entry, waiter))
        self._settling.add(task)
        task.add_done_callback(self._settling.discard)

    async def renew(self, reservation: Reservation | None) -> None:
        """Extend the concurrency lease of a request still running (call every ``LEASE_RENEW_SECONDS``).

        Without it a stream open longer than the lease loses its slot while
        still open, and slow readers could exceed ``max_concurrent_requests``.
        A store error is logged and counted, never raised: the next renewal
        tries again, and the lease outlasts two missed ones.
        """
        if reservation is None or not reservation.slots:
            return
        try:
            await self.store.renew(reservation, time.time())
        except StoreUnavailable as exc:
            self._on_store_error("renew")
            log.warning("quota store unavailable; lease not renewed", error=str(exc))

    async def _settle(self, reservation: Reservation | None, entry: LedgerEntry,
                      waiter: asyncio.Future[bool] | None) -> None:
        """A task of its own, so a client that leaves cannot cancel it; ``waiter`` (if any) is told
        the moment it is committed, or queued for retry."""
        try:
            await self._apply(reservation, entry)
        except StoreUnavailable as exc:
            self._on_store_error("settle")
            log.warning("quota store unavailable; settle will be retried", error=str(exc), request_id=entry.request_id)
            self._keep_for_retry(reservation, entry)
        except Exception:  # a bug, not an outage: retrying would fail the same way
            log.exception("settle failed; the request is not in the ledger", request_id=entry.request_id)
        finally:
            if waiter is not None and not waiter.done():
                waiter.set_result(False)

    async def _apply(self, reservation: Reservation | None, entry: LedgerEntry) -> None:
        if reservation is None:
            await self.store.record(entry)
        else:
            await self.store.settle(reservation, entry.prompt_tokens, entry.completion_tokens, time.time(), entry)

    def _keep_for_retry(self, reservation: Reservation | None, entry: LedgerEntry) -> None:
        if len(self._pending) >= MAX_PENDING_SETTLES:
            dropped = self._pending.popleft()[1]
            log.error("too many settles waiting for the store; one is lost", request_id=dropped.request_id)
        self._pending.append((reservation, entry))
        if self._retrying is None or self._retrying.done():
            self._retrying = asyncio.get_running_loop().create_task(self._retry_pending())

    async def _retry_pending(self) -> None:
        while self._pending:
            await asyncio.sleep(SETTLE_RETRY_SECONDS)
            while self._pending:
                reservation, entry = self._pending[0]
                try:
                    await self._apply(reservation, entry)
                except StoreUnavailable:
                    break
                self._pending.popleft()
        log.info("settles that waited for the store are done")

    @property
    def pending_settles(self) -> int:
        return len(self._pending)

    async def drain(self) -> None:
        if self._settling:
            await asyncio.gather(*self._settling, return_exceptions=True)

    async def ready(self) -> bool:
        try:
            await self.store.ping()
        except StoreUnavailable:
            self._on_store_error("ping")
            return False
        return True

    async def close(self) -> None:
        await self.drain()
        if self._retrying is not None:
            self._retrying.cancel()
            if self._pending:
                log.error("the store is still down at shutdown; settles are lost", count=len(self._pending))
        await self.store.close()


class Settlement:
    """Settles one admitted request exactly once (a second settle of an unmetered one would be a second row).

    ``durably`` is awaited before the client's last bytes, so an answer the
    client has is in the ledger even if the process is killed a moment
    later; ``in_background`` settles what ended otherwise (a failure, a
    client that left) without holding anything up. ``entry`` builds the
    ledger entry from what the request has learnt by then.
    """

    __slots__ = ("_done", "_entry", "_quotas", "reservation")

    def __init__(self, quotas: Quotas, reservation: Reservation | None, entry: Callable[[], LedgerEntry]):
        self._quotas = quotas
        self.reservation = reservation
        self._entry = entry
        self._done = False

    async def durably(self) -> None:
        if not self._done:
            self._done = True
            await self._quotas.settle_durably(self.reservation, self._entry())

    def in_background(self) -> None:
        if not self._done:
            self._done = True
            self._quotas.settle(self.reservation, self._entry())

    async def keep_alive(self) -> None:
        """Renew the concurrency lease while the request runs (a long stream to a slow reader); cancel it at the end."""
        if self.reservation is None:
            return
        while True:
            await asyncio.sleep(LEASE_RENEW_SECONDS)
            await self._quotas.renew(self.reservation)
