"""Prometheus metrics, with the names and labels of DESIGN.md.

Each gateway owns its registry rather than using the process-global one, so
several gateways can live in one process (the tests do) and a config reload
never resets a counter. Everything is recorded once per request, when it
ends, from its ``RequestRecord``: nothing is counted per chunk.

With ``server.workers`` > 1 every worker process records into files of one
directory (prometheus-client's multiprocess mode, switched on by
``enable_multiprocess`` in each worker before its metrics exist), and a
scrape of any worker reads them all: counters and histograms are the sums
over every worker that ever ran in this serve run, so a worker's restart
loses none of its counts; gauges say how they combine (``livesum``,
``livemax``: over the live workers only, once the supervisor has called
``forget_worker`` for a dead one).
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    generate_latest,
    multiprocess,
    values,
)
from prometheus_client.exposition import CONTENT_TYPE_LATEST

# Time to first token: 10 ms to 30 s. Whole requests: up to 10 minutes of streaming.
TTFT_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 20, 30)
DURATION_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 600)
# The gateway's own time: a tenth of a millisecond to a second.
OVERHEAD_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1)

CONTENT_TYPE = CONTENT_TYPE_LATEST

if TYPE_CHECKING:
    from .record import RequestRecord

# The environment variable prometheus-client reads its multiprocess directory from.
MULTIPROC_DIR_ENV = "PROMETHEUS_MULTIPROC_DIR"
# Set by enable_multiprocess in a worker process; None in a single-process gateway.
_multiprocess_dir: str | None = None


def enable_multiprocess(directory: str) -> None:
    """Record this process's metrics into ``directory``, shared with the other workers.

    prometheus-client picks its value class once, at import, from
    ``PROMETHEUS_MULTIPROC_DIR``; a forked worker imported it before it knew,
    so the choice is made again here, the same way. Must run before the
    process creates its first metric.
    """
    global _multiprocess_dir
    os.environ[MULTIPROC_DIR_ENV] = directory
    values.ValueClass = values.get_value_class()
    _multiprocess_dir = directory


def forget_worker(pid: int, directory: str) -> None:
    """A worker died: drop its live gauges (its counters stay, and keep counting in the sums)."""
    multiprocess.mark_process_dead(pid, directory)


class Metrics:
    def __init__(self) -> None:
        self.registry = CollectorRegistry(auto_describe=True)
        r = self.registry
        self.requests = Counter(
            "sluice_requests", "Requests answered.", ("team", "key", "model", "endpoint", "status"), registry=r
        )
        self.tokens = Counter("sluice_tokens", "Tokens used.", ("team", "key", "model", "kind"), registry=r)
        self.moderation_actions = Counter(
            "sluice_moderation_actions", "Moderation rule actions.", ("rule", "action", "direction"), registry=r
        )
        self.quota_rejections = Counter("sluice_quota_rejections", "Requests refused by a limit.", ("team", "limit"), registry=r)
        self.request_duration = Histogram(
            "sluice_request_duration_seconds", "Whole request time.", ("endpoint", "model"), buckets=DURATION_BUCKETS, registry=r
        )
        self.time_to_first_token = Histogram(
            "sluice_time_to_first_token_seconds", "Time to the first streamed answer text.", ("model",),
            buckets=TTFT_BUCKETS, registry=r,
        )
        self.upstream_errors = Counter("sluice_upstream_errors", "Upstream failures.", ("upstream", "kind"), registry=r)
        self.overhead = Histogram(
            "sluice_overhead_seconds", "Gateway time, upstream wait excluded.", ("endpoint",), buckets=OVERHEAD_BUCKETS, registry=r
        )
        self.store_errors = Counter(
            "sluice_store_errors", "Quota store failures, also those let through by on_store_error: allow.",
            ("store", "operation"), registry=r,
        )
        self.upstream_retries = Counter(
            "sluice_upstream_retries", "Requests moved on to the next upstream after a failure.", ("upstream",), registry=r
        )
        # Each worker has its own breakers: the upstream is out if any live worker keeps it out.
        self.circuit_open = Gauge(
            "sluice_upstream_circuit_open", "1 while an upstream's circuit breaker keeps it out.", ("upstream",),
            registry=r, multiprocess_mode="livemax",
        )
        self.active_streams = Gauge(
            "sluice_active_streams", "Streams being relayed now.", registry=r, multiprocess_mode="livesum"
        )
        # Only with workers: how the kernel spread the requests, one series per live worker (a pid label).
        self.worker_requests = None
        self._scrape_registry = r
        if _multiprocess_dir is not None:
            self.worker_requests = Gauge(
                "sluice_worker_requests", "Requests answered by each live worker since it started.",
                registry=r, multiprocess_mode="liveall",
            )
            self._scrape_registry = CollectorRegistry()
            multiprocess.MultiProcessCollector(self._scrape_registry, path=_multiprocess_dir)

        # labels() costs a lock and a dict walk per call; a request needs five of them.
        self._children: dict[tuple[Any, tuple[str, ...]], Any] = {}

    def _child(self, metric: Any, *values: str) -> Any:
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def exposition(self) -> bytes:
        """The text format: this gateway's registry, or with workers the sums over all of them."""
        return generate_latest(self._scrape_registry)

    def circuit_state(self, upstream: str, is_open: bool) -> None:
        self._child(self.circuit_open, upstream).set(1 if is_open else 0)

    def observe(self, record: RequestRecord) -> None:
        """Count a finished request. Unrouted requests get an empty model label, so a
        client cannot grow the label set by inventing model names."""
        model = record.model if record.upstream else ""
        team, key = record.team or "", record.key or ""
        self._child(self.requests, team, key, model, record.endpoint, str(record.status)).inc()
        if self.worker_requests is not None:
            self.worker_requests.inc()
        if record.prompt_tokens:
            self._child(self.tokens, team, key, model, "prompt").inc(record.prompt_tokens)
        if record.completion_tokens:
            self._child(self.tokens, team, key, model, "completion").inc(record.completion_tokens)
        for action in record.moderation:
            self._child(self.moderation_actions, action["rule"], action["action"], action["direction"]).inc()
        if record.quota_limit:
            self._child(self.quota_rejections, team, record.quota_limit).inc()
        if record.upstream_error and record.upstream:
            self._child(self.upstream_errors, record.upstream, record.upstream_error).inc()
        self._child(self.request_duration, record.endpoint, model).observe(record.elapsed())
        if record.ttft_ms is not None:
            self._child(self.time_to_first_token, model).observe(record.ttft_ms / 1000)
        if record.overhead_seconds is not None:
            self._child(self.overhead, record.endpoint).observe(record.overhead_seconds)
