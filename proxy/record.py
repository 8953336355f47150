"""What is known of one request as it goes, and what it becomes when it ends:
the log line, the ledger row and the metric samples all come from here."""

from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any

from .accounting import LedgerEntry


@dataclass(slots=True)
class RequestRecord:
    """What the one log line of a request says; filled in as the request goes."""

    request_id: str
    endpoint: str
    started: float = field(default_factory=time.monotonic)
    team: str | None = None
    key: str | None = None
    model: str | None = None
    stream: bool = False
    status: int = 500
    error: str | None = None
    upstream: str | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    ttft_ms: float | None = None
    upstream_wait: float = 0.0
    overhead_seconds: float | None = None
    upstream_error: str | None = None  # the kind, for sluice_upstream_errors_total
    quota_limit: str | None = None  # the limit that refused it
    moderation: list[dict[str, str]] = field(default_factory=list)

    def add_actions(self, actions: Any, direction: str) -> None:
        for action in actions:
            self.moderation.append({"rule": action.rule, "action": action.action, "direction": direction})

    def ledger_entry(self) -> LedgerEntry:
        return LedgerEntry(
            time=time.time(),
            request_id=self.request_id,
            key=self.key or "",
            team=self.team or "",
            model=self.model or "",
            prompt_tokens=self.prompt_tokens,
            completion_tokens=self.completion_tokens,
            status=self.status,
            moderated=bool(self.moderation),
        )

    def elapsed(self) -> float:
        return time.monotonic() - self.started

    def fields(self) -> dict[str, Any]:
        return {
            "endpoint": self.endpoint,
            "team": self.team,
            "key": self.key,
            "model": self.model,
            "stream": self.stream,
            "status": self.status,
            "error": self.error,
            "upstream": self.upstream,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "duration_ms": round(self.elapsed() * 1000, 2),
            "ttft_ms": None if self.ttft_ms is None else round(self.ttft_ms, 2),
            "moderation": self.moderation,
        }
