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
                                         makes settle run once and a retried reserve count once
    sluice:u:day:<YYYYMMDD>              hash of ledger totals, field = JSON [team, key, metric]
    sluice:u:month:<YYYYMM>
    sluice:ledger                        stream of ledger entries, field `entry` = the entry as JSON
                                         (capped at about a million)

The ledger is kept twice: the stream holds every entry for audit and
export, the hashes hold running totals per day and month so ``usage`` from
any replica is two HGETALLs instead of a scan of the month's entries.

Times are the replicas' clocks (passed in as ``now``), not Redis's: windows
are named by the caller, and the grace period on every counter absorbs the
seconds by which NTP-synchronised clocks differ.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import json
import math
import uuid
from typing import Any, Iterator, Sequence

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
from proxy.accounting.store import (
    DEFAULT_LEASE_SECONDS,
    RESERVATION_MEMORY_SECONDS,
    QuotaStore,
    StoreUnavailable,
)

PREFIX = "sluice:"
LEDGER_STREAM = f"{PREFIX}ledger"
LEDGER_STREAM_MAXLEN = 1_000_000
DAY_TOTALS_TTL_SECONDS = 40 * 86400
MONTH_TOTALS_TTL_SECONDS = 400 * 86400
_KIND_CODE = {REQUESTS: "r", TOKENS: "t", CONCURRENCY: "c"}
_METRICS = ("requests", "prompt_tokens", "completion_tokens")

# Arguments travel as few space-separated strings rather than one ARGV each:
# redis-py packs every argument in Python, and at ~40 arguments per reserve
# that packing cost more than the round trip.
_WORDS_LUA = """
local function words(text)
  local out = {}
  for word in string.gmatch(text, '%S+') do out[#out + 1] = word end
  return out
end
"""

# KEYS[1]: the reservation's marker; KEYS[2..]: one per check, in plan order.
# ARGV[1]: "id now slot_deadline slot_set_ttl marker_ttl prompt_tokens max_tokens"
# ARGV[2]: three words per check: kind (r requests | t tokens | c concurrency), limit (-1: none), ttl.
# Returns {admitted 1|0, clamped max_tokens, value read for each check...}.
# The marker keeps "reserved_tokens reply...": settle reads what to correct from
# it, and a reserve that runs twice (redis-py retries once when a reply is lost)
# answers again from it instead of counting the request twice.
RESERVE_LUA = _WORDS_LUA + """
local previous = redis.call('GET', KEYS[1])
if previous then
  local reply = words(previous)
  table.remove(reply, 1)
  for i = 1, #reply do reply[i] = tonumber(reply[i]) end
  return reply
end
local request, spec = words(ARGV[1]), words(ARGV[2])
local now, prompt, answer = tonumber(request[2]), tonumber(request[6]), tonumber(request[7])
local need = 0
if answer > 0 then need = 1 end
local observed = {}
local admitted = true
for i = 2, #KEYS do
  local s = (i - 2) * 3
  local kind, limit = spec[s + 1], tonumber(spec[s + 2])
  local used
  if kind == 'c' then
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now)
    used = redis.call('ZCARD', KEYS[i])
  else
    used = tonumber(redis.call('GET', KEYS[i]) or '0')
  end
  observed[i - 1] = used
  if limit >= 0 then
    if kind == 't' then
      local room = limit - used - prompt
      if room < need then
        admitted = false
      elseif room < answer then
        answer = room
      end
    elseif used + 1 > limit then
      admitted = false
    end
  end
end
if admitted then
  local reserved = prompt + answer
  for i = 2, #KEYS do
    local s = (i - 2) * 3
    local kind = spec[s + 1]
    if kind == 'c' then
      redis.call('ZADD', KEYS[i], request[3], request[1])
      redis.call('EXPIRE', KEYS[i], request[4])
    else
      if kind == 'r' then
        redis.call('INCR', KEYS[i])
      else
        redis.call('INCRBY', KEYS[i], reserved)
      end
      redis.call('EXPIRE', KEYS[i], spec[s + 3])
    end
  end
end
local reply = {admitted and 1 or 0, answer, unpack(observed)}
if admitted then
  redis.call('SET', KEYS[1], (prompt + answer) .. ' ' .. table.concat(reply, ' '), 'EX', request[5])
end
return reply
"""

# record_entry(k, a): KEYS[k] the stream, KEYS[k+1] day totals, KEYS[k+2] month totals;
# ARGV[a]: "stream_maxlen day_ttl month_ttl prompt_tokens completion_tokens";
# ARGV[a+1..a+3]: the totals' fields for requests, prompt and completion tokens;
# ARGV[a+4]: the entry as JSON, the stream entry's one field.
_RECORD_ENTRY_LUA = _WORDS_LUA + """
local function record_entry(k, a)
  local numbers = words(ARGV[a])
  for h = 1, 2 do
    local totals = KEYS[k + h]
    redis.call('HINCRBY', totals, ARGV[a + 1], 1)
    redis.call('HINCRBY', totals, ARGV[a + 2], numbers[4])
    redis.call('HINCRBY', totals, ARGV[a + 3], numbers[5])
    redis.call('EXPIRE', totals, numbers[1 + h])
  end
  redis.call('XADD', KEYS[k], 'MAXLEN', '~', numbers[1], '*', 'entry', ARGV[a + 4])
end
"""

# KEYS[1]: the marker; then n_charges token counters; then n_slots concurrency sets;
# then, if an entry is recorded too, record_entry's three keys.
# ARGV[1]: "id used_tokens n_charges n_slots"; ARGV[2..6]: record_entry's arguments.
# Returns 1, or 0 if the reservation was settled before (or forgotten).
SETTLE_LUA = _RECORD_ENTRY_LUA + """
local settle = words(ARGV[1])
local marker = redis.call('GET', KEYS[1])
if not marker then return 0 end
redis.call('DEL', KEYS[1])
local delta = tonumber(settle[2]) - tonumber(words(marker)[1])
local n_charges, n_slots = tonumber(settle[3]), tonumber(settle[4])
for i = 2, 1 + n_charges do
  if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
    redis.call('INCRBY', KEYS[i], delta)
  end
end
for i = 2 + n_charges, 1 + n_charges + n_slots do
  redis.call('ZREM', KEYS[i], settle[1])
end
if #KEYS > 1 + n_charges + n_slots then
  record_entry(2 + n_charges + n_slots, 2)
end
return 1
"""

RECORD_LUA = _RECORD_ENTRY_LUA + """
record_entry(1, 1)
return 1
"""


@contextlib.contextmanager
def _unavailable_on_error() -> Iterator[None]:
    """Any failure to talk to Redis becomes the one exception the gateway handles."""
    try:
        yield
    except (RedisError, OSError, asyncio.TimeoutError) as exc:
        raise StoreUnavailable(f"redis store failed: {exc}") from exc


def _check_key(check: Check) -> str:
    kind = "c" if check.kind == CONCURRENCY else "q"
    return f"{PREFIX}{kind}:{check.counter}"


def _ledger_keys_and_args(entry: LedgerEntry) -> tuple[list[str], list[Any]]:
    day, month = period_keys(entry.time)
    keys = [LEDGER_STREAM, f"{PREFIX}u:{day}", f"{PREFIX}u:{month}"]
    prompt, completion = int(entry.prompt_tokens), int(entry.completion_tokens)
    numbers = f"{LEDGER_STREAM_MAXLEN} {DAY_TOTALS_TTL_SECONDS} {MONTH_TOTALS_TTL_SECONDS} {prompt} {completion}"
    fields = [json.dumps([entry.team, entry.key, metric]) for metric in _METRICS]
    return keys, [numbers, *fields, json.dumps(dataclasses.asdict(entry))]


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
    (a pooled connection may have died with a restarted Redis), and the pool
    reconnects by itself when Redis is back.
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
        self._reserve = self._redis.register_script(RESERVE_LUA)
        self._settle = self._redis.register_script(SETTLE_LUA)
        self._record = self._redis.register_script(RECORD_LUA)

    async def _run(self, script: Any, keys: list[str], args: list[Any]) -> Any:
        with _unavailable_on_error():
            return await script(keys=keys, args=args)

    async def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        validate_amounts(prompt_tokens, max_tokens)
        request_plan = plan(subjects, now)
        reservation_id = uuid.uuid4().hex
        keys, args = self._reserve_arguments(request_plan, reservation_id, prompt_tokens, max_tokens, now)
        admitted, clamped, *observed = await self._run(self._reserve, keys, args)
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
        keys = [f"{PREFIX}r:{reservation.id}"]
        keys += [f"{PREFIX}q:{charge.counter}" for charge in reservation.charges]
        keys += [f"{PREFIX}c:{slot}" for slot in reservation.slots]
        args: list[Any] = [f"{reservation.id} {int(prompt_tokens + completion_tokens)} "
                           f"{len(reservation.charges)} {len(reservation.slots)}"]
        if entry is not None:
            ledger_keys, ledger_args = _ledger_keys_and_args(entry)
            keys += ledger_keys
            args += ledger_args
        await self._run(self._settle, keys, args)

    async def record(self, entry: LedgerEntry) -> None:
        await self._run(self._record, *_ledger_keys_and_args(entry))

    async def usage(self, *, now: float, team: str | None = None, key: str | None = None) -> UsageReport:
        periods = period_keys(now)
        with _unavailable_on_error():
            async with self._redis.pipeline(transaction=False) as pipe:
                for period in periods:
                    pipe.hgetall(f"{PREFIX}u:{period}")
                replies = await pipe.execute()
        rows = [row for period, totals in zip(periods, replies) for row in _usage_rows(period, totals)]
        return build_report(rows, now, team=team, key=key)

    async def ping(self) -> None:
        with _unavailable_on_error():
            await self._redis.ping()

    async def close(self) -> None:
        await self._redis.aclose()
