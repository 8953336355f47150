"""What moderation reports: plain values, so the gateway can log, count and compare them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

ActionKind = Literal["block", "redact", "flag"]
Direction = Literal["input", "output"]


@dataclass(frozen=True)
class Action:
    """One rule that acted; hashable, so it can key metrics and be compared in tests."""

    rule: str
    action: ActionKind


@dataclass(frozen=True)
class ModerationResult:
    """``text`` is the moderated text (for a stream: what it releases now).

    ``actions`` lists every rule that acted, in text order, a block last;
    ``blocked`` is that block, if there was one.
    """

    text: str
    actions: tuple[Action, ...] = ()
    blocked: Action | None = None
