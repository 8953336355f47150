"""Micro-benchmark: microseconds per reserve, and per request (reserve + settle with a ledger entry), for each store.

Run from the repository root:  python -m tests.bench.bench_stores [--requests N] [--concurrency C]

Several processes on one SQLite file (workers contending for its write lock):
start the same command with ``--stores sqlite --sqlite-path /tmp/shared.db`` in two shells at once.

Each store runs the operations one at a time (latency), then C at a time, as
a busy gateway does (the SQLite store shares commits between them, Redis
round trips overlap). Wall time and the CPU time of the whole process (all
threads) are both printed: CPU per request is what a store takes from the
gateway's throughput. The redis store runs against a private redis-server on
a loopback port, started and stopped here (its CPU is not counted).

A settle returns once the ledger row and the counters are committed (SQLite:
in the WAL; Redis: the script ran), so "request" is what the request path
pays when it waits for its settle (``Quotas.settle_durably``).
"""

from __future__ import annotations

import argparse
import asyncio
import tempfile
import time
from pathlib import Path
from typing import Awaitable, Callable

from proxy.accounting import LedgerEntry, QuotaStore, Subject, open_store
from proxy.config import AccountingConfig, LimitsConfig
from proxy.quotas import Quotas
from tests.redis_server import RedisServer, redis_available

SUBJECTS = [
    Subject("key", "alice", LimitsConfig(requests_per_minute=10**9, tokens_per_minute=10**12)),
    Subject("team", "research", LimitsConfig(
        requests_per_minute=10**9, tokens_per_minute=10**12, tokens_per_day=10**13,
        tokens_per_month=10**14, max_concurrent_requests=10**6)),
]

Operation = Callable[[QuotaStore, int], Awaitable[None]]


async def one_request(store: QuotaStore, i: int) -> None:
    now = time.time()
    reservation = await store.reserve(SUBJECTS, 120, 256, now)
    entry = LedgerEntry(now, f"req-{i}", "alice", "research", "gpt-4o-mini", 120, 80, 200)
    await store.settle(reservation, 120, 80, now, entry)


async def one_reserve(store: QuotaStore, i: int) -> None:
    await store.reserve(SUBJECTS, 120, 256, time.time())


def durable_request(quotas: Quotas) -> Operation:
    """What the request path pays: reserve, then ``Quotas.settle_durably`` (which waits for the commit)."""

    async def request(store: QuotaStore, i: int) -> None:
        now = time.time()
        reservation = await store.reserve(SUBJECTS, 120, 256, now)
        await quotas.settle_durably(reservation, LedgerEntry(now, f"req-{i}", "alice", "research", "gpt-4o-mini",
                                                             120, 80, 200))

    return request


async def measure(store: QuotaStore, operation: Operation, requests: int, concurrency: int) -> list[tuple[float, float]]:
    """(wall, CPU) microseconds per operation, one at a time and then ``concurrency`` at a time.

    CPU is the whole process's (every thread), which is what a store takes
    away from the gateway's throughput; wall time also counts waiting.
    """
    for i in range(min(requests // 10, 500)):  # warm up: scripts loaded, connections open
        await operation(store, i)
    results = []
    for in_flight in (1, concurrency):
        queue = iter(range(requests))

        async def worker() -> None:
            for i in queue:
                await operation(store, i)

        wall, cpu = time.perf_counter(), time.process_time()
        await asyncio.gather(*(worker() for _ in range(in_flight)))
        results.append(((time.perf_counter() - wall) / requests * 1e6, (time.process_time() - cpu) / requests * 1e6))
    return results


async def run_stores(configs: dict[str, AccountingConfig], requests: int, concurrency: int) -> None:
    print(f"microseconds per operation, {requests} of each; "
          f"wall / CPU of this process, 1 and {concurrency} in flight")
    print(f"{'store':8} {'operation':24} {'wall 1':>9} {'cpu 1':>9} {'wall ' + str(concurrency):>9} "
          f"{'cpu ' + str(concurrency):>9}", flush=True)
    for name, cfg in configs.items():
        for label in ("reserve", "reserve + settle", "reserve + settle_durably"):
            store = await open_store(cfg)
            quotas = Quotas(store, cfg, lambda operation: None)
            operation = {"reserve": one_reserve, "reserve + settle": one_request}.get(label) or durable_request(quotas)
            try:
                (wall_1, cpu_1), (wall_n, cpu_n) = await measure(store, operation, requests, concurrency)
            finally:
                await quotas.close()
            print(f"{name:8} {label:24} {wall_1:9.1f} {cpu_1:9.1f} {wall_n:9.1f} {cpu_n:9.1f}", flush=True)


async def redis_memory_per_settle(url: str, requests: int) -> float:
    """Redis memory (``INFO memory``) per settled request without a ledger entry: the settled-marker
    each settle leaves for ``SETTLED_MEMORY_SECONDS``."""
    import redis as redis_py

    from proxy.accounting.redis_store import RedisStore

    store = RedisStore(url)
    with redis_py.Redis.from_url(url) as admin:
        admin.flushall()
        now = time.time()

        async def settle_many(n: int) -> None:
            held = await asyncio.gather(*(store.reserve(SUBJECTS, 1, 1, now) for _ in range(n)))
            await asyncio.gather(*(store.settle(r, 1, 1, now) for r in held))

        await settle_many(1000)  # scripts loaded, the window counters exist
        before = admin.info("memory")["used_memory"]
        for _ in range(requests // 1000):
            await settle_many(1000)
        after = admin.info("memory")["used_memory"]
    await store.close()
    return (after - before) / (requests // 1000 * 1000)


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=5000)
    parser.add_argument("--concurrency", type=int, default=64)
    parser.add_argument("--stores", default="memory,sqlite,redis", help="comma-separated")
    parser.add_argument("--sqlite-path", help="a file to use (shared when several of these run at once)")
    args = parser.parse_args()
    wanted = args.stores.split(",")
    with tempfile.TemporaryDirectory() as tmp:
        configs = {
            "memory": AccountingConfig(store="memory"),
            "sqlite": AccountingConfig(store="sqlite", sqlite_path=args.sqlite_path or str(Path(tmp) / "bench.db")),
        }
        server = None
        if "redis" in wanted and redis_available():
            server = RedisServer(Path(tmp) / "redis")
            server.start()
            configs["redis"] = AccountingConfig(store="redis", redis_url=server.url)
        try:
            await run_stores({k: v for k, v in configs.items() if k in wanted}, args.requests, args.concurrency)
            if "redis" in configs:
                per_settle = await redis_memory_per_settle(configs["redis"].redis_url, 20_000)
                print(f"redis memory per settled request (its settled-marker): {per_settle:.0f} bytes")
        finally:
            if server is not None:
                server.stop()


if __name__ == "__main__":
    asyncio.run(main())
