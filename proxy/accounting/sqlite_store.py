"""The ``sqlite`` store (the default): limits for one gateway process, a ledger that survives it.

Design, and why:

- The live counters (minute windows, concurrency slots, unsettled
  reservations, and the day/month totals including what is reserved) are
  kept in memory by ``MemoryQuota``, so ``reserve`` does no I/O at all and is
  as fast as the ``memory`` store. That is only right if this process is the
  file's only writer, so the store claims the file with an exclusive lock
  (``<path>.lock``); a second gateway on the same file fails to open it
  instead of silently splitting the budgets. Several gateways share limits
  through ``redis``.
- What must survive a restart or ``kill -9`` is written at ``settle``: the
  ledger entry and the settled tokens of the day and month counters, in one
  transaction that has committed when ``settle`` returns. On open, the saved
  day/month totals are loaded back. A reservation that was never settled is
  not saved, so one left by a crash is gone with the process: it "expires"
  at once instead of at the end of its window.
- ``sqlite3`` blocks, so one dedicated thread owns the one connection and
  works through what the event loop queues. Whatever is queued while a
  transaction runs, or within a short commit delay, goes into the next one
  (group commit), its counter updates summed per row, so a busy gateway pays
  for one commit and a few rows per batch instead of per request. WAL with
  ``synchronous=NORMAL`` makes a commit durable against a killed process
  without an fsync.
- "One transaction per reserve" holds in the strongest sense: a reserve is
  one synchronous step on in-memory state. Write batches take ``BEGIN
  IMMEDIATE``: the write lock up front (waiting up to ``busy_timeout``), so
  no transaction fails half-way with SQLITE_BUSY while a reader such as
  ``sluice usage`` has the file open.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import os
import sqlite3
import threading
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, Callable, Sequence, TypeVar
from urllib.parse import quote

from proxy.accounting.ledger import (
    LedgerEntry,
    UsageReport,
    UsageRow,
    build_report,
    entry_rows,
    period_keys,
)
from proxy.accounting.memory_store import MemoryQuota
from proxy.accounting.quota import MINUTE, Rejection, Reservation, Subject
from proxy.accounting.store import DEFAULT_LEASE_SECONDS, QuotaStore, StoreUnavailable

T = TypeVar("T")

_MAX_BATCH = 512
# How long the writer waits, after the first job of a batch arrives, for more
# to join it. Every hand-over between the event loop and the thread, and
# every commit, costs CPU (about 100 us each on the VM this was measured on);
# waiting a few milliseconds lets a moderately busy gateway share them among
# many requests (a saturated one batches by itself). Only the settle waits,
# and the gateway settles in the background, after the client has its answer.
DEFAULT_COMMIT_DELAY_SECONDS = 0.01
_PRUNE_EVERY_SECONDS = 3600.0
# How long a write waits for another process's lock on the file before it fails.
_BUSY_TIMEOUT_MS = 5000
# Settles whose write failed, kept for their retry; beyond this many the oldest is dropped.
_MAX_UNWRITTEN = 100_000

_SCHEMA = """
CREATE TABLE IF NOT EXISTS ledger (
    id INTEGER PRIMARY KEY,
    time REAL NOT NULL,
    request_id TEXT NOT NULL,
    key TEXT NOT NULL,
    team TEXT NOT NULL,
    model TEXT NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    status INTEGER NOT NULL,
    moderated INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS ledger_time ON ledger (time);
CREATE TABLE IF NOT EXISTS usage_totals (
    period TEXT NOT NULL,
    team TEXT NOT NULL,
    key TEXT NOT NULL,
    requests INTEGER NOT NULL,
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    PRIMARY KEY (period, team, key)
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_usage (
    counter TEXT PRIMARY KEY,
    tokens INTEGER NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
"""

_ADD_QUOTA_USAGE = (
    "INSERT INTO quota_usage (counter, tokens, expires) VALUES (?, ?, ?) "
    "ON CONFLICT (counter) DO UPDATE SET tokens = tokens + excluded.tokens"
)
_INSERT_LEDGER = (
    "INSERT INTO ledger (time, request_id, key, team, model, prompt_tokens, completion_tokens, status, moderated) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?)"
)
_ADD_USAGE_TOTALS = (
    "INSERT INTO usage_totals (period, team, key, requests, prompt_tokens, completion_tokens) "
    "VALUES (?, ?, ?, ?, ?, ?) ON CONFLICT (period, team, key) DO UPDATE SET "
    "requests = requests + excluded.requests, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
    "completion_tokens = completion_tokens + excluded.completion_tokens"
)


def _connect(path: str, read_only: bool) -> sqlite3.Connection:
    """Autocommit mode (transactions are explicit); wait rather than fail when the other side holds a lock."""
    if read_only:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={_BUSY_TIMEOUT_MS}")
        return conn
    conn = sqlite3.connect(path, isolation_level=None)
    for pragma in ("journal_mode=WAL", "synchronous=NORMAL", f"busy_timeout={_BUSY_TIMEOUT_MS}"):
        conn.execute(f"PRAGMA {pragma}")
    conn.executescript(_SCHEMA)
    try:  # SQLite opens an unwritable file read-only without a word: find out now
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {int(version)}")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def _deliver(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


@dataclass(frozen=True, slots=True)
class _Write:
    """What one settle or record adds to the file: plain values, checked on the event loop
    (``_write_of``), so a malformed entry fails its own caller and not the batch it would join."""

    quota: tuple[tuple[str, int, float], ...]  # (counter, settled tokens, expires)
    ledger: tuple[Any, ...] | None  # the ledger row's column values
    totals: tuple[UsageRow, ...]
    prune_before: float | None


def _write_of(
    settled: Sequence[tuple[str, int, float]], entry: LedgerEntry | None, prune_before: float | None
) -> _Write:
    if entry is None:
        return _Write(tuple(settled), None, (), prune_before)
    ledger = (
        float(entry.time), str(entry.request_id), str(entry.key), str(entry.team), str(entry.model),
        int(entry.prompt_tokens), int(entry.completion_tokens), int(entry.status), int(bool(entry.moderated)),
    )
    return _Write(tuple(settled), ledger, entry_rows(entry), prune_before)


class _MergedWrites:
    """A batch's writes summed per row, so a busy gateway writes each counter once per commit."""

    def __init__(self) -> None:
        self.quota: dict[str, list[Any]] = {}
        self.totals: dict[tuple[str, str, str], list[int]] = {}
        self.ledger: list[tuple[Any, ...]] = []
        self.prune_before: float | None = None

    def add(self, write: _Write) -> None:
        for counter, tokens, expires in write.quota:
            merged = self.quota.setdefault(counter, [counter, 0, expires])
            merged[1] += tokens
        for row in write.totals:
            merged = self.totals.setdefault((row.period, row.team, row.key), [0, 0, 0])
            merged[0] += row.requests
            merged[1] += row.prompt_tokens
            merged[2] += row.completion_tokens
        if write.ledger is not None:
            self.ledger.append(write.ledger)
        if write.prune_before is not None:
            self.prune_before = max(write.prune_before, self.prune_before or 0.0)

    def __bool__(self) -> bool:
        return bool(self.quota or self.totals or self.ledger) or self.prune_before is not None

    def apply(self, conn: sqlite3.Connection) -> None:
        if self.quota:
            conn.executemany(_ADD_QUOTA_USAGE, self.quota.values())
        if self.totals:
            conn.executemany(_ADD_USAGE_TOTALS, [(*ident, *sums) for ident, sums in self.totals.items()])
        if self.ledger:
            conn.executemany(_INSERT_LEDGER, self.ledger)
        if self.prune_before is not None:
            conn.execute("DELETE FROM quota_usage WHERE expires <= ?", (self.prune_before,))


Job = tuple[_Write | Callable[[sqlite3.Connection], Any], asyncio.AbstractEventLoop, asyncio.Future[Any]]


class _Worker:
    """One thread, one connection. What is queued while a batch runs, or in the
    commit delay after its first job, forms the next batch.

    A batch is one transaction: its writes, summed, then its reads, then one
    commit that every writer in the batch waits for (group commit). A read
    that raises fails alone; a database error fails the batch, and the next
    batch opens a new connection, so a store that recovers (disk space freed,
    file restored) works again without help.

    Jobs are handed over in a list under a lock, and only the first job of a
    batch wakes the thread: waking it (and handing it the GIL) once per request
    cost more CPU than the SQL itself.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], commit_delay: float):
        self._connect = connect
        self._commit_delay = commit_delay
        self._lock = threading.Lock()
        self._pending: list[Job] = []
        self._has_jobs = threading.Event()
        self._stopping = threading.Event()  # also cuts the commit delay short
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sluice-sqlite", daemon=True)
        self._thread.start()

    def submit(self, work: _Write | Callable[[sqlite3.Connection], T]) -> asyncio.Future[T]:
        """Queue a write, or a read (a function of the connection); the future resolves after the commit."""
        if self._stopped:
            raise StoreUnavailable("the sqlite store is closed")
        loop = asyncio.get_running_loop()
        future: asyncio.Future[T] = loop.create_future()
        with self._lock:
            self._pending.append((work, loop, future))
            first = len(self._pending) == 1
        if first:
            self._has_jobs.set()
        return future

    async def stop(self) -> None:
        """Finish the queued jobs, close the connection, end the thread."""
        if not self._stopped:
            self._stopped = True
            self._stopping.set()
            self._has_jobs.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _take(self) -> list[Job]:
        with self._lock:
            jobs, self._pending = self._pending, []
            self._has_jobs.clear()
        return jobs

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            self._has_jobs.wait()
            # Jobs that arrive within the commit delay of the first join its batch (group commit).
            self._stopping.wait(self._commit_delay)
            jobs = self._take()
            for start in range(0, len(jobs), _MAX_BATCH):
                conn = self._run_batch(conn, jobs[start : start + _MAX_BATCH])
            if self._stopping.is_set() and not self._pending:
                if conn is not None:
                    conn.close()
                return

    def _run_batch(self, conn: sqlite3.Connection | None, batch: list[Job]) -> sqlite3.Connection | None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            writes = _MergedWrites()
            for work, _, _ in batch:
                if isinstance(work, _Write):
                    writes.add(work)
            if conn is None:
                conn = self._connect()
            # A batch of reads only must not take the write lock from a gateway beside it.
            conn.execute("BEGIN IMMEDIATE" if writes else "BEGIN")
            writes.apply(conn)
            for work, _, _ in batch:
                if isinstance(work, _Write):
                    results.append((None, None))
                    continue
                try:
                    results.append((work(conn), None))
                except sqlite3.Error:
                    raise
                except Exception as exc:  # a bug in one read must not fail the batch
                    results.append((None, exc))
            conn.execute("COMMIT")
        except Exception as exc:  # the thread must survive anything, or every caller after it waits forever
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()  # rolls back whatever the batch had done
            conn = None
            failure: BaseException = exc
            if isinstance(exc, sqlite3.Error):
                failure = StoreUnavailable(f"sqlite store failed: {exc}")
                failure.__cause__ = exc
            results = [(None, failure)] * len(batch)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for (_, loop, future), (result, error) in zip(batch, results):
            by_loop.setdefault(loop, []).append((future, result, error))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, outcomes)
        return conn


def _claim(path: str) -> int:
    """Lock ``<path>.lock`` for this process, or raise ``StoreUnavailable`` naming the problem."""
    lock_path = f"{path}.lock"
    try:
        fd = os.open(lock_path, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as exc:
        raise StoreUnavailable(f"cannot create the sqlite lock file {lock_path}: {exc.strerror}") from exc
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError:
        os.close(fd)
        raise StoreUnavailable(
            f"the sqlite store {path} is in use by another process; it serves one gateway process "
            "(use the redis store to share limits between several)"
        ) from None
    return fd


def _load_quota_usage(conn: sqlite3.Connection) -> list[tuple[str, int, float]]:
    return conn.execute("SELECT counter, tokens, expires FROM quota_usage").fetchall()


def _read_usage_rows(periods: tuple[str, str], conn: sqlite3.Connection) -> list[UsageRow]:
    cursor = conn.execute(
        "SELECT period, team, key, requests, prompt_tokens, completion_tokens FROM usage_totals WHERE period IN (?, ?)",
        periods,
    )
    return [UsageRow(*row) for row in cursor]


def _select_one(conn: sqlite3.Connection) -> None:
    conn.execute("SELECT 1").fetchone()


class SqliteStore(QuotaStore):
    """See the module docstring. Create with ``await SqliteStore.open(path)``."""

    def __init__(self, path: str, worker: _Worker, quota: MemoryQuota | None, lock_fd: int | None):
        self.path = path
        self._worker = worker
        self._quota = quota
        self._lock_fd = lock_fd
        self._next_prune = 0.0
        # Reservation id -> the write of a settle that failed: the counters in memory
        # were settled at once, so a retry of that settle must still write it.
        self._unwritten: dict[str, _Write] = {}

    @classmethod
    async def open(
        cls,
        path: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        read_only: bool = False,
        commit_delay_seconds: float = DEFAULT_COMMIT_DELAY_SECONDS,
    ) -> SqliteStore:
        """Open (creating if needed) the file and load the saved day/month totals.

        ``read_only`` opens an existing file for ``usage`` and ``ping`` only,
        without claiming it, so it works beside the gateway that serves it.
        ``commit_delay_seconds`` trades settle latency for CPU, see
        ``DEFAULT_COMMIT_DELAY_SECONDS``.
        """
        path = os.fspath(Path(path))
        lock_fd = None if read_only else _claim(path)
        worker = _Worker(partial(_connect, path, read_only), 0.0 if read_only else commit_delay_seconds)
        quota = None
        try:
            if read_only:
                await worker.submit(_select_one)
            else:
                quota = MemoryQuota(lease_seconds)
                for counter, tokens, expires in await worker.submit(_load_quota_usage):
                    quota.add(counter, tokens, expires)
        except StoreUnavailable as exc:
            await worker.stop()
            if lock_fd is not None:
                os.close(lock_fd)
            raise StoreUnavailable(f"cannot open {path}: {exc}") from exc
        except BaseException:
            await worker.stop()
            if lock_fd is not None:
                os.close(lock_fd)
            raise
        return cls(path, worker, quota, lock_fd)

    def _live(self) -> MemoryQuota:
        if self._quota is None:
            raise RuntimeError(f"the sqlite store {self.path} was opened read-only")
        return self._quota

    async def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        return self._live().reserve(subjects, prompt_tokens, max_tokens, now)

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        now: float,
        entry: LedgerEntry | None = None,
    ) -> None:
        used = prompt_tokens + completion_tokens
        write = self._unwritten.pop(reservation.id, None)  # a retry of a settle whose write failed
        if write is None:
            settled = [(c.counter, used, c.expires) for c in reservation.charges if c.period != MINUTE]
            # Built first: a malformed entry fails here, before any counter has changed.
            write = _write_of(settled, entry, self._prune_before(now))
            if not self._live().settle(reservation, used):
                return
        try:
            await self._worker.submit(write)
        except StoreUnavailable:
            if len(self._unwritten) >= _MAX_UNWRITTEN:
                del self._unwritten[next(iter(self._unwritten))]
            self._unwritten[reservation.id] = write
            raise

    async def record(self, entry: LedgerEntry) -> None:
        self._live()  # refuses on a read-only store
        await self._worker.submit(_write_of((), entry, None))

    async def usage(self, *, now: float, team: str | None = None, key: str | None = None) -> UsageReport:
        rows = await self._worker.submit(partial(_read_usage_rows, period_keys(now)))
        return build_report(rows, now, team=team, key=key)

    async def ping(self) -> None:
        await self._worker.submit(_select_one)

    async def close(self) -> None:
        await self._worker.stop()
        if self._lock_fd is not None:
            os.close(self._lock_fd)  # closing the descriptor releases the lock
            self._lock_fd = None

    def _prune_before(self, now: float) -> float | None:
        """Once an hour, let a settle also delete the saved totals of windows long over."""
        if now < self._next_prune:
            return None
        self._next_prune = now + _PRUNE_EVERY_SECONDS
        return now
