"""The ``redis`` store: every limit shared by all replicas, exactly.

Each ``reserve`` is one Lua script (EVALSHA) that reads every counter of the
request, decides, and increments all of them or none, so two gateways on one
Redis hold a team to one limit together: Redis runs one script at a time.
The decision rule is ``quota.decide``'s, written a second time in Lua
because it must run inside Redis; the script returns the values it read, the
Python side runs ``decide`` on them for the reply and the headers, and a
disagreement is raised as a bug, not served.

Keys (one Redis, or a primary with replicas; not Redis Cluster, since a
script touches a key's and a team's counters, which Cluster would spread over
shards):

    sluice:q:<subject>:<limit>:<window>  integer counter, expires with its window (+ grace)
    sluice:c:<subject>                   sorted set of reservation ids scored by lease deadline;
                                         expired members are dropped before counting
    sluice:r:<reservation id>            the reserved tokens and the reply, until settled;
                                         makes a retried reserve count once
    sluice:s:<reservation id>            "settled", for ten minutes after the settle: makes a repeated
                                         settle do nothing, also once the marker above is gone
    sluice:u:day:<YYYYMMDD>              hash of ledger totals, field = JSON [team, key, metric]
    sluice:u:month:<YYYYMM>
    sluice:ledger                        stream of ledger entries, field `entry` = the entry as JSON
                                         (capped at about a million)

The ledger is kept twice: the stream holds every entry for audit and
export, the hashes hold running totals per day and month so ``usage`` from
any replica is two HGETALLs instead of a scan of the month's entries.

The scripts are in ``redis_scripts``, the shared connection that batches
every caller's commands in ``redis_pipeline``.

Times are the replicas' clocks (passed in as ``now``), not Redis's: windows
are named by the caller, and the grace period on every counter absorbs the
seconds by which NTP-synchronised clocks differ.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
from collections.abc import Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import RedisError

from proxy.accounting.ledger import (
    LedgerEntry,
    UsageReport,
    UsageRow,
    build_report,
    period_keys,
)
from proxy.accounting.quota import (
    CONCURRENCY,
    REQUESTS,
    TOKENS,
    WINDOW_GRACE_SECONDS,
    Check,
    Plan,
    Rejection,
    Reservation,
    Subject,
    decide,
    plan,
    validate_amounts,
)
from proxy.accounting.redis_pipeline import Pipeline, unavailable
from proxy.accounting.redis_scripts import PING, RECORD, RENEW, RESERVE, SETTLE, Script
from proxy.accounting.store import (
    DEFAULT_LEASE_SECONDS,
    RESERVATION_MEMORY_SECONDS,
    QuotaStore,
)
from proxy.logs import log

PREFIX = "sluice:"
LEDGER_STREAM = f"{PREFIX}ledger"
LEDGER_STREAM_MAXLEN = 1_000_000
# How long ``sluice:s:<id>`` remembers that a reservation was settled, so that a repeat
# is recognised as one; see ``RedisStore.settle`` for the trade. About 140 bytes of
# Redis memory per request settled in the last ten minutes (84 MB at 1,000 requests/s).
SETTLED_MEMORY_SECONDS = 600
DAY_TOTALS_TTL_SECONDS = 40 * 86400
MONTH_TOTALS_TTL_SECONDS = 400 * 86400
_KIND_CODE = {REQUESTS: "r", TOKENS: "t", CONCURRENCY: "c"}
_METRICS = ("requests", "prompt_tokens", "completion_tokens")


def _check_key(check: Check) -> str:
    kind = "c" if check.kind == CONCURRENCY else "q"
    return f"{PREFIX}{kind}:{check.counter}"


@functools.lru_cache(maxsize=4096)
def _totals_fields(team: str, key: str) -> tuple[str, ...]:
    """The totals hashes' fields of a (team, key): the same few pairs over and over, so JSON-encoded once."""
    return tuple(json.dumps([team, key, metric]) for metric in _METRICS)


_ENTRY_FIELDS = tuple(field.name for field in dataclasses.fields(LedgerEntry))


def _ledger_keys_and_args(entry: LedgerEntry) -> tuple[list[str], list[str]]:
    day, month = period_keys(entry.time)
    keys = [LEDGER_STREAM, f"{PREFIX}u:{day}", f"{PREFIX}u:{month}"]
    prompt, completion = int(entry.prompt_tokens), int(entry.completion_tokens)
    numbers = f"{LEDGER_STREAM_MAXLEN} {DAY_TOTALS_TTL_SECONDS} {MONTH_TOTALS_TTL_SECONDS} {prompt} {completion}"
    # dataclasses.asdict's result, without its deep copy of every (scalar) field
    as_dict = {name: getattr(entry, name) for name in _ENTRY_FIELDS}
    return keys, [numbers, *_totals_fields(entry.team, entry.key), json.dumps(as_dict)]


def _usage_rows(period: str, totals: dict[bytes, bytes]) -> list[UsageRow]:
    per_pair: dict[tuple[str, str], dict[str, int]] = {}
    for field, value in totals.items():
        team, key, metric = json.loads(field)
        per_pair.setdefault((team, key), {})[metric] = int(value)
    return [
        UsageRow(period, team, key, *(metrics.get(m, 0) for m in _METRICS))
        for (team, key), metrics in per_pair.items()
    ]


class RedisStore(QuotaStore):
    """See the module docstring.

    Fails fast: a call that cannot reach Redis within ``timeout_seconds``
    raises ``StoreUnavailable``. A broken connection is retried once at once
    (it may have died with a restarted Redis), and reconnects by itself when
    Redis is back.

    Reserves, settles, records and pings share one connection, batched (see
    ``redis_pipeline.Pipeline``); ``usage``, rare, goes through redis-py's client and pool.
    """

    def __init__(
        self,
        url: str,
        *,
        lease_seconds: float = DEFAULT_LEASE_SECONDS,
        timeout_seconds: float = 2.0,
        max_connections: int = 64,
    ):
        self.lease_seconds = lease_seconds
        pool = BlockingConnectionPool.from_url(
            url,
            max_connections=max_connections,
            timeout=timeout_seconds,
            socket_timeout=timeout_seconds,
            socket_connect_timeout=timeout_seconds,
            retry=Retry(NoBackoff(), 1),
        )
        self._redis = Redis.from_pool(pool)
        # A connection like the pool's (same URL, credentials, TLS, database), owned by the
        # pipeline. No socket timeout of its own: the pipeline times each batch as a whole,
        # and a per-write timeout costs a task per write (asyncio.wait_for).
        connection = pool.connection_class(**{**pool.connection_kwargs, "socket_timeout": None})
        self._pipeline = Pipeline(connection, timeout_seconds)

    async def _run(self, script: Script, keys: list[str], args: list[str]) -> Any:
        return await self._pipeline.call(script.command(keys, args))

    async def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        validate_amounts(prompt_tokens, max_tokens)
        request_plan = plan(subjects, now)
        reservation_id = os.urandom(16).hex()
        keys, args = self._reserve_arguments(request_plan, reservation_id, prompt_tokens, max_tokens, now)
        admitted, clamped, *observed = map(int, (await self._run(RESERVE, keys, args)).split())
        outcome = decide(request_plan, observed, prompt_tokens, max_tokens, now, reservation_id)
        if bool(admitted) != isinstance(outcome, Reservation) or (admitted and outcome.max_tokens != clamped):
            raise RuntimeError("the reserve script and quota.decide disagree; this is a bug")
        return outcome

    def _reserve_arguments(
        self, request_plan: Plan, reservation_id: str, prompt_tokens: int, max_tokens: int, now: float
    ) -> tuple[list[str], list[str]]:
        keys = [f"{PREFIX}r:{reservation_id}"]
        request = (
            f"{reservation_id} {now!r} {now + self.lease_seconds!r} "
            f"{math.ceil(self.lease_seconds) + WINDOW_GRACE_SECONDS} {RESERVATION_MEMORY_SECONDS} "
            f"{int(prompt_tokens)} {int(max_tokens)}"
        )
        spec: list[str] = []
        for check in request_plan.checks:
            keys.append(_check_key(check))
            limit = -1 if check.limit is None else check.limit
            # a concurrency set's lifetime is the lease (in ``request``), not a window's
            ttl = 0 if check.kind == CONCURRENCY else max(math.ceil(check.expires - now), 1)
            spec.append(f"{_KIND_CODE[check.kind]} {limit} {ttl}")
        return keys, [request, " ".join(spec)]

    async def settle(
        self,
        reservation: Reservation,
        prompt_tokens: int,
        completion_tokens: int,
        now: float,
        entry: LedgerEntry | None = None,
    ) -> None:
        """One script: correct the counters, free the slots, add the entry, mark it settled.

        A settle must land even when Redis has lost the reservation (restarted
        empty, or failed over to a replica that never saw it): the request was
        served, so its row goes into the ledger and its real tokens into the
        day, month and (if still open) minute counters, from zero. A repeat
        must do nothing. Both find the reservation's marker gone; what tells
        them apart is the settled-marker ``sluice:s:<id>``, written by the
        settle itself in the same script, so it exists exactly when this
        reservation's settle has already been applied to this Redis's data.
        After an empty restart it is gone together with everything that
        settle wrote, so applying again counts once, not twice.

        The double-count risk is a repeat arriving after the settled-marker
        has expired (``SETTLED_MEMORY_SECONDS``, ten minutes): a settle whose
        first run landed but whose reply was lost (a timeout, a connection cut
        after the script ran), retried that much later, which takes Redis
        unreachable from this gateway for ten minutes right after it ran (the
        pipeline resends at once, the retry queue every second). That is one
        request counted twice in a rare double fault, against every request in
        flight losing its usage and its ledger row on every empty restart: the
        right trade for a ledger that bills. A longer memory narrows the risk
        further at about 140 bytes of Redis memory per request settled within
        it (measured: 20,000 settles, ``INFO memory``).
        """
        keys = [f"{PREFIX}r:{reservation.id}", f"{PREFIX}s:{reservation.id}"]
        keys += [f"{PREFIX}q:{charge.counter}" for charge in reservation.charges]
        keys += [f"{PREFIX}c:{slot}" for slot in reservation.slots]
        used = int(prompt_tokens) + int(completion_tokens)
        counts = f"{used} {len(reservation.charges)} {len(reservation.slots)} {SETTLED_MEMORY_SECONDS}"
        ttls = " ".join(str(max(math.ceil(charge.expires - now), 0)) for charge in reservation.charges)
        args = [f"{reservation.id} {counts}", ttls or "-"]
        if entry is not None:
            ledger_keys, ledger_args = _ledger_keys_and_args(entry)
            keys += ledger_keys
            args += ledger_args
        if await self._run(SETTLE, keys, args) == 2:
            log.warning(
                "redis had lost a reservation (restarted empty?); its settle counted the real tokens afresh",
                reservation=reservation.id, tokens=used,
                request_id=None if entry is None else entry.request_id,
            )

    async def renew(self, reservation: Reservation, now: float) -> None:
        if not reservation.slots:
            return
        keys = [f"{PREFIX}c:{slot}" for slot in reservation.slots]
        request = (f"{reservation.id} {now!r} {now + self.lease_seconds!r} "
                   f"{math.ceil(self.lease_seconds) + WINDOW_GRACE_SECONDS}")
        await self._run(RENEW, keys, [request])

    async def record(self, entry: LedgerEntry) -> None:
        await self._run(RECORD, *_ledger_keys_and_args(entry))

    async def usage(self, *, now: float, team: str | None = None, key: str | None = None) -> UsageReport:
        periods = period_keys(now)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for period in periods:
                    pipe.hgetall(f"{PREFIX}u:{period}")
                replies = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            raise unavailable(exc) from exc
        rows = [row for period, totals in zip(periods, replies) for row in _usage_rows(period, totals)]
        return build_report(rows, now, team=team, key=key)

    async def ping(self) -> None:
        """Through the pipeline's connection, the one requests use."""
        await self._pipeline.call(PING)

    async def close(self) -> None:
        await self._pipeline.close()
        await self._redis.aclose()
