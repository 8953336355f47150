"""Many streams at once: the gateway lifts its open-file limit and its listen queue holds a crowd.

Each stream holds two sockets in the gateway (client and upstream), so 600
streams need about 1,200 descriptors: more than the common default soft limit
of 1,024, which the child here is started with. All 600 connect at once, more
than aiohttp's default listen queue of 128.
"""

from __future__ import annotations

import asyncio
import resource
from pathlib import Path

import aiohttp
import pytest
from conftest import gateway_config
from processes import GatewayProcess
from test_faults import chat, open_live_streams, parse_stream, text_of

STREAMS = 600


def _soft_limit(pid: int) -> int:
    for line in Path(f"/proc/{pid}/limits").read_text().splitlines():
        if line.startswith("Max open files"):
            return int(line.split()[3])
    raise AssertionError("no open-file limit in /proc")


@pytest.fixture
def room_for_our_own_sockets():
    """This process holds the clients' and the mock's sockets: about 1,200 of them."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard < 4 * STREAMS:
        pytest.skip(f"the hard open-file limit ({hard}) is too low for this test")
    resource.setrlimit(resource.RLIMIT_NOFILE, (max(soft, 4 * STREAMS), hard))
    yield
    resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))


async def test_600_streams_at_once_past_a_1024_file_limit(mock_upstream, tmp_path, room_for_our_own_sockets):
    words = " ".join(f"w{i}" for i in range(8))
    # Each stream pauses after its first word, so all of them are open at the same time.
    body = chat(words, stream=True, mock={"stall_after": {"chunks": 1, "ms": 2000}})
    async with GatewayProcess(gateway_config(mock_upstream.url), tmp_path / "sluice.yaml",
                              open_files_soft_limit=1024) as gateway:
        assert _soft_limit(gateway.process.pid) > 2 * STREAMS
        connector = aiohttp.TCPConnector(limit=0)
        async with aiohttp.ClientSession(connector=connector, timeout=aiohttp.ClientTimeout(total=60)) as session:
            responses, firsts = await open_live_streams(session, gateway.url, body, STREAMS)
            rests = await asyncio.gather(*(r.read() for r in responses))
        for first, rest in zip(firsts, rests, strict=True):
            chunks, ending = parse_stream((first + rest).decode())
            assert ending == "done" and text_of(chunks) == words
