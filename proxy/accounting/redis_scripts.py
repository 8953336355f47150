"""The redis store's Lua scripts, and how a command is packed to run one.

Each script is one atomic step in Redis: ``RESERVE_LUA`` is ``quota.decide``
written a second time (the Python side checks that both agree on every
reserve), ``SETTLE_LUA`` corrects, frees and records in one step,
``RENEW_LUA`` extends concurrency leases, ``RECORD_LUA`` adds a ledger entry
of a request that was never reserved. The keys are described in
``redis_store``.
"""

from __future__ import annotations

import hashlib
from collections.abc import Sequence

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


class Script:
    """A Lua script, run by its SHA1 (EVALSHA) and loaded again when Redis has forgotten it."""

    def __init__(self, source: str):
        self.source = source
        self.sha = hashlib.sha1(source.encode()).hexdigest().encode()
        self.load = _pack([b"SCRIPT", b"LOAD", source.encode()])

    def command(self, keys: Sequence[str], args: Sequence[str]) -> bytes:
        return _pack([b"EVALSHA", self.sha, str(len(keys)), *keys, *args])


RESERVE = Script(RESERVE_LUA)
SETTLE = Script(SETTLE_LUA)
RECORD = Script(RECORD_LUA)
RENEW = Script(RENEW_LUA)
SCRIPTS = (RESERVE, SETTLE, RECORD, RENEW)
PING = _pack([b"PING"])
