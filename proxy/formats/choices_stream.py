"""A Chat Completions or Completions stream's pure core: upstream event data in, client bytes out.

``ChoicesRewriter`` applies ``choices.Choices`` chunk by chunk. A chunk whose
text the windows changed is re-encoded; one they did not is sent as the very
bytes that came; a chunk whose text is all held back, with nothing else to
show, is not sent. A block ends every choice with ``content_filter``, then
``[DONE]``; once every choice has finished and one was cut at the answer
cap, the stream ends without waiting for the upstream. Most chunks are
handled from their text alone (``slot.TextSlot``).
"""

from __future__ import annotations

from typing import Any

import orjson

from .. import jsonio
from ..stream.sse import DONE, encode_data
from .base import AnswerContext, End, EventRewriter, StreamBroken, Usage, usage_from
from .choices import ChoiceShape, ChoiceState, Choices, Field, FieldKey
from .slot import TextSlot

_ENVELOPE = ("id", "object", "created", "model", "system_fingerprint", "service_tier")


class ChoicesRewriter(EventRewriter):
    """A Chat Completions or Completions stream: upstream event data in, client bytes out."""

    def __init__(self, shape: ChoiceShape, ctx: AnswerContext, logprobs: bool):
        super().__init__()
        self._core = Choices(shape, ctx, logprobs)
        self.actions = self._core.actions
        self._shape = shape
        self._ctx = ctx
        self._envelope: dict[str, Any] | None = None
        self._usage: Usage | None = None
        self._passthrough = self._core.engine is None and ctx.cap is None  # counted, sent as it came
        self._slot: TextSlot | None = None
        self._slot_field: tuple[ChoiceState, Field] | None = None
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
