"""The application: routes, start-up and shutdown, and the process's signals.

``create_app`` wires the middleware and the handlers; ``GatewayServer`` is
the gateway listening on its sockets (``sluice serve``, ``sluice demo`` and
the tests use it); ``serve`` runs one until SIGTERM.
"""

from __future__ import annotations

import asyncio
import gc
import signal
import socket
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from aiohttp import web

from .config import Settings
from .connections import ACCEPT_BURST, ConnectionLimits, GuardedRunner, raise_open_file_limit
from .formats import FORMATS
from .gateway import Gateway
from .handlers.admin import admin_reload, admin_usage
from .handlers.ops import healthz, list_models, metrics, readyz
from .handlers.proxy import proxy_handler
from .logs import log
from .middleware import GATEWAY, error_middleware, stamp_headers

if TYPE_CHECKING:
    from .worker import WorkerLink


def create_app(settings: Settings, config_path: str | Path | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes + 1)
    gateway = Gateway(settings, config_path)
    app[GATEWAY] = gateway
    app.on_response_prepare.append(stamp_headers)

    async def lifecycle(app: web.Application) -> Any:
        await gateway.start()
        yield
        await gateway.close()

    app.cleanup_ctx.append(lifecycle)
    app.router.add_get("/healthz", healthz)
    app.router.add_get("/readyz", readyz)
    if settings.server.metrics_port is None:
        app.router.add_get("/metrics", metrics)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/admin/usage", admin_usage)
    app.router.add_post("/admin/reload", admin_reload)
    for path, fmt in FORMATS.items():
        app.router.add_post(path, proxy_handler(fmt))
    return app


def create_metrics_app(gateway: Gateway) -> web.Application:
    """The /metrics endpoint alone, for ``server.metrics_port``."""
    app = web.Application()
    app[GATEWAY] = gateway
    app.on_response_prepare.append(stamp_headers)
    app.router.add_get("/metrics", metrics)
    return app


class GatewayServer:
    """The gateway listening on its sockets: used by ``sluice serve``, ``sluice demo`` and the tests."""

    def __init__(
        self,
        settings: Settings,
        host: str | None = None,
        port: int | None = None,
        config_path: str | Path | None = None,
    ):
        self.settings = settings
        self.host = host if host is not None else settings.server.host
        self.port = port if port is not None else settings.server.port
        self.metrics_port = settings.server.metrics_port
        self.app = create_app(settings, config_path)
        self._runners: list[GuardedRunner] = []

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def start(self, sockets: Sequence[socket.socket] = (), metrics_sockets: Sequence[socket.socket] = ()) -> None:
        """Listen on host and port, or on ``sockets`` already bound (a worker's, handed down by its supervisor)."""
        raise_open_file_limit()  # before the cap is fitted to it
        limits = ConnectionLimits.from_server(self.settings.server)
        runner = GuardedRunner(
            self.app,
            limits,
            handler_cancellation=True,  # a client that leaves cancels its handler, and so the upstream call
            shutdown_timeout=1.0,  # stop() has already given in-flight requests their grace period
            access_log=None,
        )
        await runner.setup()
        self._runners.append(runner)
        self.port = await _listen(runner, self.host, self.port, sockets)
        if self.metrics_port is not None:
            metrics_runner = GuardedRunner(create_metrics_app(self.gateway), limits, access_log=None)
            await metrics_runner.setup()
            self._runners.append(metrics_runner)
            self.metrics_port = await _listen(metrics_runner, self.host, self.metrics_port, metrics_sockets)

    async def stop(self) -> None:
        """Refuse new requests (503, /readyz too), let in-flight ones finish within the grace period, close.

        The listener stays open during the grace period so that load balancers and
        clients get a clear 503 ``shutting_down`` rather than a refused connection.
        """
        gateway = self.gateway
        gateway.shutting_down = True
        grace = self.settings.server.shutdown_grace_seconds
        try:
            await asyncio.wait_for(gateway.wait_idle(), grace)
        except TimeoutError:
            log.warning("grace period over; cancelling requests still in flight", inflight=gateway.inflight)
        while self._runners:
            await self._runners.pop().cleanup()


# Connections waiting to be accepted. aiohttp's default of 128 overflows when
# thousands of clients connect at once (a deploy, a retry storm): the kernel then
# drops handshakes, and clients wait seconds for their SYN retries. The kernel
# caps it at net.core.somaxconn.
LISTEN_BACKLOG = 4096


async def _listen(runner: GuardedRunner, host: str, port: int, sockets: Sequence[socket.socket] = ()) -> int:
    """Listen on ``host:port``, or on bound ``sockets`` when given; returns the port."""
    # asyncio takes its ``backlog`` argument as the most connections it accepts in
    # one loop pass, and those beyond the cap are refused only after the pass: with
    # 4,096 a burst takes every descriptor first, accept() fails with EMFILE and
    # asyncio stops accepting for a second, so even the refusals come late. So
    # the listener starts with a small burst and is then re-listened with the
    # full queue (connection_cap keeps ACCEPT_BURST descriptors spare).
    if sockets:
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=ACCEPT_BURST).start()
            sock.listen(LISTEN_BACKLOG)
        return sockets[0].getsockname()[1]
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=ACCEPT_BURST)
    await site.start()
    server = site._server  # noqa: SLF001
    assert server is not None
    for listener in server.sockets:  # type: ignore[union-attr]
        _relisten(listener.fileno())
    return server.sockets[0].getsockname()[1] if port == 0 else port  # type: ignore[union-attr]


def _relisten(fd: int) -> None:
    """``listen(LISTEN_BACKLOG)`` on a socket asyncio owns (its TransportSocket has no ``listen``)."""
    sock = socket.socket(fileno=fd)
    try:
        sock.listen(LISTEN_BACKLOG)
    finally:
        sock.detach()  # the descriptor stays asyncio's


async def serve(
    settings: Settings,
    host: str | None = None,
    port: int | None = None,
    config_path: str | None = None,
    worker: WorkerLink | None = None,
) -> None:
    """Run until SIGTERM or SIGINT, then shut down gracefully; SIGHUP reloads the config.

    As one of ``server.workers`` processes (``worker`` given), it listens on the
    sockets its supervisor handed down and tells it when it serves.
    """
    server = GatewayServer(settings, host, port, config_path)
    if worker is None:
        await server.start()
    else:
        await server.start(worker.sockets, worker.metrics_sockets)
    # What start-up built lives as long as the process (the compiled rules, the token
    # encodings, every module): moved out of the collector's way, the collections that
    # requests trigger no longer walk it.
    gc.collect()
    gc.freeze()
    log.info("listening", host=server.host, port=server.port, metrics_port=server.metrics_port)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    reloads: set[asyncio.Task[list[str]]] = set()

    def reload() -> None:
        task = loop.create_task(server.gateway.reload(here_only=True))  # a worker's supervisor signals each worker
        reloads.add(task)
        task.add_done_callback(reloads.discard)
        if worker is not None:
            worker.reloading(task)

    loop.add_signal_handler(signal.SIGHUP, reload)
    if worker is not None:
        worker.serving(server)
    await stop.wait()
    log.info("shutting down", grace_seconds=server.gateway.settings.server.shutdown_grace_seconds)
    await server.stop()
    log.info("stopped")
