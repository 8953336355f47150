"""``sluice demo``: the mock model and the gateway in one process, ready for curl."""

from __future__ import annotations

import asyncio
import signal
import socket
from pathlib import Path

from aiohttp import web

from .config import ConfigError, load_settings
from .logs import configure_logging
from .mock_upstream import create_mock_app
from .app import GatewayServer

DEMO_KEY = "sk-sluice-demo"
_DEMO_CONFIG = "config/demo.yaml"


def demo_config_path() -> Path:
    """config/demo.yaml in the working directory, else in the source checkout."""
    here = Path(_DEMO_CONFIG)
    if here.exists():
        return here
    return Path(__file__).resolve().parent.parent / _DEMO_CONFIG


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


async def run_demo(port: int, delay_ms: float) -> int:
    path = demo_config_path()
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
    base = f"http://{server.host}:{server.port}"
    print(
        f"""
Sluice demo: the gateway on {base}, a mock model behind it (config: {path}).
Demo key: {DEMO_KEY}

Stream an answer (the mock model echoes your last message, word by word):

  curl -N {base}/v1/chat/completions \\
    -H "Authorization: Bearer {DEMO_KEY}" -H "Content-Type: application/json" \\
    -d '{{"model": "gpt-4o-mini", "stream": true, "messages": [{{"role": "user", "content": "Hello from Sluice! Mail me at jane@example.com"}}]}}'

Press Ctrl-C to stop.
""",
        flush=True,
    )
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    await server.stop()
    await mock_runner.cleanup()
    return 0
