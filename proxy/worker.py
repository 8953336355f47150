"""A worker's side of ``sluice serve --workers N``: what a forked gateway knows of its supervisor.

The supervisor (``proxy.supervisor``) forks each worker with the listening
sockets already bound; ``become_worker`` turns the fresh child into one (it
dies with its parent, records metrics into the shared directory, names
itself in its log lines) and ``proxy.app.serve`` then runs the gateway on
those sockets, telling the parent through a ``WorkerLink`` when it serves.

A reload must reach every worker or none: ``POST /admin/reload`` on one
worker checks the file here, then asks the parent (SIGHUP), which checks it
again and signals every worker; the request is answered once this worker's
own reload, started by that signal, is done.
"""

from __future__ import annotations

import asyncio
import ctypes
import os
import signal
import socket
from functools import partial
from typing import TYPE_CHECKING

import structlog

from .config import ConfigError, Settings, load_settings
from .gateway import Gateway, Runtime, reload_problems
from .logs import log
from .metrics import enable_multiprocess

if TYPE_CHECKING:
    from .app import GatewayServer

# How long ``POST /admin/reload`` waits for this worker's own reload, signalled by the parent.
RELOAD_WAIT_SECONDS = 30.0
# Blocked in a worker until it serves, so that one arriving while it starts waits instead of
# killing it; the supervisor blocks them around fork so that the child starts with them blocked.
DEFERRED_SIGNALS = frozenset({signal.SIGTERM, signal.SIGINT, signal.SIGHUP})
_PR_SET_PDEATHSIG = 1


def check_new_config(path: str, current: Settings) -> tuple[Settings | None, list[str]]:
    """The config at ``path`` if a gateway running ``current`` can take it, else its problems.

    The parent runs this before it signals the workers, and a worker before
    it asks the parent, with the checks ``Gateway.reload`` makes itself.
    """
    try:
        settings = load_settings(path)
        Runtime(settings)  # compiles the rules, so a bad pattern shows here
    except ConfigError as exc:
        return None, exc.problems
    problems = reload_problems(current, settings)
    return (None, problems) if problems else (settings, [])


class WorkerLink:
    """A worker's side of its supervisor: its sockets, and what ``serve`` tells the parent."""

    def __init__(self, sockets: list[socket.socket], metrics_sockets: list[socket.socket], ready_fd: int, parent: int):
        self.sockets = sockets
        self.metrics_sockets = metrics_sockets
        self._ready_fd = ready_fd
        self._parent = parent
        self._waiters: list[asyncio.Future[list[str]]] = []

    def serving(self, server: GatewayServer) -> None:
        """Listening, with signal handlers in place: announce it, then take the deferred signals."""
        server.gateway.reload_everywhere = partial(self._reload_everywhere, server.gateway)
        try:
            os.write(self._ready_fd, b"ready %d\n" % os.getpid())
        except OSError:
            pass  # the parent is gone: the SIGTERM it left this worker is about to drain it
        signal.pthread_sigmask(signal.SIG_UNBLOCK, DEFERRED_SIGNALS)

    def reloading(self, task: asyncio.Task[list[str]]) -> None:
        """A SIGHUP started ``task``: it answers the admin requests that asked for a reload before it."""
        waiters, self._waiters = self._waiters, []

        def answer(done: asyncio.Task[list[str]]) -> None:
            problems = ["the reload failed"] if done.cancelled() or done.exception() else done.result()
            for waiter in waiters:
                if not waiter.done():
                    waiter.set_result(problems)

        task.add_done_callback(answer)

    async def _reload_everywhere(self, gateway: Gateway) -> list[str]:
        if gateway.config_path is None:
            return ["no config file to reload: the gateway was started without one"]
        _, problems = await asyncio.to_thread(check_new_config, str(gateway.config_path), gateway.settings)
        if problems:
            log.warning("config reload refused; the old config stays", problems=problems)
            return problems
        if os.getppid() != self._parent:  # orphaned: never signal whatever process adopted this one
            return ["the supervisor is gone; this worker is shutting down"]
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        os.kill(self._parent, signal.SIGHUP)
        try:
            return await asyncio.wait_for(waiter, RELOAD_WAIT_SECONDS)
        except TimeoutError:
            return [f"the supervisor did not reload the workers within {RELOAD_WAIT_SECONDS:.0f} s; see its log"]


def _die_with_parent(parent: int) -> None:
    """SIGTERM this worker when the parent dies, so it drains instead of holding the port as an orphan."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)
    except (OSError, AttributeError):
        return  # not Linux: an orphan lives on until stopped
    if os.getppid() != parent:  # the parent died before the request was made
        os.kill(os.getpid(), signal.SIGTERM)


def _tag_logs(pid: int) -> None:
    """Every structlog line of this worker names it (the per-request line is rendered apart, without it)."""

    def add_worker(logger: object, method: str, event: dict) -> dict:
        event.setdefault("worker", pid)
        return event

    structlog.configure(processors=[add_worker, *structlog.get_config()["processors"]])


def become_worker(parent: int, metrics_dir: str) -> None:
    """Turn a freshly forked child into a worker, before it builds its gateway."""
    _die_with_parent(parent)
    enable_multiprocess(metrics_dir)
    _tag_logs(os.getpid())

