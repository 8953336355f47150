"""A Messages API stream (``POST /v1/messages``, ``stream: true``): upstream events in, client bytes out.

Anthropic's stream is ``event: <type>`` / ``data: <json>`` pairs, and the
SDK dispatches on the ``event:`` line (a frame without one is dropped), so
every frame goes out with its ``event:`` line, in the order it came:
``message_start``, then per content block ``content_block_start``,
``content_block_delta``..., ``content_block_stop``, then ``message_delta``
and ``message_stop``; ``ping`` anywhere. Invariants:

* each content block has a moderation window and a token counter of its own,
  over the field its deltas carry (``text_delta.text``,
  ``thinking_delta.thinking``, ``input_json_delta.partial_json``); any split
  of a block into deltas moderates and counts like the whole block;
  ``signature_delta`` and every other delta pass untouched;
* a delta the window did not change goes out as the very bytes that came; one
  whose text is all held back is not sent; ``content_block_stop`` first sends
  what that block's window still holds, as one more delta;
* a block: the text before the match, ``content_block_stop`` of every open
  block, ``message_delta`` with ``stop_reason: "refusal"``, ``message_stop``
  (``End("blocked")``); the answer cap (``ctx.cap``) ends it the same way with
  ``stop_reason: "max_tokens"`` (``End("capped")``); nothing is sent after
  ``message_stop``, whoever wrote it;
* usage: input from ``message_start`` (cache reads and writes included: they
  are prompt tokens too), output from the last ``message_delta`` (cumulative:
  the last one is the total, never a sum); when the gateway ended the answer
  itself, or the stream broke, the tokens counted over every block;
* an upstream ``event: error`` is relayed unchanged as the last frame (clients
  such as Claude Code read its wording to recover); any other failure ends
  with an ``event: error`` of the gateway's own (``api_error``, or
  ``timeout_error`` for a silent upstream).
"""

from __future__ import annotations

from typing import Any

from .. import jsonio
from ..token_counter import AnswerCap, StreamingTokenCounter
from .base import AnswerContext, End, EventRewriter, StreamBroken

# The field of each moderated delta type that holds its text.
TEXT_DELTAS = {"text_delta": "text", "thinking_delta": "thinking", "input_json_delta": "partial_json"}
# The delta type that carries each block type's text.
BLOCK_DELTAS = {"text": "text_delta", "thinking": "thinking_delta", "tool_use": "input_json_delta"}
# content_block_start: the field of each block type that may already hold text.
_START_FIELDS = {"text": "text", "thinking": "thinking"}


def frame(name: str, data: bytes) -> bytes:
    """One event with its ``event:`` line; data with newlines becomes several data lines."""
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"event: " + name.encode() + b"\ndata: " + data + b"\n\n"


def event_frame(body: dict[str, Any]) -> bytes:
    return frame(body["type"], jsonio.dumps(body))


def error_event(error_type: str, message: str) -> bytes:
    return event_frame({"type": "error", "error": {"type": error_type, "message": message}})


class _Block:
    """One content block: its window and counter; ``open`` until its content_block_stop is sent."""

    __slots__ = ("counter", "delta_type", "open", "window")

    def __init__(self, delta_type: str | None, window: Any, counter: StreamingTokenCounter):
        self.delta_type = delta_type  # the delta that carries its text (None: a block without text)
        self.window = window
        self.counter = counter
        self.open = True


class MessagesRewriter(EventRewriter):
    def __init__(self, ctx: AnswerContext):
        super().__init__()
        self._ctx = ctx
        self._cap: AnswerCap | None = None  # made at the first capped chunk
        engine = ctx.engine
        self._engine = engine if engine is not None and engine.has_rules("output") else None
        self._blocks: dict[int, _Block] = {}
        self._input: int | None = None  # prompt tokens the upstream reported
        self._output: int | None = None  # the last message_delta's output_tokens
        self._upstream_error: bytes | None = None  # an upstream error event, relayed by ``broken``

    # -- events ---------------------------------------------------------------

    def event(self, event: Any) -> bytes:
        if self.end is not None:
            return b""
        data = event.data
        if event.event == "ping":
            return frame("ping", data.encode())
        try:
            body = jsonio.loads(data)
        except (ValueError, RecursionError):
            raise StreamBroken("The upstream sent an event that is not valid JSON.") from None
        if not isinstance(body, dict):
            raise StreamBroken("The upstream sent an event that is not a JSON object.")
        kind = body.get("type")
        name = event.event or kind  # a frame that came without its event: line gets it back
        if not isinstance(name, str) or not name:
            raise StreamBroken("The upstream sent an event without a type.")
        if name == "error" or kind == "error":
            self._upstream_error = frame("error", data.encode())
            error = body.get("error")
            message = error.get("message") if isinstance(error, dict) else None
            raise StreamBroken(
                f"The upstream reported an error: {message}" if isinstance(message, str) else "The upstream reported an error."
            )
        if kind == "content_block_delta":
            return self._delta(name, data, body)
        if kind == "content_block_start":
            return self._start(name, data, body)
        if kind == "content_block_stop":
            return self._stop(name, data, body)
        if kind == "message_start":
            message = body.get("message")
            self._take_usage(message.get("usage") if isinstance(message, dict) else None)
        elif kind == "message_delta":
            self._take_usage(body.get("usage"))
        elif kind == "message_stop":
            out = self._close_all()
            if self.end is None:
                self.end = End("done")
                out += frame(name, data.encode())
            return out
        return frame(name, data.encode())

    def _index(self, body: dict[str, Any]) -> int:
        index = body.get("index")
        if not isinstance(index, int) or isinstance(index, bool):
            raise StreamBroken("The upstream sent a content block event whose index is not a number.")
        return index

    def _start(self, name: str, data: str, body: dict[str, Any]) -> bytes:
        index = self._index(body)
        if index in self._blocks:
            raise StreamBroken("The upstream started a content block twice.")
        content = body.get("content_block")
        block_type = content.get("type") if isinstance(content, dict) else None
        delta_type = BLOCK_DELTAS.get(block_type) if isinstance(block_type, str) else None
        window = self._engine.stream("output") if self._engine is not None and delta_type else None
        block = self._blocks[index] = _Block(delta_type, window, StreamingTokenCounter(self._ctx.model))
        field = _START_FIELDS.get(block_type) if isinstance(block_type, str) else None
        text = content.get(field) if field else None
        if not isinstance(text, str) or not text:
            return frame(name, data.encode())
        # A block that starts with text of its own: that text goes through the window, as a delta.
        content[field] = ""
        return frame(name, jsonio.dumps(body)) + self._text(index, block, {"type": delta_type, field: text}, field, None)

    def _delta(self, name: str, data: str, body: dict[str, Any]) -> bytes:
        index = self._index(body)
        delta = body.get("delta")
        field = TEXT_DELTAS.get(delta.get("type")) if isinstance(delta, dict) else None
        if field is None or not isinstance(delta.get(field), str):
            return frame(name, data.encode())  # signature_delta, citations_delta, ...: untouched
        block = self._blocks.get(index)
        if block is None or not block.open:
            raise StreamBroken("The upstream sent text for a content block that is not open.")
        return self._text(index, block, delta, field, data)

    def _text(self, index: int, block: _Block, delta: dict[str, Any], field: str, data: str | None) -> bytes:
        """One piece of a block's text: capped, counted, moderated; the bytes to send for it."""
        text = delta[field]
        capped = False
        if self._ctx.cap is not None:
            fitted = self._fit(block, text)
            capped = fitted != text
            text = fitted
        block.counter.add(text)
        window = block.window
        if window is None:
            sent, blocked = text, False
        else:
            result = window.feed(text)
            self.actions.extend(result.actions)
            sent, blocked = result.text, result.blocked is not None
        out = b""
        if sent:
            self.delivered_text = True
            if sent == delta[field] and data is not None:
                out = frame("content_block_delta", data.encode())
            else:
                delta[field] = sent
                out = self._delta_frame(index, delta)
        if blocked:
            return out + self._finish("refusal", End("blocked"))
        if capped:
            return out + self._finish("max_tokens", End("capped"))
        return out

    def _fit(self, block: _Block, text: str) -> str:
        """``text``, or as much of it as the answer cap leaves (the cap spans every block)."""
        if self._cap is None:
            self._cap = AnswerCap(self._ctx.cap)  # type: ignore[arg-type]
        return self._cap.fit((b.counter for b in self._blocks.values()), block.counter, text)

    def _stop(self, name: str, data: str, body: dict[str, Any]) -> bytes:
        index = self._index(body)
        block = self._blocks.get(index)
        if block is None or not block.open:
            raise StreamBroken("The upstream stopped a content block that is not open.")
        out = self._flush(index, block)
        if self.end is not None:  # the block's last text completed a blocked match
            return out
        block.open = False
        return out + frame(name, data.encode())

    def _flush(self, index: int, block: _Block) -> bytes:
        """What the block's window holds, as one more delta; a block found there ends the answer."""
        out, blocked = self._release_held(index, block)
        return out + self._finish("refusal", End("blocked")) if blocked else out

    def _release_held(self, index: int, block: _Block) -> tuple[bytes, bool]:
        """The block's window finished: its held text as a delta, and whether a block was found in it."""
        window = block.window
        if window is None or window.finished:
            return b"", False
        result = window.finish()
        self.actions.extend(result.actions)
        out = b""
        if result.text:
            self.delivered_text = True
            out = self._delta_frame(index, {"type": block.delta_type, TEXT_DELTAS[block.delta_type]: result.text})
        return out, result.blocked is not None

    def _delta_frame(self, index: int, delta: dict[str, Any]) -> bytes:
        return event_frame({"type": "content_block_delta", "index": index, "delta": delta})

    # -- endings --------------------------------------------------------------

    def _close_all(self) -> bytes:
        """message_stop: every block still open sends what its window holds, then its content_block_stop."""
        out = b""
        for index, block in self._blocks.items():
            if block.open:
                out += self._flush(index, block)
                if self.end is not None:
                    return out
                block.open = False
                out += event_frame({"type": "content_block_stop", "index": index})
        return out

    def _finish(self, stop_reason: str, end: End) -> bytes:
        """The gateway ends the answer: every open block stopped, then Anthropic's own ending.

        At the cap, what the windows hold is within the cap and goes out
        (moderated); after a block, the other blocks' held text is dropped.
        """
        self.end = end
        out = b""
        for index, block in self._blocks.items():
            if not block.open:
                continue
            if stop_reason == "max_tokens":
                held, blocked = self._release_held(index, block)
                out += held
                if blocked:
                    stop_reason, self.end = "refusal", End("blocked")
            block.open = False
            out += event_frame({"type": "content_block_stop", "index": index})
        message_delta = {
            "type": "message_delta",
            "delta": {"stop_reason": stop_reason, "stop_sequence": None},
            "usage": {"output_tokens": self._counted()},
        }
        return out + event_frame(message_delta) + event_frame({"type": "message_stop"})

    def upstream_closed(self) -> bytes:
        if self.end is None:
            raise StreamBroken("The upstream closed the stream before message_stop.")
        return b""

    def broken(self, message: str, code: str) -> bytes:
        out = b""
        for index, block in self._blocks.items():
            if self.end is not None:
                return out  # a block found in what the windows held ended the answer: nothing after message_stop
            if block.open:
                out += self._flush(index, block)
        if self.end is not None:
            return out
        if self._upstream_error is not None:
            return out + self._upstream_error
        return out + error_event("timeout_error" if code == "upstream_timeout" else "api_error", message)

    # -- usage ----------------------------------------------------------------

    def _take_usage(self, usage: Any) -> None:
        if not isinstance(usage, dict):
            return
        prompt = input_tokens(usage)
        if prompt is not None:
            self._input = prompt
        output = _count(usage.get("output_tokens"))
        if output is not None:
            self._output = output  # cumulative: the latest is the total

    def _counted(self) -> int:
        return sum(block.counter.total() for block in self._blocks.values())

    def usage(self, prompt_tokens: int) -> tuple[int, int]:
        prompt = self._input if self._input is not None else prompt_tokens
        if self.end is not None and self.end.kind == "done" and self._output is not None:
            return prompt, self._output
        return prompt, self._counted()


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value >= 0 else None


def input_tokens(usage: dict[str, Any]) -> int | None:
    """Every prompt token Anthropic reports: uncached input plus cache writes and reads (None without input_tokens)."""
    uncached = _count(usage.get("input_tokens"))
    if uncached is None:
        return None
    cached = (_count(usage.get(name)) or 0 for name in ("cache_creation_input_tokens", "cache_read_input_tokens"))
    return uncached + sum(cached)
