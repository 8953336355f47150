"""The HTTP shell: aiohttp routes, middleware and the request path.

The path reads left to right as in DESIGN.md: authenticate, validate, route,
moderate the input, forward, relay the answer (moderated and counted), then
settle: one log line per request. Everything that decides something lives in
a pure module; this one moves bytes and keeps time.
"""

from __future__ import annotations

import asyncio
import gc
import json
import os
import re
import signal
import socket
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

import aiohttp
import structlog
from aiohttp import hdrs, web

from .accounting import Reservation, StoreUnavailable
from .auth import Caller
from .config import Settings
from .errors import GatewayError, UpstreamFailure, invalid_request
from .gateway import Gateway, Runtime
from .logs import log, log_request
from .metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from .quotas import QuotaRejected, limits_tokens
from .record import RequestRecord
from .relay import StreamOutcome, moderate_whole_answer, relay_stream
from .stream_rewriter import StreamRewriter
from .tokens import count_chat_prompt, count_prompt, count_text
from .upstream import (
    Upstream,
    forwarded_response_headers,
    send_with_failover,
    upstream_bad_answer,
    upstream_broken,
    upstream_timeout,
)
from .validation import CHAT, COMPLETIONS, EMBEDDINGS, ParsedRequest, parse_request

if TYPE_CHECKING:
    from .worker import WorkerLink

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
REQUEST_ID_KEY = web.RequestKey("request_id", str)
GATEWAY = web.AppKey("gateway", Gateway)
_JSON = "application/json"


# -- middleware -------------------------------------------------------------


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=json.dumps(body).encode(), status=status, content_type=_JSON, headers=headers)


def error_response(error: GatewayError) -> web.Response:
    return web.Response(body=error.body_bytes(), status=error.status, content_type=_JSON, headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Give every request an id and turn every failure into an OpenAI-shaped error."""
    request_id = _request_id(request)
    request[REQUEST_ID_KEY] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc)
    except web.HTTPException as exc:
        if exc.status == 404:
            return error_response(GatewayError(404, "not_found", f"No route for {request.method} {request.path}."))
        if exc.status == 405:
            return error_response(
                GatewayError(405, "method_not_allowed", f"{request.method} is not allowed on {request.path}.")
            )
        raise
    except Exception:
        log.exception("unhandled error")
        return error_response(GatewayError(500, "internal_error", "The gateway failed to handle the request."))


async def _stamp_request_id(request: web.Request, response: web.StreamResponse) -> None:
    request_id = request.get(REQUEST_ID_KEY)
    if request_id:
        response.headers["x-request-id"] = request_id


# -- request helpers --------------------------------------------------------


async def read_body(request: web.Request, limit: int) -> bytes:
    declared = request.content_length  # parsed from the header at each access
    if declared is not None:
        if declared > limit:
            raise _too_large(limit)
        return await request.read()  # the declared length caps what aiohttp reads
    chunks = []
    size = 0
    async for chunk in request.content.iter_any():
        size += len(chunk)
        if size > limit:
            raise _too_large(limit)
        chunks.append(chunk)
    return b"".join(chunks)


def _too_large(limit: int) -> GatewayError:
    return GatewayError(413, "request_too_large", f"The request body is larger than {limit} bytes.")


def _prompt_text_count(parsed: ParsedRequest) -> int:
    payload = parsed.payload
    if parsed.endpoint == CHAT:
        return count_chat_prompt(parsed.model, payload["messages"])
    if parsed.endpoint == COMPLETIONS:
        return count_prompt(parsed.model, payload["prompt"])
    return count_prompt(parsed.model, payload["input"])


def _input_texts(parsed: ParsedRequest) -> list[tuple[dict[str, Any] | list[Any], Any]]:
    """The (container, key) pairs holding the prompt's text, so a redaction can write back."""
    payload = parsed.payload
    slots: list[tuple[Any, Any]] = []
    if parsed.endpoint == CHAT:
        for message in payload["messages"]:
            content = message.get("content")
            if isinstance(content, str):
                slots.append((message, "content"))
            elif isinstance(content, list):
                slots.extend((part, "text") for part in content if part.get("type") == "text")
    else:
        name = "prompt" if parsed.endpoint == COMPLETIONS else "input"
        value = payload[name]
        if isinstance(value, str):
            slots.append((payload, name))
        elif isinstance(value, list):
            slots.extend((value, i) for i, item in enumerate(value) if isinstance(item, str))
    return slots


def _moderate_input(runtime: Runtime, parsed: ParsedRequest, record: RequestRecord) -> bool:
    """Moderate every prompt text in place; raise on a block. Returns whether anything changed."""
    assert runtime.moderation is not None
    changed = False
    for container, key in _input_texts(parsed):
        text = container[key]
        result = runtime.moderation.moderate(text, "input")
        record.add_actions(result.actions, "input")
        if result.blocked is not None:
            record.prompt_tokens = 0  # nothing went upstream
            raise GatewayError(
                400,
                "content_filter",
                f"The prompt was blocked by the moderation rule {result.blocked.rule!r}.",
                "messages" if parsed.endpoint == CHAT else None,
            )
        if result.text != text:
            container[key] = result.text
            changed = True
    return changed


# -- handlers ---------------------------------------------------------------


async def metrics(request: web.Request) -> web.Response:
    body = request.app[GATEWAY].metrics.exposition()
    return web.Response(body=body, headers={hdrs.CONTENT_TYPE: METRICS_CONTENT_TYPE})


async def healthz(request: web.Request) -> web.Response:
    return json_response({"status": "ok"})


async def readyz(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    if gateway.shutting_down:
        return json_response({"status": "shutting_down"}, status=503)
    if not await gateway.quotas.ready():
        return json_response({"status": "store_unavailable"}, status=503)
    return json_response({"status": "ready"})


async def list_models(request: web.Request) -> web.Response:
    gateway = request.app[GATEWAY]
    _refuse_when_shutting_down(gateway)
    runtime = gateway.runtime
    caller = runtime.keyring.authenticate(request.headers.get(hdrs.AUTHORIZATION))
    names: dict[str, str] = {}
    for upstream in runtime.router.upstreams:
        for glob in upstream.config.models:
            if not any(ch in glob for ch in "*?[") and caller.may_use(glob):
                names.setdefault(glob, upstream.name)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner} for name, owner in names.items()]
    return json_response({"object": "list", "data": data})


def _require_admin(request: web.Request) -> None:
    runtime = request.app[GATEWAY].runtime
    if runtime.settings.admin.key_sha256 is None:
        raise GatewayError(404, "not_found", "The admin API is disabled: no admin key is configured.")
    if not runtime.keyring.is_admin(request.headers.get(hdrs.AUTHORIZATION)):
        raise GatewayError(401, "invalid_api_key", "The admin API needs the admin key.")


async def admin_reload(request: web.Request) -> web.Response:
    """``POST /admin/reload``: re-read the config file; a bad one is refused and the old one stays."""
    _require_admin(request)
    problems = await request.app[GATEWAY].reload()
    if problems:
        raise GatewayError(400, "invalid_config", "The new config was refused: " + "; ".join(problems))
    return json_response({"status": "reloaded"})


async def admin_usage(request: web.Request) -> web.Response:
    """``GET /admin/usage?team=&key=&period=day|month``: the ledger's totals, admin key only."""
    _require_admin(request)
    period = request.query.get("period") or None
    if period not in (None, "day", "month"):
        raise invalid_request("'period' must be 'day' or 'month'.", "period")
    try:
        report = await request.app[GATEWAY].quotas.store.usage(
            now=time.time(), team=request.query.get("team") or None, key=request.query.get("key") or None
        )
    except StoreUnavailable:
        raise GatewayError(503, "store_unavailable", "The usage store is unavailable.") from None
    return json_response(report.to_dict(period))


def _refuse_when_shutting_down(gateway: Gateway) -> None:
    if gateway.shutting_down:
        raise GatewayError(503, "shutting_down", "The gateway is shutting down; retry on another replica.")


def _authorize(runtime: Runtime, caller: Caller, model: str) -> list[Upstream]:
    if not caller.may_use(model):
        raise GatewayError(
            403, "model_not_allowed", f"The team {caller.team_name!r} may not use the model {model!r}.", "model"
        )
    return runtime.router.route(model)


# Models that take only ``max_completion_tokens`` (OpenAI's reasoning families).
_COMPLETION_TOKENS_ONLY = re.compile(r"^(o\d|gpt-5)")
# Above this many body bytes, counting and moderating the prompt move off the event loop.
_LARGE_BODY_BYTES = 64 * 1024
T = TypeVar("T")


def _requested_max_tokens(parsed: ParsedRequest, default: int) -> int:
    """Completion tokens to reserve for the whole request (every choice)."""
    if parsed.endpoint == EMBEDDINGS:
        return 0
    payload = parsed.payload
    per_choice = payload.get("max_completion_tokens") or payload.get("max_tokens") or default
    return per_choice * parsed.n


def _answer_cap(parsed: ParsedRequest, reservation: Reservation) -> dict[str, Any]:
    """The answer length the budgets allow, as the field to set upstream, so no answer can overspend."""
    payload = parsed.payload
    per_choice = max(1, reservation.max_tokens // parsed.n)
    if "max_completion_tokens" in payload or (
        "max_tokens" not in payload and parsed.endpoint == CHAT and _COMPLETION_TOKENS_ONLY.match(parsed.model)
    ):
        return {"max_completion_tokens": per_choice}
    return {"max_tokens": per_choice}


def _upstream_body(parsed: ParsedRequest, body: bytes, prompt_changed: bool, fields: dict[str, Any]) -> bytes:
    """What goes upstream: the client's bytes, with the gateway's ``fields`` set and the prompt as moderation left it.

    ``parsed.payload`` is updated to match. When the fields are all new to the
    body and the prompt is unchanged, they are written in front of the
    client's own bytes instead of re-encoding the whole payload: a large
    prompt is not encoded again on the event loop, and the client's numbers
    and escapes reach the provider exactly as sent.
    """
    payload = parsed.payload
    if parsed.stream and not parsed.client_wants_usage:
        # Ask for usage so tokens are counted by the provider; the chunk is hidden from the client.
        fields = {**fields, "stream_options": {**(payload.get("stream_options") or {}), "include_usage": True}}
    if not prompt_changed and not fields:
        return body
    spliced = None if prompt_changed or not fields.keys().isdisjoint(payload) else with_leading_members(body, fields)
    payload.update(fields)
    if "max_completion_tokens" in fields:
        payload.pop("max_tokens", None)  # the reasoning models refuse both
    return spliced if spliced is not None else json.dumps(payload).encode()


def with_leading_members(body: bytes, members: dict[str, Any]) -> bytes | None:
    """``body``, a JSON object without any of ``members``' names, with them added at its start.

    None when the bytes are not UTF-8 (``json.loads`` also reads UTF-16 and
    UTF-32, and a UTF-8 BOM) or do not start with ``{``.
    """
    start = len(body) - len(body.lstrip(b" \t\r\n"))
    if body[start : start + 1] != b"{" or json.detect_encoding(body) != "utf-8":
        return None
    added = json.dumps(members).encode()  # the default spelling: its encoder is built once, not per call
    return body[: start + 1] + added[1:-1] + b"," + body[start + 1 :]


async def _off_loop_if_large(body_size: int, work: Callable[..., T], *args: Any) -> T:
    """Run CPU-bound work on a large prompt in a thread, so it stalls no other client."""
    if body_size > _LARGE_BODY_BYTES:
        return await asyncio.to_thread(work, *args)
    return work(*args)


def _usage_from(usage: Any) -> tuple[int, int] | None:
    if not isinstance(usage, dict):
        return None
    prompt, completion = usage.get("prompt_tokens"), usage.get("completion_tokens", 0)
    if isinstance(prompt, int) and isinstance(completion, int):
        return prompt, completion
    return None


def proxy_handler(endpoint: str) -> Any:
    async def handler(request: web.Request) -> web.StreamResponse:
        gateway = request.app[GATEWAY]
        runtime = gateway.request_started()  # this request keeps the config it started with
        record = RequestRecord(request[REQUEST_ID_KEY], endpoint)
        admitted = False
        reservation: Reservation | None = None
        try:
            _refuse_when_shutting_down(gateway)
            caller = runtime.keyring.authenticate(request.headers.get(hdrs.AUTHORIZATION))
            record.team, record.key = caller.team_name, caller.key_id
            body = await read_body(request, runtime.settings.server.max_body_bytes)
            parsed = parse_request(endpoint, body)
            record.model, record.stream = parsed.model, parsed.stream
            candidates = _authorize(runtime, caller, parsed.model)
            record.upstream = candidates[0].name
            record.prompt_tokens = await _off_loop_if_large(len(body), _prompt_text_count, parsed)
            requested = _requested_max_tokens(parsed, runtime.settings.accounting.default_max_tokens)
            reservation = await gateway.quotas.reserve(caller, record.prompt_tokens, requested)
            admitted = True
            extra_headers = reservation.headers() if reservation is not None else {}
            prompt_changed = runtime.moderates("input") and await _off_loop_if_large(
                len(body), _moderate_input, runtime, parsed, record
            )
            fields: dict[str, Any] = {}
            if reservation is not None and endpoint != EMBEDDINGS and limits_tokens(caller):
                fields = _answer_cap(parsed, reservation)
            upstream_body = _upstream_body(parsed, body, prompt_changed, fields)
            if parsed.stream:
                response = await _forward_stream(request, runtime, candidates, parsed, upstream_body, record, extra_headers)
            else:
                response = await _forward_whole(request, runtime, candidates, parsed, upstream_body, record)
                response.headers.update(extra_headers)
            # A client that left mid-stream is a 499 however it was noticed (a failed write or a cancel).
            record.status = 499 if record.error == "client_closed_request" else response.status
            return response
        except GatewayError as exc:
            record.status, record.error = exc.status, exc.code
            if isinstance(exc, QuotaRejected):
                record.quota_limit = exc.limit
            elif isinstance(exc, UpstreamFailure):
                record.upstream_error = exc.kind
                if exc.never_sent:
                    record.prompt_tokens = 0  # nothing reached the provider
            raise
        except asyncio.CancelledError:
            record.status, record.error = 499, "client_closed_request"
            raise
        finally:
            gateway.request_ended(runtime)
            if admitted:
                gateway.quotas.settle(reservation, record.ledger_entry())
            # The metric samples and the log line are bookkeeping, not part of the answer:
            # they run on the loop's next turn, once aiohttp has sent the response.
            asyncio.get_running_loop().call_soon(_record_request, gateway, record)

    handler.__name__ = f"proxy_{endpoint.replace('.', '_')}"
    return handler


def _record_request(gateway: Gateway, record: RequestRecord) -> None:
    gateway.metrics.observe(record)
    if record.upstream_error:
        log.warning("upstream error", upstream=record.upstream, kind=record.upstream_error, status=record.status)
    log_request(record.fields, record.request_id)


async def _open_upstream(
    request: web.Request, runtime: Runtime, candidates: list[Upstream], parsed: ParsedRequest, body: bytes, record: RequestRecord
) -> tuple[Upstream, aiohttp.ClientResponse]:
    metrics = request.app[GATEWAY].metrics
    server = runtime.settings.server

    def retried(upstream: Upstream) -> None:
        metrics.upstream_retries.labels(upstream.name).inc()
        log.warning("upstream failed before answering; trying the next", upstream=upstream.name)

    try:
        upstream, resp = await send_with_failover(
            candidates,
            _PATHS[parsed.endpoint],
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


async def _read_whole(upstream: Upstream, resp: aiohttp.ClientResponse) -> bytes:
    try:
        return await resp.read()
    except (aiohttp.ServerTimeoutError, TimeoutError):
        raise upstream_timeout(upstream.name) from None
    except aiohttp.ClientError as exc:
        raise upstream_broken(upstream.name, exc) from None


async def _forward_whole(
    request: web.Request,
    runtime: Runtime,
    candidates: list[Upstream],
    parsed: ParsedRequest,
    body: bytes,
    record: RequestRecord,
) -> web.Response:
    sent = time.monotonic()
    upstream, resp = await _open_upstream(request, runtime, candidates, parsed, body, record)
    async with resp:
        answer = await _read_whole(upstream, resp)
        status, upstream_headers = resp.status, resp.headers
    record.upstream_wait = time.monotonic() - sent
    out_headers = forwarded_response_headers(upstream_headers)
    if status == 200:
        answer = _settle_whole_answer(runtime, parsed, answer, record)
    if status >= 500:
        record.upstream_error = "http_5xx"
    record.overhead_seconds = time.monotonic() - record.started - record.upstream_wait
    out_headers["x-sluice-overhead-ms"] = f"{record.overhead_seconds * 1000:.2f}"
    return web.Response(body=answer, status=status, headers=out_headers)


def _settle_whole_answer(runtime: Runtime, parsed: ParsedRequest, answer: bytes, record: RequestRecord) -> bytes:
    """Moderate and count a whole 200 answer; return the bytes to send."""
    try:
        document = json.loads(answer)
    except ValueError:
        raise upstream_bad_answer("The upstream answered with a body that is not JSON.") from None
    if not isinstance(document, dict):
        raise upstream_bad_answer("The upstream answered with a body that is not a JSON object.")
    usage = _usage_from(document.get("usage"))
    if usage is None:
        usage = (record.prompt_tokens, _count_whole_completion(parsed, document))
    record.prompt_tokens, record.completion_tokens = usage
    if parsed.endpoint != EMBEDDINGS and runtime.moderates("output"):
        actions, _ = moderate_whole_answer(document, runtime.moderation, chat=parsed.endpoint == CHAT)
        record.add_actions(actions, "output")
        if actions:
            return json.dumps(document).encode()
    return answer


def _count_whole_completion(parsed: ParsedRequest, document: dict[str, Any]) -> int:
    total = 0
    for choice in document.get("choices") or ():
        if not isinstance(choice, dict):
            continue
        holder = choice.get("message") if parsed.endpoint == CHAT else choice
        text = holder.get("content" if parsed.endpoint == CHAT else "text") if isinstance(holder, dict) else None
        if isinstance(text, str):
            total += count_text(parsed.model, text)
    return total


async def _forward_stream(
    request: web.Request,
    runtime: Runtime,
    candidates: list[Upstream],
    parsed: ParsedRequest,
    body: bytes,
    record: RequestRecord,
    extra_headers: dict[str, str],
) -> web.StreamResponse:
    server = runtime.settings.server
    upstream, resp = await _open_upstream(request, runtime, candidates, parsed, body, record)
    rewriter: StreamRewriter | None = None
    outcome: StreamOutcome | None = None
    active_streams = request.app[GATEWAY].metrics.active_streams
    streaming = False
    try:
        if resp.status != 200 or "text/event-stream" not in resp.headers.get(hdrs.CONTENT_TYPE, ""):
            # An upstream error (or an answer that is not a stream) passes through as it came.
            answer = await _read_whole(upstream, resp)
            if resp.status >= 500:
                record.upstream_error = "http_5xx"
            return web.Response(
                body=answer, status=resp.status, headers={**forwarded_response_headers(resp.headers), **extra_headers}
            )
        response = web.StreamResponse(
            status=200,
            headers={
                **forwarded_response_headers(resp.headers),
                hdrs.CONTENT_TYPE: "text/event-stream",
                hdrs.CACHE_CONTROL: "no-cache",
                "x-accel-buffering": "no",
                **extra_headers,
            },
        )
        await response.prepare(request)
        active_streams.inc()
        streaming = True
        rewriter = StreamRewriter(runtime.moderation, chat=parsed.endpoint == CHAT, client_wants_usage=parsed.client_wants_usage)
        outcome = await relay_stream(
            resp,
            response,
            rewriter,
            keepalive_seconds=server.keepalive_seconds,
            read_timeout_seconds=upstream.config.read_timeout_seconds,
            max_event_bytes=server.max_event_bytes,
        )
        if outcome.first_text_at is not None:
            record.ttft_ms = (outcome.first_text_at - record.started) * 1000
        record.error = outcome.error or ("client_closed_request" if outcome.client_gone else None)
        if outcome.error:
            record.upstream_error = "mid_stream_timeout" if outcome.error == "upstream_timeout" else "mid_stream"
        if not outcome.client_gone:
            try:
                await response.write_eof()
            except (ConnectionError, RuntimeError):
                pass
        return response
    finally:
        if streaming:
            active_streams.dec()
        if outcome is not None and outcome.completed:
            resp.release()
        else:
            # A block, an error or a client that left: drop the upstream connection at once.
            resp.close()
        if rewriter is not None:
            # Also when the client left (the handler is being cancelled): what was sent counts.
            record.add_actions(rewriter.actions, "output")
            usage = _usage_from(rewriter.usage)
            if usage is None:
                usage = (record.prompt_tokens, sum(count_text(parsed.model, t) for t in rewriter.completion_texts()))
            record.prompt_tokens, record.completion_tokens = usage


_PATHS = {CHAT: "/chat/completions", COMPLETIONS: "/completions", EMBEDDINGS: "/embeddings"}


# -- the application --------------------------------------------------------


def create_app(settings: Settings, config_path: str | Path | None = None) -> web.Application:
    app = web.Application(middlewares=[error_middleware], client_max_size=settings.server.max_body_bytes + 1)
    gateway = Gateway(settings, config_path)
    app[GATEWAY] = gateway
    app.on_response_prepare.append(_stamp_request_id)

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
    app.router.add_post("/v1/chat/completions", proxy_handler(CHAT))
    app.router.add_post("/v1/completions", proxy_handler(COMPLETIONS))
    app.router.add_post("/v1/embeddings", proxy_handler(EMBEDDINGS))
    return app


def create_metrics_app(gateway: Gateway) -> web.Application:
    """The /metrics endpoint alone, for ``server.metrics_port``."""
    app = web.Application()
    app[GATEWAY] = gateway
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
        self._runners: list[web.AppRunner] = []

    @property
    def gateway(self) -> Gateway:
        return self.app[GATEWAY]

    async def start(self, sockets: Sequence[socket.socket] = (), metrics_sockets: Sequence[socket.socket] = ()) -> None:
        """Listen on host and port, or on ``sockets`` already bound (a worker's, handed down by its supervisor)."""
        runner = web.AppRunner(
            self.app,
            handler_cancellation=True,  # a client that leaves cancels its handler, and so the upstream call
            shutdown_timeout=1.0,  # stop() has already given in-flight requests their grace period
            access_log=None,
        )
        await runner.setup()
        self._runners.append(runner)
        self.port = await _listen(runner, self.host, self.port, sockets)
        if self.metrics_port is not None:
            metrics_runner = web.AppRunner(create_metrics_app(self.gateway), access_log=None)
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


async def _listen(runner: web.AppRunner, host: str, port: int, sockets: Sequence[socket.socket] = ()) -> int:
    """Listen on ``host:port``, or on bound ``sockets`` when given; returns the port."""
    if sockets:
        for sock in sockets:
            await web.SockSite(runner, sock, backlog=LISTEN_BACKLOG).start()
        return sockets[0].getsockname()[1]
    site = web.TCPSite(runner, host, port, reuse_address=True, backlog=LISTEN_BACKLOG)
    await site.start()
    server = site._server
    return server.sockets[0].getsockname()[1] if port == 0 and server else port  # type: ignore[union-attr]


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
