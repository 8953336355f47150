"""The answer shape Chat Completions and Completions share: a list of choices, each with text fields.

``ChoicesRewriter`` is the pure core of such a stream, and ``moderate_choices``
of such a whole answer. Which fields of a choice hold text is the adapter's
knowledge, given as a ``ChoiceShape``; this module only applies the rules:

* every text field of every choice (the answer, reasoning, a refusal, each
  tool call's arguments) has a moderation window and a token counter of its
  own, so any split of a field into chunks moderates and counts exactly like
  the whole field;
* a chunk whose text the windows changed is re-encoded, one they did not is
  sent as the very bytes that came; a chunk whose text is all held back, with
  nothing else to show, is not sent;
* at a choice's finish its windows' held text goes into that chunk; at the
  end of the stream, into one chunk per choice;
* a block ends the blocked choice with the text before the match and
  ``finish_reason: "content_filter"``, ends every other choice the same way,
  then ``[DONE]``;
* the answer cap: a choice whose counted tokens reach ``ctx.cap`` ends there
  with ``finish_reason: "length"``; once every choice has finished and one
  was cut, the stream ends without waiting for the upstream;
* logprob entries follow their text (``logprobs.LogprobsAligner``).
"""

from __future__ import annotations

import abc
from collections.abc import Hashable
from typing import Any

import orjson

from .. import jsonio
from ..stream.sse import DONE, encode_data
from ..token_counter import StreamingTokenCounter
from .base import AnswerContext, End, EventRewriter, Moderated, StreamBroken, Usage, usage_from
from .logprobs import AlternativesFilter, LogprobsAligner
from .slot import TextSlot

FieldKey = Hashable
_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint", "service_tier")


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


class _Field:
    """One text field of one choice: its window, counter and logprobs."""

    __slots__ = ("aligner", "counter", "fed", "held", "released", "window")

    def __init__(self, window: Any, counter: StreamingTokenCounter, logprobs: bool):
        self.window = window
        self.counter = counter
        self.fed = 0  # original characters fed to the window
        self.released = 0  # of which released (sent or replaced)
        self.held = ""  # the original text not yet released, kept only to align logprobs
        self.aligner = LogprobsAligner(0) if logprobs else None


class _Choice:
    __slots__ = ("capped", "fields", "finished", "room")

    def __init__(self, cap: int | None) -> None:
        self.fields: dict[FieldKey, _Field] = {}
        self.finished = False
        self.capped = False
        self.room = cap or 0  # tokens the answer cap surely still allows (see ``_fit``)


class _Choices:
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
        self.choices: dict[int, _Choice] = {}
        self.actions: list[Any] = []
        self.blocked: Any = None
        self.delivered = False

    def state(self, choice: dict[str, Any]) -> tuple[int, _Choice]:
        index = choice.get("index", 0)
        if not isinstance(index, int) or isinstance(index, bool):
            raise StreamBroken("The upstream sent a choice whose index is not a number.")
        state = self.choices.get(index)
        if state is None:
            state = self.choices[index] = _Choice(self.cap)
        return index, state

    def _field(self, state: _Choice, key: FieldKey) -> _Field:
        field = state.fields.get(key)
        if field is None:
            window = self.engine.stream("output") if self.engine is not None else None
            field = state.fields[key] = _Field(window, StreamingTokenCounter(self.ctx.model), self.logprobs)
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

    def _fit(self, state: _Choice, field: _Field, text: str) -> str:
        """``text``, or as much of it as the answer cap leaves this choice.

        ``state.room`` is what the cap leaves beyond an upper bound of the
        choice's tokens; a chunk costs at most one token per UTF-8 byte, so
        most chunks only subtract. When the room runs out, the choice's
        tokens are counted exactly and the room is set again from them.
        """
        cost = len(text) if text.isascii() else 4 * len(text)
        if cost <= state.room:
            state.room -= cost
            return text
        cap = self.cap
        assert cap is not None
        for f in state.fields.values():
            f.counter.settle_now()
        others = sum(f.counter.total() for f in state.fields.values() if f is not field)
        fitted, total = field.counter.fit(text, cap - others)
        state.room = cap - others - total
        return fitted

    def _feed(
        self, field: _Field, text: str, entries: list[Any] | None, final: bool, due: dict[FieldKey, list[Any]], key: FieldKey
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
        self, field: _Field, start: int, text: str, sent: str, due: dict[FieldKey, list[Any]], key: FieldKey, cut: bool
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

    def flush(self, holder: Any, state: _Choice, due: dict[FieldKey, list[Any]]) -> bool:
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
        self, choice: dict[str, Any], holder: Any, state: _Choice, reason: str, due: dict[FieldKey, list[Any]]
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


class ChoicesRewriter(EventRewriter):
    """A Chat Completions or Completions stream: upstream event data in, client bytes out."""

    def __init__(self, shape: ChoiceShape, ctx: AnswerContext, logprobs: bool):
        super().__init__()
        self._core = _Choices(shape, ctx, logprobs)
        self.actions = self._core.actions
        self._shape = shape
        self._ctx = ctx
        self._envelope: dict[str, Any] | None = None
        self._usage: Usage | None = None
        self._passthrough = self._core.engine is None and ctx.cap is None  # counted, sent as it came
        self._slot: TextSlot | None = None
        self._slot_field: tuple[_Choice, _Field] | None = None
        # How many times a stream may look for a slot: a provider whose chunks differ by more
        # than the text (a per-chunk nonce, several choices taking turns) gets the general
        # path after that, without paying for the search at every chunk.
        self._slot_searches = 0 if logprobs and self._core.logprobs else 4

    # -- events ---------------------------------------------------------------

    def event(self, event: Any) -> bytes:
        data = event.data
        if self.end is not None:
            return b""
        if data == "[DONE]":
            out = self._flush_all()
            self.end = self._ended()
            return out + DONE
        slot = self._slot
        if slot is not None:
            text = slot.text_of(data)
            if text is not None:
                out = self._in_slot(slot, data, text)
                if out is not None:
                    return out
        try:
            chunk = orjson.loads(data)
        except orjson.JSONDecodeError:
            chunk = self._loads(data)
        if chunk.__class__ is not dict:
            raise StreamBroken("The upstream sent an event that is not a JSON object.")
        if "error" in chunk:
            error = chunk["error"]
            message = error.get("message") if isinstance(error, dict) else None
            raise StreamBroken(
                f"The upstream reported an error: {message}" if isinstance(message, str) else "The upstream reported an error."
            )
        if self._envelope is None:
            self._envelope = {name: chunk[name] for name in _ENVELOPE if name in chunk}
        if "usage" in chunk or "x_groq" in chunk:
            self._take_usage(chunk)
        choices = chunk.get("choices")
        if not isinstance(choices, list) or not choices:
            if choices == [] and "usage" in chunk and not self._ctx.client_wants_usage:
                return b""  # the usage chunk the gateway asked for, not the client
            return encode_data(data.encode())
        if self._passthrough:
            self._count_only(choices)
            out = encode_data(data.encode())
        else:
            out = self._rewrite(data, chunk, choices)
        if self._slot_searches and self.end is None and len(choices) == 1:
            self._find_slot(data, choices[0], chunk)
        return out

    # -- the slot: chunks shaped like the last plain one -------------------------

    def _find_slot(self, data: str, choice: Any, chunk: dict[str, Any]) -> None:
        """After a plain text chunk (one choice, one text field, nothing to finish), remember its shape."""
        core = self._core
        if not isinstance(choice, dict) or choice.get("finish_reason") or chunk.get("usage"):
            return  # (OpenAI writes "usage": null on every chunk of a stream that asked for it)
        self._slot_searches -= 1
        original = orjson.loads(data)["choices"][0]  # the text as it came, before the window
        holder = self._shape.holder(original, False)
        fields = self._shape.fields(holder) if isinstance(holder, dict) else []
        if len(fields) != 1 or fields[0][1] is not holder or fields[0][2] != fields[0][0]:
            return  # only a text field of the holder itself (not a tool call's arguments)
        key = text_name = fields[0][0]
        text = holder[text_name]
        index, state = core.state(choice)
        field = state.fields.get(key)
        if field is None or state.finished:
            return
        others = {name: value for name, value in holder.items() if name != key}
        shape = self._shape

        def locate(parsed: Any) -> Any:
            return shape.holder(parsed["choices"][0], False)[key]

        found = TextSlot.find(data, text, key, shape.shows(others), locate)
        if found is not None:
            self._slot, self._slot_field = found, (state, field)

    def _in_slot(self, slot: TextSlot, data: str, text: str) -> bytes | None:
        """What the general path would send for a chunk of the slot's shape, from its text alone
        (None: let the general path take it)."""
        assert self._slot_field is not None
        state, field = self._slot_field
        core = self._core
        if state.finished or core.cap is not None and core._fit(state, field, text) != text:
            return None
        field.counter.add(text)
        window = field.window
        if window is None:
            if text:
                core.delivered = self.delivered_text = True
            return encode_data(data.encode())
        result = window.feed(text)
        if result.actions:
            core._take(result)
        sent = result.text
        if sent:
            core.delivered = self.delivered_text = True
        if core.blocked is not None:
            # Rare enough to take the long way: the chunk parsed, ended as the general path ends a block.
            chunk = orjson.loads(data)
            choice = chunk["choices"][0]
            holder = self._shape.holder(choice, False)
            holder[slot.key] = sent
            core.end_choice(choice, holder, state, "content_filter", {})
            self.end = End("blocked")
            return encode_data(jsonio.dumps(chunk)) + self._end_others("content_filter") + DONE
        if sent == text:
            return encode_data(data.encode())
        if not sent and not slot.keep_when_held:
            return b""
        return encode_data(slot.chunk_with(sent))

    @staticmethod
    def _loads(data: str) -> Any:
        try:
            return jsonio.loads(data)  # what only the standard library reads (a lone surrogate, NaN)
        except (ValueError, RecursionError):
            raise StreamBroken("The upstream sent an event that is not valid JSON.") from None

    def _take_usage(self, chunk: dict[str, Any]) -> None:
        usage = usage_from(chunk.get("usage"), "prompt_tokens", "completion_tokens")
        groq = chunk.get("x_groq")
        if usage is None and isinstance(groq, dict):
            usage = usage_from(groq.get("usage"), "prompt_tokens", "completion_tokens")
        if usage is not None:
            # Cumulative on every chunk for some providers: the last one is the total, never a sum.
            prior = self._usage
            self._usage = Usage(
                usage.prompt if usage.prompt is not None else (prior.prompt if prior else None),
                usage.completion if usage.completion is not None else (prior.completion if prior else None),
            )

    def _count_only(self, choices: list[Any]) -> None:
        core = self._core
        for choice in choices:
            if isinstance(choice, dict):
                _, state = core.state(choice)
                holder = self._shape.holder(choice, False)
                if isinstance(holder, dict):
                    for key, container, name in self._shape.fields(holder):
                        core._field(state, key).counter.add(container[name])
                        core.delivered = True
                if choice.get("finish_reason"):
                    state.finished = True
        self.delivered_text = core.delivered

    def _rewrite(self, data: str, chunk: dict[str, Any], choices: list[Any]) -> bytes:
        core = self._core
        kept: list[Any] = []
        changed = False
        for choice in choices:
            if not isinstance(choice, dict):
                kept.append(choice)
                continue
            if choice.get("finish_reason") == "":
                choice["finish_reason"] = None  # some providers' spelling of "not yet"
            prior = core.choices.get(choice.get("index", 0))
            if prior is not None and prior.capped:
                changed = True
                continue  # cut at the answer cap: nothing more of it is sent
            holder = self._shape.holder(choice, False)
            choice_changed, had_text, due = core.moderate(choice, holder, final=False)
            changed = changed or choice_changed
            if (
                choice_changed
                and had_text
                and not choice.get("finish_reason")
                and not due
                and not (isinstance(holder, dict) and self._shape.shows(holder))
            ):
                continue  # all its text is held back and it shows nothing else: not sent
            kept.append(choice)
            if core.blocked is not None:
                break
        self.delivered_text = core.delivered
        if not changed and len(kept) == len(choices):
            out = encode_data(data.encode())
        elif kept or "usage" in chunk:
            chunk["choices"] = kept
            out = encode_data(jsonio.dumps(chunk))
        else:
            out = b""
        if core.blocked is not None:
            out += self._end_others("content_filter")
            self.end = End("blocked")
            return out + DONE
        states = core.choices.values()
        if any(state.capped for state in states) and all(state.finished for state in states):
            out += self._usage_chunk() + DONE
            self.end = End("capped")
        return out

    # -- endings --------------------------------------------------------------

    def _synthetic(self, index: int, holder: dict[str, Any], reason: str | None, due: dict[FieldKey, list[Any]]) -> bytes:
        choice = self._shape.synthetic(index, holder, reason)
        if due:
            self._shape.put_logprobs(choice, due)
        return encode_data(jsonio.dumps({**(self._envelope or {}), "choices": [choice]}))

    def _flush_all(self) -> bytes:
        """Release every unfinished choice's windows, one chunk each (``content_filter`` if that blocked)."""
        core = self._core
        flushed = []
        for index, state in core.choices.items():
            if state.finished:
                continue
            holder: dict[str, Any] = {}
            due: dict[FieldKey, list[Any]] = {}
            core.flush(holder, state, due)
            state.finished = True
            flushed.append((index, holder, due))
        self.delivered_text = core.delivered
        reason = "content_filter" if core.blocked is not None else None
        return b"".join(
            self._synthetic(index, holder, reason, due) for index, holder, due in flushed if holder or reason or due
        )

    def _ended(self) -> End:
        return End("blocked" if self._core.blocked is not None else "done")

    def _end_others(self, reason: str) -> bytes:
        out = b""
        core = self._core
        for index, state in core.choices.items():
            if state.finished:
                continue
            holder: dict[str, Any] = {}
            choice: dict[str, Any] = {}
            due: dict[FieldKey, list[Any]] = {}
            core.end_choice(choice, holder, state, reason, due)
            out += self._synthetic(index, holder, reason, due)
        return out

    def _usage_chunk(self) -> bytes:
        if not self._ctx.client_wants_usage:
            return b""
        prompt, completion = self.usage(0)
        usage = {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}
        return encode_data(jsonio.dumps({**(self._envelope or {}), "choices": [], "usage": usage}))

    def upstream_closed(self) -> bytes:
        if self.end is not None:
            return b""
        states = self._core.choices.values()
        if not states or not all(state.finished for state in states):
            raise StreamBroken("The upstream closed the stream before it was complete.")
        out = self._flush_all()
        self.end = self._ended()
        return out + DONE

    def broken(self, message: str, code: str) -> bytes:
        out = b"" if self.end is not None else self._flush_all()
        body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
        return out + encode_data(jsonio.dumps(body))

    def usage(self, prompt_tokens: int) -> tuple[int, int]:
        usage = self._usage or Usage(None, None)
        prompt = usage.prompt if usage.prompt is not None else prompt_tokens
        if usage.completion is None or self.end is not None and self.end.kind == "capped":
            return prompt, self._core.completion_tokens()  # counted only when the provider did not say
        return prompt, usage.completion


def moderate_choices(shape: ChoiceShape, document: dict[str, Any], ctx: AnswerContext, logprobs: bool) -> Moderated:
    """A whole answer: each choice's fields moderated as one window each would, capped and counted."""
    core = _Choices(shape, ctx, logprobs)
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
