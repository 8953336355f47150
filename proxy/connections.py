"""Client connections under hostile clients: header and body timeouts, a connection cap, clean 400s.

aiohttp bounds an idle keep-alive connection (``keepalive_timeout``, which
the gateway sets from ``server.idle_timeout_seconds``) but not a client that
sends its headers one byte a minute (slowloris), nor a body that stops
short of its ``Content-Length``, nor how many connections are open at once;
and its own 400 for malformed HTTP is plain text that echoes the offending
bytes, with a ``Server`` header naming Python's and aiohttp's versions.
Without these bounds a few thousand sockets that never finish a request,
none of them needing a key, take every file descriptor and nobody else is
served.

``GuardedRunner`` is an ``AppRunner`` whose server makes a
``GuardedRequestHandler`` per connection. Each connection has at most one
timer, and only while it owes the gateway bytes:

* from ``connection_made`` until its first request's headers are parsed:
  past ``header_timeout_seconds`` it is answered 408 and closed (closed
  without an answer if it never sent a byte). Later requests on a kept-alive
  connection are bounded by the idle timeout: aiohttp closes a connection
  that has not completed a request within it;
* while a request's body is incomplete: ``body_timeout_seconds`` without a
  body byte and it is answered 408 and closed. Time during which aiohttp has
  paused reading (the handler has not taken what is buffered) does not count:
  the stall is then the gateway's, not the client's.

Beyond ``max_connections`` open connections a new one is answered 503 and
closed at once, before anything is read from it, instead of waiting for a
file descriptor that is not coming (at ``EMFILE`` asyncio stops accepting
for a second at a time, and every client starves). The cap is clamped to
what the process's open-file limit allows, two descriptors per connection
(a stream holds its client's socket and its upstream's).

Every answer written here is OpenAI's error shape, with ``Server: sluice``
and ``Connection: close``, and never repeats what the client sent.
"""

from __future__ import annotations

import asyncio
import json
import resource
import time
from dataclasses import dataclass
from http import HTTPStatus
from typing import Any

from aiohttp import hdrs, web
from aiohttp.web_protocol import RequestHandler

from .errors import error_body
from .logs import log
from .middleware import SERVER_NAME

# The most connections asyncio accepts in one loop pass (app._listen); each holds
# a descriptor until the cap refuses it.
ACCEPT_BURST = 32
# Descriptors kept free for what is not a client connection: listeners, the store,
# logs, encodings, and one accept burst.
_SPARE_FILES = 64 + ACCEPT_BURST
# Refusals are logged at most this often: an attack must not become a flood of log lines.
_REFUSAL_LOG_SECONDS = 10.0


@dataclass(frozen=True, slots=True)
class ConnectionLimits:
    header_timeout_seconds: float
    body_timeout_seconds: float
    idle_timeout_seconds: float
    max_connections: int

    @classmethod
    def from_server(cls, server: Any) -> ConnectionLimits:
        """From ``ServerConfig``, with ``max_connections`` clamped to the open-file limit."""
        return cls(
            server.header_timeout_seconds,
            server.body_timeout_seconds,
            server.idle_timeout_seconds,
            connection_cap(server.max_connections, open_file_limit()),
        )


def raise_open_file_limit() -> None:
    """Lift the soft limit on open files to the hard one (the common soft default of 1,024 is ~500 streams)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY:
        hard = max(soft, 1 << 20)
    if soft < hard:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
        except (ValueError, OSError):
            pass  # keep what we have; the system said no


def open_file_limit() -> int | None:
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def connection_cap(configured: int, file_limit: int | None) -> int:
    """``configured``, or fewer when the file limit cannot give two descriptors to each connection."""
    if file_limit is None:
        return configured
    allowed = max(1, (file_limit - _SPARE_FILES) // 2)
    if allowed < configured:
        log.warning(
            "server.max_connections lowered to fit the open-file limit",
            configured=configured,
            effective=allowed,
            open_file_limit=file_limit,
        )
        return allowed
    return configured


def error_bytes(status: int, code: str, message: str) -> bytes:
    """A whole HTTP/1.1 response, written straight to the socket: OpenAI's error shape, then close."""
    body = json.dumps(error_body(message, code)).encode()
    head = (
        f"HTTP/1.1 {status} {HTTPStatus(status).phrase}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
        f"Server: {SERVER_NAME}\r\nConnection: close\r\n\r\n"
    )
    return head.encode("ascii") + body


_HEADERS_LATE = error_bytes(408, "request_timeout", "The request headers did not arrive in time.")
_BODY_STALLED = error_bytes(408, "request_timeout", "The request body stalled.")
_TOO_MANY = error_bytes(503, "server_busy", "The gateway has too many open connections; retry shortly.")


class GuardedServer(web.Server):
    """The application's ``web.Server``, making guarded handlers and counting open connections."""

    def __init__(self, base: web.Server, limits: ConnectionLimits):
        # The application's own server carries its handler, request factory and options.
        super().__init__(
            base.request_handler,
            request_factory=base.request_factory,
            handler_cancellation=base.handler_cancellation,
            loop=base._loop,  # noqa: SLF001
            **base._kwargs,  # noqa: SLF001
        )
        self.limits = limits
        self.open_connections = 0
        self.refused = 0
        self._refusal_logged_at = 0.0

    def __call__(self) -> RequestHandler:
        return GuardedRequestHandler(self, loop=self._loop, **self._kwargs)

    def note_refusal(self) -> None:
        self.refused += 1
        now = time.monotonic()
        if now - self._refusal_logged_at >= _REFUSAL_LOG_SECONDS:
            self._refusal_logged_at = now
            log.warning("connection refused: too many open", max_connections=self.limits.max_connections, refused=self.refused)


class GuardedRequestHandler(RequestHandler):
    """aiohttp's connection handler with the gateway's deadlines and error answers."""

    __slots__ = ("_guard", "_counted", "_headers_done", "_payload", "_last_data", "_timer", "_got_bytes")

    def __init__(self, manager: GuardedServer, **kwargs: Any):
        super().__init__(manager, **kwargs)
        self._guard = manager
        self._counted = False
        self._headers_done = False
        self._got_bytes = False
        self._payload: Any = None  # the current request's body reader while it is incomplete
        self._last_data = 0.0
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        guard = self._guard
        if guard.open_connections >= guard.limits.max_connections:
            # Refused before aiohttp sees it: no parser task, no timers.
            self._manager = None  # connection_lost has nothing to undo
            guard.note_refusal()
            transport.write(_TOO_MANY)  # type: ignore[attr-defined]
            transport.close()
            return
        guard.open_connections += 1
        self._counted = True
        super().connection_made(transport)
        if self._keepalive_handle is not None:
            # aiohttp arms its idle timer for the first request too: the header timer bounds that one.
            self._keepalive_handle.cancel()
            self._keepalive_handle = None
        self._last_data = self._loop.time()
        self._timer = self._loop.call_at(self._last_data + guard.limits.header_timeout_seconds, self._headers_late)

    def connection_lost(self, exc: BaseException | None) -> None:
        if self._counted:
            self._counted = False
            self._guard.open_connections -= 1
        self._cancel_timer()
        self._payload = None
        super().connection_lost(exc)

    def data_received(self, data: bytes) -> None:
        self._last_data = self._loop.time()
        self._got_bytes = True
        super().data_received(data)
        messages = self._messages
        if messages:  # headers of a request were completed by these bytes (or wait to be handled)
            payload = messages[-1][1]
            if not self._headers_done:
                self._headers_done = True
                self._cancel_timer()
            if payload is not self._payload and not payload.is_eof():
                self._payload = payload
                if self._timer is None:
                    self._timer = self._loop.call_at(
                        self._last_data + self._guard.limits.body_timeout_seconds, self._body_check
                    )

    def _cancel_timer(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def _headers_late(self) -> None:
        self._timer = None
        if not self._headers_done:
            self._refuse(_HEADERS_LATE if self._got_bytes else b"")

    def _body_check(self) -> None:
        self._timer = None
        payload = self._payload
        if payload is None or payload.is_eof():
            self._payload = None
            return
        now = self._loop.time()
        timeout = self._guard.limits.body_timeout_seconds
        if self._reading_paused or self._buffer_paused:
            self._last_data = now  # the handler has not taken what is buffered: not the client's stall
        elif now - self._last_data >= timeout:
            self._payload = None
            self._refuse(_BODY_STALLED)
            return
        self._timer = self._loop.call_at(self._last_data + timeout, self._body_check)

    def _refuse(self, answer: bytes) -> None:
        transport = self.transport
        if transport is not None and answer and not self._answer_started():
            transport.write(answer)
        self.force_close()  # the handler, if one runs, is cancelled (handler_cancellation)

    def _answer_started(self) -> bool:
        request = self._current_request
        return request is not None and request.writer.output_size > 0

    def handle_error(
        self,
        request: Any,
        status: int = 500,
        exc: BaseException | None = None,
        message: str | None = None,
    ) -> web.StreamResponse:
        """aiohttp's answer to what it could not parse or handle, in OpenAI's shape and without the echo."""
        if status >= 500:
            self.log_exception("error handling a request", exc_info=exc)
            code, text = "internal_error", "The gateway failed to handle the request."
        else:
            # Not logged with its traceback: malformed requests are what scanners send all day.
            self.log_debug("malformed request: %s", type(exc).__name__)
            code, text = "invalid_request", "The request is not valid HTTP/1.1."
        if request.writer.output_size > 0:
            raise ConnectionError("the response was already started")
        response = web.Response(
            status=status,
            body=json.dumps(error_body(text, code)).encode(),
            content_type="application/json",
            headers={hdrs.SERVER: SERVER_NAME},
        )
        response.force_close()
        return response


class GuardedRunner(web.AppRunner):
    """``web.AppRunner`` whose server guards every connection with ``limits``."""

    def __init__(self, app: web.Application, limits: ConnectionLimits, **kwargs: Any):
        kwargs.setdefault("keepalive_timeout", limits.idle_timeout_seconds)
        super().__init__(app, **kwargs)
        self.limits = limits

    async def _make_server(self) -> web.Server:
        return GuardedServer(await super()._make_server(), self.limits)
