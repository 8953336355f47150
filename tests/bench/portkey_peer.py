"""Portkey's open-source AI gateway as a peer for the benchmark suite: same mocks, same load.

Set ``SLUICE_BENCH_PORTKEY`` to a folder where it is installed; ``make_folder``
installs it there from the npm registry:

    mkdir portkey && cd portkey
    # a package.json pinning both (see PACKAGE_JSON), then
    npm install --no-audit --no-fund

It is a Node program (``node_modules/@portkey-ai/gateway/build/start-server.js
--port=N``), one process with one event loop, like Sluice with one worker.
Fairness and pinning choices:

- Version 1.15.2, with ``@hono/node-server`` held at 1.13.5 (an npm
  ``overrides`` entry), as Portkey's own lockfile does: with the newest
  node-server, 1.15.2's streams crash.
- Its defaults otherwise: no config, no cache, no guardrails, no retries.
  It is routed per request by headers, which is how its docs call a
  self-hosted OpenAI-compatible model: ``x-portkey-provider: openai`` and
  ``x-portkey-custom-host: <mock>/v1``; the client's Authorization goes on
  upstream as the provider key. It has no keys of its own, no limits and no
  moderation, so it does less per request than Sluice does.
- It runs offline: nothing it does at start or per request reaches outside.
"""

from __future__ import annotations

import json
import os
import subprocess
from pathlib import Path

PORTKEY_ENV = "SLUICE_BENCH_PORTKEY"
"""Names the folder with ``node_modules/@portkey-ai/gateway``."""

VERSION = "1.15.2"
NODE_SERVER_VERSION = "1.13.5"
HEALTH_PATH = "/"  # "AI Gateway says hey!"
ENTRY = Path("node_modules/@portkey-ai/gateway/build/start-server.js")

PACKAGE_JSON = {
    "name": "sluice-bench-portkey",
    "private": True,
    "dependencies": {"@portkey-ai/gateway": VERSION, "@hono/node-server": NODE_SERVER_VERSION},
    "overrides": {"@hono/node-server": NODE_SERVER_VERSION},
}


def make_folder(folder: Path) -> Path:
    """Install the pinned gateway into ``folder`` (npm) and return it."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "package.json").write_text(json.dumps(PACKAGE_JSON, indent=2), encoding="utf-8")
    subprocess.run(["npm", "install", "--no-audit", "--no-fund"], cwd=folder, check=True)
    return folder


def command(folder: str | os.PathLike[str], port: int) -> list[str]:
    entry = Path(folder) / ENTRY
    if not entry.is_file():
        raise RuntimeError(f"{PORTKEY_ENV}={folder}: no {ENTRY} there (see tests/bench/portkey_peer.py)")
    return ["node", str(entry), f"--port={port}"]


def version(folder: str | os.PathLike[str]) -> str:
    """The installed gateway's version, and node-server's, as the report prints them."""
    def read(package: str) -> str:
        path = Path(folder) / "node_modules" / package / "package.json"
        try:
            return json.loads(path.read_text(encoding="utf-8"))["version"]
        except (OSError, ValueError, KeyError):
            return "?"

    return f"{read('@portkey-ai/gateway')} (@hono/node-server {read('@hono/node-server')})"


def headers(mock_base_url: str) -> dict[str, str]:
    """Per-request routing to the mock that serves the scenario's model."""
    return {
        "x-portkey-provider": "openai",
        "x-portkey-custom-host": mock_base_url,
        "Authorization": "Bearer sk-portkey-bench",
    }
