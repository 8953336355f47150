"""The gateway's state: the config in force, the quota store, metrics, shutdown and reload.

A ``Runtime`` is everything one config compiles to (keys, routes and their
connection pools, moderation rules). A request takes the runtime current when
it starts and keeps it to the end, so a reload never changes the rules under a
stream in flight; a replaced runtime is closed once its last request is done.
The quota store and the metrics outlive reloads: counters already used against
a limit stay used.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from pathlib import Path

from .accounting import open_store
from .auth import KeyRing
from .config import ConfigError, Settings, load_settings
from .logs import log
from .metrics import Metrics
from .moderation import ModerationEngine
from .quotas import Quotas
from .tokens import preload, set_encodings_dir
from .upstream import Router, Upstream

# What a reload cannot change without a restart: where the counters live, and the socket.
_STORE_FIELDS = ("store", "sqlite_path", "redis_url")


class Runtime:
    """Everything built from one config; immutable once built."""

    def __init__(self, settings: Settings):
        self.settings = settings
        self.keyring = KeyRing(settings)
        self.router = Router([Upstream(u) for u in settings.upstreams])
        self.moderation = ModerationEngine.from_config(settings.moderation) if settings.moderation.rules else None
        self.users = 0  # requests holding this runtime
        self.retired = False

    def moderates(self, direction: str) -> bool:
        return self.moderation is not None and self.moderation.has_rules(direction)

    async def start(self) -> None:
        set_encodings_dir(self.settings.accounting.encodings_dir)
        # Loading the encodings takes about a second: do it now, off the loop, not on the first request.
        await asyncio.to_thread(preload)
        await self.router.start()

    async def close(self) -> None:
        await self.router.close()


def reload_problems(current: Settings, new: Settings) -> list[str]:
    """Changes a running gateway cannot take; the operator must restart for them."""
    problems = []
    for name in _STORE_FIELDS:
        if getattr(current.accounting, name) != getattr(new.accounting, name):
            problems.append(f"accounting.{name}: cannot change on reload (the counters live there); restart instead")
    for name in ("host", "port", "metrics_port"):
        if getattr(current.server, name) != getattr(new.server, name):
            problems.append(f"server.{name}: cannot change on reload; restart instead")
    return problems


class Gateway:
    """App-wide state: the current runtime, the quota store, metrics, in-flight count."""

    def __init__(self, settings: Settings, config_path: str | Path | None = None):
        self.runtime = Runtime(settings)
        self.config_path = config_path
        self.metrics = Metrics()
        self.quotas: Quotas = None  # type: ignore[assignment]  # opened by start()
        self.shutting_down = False
        self.inflight = 0
        self._idle = asyncio.Event()
        self._idle.set()
        self._closing: set[asyncio.Task[None]] = set()
        self._reload_lock = asyncio.Lock()

    @property
    def settings(self) -> Settings:
        return self.runtime.settings

    async def start(self) -> None:
        store_kind = self.settings.accounting.store
        for operation in ("reserve", "settle", "renew", "ping"):
            # Series that exist from zero, so rate() sees the very first failure.
            self.metrics.store_errors.labels(store_kind, operation)
        self.quotas = Quotas(
            await open_store(self.settings.accounting),
            self.settings.accounting,
            on_store_error=lambda operation: self.metrics.store_errors.labels(store_kind, operation).inc(),
        )
        await self.runtime.start()

    async def close(self) -> None:
        if self._closing:
            await asyncio.gather(*self._closing, return_exceptions=True)
        await self.runtime.close()
        await self.quotas.close()

    # -- requests -------------------------------------------------------------

    def request_started(self) -> Runtime:
        runtime = self.runtime
        runtime.users += 1
        self.inflight += 1
        self._idle.clear()
        return runtime

    def request_ended(self, runtime: Runtime) -> None:
        runtime.users -= 1
        self.inflight -= 1
        if self.inflight == 0:
            self._idle.set()
        if runtime.retired and runtime.users == 0:
            self._close_later(runtime)

    async def wait_idle(self) -> None:
        await self._idle.wait()

    # -- reload ---------------------------------------------------------------

    # Set in a worker of ``server.workers`` > 1: reloads every worker (see ``proxy.worker``).
    reload_everywhere: Callable[[], Awaitable[list[str]]] | None = None

    async def reload(self, *, here_only: bool = False) -> list[str]:
        """Re-read the config file. Returns its problems; empty means the new config is in force.

        In a worker, ``POST /admin/reload`` lands here and reloads every worker
        (their supervisor checks the file and signals each); ``here_only`` is
        that signal's own reload, of this process alone.
        """
        if self.reload_everywhere is not None and not here_only:
            return await self.reload_everywhere()
        async with self._reload_lock:
            if self.config_path is None:
                return ["no config file to reload: the gateway was started without one"]
            try:
                # Parsing the file and compiling its rules takes seconds for a big blocklist: off the loop.
                settings = await asyncio.to_thread(load_settings, self.config_path)
                runtime = await asyncio.to_thread(Runtime, settings)
            except ConfigError as exc:
                problems = exc.problems
            else:
                problems = reload_problems(self.settings, settings)
            if problems:
                log.warning("config reload refused; the old config stays", problems=problems)
                return problems
            await runtime.start()
            old, self.runtime = self.runtime, runtime
            self.quotas.config = settings.accounting
            old.retired = True
            if old.users == 0:
                self._close_later(old)
            log.info("config reloaded", path=str(self.config_path), in_flight_on_old=old.users)
            return []

    def _close_later(self, runtime: Runtime) -> None:
        task = asyncio.get_running_loop().create_task(runtime.close())
        self._closing.add(task)
        task.add_done_callback(self._closing.discard)
