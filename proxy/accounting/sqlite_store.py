"""The ``sqlite`` store (the default): every limit in one file, shared exactly by every process on it.

Design, and why:

- Every counter that decides admission lives in the file (``sqlite_ops``),
  not in a process's memory, so the workers of ``sluice serve --workers N``
  (or any processes opening the same file) hold a team to one limit
  together, as Redis replicas do. A reserve is one ``BEGIN IMMEDIATE``
  transaction that reads the counters, decides with ``quota.decide`` and
  writes the outcome: SQLite lets one writer at a time into a WAL file,
  across processes, so no other process counts between the read and the
  write. Nothing claims the file for one process any more (a shared lock
  on ``<path>.lock`` only keeps out a gateway of the version that did).
- ``sqlite3`` blocks, so every transaction runs on the store's own thread
  (``sqlite_worker``); the event loop only queues and awaits. What is queued
  while a transaction runs forms the next one (group commit): a busy
  gateway pays one commit for many reserves and settles, and the settles of
  a batch are summed per row.
- A call returns once its transaction has committed: a settle that has
  returned is in the WAL, and with ``synchronous=NORMAL`` a committed
  transaction survives ``kill -9`` of the process (not a power cut). So a
  gateway that awaits its settle before the client's last bytes loses no
  answered request's ledger row.
- A reservation left by a process that died is in the file like any other:
  its tokens count in their windows until those end, its concurrency slots
  until their lease ends (``renew`` extends the lease of a long stream), as
  with Redis. Settling it later (from another process) still works.
- Write transactions take ``BEGIN IMMEDIATE``: the write lock up front
  (waiting up to ``BUSY_TIMEOUT_MS`` for another process's transaction), so
  no transaction fails half-way with SQLITE_BUSY.
"""

from __future__ import annotations

import fcntl
import math
import os
from functools import partial
from pathlib import Path
from typing import Sequence

from proxy.accounting import sqlite_ops as ops
from proxy.accounting.ledger import LedgerEntry, UsageReport, build_report, period_keys
from proxy.accounting.quota import Rejection, Reservation, Subject, plan, validate_amounts
from proxy.accounting.sqlite_batch import CounterView
from proxy.accounting.sqlite_worker import Worker
from proxy.accounting.store import DEFAULT_LEASE_SECONDS, QuotaStore, StoreUnavailable

# How often a reserve also deletes ended windows, expired slots and forgotten reservations.
_PRUNE_EVERY_SECONDS = 60.0


class SqliteStore(QuotaStore):
    """See the module docstring. Create with ``await SqliteStore.open(path)``."""

    def __init__(self, path: str, worker: Worker, lease_seconds: float, read_only: bool):
        self.path = path
        self.lease_seconds = lease_seconds
        self._worker = worker
        self._read_only = read_only
        self._next_prune = 0.0
        self._share_fd: int | None = None

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        read_only: bool = False,
    ) -> SqliteStore:
        """Open (creating if needed, with its schema) the file.

        ``read_only`` opens an existing file for ``usage`` and ``ping`` only
        (``sluice usage`` beside running gateways): it never creates or
        writes the file.
        """
        path = os.fspath(Path(path))
        share_fd = None if read_only else _share(path)
        worker = Worker(partial(ops.connect, path, read_only), CounterView)
        try:
            await worker.submit(ops.select_one, writes=False)
        except BaseException as exc:
            await worker.stop()
            if share_fd is not None:
                os.close(share_fd)
            if isinstance(exc, StoreUnavailable):
                raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
            raise
        store = cls(path, worker, lease_seconds, read_only)
        store._share_fd = share_fd
        return store

    def _writable(self) -> None:
        if self._read_only:
            raise RuntimeError(f"the sqlite store {self.path} was opened read-only")

    async def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        self._writable()
        validate_amounts(prompt_tokens, max_tokens)
        if prompt_tokens + max_tokens > ops.MAX_SQL_INTEGER // 4:
            raise ValueError("prompt_tokens and max_tokens beyond what a counter can hold")
        now = float(now)
        if not math.isfinite(now):
            raise ValueError("now must be a finite time")
        self._maybe_prune(now)
        request_plan = plan(subjects, now)
        run = partial(ops.reserve, request_plan=request_plan, prompt_tokens=int(prompt_tokens),
                      max_tokens=int(max_tokens), now=now, reservation_id=os.urandom(16).hex(),
                      lease_seconds=self.lease_seconds)
        return await self._worker.submit(run, writes=True)

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        now: float,
        entry: LedgerEntry | None = None,
    ) -> None:
        """Returns once committed. A settle that raised ``StoreUnavailable`` was rolled back
        whole, so its retry applies it whole; a settle of a settled reservation does nothing."""
        self._writable()
        used = int(prompt_tokens) + int(completion_tokens)
        if not 0 <= used <= ops.MAX_SQL_INTEGER // 4:
            raise ValueError("token counts out of range")
        # Plain values, taken here: a malformed entry or reservation fails its caller alone,
        # never the batch it would have joined on the thread.
        row = None if entry is None else ops.ledger_row(entry)
        plain = ops.Settled.of(reservation)
        await self._worker.submit(partial(ops.settle, reservation=plain, used_tokens=used, entry=row), writes=True)

    async def renew(self, reservation: Reservation, now: float) -> None:
        self._writable()
        if reservation.slots:
            await self._worker.submit(partial(ops.renew, reservation_id=str(reservation.id), now=float(now),
                                              lease_seconds=self.lease_seconds), writes=True)

    async def record(self, entry: LedgerEntry) -> None:
        self._writable()
        row = ops.ledger_row(entry)
        await self._worker.submit(partial(ops.record, entry=row), writes=True)

    async def usage(self, *, now: float, team: str | None = None, key: str | None = None) -> UsageReport:
        rows = await self._worker.submit(partial(ops.read_usage_rows, periods=period_keys(now)), writes=False)
        return build_report(rows, now, team=team, key=key)

    async def ping(self) -> None:
        await self._worker.submit(ops.select_one, writes=False)

    async def close(self) -> None:
        await self._worker.stop()
        if self._share_fd is not None:
            os.close(self._share_fd)  # releases the shared lock
            self._share_fd = None

    def _maybe_prune(self, now: float) -> None:
        """Once a minute, queue a prune ahead of this reserve (same transaction, nobody waits for it)."""
        if now < self._next_prune:
            return
        self._next_prune = now + _PRUNE_EVERY_SECONDS
        future = self._worker.submit(partial(ops.prune, now=now), writes=True)
        future.add_done_callback(_ignore_outcome)


def _share(path: str) -> int:
    """A shared lock on ``<path>.lock`` for as long as the store is open.

    Versions of Sluice before the counters moved into the file kept them in
    memory and took this lock exclusively; the shared lock keeps one of
    those and one of these from splitting a team's limits on one file
    during an upgrade (whichever comes second refuses to open), while any
    number of current processes share the file.
    """
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the sqlite lock file {lock_path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreUnavailable(
            f"the sqlite store {path} is in use by a gateway of an older version, which keeps its limits "
            "in memory; stop it first"
        ) from None
    return fd


def _ignore_outcome(future) -> None:
    if not future.cancelled():
        future.exception()  # a failed prune is retried a minute later; the reserve beside it reports the failure
