"""Moderation: terms, regular expressions and PII, on whole texts and on streams.

A pure core (no I/O but reading a rule's ``terms_file`` when the config is
compiled, no clock): ``ModerationEngine.from_config`` compiles the rules once;
``engine.moderate(text, direction)`` checks a whole text;
``engine.stream(direction)`` gives a window whose ``feed``/``finish`` return
the text that is safe to release. Modules, in the order text flows:

* ``normalize``: the normalised views rules match on, and the map back to the
  original characters.
* ``matchers``: finding each rule's matches incrementally (Aho-Corasick for
  terms, bounded regular expressions for regex and PII).
* ``pii``: the PII detectors.
* ``rules``: compiling the config.
* ``window``: which matches act, and what a stream may release.
* ``engine``: the public entry point.
"""

from .engine import ModerationEngine
from .result import Action, ActionKind, Direction, ModerationResult
from .window import ModerationStream

__all__ = ["Action", "ActionKind", "Direction", "ModerationEngine", "ModerationResult", "ModerationStream"]
