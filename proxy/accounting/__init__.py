"""Quotas and the usage ledger: pure arithmetic in ``quota`` and ``ledger``, stores at the edges.

The gateway needs only what is exported here: build the ``Subject``s of a
request (its key and its team), ``reserve`` before calling upstream,
``renew`` a long request's concurrency lease while it runs, ``settle``
after (with the ``LedgerEntry``), and read ``usage``. ``proxy.quotas``
wraps these for the request path (``Quotas.settle_durably``).
"""

from proxy.accounting.ledger import (
    LedgerEntry,
    SubjectUsage,
    UsageReport,
    UsageTotals,
    format_usage_table,
)
from proxy.accounting.quota import (
    INSUFFICIENT_QUOTA,
    RATE_LIMIT_EXCEEDED,
    RateInfo,
    Rejection,
    Reservation,
    Subject,
    format_duration,
    ratelimit_headers,
    retry_headers,
)
from proxy.accounting.store import (
    DEFAULT_LEASE_SECONDS,
    QuotaStore,
    StoreUnavailable,
)
from proxy.accounting.stores import open_store

__all__ = [
    "DEFAULT_LEASE_SECONDS",
    "INSUFFICIENT_QUOTA",
    "RATE_LIMIT_EXCEEDED",
    "LedgerEntry",
    "QuotaStore",
    "RateInfo",
    "Rejection",
    "Reservation",
    "StoreUnavailable",
    "Subject",
    "SubjectUsage",
    "UsageReport",
    "UsageTotals",
    "format_duration",
    "format_usage_table",
    "open_store",
    "ratelimit_headers",
    "retry_headers",
]
