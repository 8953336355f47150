"""Relaying an upstream answer to the client: the I/O shell around the pure cores.

For a stream: read bytes as they come, decode SSE, rewrite each event
(``StreamRewriter``), write at once. Silence from the upstream is answered
with a keep-alive comment; a break, a timeout or a bad event ends the stream
with an error event after whatever the moderation windows still held.
"""

from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from .logs import log
from .sse import KEEPALIVE, EventTooLarge, SSEDecoder
from .stream_rewriter import StreamRewriter, UpstreamStreamError, error_event


@dataclass(slots=True)
class StreamOutcome:
    """How a relayed stream ended, for the request's log line and accounting."""

    completed: bool = False  # the client got [DONE]
    error: str | None = None  # the error code sent as the final event
    client_gone: bool = False
    first_text_at: float | None = None  # monotonic time the first answer text was written


class ClientGone(Exception):
    """The client closed its connection; stop and release the upstream."""


async def _write(response: web.StreamResponse, data: bytes) -> None:
    try:
        await response.write(data)
    except (ConnectionResetError, ConnectionError, RuntimeError) as exc:
        # aiohttp raises ClientConnectionResetError (a ConnectionResetError) or, on a
        # closed payload writer, RuntimeError: either way nobody is listening.
        raise ClientGone() from exc


class SilenceTimer:
    """Interrupts a read once the upstream has been silent too long: for a keep-alive, or for good.

    After ``keepalive_seconds`` of silence (and every as many seconds more)
    ``read`` returns None so that a keep-alive comment can go out; after
    ``timeout_seconds`` without data it raises ``TimeoutError``.

    ``asyncio.timeout`` around every read would create, schedule and cancel a
    timer per chunk, and so would aiohttp's own ``sock_read`` timeout, which
    the relay turns off once a stream has started; streams read thousands of
    chunks per second. This timer is armed once and re-armed only when it
    fires: by then, if data came in the meantime, it just moves its deadline.
    It cancels the task only while the task waits in ``read`` (never
    mid-write), and ``read`` tells its own cancellation apart from anyone
    else's.
    """

    def __init__(self, keepalive_seconds: float, timeout_seconds: float):
        self._keepalive = keepalive_seconds
        self._timeout = timeout_seconds
        self._loop = asyncio.get_running_loop()
        self._task = asyncio.current_task()
        self._last_data = self._quiet_since = self._loop.time()  # quiet: since data or the last keep-alive
        self._reading = False
        self._fired: str | None = None  # "keepalive" or "timeout", while its cancellation is on its way
        self._handle = self._loop.call_at(self._due(), self._check)

    def _due(self) -> float:
        return min(self._quiet_since + self._keepalive, self._last_data + self._timeout)

    def _check(self) -> None:
        now = self._loop.time()
        if now >= self._due():
            if not self._reading or self._task is None:
                # Busy writing to a slow client: the upstream is not being read, so its
                # silence is not its fault. Both periods start again from now.
                self._last_data = self._quiet_since = now
            elif now >= self._last_data + self._timeout:
                self._fired = "timeout"
                self._task.cancel()
                return  # the stream ends here
            else:
                self._fired = "keepalive"
                self._quiet_since = now
                self._task.cancel()
        self._handle = self._loop.call_at(self._due(), self._check)

    async def read(self, content: aiohttp.StreamReader) -> bytes | None:
        """The next data, or ``None`` when a keep-alive is due; ``TimeoutError`` past the timeout."""
        self._reading = True
        try:
            data = await content.readany()
        except asyncio.CancelledError:
            fired, self._fired = self._fired, None
            if fired and self._task is not None and self._task.uncancel() == 0:
                if fired == "timeout":
                    raise TimeoutError() from None
                return None
            raise
        finally:
            self._reading = False
        self._last_data = self._quiet_since = self._loop.time()
        return data

    def stop(self) -> None:
        self._handle.cancel()


async def relay_stream(
    upstream: aiohttp.ClientResponse,
    response: web.StreamResponse,
    rewriter: StreamRewriter,
    *,
    keepalive_seconds: float,
    read_timeout_seconds: float,
    max_event_bytes: int,
) -> StreamOutcome:
    """Pump ``upstream`` into ``response`` until [DONE], a block, an error or the client leaves."""
    outcome = StreamOutcome()
    decoder = SSEDecoder(max_event_bytes)
    content = upstream.content
    out = b""
    silence = SilenceTimer(keepalive_seconds, read_timeout_seconds)
    if upstream.connection is not None and upstream.connection.protocol is not None:
        # The silence timer keeps the read timeout from here on. aiohttp's own would
        # replace a timer at every chunk; it is set again for the connection's next request.
        upstream.connection.protocol.read_timeout = None
    try:
        while not rewriter.done:
            data = await silence.read(content)
            if data is None:
                await _write(response, KEEPALIVE)
                continue
            out = b""
            try:
                events = decoder.feed(data) if data else decoder.finish()
            except EventTooLarge as exc:
                for event in exc.events:
                    out += rewriter.event(event.data)
                raise
            for event in events:
                out += rewriter.event(event.data)
                if rewriter.done:
                    break
            if not data and not rewriter.done:
                # EOF without [DONE]: complete only if every choice had finished.
                if rewriter.all_choices_finished():
                    out += rewriter.finish()
                else:
                    raise UpstreamStreamError("The upstream closed the stream before it was complete.")
            if out:
                if outcome.first_text_at is None and rewriter.delivered_text:
                    outcome.first_text_at = time.monotonic()
                pending, out = out, b""
                await _write(response, pending)
        outcome.completed = rewriter.blocked is None
    except ClientGone:
        outcome.client_gone = True
    except (UpstreamStreamError, EventTooLarge) as exc:
        await _end_with_error(response, rewriter, outcome, str(exc), "upstream_error", out)
    except (aiohttp.ServerTimeoutError, TimeoutError):
        await _end_with_error(
            response, rewriter, outcome, "The upstream went silent mid-stream past the read timeout.", "upstream_timeout"
        )
    except (aiohttp.ClientError, ConnectionError) as exc:
        await _end_with_error(
            response, rewriter, outcome, f"The upstream connection broke mid-stream ({type(exc).__name__}).", "upstream_error"
        )
    except Exception:
        # Headers are sent: a 500 is no longer possible, but a well-formed ending is.
        log.exception("relaying a stream failed")
        await _end_with_error(response, rewriter, outcome, "The gateway failed while relaying the stream.", "internal_error")
    finally:
        silence.stop()
    return outcome


async def _end_with_error(
    response: web.StreamResponse,
    rewriter: StreamRewriter,
    outcome: StreamOutcome,
    message: str,
    code: str,
    pending: bytes = b"",
) -> None:
    """End with what was already rewritten (``pending``), what the windows hold, then the error event."""
    outcome.error = code
    try:
        await _write(response, pending + rewriter.flush_before_error() + error_event(message, code))
    except ClientGone:
        outcome.client_gone = True


def moderate_whole_answer(answer: dict[str, Any], engine: Any, *, chat: bool) -> tuple[list[Any], Any]:
    """Moderate a non-streamed answer in place, as one window per choice would.

    Returns (actions, blocking action or None). A blocked choice keeps the text
    before the match and ends with ``finish_reason: "content_filter"``.
    """
    actions: list[Any] = []
    blocked = None
    choices = answer.get("choices")
    if not isinstance(choices, list):
        return actions, blocked
    for choice in choices:
        if not isinstance(choice, dict):
            continue
        holder = choice.get("message") if chat else choice
        if not isinstance(holder, dict):
            continue
        key = "content" if chat else "text"
        choice_blocked = None
        if isinstance(holder.get(key), str):
            result = engine.moderate(holder[key], "output")
            holder[key] = result.text
            actions.extend(result.actions)
            choice_blocked = result.blocked
        calls = holder.get("tool_calls") if chat and choice_blocked is None else None
        for call in calls if isinstance(calls, list) else ():
            function = call.get("function") if isinstance(call, dict) else None
            if isinstance(function, dict) and isinstance(function.get("arguments"), str):
                result = engine.moderate(function["arguments"], "output")
                function["arguments"] = result.text
                actions.extend(result.actions)
                if result.blocked is not None:
                    choice_blocked = result.blocked
                    break
        if choice_blocked is not None:
            choice["finish_reason"] = "content_filter"
            blocked = blocked or choice_blocked
    return actions, blocked
