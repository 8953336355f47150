"""Rewriting a streamed answer chunk by chunk, with no I/O.

``StreamRewriter`` takes the ``data`` of each upstream event and returns the
bytes to send the client. It moderates the text of every choice and of every
tool call's arguments in a window of its own, captures the upstream's usage
(and hides it from clients that did not ask for it), keeps the text it saw for
counting when no usage comes, and turns a block into the
``finish_reason: "content_filter"`` ending. A chunk that needs no change is
forwarded as the very bytes that arrived: no re-encoding on the fast path.

Nor, mostly, any parsing: after a stream's first plain text chunk, the next
ones are usually that chunk again with another word in it. ``_TextSlot``
remembers where the word sits, and a chunk that matches it around the word
is handled from its text alone.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import TYPE_CHECKING, Any

from .sse import DONE, encode_data

if TYPE_CHECKING:
    from .moderation import Action, ModerationEngine


def _dumps(value: Any) -> bytes:
    """Compact UTF-8 JSON, as providers send it: no escaping of every non-ASCII character.

    A lone surrogate (legal in JSON's \\u escapes, not in UTF-8) keeps its escape.
    """
    try:
        return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()
    except UnicodeEncodeError:
        return json.dumps(value, separators=(",", ":")).encode()


class UpstreamStreamError(Exception):
    """The upstream stream cannot be relayed further (bad JSON, an error event)."""


def error_event(message: str, code: str = "upstream_error") -> bytes:
    body = {"error": {"message": message, "type": "upstream_error", "param": None, "code": code}}
    return encode_data(_dumps(body))


class _Choice:
    """Per choice: its moderation windows and the raw text seen, for counting."""

    __slots__ = ("content_window", "tool_windows", "seen", "finished")

    def __init__(self, engine: ModerationEngine | None):
        self.content_window = engine.stream("output") if engine else None
        self.tool_windows: dict[int, Any] = {}
        self.seen: list[str] = []
        self.finished = False


class _TextSlot:
    """A chunk already parsed, as the JSON around its one choice's text: ``prefix``, then the
    text as a JSON string, then ``suffix``.

    Any chunk spelt ``prefix`` + another JSON string + ``suffix`` parses to that chunk with
    the other text (a JSON string is one token: swapping it leaves the rest of the parse as
    it was), so it can be moderated and rewritten without ``json.loads``. Only a chunk the
    general path would have handled as plain text, with nothing else to do, becomes a slot.
    """

    __slots__ = ("keep_when_held", "prefix", "state", "suffix")

    def __init__(self, prefix: str, suffix: str, state: _Choice, keep_when_held: bool):
        self.prefix = prefix
        self.suffix = suffix
        self.state = state
        self.keep_when_held = keep_when_held  # the chunk has more than its text (a role): sent even if the window holds it all

    def text_of(self, data: str) -> str | None:
        """The text of ``data`` if it is this slot's chunk with a text that needs no unescaping, else None."""
        prefix, suffix = self.prefix, self.suffix
        if not (data.startswith(prefix) and data.endswith(suffix)):
            return None
        literal = data[len(prefix) : len(data) - len(suffix)]
        text = literal[1:-1]
        # No quote or backslash inside and nothing JSON forbids raw (isprintable is False for
        # control characters): the literal is one JSON string, and its text is what it spells.
        if len(literal) < 3 or literal[0] != '"' or literal[-1] != '"' or '"' in text or "\\" in text:
            return None
        return text if text.isprintable() else None

    def chunk_with(self, text: str) -> bytes:
        try:
            return (self.prefix + _json_string(text) + self.suffix).encode()
        except UnicodeEncodeError:  # a lone surrogate (from a rule's replacement): only its escape can carry it
            return (self.prefix + json.dumps(text) + self.suffix).encode()


# How many times a stream may look for a slot: a provider whose chunks differ by more
# than the text (a per-chunk nonce, several choices taking turns) gets the general path
# after that, without paying for the search at every chunk.
_SLOT_SEARCHES = 4


class StreamRewriter:
    """The pure core of streaming: upstream event data in, client bytes out.

    ``text_field`` is ``"content"`` inside ``delta`` for chat and ``"text"`` on
    the choice itself for legacy completions.
    """

    def __init__(self, engine: ModerationEngine | None, *, chat: bool, client_wants_usage: bool):
        self._engine = engine if engine is not None and engine.has_rules("output") else None
        self._chat = chat
        self._text_key = "content" if chat else "text"
        self._edits: list[tuple[str, str]] = []
        self._reshaped = False
        self._client_wants_usage = client_wants_usage
        self._choices: dict[int, _Choice] = {}
        self._envelope: dict[str, Any] = {}  # id, object, created, model of the last chunk
        self.usage: dict[str, Any] | None = None
        self.actions: list[Action] = []
        self.blocked: Action | None = None
        self.done = False  # [DONE] seen, or ended by a block
        self.delivered_text = False  # some answer text has gone to the client
        self._slot: _TextSlot | None = None
        self._slot_searches = _SLOT_SEARCHES
        self._plain_text: str | None = None  # the text of the chunk at hand, if it may become a slot

    # -- events -------------------------------------------------------------

    def event(self, data: str) -> bytes:
        """One upstream event's data; returns what to write (possibly nothing)."""
        if self.done:
            return b""
        if data == "[DONE]":
            return self.finish()
        slot = self._slot
        if slot is not None:
            text = slot.text_of(data)
            if text is not None and not slot.state.finished:
                return self._event_in_slot(slot, data, text)
        try:
            chunk = json.loads(data)
        except ValueError:
            raise UpstreamStreamError("The upstream sent an event that is not valid JSON.") from None
        if not isinstance(chunk, dict):
            raise UpstreamStreamError("The upstream sent an event that is not a JSON object.")
        if chunk.get("error") or ("error" in chunk and "choices" not in chunk):
            raise UpstreamStreamError(_upstream_error_message(chunk["error"]))
        for field in ("id", "object", "created", "model"):
            if field in chunk:
                self._envelope[field] = chunk[field]

        changed = False
        self._edits = []  # (old, new) texts the windows changed in this chunk
        self._reshaped = False  # anything else changed: a field added or removed, a choice dropped
        usage = chunk.get("usage")
        if usage is not None:
            self.usage = usage
            if not self._client_wants_usage:
                if not chunk.get("choices"):
                    return b""
                del chunk["usage"]
                changed = self._reshaped = True

        choices = chunk.get("choices")
        self._plain_text = None
        if isinstance(choices, list):
            kept = []
            for choice in choices:
                if not isinstance(choice, dict):
                    kept.append(choice)
                    continue
                keep, choice_changed = self._choice(choice)
                changed = changed or choice_changed
                if keep:
                    kept.append(choice)
                else:
                    changed = self._reshaped = True
                if self.blocked is not None:
                    break
            if changed:
                # One choice, so its text field is the only one the splice could find.
                spliceable = len(choices) == 1 and not self._reshaped and self.blocked is None
                spliced = _splice(data, self._edits, self._text_key) if spliceable else None
                if spliced is not None:
                    out = encode_data(spliced)
                elif not kept and not chunk.get("usage"):
                    out = b""
                else:
                    chunk["choices"] = kept
                    out = encode_data(_dumps(chunk))
            else:
                out = encode_data(data.encode())
            if self.blocked is not None:
                out += self._end_after_block()
            elif self._plain_text is not None and len(choices) == 1 and usage is None and self._slot_searches:
                self._find_slot(data, choices[0])
            return out
        return encode_data(_dumps(chunk) if changed else data.encode())

    def _event_in_slot(self, slot: _TextSlot, data: str, text: str) -> bytes:
        """What ``event`` does with a chunk of the slot's shape, from its text alone."""
        state = slot.state
        state.seen.append(text)
        window = state.content_window
        released = text if window is None else self._feed(window, text)
        if released:
            self.delivered_text = True
        if self.blocked is not None:
            # Rare enough to take the long way: the chunk parsed, then as ``_choice`` ends a block.
            chunk = json.loads(data)
            choice = chunk["choices"][0]
            (choice["delta"] if self._chat else choice)[self._text_key] = released
            self._end_blocked_choice(choice, state)
            return encode_data(_dumps(chunk)) + self._end_after_block()
        if released == text:
            return encode_data(data.encode())
        if not released and not slot.keep_when_held:
            return b""
        return encode_data(slot.chunk_with(released))

    def _find_slot(self, data: str, choice: Any) -> None:
        """Remember where this chunk's text sits, if the chunk is plain text and the place is certain."""
        holder = choice.get("delta") if self._chat else choice
        state = self._choices.get(choice.get("index", 0))
        text = self._plain_text
        if state is None or state.finished or not isinstance(holder, dict) or text is None:
            return
        self._slot_searches -= 1
        for needle, literal in _field_spellings(self._text_key, text):
            at = data.find(needle)
            while at != -1:
                start = at + len(needle) - len(literal)
                prefix, suffix = data[:start], data[start + len(literal) :]
                if self._is_text_slot(prefix, suffix):
                    others = {name: value for name, value in holder.items() if name != self._text_key}
                    keep = "role" in holder or _has_visible_payload(others, self._chat)
                    self._slot = _TextSlot(prefix, suffix, state, keep)
                    return
                at = data.find(needle, at + 1)

    def _is_text_slot(self, prefix: str, suffix: str) -> bool:
        """Whether the JSON string between ``prefix`` and ``suffix`` is the text field of the one choice.

        Proved by parsing the chunk once with a text no chunk can have there (a NUL: a slot's text is printable).
        """
        try:
            probe = json.loads(prefix + '"\\u0000"' + suffix)
            choice = probe["choices"][0]
            holder = choice["delta"] if self._chat else choice
            return holder[self._text_key] == "\0"
        except (ValueError, LookupError, TypeError):
            return False

    def finish(self) -> bytes:
        """The upstream said [DONE]: flush every window, then [DONE]."""
        if self.done:
            return b""
        out = self._flush_all(finish_reason=None)
        self.done = True
        return out + DONE

    def all_choices_finished(self) -> bool:
        return bool(self._choices) and all(c.finished for c in self._choices.values())

    def flush_before_error(self) -> bytes:
        """The stream broke: release what the windows hold (moderated) before the error event."""
        if self.done:
            return b""
        out = self._flush_all(finish_reason=None)
        self.done = True
        return out

    def completion_texts(self) -> list[str]:
        """The raw text of each choice as the upstream sent it (what it will bill)."""
        return ["".join(c.seen) for c in self._choices.values()]

    # -- choices ------------------------------------------------------------

    def _choice(self, choice: dict[str, Any]) -> tuple[bool, bool]:
        """Moderate one choice in place; return (keep it, it changed)."""
        index = choice.get("index", 0)
        if not isinstance(index, int):
            raise UpstreamStreamError("The upstream sent a choice whose index is not a number.")
        state = self._choices.get(index)
        if state is None:
            state = self._choices[index] = _Choice(self._engine)
        holder = choice.get("delta") if self._chat else choice
        finish_reason = choice.get("finish_reason")
        changed = False
        had_payload = False
        if isinstance(holder, dict):
            text = holder.get(self._text_key)
            if isinstance(text, str) and text:
                if state.finished and self._engine is not None:
                    # Its window is closed: moderated alone, this text could complete a match unseen.
                    raise UpstreamStreamError("The upstream sent more text for a choice that had already finished.")
                had_payload = True
                state.seen.append(text)
                if state.content_window is not None:
                    released = self._feed(state.content_window, text)
                    if released != text:
                        holder[self._text_key] = released
                        self._edits.append((text, released))
                        changed = True
                    text = released
                if text:
                    self.delivered_text = True
            tool_calls = holder.get("tool_calls") if self._chat else None
            if isinstance(tool_calls, list):
                had_payload = True
                if self._tool_calls(state, tool_calls):
                    changed = self._reshaped = True
            elif had_payload and finish_reason is None:
                self._plain_text = state.seen[-1]  # this chunk's text, as it came
        if finish_reason is not None:
            state.finished = True
            if self.blocked is None and self._flush_choice(state, holder):
                changed = self._reshaped = True
        if self.blocked is not None:
            self._end_blocked_choice(choice, state)
            return True, True
        if changed and had_payload and finish_reason is None:
            # A text-only chunk whose text the window holds back entirely is skipped, not sent empty.
            return _has_visible_payload(holder, self._chat) or "role" in holder, True
        return True, changed

    @staticmethod
    def _end_blocked_choice(choice: dict[str, Any], state: _Choice) -> None:
        """The blocked choice ends here, with the text before the match and nothing after."""
        choice["finish_reason"] = "content_filter"
        state.finished = True
        state.content_window = None
        state.tool_windows = {}

    def _tool_calls(self, state: _Choice, tool_calls: list[Any]) -> bool:
        changed = False
        for call in tool_calls:
            if not isinstance(call, dict):
                continue
            function = call.get("function")
            arguments = function.get("arguments") if isinstance(function, dict) else None
            if not isinstance(arguments, str) or not arguments:
                continue
            state.seen.append(arguments)
            if self._engine is None:
                continue
            if not isinstance(call.get("index", 0), int):
                raise UpstreamStreamError("The upstream sent a tool call whose index is not a number.")
            window = state.tool_windows.get(call.get("index", 0))
            if window is None:
                window = state.tool_windows[call.get("index", 0)] = self._engine.stream("output")
            released = self._feed(window, arguments)
            if released != arguments:
                function["arguments"] = released
                changed = True
            if self.blocked is not None:
                break
        return changed

    def _feed(self, window: Any, text: str) -> str:
        result = window.feed(text)
        self._take(result)
        return result.text

    def _take(self, result: Any) -> None:
        self.actions.extend(result.actions)
        if result.blocked is not None and self.blocked is None:
            self.blocked = result.blocked

    def _flush_choice(self, state: _Choice, holder: Any) -> bool:
        """At a choice's finish: its held-back text goes into this (final) chunk."""
        changed = False
        if state.content_window is not None:
            result = state.content_window.finish()
            self._take(result)
            if result.text and isinstance(holder, dict):
                holder[self._text_key] = (holder.get(self._text_key) or "") + result.text
                self.delivered_text = True
                changed = True
        for tool_index, window in state.tool_windows.items():
            result = window.finish()
            self._take(result)
            if result.text and isinstance(holder, dict):
                calls = holder.setdefault("tool_calls", [])
                calls.append({"index": tool_index, "function": {"arguments": result.text}})
                changed = True
        state.content_window = None
        state.tool_windows = {}
        return changed

    def _flush_all(self, finish_reason: str | None) -> bytes:
        """Release the windows of every unfinished choice as synthetic chunks."""
        out = b""
        for index, state in self._choices.items():
            if state.content_window is None and not state.tool_windows:
                continue
            holder: dict[str, Any] = {}
            self._flush_choice(state, holder)
            reason = "content_filter" if self.blocked is not None else finish_reason
            if holder or reason:
                out += self._synthetic_chunk(index, holder, reason)
        return out

    def _end_after_block(self) -> bytes:
        """After a block: flush the other choices, end each with content_filter, then [DONE]."""
        out = b""
        for index, state in self._choices.items():
            if state.finished:
                continue
            holder: dict[str, Any] = {}
            self._flush_choice(state, holder)
            state.finished = True
            out += self._synthetic_chunk(index, holder, "content_filter")
        self.done = True
        return out + DONE

    def _synthetic_chunk(self, index: int, holder: dict[str, Any], finish_reason: str | None) -> bytes:
        choice: dict[str, Any] = {"index": index}
        if self._chat:
            choice["delta"] = holder
        else:
            choice["text"] = holder.get("text", "")
        choice["finish_reason"] = finish_reason
        chunk = {**self._envelope, "choices": [choice]}
        return encode_data(_dumps(chunk))

def _splice(data: str, edits: list[tuple[str, str]], key: str) -> bytes | None:
    """The event ``data`` with each edited text swapped in place, or None to re-encode instead.

    Most moderated chunks change only their text (the window holds a few
    characters back or releases them later): swapping the JSON string in the
    upstream's own bytes keeps every other field as the provider wrote it and
    costs less than encoding the whole chunk again. Anything unusual (a text
    spelled some other way, or a lone surrogate only an escape can carry) is
    left to the full re-encode.
    """
    for old, new in edits:
        swapped = _swap_once(data, key, old, new)
        if swapped is None:
            return None
        data = swapped
    try:
        return data.encode()
    except UnicodeEncodeError:
        return None


def _swap_once(data: str, key: str, old: str, new: str) -> str | None:
    """``"key": old`` replaced by ``"key": new`` if it appears exactly once in one of its spellings."""
    for needle, spelling in _field_spellings(key, old):
        if data.count(needle) == 1:
            return data.replace(needle, needle[: -len(spelling)] + _json_string(new))
    return None


def _field_spellings(key: str, text: str) -> Iterator[tuple[str, str]]:
    """``"key":`` and ``text`` as a JSON string, each way Python's json spells it (raw or
    ASCII-escaped, with or without a space after the colon): the whole, and the string alone."""
    plain = _json_string(text)
    escaped = plain if text.isascii() else json.dumps(text)
    for spelling in (plain,) if escaped == plain else (plain, escaped):
        for separator in (":", ": "):
            yield f'"{key}"{separator}{spelling}', spelling


def _json_string(text: str) -> str:
    """``json.dumps(text, ensure_ascii=False)``; a streamed word is usually printable ASCII
    with nothing to escape, and quoting it costs a fraction of the call."""
    if text.isascii() and text.isprintable() and '"' not in text and "\\" not in text:
        return f'"{text}"'
    return json.dumps(text, ensure_ascii=False)


def _has_visible_payload(holder: dict[str, Any], chat: bool) -> bool:
    if holder.get("content" if chat else "text"):
        return True
    calls = holder.get("tool_calls")
    if not isinstance(calls, list):
        return False
    for call in calls:
        function = call.get("function") if isinstance(call, dict) else None
        if not isinstance(call, dict) or call.get("id") or (isinstance(function, dict) and (function.get("name") or function.get("arguments"))):
            return True
    return False


def _upstream_error_message(error: Any) -> str:
    if isinstance(error, dict) and isinstance(error.get("message"), str):
        return f"The upstream reported an error: {error['message']}"
    return "The upstream reported an error."
