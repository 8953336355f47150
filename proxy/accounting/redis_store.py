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

Times are the replicas' clocks (passed in as ``now``), not Redis's: windows
are named by the caller, and the grace period on every counter absorbs the
seconds by which NTP-synchronised clocks differ.
"""

from __future__ import annotations

import asyncio
import collections
import dataclasses
import functools
import hashlib
import json
import math
import os
from collections.abc import Iterable, Sequence
from typing import Any

from redis.asyncio import BlockingConnectionPool, Redis
from redis.asyncio.retry import Retry
from redis.backoff import NoBackoff
from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

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

# Arguments travel as few space-separated strings rather than one ARGV each:
# every argument is packed in Python, and at ~40 arguments per reserve
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
# Returns "admitted(1|0) clamped_max_tokens value_read_for_each_check...", one
# string rather than an array: the client parses a bulk string in two reads, an
# array of n integers in n + 1. Numbers go through %d, since Lua's own number
# to string conversion turns 1e14 and above into exponent notation.
# The marker keeps "reserved_tokens reply": settle reads what to correct from
# it, and a reserve that runs twice (the client resends a batch once when its
# connection broke before the replies came) answers again from it instead of
# counting the request twice.
RESERVE_LUA = _WORDS_LUA + """
local previous = redis.call('GET', KEYS[1])
if previous then
  return string.sub(previous, string.find(previous, ' ', 1, true) + 1)
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
for i = 1, #reply do reply[i] = string.format('%d', reply[i]) end
reply = table.concat(reply, ' ')
if admitted then
  redis.call('SET', KEYS[1], string.format('%d', prompt + answer) .. ' ' .. reply, 'EX', request[5])
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

# KEYS[1]: the reservation's marker; KEYS[2]: its settled-marker; then n_charges token
# counters; then n_slots concurrency sets; then, if an entry is recorded too, record_entry's
# three keys.
# ARGV[1]: "id used_tokens n_charges n_slots settled_ttl"; ARGV[2]: one ttl per charge (seconds
# its window, plus grace, has left; 0: over); ARGV[3..7]: record_entry's arguments.
# Returns 1 (settled), 0 (a repeat: settled before, nothing done) or 2 (settled, but the
# reservation's marker was gone: Redis lost it, so the real tokens are added afresh).
SETTLE_LUA = _RECORD_ENTRY_LUA + """
local settle = words(ARGV[1])
if redis.call('EXISTS', KEYS[2]) == 1 then return 0 end
local used, n_charges, n_slots = tonumber(settle[2]), tonumber(settle[3]), tonumber(settle[4])
local marker = redis.call('GET', KEYS[1])
local result = 1
if marker then
  redis.call('DEL', KEYS[1])
  local delta = used - tonumber(words(marker)[1])
  for i = 3, 2 + n_charges do
    if delta ~= 0 and redis.call('EXISTS', KEYS[i]) == 1 then
      redis.call('INCRBY', KEYS[i], delta)
    end
  end
else
  local ttls = words(ARGV[2])
  for i = 1, n_charges do
    local ttl = tonumber(ttls[i])
    if used ~= 0 and ttl > 0 then
      redis.call('INCRBY', KEYS[2 + i], used)
      redis.call('EXPIRE', KEYS[2 + i], ttl)
    end
  end
  result = 2
end
for i = 3 + n_charges, 2 + n_charges + n_slots do
  redis.call('ZREM', KEYS[i], settle[1])
end
redis.call('SET', KEYS[2], '1', 'EX', settle[5])
if #KEYS > 2 + n_charges + n_slots then
  record_entry(3 + n_charges + n_slots, 3)
end
return result
"""

# KEYS: the reservation's concurrency sets. ARGV[1]: "id now new_deadline set_ttl".
# ZADD XX GT moves a live slot's deadline later and never re-adds a slot that is gone
# (settled, or expired and dropped: another request may hold that room now).
RENEW_LUA = _WORDS_LUA + """
local renew = words(ARGV[1])
local renewed = 0
for i = 1, #KEYS do
  local deadline = redis.call('ZSCORE', KEYS[i], renew[1])
  if deadline and tonumber(deadline) > tonumber(renew[2]) then
    redis.call('ZADD', KEYS[i], 'XX', 'GT', renew[3], renew[1])
    redis.call('EXPIRE', KEYS[i], renew[4], 'GT')
    renewed = renewed + 1
  end
end
return renewed
"""

RECORD_LUA = _RECORD_ENTRY_LUA + """
record_entry(1, 1)
return 1
"""


def _pack(parts: Sequence[str | bytes]) -> bytes:
    """One command in the Redis protocol (RESP): an array of bulk strings.

    About a third of redis-py's ``pack_command`` time for a reserve (5 vs 14
    µs measured): it handles only the two types we send, with no encoder
    lookups or chunking of large values.
    """
    out = [b"*%d\r\n" % len(parts)]
    for part in parts:
        data = part.encode() if isinstance(part, str) else part
        out.append(b"$%d\r\n%s\r\n" % (len(data), data))
    return b"".join(out)


class _Script:
    """A Lua script, run by its SHA1 (EVALSHA) and loaded again when Redis has forgotten it."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self.load = _pack([b"SCRIPT", b"LOAD", source.encode()])

    def command(self, keys: Sequence[str], args: Sequence[str]) -> bytes:
        return _pack([b"EVALSHA", self.sha, str(len(keys)), *keys, *args])


_RESERVE = _Script(RESERVE_LUA)
_SETTLE = _Script(SETTLE_LUA)
_RECORD = _Script(RECORD_LUA)
_RENEW = _Script(RENEW_LUA)
_SCRIPTS = (_RESERVE, _SETTLE, _RECORD, _RENEW)
_PING = _pack([b"PING"])


def _unavailable(exc: BaseException) -> StoreUnavailable:
    """Any failure to talk to Redis becomes the one exception the gateway handles."""
    error = StoreUnavailable(f"redis store failed: {exc}")
    error.__cause__ = exc
    return error


class _Pipeline:
    """One connection; the commands of every caller of a loop turn go out in one write.

    Why: through redis-py's client each command paid for a pool checkout, a
    retry wrapper, two timeout contexts, its packing and a reply parse per
    array element, about 0.4 ms of gateway CPU each, more than Redis spends on
    the script. Here a caller only queues its packed command and awaits a
    future; one task writes everything queued since the last write, reads the
    replies back in order (Redis answers a connection's commands in the order
    sent) and resolves the futures. Busy gateways send dozens of commands per
    write; an idle one sends each alone at once, one round trip as before.

    Nothing is acknowledged early: a caller's future resolves with its own
    reply, or fails with ``StoreUnavailable``, so a settle that did not reach
    Redis still raises into ``Quotas``' retry queue.

    Failures, per batch:
    - the connection broke (Redis restarted, a stale socket): the commands
      not yet answered are sent once more on a new connection. Each may have
      run already with its reply lost; the scripts make that harmless
      (reserve and settle are idempotent through their marker; a ``record``
      may count twice, as it could with redis-py's own retry before);
    - ``NOSCRIPT`` (Redis restarted or flushed its scripts): the scripts are
      loaded and those commands sent again, in one round trip; they had not
      run;
    - a timeout (``timeout_seconds`` for the whole batch): all of its
      unanswered commands fail, and the connection is dropped, since late
      replies would otherwise be taken for the next batch's.
    """

    def __init__(self, connection: Any, timeout: float):
        self._connection = connection
        self._timeout = timeout
        self._queue: list[tuple[bytes, asyncio.Future[Any] | None]] = []
        self._writer: asyncio.Task[None] | None = None

    def call(self, command: bytes) -> asyncio.Future[Any]:
        """Queue a packed command; the future gets its reply (bytes, int, ...) or ``StoreUnavailable``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((command, future))
        if self._writer is None:
            # Started now, runs on the next loop turn: by then every caller of
            # this turn has queued its command too.
            self._writer = loop.create_task(self._write_batches())
        return future

    async def _write_batches(self) -> None:
        batch: list[tuple[bytes, asyncio.Future[Any] | None]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._execute(batch)
        except BaseException:  # cancelled (the loop is closing): no caller may wait forever
            self._fail(batch + self._queue, RedisError("the redis store's writer was stopped"))
            self._queue = []
            raise
        finally:
            self._writer = None

    async def _execute(self, batch: list[tuple[bytes, asyncio.Future[Any] | None]]) -> None:
        work = collections.deque(batch)
        reconnected = reloaded = False
        while work:
            noscript: list[tuple[bytes, asyncio.Future[Any] | None]] = []
            try:
                await self._round_trip(work, noscript)
            except (RedisConnectionError, ConnectionError) as exc:
                await self._connection.disconnect(nowait=True)
                if reconnected:
                    self._fail(work, exc)
                    return
                reconnected = True  # the next round trip opens a new connection
                continue
            except TimeoutError:
                await self._connection.disconnect(nowait=True)
                self._fail(work, TimeoutError(f"no reply within {self._timeout}s"))
                return
            except (RedisError, OSError) as exc:
                await self._connection.disconnect(nowait=True)
                self._fail(work, exc)
                return
            if noscript:
                if reloaded:
                    self._fail(noscript, RedisError("NOSCRIPT after loading the scripts"))
                    return
                reloaded = True
                work.extend((script.load, None) for script in _SCRIPTS)
                work.extend(noscript)

    async def _round_trip(self, work: collections.deque[tuple[bytes, asyncio.Future[Any] | None]],
                          noscript: list[tuple[bytes, asyncio.Future[Any] | None]]) -> None:
        """Send ``work`` in one write, then resolve its futures reply by reply, taking each answered one off."""
        connection = self._connection
        async with asyncio.timeout(self._timeout):
            await connection.send_packed_command([command for command, _ in work], check_health=False)
            while work:
                try:
                    # math.inf: no timeout per reply, the batch has one
                    reply = await connection.read_response(disable_decoding=True, timeout=math.inf)
                except NoScriptError:
                    noscript.append(work.popleft())
                    continue
                except ResponseError as exc:  # this command failed in Redis; the others stand
                    reply = exc
                _, future = work.popleft()
                if future is None or future.done():  # an internal command, or its caller went away
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(_unavailable(reply))
                else:
                    future.set_result(reply)

    @staticmethod
    def _fail(work: Iterable[tuple[bytes, asyncio.Future[Any] | None]], exc: BaseException) -> None:
        for _, future in work:
            if future is not None and not future.done():
                future.set_exception(_unavailable(exc))

    async def close(self) -> None:
        """Finish what is queued (settles must not be lost at shutdown), then disconnect."""
        if self._writer is not None:
            await asyncio.shield(self._writer)
        await self._connection.disconnect()


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
    ``_Pipeline``); ``usage``, rare, goes through redis-py's client and pool.
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
        self._pipeline = _Pipeline(connection, timeout_seconds)

    async def _run(self, script: _Script, keys: list[str], args: list[str]) -> Any:
        return await self._pipeline.call(script.command(keys, args))

    async def reserve(
        self, subjects: Sequence[Subject], prompt_tokens: int, max_tokens: int, now: float
    ) -> Reservation | Rejection:
        validate_amounts(prompt_tokens, max_tokens)
        request_plan = plan(subjects, now)
        reservation_id = os.urandom(16).hex()
        keys, args = self._reserve_arguments(request_plan, reservation_id, prompt_tokens, max_tokens, now)
        admitted, clamped, *observed = map(int, (await self._run(_RESERVE, keys, args)).split())
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
        if await self._run(_SETTLE, keys, args) == 2:
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
        await self._run(_RENEW, keys, [request])

    async def record(self, entry: LedgerEntry) -> None:
        await self._run(_RECORD, *_ledger_keys_and_args(entry))

    async def usage(self, *, now: float, team: str | None = None, key: str | None = None) -> UsageReport:
        periods = period_keys(now)
        try:
            async with self._redis.pipeline(transaction=False) as pipe:
                for period in periods:
                    pipe.hgetall(f"{PREFIX}u:{period}")
                replies = await pipe.execute()
        except (TimeoutError, RedisError, OSError) as exc:
            raise _unavailable(exc) from exc
        rows = [row for period, totals in zip(periods, replies) for row in _usage_rows(period, totals)]
        return build_report(rows, now, team=team, key=key)

    async def ping(self) -> None:
        """Through the pipeline's connection, the one requests use."""
        await self._pipeline.call(_PING)

    async def close(self) -> None:
        await self._pipeline.close()
        await self._redis.aclose()
