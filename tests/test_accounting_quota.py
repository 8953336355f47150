"""The quota arithmetic, without any store: windows, admission, clamping, headers."""

from __future__ import annotations

import calendar

import pytest
from hypothesis import given
from hypothesis import strategies as st

from proxy.accounting.quota import (
    CONCURRENCY_RETRY_SECONDS,
    INSUFFICIENT_QUOTA,
    RATE_LIMIT_EXCEEDED,
    RateInfo,
    Rejection,
    Reservation,
    Subject,
    decide,
    format_duration,
    plan,
    ratelimit_headers,
    retry_headers,
    windows,
)
from proxy.config import LimitsConfig

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))  # mid-minute, mid-day, mid-month


def subjects(key: dict | None = None, team: dict | None = None) -> list[Subject]:
    return [Subject("key", "alice", LimitsConfig(**(key or {}))),
            Subject("team", "research", LimitsConfig(**(team or {})))]


def run(subs, used: dict[str, int], prompt: int, max_tokens: int, now: float = T0):
    """decide() with counters given by limit name + subject kind, e.g. {"team:tokens_per_day": 10}."""
    request_plan = plan(subs, now)
    observed = [used.get(f"{c.subject.kind}:{c.limit_name}", 0) for c in request_plan.checks]
    return decide(request_plan, observed, prompt, max_tokens, now, "r1")


# windows


def test_windows_are_fixed_utc_minute_day_month():
    minute, day, month = windows(T0)
    assert (minute.id, day.id, month.id) == ("202501151234", "20250115", "202501")
    assert minute.end == calendar.timegm((2025, 1, 15, 12, 35, 0))
    assert day.end == calendar.timegm((2025, 1, 16, 0, 0, 0))
    assert month.end == calendar.timegm((2025, 2, 1, 0, 0, 0))


def test_windows_roll_over_at_their_boundaries():
    last_second_of_year = calendar.timegm((2024, 12, 31, 23, 59, 59)) + 0.999
    minute, day, month = windows(last_second_of_year)
    assert (minute.id, day.id, month.id) == ("202412312359", "20241231", "202412")
    assert month.end == calendar.timegm((2025, 1, 1, 0, 0, 0))
    minute, day, month = windows(month.end)
    assert (minute.id, day.id, month.id) == ("202501010000", "20250101", "202501")
    assert windows(calendar.timegm((2024, 2, 29, 10, 0, 0)))[2].end == calendar.timegm((2024, 3, 1, 0, 0, 0))


@given(st.floats(min_value=0, max_value=4_000_000_000, allow_nan=False))
def test_every_instant_lies_inside_its_windows(now):
    minute, day, month = windows(now)
    assert now < minute.end <= day.end <= month.end
    assert minute.end - now <= 60


def test_plan_counts_day_and_month_always_and_the_rest_only_when_limited():
    request_plan = plan(subjects(team={"requests_per_minute": 5, "max_concurrent_requests": 2}), T0)
    checks = request_plan.checks
    names = [(c.subject.kind, c.limit_name, c.limit) for c in checks]
    assert names == [
        ("key", "tokens_per_day", None),
        ("key", "tokens_per_month", None),
        ("team", "requests_per_minute", 5),
        ("team", "tokens_per_day", None),
        ("team", "tokens_per_month", None),
        ("team", "max_concurrent_requests", 2),
    ]
    assert checks[2].counter == "team:research:requests_per_minute:202501151234"
    assert checks[5].counter == "team:research"
    assert [c.counter for c in request_plan.charges] == [c.counter for c in checks if c.kind == "tokens"]
    assert request_plan.slots == ("team:research",)


# admission and clamping


def test_unlimited_request_is_admitted_with_its_max_tokens_and_no_headers():
    outcome = run(subjects(), {}, prompt=100, max_tokens=500)
    assert isinstance(outcome, Reservation)
    assert (outcome.max_tokens, outcome.reserved_tokens) == (500, 600)
    assert outcome.headers() == {}
    assert len(outcome.charges) == 4 and outcome.slots == ()


def test_max_tokens_is_clamped_to_what_is_left_of_the_tightest_token_limit():
    subs = subjects(key={"tokens_per_day": 1000}, team={"tokens_per_minute": 5000, "tokens_per_month": 10_000})
    outcome = run(subs, {"key:tokens_per_day": 700, "team:tokens_per_month": 9000}, prompt=100, max_tokens=4096)
    assert isinstance(outcome, Reservation)
    assert outcome.max_tokens == 200  # 1000 - 700 - 100
    assert outcome.reserved_tokens == 300
    assert outcome.tokens == RateInfo(limit=1000, remaining=0, reset_seconds=pytest.approx(11 * 3600 + 25 * 60 + 30))


def test_rejected_only_when_not_even_prompt_and_one_token_fit():
    subs = subjects(team={"tokens_per_day": 1000})
    admitted = run(subs, {"team:tokens_per_day": 899}, prompt=100, max_tokens=50)
    assert isinstance(admitted, Reservation) and admitted.max_tokens == 1
    rejected = run(subs, {"team:tokens_per_day": 900}, prompt=100, max_tokens=50)
    assert isinstance(rejected, Rejection)
    assert (rejected.subject.id, rejected.limit_name, rejected.code) == (
        "team:research", "tokens_per_day", INSUFFICIENT_QUOTA)
    assert rejected.retry_after == pytest.approx(11 * 3600 + 25 * 60 + 30)
    assert "research" in rejected.message


def test_a_request_that_asks_for_no_answer_tokens_needs_only_its_prompt_to_fit():
    subs = subjects(team={"tokens_per_minute": 100})
    outcome = run(subs, {"team:tokens_per_minute": 60}, prompt=40, max_tokens=0)
    assert isinstance(outcome, Reservation) and outcome.reserved_tokens == 40


def test_a_prompt_larger_than_the_limit_itself_says_so():
    outcome = run(subjects(key={"tokens_per_minute": 50}), {}, prompt=80, max_tokens=10)
    assert isinstance(outcome, Rejection)
    assert outcome.code == RATE_LIMIT_EXCEEDED
    assert "needs at least 81 tokens" in outcome.message


def test_requests_per_minute_admits_up_to_the_limit_and_tells_when_the_minute_ends():
    subs = subjects(key={"requests_per_minute": 10}, team={"requests_per_minute": 3})
    admitted = run(subs, {"team:requests_per_minute": 2, "key:requests_per_minute": 1}, 10, 10)
    assert isinstance(admitted, Reservation)
    assert admitted.requests == RateInfo(limit=3, remaining=0, reset_seconds=30.0)
    rejected = run(subs, {"team:requests_per_minute": 3}, 10, 10)
    assert isinstance(rejected, Rejection)
    assert (rejected.limit_name, rejected.code, rejected.retry_after) == (
        "requests_per_minute", RATE_LIMIT_EXCEEDED, 30.0)
    assert rejected.requests == RateInfo(limit=3, remaining=0, reset_seconds=30.0)


def test_concurrency_rejects_when_all_slots_are_held_and_asks_for_a_short_retry():
    subs = subjects(team={"max_concurrent_requests": 2})
    assert isinstance(run(subs, {"team:max_concurrent_requests": 1}, 1, 1), Reservation)
    rejected = run(subs, {"team:max_concurrent_requests": 2}, 1, 1)
    assert isinstance(rejected, Rejection)
    assert (rejected.limit_name, rejected.code, rejected.retry_after) == (
        "max_concurrent_requests", RATE_LIMIT_EXCEEDED, CONCURRENCY_RETRY_SECONDS)


def test_of_several_exhausted_limits_the_longest_wait_is_reported():
    subs = subjects(key={"requests_per_minute": 1, "max_concurrent_requests": 1}, team={"tokens_per_month": 100})
    used = {"key:requests_per_minute": 1, "key:max_concurrent_requests": 1, "team:tokens_per_month": 100}
    rejected = run(subs, used, 1, 1)
    assert (rejected.limit_name, rejected.code) == ("tokens_per_month", INSUFFICIENT_QUOTA)
    used["team:tokens_per_month"] = 0
    assert run(subs, used, 1, 1).limit_name == "requests_per_minute"


def test_zero_limits_refuse_everything():
    for limits in ({"requests_per_minute": 0}, {"tokens_per_day": 0}, {"max_concurrent_requests": 0}):
        assert isinstance(run(subjects(team=limits), {}, 0, 1), Rejection)


def test_negative_amounts_are_refused():
    with pytest.raises(ValueError):
        run(subjects(), {}, prompt=-1, max_tokens=1)


@given(
    limit=st.integers(0, 5000),
    used=st.integers(0, 6000),
    prompt=st.integers(0, 3000),
    max_tokens=st.integers(0, 5000),
)
def test_admission_never_passes_a_token_limit_and_refuses_only_what_cannot_fit(limit, used, prompt, max_tokens):
    outcome = run(subjects(team={"tokens_per_minute": limit}), {"team:tokens_per_minute": used}, prompt, max_tokens)
    smallest = prompt + (1 if max_tokens else 0)
    if used + smallest <= limit:
        assert isinstance(outcome, Reservation)
        assert used + outcome.reserved_tokens <= limit
        assert outcome.max_tokens == min(max_tokens, limit - used - prompt)
        assert outcome.tokens.remaining == limit - used - outcome.reserved_tokens
    else:
        assert isinstance(outcome, Rejection)


# headers


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.02, "20ms"),
        (0.0201, "21ms"),
        (0.999, "999ms"),
        (1, "1s"),
        (7.66, "7.66s"),
        (59.5, "59.5s"),
        (60, "1m0s"),
        (360, "6m0s"),
        (3723, "1h2m3s"),
        (3723.25, "1h2m3.25s"),
        (86400 * 3, "72h0m0s"),
        (-5, "0s"),
    ],
)
def test_durations_are_written_as_openai_writes_them(seconds, text):
    assert format_duration(seconds) == text


def test_ratelimit_headers_appear_only_for_families_with_a_limit():
    assert ratelimit_headers(None, None) == {}
    assert ratelimit_headers(RateInfo(60, 59, 1.0), None) == {
        "x-ratelimit-limit-requests": "60",
        "x-ratelimit-remaining-requests": "59",
        "x-ratelimit-reset-requests": "1s",
    }
    assert ratelimit_headers(None, RateInfo(1000, 10, 360))["x-ratelimit-reset-tokens"] == "6m0s"


def test_retry_headers_round_up_to_at_least_one_second():
    assert retry_headers(0.2, RATE_LIMIT_EXCEEDED) == {"Retry-After": "1", "retry-after-ms": "200"}
    assert retry_headers(12.0001, RATE_LIMIT_EXCEEDED) == {"Retry-After": "13", "retry-after-ms": "12001"}
    assert retry_headers(0, RATE_LIMIT_EXCEEDED)["retry-after-ms"] == "1"
    assert retry_headers(3600, INSUFFICIENT_QUOTA)["x-should-retry"] == "false"


def test_a_rejection_carries_retry_and_ratelimit_headers():
    rejected = run(subjects(team={"requests_per_minute": 1, "tokens_per_minute": 100}),
                   {"team:requests_per_minute": 1, "team:tokens_per_minute": 40}, 5, 5)
    assert rejected.headers() == {
        "x-ratelimit-limit-requests": "1",
        "x-ratelimit-remaining-requests": "0",
        "x-ratelimit-reset-requests": "30s",
        "x-ratelimit-limit-tokens": "100",
        "x-ratelimit-remaining-tokens": "60",
        "x-ratelimit-reset-tokens": "30s",
        "Retry-After": "30",
        "retry-after-ms": "30000",
    }
