"""The quota store interface the gateway talks to (``open_store`` in ``stores`` picks one from the config).

The decisions are made by ``quota.decide``; a store only makes
read-decide-write atomic and keeps the numbers: in the process (``memory``),
in a file shared by every process that opens it (``sqlite``) or in Redis,
shared by replicas (``redis``).
"""

from __future__ import annotations

import abc
from typing import Sequence

from proxy.accounting.ledger import LedgerEntry, UsageReport
from proxy.accounting.quota import Rejection, Reservation, Subject

# How long a concurrency slot is held when its request is never settled (the
# process died). It must outlast the longest legitimate request, since a slot
# that expires early lets one more request in.
DEFAULT_LEASE_SECONDS = 600.0

# How long a store remembers an unsettled reservation, so that a late settle
# still corrects the counters and a second settle is recognised as a repeat.
RESERVATION_MEMORY_SECONDS = 86400


class StoreUnavailable(Exception):
    """The store cannot be reached or cannot write. The gateway answers 503
    ``store_unavailable`` or, with ``on_store_error: allow``, lets the request
    through. Nothing needs resetting afterwards: the next call tries again."""


class QuotaStore(abc.ABC):
    """Limits and ledger behind one interface. ``now`` is epoch seconds, passed in by the caller."""

    @abc.abstractmethod
    async def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        """Check every limit of every subject and, if all pass, count the request in all of them at once."""

    @abc.abstractmethod
    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        now: float,
        entry: LedgerEntry | None = None,
    ) -> None:
        """Replace the reserved tokens by the real ones and free the concurrency slots.

        Returns once the ledger row and the counters are durable as far as
        the store can make them (memory: applied; sqlite: committed in the
        WAL; redis: the script ran), and raises ``StoreUnavailable`` when not.

        Corrects the windows the reservation was charged to, even if time has
        moved on to new ones. A repeated settle of the same reservation does
        nothing, except finish what a settle that raised ``StoreUnavailable``
        left undone: the caller retries such a settle, and the retry must
        land. ``entry``, if given, is recorded in the same step, so the
        ledger and the counters never disagree about a finished request.
        """

    @abc.abstractmethod
    async def renew(self, reservation: Reservation, now: float) -> None:
        """Extend the lease of every concurrency slot the reservation holds to ``now`` plus the lease.

        For a request that runs longer than the lease (a stream to a slow
        reader): its caller renews it periodically (every third of the lease
        leaves room for two missed renewals), so its slot is not freed while
        it is still open. A slot whose lease has already ended is not taken
        back (another request may have it now), and a settled reservation
        holds nothing to renew: both are no-ops, as is a reservation without
        slots (no I/O then).
        """

    @abc.abstractmethod
    async def record(self, entry: LedgerEntry) -> None:
        """Add one finished request to the ledger (for requests settled without an entry, or never reserved)."""

    @abc.abstractmethod
    async def usage(self, *, now: float, team: str | None = None, key: str | None = None) -> UsageReport:
        """Totals for the UTC day and month containing ``now``; see ``ledger.build_report`` for the filters."""

    @abc.abstractmethod
    async def ping(self) -> None:
        """Return if the store works, raise ``StoreUnavailable`` if not (``/readyz``)."""

    @abc.abstractmethod
    async def close(self) -> None:
        """Release connections, files and threads."""
