"""Several processes on one sqlite file hold every limit together, exactly (``sluice serve --workers N``).

Each child is a real Python process (``python -c``) with its own store on the
shared file. The children wait for a start file, then fire their reserves at
once, so they contend for the file's write lock; each prints what it was
given as JSON. ``now`` is passed explicitly, so no minute boundary can open a
second window in the middle of a burst.
"""

from __future__ import annotations

import asyncio
import calendar
import json
import signal
import sqlite3
import subprocess
import sys
import textwrap
from pathlib import Path

from proxy.accounting import Rejection, Reservation, Subject
from proxy.accounting.sqlite_store import SqliteStore
from proxy.accounting.store import DEFAULT_LEASE_SECONDS
from proxy.config import LimitsConfig

ROOT = Path(__file__).resolve().parent.parent
T0 = calendar.timegm((2025, 1, 15, 12, 34, 10))

CHILD = textwrap.dedent(
    """
    import asyncio, json, os, sys, time
    from proxy.accounting import Reservation, Subject
    from proxy.accounting.sqlite_store import SqliteStore
    from proxy.config import LimitsConfig

    async def main(path, go, now, limits, requests, hold):
        store = await SqliteStore.open(path)
        subjects = [Subject("key", f"key-{os.getpid()}", LimitsConfig()),
                    Subject("team", "research", LimitsConfig(**limits))]
        print("ready", flush=True)
        while not os.path.exists(go):
            await asyncio.sleep(0.005)
        # in groups of four: a process's reserves share transactions, and the processes interleave
        outcomes = []
        for start in range(0, len(requests), 4):
            group = requests[start:start + 4]
            outcomes += await asyncio.gather(*(store.reserve(subjects, p, m, now) for p, m in group))
        admitted = [o for o in outcomes if isinstance(o, Reservation)]
        print(json.dumps([[o.prompt_tokens, o.max_tokens, o.reserved_tokens] for o in admitted]), flush=True)
        if hold:
            await asyncio.sleep(120)  # holds its reservations until killed
        await store.close()

    path, go, now, limits, requests, hold = sys.argv[1:]
    asyncio.run(main(path, go, float(now), json.loads(limits), json.loads(requests), hold == "1"))
    """
)


class Children:
    """Child processes on one file, started together."""

    def __init__(self, tmp_path: Path, limits: dict, requests: list[list[list[int]]], hold: bool = False):
        self.path = str(tmp_path / "shared.db")
        self.go = tmp_path / "go"
        self.processes = [
            subprocess.Popen(
                [sys.executable, "-c", CHILD, self.path, str(self.go), str(T0), json.dumps(limits),
                 json.dumps(batch), "1" if hold else "0"],
                stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT,
            )
            for batch in requests
        ]

    async def run(self) -> list[list[list[int]]]:
        """Start them all at once; each one's admitted (prompt, max_tokens, reserved)."""
        for child in self.processes:
            assert await self._line(child) == "ready", child.stderr.read().decode()
        self.go.touch()
        return [json.loads(await self._line(child)) for child in self.processes]

    @staticmethod
    async def _line(child: subprocess.Popen) -> str:
        return (await asyncio.wait_for(asyncio.to_thread(child.stdout.readline), timeout=60)).decode().strip()

    def kill(self) -> None:
        for child in self.processes:
            if child.poll() is None:
                child.send_signal(signal.SIGKILL)
            child.wait()
            child.stdout.close()
            child.stderr.close()


def team(**limits: int) -> list[Subject]:
    return [Subject("key", "parent", LimitsConfig()), Subject("team", "research", LimitsConfig(**limits))]


async def test_three_processes_admit_exactly_the_request_limit(tmp_path):
    children = Children(tmp_path, {"requests_per_minute": 20}, [[[10, 10]] * 20] * 3)
    try:
        admitted = await children.run()
    finally:
        children.kill()
    assert sum(len(batch) for batch in admitted) == 20, admitted
    store = await SqliteStore.open(children.path)
    try:
        assert isinstance(await store.reserve(team(requests_per_minute=20), 1, 1, T0), Rejection)
    finally:
        await store.close()


async def test_three_processes_never_reserve_past_a_token_limit(tmp_path):
    limit = 10_000
    batches = [[[(31 * i + 7 * j) % 400, 1 + (13 * i + j) % 800] for i in range(40)] for j in range(3)]
    children = Children(tmp_path, {"tokens_per_minute": limit}, batches)
    try:
        admitted = await children.run()
    finally:
        children.kill()
    reserved = sum(r for batch in admitted for _, _, r in batch)
    assert 0 < reserved <= limit
    assert all(m >= 1 for batch in admitted for _, m, _ in batch)
    with sqlite3.connect(children.path) as conn:
        (counted,) = conn.execute(
            "SELECT value FROM quota_counters WHERE counter = 'team:research:tokens_per_minute:202501151234'"
        ).fetchone()
    conn.close()
    assert counted == reserved  # no update lost between processes


async def test_the_concurrency_limit_holds_across_processes_and_a_dead_ones_slots_expire(tmp_path):
    children = Children(tmp_path, {"max_concurrent_requests": 5}, [[[1, 1]] * 10] * 3, hold=True)
    try:
        admitted = await children.run()
        assert sum(len(batch) for batch in admitted) == 5, admitted
        limits = team(max_concurrent_requests=5)
        store = await SqliteStore.open(children.path)
        try:
            assert isinstance(await store.reserve(limits, 1, 1, T0 + 1), Rejection)
            children.kill()  # kill -9 with all five slots held
            assert isinstance(await store.reserve(limits, 1, 1, T0 + DEFAULT_LEASE_SECONDS - 1), Rejection)
            # their leases end: the slots are free again, five of them and no more
            after = [await store.reserve(limits, 1, 1, T0 + DEFAULT_LEASE_SECONDS + 1) for _ in range(6)]
            assert [isinstance(o, Reservation) for o in after] == [True] * 5 + [False]
        finally:
            await store.close()
    finally:
        children.kill()


async def test_a_dead_processes_tokens_hold_their_window_and_no_longer(tmp_path):
    children = Children(tmp_path, {"tokens_per_minute": 1000, "tokens_per_day": 5000}, [[[100, 300]] * 2],
                        hold=True)
    try:
        await children.run()
    finally:
        children.kill()
    store = await SqliteStore.open(children.path)
    try:
        limits = team(tokens_per_minute=1000, tokens_per_day=5000)
        same_minute = await store.reserve(limits, 0, 10_000, T0 + 1)
        assert same_minute.max_tokens == 1000 - 800
        next_minute = await store.reserve(limits, 0, 10_000, T0 + 60)
        assert next_minute.max_tokens == 1000  # the minute ended; the day still holds both
        assert next_minute.tokens.remaining == 0
        probe = await store.reserve(team(tokens_per_day=5000), 0, 1, T0 + 61)
        assert probe.tokens.remaining == 5000 - 800 - 200 - 1000 - 1
    finally:
        await store.close()


async def test_a_reservation_is_settled_by_another_process_and_its_slot_freed(tmp_path):
    path = str(tmp_path / "shared.db")
    first, second = await SqliteStore.open(path), await SqliteStore.open(path)
    try:
        limits = team(max_concurrent_requests=1, tokens_per_day=1000)
        held = await first.reserve(limits, 100, 400, T0)
        assert isinstance(await second.reserve(limits, 1, 1, T0), Rejection)
        await second.settle(held, 100, 50, T0 + 1)
        await first.settle(held, 100, 50, T0 + 1)  # a repeat, from the other process: nothing
        again = await first.reserve(limits, 0, 1, T0 + 2)
        assert isinstance(again, Reservation) and again.tokens.remaining == 1000 - 150 - 1
    finally:
        await first.close()
        await second.close()
