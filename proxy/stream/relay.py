"""Relaying an upstream stream to the client: I/O only.

Read what the upstream sends, feed it to the ``StreamPipeline``, write what
it gives, until it gives an end. Around that loop, one timer (``StreamClock``)
keeps three deadlines without a timer per chunk: a keep-alive comment after
``keepalive_seconds`` of upstream silence, the end of the stream after
``read_timeout_seconds`` of it, and the end of a client that has not taken a
write for ``send_timeout_seconds`` (a client that stops reading would
otherwise hold its stream and its upstream connection for as long as it
stays connected).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

import aiohttp
from aiohttp import web

from ..logs import log
from .pipeline import StreamEnd, StreamPipeline
from .sse import KEEPALIVE


# The most one read takes off the upstream's buffer (an SSE chunk is a few
# hundred bytes). ``readany`` joins everything buffered: a stream held by a
# slow client would keep that joined copy, and what the pipeline makes of it,
# alive while its write waits; 200 such streams cost tens of MB of heap.
_READ_BYTES = 16 * 1024


class ClientGone(Exception):
    """The client closed its connection, or stopped reading past the send timeout (``stalled``)."""

    def __init__(self, stalled: bool = False):
        super().__init__()
        self.stalled = stalled


@dataclass(slots=True)
class Relayed:
    end: StreamEnd
    first_text_at: float | None  # monotonic time the first answer text was written
    stalled: bool = False  # the client stopped reading: its connection is to be aborted, not drained


class StreamClock:
    """Interrupts a read after too much upstream silence and a write after too long a stall.

    After ``keepalive_seconds`` of silence (and every as many seconds more)
    ``read`` returns None so that a keep-alive comment can go out; after
    ``timeout_seconds`` without data it raises ``TimeoutError``. A ``write``
    that has not completed after ``send_seconds`` raises ``ClientGone``.

    ``asyncio.timeout`` around every read would create, schedule and cancel
    a timer per chunk; streams read thousands of chunks per second. This
    timer is armed once and re-armed only when it fires: by then, if data
    came in the meantime, it just moves its deadline. It cancels the task
    only while the task waits in ``read`` or ``write``, and each tells its own
    cancellation apart from anyone else's (``uncancel``).
    """

    def __init__(self, keepalive_seconds: float, timeout_seconds: float, send_seconds: float):
        self._keepalive = keepalive_seconds
        self._timeout = timeout_seconds
        self._send = send_seconds
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last_data = self._quiet_since = self._loop.time()  # quiet: since data or the last keep-alive
        self._waiting: str | None = None  # "read" or "write", while the task waits in one
        self._write_since = 0.0
        self._fired: str | None = None  # what the pending cancellation is for
        self._handle = self._loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        due = min(self._quiet_since + self._keepalive, self._last_data + self._timeout)
        return min(due, self._write_since + self._send) if self._waiting == "write" else due

    def _check(self) -> None:
        now = self._loop.time()
        if self._waiting == "write" and now >= self._write_since + self._send:
            self._fire("send_timeout")
            return  # the stream ends here
        if now >= min(self._quiet_since + self._keepalive, self._last_data + self._timeout):
            if self._waiting != "read":
                # Busy writing to a slow client: the upstream is not being read, so its
                # silence is not its fault. Both periods start again from now.
                self._last_data = self._quiet_since = now
            elif now >= self._last_data + self._timeout:
                self._fire("timeout")
                return
            else:
                self._quiet_since = now
                self._fire("keepalive")
        self._handle = self._loop.call_at(self._due(), self._check)

    def _fire(self, reason: str) -> None:
        self._fired = reason
        if self._task is not None:
            self._task.cancel()

    def _own_cancel(self) -> str | None:
        fired, self._fired = self._fired, None
        if fired and self._task is not None and self._task.uncancel() == 0:
            return fired
        return None

    async def read(self, content: aiohttp.StreamReader) -> bytes | None:
        """The next data, or ``None`` when a keep-alive is due; ``TimeoutError`` past the timeout."""
        self._waiting = "read"
        try:
            data = await content.read(_READ_BYTES)
        except asyncio.CancelledError:
            fired = self._own_cancel()
            if fired == "timeout":
                raise TimeoutError() from None
            if fired == "keepalive":
                return None
            raise
        finally:
            self._waiting = None
        self._last_data = self._quiet_since = self._loop.time()
        return data

    async def write(self, response: web.StreamResponse, data: bytes) -> None:
        self._waiting = "write"
        self._write_since = self._loop.time()
        try:
            await response.write(data)
        except asyncio.CancelledError:
            if self._own_cancel() is not None:
                raise ClientGone(stalled=True) from None  # it stopped reading
            raise
        except (ConnectionError, RuntimeError) as exc:
            # aiohttp raises ClientConnectionResetError (a ConnectionResetError) or, on a
            # closed payload writer, RuntimeError: either way nobody is listening.
            raise ClientGone() from exc
        finally:
            self._waiting = None

    def stop(self) -> None:
        self._handle.cancel()


async def relay(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    pipeline: StreamPipeline,
    *,
    keepalive_seconds: float,
    read_timeout_seconds: float,
    send_timeout_seconds: float,
    before_last_bytes: Callable[[StreamEnd], Awaitable[None]],
) -> Relayed:
    """Pump ``upstream`` into ``response`` until the pipeline gives an end or the client leaves.

    ``before_last_bytes`` is awaited once the end is known and before the
    bytes that carry it are written (the durable settle).
    """
    content = upstream.content
    first_text_at: float | None = None
    clock = StreamClock(keepalive_seconds, read_timeout_seconds, send_timeout_seconds)
    if upstream.connection is not None and upstream.connection.protocol is not None:
        # The clock keeps the read timeout from here on. aiohttp's own would replace a
        # timer at every chunk; it is set again for the connection's next request.
        upstream.connection.protocol.read_timeout = None
    end: StreamEnd | None = None
    stalled = False
    out = b""
    try:
        while end is None:
            try:
                data = await clock.read(content)
            except (aiohttp.ServerTimeoutError, TimeoutError):
                out, end = pipeline.upstream_failed(
                    "The upstream went silent mid-stream past the read timeout.", "upstream_timeout"
                )
            except (aiohttp.ClientError, ConnectionError) as exc:
                out, end = pipeline.upstream_failed(f"The upstream connection broke mid-stream ({type(exc).__name__}).")
            else:
                if data is None:
                    await clock.write(response, KEEPALIVE)
                    continue
                out, end = pipeline.feed(data) if data else pipeline.upstream_closed()
            if end is not None:
                await before_last_bytes(end)
            if out:
                await clock.write(response, out)
                if first_text_at is None and pipeline.delivered_text:
                    first_text_at = time.monotonic()
    except ClientGone as gone:
        end = pipeline.client_gone()
        stalled = gone.stalled
        _count_unsent(content, pipeline)
    except asyncio.CancelledError:
        pipeline.client_gone()  # the handler is cancelled: the client left
        _count_unsent(content, pipeline)
        raise
    except Exception:
        # Headers are sent: a 500 is no longer possible, but a well-formed ending is.
        log.exception("relaying a stream failed")
        out, end = pipeline.upstream_failed("The gateway failed while relaying the stream.", "internal_error")
        try:
            await clock.write(response, out)
        except ClientGone:
            end = pipeline.client_gone()
    finally:
        clock.stop()
    return Relayed(end, first_text_at, stalled)


def _count_unsent(content: aiohttp.StreamReader, pipeline: StreamPipeline) -> None:
    """Bill what aiohttp has already read off the upstream but the relay had not fed yet (no waiting)."""
    try:
        data = content.read_nowait()
    except Exception:  # noqa: BLE001  the upstream broke too: nothing more to count
        return
    if data:
        pipeline.count_unsent(data)
