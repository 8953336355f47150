"""Workers share one stdout: every line a reader of it sees is one whole JSON log line.

``sluice serve --workers 2`` runs with its stdout on a pipe of one page (4096
bytes, PIPE_BUF), the smallest the kernel allows, so a write larger than
PIPE_BUF always blocks part-way, which is when another worker's write gets
in between. Each request line lists many moderation actions (a flag rule
matching many words of the prompt), so two lines of a loop turn already
make more than PIPE_BUF: a batcher that wrote a turn's lines in one write
would have its lines cut by the other worker's.
"""

from __future__ import annotations

import asyncio
import fcntl
import json
import os
import random
import sys

import aiohttp
import pytest

from test_workers import ROOT, Workers, auth, chat, scrape_when, shared_config, total, upstream_url  # noqa: F401 (a fixture)
from conftest import UPSTREAM_KEY

F_SETPIPE_SZ = getattr(fcntl, "F_SETPIPE_SZ", 1031)
PIPE_BUF = 4096
pytestmark = pytest.mark.skipif(not sys.platform.startswith("linux"), reason="sizes a pipe with Linux's F_SETPIPE_SZ")


class OnePagePipeWorkers(Workers):
    """``Workers`` with stdout on a one-page pipe, kept raw: every line read, whether it parses or not."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.raw: list[bytes] = []

    async def start(self) -> "OnePagePipeWorkers":
        self.write_config(self.config)
        read_fd, write_fd = os.pipe()
        assert fcntl.fcntl(write_fd, F_SETPIPE_SZ, PIPE_BUF) == PIPE_BUF
        try:
            self.process = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "proxy", "serve", "--config", str(self.path), "--workers", str(self.workers),
                stdout=write_fd, stderr=asyncio.subprocess.PIPE, cwd=ROOT,
                env={**os.environ, "SLUICE_TEST_UPSTREAM_KEY": UPSTREAM_KEY},
            )
        finally:
            os.close(write_fd)
        self._stdout = asyncio.StreamReader(limit=1 << 20)
        loop = asyncio.get_running_loop()
        await loop.connect_read_pipe(lambda: asyncio.StreamReaderProtocol(self._stdout), os.fdopen(read_fd, "rb", 0))
        self._reader = loop.create_task(self._read())
        return self

    async def _read(self) -> None:
        while line := await self._stdout.readline():
            self.raw.append(line)
            try:
                parsed = json.loads(line)
            except ValueError:
                continue  # counted by the test, which reads self.raw
            self.lines.append(parsed)
            self._new_line.set()


def flagged_prompt(rng: random.Random) -> str:
    """A prompt whose request line comes to 1-3.5 KB: one moderation action per flagged word."""
    return " ".join(["flagme"] * rng.randint(15, 50) + ["plain"] * rng.randint(0, 40))


async def test_two_workers_logging_at_once_never_cut_a_line(upstream_url, redis_url, tmp_path):
    config = shared_config(upstream_url, redis_url)
    config["moderation"] = {
        "rules": [{"name": "flag", "type": "terms", "terms": ["flagme"], "action": "flag", "apply_to": ["input"]}]
    }
    rng = random.Random(23)
    sent = 600
    async with OnePagePipeWorkers(config, tmp_path / "sluice.yaml") as workers:
        pids = workers.pids()
        # Fresh connections (force_close), so the kernel spreads them over both workers; 80 at a time.
        connector = aiohttp.TCPConnector(limit=80, force_close=True)
        async with aiohttp.ClientSession(connector=connector) as session:

            async def one(prompt: str) -> int:
                async with session.post(workers.url + "/v1/chat/completions", json=chat(prompt), headers=auth()) as resp:
                    await resp.read()
                    return resp.status

            statuses = await asyncio.gather(*(one(flagged_prompt(rng)) for _ in range(sent)))
        assert statuses == [200] * sent
        samples = await scrape_when(workers.url, lambda m: total(m, "sluice_worker_requests") >= sent)
        # Every request line on its way, whole or not: a cut line still holds its event name (or most do).
        for _ in range(300):
            if sum(line.count(b'"event": "request"') for line in workers.raw) >= sent:
                break
            await asyncio.sleep(0.1)
    broken = [line for line in workers.raw if not _is_json_line(line)]
    assert not broken, f"{len(broken)} of {len(workers.raw)} lines are not whole JSON lines, e.g. {broken[0][:300]!r}"
    requests = [line for line in workers.lines if line["event"] == "request"]
    assert len(requests) == sent
    assert all(line["moderation"] and line["moderation"][0]["rule"] == "flag" for line in requests)
    # Both workers served a good share of the requests, so both logged while the other did.
    per_worker = {int(s.labels["pid"]): s.value for s in samples["sluice_worker_requests"]}
    assert set(per_worker) == pids and min(per_worker.values()) >= sent / 10, per_worker
    assert max(len(line) for line in workers.raw) < PIPE_BUF


def _is_json_line(line: bytes) -> bool:
    if not line.endswith(b"\n"):
        return False
    try:
        return isinstance(json.loads(line), dict)
    except ValueError:
        return False
