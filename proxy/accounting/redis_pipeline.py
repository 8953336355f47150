"""The redis store's one connection, shared by every caller, with one write per loop turn."""

from __future__ import annotations

import asyncio
import collections
import math
from collections.abc import Iterable
from typing import Any

from redis.exceptions import ConnectionError as RedisConnectionError
from redis.exceptions import NoScriptError, RedisError, ResponseError

from proxy.accounting.redis_scripts import SCRIPTS
from proxy.accounting.store import StoreUnavailable


def unavailable(exc: BaseException) -> StoreUnavailable:
    """Any failure to talk to Redis becomes the one exception the gateway handles."""
    error = StoreUnavailable(f"redis store failed: {exc}")
    error.__cause__ = exc
    return error


class Pipeline:
    """One connection; the commands of every caller of a loop turn go out in one write.

    Why: through redis-py's client each command paid for a pool checkout, a
    retry wrapper, two timeout contexts, its packing and a reply parse per
    array element, about 0.4 ms of gateway CPU each, more than Redis spends on
    the script. Here a caller only queues its packed command and awaits a
    future; one task writes everything queued since the last write, reads the
    replies back in order (Redis answers a connection's commands in the order
    sent) and resolves the futures. Busy gateways send dozens of commands per
    write; an idle one sends each alone at once, one round trip as before.

    Nothing is acknowledged early: a caller's future resolves with its own
    reply, or fails with ``StoreUnavailable``, so a settle that did not reach
    Redis still raises into ``Quotas``' retry queue.

    Failures, per batch:
    - the connection broke (Redis restarted, a stale socket): the commands
      not yet answered are sent once more on a new connection. Each may have
      run already with its reply lost; the scripts make that harmless
      (reserve and settle are idempotent through their marker; a ``record``
      may count twice, as it could with redis-py's own retry before);
    - ``NOSCRIPT`` (Redis restarted or flushed its scripts): the scripts are
      loaded and those commands sent again, in one round trip; they had not
      run;
    - a timeout (``timeout_seconds`` for the whole batch): all of its
      unanswered commands fail, and the connection is dropped, since late
      replies would otherwise be taken for the next batch's.
    """

    def __init__(self, connection: Any, timeout: float):
        self._connection = connection
        self._timeout = timeout
        self._queue: list[tuple[bytes, asyncio.Future[Any] | None]] = []
        self._writer: asyncio.Task[None] | None = None

    def call(self, command: bytes) -> asyncio.Future[Any]:
        """Queue a packed command; the future gets its reply (bytes, int, ...) or ``StoreUnavailable``."""
        loop = asyncio.get_running_loop()
        future = loop.create_future()
        self._queue.append((command, future))
        if self._writer is None:
            # Started now, runs on the next loop turn: by then every caller of
            # this turn has queued its command too.
            self._writer = loop.create_task(self._write_batches())
        return future

    async def _write_batches(self) -> None:
        batch: list[tuple[bytes, asyncio.Future[Any] | None]] = []
        try:
            while self._queue:
                batch, self._queue = self._queue, []
                await self._execute(batch)
        except BaseException:  # cancelled (the loop is closing): no caller may wait forever
            self._fail(batch + self._queue, RedisError("the redis store's writer was stopped"))
            self._queue = []
            raise
        finally:
            self._writer = None

    async def _execute(self, batch: list[tuple[bytes, asyncio.Future[Any] | None]]) -> None:
        work = collections.deque(batch)
        reconnected = reloaded = False
        while work:
            noscript: list[tuple[bytes, asyncio.Future[Any] | None]] = []
            try:
                await self._round_trip(work, noscript)
            except (RedisConnectionError, ConnectionError) as exc:
                await self._connection.disconnect(nowait=True)
                if reconnected:
                    self._fail(work, exc)
                    return
                reconnected = True  # the next round trip opens a new connection
                continue
            except TimeoutError:
                await self._connection.disconnect(nowait=True)
                self._fail(work, TimeoutError(f"no reply within {self._timeout}s"))
                return
            except (RedisError, OSError) as exc:
                await self._connection.disconnect(nowait=True)
                self._fail(work, exc)
                return
            if noscript:
                if reloaded:
                    self._fail(noscript, RedisError("NOSCRIPT after loading the scripts"))
                    return
                reloaded = True
                work.extend((script.load, None) for script in SCRIPTS)
                work.extend(noscript)

    async def _round_trip(self, work: collections.deque[tuple[bytes, asyncio.Future[Any] | None]],
                          noscript: list[tuple[bytes, asyncio.Future[Any] | None]]) -> None:
        """Send ``work`` in one write, then resolve its futures reply by reply, taking each answered one off."""
        connection = self._connection
        async with asyncio.timeout(self._timeout):
            await connection.send_packed_command([command for command, _ in work], check_health=False)
            while work:
                try:
                    # math.inf: no timeout per reply, the batch has one
                    reply = await connection.read_response(disable_decoding=True, timeout=math.inf)
                except NoScriptError:
                    noscript.append(work.popleft())
                    continue
                except ResponseError as exc:  # this command failed in Redis; the others stand
                    reply = exc
                _, future = work.popleft()
                if future is None or future.done():  # an internal command, or its caller went away
                    continue
                if isinstance(reply, ResponseError):
                    future.set_exception(unavailable(reply))
                else:
                    future.set_result(reply)

    @staticmethod
    def _fail(work: Iterable[tuple[bytes, asyncio.Future[Any] | None]], exc: BaseException) -> None:
        for _, future in work:
            if future is not None and not future.done():
                future.set_exception(unavailable(exc))

    async def close(self) -> None:
        """Finish what is queued (settles must not be lost at shutdown), then disconnect."""
        if self._writer is not None:
            await asyncio.shield(self._writer)
        await self._connection.disconnect()

