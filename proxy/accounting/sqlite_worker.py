"""The sqlite store's one thread and one connection, and its group commit.

``sqlite3`` blocks, so the event loop never calls it: it queues a job (a
function of a ``Batch``) and awaits a future. The thread takes everything
queued since its last transaction and runs it as one transaction: ``BEGIN
IMMEDIATE`` (the file's write lock, held across processes), every job in
queue order, one ``COMMIT``, then every future is resolved. A reserve queued
behind a settle therefore sees it, and a caller's future resolves only once
its work is committed, so "returned" means "in the WAL".

Jobs are handed over in a list under a lock and only the first of a batch
wakes the thread: waking it (and handing it the GIL) once per request cost
more CPU than the SQL itself.

Failure rules, which keep a batch all-or-nothing where it matters:

- a job that writes and raises anything fails the whole batch, rolled back:
  half a reserve or half a settle must never commit;
- a read-only job that raises something other than ``sqlite3.Error`` fails
  alone (a bug in one read must not fail its neighbours);
- a ``sqlite3.Error`` becomes ``StoreUnavailable`` for every job of the
  batch, and the next batch opens a new connection, so a store that recovers
  (disk space freed, a lock released) works again without help.
"""

from __future__ import annotations

import asyncio
import contextlib
import sqlite3
import threading
from typing import Any, Callable, Generic, TypeVar

from proxy.accounting.store import StoreUnavailable

T = TypeVar("T")

_MAX_BATCH = 512


class Batch:
    """What a job gets: the connection inside the open transaction, and ``view``, the
    transaction's view of the counters and the writes it still owes (``sqlite_batch``)."""

    def __init__(self, conn: sqlite3.Connection, view: Any):
        self.conn = conn
        self.view = view

    def flush(self) -> None:
        """Write what the view owes, so SQL that runs next sees it. A failure here, whoever
        called it, rolls back the whole batch: the writes are those of many jobs."""
        try:
            self.view.apply(self.conn)
        except sqlite3.Error:
            raise
        except Exception as exc:
            raise _WriteFailed(exc, None) from exc


class Job(Generic[T]):
    """A function of a ``Batch``; ``writes`` says whether it needs the write lock."""

    __slots__ = ("run", "writes", "loop", "future")

    def __init__(self, run: Callable[[Batch], T], writes: bool):
        self.run = run
        self.writes = writes
        self.loop: asyncio.AbstractEventLoop | None = None
        self.future: asyncio.Future[T] | None = None


def _deliver(outcomes: list[tuple[asyncio.Future[Any], Any, BaseException | None]]) -> None:
    for future, result, error in outcomes:
        if future.cancelled():
            continue
        if error is not None:
            future.set_exception(error)
        else:
            future.set_result(result)


class _WriteFailed(Exception):
    """A writing job raised: the batch is rolled back and every job fails with ``cause``."""

    def __init__(self, cause: BaseException, index: int | None):
        self.cause = cause
        self.index = index  # the job that raised; None: the final flush of merged writes


def _failed(batch: list[Job[Any]], exc: BaseException) -> list[tuple[None, BaseException]]:
    """Every job's outcome when the batch was rolled back: a writing job that raised gets its own
    exception, the others ``StoreUnavailable`` (nothing of theirs was written; a retry will land)."""
    if isinstance(exc, _WriteFailed):
        culprit = len(batch) if exc.index is None else exc.index
        neighbour = StoreUnavailable(f"sqlite batch rolled back: another write in it failed ({exc.cause!r})")
        return [(None, exc.cause if i == culprit else neighbour) for i in range(len(batch))]
    failure: BaseException = exc
    if isinstance(exc, sqlite3.Error):
        failure = StoreUnavailable(f"sqlite store failed: {exc}")
        failure.__cause__ = exc
    return [(None, failure)] * len(batch)


class Worker:
    """One thread, one connection; see the module docstring.

    ``view_factory`` makes a batch's view of the counters (an object with
    ``apply(conn)`` that writes what it owes and empties it). A batch starts as soon as its first
    job arrives: every caller waits for its commit (a reserve before the
    upstream call, a settle before the client's last bytes), so a commit
    delay would be latency on every request; under load, what queues while
    one transaction runs fills the next by itself.
    """

    def __init__(self, connect: Callable[[], sqlite3.Connection], view_factory: Callable[[], Any]):
        self._connect = connect
        self._view_factory = view_factory
        self._lock = threading.Lock()
        self._pending: list[Job[Any]] = []
        self._has_jobs = threading.Event()
        self._stopping = threading.Event()
        self._stopped = False
        self._thread = threading.Thread(target=self._run, name="sluice-sqlite", daemon=True)
        self._thread.start()

    def submit(self, run: Callable[[Batch], T], *, writes: bool) -> asyncio.Future[T]:
        """Queue a job; the future gets its result once the transaction it ran in has committed."""
        if self._stopped:
            raise StoreUnavailable("the sqlite store is closed")
        job: Job[T] = Job(run, writes)
        job.loop = asyncio.get_running_loop()
        job.future = job.loop.create_future()
        with self._lock:
            self._pending.append(job)
            first = len(self._pending) == 1
        if first:
            self._has_jobs.set()
        return job.future

    async def stop(self) -> None:
        """Finish the queued jobs, close the connection, end the thread."""
        if not self._stopped:
            self._stopped = True
            self._stopping.set()
            self._has_jobs.set()
        await asyncio.get_running_loop().run_in_executor(None, self._thread.join)

    def _take(self) -> list[Job[Any]]:
        with self._lock:
            jobs, self._pending = self._pending, []
            self._has_jobs.clear()
        return jobs

    def _run(self) -> None:
        conn: sqlite3.Connection | None = None
        while True:
            self._has_jobs.wait()
            jobs = self._take()
            for start in range(0, len(jobs), _MAX_BATCH):
                conn = self._run_batch(conn, jobs[start : start + _MAX_BATCH])
            if self._stopping.is_set() and not self._pending:
                if conn is not None:
                    conn.close()
                return

    def _run_batch(self, conn: sqlite3.Connection | None, batch: list[Job[Any]]) -> sqlite3.Connection | None:
        results: list[tuple[Any, BaseException | None]] = []
        try:
            if conn is None:
                conn = self._connect()
            # A batch of reads only must not take the write lock from a gateway beside it.
            conn.execute("BEGIN IMMEDIATE" if any(job.writes for job in batch) else "BEGIN")
            state = Batch(conn, self._view_factory())
            for index, job in enumerate(batch):
                try:
                    results.append((job.run(state), None))
                except (sqlite3.Error, _WriteFailed):
                    raise
                except Exception as exc:
                    if job.writes:
                        raise _WriteFailed(exc, index) from exc
                    results.append((None, exc))
            state.flush()
            conn.execute("COMMIT")
        except Exception as exc:  # the thread must survive anything, or every caller after it waits forever
            if conn is not None:
                with contextlib.suppress(sqlite3.Error):
                    conn.close()  # rolls back whatever the batch had done
            conn = None
            results = _failed(batch, exc)
        by_loop: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Future[Any], Any, BaseException | None]]] = {}
        for job, (result, error) in zip(batch, results):
            by_loop.setdefault(job.loop, []).append((job.future, result, error))
        for loop, outcomes in by_loop.items():
            with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is waiting any more
                loop.call_soon_threadsafe(_deliver, outcomes)
        return conn
