"""Work on a big prompt, done on the event loop in short turns, so no other client waits behind it.

Why not a thread: moderation is pure Python and holds the GIL, and a thread
that holds it gives it back to the loop thread only every switch interval
(5 ms), behind every other such thread. Eight 4 MB prompts moderated in
threads held other clients' answers for seconds. On the loop, in bounded
turns with a yield after each, the wait is bounded by one turn.

**The lane.** One per event loop. Only its holder works on a big prompt,
and it yields to the loop after every turn before it does anything else,
still holding the lane. So each loop iteration runs at most one turn of
big-prompt work, however many big prompts are in flight: another client's
request waits at most about one turn at each of its own steps. Big prompts
take the lane one after another (first come, first served), which costs
them nothing in total: the GIL serialised them anyway.

**A turn** is one unit that cannot be cut (parsing a body) or about
``TURN_CHARS`` characters of moderation: a long text is fed to one
moderation window in slices, and short texts are moderated whole, many to a
turn, each costing its length plus ``TEXT_OVERHEAD_CHARS`` (a call on a
short text costs about as much as that many characters).

Slicing changes no result: a ``ModerationStream`` guarantees that the text
and the actions of its ``feed`` calls and its ``finish``, put together, are
what ``ModerationEngine.moderate`` gives for the whole text
(``moderation/window.py``); ``sliced_moderation`` relies on that and only
joins the pieces.

Counting (tiktoken) is not done here: its encoder releases the GIL, so it
runs in a thread beside the loop.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable, Generator
from typing import Any, TypeVar

from .moderation import Action, Direction, ModerationEngine, ModerationResult

T = TypeVar("T")

# Characters of moderation per turn: about 4 ms of plain text on this project's 2-core VM.
TURN_CHARS = 32 * 1024
# What moderating one short text costs beyond its characters, counted in characters.
TEXT_OVERHEAD_CHARS = 64

_lanes: weakref.WeakKeyDictionary[asyncio.AbstractEventLoop, asyncio.Lock] = weakref.WeakKeyDictionary()


def _lane() -> asyncio.Lock:
    loop = asyncio.get_running_loop()
    lane = _lanes.get(loop)
    if lane is None:
        lane = _lanes[loop] = asyncio.Lock()
    return lane


def sliced_moderation(
    engine: ModerationEngine, text: str, direction: Direction, slice_chars: int = TURN_CHARS
) -> Generator[None, None, ModerationResult]:
    """Moderate ``text`` in slices of ``slice_chars``, yielding after each: the same result as ``engine.moderate``.

    A pure core: the caller decides what a yield means (``Turns`` hands the
    loop to other clients). Stops at a block: nothing after it is read.
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
    """Inside the lane (``async with Turns() as turns``): work in bounded turns, yielding to the loop after each."""

    def __init__(self, turn_chars: int = TURN_CHARS):
        self.turn_chars = turn_chars
        self._spent = 0  # characters of work since the last yield
        self._lane: asyncio.Lock | None = None

    async def __aenter__(self) -> Turns:
        self._lane = _lane()
        await self._lane.acquire()
        return self

    async def __aexit__(self, *exc: object) -> None:
        assert self._lane is not None
        try:
            await self._next_turn()  # the last turn's yield, still in the lane
        finally:
            self._lane.release()

    async def _next_turn(self) -> None:
        if self._spent:
            self._spent = 0
            await asyncio.sleep(0)

    async def moderate(self, engine: ModerationEngine, text: str, direction: Direction) -> ModerationResult:
        """``engine.moderate(text, direction)``, in turns of at most ``turn_chars`` characters."""
        cost = len(text) + TEXT_OVERHEAD_CHARS
        if cost <= self.turn_chars:  # many short texts to a turn
            if self._spent + cost > self.turn_chars:
                await self._next_turn()
            result = engine.moderate(text, direction)
            self._spent += cost
            return result
        await self._next_turn()
        steps = sliced_moderation(engine, text, direction, self.turn_chars)
        while True:
            try:
                next(steps)
            except StopIteration as done:
                self._spent = self.turn_chars  # the last slice: the next work gets a turn of its own
                return done.value
            await asyncio.sleep(0)

    async def run(self, work: Callable[..., T], *args: Any) -> T:
        """One unit of work that cannot be cut (parsing a body): a turn of its own."""
        await self._next_turn()
        result = work(*args)
        self._spent = self.turn_chars
        return result


async def in_a_turn(work: Callable[..., T], *args: Any) -> T:
    """``work(*args)`` as one turn in the lane, followed by a yield."""
    async with Turns() as turns:
        return await turns.run(work, *args)
