"""What every request goes through: its id, the client's key, its body, and errors in the caller's shape.

Every failure a handler raises is a ``GatewayError``; the middleware renders
it in the shape of the API the caller speaks (the format adapter's
``error_body``, OpenAI's by default), so no handler formats an error by hand
and no stack trace reaches a client.
"""

from __future__ import annotations

import os
import re
from typing import Any

import structlog
from aiohttp import hdrs, web

from . import jsonio
from .errors import GatewayError
from .formats import WireFormat
from .gateway import Gateway
from .logs import log

_REQUEST_ID = re.compile(r"^[A-Za-z0-9._-]{1,128}$")
REQUEST_ID_KEY = web.RequestKey("request_id", str)
FORMAT_KEY = web.RequestKey("format", WireFormat)
GATEWAY = web.AppKey("gateway", Gateway)
_JSON = "application/json"
# The one Server header every response carries: no versions for a scanner to match.
SERVER_NAME = "sluice"


def _request_id(request: web.Request) -> str:
    given = request.headers.get("x-request-id")
    if given and _REQUEST_ID.match(given):
        return given
    return os.urandom(16).hex()  # as random as uuid4().hex, without building a UUID


def client_key(request: web.Request) -> str | None:
    """The client's ``Authorization`` header, or its ``x-api-key`` (Anthropic's clients) as a Bearer key."""
    authorization = request.headers.get(hdrs.AUTHORIZATION)
    if authorization is None:
        api_key = request.headers.get("x-api-key")
        if api_key:
            return f"Bearer {api_key}"
    return authorization


def json_response(body: Any, status: int = 200, headers: dict[str, str] | None = None) -> web.Response:
    return web.Response(body=jsonio.dumps(body), status=status, content_type=_JSON, headers=headers)


def error_response(error: GatewayError, fmt: WireFormat | None = None) -> web.Response:
    body = fmt.error_body(error) if fmt is not None else error.body_bytes()
    return web.Response(body=body, status=error.status, content_type=_JSON, headers=error.headers)


@web.middleware
async def error_middleware(request: web.Request, handler: Any) -> web.StreamResponse:
    """Give every request an id and turn every failure into an error in the caller's shape."""
    request_id = _request_id(request)
    request[REQUEST_ID_KEY] = request_id
    structlog.contextvars.clear_contextvars()
    structlog.contextvars.bind_contextvars(request_id=request_id)
    try:
        return await handler(request)
    except GatewayError as exc:
        return error_response(exc, request.get(FORMAT_KEY))
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
        error = GatewayError(500, "internal_error", "The gateway failed to handle the request.")
        return error_response(error, request.get(FORMAT_KEY))


async def stamp_headers(request: web.Request, response: web.StreamResponse) -> None:
    """Every response: its request id, and the gateway's name instead of aiohttp's versions."""
    request_id = request.get(REQUEST_ID_KEY)
    if request_id:
        response.headers["x-request-id"] = request_id
    response.headers[hdrs.SERVER] = SERVER_NAME


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
