"""Operations: liveness, readiness, metrics and the models a caller may use."""

from __future__ import annotations

from aiohttp import hdrs, web

from ..metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from ..middleware import GATEWAY, client_key, json_response
from .proxy import refuse_when_shutting_down


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
    refuse_when_shutting_down(gateway)
    runtime = gateway.runtime
    caller = runtime.keyring.authenticate(client_key(request))
    names: dict[str, str] = {}
    for upstream in runtime.router.upstreams:
        for glob in upstream.config.models:
            if not any(ch in glob for ch in "*?[") and caller.may_use(glob):
                names.setdefault(glob, upstream.name)
    data = [{"id": name, "object": "model", "created": 0, "owned_by": owner} for name, owner in names.items()]
    return json_response({"object": "list", "data": data})
