"""Moderation: terms, regular expressions and PII, on whole texts and on streams.

A pure core (no I/O but reading a rule's ``terms_file`` when the config is
compiled, no clock): ``ModerationEngine.from_config`` compiles the rules once;
``engine.moderate(text, direction)`` checks a whole text;
``engine.stream(direction)`` gives a window whose ``feed``/``finish`` return
the text that is safe to release. Modules, in the order text flows:

* ``unidata``: Unicode's scripts, confusables (UTS #39) and default-ignorables,
  from maintained packages that ship them.
* ``normalize``: the normalised views rules match on, and the map back to the
  original characters.
* ``linear_regex``: patterns in RE2, a linear-time engine.
* ``matchers``: finding each rule's matches incrementally (Aho-Corasick for
  terms, judged by script where look-alikes made the match; RE2 patterns with
  bounded matches for regex and PII).
* ``pii``: the PII detectors (libphonenumber for phones).
* ``rules``: compiling the config.
* ``window``: which matches act, and what a stream may release.
* ``engine``: the public entry point.
"""

from .engine import ModerationEngine
from .result import Action, ActionKind, Direction, ModerationResult
from .window import ModerationStream

__all__ = ["Action", "ActionKind", "Direction", "ModerationEngine", "ModerationResult", "ModerationStream"]
