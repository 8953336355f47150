"""Compiling the configured rules, once per config load, and reporting every problem at once.

This is the only place the moderation core touches the file system: a terms
rule's ``terms_file`` is read here (UTF-8, one term per line, lines that start
with ``#`` and blank lines ignored; a ``#`` later in a line is part of the term,
so "c#" can be listed).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import re2

from ..config import ConfigError, ModerationConfig, RuleConfig
from .linear_regex import LinearPattern, error_text, options
from .matchers import PatternMatcher, TermsMatcher
from .normalize import LEET, fold_term, leet_variants, term_script
from .pii import pii_matcher
from .result import ActionKind


@dataclass(frozen=True, eq=False)
class CompiledRule:
    """A rule ready to match: ``index`` is its place in the config, which breaks ties."""

    index: int
    name: str
    action: ActionKind
    directions: frozenset[str]
    replacement: str
    matcher: TermsMatcher | PatternMatcher


def compile_rules(config: ModerationConfig) -> tuple[CompiledRule, ...]:
    """Build every rule, or raise ``ConfigError`` listing every problem found."""
    problems: list[str] = []
    try:
        config.redaction.format(rule="rule")
    except (AttributeError, KeyError, IndexError, ValueError) as exc:
        problems.append(f"moderation.redaction: not a valid template ({exc!r}); the only field is {{rule}}")
    rules = []
    for index, rule in enumerate(config.rules):
        where = f"moderation.rules[{index}]"
        matcher = _compile_matcher(rule, where, problems)
        if matcher is not None and not problems:  # with any problem, nothing is built
            rules.append(
                CompiledRule(
                    index=index,
                    name=rule.name,
                    action=rule.action,
                    directions=frozenset(rule.apply_to),
                    replacement=config.redaction.format(rule=rule.name),
                    matcher=matcher,
                )
            )
    if problems:
        raise ConfigError(problems)
    return tuple(rules)


def _compile_matcher(rule: RuleConfig, where: str, problems: list[str]) -> TermsMatcher | PatternMatcher | None:
    if rule.type == "terms":
        return _terms_matcher(rule, where, problems)
    if rule.type == "regex":
        return _regex_matcher(rule, where, problems)
    if rule.leetspeak:
        problems.append(f"{where}.leetspeak: applies to terms and regex rules, not to pii")
        return None
    assert rule.entity is not None  # RuleConfig requires it for pii
    return pii_matcher(rule.entity)


def _terms_matcher(rule: RuleConfig, where: str, problems: list[str]) -> TermsMatcher | None:
    count_before = len(problems)
    sources = [(f"{where}.terms[{i}]", term) for i, term in enumerate(rule.terms)]
    if rule.terms_file:
        sources += _read_terms_file(rule.terms_file, where, problems)
    keys: dict[str, str | None] = {}
    for label, term in sources:
        key = fold_term(term)
        if not key:
            problems.append(f"{label}: the term {term!r} has no visible characters")
            continue
        script = term_script(term)
        for variant in leet_variants(key.translate(LEET)) if rule.leetspeak else (key,):
            # Two terms with one view form but different scripts: judge the match by neither.
            keys[variant] = script if keys.get(variant, script) == script else None
    if len(problems) > count_before:
        return None
    if not keys:
        problems.append(f"{where}: the term list is empty")
        return None
    return TermsMatcher(keys, word=rule.match == "word", view="leet_folded" if rule.leetspeak else "folded")


def _read_terms_file(path: str, where: str, problems: list[str]) -> list[tuple[str, str]]:
    """The file's terms, each labelled with its line; a file that cannot be read is a problem."""
    try:
        text = Path(path).read_text(encoding="utf-8-sig")
    except OSError as exc:
        problems.append(f"{where}.terms_file: cannot read {path}: {exc.strerror or exc}")
        return []
    except UnicodeDecodeError:
        problems.append(f"{where}.terms_file: {path} is not UTF-8 text")
        return []
    terms = []
    for number, line in enumerate(text.splitlines(), start=1):
        term = line.strip()
        if term and not term.startswith("#"):
            terms.append((f"{path}:{number}", term))
    return terms


def compile_regex(pattern: str) -> LinearPattern:
    """Compile a rule's pattern in RE2, case-insensitively (the view is case-folded); raises ``re2.error``."""
    return LinearPattern(pattern, options(case_sensitive=False))


def regex_width(pattern: str, compiled: LinearPattern) -> tuple[int, int]:
    """The shortest and longest text ``pattern`` can match (huge when unbounded).

    Python's own parser knows this for the syntax it shares with RE2; for the
    rest (``\\pL``, ``\\z``...) the shortest is 0 if RE2 matches the empty
    string and 1 otherwise, and the longest is unknown (huge).
    """
    try:
        return re._parser.parse(pattern, re.IGNORECASE).getwidth()  # type: ignore[attr-defined]
    except (re.error, OverflowError, RecursionError):
        probe = "a 0 ."
        empty = any((found := compiled.search(probe, i)) is not None and found[0][0] == found[0][1] for i in range(6))
        return (0 if empty else 1), 1 << 30


def _regex_matcher(rule: RuleConfig, where: str, problems: list[str]) -> PatternMatcher | None:
    assert rule.pattern is not None and rule.max_match_chars is not None  # RuleConfig requires both
    try:
        pattern = compile_regex(rule.pattern)
    except re2.error as exc:
        problems.append(f"{where}.pattern: rule {rule.name!r}: RE2 cannot compile it ({error_text(exc)})")
        return None
    shortest, longest = regex_width(rule.pattern, pattern)
    if shortest == 0:
        problems.append(f"{where}.pattern: can match the empty string; every match must have at least one character")
        return None
    if shortest > rule.max_match_chars:
        problems.append(
            f"{where}.max_match_chars: {rule.max_match_chars} is shorter than the shortest match ({shortest} characters)"
        )
        return None
    return PatternMatcher(
        pattern,
        min(rule.max_match_chars, longest),
        view="leet_plain" if rule.leetspeak else "plain",
    )
