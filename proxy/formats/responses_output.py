"""The text of a Responses API answer: every text field of every output item, each in its own window.

A field is named ``(output_index, kind, index)``: kind ``content`` for a
message's ``output_text`` or ``refusal`` part and a reasoning item's
``reasoning_text`` part (index: ``content_index``), ``summary`` for a
reasoning summary part (``summary_index``), ``arguments`` for a
``function_call``'s or ``mcp_call``'s arguments and ``input`` for a
``custom_tool_call``'s input (index 0). Item types not listed carry no text
a model wrote and pass as they came.

``OutputTexts`` is shared by a stream and a whole answer, so both moderate
and count the same text the same way:

* ``feed(key, piece)``: a delta's text in, the text to send now out (a window
  holds back only what could still start a match);
* ``settle(key, whole)``: the field's whole text as the upstream repeats it
  (a ``*.done`` event, a finished item, the final response): the part not fed
  yet is fed, the window finished, and the field's moderated text returned,
  with what this released beyond what was sent before. The repeat therefore
  carries exactly what the client was sent, never the upstream's text;
* the first block or the answer cap sets ``cut`` (``content_filter`` or
  ``max_output_tokens``); no new text is taken after it, only what the
  windows still hold is released, moderated;
* every field's tokens are counted as they come (the cap holds across all
  fields, reasoning summaries included);
* logprob entries (asked for with ``include: ["message.output_text.logprobs"]``)
  follow their text as in chat (``logprobs.LogprobsAligner``): an entry goes
  out once its text went out unchanged, never for text held, redacted or
  blocked; its alternatives only where each passes the rules alone. Without
  the request, output rules drop any entries an upstream sends.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

from ..token_counter import AnswerCap, StreamingTokenCounter
from .base import AnswerContext, StreamBroken
from .chat import SHAPE as CHAT_SHAPE  # a logprob entry is spelled as in chat
from .logprobs import AlternativesFilter, LogprobsAligner

Key = tuple[int, str, int]
CONTENT_FILTER = "content_filter"
MAX_OUTPUT_TOKENS = "max_output_tokens"

class _Field:
    """One text field: its window (None without output rules), its token counter, what it sent."""

    __slots__ = ("aligner", "counter", "due", "fed", "finished", "held", "logprobs", "released", "sent", "window")

    def __init__(self, window: Any, counter: StreamingTokenCounter, aligned: bool):
        self.window = window
        self.counter = counter
        self.fed = 0  # original characters taken
        self.sent: list[str] = []  # what was released, in order
        self.finished = False
        # Logprobs, when asked for: entries due and not yet sent, all sent, and the original text held.
        self.aligner = LogprobsAligner(0) if aligned else None
        self.released = 0
        self.held = ""
        self.due: list[Any] = []
        self.logprobs: list[Any] = []

    def text(self) -> str:
        if len(self.sent) > 1:
            self.sent = ["".join(self.sent)]
        return self.sent[0] if self.sent else ""


class OutputTexts:
    def __init__(self, ctx: AnswerContext, logprobs: bool = False):
        engine = ctx.engine if ctx.engine is not None and ctx.engine.has_rules("output") else None
        self.engine = engine
        self.aligning = logprobs and engine is not None  # without output rules entries pass as they came
        self.alternatives = (
            AlternativesFilter(lambda token: not engine.moderate(token, "output").actions) if self.aligning else None
        )
        self.model = ctx.model
        self.cap = ctx.cap
        self._cap: AnswerCap | None = None  # made at the first capped chunk
        self.fields: dict[Key, _Field] = {}
        self.actions: list[Any] = []
        self.cut: str | None = None
        self.delivered = False

    def field(self, key: Key) -> _Field:
        field = self.fields.get(key)
        if field is None:
            window = self.engine.stream("output") if self.engine is not None else None
            field = self.fields[key] = _Field(window, StreamingTokenCounter(self.model), self.aligning)
        return field

    def feed(self, key: Key, text: str, entries: Any = None) -> str:
        field = self.field(key)
        if field.finished:
            raise StreamBroken("The upstream sent more text for a part that had already finished.")
        return self._push(field, text, False, entries)

    def settle(self, key: Key, whole: Any, entries: Any = None) -> tuple[str, str]:
        """(the field's moderated text, what this call released); ``whole``: the upstream's full text, if any.

        ``entries``: the logprobs that came with ``whole``, used only when no delta brought any.
        """
        field = self.field(key)
        released = ""
        if not field.finished:
            rest = whole[field.fed :] if isinstance(whole, str) else ""
            released = self._push(field, rest, True, entries if field.fed == 0 else None)
        return field.text(), released

    def sent(self, key: Key) -> str:
        field = self.fields.get(key)
        return field.text() if field is not None else ""

    def _push(self, field: _Field, text: str, final: bool, entries: Any = None) -> str:
        if self.cut is not None:
            text = ""  # after a block or the cap only held text is released
        capped = False
        if text and self.cap is not None:
            fitted = self._fit(field, text)
            capped, text = fitted != text, fitted
        if text:
            field.counter.add(text)
            field.fed += len(text)
        window = field.window
        if window is None:
            sent = text
        else:
            result = window.finish(text) if final or capped else window.feed(text)
            self.actions.extend(result.actions)
            sent = result.text
            if result.blocked is not None:
                self.cut = CONTENT_FILTER
            if field.aligner is not None:
                self._align(field, text, entries, sent, result.blocked is not None or capped)
        if final or capped or window is not None and window.finished:
            field.finished = True
        if capped and self.cut is None:
            self.cut = MAX_OUTPUT_TOKENS
        if sent:
            field.sent.append(sent)
            self.delivered = True
        return sent

    def _align(self, field: _Field, text: str, entries: Any, sent: str, cut: bool) -> None:
        """The entries whose original text the window has now released unchanged become due."""
        aligner = field.aligner
        assert aligner is not None and field.window is not None
        if isinstance(entries, list) and entries:
            aligner.push(entries, text, _token_of)
        start = field.released
        field.released = field.fed - field.window.held_chars
        field.held += text
        original, field.held = field.held[: field.released - start], field.held[field.released - start :]
        ready = aligner.release(start, field.released, original, sent)
        if cut:
            aligner.cut()  # the rest never goes out, nor do its entries
        if ready:
            alternatives = self.alternatives
            assert alternatives is not None
            ready = [CHAT_SHAPE.filter_alternatives(entry, alternatives.passes) for entry in ready]
            field.due.extend(ready)
            field.logprobs.extend(ready)

    def _fit(self, field: _Field, text: str) -> str:
        """``text``, or as much of it as the answer cap leaves."""
        if self._cap is None:
            self._cap = AnswerCap(self.cap)  # type: ignore[arg-type]
        return self._cap.fit((f.counter for f in self.fields.values()), field.counter, text)

    def completion_tokens(self) -> int:
        return sum(f.counter.total() for f in self.fields.values())

    def delta_logprobs(self, key: Key, holder: dict[str, Any]) -> bool:
        """Give a delta the field's entries now due (none without output rules: they pass as they came)."""
        return self._place(holder, self._take_due(key))

    def whole_logprobs(self, key: Key, holder: dict[str, Any]) -> bool:
        """Give a repeat of the field's text every entry sent for it."""
        field = self.fields.get(key)
        return self._place(holder, field.logprobs if field is not None else [])

    def _take_due(self, key: Key) -> list[Any]:
        field = self.fields.get(key)
        if field is None or not field.due:
            return []
        due, field.due = field.due, []
        return due

    def _place(self, holder: dict[str, Any], entries: list[Any]) -> bool:
        if self.engine is None or not (entries or holder.get("logprobs")):
            return False
        if not self.aligning:
            entries = []  # not asked for: an upstream's entries would spell out the original tokens
        if holder.get("logprobs") == entries:
            return False
        holder["logprobs"] = list(entries)
        return True


def _token_of(entry: Any) -> Any:
    return entry.get("token") if isinstance(entry, dict) else None


def _parts(value: Any) -> Iterator[tuple[int, dict[str, Any]]]:
    if isinstance(value, list):
        for j, part in enumerate(value):
            if isinstance(part, dict):
                yield j, part


def part_text_name(part: dict[str, Any]) -> str:
    return "refusal" if part.get("type") == "refusal" else "text"


def item_texts(item: dict[str, Any]) -> Iterator[tuple[str, int, dict[str, Any], str]]:
    """(kind, index, container, name) of every text field of an output item, in order."""
    kind = item.get("type")
    if kind == "message":
        for j, part in _parts(item.get("content")):
            name = part_text_name(part)
            if part.get("type") in ("output_text", "refusal", "text") and isinstance(part.get(name), str):
                yield "content", j, part, name
    elif kind == "reasoning":
        for j, part in _parts(item.get("summary")):
            if isinstance(part.get("text"), str):
                yield "summary", j, part, "text"
        for j, part in _parts(item.get("content")):
            if isinstance(part.get("text"), str):
                yield "content", j, part, "text"
    elif kind in ("function_call", "mcp_call"):
        if isinstance(item.get("arguments"), str):
            yield "arguments", 0, item, "arguments"
    elif kind == "custom_tool_call":
        if isinstance(item.get("input"), str):
            yield "input", 0, item, "input"


Released = Callable[[Key, dict[str, Any], str], None]


def settle_output(texts: OutputTexts, output: list[Any], released: Released | None = None) -> bool:
    """Put each item's moderated text in place (``settle``); cut the output after the first block or the cap.

    What follows the cut is dropped: the later parts of the cut item and the
    later items; the cut item is marked ``incomplete``. ``released`` hears of
    text a window let go only now (a stream sends it as a delta first).
    Returns whether anything changed.
    """
    changed = False
    for i, item in enumerate(output):
        if not isinstance(item, dict):
            continue
        dropped: list[tuple[list[Any], dict[str, Any]]] = []
        cut_here = False
        for kind, j, container, name in list(item_texts(item)):
            if cut_here and container is not item:
                dropped.append((item["summary" if kind == "summary" else "content"], container))
                continue
            before = texts.cut
            entries = container.get("logprobs") if kind == "content" else None
            whole, new = texts.settle((i, kind, j), container[name], entries)
            if new and released is not None:
                released((i, kind, j), container, new)
            if whole != container[name]:
                container[name] = whole
                changed = True
            if kind == "content" and container.get("type") == "output_text":
                changed = texts.whole_logprobs((i, kind, j), container) or changed
            if before is None and texts.cut is not None:
                cut_here = True
        for parts, part in dropped:
            parts[:] = [kept for kept in parts if kept is not part]
        if cut_here:
            if "status" in item:
                item["status"] = "incomplete"
            del output[i + 1 :]
            return True
    return changed

