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
from functools import lru_cache
from typing import Any, NamedTuple, Sequence
from urllib.parse import quote

from proxy.accounting.ledger import LedgerEntry, UsageRow, entry_rows
from proxy.accounting.quota import CONCURRENCY, REQUESTS, Plan, Rejection, Reservation, decide
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

_ADD_COUNTER = (
    "INSERT INTO quota_counters (counter, value, expires) VALUES (?, ?, ?) "
    "ON CONFLICT (counter) DO UPDATE SET value = value + excluded.value, expires = max(expires, excluded.expires)"
)
# A settle corrects only counters that still exist: one pruned has ended its window.
_CORRECT_COUNTER = "UPDATE quota_counters SET value = value + ? WHERE counter = ?"
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


class MergedWrites:
    """A batch's settle and record writes, summed per row, so a busy gateway writes each
    counter and each totals row once per commit however many requests settled in it."""

    def __init__(self) -> None:
        self.counters: dict[str, int] = {}
        self.totals: dict[tuple[str, str, str], list[int]] = {}
        self.ledger: list[tuple[Any, ...]] = []

    def correct(self, counter: str, delta: int) -> None:
        self.counters[counter] = self.counters.get(counter, 0) + delta

    def add_entry(self, row: tuple[Any, ...], totals: Sequence[UsageRow]) -> None:
        self.ledger.append(row)
        for total in totals:
            merged = self.totals.setdefault((total.period, total.team, total.key), [0, 0, 0])
            merged[0] += total.requests
            merged[1] += total.prompt_tokens
            merged[2] += total.completion_tokens

    def apply(self, conn: sqlite3.Connection) -> None:
        """Write what was gathered and start again empty."""
        if self.counters:
            conn.executemany(_CORRECT_COUNTER, [(delta, c) for c, delta in self.counters.items() if delta])
            self.counters = {}
        if self.totals:
            conn.executemany(_ADD_USAGE_TOTALS, [(*ident, *sums) for ident, sums in self.totals.items()])
            self.totals = {}
        if self.ledger:
            conn.executemany(_INSERT_LEDGER, self.ledger)
            self.ledger = []


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


@lru_cache(maxsize=64)
def _select_counters(n: int) -> str:
    return f"SELECT counter, value FROM quota_counters WHERE counter IN ({', '.join('?' * n)})"


def _marker(reservation_id: str) -> str:
    return f"r:{reservation_id}"


def _expire_slots(conn: sqlite3.Connection, now: float) -> None:
    """Delete every slot whose lease ended by ``now`` and count it out of its subject's count."""
    expired: dict[str, int] = {}
    for (subject,) in conn.execute("DELETE FROM quota_slots WHERE deadline <= ? RETURNING subject", (now,)):
        expired[subject] = expired.get(subject, 0) + 1
    if expired:
        conn.executemany(_CORRECT_COUNTER, [(-n, subject) for subject, n in expired.items()])


def reserve(batch: Any, request_plan: Plan, prompt_tokens: int, max_tokens: int, now: float,
            reservation_id: str, lease_seconds: float) -> Reservation | Rejection:
    """Read every counter of the plan, decide, and on admission count the request in all of them."""
    batch.flush()  # settles queued before this reserve count
    conn: sqlite3.Connection = batch.conn
    checks = request_plan.checks
    if request_plan.slots:
        _expire_slots(conn, now)
    names = [check.counter for check in checks]
    values = dict(conn.execute(_select_counters(len(names)), names).fetchall()) if names else {}
    observed = [values.get(name, 0) for name in names]
    outcome = decide(request_plan, observed, prompt_tokens, max_tokens, now, reservation_id)
    if isinstance(outcome, Rejection):
        return outcome
    adds = [(_marker(reservation_id), 1, now + RESERVATION_MEMORY_SECONDS)]
    for check in checks:
        if check.kind == CONCURRENCY:
            adds.append((check.counter, 1, _SLOT_COUNT_EXPIRES))
        else:
            adds.append((check.counter, 1 if check.kind == REQUESTS else outcome.reserved_tokens, check.expires))
    conn.executemany(_ADD_COUNTER, adds)
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
    merged: MergedWrites = batch.merged
    delta = used_tokens - reservation.reserved_tokens
    if delta:
        for counter in reservation.charges:
            merged.correct(counter, delta)
    if reservation.slots:
        # a slot whose lease had ended is gone already, and was counted out then
        for (subject,) in conn.execute("DELETE FROM quota_slots WHERE reservation = ? RETURNING subject",
                                       (reservation.id,)):
            merged.correct(subject, -1)
    if entry is not None:
        merged.add_entry(*entry)
    return True


def record(batch: Any, entry: tuple[tuple[Any, ...], Sequence[UsageRow]]) -> None:
    batch.merged.add_entry(*entry)


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
    batch.flush()
    _expire_slots(batch.conn, now)
    batch.conn.execute("DELETE FROM quota_counters WHERE expires <= ?", (now,))


def read_usage_rows(batch: Any, periods: tuple[str, str]) -> list[UsageRow]:
    cursor = batch.conn.execute(
        "SELECT period, team, key, requests, prompt_tokens, completion_tokens FROM usage_totals WHERE period IN (?, ?)",
        periods,
    )
    return [UsageRow(*row) for row in cursor]


def select_one(batch: Any) -> None:
    batch.conn.execute("SELECT 1").fetchone()
