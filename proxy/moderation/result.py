"""What moderation reports: plain values, so the gateway can log, count and compare them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, NamedTuple

ActionKind = Literal["block", "redact", "flag"]
Direction = Literal["input", "output"]


@dataclass(frozen=True)
class Action:
    """One rule that acted; hashable, so it can key metrics and be compared in tests."""

    rule: str
    action: ActionKind


class ModerationResult(NamedTuple):
    """``text`` is the moderated text (for a stream: what it releases now).

    ``actions`` lists every rule that acted, in text order, a block last;
    ``blocked`` is that block, if there was one. A tuple, not a frozen
    dataclass: a stream makes one per chunk, and a tuple is built in a
    quarter of the instructions.
    """

    text: str
    actions: tuple[Action, ...] = ()
    blocked: Action | None = None
