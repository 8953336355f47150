"""Forwarding to the upstream: open the request (with failover), then relay a whole answer or a stream.

What the answer's bytes mean is the format adapter's business; this module
moves them, keeps the upstream's time apart from the gateway's, and turns
the upstream's failures into the gateway's errors.
"""

from __future__ import annotations

import asyncio
import time

import aiohttp
from aiohttp import hdrs, web

from . import jsonio
from .formats import AnswerContext, ParsedRequest, WireFormat
from .gateway import Runtime
from .logs import log
from .metrics import Metrics
from .record import RequestRecord
from .quotas import Settlement
from .stream.pipeline import StreamEnd, StreamPipeline
from .stream.relay import Relayed, relay
from .upstream import (
    Upstream,
    forwarded_response_headers,
    send_with_failover,
    upstream_bad_answer,
    upstream_broken,
    upstream_timeout,
)

_EVENT_STREAM = "text/event-stream"


async def open_upstream(
    fmt: WireFormat,
    request: web.Request,
    runtime: Runtime,
    metrics: Metrics,
    candidates: list[Upstream],
    body: bytes,
    record: RequestRecord,
) -> tuple[Upstream, aiohttp.ClientResponse]:
    server = runtime.settings.server

    def retried(upstream: Upstream) -> None:
        metrics.upstream_retries.labels(upstream.name).inc()
        log.warning("upstream failed before answering; trying the next", upstream=upstream.name)

    try:
        upstream, resp = await send_with_failover(
            candidates,
            fmt.path,
            body,
            request.headers,
            record.request_id,
            max_attempts=server.max_upstream_attempts,
            backoff_seconds=server.retry_backoff_seconds,
            on_retry=retried,
        )
    finally:
        for candidate in candidates:
            metrics.circuit_state(candidate.name, candidate.breaker.is_open)
    record.upstream = upstream.name
    return upstream, resp


async def read_whole(upstream: Upstream, resp: aiohttp.ClientResponse, limit: int) -> bytes:
    """The whole body, at most ``limit`` bytes: a larger answer is an upstream error, never buffered whole."""
    declared = resp.content_length
    if declared is not None and declared > limit:
        raise upstream_bad_answer(f"The upstream's answer is larger than {limit} bytes.")
    chunks: list[bytes] = []
    size = 0
    try:
        async for chunk in resp.content.iter_any():
            size += len(chunk)
            if size > limit:
                raise upstream_bad_answer(f"The upstream's answer is larger than {limit} bytes.")
            chunks.append(chunk)
    except (aiohttp.ServerTimeoutError, TimeoutError):
        raise upstream_timeout(upstream.name) from None
    except aiohttp.ClientError as exc:
        raise upstream_broken(upstream.name, exc) from None
    return b"".join(chunks)


async def forward_whole(
    fmt: WireFormat,
    parsed: ParsedRequest,
    ctx: AnswerContext,
    upstream: Upstream,
    resp: aiohttp.ClientResponse,
    runtime: Runtime,
    record: RequestRecord,
    sent_at: float,
) -> web.Response:
    async with resp:
        answer = await read_whole(upstream, resp, runtime.settings.server.max_response_bytes)
        status, upstream_headers = resp.status, resp.headers
    record.upstream_wait = time.monotonic() - sent_at
    out_headers = forwarded_response_headers(upstream_headers)
    if status == 200:
        answer = _moderate_whole(fmt, parsed, ctx, answer, record)
    elif status >= 500:
        record.upstream_error = "http_5xx"
    record.overhead_seconds = time.monotonic() - record.started - record.upstream_wait
    out_headers["x-sluice-overhead-ms"] = f"{record.overhead_seconds * 1000:.2f}"
    return web.Response(body=answer, status=status, headers=out_headers)


def _moderate_whole(fmt: WireFormat, parsed: ParsedRequest, ctx: AnswerContext, answer: bytes, record: RequestRecord) -> bytes:
    try:
        document = jsonio.loads(answer)
    except (ValueError, RecursionError):
        raise upstream_bad_answer("The upstream answered with a body that is not JSON.") from None
    if not isinstance(document, dict):
        raise upstream_bad_answer("The upstream answered with a body that is not a JSON object.")
    moderated = fmt.moderate_whole(parsed, document, ctx)
    record.add_actions(moderated.actions, "output")
    usage = moderated.usage
    record.prompt_tokens = usage.prompt if usage and usage.prompt is not None else record.prompt_tokens
    record.completion_tokens = (
        usage.completion if usage and usage.completion is not None else moderated.counted_completion
    )
    return moderated.body or answer


def is_stream(resp: aiohttp.ClientResponse) -> bool:
    return resp.status == 200 and _EVENT_STREAM in resp.headers.get(hdrs.CONTENT_TYPE, "")


async def forward_stream(
    fmt: WireFormat,
    parsed: ParsedRequest,
    ctx: AnswerContext,
    request: web.Request,
    upstream: Upstream,
    resp: aiohttp.ClientResponse,
    runtime: Runtime,
    metrics: Metrics,
    record: RequestRecord,
    extra_headers: dict[str, str],
    settlement: Settlement,
) -> web.StreamResponse:
    """Relay a 200 event stream; the record learns how it ended and what it cost.

    The request is settled durably as soon as the stream's end is known and
    before its last bytes go out: a client that has the whole answer finds
    it in the ledger, whatever happens to the process next.
    """
    server = runtime.settings.server
    pipeline = StreamPipeline(fmt.stream_rewriter(parsed, ctx), server.max_event_bytes)
    relayed: Relayed | None = None

    learnt = False

    def learn(end: StreamEnd) -> None:
        """What the record says of the stream, once its end is known."""
        nonlocal learnt
        if learnt:
            return
        learnt = True
        rewriter = pipeline.rewriter
        record.add_actions(rewriter.actions, "output")
        record.prompt_tokens, record.completion_tokens = rewriter.usage(record.prompt_tokens)
        if end.kind == "client_gone":
            record.error = "client_closed_request"
        elif end.code is not None:
            record.error = end.code
            record.upstream_error = "mid_stream_timeout" if end.kind == "timeout" else "mid_stream"

    async def before_last_bytes(end: StreamEnd) -> None:
        learn(end)
        record.status = 200
        await settlement.durably()

    renewing = asyncio.get_running_loop().create_task(settlement.keep_alive())
    response = web.StreamResponse(
        status=200,
        headers={
            **forwarded_response_headers(resp.headers, body=False),
            hdrs.CONTENT_TYPE: _EVENT_STREAM,
            hdrs.CACHE_CONTROL: "no-cache",
            "x-accel-buffering": "no",
            **extra_headers,
        },
    )
    try:
        await response.prepare(request)
        metrics.active_streams.inc()
        try:
            relayed = await relay(
                resp,
                response,
                pipeline,
                keepalive_seconds=server.keepalive_seconds,
                read_timeout_seconds=upstream.config.read_timeout_seconds,
                send_timeout_seconds=server.send_timeout_seconds,
                before_last_bytes=before_last_bytes,
            )
        finally:
            metrics.active_streams.dec()
        end = relayed.end
        if relayed.stalled and request.transport is not None:
            request.transport.abort()  # closing would wait for a client that reads nothing to take the buffer
        if relayed.first_text_at is not None:
            record.ttft_ms = (relayed.first_text_at - record.started) * 1000
        if end.kind != "client_gone":
            try:
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass
        return response
    finally:
        renewing.cancel()
        if relayed is not None and relayed.end.kind == "done":
            resp.release()
        else:
            # A block, a cap, an error or a client that left: drop the upstream connection at once.
            resp.close()
        # Also when the client left (the handler is being cancelled): what was read counts.
        learn(pipeline.end or pipeline.client_gone())
