"""The answer shape Chat Completions and Completions share: a list of choices, each with text fields.

Which fields of a choice hold text is the adapter's knowledge, given as a
``ChoiceShape``; ``Choices`` applies the rules to them, for a stream
(``choices_stream.ChoicesRewriter``) and for a whole answer
(``moderate_choices``) alike:

* every text field of every choice (the answer, reasoning, a refusal, each
  tool call's arguments) has a moderation window and a token counter of its
  own, so any split of a field into chunks moderates and counts exactly like
  the whole field;
* at a choice's finish its windows' held text goes into that chunk;
* a block ends the blocked choice with the text before the match and
  ``finish_reason: "content_filter"``;
* the answer cap: a choice whose counted tokens reach ``ctx.cap`` ends there
  with ``finish_reason: "length"``;
* logprob entries follow their text (``logprobs.LogprobsAligner``).
"""

from __future__ import annotations

import abc
from collections.abc import Hashable
from typing import Any

from .. import jsonio
from ..token_counter import AnswerCap, StreamingTokenCounter
from .base import AnswerContext, Moderated, StreamBroken, Usage, usage_from
from .logprobs import AlternativesFilter, LogprobsAligner

FieldKey = Hashable


class ChoiceShape(abc.ABC):
    """Where one format keeps a choice's text (the adapter's knowledge)."""

    @abc.abstractmethod
    def holder(self, choice: dict[str, Any], whole: bool) -> Any:
        """The dict holding the choice's fields (chat: ``delta`` or ``message``)."""

    @abc.abstractmethod
    def fields(self, holder: dict[str, Any]) -> list[tuple[FieldKey, dict[str, Any], str]]:
        """(window key, container, name) of every non-empty text field, in the holder's order."""

    @abc.abstractmethod
    def place(self, holder: dict[str, Any], key: FieldKey, text: str) -> None:
        """Append released ``text`` to field ``key`` of ``holder`` (creating the field)."""

    @abc.abstractmethod
    def synthetic(self, index: int, holder: dict[str, Any], finish_reason: str | None) -> dict[str, Any]:
        """A choice of the gateway's own, carrying ``holder``'s fields."""

    @abc.abstractmethod
    def shows(self, holder: dict[str, Any]) -> bool:
        """Whether a chunk with this holder shows the client anything (text, a role, a tool call's name)."""

    def take_logprobs(self, choice: dict[str, Any]) -> dict[FieldKey, list[Any]]:
        """Remove the choice's logprob entries, by the field they belong to."""
        return {}

    def put_logprobs(self, choice: dict[str, Any], due: dict[FieldKey, list[Any]]) -> None:
        """Give the choice the entries now due."""

    def token_of(self, entry: Any) -> str | None:
        return entry.get("token") if isinstance(entry, dict) else None

    def filter_alternatives(self, entry: Any, passes: Any) -> Any:
        return entry


class Field:
    """One text field of one choice: its window, counter and logprobs."""

    __slots__ = ("aligner", "counter", "fed", "held", "released", "window")

    def __init__(self, window: Any, counter: StreamingTokenCounter, logprobs: bool):
        self.window = window
        self.counter = counter
        self.fed = 0  # original characters fed to the window
        self.released = 0  # of which released (sent or replaced)
        self.held = ""  # the original text not yet released, kept only to align logprobs
        self.aligner = LogprobsAligner(0) if logprobs else None


class ChoiceState:
    __slots__ = ("cap", "capped", "fields", "finished")

    def __init__(self, cap: int | None) -> None:
        self.fields: dict[FieldKey, Field] = {}
        self.finished = False
        self.capped = False
        self.cap = AnswerCap(cap) if cap is not None else None


class Choices:
    """The per-choice state and rules shared by a stream and a whole answer."""

    def __init__(self, shape: ChoiceShape, ctx: AnswerContext, logprobs: bool):
        self.shape = shape
        self.ctx = ctx
        engine = ctx.engine if ctx.engine is not None and ctx.engine.has_rules("output") else None
        self.engine = engine
        self.logprobs = logprobs and engine is not None  # without output rules they pass as they came
        self.alternatives = (
            AlternativesFilter(lambda token: not engine.moderate(token, "output").actions) if engine and logprobs else None
        )
        self.cap = ctx.cap
        self.choices: dict[int, ChoiceState] = {}
        self.actions: list[Any] = []
        self.blocked: Any = None
        self.delivered = False

    def state(self, choice: dict[str, Any]) -> tuple[int, ChoiceState]:
        index = choice.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            raise StreamBroken("The upstream sent a choice whose index is not a number.")
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = ChoiceState(self.cap)
        return index, state

    def _field(self, state: ChoiceState, key: FieldKey) -> Field:
        field = state.fields.get(key)
        if field is None:
            window = self.engine.stream("output") if self.engine is not None else None
            field = state.fields[key] = Field(window, StreamingTokenCounter(self.ctx.model), self.logprobs)
        return field

    def moderate(self, choice: dict[str, Any], holder: Any, final: bool) -> tuple[bool, bool, dict[FieldKey, list[Any]]]:
        """Moderate, count and cap one choice's fields in place.

        Returns (changed, it had text, the logprob entries now due).
        """
        index, state = self.state(choice)
        entries = self.shape.take_logprobs(choice) if self.logprobs else None
        due: dict[FieldKey, list[Any]] = {}
        changed = False
        fields = self.shape.fields(holder) if holder.__class__ is dict else ()
        for key, container, name in fields:
            text = container[name]
            if state.finished:
                if state.capped:
                    del container[name]  # past the cap: neither sent nor billed
                    changed = True
                    continue
                if self.engine is not None:
                    # Its window is closed: moderated alone, this text could complete a match unseen.
                    raise StreamBroken("The upstream sent more text for a choice that had already finished.")
            field = state.fields.get(key) or self._field(state, key)
            if self.cap is not None:
                fitted = self._fit(state, field, text)
                if fitted != text:
                    state.capped = True
                    text = fitted
            field.counter.add(text)
            window = field.window
            if window is not None and field.aligner is None and not final:
                result = window.feed(text)  # the common case, inlined
                if result.actions:
                    self._take(result)
                sent = result.text
            else:
                sent = self._feed(field, text, entries.get(key) if entries else None, final, due, key)
            if sent != container[name]:
                container[name] = sent
                changed = True
            if sent:
                self.delivered = True
            if self.blocked is not None:
                break
        if self.blocked is None and (state.capped or final or choice.get("finish_reason") and not state.finished):
            if self.flush(holder, state, due):
                changed = True
            if state.capped and not state.finished and self.blocked is None:
                choice["finish_reason"] = "length"
                changed = True
            state.finished = True
        if self.blocked is not None:  # in a field, or in what the finish released
            self.end_choice(choice, holder, state, "content_filter", due)
            changed = True
        if due or entries:
            self.shape.put_logprobs(choice, due)
            changed = True
        return changed, bool(fields), due

    def _fit(self, state: ChoiceState, field: Field, text: str) -> str:
        """``text``, or as much of it as the answer cap leaves this choice."""
        assert state.cap is not None
        return state.cap.fit((f.counter for f in state.fields.values()), field.counter, text)

    def _feed(
        self, field: Field, text: str, entries: list[Any] | None, final: bool, due: dict[FieldKey, list[Any]], key: FieldKey
    ) -> str:
        window = field.window
        if window is None:
            sent = text
            start, field.released = field.released, field.released + len(text)
            field.fed = field.released
        else:
            result = window.finish(text) if final else window.feed(text)
            self._take(result)
            sent = result.text
            field.fed += len(text)
            start = field.released
            field.released = field.fed - window.held_chars if result.blocked is None else field.fed
        if field.aligner is not None:
            if entries:
                field.aligner.push(entries, text, self.shape.token_of)
            self._due(field, start, text, sent, due, key, cut=result_blocked(window))
        return sent

    def _due(
        self, field: Field, start: int, text: str, sent: str, due: dict[FieldKey, list[Any]], key: FieldKey, cut: bool
    ) -> None:
        aligner = field.aligner
        assert aligner is not None
        field.held += text
        released = field.released - start
        original, field.held = field.held[:released], field.held[released:]
        ready = aligner.release(start, field.released, original, sent)
        if cut:
            aligner.cut()  # the blocked rest never goes out, nor do its entries
        if ready:
            alternatives = self.alternatives
            if alternatives is not None:
                ready = [self.shape.filter_alternatives(entry, alternatives.passes) for entry in ready]
            due.setdefault(key, []).extend(ready)

    def _take(self, result: Any) -> None:
        self.actions.extend(result.actions)
        if result.blocked is not None and self.blocked is None:
            self.blocked = result.blocked

    def flush(self, holder: Any, state: ChoiceState, due: dict[FieldKey, list[Any]]) -> bool:
        """A choice ends: its windows' held text goes into ``holder``."""
        placed = False
        for key, field in state.fields.items():
            window = field.window
            if window is None or window.finished:
                continue
            start = field.released
            result = window.finish()
            self._take(result)
            field.released = field.fed
            if field.aligner is not None:
                self._due(field, start, "", result.text, due, key, cut=result.blocked is not None)
            if result.text and isinstance(holder, dict):
                self.shape.place(holder, key, result.text)
                self.delivered = placed = True
        return placed

    def end_choice(
        self, choice: dict[str, Any], holder: Any, state: ChoiceState, reason: str, due: dict[FieldKey, list[Any]]
    ) -> None:
        """End a choice here: held text that passes goes out, then ``reason``."""
        self.flush(holder, state, due)
        for field in state.fields.values():
            if field.aligner is not None:
                field.aligner.cut()
        choice["finish_reason"] = reason
        state.finished = True

    def completion_tokens(self) -> int:
        return sum(f.counter.total() for state in self.choices.values() for f in state.fields.values())


def result_blocked(window: Any) -> bool:
    return window is not None and window.blocked is not None


def moderate_choices(shape: ChoiceShape, document: dict[str, Any], ctx: AnswerContext, logprobs: bool) -> Moderated:
    """A whole answer: each choice's fields moderated as one window each would, capped and counted."""
    core = Choices(shape, ctx, logprobs)
    choices = document.get("choices")
    changed = False
    for choice in choices if isinstance(choices, list) else ():
        if not isinstance(choice, dict):
            continue
        holder = shape.holder(choice, True)
        choice_changed, _, _ = core.moderate(choice, holder, final=True)
        changed = changed or choice_changed
        if core.blocked is not None:
            core.blocked = None  # a block ends its own choice; the others are moderated on their own
    usage = usage_from(document.get("usage"), "prompt_tokens", "completion_tokens")
    capped = any(state.capped for state in core.choices.values())
    counted = core.completion_tokens() if capped or usage is None or usage.completion is None else 0
    if capped and usage is not None:
        usage = Usage(usage.prompt, counted)
    return Moderated(jsonio.dumps(document) if changed else b"", core.actions, usage, counted)
