"""Work on a big prompt, kept from stalling other clients: moderation in short turns on the loop, the rest in one thread.

Why not threads for everything: moderation is pure Python and holds the
GIL, and a thread that holds it gives it back to the loop thread only every
switch interval (5 ms), and not even then when other such threads are
waiting for it too. Eight 4 MB prompts moderated in the default pool held
other clients' answers for seconds.

**Moderation: turns on the loop.** One lane per event loop; only its holder
moderates a big prompt, for one turn (``TURN_SECONDS`` of work, or the rest
of the text), then yields to the loop still holding the lane, then passes
it on (first come, first served, so big prompts take turns and a medium one
is not queued behind a whole 4 MB prompt). So each loop iteration runs at
most one turn of big-prompt moderation, however many big prompts are in
flight: another client's request waits at most about one turn at each of
its own steps. A long text is fed to one moderation window in slices of
``SLICE_CHARS``; short texts are moderated whole, many to a turn.

Slicing changes no result: a ``ModerationStream`` guarantees that the text
and the actions of its ``feed`` calls and its ``finish``, put together, are
what ``ModerationEngine.moderate`` gives for the whole text
(``moderation/window.py``); ``sliced_moderation`` relies on that and only
joins the pieces.

**The rest: the prompt thread.** Parsing, counting and finding a request's
texts cannot be cut into turns (they are one call each), so they run in one
thread per process, one request at a time. tiktoken's encoder releases the
GIL, so a long text is counted beside the loop; the Python parts (many short
messages) hold the GIL, but one thread alone gives it back to the loop
within a switch interval. orjson's parse holds it throughout: about 6 ms for
4 MB of one text, about 50 ms for 4 MB of 100,000 short messages.
"""

from __future__ import annotations

import asyncio
import os
import time
import weakref
from collections.abc import Callable, Generator
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .moderation import Action, Direction, ModerationEngine, ModerationResult

T = TypeVar("T")

# Work per turn. Another client's request waits about a turn at each of its loop
# iterations (some ten: body, store, upstream, settle, answer); shorter turns cost the
# big prompt more iterations. Measured: tests/bench/stalls.py.
TURN_SECONDS = 0.001
# Characters fed to a window at once: 0.25-0.35 ms with the benchmark's rules (six PII
# rules, 110,000 terms, two regexes), so a turn overruns its time by little.
SLICE_CHARS = 2048

_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()
_thread: tuple[int, ThreadPoolExecutor] | None = None  # (pid, executor): a forked child makes its own


def _lane() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lane = _lanes.get(loop)
    if lane is None:
        lane = _lanes[loop] = asyncio.Lock()
    return lane


async def in_the_prompt_thread(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` in the process's one prompt thread (see the module docstring)."""
    global _thread
    if _thread is None or _thread[0] != os.getpid():
        _thread = (os.getpid(), ThreadPoolExecutor(max_workers=1, thread_name_prefix="sluice-prompt"))
    return await asyncio.get_running_loop().run_in_executor(_thread[1], lambda: work(*args))


def sliced_moderation(
    engine: ModerationEngine, text: str, direction: Direction, slice_chars: int = SLICE_CHARS
) -> Generator[None, None, ModerationResult]:
    """Moderate ``text`` in slices of ``slice_chars``, yielding after each: the same result as ``engine.moderate``.

    A pure core: the caller decides what a yield means (``Turns`` may hand
    the loop to other clients). Stops at a block: nothing after it is read.
    """
    stream = engine.stream(direction)
    texts: list[str] = []
    actions: list[Action] = []
    last = len(text) - slice_chars
    start = 0
    while True:
        if start >= last:
            result = stream.finish(text[start:])
        else:
            result = stream.feed(text[start : start + slice_chars])
        texts.append(result.text)
        actions.extend(result.actions)
        if result.blocked is not None or start >= last:
            return ModerationResult("".join(texts), tuple(actions), result.blocked)
        start += slice_chars
        yield


class Turns:
    """Moderation in turns (``async with Turns() as turns``), each at most ``turn_seconds`` of work plus a slice."""

    def __init__(self, turn_seconds: float = TURN_SECONDS, slice_chars: int = SLICE_CHARS):
        self.turn_seconds = turn_seconds
        self.slice_chars = slice_chars
        self._lane: asyncio.Lock | None = None
        self._turn_ends = 0.0
        self._worked = False  # this turn did some work
        self._holding = False

    async def __aenter__(self) -> Turns:
        self._lane = _lane()
        await self._lane.acquire()
        self._holding = True
        self._turn_ends = time.perf_counter() + self.turn_seconds
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._lane is not None
        try:
            if self._worked:
                await asyncio.sleep(0)  # the last turn's yield, still in the lane
        finally:
            if self._holding:  # not when cancelled while queued for the next turn
                self._lane.release()

    async def _after_work(self) -> None:
        """End the turn if its time is up: yield in the lane, then queue for it again."""
        self._worked = True
        if time.perf_counter() < self._turn_ends:
            return
        assert self._lane is not None
        await asyncio.sleep(0)
        self._lane.release()
        self._holding = False
        await self._lane.acquire()
        self._holding = True
        self._worked = False
        self._turn_ends = time.perf_counter() + self.turn_seconds

    async def moderate(self, engine: ModerationEngine, text: str, direction: Direction) -> ModerationResult:
        """``engine.moderate(text, direction)``, in turns."""
        if len(text) <= self.slice_chars:
            result = engine.moderate(text, direction)
            await self._after_work()
            return result
        steps = sliced_moderation(engine, text, direction, self.slice_chars)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                await self._after_work()
                return done.value
            await self._after_work()
