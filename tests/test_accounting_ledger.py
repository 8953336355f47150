"""Ledger totals and the usage report, without any store."""

from __future__ import annotations

import calendar

import pytest

from proxy.accounting.ledger import (
    LedgerEntry,
    UsageRow,
    UsageTotals,
    build_report,
    entry_rows,
    format_usage_table,
    period_keys,
)

T0 = calendar.timegm((2025, 1, 15, 12, 34, 30))
YESTERDAY = T0 - 86400


def entry(key="alice", team="research", prompt=10, completion=5, at=T0) -> LedgerEntry:
    return LedgerEntry(at, "req-1", key, team, "gpt-4o-mini", prompt, completion, 200)


def rows_of(*entries: LedgerEntry) -> list[UsageRow]:
    return [row for e in entries for row in entry_rows(e)]


def test_an_entry_counts_in_its_day_and_its_month():
    assert period_keys(T0) == ("day:20250115", "month:202501")
    day, month = entry_rows(entry())
    assert day == UsageRow("day:20250115", "research", "alice", 1, 10, 5)
    assert month.period == "month:202501"


def test_report_sums_per_team_and_per_key_for_today_and_this_month():
    report = build_report(rows_of(entry(), entry(prompt=1, completion=2), entry(key="bob"), entry(at=YESTERDAY)), T0)
    assert (report.day, report.month) == ("2025-01-15", "2025-01")
    team = report.teams["research"]
    assert team.day == UsageTotals(3, 21, 12)
    assert team.month == UsageTotals(4, 31, 17)
    assert team.month.total_tokens == 48
    assert report.keys["alice"].day == UsageTotals(2, 11, 7)
    assert report.keys["alice"].team == "research"
    assert list(report.keys) == ["alice", "bob"]


def test_last_months_entries_are_not_this_months_usage():
    last_month = calendar.timegm((2024, 12, 31, 23, 59, 59))
    report = build_report(rows_of(entry(at=last_month)), T0)
    assert report.teams == {} and report.keys == {}


def test_filters_by_team_and_by_key():
    rows = rows_of(entry(), entry(key="bob"), entry(key="carol", team="ops"))
    by_team = build_report(rows, T0, team="research")
    assert list(by_team.teams) == ["research"] and list(by_team.keys) == ["alice", "bob"]
    by_key = build_report(rows, T0, key="carol")
    assert by_key.teams == {} and list(by_key.keys) == ["carol"]
    assert build_report(rows, T0, team="research", key="carol").keys == {}


def test_to_dict_for_the_admin_api():
    report = build_report(rows_of(entry()), T0)
    full = report.to_dict()
    assert full["teams"]["research"]["day"] == {
        "requests": 1, "prompt_tokens": 10, "completion_tokens": 5, "total_tokens": 15}
    day = report.to_dict("day")
    assert day["period"] == "day" and day["window"] == "2025-01-15"
    assert day["keys"]["alice"] == {"team": "research", "requests": 1, "prompt_tokens": 10,
                                    "completion_tokens": 5, "total_tokens": 15}
    with pytest.raises(ValueError):
        report.to_dict("week")  # type: ignore[arg-type]


def test_text_table_lists_each_team_then_its_keys():
    report = build_report(rows_of(entry(), entry(key="bob", prompt=1000)), T0)
    table = format_usage_table(report, "day").splitlines()
    assert table[0].split() == ["PERIOD", "TEAM", "KEY", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL"]
    assert table[1].split() == ["day", "2025-01-15", "research", "*", "2", "1010", "10", "1020"]
    assert table[2].split() == ["day", "2025-01-15", "research", "alice", "1", "10", "5", "15"]
    assert table[3].split() == ["day", "2025-01-15", "research", "bob", "1", "1000", "5", "1005"]
    assert len({len(line) for line in table}) == 1  # numbers are right-aligned in their columns
    assert len(format_usage_table(report).splitlines()) == 7


def test_text_table_says_when_there_is_nothing():
    assert format_usage_table(build_report([], T0)) == "No usage recorded in day 2025-01-15 or month 2025-01 (UTC)."
