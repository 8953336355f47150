"""The mock's I/O shell, shared by every endpoint: reading a body, SSE writing, pacing.

Pauses poll the client's socket, so a client that hangs up is noticed within
``_DISCONNECT_POLL_SECONDS`` even when aiohttp runs without
handler_cancellation (then the pause raises ConnectionResetError, which the
app's middleware records as a disconnect).
"""

from __future__ import annotations

import asyncio
import json
from typing import Any

from aiohttp import web

from .control import MockControl, MockError
from .state import MOCK_STATE

_DISCONNECT_POLL_SECONDS = 0.02


async def read_json(request: web.Request) -> dict[str, Any]:
    """The body as a JSON object, recorded before it is judged (tests inspect bad ones too)."""
    state = request.app[MOCK_STATE]
    raw = await request.read()
    try:
        body = json.loads(raw)
    except ValueError:
        state.record_request(request, None, raw)
        raise MockError(400, "We could not parse the JSON body of your request.", code="invalid_json") from None
    state.record_request(request, body, raw)
    if not isinstance(body, dict):
        raise MockError(400, "The request body must be a JSON object.", code="invalid_json")
    return body


def client_gone(request: web.Request) -> bool:
    transport = request.transport
    return transport is None or transport.is_closing()


async def pause(request: web.Request, ms: float) -> None:
    """Sleep ``ms``, but raise ConnectionResetError as soon as the client hangs up."""
    if ms <= 0:
        return
    loop = asyncio.get_running_loop()
    deadline = loop.time() + ms / 1000
    while True:
        if client_gone(request):
            raise ConnectionResetError("the client closed the connection")
        remaining = deadline - loop.time()
        if remaining <= 0:
            return
        await asyncio.sleep(min(remaining, _DISCONNECT_POLL_SECONDS))


def hang_up(request: web.Request) -> None:
    """Close the client's connection, flushing what was already written."""
    transport = request.transport
    if transport is not None:
        transport.close()


def no_answer(request: web.Request) -> web.Response:
    """``drop_after`` on a non-streamed request: the connection closes with no response at all."""
    hang_up(request)
    # aiohttp fails to send this on the closed connection and lets it go quietly.
    return web.Response(status=500)


def dumps(event: Any) -> bytes:
    # Raw UTF-8, as OpenAI and Anthropic send it, so a consumer's decoder meets
    # multi-byte characters (and, with chunk_chars, characters split across
    # network reads).
    return json.dumps(event, ensure_ascii=False, separators=(",", ":")).encode()


class EventStream:
    """An SSE response: ``data: <json>`` events (``event:`` lines where the API has them)."""

    def __init__(self, request: web.Request):
        self.request = request
        self.response = web.StreamResponse(
            status=200, headers={"Content-Type": "text/event-stream", "Cache-Control": "no-cache"}
        )

    async def open(self) -> None:
        await self.response.prepare(self.request)

    async def send(self, event: Any) -> None:
        await self.response.write(b"data: " + dumps(event) + b"\n\n")

    async def send_named(self, name: str, event: Any) -> None:
        await self.response.write(b"event: " + name.encode() + b"\ndata: " + dumps(event) + b"\n\n")

    async def write_raw(self, text: str) -> None:
        # surrogatepass: even a lone surrogate a test sends goes out verbatim.
        await self.response.write(text.encode("utf-8", "surrogatepass"))

    async def finish(self, with_done: bool = False) -> web.StreamResponse:
        if with_done:
            await self.response.write(b"data: [DONE]\n\n")
        await self.response.write_eof()
        return self.response

    def cut(self) -> web.StreamResponse:
        """Close the connection mid-body: what has been written is flushed, the rest never comes."""
        hang_up(self.request)
        return self.response


async def send_raw(request: web.Request, raw: tuple[str, ...], delay_ms: float) -> web.StreamResponse:
    """``mock.raw``: each string written verbatim (one write each) as the SSE body."""
    stream = EventStream(request)
    await stream.open()
    for text in raw:
        await pause(request, delay_ms)
        await stream.write_raw(text)
    return await stream.finish()


def raw_body_response(control: MockControl) -> web.Response:
    """``mock.raw_body``: the whole body verbatim as JSON, with ``mock.status`` if given."""
    assert control.raw_body is not None
    return web.Response(
        status=control.status or 200,
        body=control.raw_body.encode("utf-8", "surrogatepass"),
        content_type="application/json",
    )


async def before_answer(request: web.Request, control: MockControl) -> float:
    """Stall, fail if told to; returns the per-chunk delay in ms for what follows."""
    await pause(request, control.stall_before_ms)
    if control.status is not None and control.raw_body is None:
        code = "rate_limit_exceeded" if control.status == 429 else None
        raise MockError(control.status, f"mock upstream error (HTTP {control.status})", code=code)
    return control.delay_ms if control.delay_ms is not None else request.app[MOCK_STATE].delay_ms


async def verbatim(
    request: web.Request, control: MockControl, delay_ms: float, stream: bool
) -> web.StreamResponse | None:
    """The answer ``raw`` or ``raw_body`` asks for, or None when neither applies.

    ``raw`` is the body of a stream, and of a non-streamed answer unless
    ``raw_body`` is also given: then ``raw_body`` is the whole answer.
    """
    if control.raw is not None and (stream or control.raw_body is None):
        return await send_raw(request, control.raw, delay_ms)
    if control.raw_body is not None:
        await pause(request, delay_ms)
        return raw_body_response(control)
    return None


class Pacer:
    """Paces a stream's deltas and says where the stream must stop.

    ``next()`` is awaited before each delta: it pauses for ``stall_after`` once
    that many deltas are out, applies ``delay_ms``, and returns None to go on,
    or the first of "drop", "error", "fail" whose count (``drop_after``,
    ``error_after``, ``fail_after``) has been reached. ``sent()`` follows each
    delta. ``end()`` is awaited after the last delta: a count that was never
    reached still stops the stream there, before its final events. Benchmarks
    stream through the mock, so a delta costs one coroutine and a few compares.
    """

    def __init__(self, request: web.Request, control: MockControl, delay_ms: float):
        self.request = request
        self.delay_ms = delay_ms
        self.count = 0
        self._stall_at = control.stall_after_chunks
        self._stall_ms = control.stall_after_ms
        limits = (("drop", control.drop_after), ("error", control.error_after), ("fail", control.fail_after))
        self._limits = tuple((kind, limit) for kind, limit in limits if limit is not None)

    async def _stall_if_due(self) -> None:
        if self.count == self._stall_at:
            self._stall_at = None
            await pause(self.request, self._stall_ms)

    async def next(self) -> str | None:
        if self._stall_at is not None:
            await self._stall_if_due()
        for kind, limit in self._limits:
            if self.count >= limit:
                return kind
        if self.delay_ms > 0:
            await pause(self.request, self.delay_ms)
        return None

    def sent(self) -> None:
        self.count += 1

    async def end(self) -> str | None:
        if self._stall_at is not None:
            await self._stall_if_due()
        return self._limits[0][0] if self._limits else None
