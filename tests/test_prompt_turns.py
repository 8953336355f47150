"""Big prompts moderated in turns: the same result as in one piece, and one turn per loop iteration.

``sliced_moderation`` is checked against ``ModerationEngine.moderate`` with
hypothesis over texts built to hold matches (blocks, redactions, flags,
disguises) and every slice size, so a slice boundary inside a match changes
nothing. ``Turns`` is checked on a real event loop, with turns of no time
(each slice or short text a turn of its own): however many big prompts are
moderated at once, a task that wakes on every loop iteration sees at most
one turn between two of its wake-ups (two, as a turn may fall on each side
of it), where without the lane it would see one per prompt.
"""

from __future__ import annotations

import asyncio

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from proxy.config import ModerationConfig, RuleConfig
from proxy.moderation import ModerationEngine, ModerationResult
import threading

from proxy.prompt_turns import Turns, in_the_prompt_thread, sliced_moderation


def _engine(**rules: dict) -> ModerationEngine:
    return ModerationEngine.from_config(
        ModerationConfig(redaction="[{rule}]", rules=[RuleConfig(name=name, **rule) for name, rule in rules.items()])
    )


REDACT_AND_FLAG = _engine(
    bad={"type": "terms", "terms": ["ass", "kill them"], "action": "redact"},
    ss={"type": "terms", "terms": ["ss"], "match": "substring", "action": "flag"},
    num={"type": "regex", "pattern": r"a[0-9]+\b", "max_match_chars": 5, "action": "redact"},
    email={"type": "pii", "entity": "email", "action": "redact"},
    card={"type": "pii", "entity": "credit_card", "action": "flag"},
)
WITH_BLOCKS = _engine(
    seen={"type": "terms", "terms": ["ass"], "match": "substring", "action": "flag"},
    stop={"type": "terms", "terms": ["kill", "s s"], "leetspeak": True, "action": "block"},
    email={"type": "pii", "entity": "email", "action": "redact"},
)
PIECES = [
    "a", "s", "i", "l", "k", "1", "4", "@", ".", " ", "  ", "\n",
    "ass", "kill", "k1ll", "them", "a12", "bob@x.io", "4111 1111 1111 1111",
    "\u200b", "\u00ad", "\u0301", "\u0430", "ß", "ﬁ", "e\u0301", "\U0001f468",
]  # fmt: skip
texts = st.lists(st.sampled_from(PIECES), max_size=40).map("".join)


def _drive(steps) -> tuple[ModerationResult, int]:
    """Run a ``sliced_moderation`` to its end; its result and how many times it yielded."""
    yields = 0
    while True:
        try:
            next(steps)
        except StopIteration as done:
            return done.value, yields
        yields += 1


@settings(max_examples=300, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(texts, st.integers(1, 30), st.sampled_from([REDACT_AND_FLAG, WITH_BLOCKS]))
def test_moderation_in_slices_is_moderation_of_the_whole(text, size, engine):
    whole = engine.moderate(text, "input")
    sliced, yields = _drive(sliced_moderation(engine, text, "input", size))
    assert sliced == whole
    if whole.blocked is None:
        assert yields == max(0, -(-len(text) // size) - 1)  # a yield between each two slices
    else:
        assert yields < max(1, -(-len(text) // size))  # nothing after the block is read


class _CountingEngine:
    """An engine whose work is counted per slice and per whole text, for the loop test."""

    def __init__(self, engine: ModerationEngine):
        self.engine = engine
        self.work = 0  # slices and whole texts moderated since the probe last looked

    def moderate(self, text, direction):
        self.work += 1
        return self.engine.moderate(text, direction)

    def stream(self, direction):
        window = self.engine.stream(direction)
        outer = self

        class Counted:
            def feed(self, text):
                outer.work += 1
                return window.feed(text)

            def finish(self, text=""):
                outer.work += 1
                return window.finish(text)

        return Counted()


async def _worst_work_between_wakeups(engine: _CountingEngine, jobs) -> int:
    done = False
    worst = 0

    async def probe() -> None:
        nonlocal worst
        while not done:
            await asyncio.sleep(0)
            worst, engine.work = max(worst, engine.work), 0

    watcher = asyncio.create_task(probe())
    await asyncio.sleep(0)
    await asyncio.gather(*jobs)
    done = True
    await watcher
    return worst


async def _moderate(engine, texts_: list[str], turn_seconds: float = 0.0) -> list[ModerationResult]:
    async with Turns(turn_seconds, slice_chars=100) as turns:
        return [await turns.moderate(engine, text, "input") for text in texts_]


async def test_many_big_prompts_at_once_run_one_turn_per_loop_iteration():
    engine = _CountingEngine(REDACT_AND_FLAG)
    big = "the quick brown fox sent bob@x.io a12 " * 30
    jobs = [_moderate(engine, [big, "short", big]) for _ in range(6)]
    assert await _worst_work_between_wakeups(engine, jobs) <= 2


async def test_a_turn_lasts_its_time():
    """With a turn of a minute, one prompt's slices all run in one turn: the probe never sees it yield."""
    engine = _CountingEngine(REDACT_AND_FLAG)
    big = "the quick brown fox sent bob@x.io a12 " * 30  # 12 slices of 100
    assert await _worst_work_between_wakeups(engine, [_moderate(engine, [big], 60.0)]) == 12


async def test_turns_give_the_results_of_moderate():
    big = "kill them all, mail bob@x.io " * 50
    texts_ = [big, "ass", big[:99], big[:101], "a12 and more"]
    assert await _moderate(REDACT_AND_FLAG, texts_) == [REDACT_AND_FLAG.moderate(t, "input") for t in texts_]
    blocked = await _moderate(WITH_BLOCKS, ["fine", big])
    assert blocked[1] == WITH_BLOCKS.moderate(big, "input") and blocked[1].blocked is not None


async def test_the_lane_is_released_when_the_work_raises_or_is_cancelled():
    async def failing() -> None:
        async with Turns():
            raise ValueError("a block, say")

    async def slow() -> None:
        await _moderate(REDACT_AND_FLAG, ["the quick brown fox " * 500] * 50)

    for _ in range(2):  # the second would wait forever on a lane left held
        try:
            await asyncio.wait_for(failing(), 5)
        except ValueError:
            pass
        task = asyncio.create_task(slow())
        await asyncio.sleep(0.01)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)
    assert await asyncio.wait_for(_moderate(REDACT_AND_FLAG, ["ass"]), 5) == [REDACT_AND_FLAG.moderate("ass", "input")]


async def test_the_prompt_thread_is_one_thread_beside_the_loop():
    loop_thread = threading.get_ident()
    running = 0
    most = 0

    def work(value: int) -> tuple[int, int]:
        nonlocal running, most
        running += 1
        most = max(most, running)
        threading.Event().wait(0.005)
        running -= 1
        return value, threading.get_ident()

    results = await asyncio.gather(*(in_the_prompt_thread(work, i) for i in range(6)))
    assert [value for value, _ in results] == list(range(6))
    assert len({thread for _, thread in results}) == 1 and results[0][1] != loop_thread
    assert most == 1
