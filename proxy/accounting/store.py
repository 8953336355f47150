"""The quota store interface the gateway talks to, and ``open_store`` to pick one from the config.

The decisions are made by ``quota.decide``; a store only makes
read-decide-write atomic and keeps the numbers: in the process (``memory``),
in a file (``sqlite``) or shared between replicas (``redis``).
"""

from __future__ import annotations

import abc
from typing import Sequence

from proxy.accounting.ledger import LedgerEntry, UsageReport
from proxy.accounting.quota import Rejection, Reservation, Subject
from proxy.config import AccountingConfig

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

        Corrects the windows the reservation was charged to, even if time has
        moved on to new ones. A repeated settle of the same reservation does
        nothing, except finish what a settle that raised ``StoreUnavailable``
        left undone: the caller retries such a settle, and the retry must
        land. ``entry``, if given, is recorded in the same step, so the
        ledger and the counters never disagree about a finished request.
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


async def open_store(
    cfg: AccountingConfig,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    read_only: bool = False,
) -> QuotaStore:
    """The store ``cfg.store`` names.

    ``read_only`` is for readers of a file another process serves (``sluice
    usage`` next to a running gateway): a SQLite store normally claims its
    file for one process, since it keeps the live counters in memory.
    Raises ``StoreUnavailable`` if a SQLite file cannot be opened or is
    claimed; a Redis store connects lazily, so a gateway can start (and fail
    open, if so configured) while Redis is down.
    """
    # Imported here so that a gateway on one backend never loads the others.
    if cfg.store == "memory":
        from proxy.accounting.memory_store import MemoryStore

        return MemoryStore(lease_seconds=lease_seconds)
    if cfg.store == "sqlite":
        from proxy.accounting.sqlite_store import SqliteStore

        return await SqliteStore.open(cfg.sqlite_path, lease_seconds=lease_seconds, read_only=read_only)
    if cfg.store == "redis":
        from proxy.accounting.redis_store import RedisStore

        return RedisStore(cfg.redis_url, lease_seconds=lease_seconds)
    raise ValueError(f"unknown store {cfg.store!r}")
