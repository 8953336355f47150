"""Quota arithmetic: which counters a request touches, whether it fits, what to tell the client.

This module is sans-I/O: it never reads the clock and never touches a store.
``now`` is always passed in (epoch seconds, UTC) and counter values arrive as
plain integers, so every store (memory, SQLite, the Redis Lua script) makes the
same decision from the same numbers and the rules are tested without I/O.

Windows are fixed UTC windows (the current minute, UTC day, calendar month)
rather than sliding ones: a fixed window is one integer per subject that any
number of replicas can share exactly, and its reset time is the same for all.

A request's life: ``plan(subjects, now)`` lists its ``Check``s (a ``Plan``); a
store reads the current value of each one (atomically) and calls ``decide``,
which either admits it (a ``Reservation``: what to add to every counter and the
clamped ``max_tokens``) or refuses it (a ``Rejection``: which limit, which
code, how long to wait). Both carry the numbers for OpenAI's ``x-ratelimit-*``
headers.
"""

from __future__ import annotations

import calendar
import math
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Literal, NamedTuple, Sequence

from proxy.config import LimitsConfig

REQUESTS_PER_MINUTE = "requests_per_minute"
TOKENS_PER_MINUTE = "tokens_per_minute"
TOKENS_PER_DAY = "tokens_per_day"
TOKENS_PER_MONTH = "tokens_per_month"
MAX_CONCURRENT_REQUESTS = "max_concurrent_requests"

MINUTE = "minute"
DAY = "day"
MONTH = "month"

REQUESTS = "requests"
TOKENS = "tokens"
CONCURRENCY = "concurrency"

RATE_LIMIT_EXCEEDED = "rate_limit_exceeded"
INSUFFICIENT_QUOTA = "insufficient_quota"

# A concurrency slot frees whenever some request ends, not at a known time, so
# a refused client is told to come back soon rather than at a window's end.
CONCURRENCY_RETRY_SECONDS = 1.0

# How long a store keeps a window's counter after the window ends. A request
# that started just before the end settles into the window it was charged to,
# and replicas whose clocks differ by a few seconds still meet on one counter.
WINDOW_GRACE_SECONDS = 120


@dataclass(frozen=True, slots=True)
class Subject:
    """Someone limits apply to: a key or a team. ``limits`` comes from the config."""

    kind: Literal["key", "team"]
    name: str
    limits: LimitsConfig

    @property
    def id(self) -> str:
        return f"{self.kind}:{self.name}"


@dataclass(frozen=True, slots=True)
class Window:
    """One fixed UTC window. ``id`` is a compact label (``202501151234``,
    ``20250115``, ``202501``) that sorts in time order and has no ``:``, so it
    can close a store key unambiguously."""

    period: Literal["minute", "day", "month"]
    id: str
    end: float


class Check(NamedTuple):
    """One counter a request is counted in, and the limit it is held to.

    ``limit`` is ``None`` for a day or month total that is counted without a
    limit: those are always kept, so a limit added by a config reload starts
    from what was really used that day, not from zero. ``expires`` is when a
    store may forget the counter (window end plus grace; concurrency slots
    expire by their lease instead). A tuple, not a dataclass: a request
    builds about ten of these, and tuples are cheap to build.
    """

    subject: Subject
    limit_name: str
    kind: Literal["requests", "tokens", "concurrency"]
    counter: str
    limit: int | None
    window: Window | None  # None for concurrency, which has no window
    expires: float


class RateInfo(NamedTuple):
    """The numbers behind one family of ``x-ratelimit-*`` headers."""

    limit: int
    remaining: int
    reset_seconds: float


class Charge(NamedTuple):
    """A token counter a reservation added ``reserved_tokens`` to; settle corrects it."""

    counter: str
    period: Literal["minute", "day", "month"]
    expires: float


@dataclass(frozen=True, slots=True)
class Reservation:
    """An admitted request: what it holds until it is settled.

    ``max_tokens`` is the value to send upstream (clamped to what is left of the
    budgets); ``reserved_tokens`` = ``prompt_tokens + max_tokens`` was added to
    every counter in ``charges``; ``slots`` are the concurrency sets holding it.
    """

    id: str
    prompt_tokens: int
    max_tokens: int
    reserved_tokens: int
    charges: tuple[Charge, ...]
    slots: tuple[str, ...]
    requests: RateInfo | None
    tokens: RateInfo | None

    def headers(self) -> dict[str, str]:
        return ratelimit_headers(self.requests, self.tokens)


@dataclass(frozen=True, slots=True)
class Rejection:
    """A refused request: the limit it hit, the error code, and when to retry."""

    subject: Subject
    limit_name: str
    limit: int
    code: Literal["rate_limit_exceeded", "insufficient_quota"]
    retry_after: float
    message: str
    requests: RateInfo | None
    tokens: RateInfo | None

    def headers(self) -> dict[str, str]:
        headers = ratelimit_headers(self.requests, self.tokens)
        headers.update(retry_headers(self.retry_after, self.code))
        return headers


def _label(t: time.struct_time, fields: int) -> str:
    parts = (t.tm_year, t.tm_mon, t.tm_mday, t.tm_hour, t.tm_min)[:fields]
    return f"{parts[0]:04d}" + "".join(f"{p:02d}" for p in parts[1:])


@lru_cache(maxsize=8)
def _windows_of_minute(minute_index: int) -> tuple[Window, Window, Window]:
    start = minute_index * 60
    t = time.gmtime(start)  # a conversion of the given instant, not a clock read
    day_start = start - start % 86400
    next_year, next_month = (t.tm_year + 1, 1) if t.tm_mon == 12 else (t.tm_year, t.tm_mon + 1)
    return (
        Window(MINUTE, _label(t, 5), float(start + 60)),
        Window(DAY, _label(t, 3), float(day_start + 86400)),
        Window(MONTH, _label(t, 2), float(calendar.timegm((next_year, next_month, 1, 0, 0, 0)))),
    )


def windows(now: float) -> tuple[Window, Window, Window]:
    """The minute, day and month windows that contain ``now``."""
    return _windows_of_minute(math.floor(now / 60))


class Plan(NamedTuple):
    """A request's checks, and what an admission holds: the token counters charged, the slots taken."""

    checks: tuple[Check, ...]
    charges: tuple[Charge, ...]
    slots: tuple[str, ...]


def plan(subjects: Sequence[Subject], now: float) -> Plan:
    """Every counter a request by ``subjects`` at ``now`` is checked against or counted in."""
    return _plan_for_minute(tuple(subjects), math.floor(now / 60))


@lru_cache(maxsize=4096)
def _plan_for_minute(subjects: tuple[Subject, ...], minute_index: int) -> Plan:
    # Memoised: the same key and team ask again and again within a minute, and
    # a plan depends on nothing else.
    minute, day, month = _windows_of_minute(minute_index)
    minute_expires = minute.end + WINDOW_GRACE_SECONDS
    checks: list[Check] = []
    for subject in subjects:
        limits = subject.limits
        sid = subject.id
        if limits.requests_per_minute is not None:
            checks.append(Check(subject, REQUESTS_PER_MINUTE, REQUESTS, f"{sid}:{REQUESTS_PER_MINUTE}:{minute.id}",
                                limits.requests_per_minute, minute, minute_expires))
        if limits.tokens_per_minute is not None:
            checks.append(Check(subject, TOKENS_PER_MINUTE, TOKENS, f"{sid}:{TOKENS_PER_MINUTE}:{minute.id}",
                                limits.tokens_per_minute, minute, minute_expires))
        checks.append(Check(subject, TOKENS_PER_DAY, TOKENS, f"{sid}:{TOKENS_PER_DAY}:{day.id}",
                            limits.tokens_per_day, day, day.end + WINDOW_GRACE_SECONDS))
        checks.append(Check(subject, TOKENS_PER_MONTH, TOKENS, f"{sid}:{TOKENS_PER_MONTH}:{month.id}",
                            limits.tokens_per_month, month, month.end + WINDOW_GRACE_SECONDS))
        if limits.max_concurrent_requests is not None:
            checks.append(Check(subject, MAX_CONCURRENT_REQUESTS, CONCURRENCY, sid,
                                limits.max_concurrent_requests, None, math.inf))
    return Plan(
        checks=tuple(checks),
        charges=tuple(Charge(c.counter, c.window.period, c.expires) for c in checks if c.kind == TOKENS),
        slots=tuple(c.counter for c in checks if c.kind == CONCURRENCY),
    )


def smallest_answer(max_tokens: int) -> int:
    """The fewest completion tokens worth admitting: one, or none when none were asked for (embeddings)."""
    return 1 if max_tokens > 0 else 0


def validate_amounts(prompt_tokens: int, max_tokens: int) -> None:
    """Refuse amounts no request can have, before a store counts them."""
    if prompt_tokens < 0 or max_tokens < 0:
        raise ValueError("prompt_tokens and max_tokens must not be negative")


def decide(
    request_plan: Plan,
    observed: Sequence[int],
    prompt_tokens: int,
    max_tokens: int,
    now: float,
    reservation_id: str,
) -> Reservation | Rejection:
    """Admit or refuse a request, given each check's current value (``observed[i]`` for ``request_plan.checks[i]``).

    Requests and concurrency need one more unit of room. Tokens need
    ``prompt_tokens + max_tokens``, but a small budget must not refuse every
    request, so ``max_tokens`` is clamped to the room left in the tightest token
    limit; only when not even the prompt and one answer token fit is the
    request refused.
    """
    validate_amounts(prompt_tokens, max_tokens)
    checks = request_plan.checks
    if len(checks) != len(observed):
        raise ValueError("one observed value per check")
    need = smallest_answer(max_tokens)
    answer_room = max_tokens
    failed: list[int] = []
    for index, (check, used) in enumerate(zip(checks, observed)):
        if check.limit is None:
            continue
        if check.kind == TOKENS:
            room = check.limit - used - prompt_tokens
            if room < need:
                failed.append(index)
            else:
                answer_room = min(answer_room, room)
        elif used + 1 > check.limit:
            failed.append(index)

    if failed:
        # The longest wait is the one that matters (a spent month outlasts a
        # busy minute); among equals the first, i.e. the key before its team.
        worst_index = max(failed, key=lambda i: retry_after(checks[i], now))
        worst, used = checks[worst_index], observed[worst_index]
        return Rejection(
            subject=worst.subject,
            limit_name=worst.limit_name,
            limit=worst.limit,
            code=INSUFFICIENT_QUOTA if worst.window and worst.window.period in (DAY, MONTH) else RATE_LIMIT_EXCEEDED,
            retry_after=retry_after(worst, now),
            message=_rejection_message(worst, used, prompt_tokens + need, now),
            requests=tightest(checks, observed, REQUESTS, 0, now),
            tokens=tightest(checks, observed, TOKENS, 0, now),
        )

    reserved = prompt_tokens + answer_room
    return Reservation(
        id=reservation_id,
        prompt_tokens=prompt_tokens,
        max_tokens=answer_room,
        reserved_tokens=reserved,
        charges=request_plan.charges,
        slots=request_plan.slots,
        requests=tightest(checks, observed, REQUESTS, 1, now),
        tokens=tightest(checks, observed, TOKENS, reserved, now),
    )


def retry_after(check: Check, now: float) -> float:
    """Seconds until ``check`` could let a request through again."""
    if check.window is None:
        return CONCURRENCY_RETRY_SECONDS
    return max(check.window.end - now, 0.0)


def tightest(checks: Sequence[Check], observed: Sequence[int], kind: str, adding: int, now: float) -> RateInfo | None:
    """The limit of ``kind`` with the least room once ``adding`` is counted; ``None`` if none is set.

    On a tie the longer reset wins: that is the one the client will feel.
    """
    best: tuple[int, float, int] | None = None  # (remaining, -reset, limit)
    for check, used in zip(checks, observed):
        if check.kind == kind and check.limit is not None:
            candidate = (check.limit - used - adding, -retry_after(check, now), check.limit)
            if best is None or candidate < best:
                best = candidate
    if best is None:
        return None
    remaining, negative_reset, limit = best
    return RateInfo(limit, max(remaining, 0), -negative_reset)


def _rejection_message(check: Check, used: int, smallest_request: int, now: float) -> str:
    who = f"{check.subject.kind} {check.subject.name!r}"
    limit = f"{check.limit_name} limit of {check.limit}"
    if check.kind == CONCURRENCY:
        return f"Too many concurrent requests for {who} ({limit}). Try again when one finishes."
    wait = format_duration(retry_after(check, now))
    if check.kind == TOKENS and smallest_request > check.limit:
        return f"This request needs at least {smallest_request} tokens, more than the {limit} of {who} allows."
    if check.kind == TOKENS:
        return f"Token budget exhausted for {who}: {used} of the {limit} used. It resets in {wait}."
    return f"Rate limit reached for {who}: {limit}. Try again in {wait}."


def format_duration(seconds: float) -> str:
    """A duration as OpenAI's ``x-ratelimit-reset-*`` headers write it (Go's style, millisecond precision).

    ``0s``, ``20ms``, ``1s``, ``7.66s``, ``6m0s``, ``1h2m3s``. Rounds up, so a
    client that waits the time it was told never arrives early.
    """
    ms = max(math.ceil(round(seconds * 1000, 6)), 0)
    if ms == 0:
        return "0s"
    if ms < 1000:
        return f"{ms}ms"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    whole, frac = divmod(rest, 1000)
    secs = f"{whole}.{frac:03d}".rstrip("0") + "s" if frac else f"{whole}s"
    if hours:
        return f"{hours}h{minutes}m{secs}"
    if minutes:
        return f"{minutes}m{secs}"
    return secs


def ratelimit_headers(requests: RateInfo | None, tokens: RateInfo | None) -> dict[str, str]:
    """OpenAI's ``x-ratelimit-*`` headers, for the families that have a limit set."""
    headers: dict[str, str] = {}
    for family, info in (("requests", requests), ("tokens", tokens)):
        if info is not None:
            headers[f"x-ratelimit-limit-{family}"] = str(info.limit)
            headers[f"x-ratelimit-remaining-{family}"] = str(info.remaining)
            headers[f"x-ratelimit-reset-{family}"] = format_duration(info.reset_seconds)
    return headers


def retry_headers(seconds: float, code: str) -> dict[str, str]:
    """``Retry-After`` (whole seconds, at least 1) and ``retry-after-ms``, which the openai SDKs honour.

    A spent day or month budget adds ``x-should-retry: false``: an SDK retrying
    within its few seconds of backoff would only be refused again.
    """
    ms = max(math.ceil(round(seconds * 1000, 6)), 1)
    headers = {"Retry-After": str(max(math.ceil(ms / 1000), 1)), "retry-after-ms": str(ms)}
    if code == INSUFFICIENT_QUOTA:
        headers["x-should-retry"] = "false"
    return headers
