"""The proxy path, left to right as in DESIGN.md.

authenticate -> read and parse (the format's adapter) -> route -> count the
prompt -> reserve against every limit -> moderate the prompt -> cap the
answer -> forward (a whole answer or a stream) -> settle, record, log.

The handler knows the order and the bookkeeping; the adapter knows the
fields; ``forward`` moves the bytes.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

from aiohttp import web

from ..auth import Caller
from ..errors import GatewayError, UpstreamFailure
from ..formats import AnswerContext, ParsedRequest, TextRef, WireFormat
from ..forward import forward_stream, forward_whole, is_stream, open_upstream, read_whole
from ..gateway import Gateway, Runtime
from ..logs import log, log_request
from ..middleware import FORMAT_KEY, GATEWAY, REQUEST_ID_KEY, client_key, read_body
from ..moderation import ModerationResult
from ..prompt_turns import Turns, in_the_prompt_thread
from ..quotas import QuotaRejected, Settlement, limits_tokens
from ..record import RequestRecord
from ..upstream import Upstream, forwarded_response_headers
from ..upstream_body import upstream_body

# Above this many body bytes, the prompt is parsed and counted in the prompt thread and
# moderated in turns (prompt_turns.py); below it, on the loop in one go (at most a few ms).
_LARGE_BODY_BYTES = 16 * 1024


def proxy_handler(fmt: WireFormat) -> Callable[[web.Request], Any]:
    async def handler(request: web.Request) -> web.StreamResponse:
        request[FORMAT_KEY] = fmt
        gateway = request.app[GATEWAY]
        runtime = gateway.request_started()  # this request keeps the config it started with
        record = RequestRecord(request[REQUEST_ID_KEY], fmt.endpoint)
        settlement: Settlement | None = None
        try:
            refuse_when_shutting_down(gateway)
            caller = runtime.keyring.authenticate(client_key(request))
            record.team, record.key = caller.team_name, caller.key_id
            body = await read_body(request, runtime.settings.server.max_body_bytes)
            large = len(body) > _LARGE_BODY_BYTES
            parsed = await in_the_prompt_thread(fmt.parse, body) if large else fmt.parse(body)
            record.model, record.stream = parsed.model, parsed.stream
            candidates = _authorize(runtime, caller, parsed.model, fmt)
            record.upstream = candidates[0].name
            record.prompt_tokens = (
                await in_the_prompt_thread(fmt.prompt_tokens, parsed) if large else fmt.prompt_tokens(parsed)
            )
            requested = fmt.requested_tokens(parsed, runtime.settings.accounting.default_max_tokens)
            reservation = await gateway.quotas.reserve(caller, record.prompt_tokens, requested)
            settlement = Settlement(gateway.quotas, reservation, record.ledger_entry)
            extra_headers = reservation.headers() if reservation is not None else {}
            prompt_changed = runtime.moderates("input") and (
                await _moderate_large_input(fmt, runtime, parsed, record)
                if large
                else _moderate_input(fmt, runtime, parsed, record)
            )
            cap = None
            fields: dict[str, Any] = {}
            if reservation is not None and requested and limits_tokens(caller):
                cap = max(1, reservation.max_tokens // parsed.n)
                try:
                    fmt.check_cap(cap)
                except GatewayError:
                    record.prompt_tokens = 0  # refused before anything went upstream
                    raise
                fields = fmt.cap_fields(parsed, cap)
            if parsed.stream:
                fields = {**fields, **fmt.stream_fields(parsed)}
            outgoing = upstream_body(parsed, body, prompt_changed, fields)
            ctx = AnswerContext(parsed.model, runtime.moderation, parsed.client_wants_usage, cap)
            response = await _forward(
                fmt, parsed, ctx, request, gateway, runtime, candidates, outgoing, record, extra_headers, settlement
            )
            # A client that left mid-stream is a 499 however it was noticed (a failed write or a cancel).
            record.status = 499 if record.error == "client_closed_request" else response.status
            if not parsed.stream:
                await settlement.durably()  # in the ledger before the client has the answer
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
            if settlement is not None:
                settlement.in_background()  # unless it was settled already: a failure, or a client that left
            # The metric samples and the log line are bookkeeping, not part of the answer:
            # they run on the loop's next turn, once aiohttp has sent the response.
            asyncio.get_running_loop().call_soon(_record_request, gateway, record)

    handler.__name__ = f"proxy_{fmt.endpoint.replace('.', '_')}"
    return handler


async def _forward(
    fmt: WireFormat,
    parsed: ParsedRequest,
    ctx: AnswerContext,
    request: web.Request,
    gateway: Gateway,
    runtime: Runtime,
    candidates: list[Upstream],
    body: bytes,
    record: RequestRecord,
    extra_headers: dict[str, str],
    settlement: Settlement,
) -> web.StreamResponse:
    sent_at = time.monotonic()
    upstream, resp = await open_upstream(fmt, request, runtime, gateway.metrics, candidates, body, record)
    if not parsed.stream:
        response = await forward_whole(fmt, parsed, ctx, upstream, resp, runtime, record, sent_at)
        response.headers.update(extra_headers)
        return response
    if not is_stream(resp):
        # An upstream error (or an answer that is not a stream) passes through as it came.
        async with resp:
            answer = await read_whole(upstream, resp, runtime.settings.server.max_response_bytes)
        if resp.status >= 500:
            record.upstream_error = "http_5xx"
        return web.Response(
            body=answer, status=resp.status, headers={**forwarded_response_headers(resp.headers), **extra_headers}
        )
    return await forward_stream(
        fmt, parsed, ctx, request, upstream, resp, runtime, gateway.metrics, record, extra_headers, settlement
    )


def refuse_when_shutting_down(gateway: Gateway) -> None:
    if gateway.shutting_down:
        raise GatewayError(503, "shutting_down", "The gateway is shutting down; retry on another replica.")


def _authorize(runtime: Runtime, caller: Caller, model: str, fmt: WireFormat) -> list[Upstream]:
    if not caller.may_use(model):
        raise GatewayError(
            403, "model_not_allowed", f"The team {caller.team_name!r} may not use the model {model!r}.", "model"
        )
    candidates = [upstream for upstream in runtime.router.route(model) if upstream.config.api == fmt.api]
    if not candidates:
        raise GatewayError(
            400,
            "invalid_request",
            f"The model {model!r} is served by an upstream that does not speak this API ({fmt.path}).",
            "model",
        )
    return candidates


def _moderate_input(fmt: WireFormat, runtime: Runtime, parsed: ParsedRequest, record: RequestRecord) -> bool:
    """Moderate every prompt text in place; raise on a block. Returns whether anything changed."""
    engine = runtime.moderation
    assert engine is not None
    changed = False
    for ref in fmt.input_texts(parsed, input_rules=True):
        text = ref.get()
        changed |= _apply_input(fmt, record, ref, text, engine.moderate(text, "input"))
    return changed


async def _moderate_large_input(fmt: WireFormat, runtime: Runtime, parsed: ParsedRequest, record: RequestRecord) -> bool:
    """``_moderate_input`` in turns of bounded work, so no other client waits behind a big prompt."""
    engine = runtime.moderation
    assert engine is not None
    changed = False
    refs = await in_the_prompt_thread(fmt.input_texts, parsed, True)
    async with Turns() as turns:
        for ref in refs:
            text = ref.get()
            changed |= _apply_input(fmt, record, ref, text, await turns.moderate(engine, text, "input"))
    return changed


def _apply_input(fmt: WireFormat, record: RequestRecord, ref: TextRef, text: str, result: ModerationResult) -> bool:
    """Record a prompt text's moderation; raise on a block; write a change back. Returns whether it changed."""
    record.add_actions(result.actions, "input")
    if result.blocked is not None:
        record.prompt_tokens = 0  # nothing went upstream
        raise fmt.blocked_prompt(result.blocked.rule)
    if result.text != text:
        ref.set(result.text)
        return True
    return False


def _record_request(gateway: Gateway, record: RequestRecord) -> None:
    gateway.metrics.observe(record)
    if record.upstream_error:
        log.warning("upstream error", upstream=record.upstream, kind=record.upstream_error, status=record.status)
    log_request(record.fields, record.request_id)

