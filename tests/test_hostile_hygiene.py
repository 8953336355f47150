"""Malformed HTTP, answered in OpenAI's shape without echoing it; no Server header with versions, anywhere.

aiohttp answers what it cannot parse itself, as plain text that repeats
the offending bytes (a reflected-content hazard, and a fingerprint), with
``Server: Python/3.x aiohttp/3.x``. These go over raw sockets, to the main
port and to the metrics port.
"""

from __future__ import annotations

import json

import pytest
from conftest import gateway_config
from hostile import raw_exchange, split_response

MARKER = "zq<script>alert(1)</script>"
MALFORMED = [
    pytest.param(f"GET / HTTP/1.1\r\nHost: x\r\nBad{MARKER}: 1\r\n\r\n".encode(), id="bad-header-name"),
    pytest.param(f"GET /{MARKER} HTTP/9.9\r\nHost: x\r\n\r\n".encode(), id="bad-version"),
    pytest.param(f"{MARKER} / HTTP/1.1\r\nHost: x\r\n\r\n".encode(), id="bad-method"),
    pytest.param(b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03" + MARKER.encode() + b"\r\n\r\n", id="tls-hello"),
    pytest.param(b"GET / HTTP/1.1\r\nHost: x\r\nX-Long: " + b"a" * 20000 + MARKER.encode() + b"\r\n\r\n", id="header-too-long"),
    pytest.param(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 5\r\nContent-Length: 6\r\n\r\n{MARKER}".encode(), id="two-lengths"),
    pytest.param(f"POST / HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\nzz{MARKER}\r\n".encode(), id="bad-chunk"),
]


def _assert_clean_400(raw: bytes) -> None:
    status, headers, body = split_response(raw)
    assert 400 <= status < 500, raw[:200]
    assert headers["server"] == "sluice"
    assert headers["content-type"].startswith("application/json")
    error = json.loads(body)["error"]
    assert error["code"] == "invalid_request" and error["type"] == "invalid_request_error"
    assert set(error) == {"message", "type", "param", "code"}
    assert b"zq" not in raw and b"script" not in raw  # nothing of what was sent comes back


@pytest.mark.parametrize("request_bytes", MALFORMED)
async def test_malformed_http_gets_an_openai_error_without_echo(gateway, request_bytes):
    port = gateway.server.port
    _assert_clean_400(await raw_exchange(port, request_bytes))


async def test_the_metrics_port_is_as_clean(mock_upstream, start_gateway):
    config = gateway_config(mock_upstream.url)
    config["server"]["metrics_port"] = 0
    gateway = await start_gateway(config)
    port = gateway.server.metrics_port
    _assert_clean_400(await raw_exchange(port, f"GET /{MARKER} HTTP/9.9\r\nHost: x\r\n\r\n".encode()))
    for path in ("/metrics", "/nowhere"):
        raw = await raw_exchange(port, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n".encode())
        status, headers, _ = split_response(raw)
        assert status == (200 if path == "/metrics" else 404)
        assert headers["server"] == "sluice"


@pytest.mark.parametrize(
    "request_line",
    ["GET /healthz", "GET /nowhere", "DELETE /v1/chat/completions", "POST /v1/chat/completions", "GET /admin/usage"],
)
async def test_no_version_banner_on_any_answer(gateway, request_line):
    raw = await raw_exchange(
        gateway.server.port, f"{request_line} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\nConnection: close\r\n\r\n".encode()
    )
    _, headers, _ = split_response(raw)
    assert headers["server"] == "sluice"
    assert b"aiohttp" not in raw and b"Python/" not in raw
