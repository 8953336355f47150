"""``sluice demo``: the mock model and the gateway in one process, ready for curl."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
from pathlib import Path

from aiohttp import web

from proxy.config import ConfigError, load_settings
from proxy.logs import configure_logging
from proxy.app import GatewayServer

from .mock import create_mock_app

DEMO_KEY = "sk-sluice-demo"
# The key the gateway sends to the mock's Anthropic side (which, as the real
# API, refuses a request without one); config/demo.yaml names this variable.
DEMO_UPSTREAM_KEY_ENV = "SLUICE_DEMO_UPSTREAM_KEY"
_DEMO_CONFIG = "config/demo.yaml"


def demo_config_path() -> Path:
    """config/demo.yaml in the working directory, else in the source checkout."""
    here = Path(_DEMO_CONFIG)
    if here.exists():
        return here
    return Path(__file__).resolve().parents[2] / _DEMO_CONFIG


def banner(base: str, path: Path) -> str:
    """What the demo prints: the key, and a curl line per API (each one a command that runs as printed)."""
    auth = f'-H "Authorization: Bearer {DEMO_KEY}" -H "Content-Type: application/json"'
    return f"""
Sluice demo: the gateway on {base}, a mock model behind it (config: {path}).
Demo key: {DEMO_KEY}

Stream an answer (the mock model echoes your last message, word by word):

  curl -N {base}/v1/chat/completions \\
    {auth} \\
    -d '{{"model": "gpt-4o-mini", "stream": true, "messages": [{{"role": "user", "content": "Hello from Sluice! Mail me at jane@example.com"}}]}}'

The same through OpenAI's Responses API:

  curl -N {base}/v1/responses \\
    {auth} \\
    -d '{{"model": "gpt-4o-mini", "stream": true, "input": "Hello from Sluice! Mail me at jane@example.com"}}'

And through Anthropic's Messages API (a claude-* model, routed to an upstream with api: anthropic):

  curl -N {base}/v1/messages \\
    -H "x-api-key: {DEMO_KEY}" -H "anthropic-version: 2023-06-01" -H "Content-Type: application/json" \\
    -d '{{"model": "claude-sonnet-4-5", "max_tokens": 256, "stream": true, "messages": [{{"role": "user", "content": "Hello from Sluice! Mail me at jane@example.com"}}]}}'

Press Ctrl-C to stop.
"""


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_demo(port: int, delay_ms: float) -> int:
    path = demo_config_path()
    os.environ.setdefault(DEMO_UPSTREAM_KEY_ENV, "sk-mock-upstream-demo")
    try:
        settings = load_settings(path)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem)
        return 1
    mock_runner = web.AppRunner(create_mock_app(delay_ms=delay_ms), access_log=None)
    await mock_runner.setup()
    mock_port = _free_port()
    await web.TCPSite(mock_runner, "127.0.0.1", mock_port).start()
    upstreams = [u.model_copy(update={"base_url": f"http://127.0.0.1:{mock_port}/v1"}) for u in settings.upstreams]
    settings = settings.model_copy(update={"upstreams": upstreams})
    configure_logging(settings.logging.level, settings.logging.format)
    server = GatewayServer(settings, port=port)
    try:
        await server.start()
    except OSError as exc:
        print(f"sluice demo: cannot listen on port {port}: {exc.strerror or exc}; try --port")
        await mock_runner.cleanup()
        return 1
    print(banner(f"http://{server.host}:{server.port}", path), flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    await mock_runner.cleanup()
    return 0
