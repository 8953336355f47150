"""The mock as an aiohttp app: its routes, its error rendering, and ``run_mock_upstream``."""

from __future__ import annotations

import asyncio
import time
from typing import Awaitable, Callable

from aiohttp import web

from proxy import tokens
from proxy.app import LISTEN_BACKLOG

from .chat import chat_completions
from .completions import completions
from .control import MockError
from .embeddings import embeddings
from .messages import messages
from .responses import responses
from .state import MOCK_STATE, MockState

MOCK_MODELS = (
    "gpt-4o-mini",
    "gpt-4o",
    "gpt-4.1",
    "gpt-3.5-turbo",
    "text-embedding-3-small",
    "mock-model",
    "claude-sonnet-4-5",
)
# A fixed timestamp keeps /v1/models byte-for-byte stable across runs.
_MODELS_CREATED = 1_700_000_000
# The paths whose errors are in Anthropic's shape.
_ANTHROPIC_PATHS = frozenset({"/v1/messages"})


async def list_models(request: web.Request) -> web.Response:
    request.app[MOCK_STATE].record_request(request, None)
    data = [
        {"id": name, "object": "model", "created": _MODELS_CREATED, "owned_by": "sluice-mock"} for name in MOCK_MODELS
    ]
    return web.json_response({"object": "list", "data": data})


async def recorded_requests(request: web.Request) -> web.Response:
    state = request.app[MOCK_STATE]
    return web.json_response({"requests": list(state.requests), "disconnects": state.disconnects})


@web.middleware
async def _errors_and_disconnects(
    request: web.Request, handler: Callable[[web.Request], Awaitable[web.StreamResponse]]
) -> web.StreamResponse:
    """Render MockError in the endpoint's shape; count clients that left before their answer was complete.

    A whole answer carries ``openai-processing-ms``, the model's own time, as
    OpenAI's API does: the benchmarks subtract it to see the time spent
    outside the model (client, network hops, a gateway), without the jitter
    of the mock's own sleep.
    """
    started = time.perf_counter()
    try:
        response = await handler(request)
        if not response.prepared:
            response.headers["openai-processing-ms"] = f"{(time.perf_counter() - started) * 1000:.3f}"
        return response
    except MockError as exc:
        return exc.response("anthropic" if request.path in _ANTHROPIC_PATHS else "openai")
    except asyncio.CancelledError:
        # aiohttp cancels the handler when the client leaves (with handler_cancellation).
        request.app[MOCK_STATE].record_disconnect()
        raise
    except ConnectionResetError:
        request.app[MOCK_STATE].record_disconnect()
        # Nobody will read this; returning (not raising) keeps aiohttp from
        # logging a client's hang-up as a server error.
        return web.Response(status=499)


async def _preload_encodings(app: web.Application) -> None:
    # Off the event loop: the first load takes about a second.
    await asyncio.get_running_loop().run_in_executor(None, tokens.preload)


def create_mock_app(delay_ms: float = 0.0) -> web.Application:
    """The mock as an aiohttp app; ``delay_ms`` paces every streamed chunk and non-streamed answer."""
    app = web.Application(middlewares=[_errors_and_disconnects])
    app[MOCK_STATE] = MockState(delay_ms)
    app.on_startup.append(_preload_encodings)
    app.router.add_post("/v1/chat/completions", chat_completions)
    app.router.add_post("/v1/completions", completions)
    app.router.add_post("/v1/embeddings", embeddings)
    app.router.add_post("/v1/responses", responses)
    app.router.add_post("/v1/messages", messages)
    app.router.add_get("/v1/models", list_models)
    app.router.add_get("/mock/requests", recorded_requests)
    return app


async def run_mock_upstream(host: str, port: int, delay_ms: float) -> None:
    """Serve the mock on ``host:port`` until cancelled."""
    runner = web.AppRunner(create_mock_app(delay_ms), handler_cancellation=True, access_log=None)
    await runner.setup()
    try:
        await web.TCPSite(runner, host, port, backlog=LISTEN_BACKLOG).start()  # benchmarks open thousands of streams
        await asyncio.Event().wait()
    finally:
        await runner.cleanup()
