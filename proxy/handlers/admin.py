"""The admin API: reload the config, read the usage ledger. Admin key only; absent without one."""

from __future__ import annotations

import time

from aiohttp import hdrs, web

from ..accounting import StoreUnavailable
from ..errors import GatewayError, invalid_request
from ..middleware import GATEWAY, json_response


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
    """``GET /admin/usage?team=&key=&period=day|month``: the ledger's totals."""
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
