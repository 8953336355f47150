"""A gateway in a child process (``sluice serve``), for tests of process-level behaviour."""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import sys
from pathlib import Path

import aiohttp
import yaml

from conftest import UPSTREAM_KEY, free_port

ROOT = Path(__file__).resolve().parent.parent


class GatewayProcess:
    """``sluice serve`` in a child process, on its own port."""

    def __init__(self, config: dict, path: Path, open_files_soft_limit: int | None = None):
        self.open_files_soft_limit = open_files_soft_limit  # start the child with this RLIMIT_NOFILE soft limit
        self.port = free_port()
        config = json.loads(json.dumps(config))
        config["server"]["port"] = self.port
        path.write_text(yaml.safe_dump(config))
        self.path = path
        self.url = f"http://127.0.0.1:{self.port}"
        self.process: asyncio.subprocess.Process | None = None
        # A file, not a pipe: a pipe nobody reads fills at 64 KB and then blocks the gateway's every log write.
        self.stderr_path = path.with_suffix(".stderr")

    async def __aenter__(self) -> "GatewayProcess":
        with open(self.stderr_path, "wb") as stderr:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", str(self.path),
                stdout=asyncio.subprocess.DEVNULL, stderr=stderr, cwd=ROOT,
                env={**os.environ, "SLUICE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
                preexec_fn=self._limit_open_files if self.open_files_soft_limit else None,
            )
        async with aiohttp.ClientSession() as session:
            for _ in range(400):
                assert self.process.returncode is None, self.stderr()
                try:
                    async with session.get(self.url + "/readyz") as resp:
                        if resp.status == 200:
                            return self
                except aiohttp.ClientConnectionError:
                    pass
                await asyncio.sleep(0.05)
        raise AssertionError("the gateway did not become ready")

    def stderr(self) -> str:
        """What the gateway has written to its stderr so far."""
        return self.stderr_path.read_text(errors="replace")

    def _limit_open_files(self) -> None:
        _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
        resource.setrlimit(resource.RLIMIT_NOFILE, (self.open_files_soft_limit, hard))

    async def __aexit__(self, *exc_info) -> None:
        await self.stop()

    async def stop(self, sig: int = signal.SIGTERM) -> int:
        assert self.process is not None
        if self.process.returncode is None:
            self.process.send_signal(sig)
        return await asyncio.wait_for(self.process.wait(), 20)
