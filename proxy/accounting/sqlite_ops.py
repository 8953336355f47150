"""The sqlite store's schema and what each operation does inside its transaction.

Every function here runs on the store's thread, inside a transaction the
worker opened (``sqlite_worker``), and takes plain values: the connection,
the plan, ``now``. The decision is ``quota.decide``'s, on the numbers read in
the same transaction that writes the outcome, and the transaction holds the
file's write lock (``BEGIN IMMEDIATE``) from the first read, so no other
process can count between the read and the write: exact across processes.

Tables:

    quota_counters   every window counter (requests and tokens per minute, the day
                     and month totals including what is reserved); one live-slot
                     count per subject with a concurrency limit (``<subject id>``);
                     and one row per reservation not settled yet (``r:<id>``), so a
                     settle runs once
    quota_slots      one row per concurrency slot held: (reservation, subject, deadline)
    ledger, usage_totals  the ledger and its running totals per day and month

A subject's slot count is kept beside its slot rows so a reserve costs the
same with 1,000 requests in flight as with one: a reserve first deletes
every expired slot of the file through the deadline index (nearly always
none) and subtracts them from their counts, then reads the counts with the
window counters in one query. Few statements per operation matter more
than usual here: every statement hands the GIL back and forth between this
thread and the event loop.
"""

from __future__ import annotations

import math
import sqlite3
from typing import Any, NamedTuple, Sequence
from urllib.parse import quote

from proxy.accounting.ledger import LedgerEntry, UsageRow, entry_rows
from proxy.accounting.quota import CONCURRENCY, REQUESTS, Plan, Rejection, Reservation, decide
from proxy.accounting.sqlite_batch import CounterView
from proxy.accounting.store import RESERVATION_MEMORY_SECONDS

# How long a write waits for a writer outside this store (``sqlite3`` in a shell,
# a backup) to release the file before it fails with StoreUnavailable.
BUSY_TIMEOUT_MS = 5000
# SQLite integers are signed 64-bit; amounts are checked against this on the loop,
# so no write can fail half-way through a batch.
MAX_SQL_INTEGER = 2**63 - 1

SCHEMA = """
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
CREATE TABLE IF NOT EXISTS quota_counters (
    counter TEXT PRIMARY KEY,
    value INTEGER NOT NULL,
    expires REAL NOT NULL
) WITHOUT ROWID;
CREATE TABLE IF NOT EXISTS quota_slots (
    reservation TEXT NOT NULL,
    subject TEXT NOT NULL,
    deadline REAL NOT NULL,
    PRIMARY KEY (reservation, subject)
) WITHOUT ROWID;
CREATE INDEX IF NOT EXISTS quota_slots_deadline ON quota_slots (deadline);
"""

# Files written before the counters moved into the file kept only the settled day and
# month tokens, in ``quota_usage``: they carry over into ``quota_counters`` once.
_MIGRATE_QUOTA_USAGE = (
    "INSERT INTO quota_counters (counter, value, expires) SELECT counter, tokens, expires FROM quota_usage "
    "WHERE true ON CONFLICT (counter) DO UPDATE SET value = value + excluded.value",
    "DROP TABLE quota_usage",
)

_DELETE_SLOT = "DELETE FROM quota_slots WHERE reservation = ? AND subject = ?"

# The live-slot count never expires by time: it is corrected by the slots that do.
_SLOT_COUNT_EXPIRES = math.inf


def connect(path: str, read_only: bool) -> sqlite3.Connection:
    """Autocommit mode (the worker's transactions are explicit), WAL, and the schema.

    WAL lets readers (``sluice usage``, ``/admin/usage``) run beside the
    writers, and with ``synchronous=NORMAL`` a commit is durable against a
    killed process (not a power cut) without an fsync per commit.
    """
    if read_only:
        conn = sqlite3.connect(f"file:{quote(path)}?mode=ro", uri=True, isolation_level=None)
        conn.execute(f"PRAGMA busy_timeout={BUSY_TIMEOUT_MS}")
        return conn
    conn = sqlite3.connect(path, isolation_level=None)
    try:
        for pragma in (f"busy_timeout={BUSY_TIMEOUT_MS}", "journal_mode=WAL", "synchronous=NORMAL"):
            conn.execute(f"PRAGMA {pragma}")
        conn.execute("BEGIN IMMEDIATE")  # several workers may open the file at once: one at a time
        for statement in filter(str.strip, SCHEMA.split(";")):
            conn.execute(statement)
        if conn.execute("SELECT 1 FROM sqlite_master WHERE type = 'table' AND name = 'quota_usage'").fetchone():
            for statement in _MIGRATE_QUOTA_USAGE:
                conn.execute(statement)
        # SQLite opens an unwritable file read-only without a word: this write finds out now.
        version = conn.execute("PRAGMA user_version").fetchone()[0]
        conn.execute(f"PRAGMA user_version = {int(version)}")
        conn.execute("COMMIT")
    except sqlite3.Error:
        conn.close()
        raise
    return conn


def ledger_row(entry: LedgerEntry) -> tuple[tuple[Any, ...], tuple[UsageRow, UsageRow]]:
    """The entry's ledger columns and totals rows, as plain checked values (built on the event loop,
    so a malformed entry fails its own caller, never the batch it would have joined)."""
    row = (
        float(entry.time), str(entry.request_id), str(entry.key), str(entry.team), str(entry.model),
        int(entry.prompt_tokens), int(entry.completion_tokens), int(entry.status), int(bool(entry.moderated)),
    )
    if not (0 <= row[5] <= MAX_SQL_INTEGER // 4 and 0 <= row[6] <= MAX_SQL_INTEGER // 4):
        raise OverflowError("token counts beyond what the ledger can sum")
    return row, entry_rows(entry)


def _marker(reservation_id: str) -> str:
    return f"r:{reservation_id}"


def _expire_slots(batch: Any, now: float) -> None:
    """Delete every slot whose lease ended by ``now`` and count it out of its subject's count.

    Nearly always there is none: a probe of the deadline index costs a sixth of
    the ``DELETE ... RETURNING`` (which builds a temporary table even when it
    returns nothing), so the delete runs only when the probe finds a slot.
    """
    conn = batch.conn
    if conn.execute("SELECT 1 FROM quota_slots WHERE deadline <= ? LIMIT 1", (now,)).fetchone() is None:
        return
    for (subject,) in conn.execute("DELETE FROM quota_slots WHERE deadline <= ? RETURNING subject", (now,)):
        batch.view.correct(subject, -1)


def reserve(batch: Any, request_plan: Plan, prompt_tokens: int, max_tokens: int, now: float,
            reservation_id: str, lease_seconds: float) -> Reservation | Rejection:
    """Read every counter of the plan, decide, and on admission count the request in all of them."""
    conn: sqlite3.Connection = batch.conn
    view: CounterView = batch.view
    checks = request_plan.checks
    if request_plan.slots:
        _expire_slots(batch, now)
    observed = view.read(conn, [check.counter for check in checks])
    outcome = decide(request_plan, observed, prompt_tokens, max_tokens, now, reservation_id)
    if isinstance(outcome, Rejection):
        return outcome
    for check in checks:
        if check.kind == CONCURRENCY:
            view.add(check.counter, 1, _SLOT_COUNT_EXPIRES)
        else:
            view.add(check.counter, 1 if check.kind == REQUESTS else outcome.reserved_tokens, check.expires)
    # The marker and the slots are rows of their own, written at once: a settle in the
    # same batch deletes them.
    conn.execute("INSERT INTO quota_counters (counter, value, expires) VALUES (?, 1, ?)",
                 (_marker(reservation_id), now + RESERVATION_MEMORY_SECONDS))
    if request_plan.slots:
        deadline = now + lease_seconds
        conn.executemany("INSERT INTO quota_slots (reservation, subject, deadline) VALUES (?, ?, ?)",
                         [(reservation_id, slot, deadline) for slot in request_plan.slots])
    return outcome


class Settled(NamedTuple):
    """What a settle needs of its reservation, as plain checked values."""

    id: str
    reserved_tokens: int
    charges: tuple[str, ...]
    slots: tuple[str, ...]

    @classmethod
    def of(cls, reservation: Reservation) -> Settled:
        return cls(str(reservation.id), int(reservation.reserved_tokens),
                   tuple(str(charge.counter) for charge in reservation.charges),
                   tuple(str(slot) for slot in reservation.slots))


def settle(batch: Any, reservation: Settled, used_tokens: int,
           entry: tuple[tuple[Any, ...], Sequence[UsageRow]] | None) -> bool:
    """Correct the charged counters to ``used_tokens``, free the slots, add the entry; ``False``
    (and nothing written) when the reservation was settled before or long forgotten."""
    conn: sqlite3.Connection = batch.conn
    if not conn.execute("DELETE FROM quota_counters WHERE counter = ?", (_marker(reservation.id),)).rowcount:
        return False
    view: CounterView = batch.view
    delta = used_tokens - reservation.reserved_tokens
    if delta:
        for counter in reservation.charges:
            view.correct(counter, delta)
    # A slot whose lease had ended is gone already, and was counted out then. One point
    # delete per slot (a request holds one or two) is cheaper than a DELETE ... RETURNING.
    for subject in reservation.slots:
        if conn.execute(_DELETE_SLOT, (reservation.id, subject)).rowcount:
            view.correct(subject, -1)
    if entry is not None:
        view.add_entry(*entry)
    return True


def record(batch: Any, entry: tuple[tuple[Any, ...], Sequence[UsageRow]]) -> None:
    batch.view.add_entry(*entry)


def renew(batch: Any, reservation_id: str, now: float, lease_seconds: float) -> int:
    """Push the deadline of every slot the reservation still holds to ``now + lease_seconds``.

    A slot whose lease already ended is not taken back: it may have been
    counted free and given to another request. Returns how many were renewed.
    """
    return batch.conn.execute(
        "UPDATE quota_slots SET deadline = max(deadline, ?) WHERE reservation = ? AND deadline > ?",
        (now + lease_seconds, reservation_id, now),
    ).rowcount


def prune(batch: Any, now: float) -> None:
    """Forget ended windows, expired slots and reservations never settled within a day."""
    _expire_slots(batch, now)
    batch.flush()  # the view is written and forgotten: the DELETE below acts on the file
    batch.conn.execute("DELETE FROM quota_counters WHERE expires <= ?", (now,))


def read_usage_rows(batch: Any, periods: tuple[str, str]) -> list[UsageRow]:
    batch.flush()  # the totals this batch's settles added
    cursor = batch.conn.execute(
        "SELECT period, team, key, requests, prompt_tokens, completion_tokens FROM usage_totals WHERE period IN (?, ?)",
        periods,
    )
    return [UsageRow(*row) for row in cursor]


def select_one(batch: Any) -> None:
    batch.conn.execute("SELECT 1").fetchone()
