"""The usage ledger's values: one entry per finished request, and totals per UTC day and month.

Pure like ``quota``: stores keep running totals per (period, team, key) and
hand the rows for the current day and month to ``build_report``, which does
the filtering and summing; ``format_usage_table`` renders a report for
``sluice usage``. Totals are kept per period instead of being summed from the
raw entries on every query, so ``usage`` costs the same on the last day of the
month as on the first.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Iterable, Literal

from proxy.accounting.quota import windows

PERIODS = ("day", "month")


@dataclass(frozen=True, slots=True)
class LedgerEntry:
    """One finished request, as the ledger keeps it. ``time`` is epoch seconds (UTC)."""

    time: float
    request_id: str
    key: str
    team: str
    model: str
    prompt_tokens: int
    completion_tokens: int
    status: int
    moderated: bool = False


@dataclass(frozen=True, slots=True)
class UsageRow:
    """Running totals of one (period, team, key), as a store keeps them."""

    period: str  # "day:20250115" or "month:202501", see ``period_keys``
    team: str
    key: str
    requests: int
    prompt_tokens: int
    completion_tokens: int


@dataclass(frozen=True, slots=True)
class UsageTotals:
    requests: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    @property
    def total_tokens(self) -> int:
        return self.prompt_tokens + self.completion_tokens

    def __add__(self, other: UsageTotals) -> UsageTotals:
        return UsageTotals(
            self.requests + other.requests,
            self.prompt_tokens + other.prompt_tokens,
            self.completion_tokens + other.completion_tokens,
        )

    def to_dict(self) -> dict[str, int]:
        return {
            "requests": self.requests,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "total_tokens": self.total_tokens,
        }


@dataclass(frozen=True, slots=True)
class SubjectUsage:
    """A team's or a key's totals for the current day and month. ``team`` is the key's team
    (comma-joined in the rare month a key moved between teams)."""

    team: str
    day: UsageTotals = UsageTotals()
    month: UsageTotals = UsageTotals()


@dataclass(frozen=True)
class UsageReport:
    """Usage in the UTC day and month containing the ``now`` it was built for, per team and per key."""

    day: str  # "2025-01-15"
    month: str  # "2025-01"
    teams: dict[str, SubjectUsage] = field(default_factory=dict)
    keys: dict[str, SubjectUsage] = field(default_factory=dict)

    def to_dict(self, period: Literal["day", "month"] | None = None) -> dict[str, Any]:
        """JSON-ready. With ``period``, only that period's totals (``GET /admin/usage?period=``)."""
        if period is None:
            return {
                "day": self.day,
                "month": self.month,
                "teams": {n: {"day": u.day.to_dict(), "month": u.month.to_dict()} for n, u in self.teams.items()},
                "keys": {
                    n: {"team": u.team, "day": u.day.to_dict(), "month": u.month.to_dict()}
                    for n, u in self.keys.items()
                },
            }
        if period not in PERIODS:
            raise ValueError(f"period must be one of {PERIODS}")
        return {
            "period": period,
            "window": getattr(self, period),
            "teams": {n: getattr(u, period).to_dict() for n, u in self.teams.items()},
            "keys": {n: {"team": u.team, **getattr(u, period).to_dict()} for n, u in self.keys.items()},
        }


def period_keys(t: float) -> tuple[str, str]:
    """The day and month a moment belongs to, as stores label their totals."""
    _, day, month = windows(t)
    return f"day:{day.id}", f"month:{month.id}"


def entry_rows(entry: LedgerEntry) -> tuple[UsageRow, UsageRow]:
    """What one entry adds to the totals of its day and of its month."""
    day, month = period_keys(entry.time)
    return (
        UsageRow(day, entry.team, entry.key, 1, entry.prompt_tokens, entry.completion_tokens),
        UsageRow(month, entry.team, entry.key, 1, entry.prompt_tokens, entry.completion_tokens),
    )


def _iso(window_id: str) -> str:
    return "-".join(filter(None, (window_id[:4], window_id[4:6], window_id[6:8])))


def build_report(rows: Iterable[UsageRow], now: float, team: str | None = None, key: str | None = None) -> UsageReport:
    """Sum ``rows`` into the report for the day and month containing ``now``.

    ``team`` keeps that team and its keys; ``key`` keeps only that key (a
    team's total is not a key's usage, so no team is listed then). Rows of
    other periods are ignored, so a store may hand over more than it needs to.
    """
    day_key, month_key = period_keys(now)
    team_totals: dict[str, dict[str, UsageTotals]] = {}
    key_totals: dict[str, dict[str, UsageTotals]] = {}
    key_teams: dict[str, set[str]] = {}
    for row in rows:
        if row.period == day_key:
            period = "day"
        elif row.period == month_key:
            period = "month"
        else:
            continue
        if (team is not None and row.team != team) or (key is not None and row.key != key):
            continue
        totals = UsageTotals(row.requests, row.prompt_tokens, row.completion_tokens)
        if key is None:
            per_team = team_totals.setdefault(row.team, {})
            per_team[period] = per_team.get(period, UsageTotals()) + totals
        per_key = key_totals.setdefault(row.key, {})
        per_key[period] = per_key.get(period, UsageTotals()) + totals
        key_teams.setdefault(row.key, set()).add(row.team)

    def usage(team_name: str, totals: dict[str, UsageTotals]) -> SubjectUsage:
        return SubjectUsage(team_name, totals.get("day", UsageTotals()), totals.get("month", UsageTotals()))

    return UsageReport(
        day=_iso(day_key.split(":")[1]),
        month=_iso(month_key.split(":")[1]),
        teams={name: usage(name, team_totals[name]) for name in sorted(team_totals)},
        keys={name: usage(",".join(sorted(key_teams[name])), key_totals[name]) for name in sorted(key_totals)},
    )


def format_usage_table(report: UsageReport, period: Literal["day", "month"] | None = None) -> str:
    """The report as the text table ``sluice usage`` prints: a team's row, then its keys' rows."""
    periods = PERIODS if period is None else (period,)
    header = ("PERIOD", "TEAM", "KEY", "REQUESTS", "PROMPT", "COMPLETION", "TOTAL")
    lines: list[tuple[str, ...]] = [header]

    def line(label: str, team: str, key: str, totals: UsageTotals) -> tuple[str, ...]:
        return (label, team, key, str(totals.requests), str(totals.prompt_tokens),
                str(totals.completion_tokens), str(totals.total_tokens))

    for p in periods:
        label = f"{p} {getattr(report, p)}"
        teams = sorted(set(report.teams) | {u.team for u in report.keys.values()})
        for team in teams:
            if team in report.teams:
                lines.append(line(label, team, "*", getattr(report.teams[team], p)))
            for key, usage in report.keys.items():
                if usage.team == team:
                    lines.append(line(label, team, key, getattr(usage, p)))
    if len(lines) == 1:
        return f"No usage recorded in {' or '.join(f'{p} {getattr(report, p)}' for p in periods)} (UTC)."
    widths = [max(len(row[i]) for row in lines) for i in range(len(header))]
    numeric = range(3, len(header))
    return "\n".join(
        "  ".join(cell.rjust(width) if i in numeric else cell.ljust(width)
                  for i, (cell, width) in enumerate(zip(row, widths))).rstrip()
        for row in lines
    )
