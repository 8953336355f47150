"""A Responses API stream's pure core: upstream events in, the client's bytes out.

Invariants (``tests/test_responses_stream.py``):

* every event goes out as ``event: <name>`` / ``data: <json>``, in the
  upstream's order, with the upstream's event name; ``sequence_number`` counts
  from 0 in what is sent, so a delta that is dropped (all its text held back)
  or an event the gateway adds leaves no gap;
* each text field (``responses_output``) has its own window: a delta carries
  what the window released, a ``*.done`` event, ``response.content_part.done``,
  ``response.reasoning_summary_part.done``, ``response.output_item.done`` and
  the final response carry exactly the text that was sent. Text a window lets
  go only at such a repeat is sent first as a delta of the gateway's own, so
  the deltas always add up to the repeat. A re-cut delta loses its
  ``obfuscation`` (it pads the upstream's length); logprob entries go with
  the delta that sends their text, and every repeat has all that were sent;
* a block or the answer cap: the text before it, the done events of every
  open part and item with the text sent (items ``incomplete``), then
  ``response.incomplete`` with ``incomplete_details.reason``
  ``content_filter`` or ``max_output_tokens``; nothing after it;
* ``response.completed``, ``response.incomplete`` and ``response.failed`` end
  the answer as the upstream sent them, moderated; an ``error`` event (or a
  top-level ``error`` object) cannot be relayed: ``StreamBroken``, and
  ``broken`` ends the stream with an ``error`` event of the gateway's.
"""

from __future__ import annotations

from typing import Any

from .. import jsonio
from ..stream.sse import encode_data
from .base import AnswerContext, End, EventRewriter, StreamBroken, Usage, usage_from
from .responses_events import DELTA_OF_ITEM, DELTA_OF_PART, DELTAS, DONES, LIFECYCLE, PARTS, TERMINAL, is_index
from .responses_output import (
    CONTENT_FILTER,
    MAX_OUTPUT_TOKENS,
    Key,
    OutputTexts,
    item_texts,
    part_text_name,
    settle_output,
)


class ResponsesRewriter(EventRewriter):
    def __init__(self, ctx: AnswerContext, logprobs: bool = False):
        super().__init__()
        self._texts = OutputTexts(ctx, logprobs)
        self.actions = self._texts.actions
        self._seq = 0
        self._response: dict[str, Any] | None = None  # the last lifecycle envelope
        self._items: dict[int, dict[str, Any]] = {}  # each output item as the client knows it
        self._open_items: dict[int, None] = {}
        self._open_parts: dict[Key, dict[str, Any]] = {}
        self._delta_types: dict[Key, str] = {}
        self._done_sent: set[Key] = set()
        self._usage: Usage | None = None

    # -- events ---------------------------------------------------------------

    def event(self, event: Any) -> bytes:
        if self.end is not None:
            return b""
        try:
            obj = jsonio.loads(event.data)
        except (ValueError, RecursionError):
            raise StreamBroken("The upstream sent an event that is not valid JSON.") from None
        if not isinstance(obj, dict):
            raise StreamBroken("The upstream sent an event that is not a JSON object.")
        kind = obj.get("type")
        if not isinstance(kind, str) and not isinstance(obj.get("error"), dict):
            raise StreamBroken("The upstream sent an event without a type.")
        if kind == "error" or isinstance(obj.get("error"), dict) and kind not in TERMINAL:
            error = obj.get("error") if isinstance(obj.get("error"), dict) else obj
            message = error.get("message")
            detail = f": {message}" if isinstance(message, str) else "."
            raise StreamBroken(f"The upstream reported an error{detail}")
        name = event.event or kind
        raw: str | None = event.data
        out = b""
        if kind in DELTAS:
            out, raw = self._delta(obj, kind, raw)
        elif kind in DONES:
            out, raw = self._done(obj, kind, raw)
        elif kind in PARTS:
            out, raw = self._part(obj, kind, raw)
        elif kind in ("response.output_item.added", "response.output_item.done"):
            out, raw = self._item(obj, kind, raw)
        elif kind in LIFECYCLE:
            raw = self._lifecycle(obj, raw)
        elif kind in TERMINAL:
            out, raw, name = self._terminal(obj, name, raw)
        if raw != "":  # "" marks an event with nothing left to send
            out += self._emit(name, obj, raw)
        self.delivered_text = self._texts.delivered
        cut = self._texts.cut
        if cut is not None and self.end is None:
            out += self._close(cut)
            self.end = End("blocked" if cut == CONTENT_FILTER else "capped")
        return out

    def _key(self, obj: dict[str, Any], kind: str, index_field: str | None) -> Key:
        output_index = obj.get("output_index")
        index = obj.get(index_field, 0) if index_field else 0
        if not is_index(output_index) or not is_index(index):
            raise StreamBroken("The upstream sent a text event without a valid output_index.")
        if isinstance(obj.get("item_id"), str) and output_index not in self._items:
            self._items[output_index] = {"id": obj["item_id"]}
        return output_index, kind, index

    def _delta(self, obj: dict[str, Any], kind: str, raw: str | None) -> tuple[bytes, str | None]:
        field_kind, index_field, _, _ = DELTAS[kind]
        key = self._key(obj, field_kind, index_field)
        delta = obj.get("delta")
        if not isinstance(delta, str):
            raise StreamBroken("The upstream sent a delta whose text is not a string.")
        self._delta_types.setdefault(key, kind)
        sent = self._texts.feed(key, delta, obj.get("logprobs"))
        if not sent:
            return b"", ""  # its entries, if any, go with the text they belong to
        if sent != delta:
            obj["delta"] = sent
            obj.pop("obfuscation", None)  # it pads the upstream's delta, not this one
            raw = None
        if self._texts.delta_logprobs(key, obj):
            raw = None
        return b"", raw

    def _done(self, obj: dict[str, Any], kind: str, raw: str | None) -> tuple[bytes, str | None]:
        field_kind, index_field, name, delta_type = DONES[kind]
        key = self._key(obj, field_kind, index_field)
        self._delta_types.setdefault(key, delta_type)
        whole, released = self._texts.settle(key, obj.get(name), obj.get("logprobs"))
        out = self._released(key, released)
        if obj.get(name) != whole:
            obj[name] = whole
            raw = None
        if self._texts.whole_logprobs(key, obj):
            raw = None
        self._done_sent.add(key)
        return out, raw

    def _part(self, obj: dict[str, Any], kind: str, raw: str | None) -> tuple[bytes, str | None]:
        field_kind, index_field, list_name = PARTS[kind]
        key = self._key(obj, field_kind, index_field)
        part = obj.get("part")
        if not isinstance(part, dict):
            return b"", raw
        name = part_text_name(part)
        if part.get("type") in DELTA_OF_PART:
            self._delta_types.setdefault(key, DELTA_OF_PART[part["type"]])
        text = part.get(name)
        out = b""
        if kind.endswith(".added"):
            self._open_parts[key] = part
            parts = self._items.setdefault(key[0], {}).setdefault(list_name, [])
            if isinstance(parts, list):
                parts.append(part)
            sent = self._texts.feed(key, text) if isinstance(text, str) and text else text
        else:
            sent, released = self._texts.settle(key, text)
            out = self._released(key, released)
            self._open_parts.pop(key, None)
            self._replace_part(key, list_name, part)
        if isinstance(text, str) and sent != text:
            part[name] = sent
            raw = None
        if self._texts.whole_logprobs(key, part):
            raw = None
        return out, raw

    def _replace_part(self, key: Key, list_name: str, part: dict[str, Any]) -> None:
        parts = self._items.get(key[0], {}).get(list_name)
        if isinstance(parts, list):
            if key[2] < len(parts):
                parts[key[2]] = part
            else:
                parts.append(part)

    def _item(self, obj: dict[str, Any], kind: str, raw: str | None) -> tuple[bytes, str | None]:
        output_index = obj.get("output_index")
        item = obj.get("item")
        if not is_index(output_index) or not isinstance(item, dict):
            raise StreamBroken("The upstream sent an output item event without its item or output_index.")
        out = b""
        added = kind.endswith(".added")
        for field_kind, index, container, name in list(item_texts(item)):
            key = (output_index, field_kind, index)
            if item.get("type") in DELTA_OF_ITEM:
                self._delta_types.setdefault(key, DELTA_OF_ITEM[item["type"]])
            if added:
                sent = self._texts.feed(key, container[name]) if container[name] else ""
            else:
                sent, released = self._texts.settle(key, container[name])
                out += self._released(key, released)
            if sent != container[name]:
                container[name] = sent
                raw = None
            if self._texts.whole_logprobs(key, container):
                raw = None
        self._items[output_index] = item
        if added:
            self._open_items[output_index] = None
        else:
            self._open_items.pop(output_index, None)
            for key in [key for key in self._open_parts if key[0] == output_index]:
                del self._open_parts[key]
        return out, raw

    def _lifecycle(self, obj: dict[str, Any], raw: str | None) -> str | None:
        response = obj.get("response")
        if not isinstance(response, dict):
            return raw
        self._response = response
        output = response.get("output")
        for i, item in enumerate(output if isinstance(output, list) else ()):
            if isinstance(item, dict):
                for field_kind, index, container, name in item_texts(item):
                    sent = self._texts.sent((i, field_kind, index))  # nothing is taken from a snapshot
                    if container[name] != sent:
                        container[name] = sent
                        raw = None
        return raw

    def _terminal(self, obj: dict[str, Any], name: str, raw: str | None) -> tuple[bytes, str | None, str]:
        response = obj.get("response")
        out = b""
        if isinstance(response, dict):
            self._usage = usage_from(response.get("usage"), "input_tokens", "output_tokens")
            output = response.get("output")
            if isinstance(output, list):
                released: list[bytes] = []
                if settle_output(self._texts, output, lambda key, _, text: released.append(self._released(key, text))):
                    raw = None
                out = b"".join(released)
            cut = self._texts.cut
            if cut is not None:  # text only the final response had, blocked or past the cap
                response["status"] = "incomplete"
                response["incomplete_details"] = {"reason": cut}
                obj["type"] = name = "response.incomplete"
                raw = None
                self.end = End("blocked" if cut == CONTENT_FILTER else "capped")
                return out, raw, name
        self.end = End("done")
        return out, raw, name

    # -- what the gateway sends of its own ---------------------------------------

    def _emit(self, name: str, obj: dict[str, Any], raw: str | None = None) -> bytes:
        seq = self._seq
        self._seq += 1
        if raw is not None and obj.get("sequence_number") == seq:
            data = raw.encode()
        else:
            obj["sequence_number"] = seq
            data = jsonio.dumps(obj)
        return b"event: " + name.encode() + b"\n" + encode_data(data)

    def _where(self, key: Key) -> dict[str, Any]:
        output_index, kind, index = key
        item_id = self._items.get(output_index, {}).get("id")
        where: dict[str, Any] = {"item_id": item_id, "output_index": output_index}
        if kind == "summary":
            where["summary_index"] = index
        elif kind == "content":
            where["content_index"] = index
        return where

    def _released(self, key: Key, text: str) -> bytes:
        """Text a window let go only at a repeat: a delta of the gateway's own, before it."""
        if not text:
            return b""
        kind = self._delta_types.get(key, "response.output_text.delta")
        obj = {"type": kind, **self._where(key), "delta": text}
        if kind == "response.output_text.delta":
            obj["logprobs"] = []
            self._texts.delta_logprobs(key, obj)
        return self._emit(kind, obj)

    def _close(self, reason: str) -> bytes:
        """Every open part and item ends with the text sent, then ``response.incomplete``."""
        out = b""
        texts = self._texts
        for output_index in list(self._open_items):
            item = self._items[output_index]
            for field_kind, index, container, name in list(item_texts(item)):
                key = (output_index, field_kind, index)
                whole, released = texts.settle(key, None)
                out += self._released(key, released)
                container[name] = whole
                texts.whole_logprobs(key, container)
                if key not in self._done_sent and key in self._delta_types:
                    kind = self._delta_types[key]
                    done = DELTAS[kind][2]
                    obj = {"type": done, **self._where(key), DELTAS[kind][3]: whole}
                    if done == "response.output_text.done":
                        obj["logprobs"] = []
                        texts.whole_logprobs(key, obj)
                    out += self._emit(done, obj)
                    self._done_sent.add(key)
                part = self._open_parts.pop(key, None)
                if part is not None:
                    part_event = (
                        "response.reasoning_summary_part.done" if field_kind == "summary" else "response.content_part.done"
                    )
                    out += self._emit(part_event, {"type": part_event, **self._where(key), "part": part})
            if "status" in item or item.get("type") in ("message", "function_call"):
                item["status"] = "incomplete"
            out += self._emit(
                "response.output_item.done",
                {"type": "response.output_item.done", "output_index": output_index, "item": item},
            )
            del self._open_items[output_index]
        response = dict(self._response or {"object": "response"})
        response.update(
            status="incomplete",
            incomplete_details={"reason": reason},
            error=None,
            output=[self._items[i] for i in sorted(self._items) if "type" in self._items[i]],
            usage=None,
        )
        return out + self._emit("response.incomplete", {"type": "response.incomplete", "response": response})

    # -- the end ----------------------------------------------------------------

    def upstream_closed(self) -> bytes:
        if self.end is None:
            raise StreamBroken("The upstream closed the stream before its final event.")
        return b""

    def broken(self, message: str, code: str) -> bytes:
        out = b""
        if self.end is None:
            for key, field in list(self._texts.fields.items()):
                if not field.finished:
                    out += self._released(key, self._texts.settle(key, None)[1])
        error = {"type": "error", "code": code, "message": message, "param": None}
        return out + self._emit("error", error)

    def usage(self, prompt_tokens: int) -> tuple[int, int]:
        counted = self._texts.completion_tokens()
        usage = self._usage
        prompt = usage.prompt if usage is not None and usage.prompt is not None else prompt_tokens
        if usage is None or usage.completion is None or self._texts.cut == MAX_OUTPUT_TOKENS:
            return prompt, counted
        return prompt, usage.completion

