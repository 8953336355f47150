"""``open_store``: the store the config names. Apart from the interface (``store``), so that no store imports its siblings."""

from __future__ import annotations

from proxy.accounting.store import DEFAULT_LEASE_SECONDS, QuotaStore
from proxy.config import AccountingConfig


async def open_store(
    cfg: AccountingConfig,
    *,
    lease_seconds: float = DEFAULT_LEASE_SECONDS,
    read_only: bool = False,
) -> QuotaStore:
    """The store ``cfg.store`` names.

    ``read_only`` is for readers (``sluice usage``): a SQLite file is then
    never created or written. Any number of processes may open one SQLite
    file and share its limits exactly. Raises ``StoreUnavailable`` if a
    SQLite file cannot be opened; a Redis store connects lazily, so a gateway
    can start (and fail open, if so configured) while Redis is down.
    """
    # Imported here so that a gateway on one backend never loads the others.
    if cfg.store == "memory":
        from proxy.accounting.memory_store import MemoryStore

        return MemoryStore(lease_seconds=lease_seconds)
    if cfg.store == "sqlite":
        from proxy.accounting.sqlite_store import SqliteStore

        return await SqliteStore.open(cfg.sqlite_path, lease_seconds=lease_seconds, read_only=read_only)
    if cfg.store == "redis":
        from proxy.accounting.redis_store import RedisStore

        return RedisStore(cfg.redis_url, lease_seconds=lease_seconds)
    raise ValueError(f"unknown store {cfg.store!r}")
