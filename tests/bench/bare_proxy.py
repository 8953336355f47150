"""The floor: an aiohttp pass-through with nothing of a gateway in it, for the benchmark suite.

    python -m tests.bench.bare_proxy --port P --route MODEL=http://127.0.0.1:Q/v1 [--route ...]

It does what any aiohttp gateway must do and nothing more: read the request,
pick the upstream by model, send it on one pooled connection, and copy the
answer back (a stream chunk by chunk, as it arrives). The suite runs it
beside Sluice so the table separates what the HTTP stack costs on this
machine from what Sluice adds on top (auth, limits, moderation, counting,
logs, metrics). No auth, no error handling worth the name: not for use.
"""

from __future__ import annotations

import argparse
import asyncio
import json

import aiohttp
from aiohttp import web

from proxy.cli import run_event_loop
from proxy.app import LISTEN_BACKLOG

ROUTES = web.AppKey("routes", dict)
SESSION = web.AppKey("session", aiohttp.ClientSession)
# What a gateway must pass back for the suite to see the model's own time.
PASSED_HEADERS = ("Content-Type", "openai-processing-ms")


async def chat(request: web.Request) -> web.StreamResponse:
    body = await request.read()
    upstream = request.app[ROUTES][json.loads(body)["model"]] + "/chat/completions"
    headers = {"Content-Type": "application/json", "Authorization": "Bearer bare"}
    async with request.app[SESSION].post(upstream, data=body, headers=headers) as answer:
        if "text/event-stream" not in answer.headers.get("Content-Type", ""):
            headers = {name: answer.headers[name] for name in PASSED_HEADERS if name in answer.headers}
            return web.Response(body=await answer.read(), status=answer.status, headers=headers)
        response = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await response.prepare(request)
        while data := await answer.content.readany():
            await response.write(data)
        await response.write_eof()
        return response


async def serve(port: int, routes: dict[str, str]) -> None:
    """Serve until killed (the suite stops it with SIGTERM)."""
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=0)) as session:
        app = web.Application()
        app[ROUTES], app[SESSION] = routes, session
        app.router.add_post("/v1/chat/completions", chat)
        app.router.add_get("/healthz", healthz)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        await web.TCPSite(runner, "127.0.0.1", port, backlog=LISTEN_BACKLOG).start()
        await asyncio.Event().wait()


async def healthz(request: web.Request) -> web.Response:
    return web.Response(text="ok")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--port", type=int, required=True)
    parser.add_argument("--route", action="append", default=[], help="MODEL=BASE_URL (repeatable)")
    args = parser.parse_args()
    routes = dict(route.split("=", 1) for route in args.route)
    run_event_loop(serve(args.port, routes))


if __name__ == "__main__":
    main()
