"""OpenAI-shaped errors: every failure a client sees is one of these.

``GatewayError`` carries the status and the body; handlers raise it and the
error middleware renders it, so no handler formats an error by hand.
"""

from __future__ import annotations

import json
from typing import Any

# The error "type" OpenAI uses for each of our codes; SDKs read status and code.
_TYPE_BY_CODE = {
    "invalid_request": "invalid_request_error",
    "content_filter": "invalid_request_error",
    "request_too_large": "invalid_request_error",
    "invalid_api_key": "authentication_error",
    "model_not_allowed": "permission_error",
    "model_not_found": "invalid_request_error",
    "rate_limit_exceeded": "rate_limit_error",
    "insufficient_quota": "insufficient_quota",
    "upstream_error": "upstream_error",
    "upstream_timeout": "upstream_error",
    "store_unavailable": "server_error",
    "shutting_down": "server_error",
    "internal_error": "server_error",
    "not_found": "invalid_request_error",
    "method_not_allowed": "invalid_request_error",
    "invalid_config": "invalid_request_error",
    "request_timeout": "invalid_request_error",
    "server_busy": "server_error",
}


def error_body(message: str, code: str, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": _TYPE_BY_CODE.get(code, "server_error"), "param": param, "code": code}}


class GatewayError(Exception):
    """A failure with its HTTP status, OpenAI error code and extra response headers."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return error_body(self.message, self.code, self.param)

    def body_bytes(self) -> bytes:
        return json.dumps(self.body()).encode()


def invalid_request(message: str, param: str | None = None) -> GatewayError:
    return GatewayError(400, "invalid_request", message, param)


class UpstreamFailure(GatewayError):
    """A failure of the upstream before the first byte; ``kind`` labels the error metric."""

    def __init__(self, status: int, code: str, message: str, kind: str):
        super().__init__(status, code, message)
        self.kind = kind

    @property
    def never_sent(self) -> bool:
        """No connection was made: the provider never saw the request, so nothing is charged."""
        return self.kind == "connect"
