"""The moderation engine: the compiled rules of one config, and the streams that use them."""

from __future__ import annotations

from collections.abc import Sequence

from ..config import ModerationConfig
from .normalize import original_chars_bound
from .result import Direction, ModerationResult
from .rules import CompiledRule, compile_rules
from .window import ModerationStream, WindowPlan

_DIRECTIONS = ("input", "output")


class ModerationEngine:
    """Built once per config load; immutable, so one engine serves every request concurrently.

    ``moderate`` handles a whole text (a prompt, a non-streamed answer);
    ``stream`` gives a window for text that arrives in chunks. Both follow the
    same rules and give the same result for the same text (see ``window``).
    """

    def __init__(self, rules: Sequence[CompiledRule]):
        self._rules = tuple(rules)
        self._by_direction = {d: tuple(r for r in self._rules if d in r.directions) for d in _DIRECTIONS}
        self._plans = {d: WindowPlan(rules) for d, rules in self._by_direction.items()}

    @classmethod
    def from_config(cls, config: ModerationConfig) -> ModerationEngine:
        """Compile ``config``; raises ``ConfigError`` with every problem (unreadable terms_file, ...)."""
        return cls(compile_rules(config))

    @property
    def max_window_chars(self) -> int:
        """The most original characters any stream holds back at once (0 without rules).

        A worst case: the longest match of any rule in normalised characters,
        as if each were padded with the most invisible characters the
        normaliser tolerates. Ordinary text is held back far less: only what
        could still be the start of a match.
        """
        if not self._rules:
            return 0
        return original_chars_bound(max(rule.matcher.hold_chars for rule in self._rules))

    def has_rules(self, direction: Direction) -> bool:
        """Whether any rule applies to ``direction``: without one, moderation is a no-op."""
        return bool(self._rules_for(direction))

    def moderate(self, text: str, direction: Direction) -> ModerationResult:
        """Moderate a whole text. With a block, ``text`` is what comes before the match."""
        return self.stream(direction).finish(text)

    def stream(self, direction: Direction) -> ModerationStream:
        """A new window for one stream of text (one choice, or one tool call's arguments)."""
        self._rules_for(direction)  # rejects an unknown direction
        return ModerationStream(self._plans[direction])

    def _rules_for(self, direction: str) -> tuple[CompiledRule, ...]:
        try:
            return self._by_direction[direction]
        except KeyError:
            raise ValueError(f"direction must be 'input' or 'output', not {direction!r}") from None
