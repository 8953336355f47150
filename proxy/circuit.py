"""A circuit breaker per upstream, as a pure state machine: the caller passes the time.

After ``failure_threshold`` failures in a row the circuit opens and the
upstream is skipped for ``cooldown_seconds``; then one trial request may go
through (half-open). Its success closes the circuit, its failure opens it for
another cool-down. Skipping a provider that is down saves every request the
connect timeout it would otherwise wait out.
"""

from __future__ import annotations

from enum import Enum


class CircuitState(Enum):
    CLOSED = "closed"
    OPEN = "open"
    HALF_OPEN = "half_open"


class CircuitBreaker:
    def __init__(self, failure_threshold: int, cooldown_seconds: float):
        self.failure_threshold = failure_threshold
        self.cooldown_seconds = cooldown_seconds
        self.state = CircuitState.CLOSED
        self._failures = 0
        self._opened_at = 0.0

    def allows(self, now: float) -> bool:
        """Whether a request may go to this upstream now (a trial, once the cool-down is over)."""
        if self.state is CircuitState.CLOSED:
            return True
        if self.state is CircuitState.OPEN and now - self._opened_at >= self.cooldown_seconds:
            self.state = CircuitState.HALF_OPEN
            return True
        return False

    def record_success(self) -> None:
        self.state = CircuitState.CLOSED
        self._failures = 0

    def record_failure(self, now: float) -> None:
        self._failures += 1
        if self.state is CircuitState.HALF_OPEN or self._failures >= self.failure_threshold:
            self.state = CircuitState.OPEN
            self._opened_at = now

    @property
    def is_open(self) -> bool:
        return self.state is not CircuitState.CLOSED
