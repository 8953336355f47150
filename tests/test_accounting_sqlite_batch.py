"""The sqlite store's batches: many requests in one transaction decide exactly as one per transaction.

``CounterView`` lets a batch read each counter once and write it once; the
property here is that this changes nothing: the same workload, run with
every operation in its own transaction and run grouped into random batches,
gives the same decisions and leaves the same rows in the file.
"""

from __future__ import annotations

import calendar
import sqlite3

from hypothesis import given, settings
from hypothesis import strategies as st

from proxy.accounting import LedgerEntry, Reservation, Subject
from proxy.accounting import sqlite_ops as ops
from proxy.accounting.quota import plan
from proxy.accounting.sqlite_batch import CounterView
from proxy.accounting.sqlite_worker import Batch
from proxy.config import LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))
TEAM = Subject("team", "research", LimitsConfig(requests_per_minute=25, tokens_per_minute=4000,
                                                tokens_per_day=30_000, max_concurrent_requests=4))
KEYS = [Subject("key", "alice", LimitsConfig(tokens_per_minute=1500)),
        Subject("key", "bob", LimitsConfig(max_concurrent_requests=2))]
LEASE = 90.0

reserve_op = st.tuples(st.just("reserve"), st.integers(0, 1), st.integers(0, 700), st.integers(0, 1200))
settle_op = st.tuples(st.just("settle"), st.integers(0, 40), st.floats(0, 1.2))
renew_op = st.tuples(st.just("renew"), st.integers(0, 40))
wait_op = st.tuples(st.just("wait"), st.sampled_from([0.0, 1.0, 35.0, 70.0, 5000.0]))
prune_op = st.tuples(st.just("prune"))
ops_strategy = st.lists(st.one_of(reserve_op, reserve_op, settle_op, renew_op, wait_op, prune_op), max_size=80)


def fresh() -> sqlite3.Connection:
    conn = sqlite3.connect(":memory:", isolation_level=None)
    for statement in filter(str.strip, ops.SCHEMA.split(";")):
        conn.execute(statement)
    return conn


def run(workload: list[tuple], cuts: set[int]) -> tuple[list, dict]:
    """Run the workload, committing after every operation whose index is in ``cuts``."""
    conn = fresh()
    conn.execute("BEGIN IMMEDIATE")
    batch = Batch(conn, CounterView())
    now = float(T0)
    held: list[Reservation] = []
    decisions: list = []
    for index, op in enumerate(workload):
        if op[0] == "wait":
            now += op[1]
        elif op[0] == "prune":
            ops.prune(batch, now)
        elif op[0] == "renew":
            if held:
                decisions.append(ops.renew(batch, held[op[1] % len(held)].id, now, LEASE))
        elif op[0] == "settle":
            if held:
                reservation = held.pop(op[1] % len(held))
                used = reservation.prompt_tokens + int(reservation.max_tokens * op[2])
                entry = LedgerEntry(now, f"req-{index}", "alice", "research", "m", reservation.prompt_tokens,
                                    used - reservation.prompt_tokens, 200)
                decisions.append(ops.settle(batch, ops.Settled.of(reservation), used, ops.ledger_row(entry)))
        else:
            _, key, prompt, max_tokens = op
            outcome = ops.reserve(batch, plan([KEYS[key], TEAM], now), prompt, max_tokens, now, f"id-{index}", LEASE)
            if isinstance(outcome, Reservation):
                held.append(outcome)
                decisions.append(("admit", outcome.max_tokens, outcome.tokens, outcome.requests))
            else:
                decisions.append(("reject", outcome.limit_name, outcome.tokens, outcome.requests))
        if index in cuts:
            batch.flush()
            conn.execute("COMMIT")
            conn.execute("BEGIN IMMEDIATE")
            batch = Batch(conn, CounterView())
    batch.flush()
    conn.execute("COMMIT")
    rows = {
        table: sorted(conn.execute(f"SELECT * FROM {table}").fetchall())
        for table in ("quota_counters", "quota_slots", "usage_totals")
    }
    rows["ledger"] = sorted(conn.execute("SELECT request_id, prompt_tokens, completion_tokens FROM ledger"))
    conn.close()
    return decisions, rows


@settings(max_examples=120, deadline=None)
@given(ops_strategy, st.sets(st.integers(0, 80)))
def test_batched_operations_decide_and_write_as_one_per_transaction(workload, cuts):
    alone = run(workload, set(range(len(workload))))
    batched = run(workload, cuts)
    assert batched == alone


def test_a_batch_reads_and_writes_more_counters_than_one_statement_holds():
    """Reads and writes go in parts of a bounded size; 40 counters, some without a row, round-trip."""
    conn = fresh()
    names = [f"key:k{i}:requests_per_minute:202501151234" for i in range(40)]
    conn.execute("BEGIN")
    first = CounterView()
    assert first.read(conn, names) == [0] * 40
    for i, name in enumerate(names[::2]):
        first.add(name, i + 1, T0 + 60)
    first.apply(conn)
    conn.execute("COMMIT")
    second = CounterView()
    assert second.read(conn, names) == [(i // 2 + 1) if i % 2 == 0 else 0 for i in range(40)]
    assert conn.execute("SELECT count(*) FROM quota_counters").fetchone()[0] == 20
