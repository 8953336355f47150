"""What the mock saw: every request (newest last) and the clients that left early.

Tests read it to check what reached the upstream (body, raw bytes, headers such
as ``x-api-key`` and ``anthropic-beta``) and that the gateway hung up on it.
"""

from __future__ import annotations

import asyncio
from typing import Any

from aiohttp import web

# Benchmarks push many requests through one mock; keep only the latest.
MAX_RECORDED_REQUESTS = 10_000


class MockState:
    """Requests (newest last), early disconnects, and the app's default delay."""

    def __init__(self, delay_ms: float):
        self.delay_ms = delay_ms
        self.requests: list[dict[str, Any]] = []
        self.disconnects = 0
        self._disconnected = asyncio.Event()
        self._answers = 0

    def next_answer_number(self) -> int:
        """A counter for ids (``chatcmpl-mock-N``, ``resp_mock_N``, ``msg_mock_N``)."""
        self._answers += 1
        return self._answers

    def record_request(self, request: web.Request, body: Any, raw: bytes = b"") -> None:
        self.requests.append(
            {
                "method": request.method,
                "path": request.path,
                "headers": dict(request.headers),
                "body": body,
                "raw": raw.decode("utf-8", "backslashreplace"),  # the bytes as sent, for tests of the encoding
            }
        )
        if len(self.requests) > MAX_RECORDED_REQUESTS:
            del self.requests[0]

    def record_disconnect(self) -> None:
        self.disconnects += 1
        # Wake everyone waiting now; later waiters wait on a fresh event.
        self._disconnected.set()
        self._disconnected = asyncio.Event()

    async def wait_for_disconnect(self, timeout: float = 1.0, count: int = 1) -> bool:
        """True once ``count`` clients in all have left early; False after ``timeout`` seconds."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while self.disconnects < count:
            remaining = deadline - loop.time()
            if remaining <= 0:
                return False
            try:
                await asyncio.wait_for(self._disconnected.wait(), remaining)
            except asyncio.TimeoutError:
                return False
        return True

    def reset(self) -> None:
        """Forget requests and disconnects, for tests that share one mock."""
        self.requests.clear()
        self.disconnects = 0


MOCK_STATE = web.AppKey("mock_state", MockState)
