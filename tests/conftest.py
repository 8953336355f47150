"""Shared fixtures: a real mock upstream and real gateways, both on loopback ports."""

from __future__ import annotations

import socket
from dataclasses import dataclass
from typing import Any

import pytest
import yaml
from aiohttp import web

pytest_plugins = ["tests.conftest_redis"]

from proxy.auth import hash_key
from proxy.config import load_settings
from proxy.devtools.mock import MOCK_STATE, create_mock_app
from proxy.app import LISTEN_BACKLOG, GatewayServer

ALICE = "sk-test-alice-0123456789"  # team research: every model
BOB = "sk-test-bob-0123456789"  # team interns: gpt-4o-mini only
ADMIN = "sk-test-admin-0123456789"
UPSTREAM_KEY = "sk-upstream-secret-0123456789"


@dataclass
class MockUpstream:
    url: str
    port: int
    state: Any


@dataclass
class Gateway:
    url: str
    server: GatewayServer

    @property
    def v1(self) -> str:
        return self.url + "/v1"


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def start_mock(delay_ms: float = 0.0) -> tuple[web.AppRunner, MockUpstream]:
    app = create_mock_app(delay_ms=delay_ms)
    runner = web.AppRunner(app, access_log=None, handler_cancellation=True)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0, backlog=LISTEN_BACKLOG)
    await site.start()
    port = site._server.sockets[0].getsockname()[1]
    return runner, MockUpstream(f"http://127.0.0.1:{port}/v1", port, app[MOCK_STATE])


@pytest.fixture
async def mock_upstream():
    runner, mock = await start_mock()
    yield mock
    await runner.cleanup()


def gateway_config(upstream_url: str, **sections: Any) -> dict[str, Any]:
    """A complete config for tests; keyword arguments replace whole sections."""
    config: dict[str, Any] = {
        "server": {"host": "127.0.0.1", "port": 0, "shutdown_grace_seconds": 2, "keepalive_seconds": 15},
        "upstreams": [
            {
                "name": "mock",
                "base_url": upstream_url,
                "api_key_env": "SLUICE_TEST_UPSTREAM_KEY",
                "models": ["gpt-4o*", "gpt-4.1", "gpt-3.5-turbo", "text-embedding-3-small", "mock-*"],
                "connect_timeout_seconds": 2,
                "read_timeout_seconds": 5,
            }
        ],
        "teams": [
            {"name": "research", "models": ["*"]},
            {"name": "interns", "models": ["gpt-4o-mini"]},
        ],
        "keys": [
            {"id": "alice", "team": "research", "sha256": hash_key(ALICE)},
            {"id": "bob", "team": "interns", "sha256": hash_key(BOB)},
        ],
        "admin": {"key_sha256": hash_key(ADMIN)},
        "accounting": {"store": "memory"},
        "logging": {"level": "info", "format": "json"},
    }
    config.update(sections)
    return config


@pytest.fixture
async def start_gateway(tmp_path, monkeypatch):
    """Start gateways from config dicts; all are stopped after the test."""
    monkeypatch.setenv("SLUICE_TEST_UPSTREAM_KEY", UPSTREAM_KEY)
    servers: list[GatewayServer] = []

    async def start(config: dict[str, Any]) -> Gateway:
        path = tmp_path / f"sluice-{len(servers)}.yaml"
        path.write_text(yaml.safe_dump(config))
        server = GatewayServer(load_settings(path), host="127.0.0.1", port=0, config_path=path)
        await server.start()
        servers.append(server)
        return Gateway(f"http://127.0.0.1:{server.port}", server)

    yield start
    for server in servers:
        await server.stop()


@pytest.fixture
async def gateway(mock_upstream, start_gateway):
    return await start_gateway(gateway_config(mock_upstream.url))
