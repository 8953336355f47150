"""A stream's life, with no I/O: upstream bytes in, client bytes and one outcome out.

``StreamPipeline`` joins the SSE decoder to the format's ``EventRewriter``
and is the one place that decides how a stream ends. Every call returns the
bytes to send and the ``StreamEnd`` once there is one; after that every call
returns no bytes and the same end. The ends:

* ``done``: the answer ended as the format ends it (``[DONE]``, a terminal event);
* ``blocked``: a rule blocked the answer; the format's block ending was sent;
* ``capped``: the gateway's answer cap was reached; the format's length ending was sent;
* ``upstream_error``: the upstream broke, closed early, sent what cannot be
  relayed (bad JSON, an event over ``max_event_bytes``, its own error): what
  the windows held (moderated), then the format's error event;
* ``timeout``: the upstream went silent past its read timeout; the same ending;
* ``client_gone``: the client left; nothing more is sent.

The shell (``relay``) reads, feeds and writes; it never looks at an event.
Feeding the same upstream bytes whole, byte by byte or split anywhere gives
the same bytes out and the same end (``tests/test_stream_pipeline.py``).
"""

from __future__ import annotations

from typing import NamedTuple

from ..formats.base import EventRewriter, StreamBroken
from .sse import EventTooLarge, SSEDecoder


class StreamEnd(NamedTuple):
    kind: str
    code: str | None = None  # the error code the client was sent, if the stream ended in error

    @property
    def answered(self) -> bool:
        """The client got the answer's own ending (the upstream may be released for reuse)."""
        return self.kind in ("done", "blocked", "capped")


_DONE_KINDS = {"done", "blocked", "capped"}


class StreamPipeline:
    def __init__(self, rewriter: EventRewriter, max_event_bytes: int | None = None):
        self.rewriter = rewriter
        self._decoder = SSEDecoder(max_event_bytes)
        self.end: StreamEnd | None = None

    @property
    def delivered_text(self) -> bool:
        return self.rewriter.delivered_text

    def feed(self, data: bytes) -> tuple[bytes, StreamEnd | None]:
        """Bytes as they came off the upstream socket."""
        if self.end is not None:
            return b"", self.end
        try:
            events = self._decoder.feed(data)
        except EventTooLarge as exc:
            out = self._events(exc.events)
            if self.end is None:
                out += self._fail(f"The upstream sent an event larger than the limit ({exc}).", "upstream_error")
            return out, self.end
        if len(events) == 1:  # the usual read: one event, without the loop
            rewriter = self.rewriter
            try:
                out = rewriter.event(events[0])
            except StreamBroken as exc:
                return self._fail(str(exc), "upstream_error"), self.end
            if rewriter.end is not None:
                self._take_end()
            return out, self.end
        return self._events(events), self.end

    def upstream_closed(self) -> tuple[bytes, StreamEnd]:
        """The upstream's body ended."""
        if self.end is not None:
            return b"", self.end
        out = self._events(self._decoder.finish())
        if self.end is None:
            try:
                out += self.rewriter.upstream_closed()
            except StreamBroken as exc:
                out += self._fail(str(exc), "upstream_error")
            else:
                self._take_end()
        assert self.end is not None
        return out, self.end

    def upstream_failed(self, message: str, code: str = "upstream_error") -> tuple[bytes, StreamEnd]:
        """The upstream connection broke (``code`` upstream_error) or went silent (upstream_timeout)."""
        if self.end is not None:
            return b"", self.end
        return self._fail(message, code), self.end  # type: ignore[return-value]

    def client_gone(self) -> StreamEnd:
        if self.end is None:
            self.end = StreamEnd("client_gone")
        return self.end

    def count_unsent(self, data: bytes) -> None:
        """Upstream bytes read but never fed when the client left: counted for billing, never sent.

        The upstream produced them, so they are billed (DESIGN: a hang-up counts
        the tokens so far). They pass through the rewriter as any event would,
        its output dropped, so its usage (counted, or the upstream's own usage
        chunk if it is among them) covers them. Only after ``client_gone``, and
        only until the rewriter sees the answer's own end.
        """
        if self.end is None or self.end.kind != "client_gone" or self.rewriter.end is not None:
            return
        try:
            events = self._decoder.feed(data)
        except EventTooLarge as exc:
            events = exc.events
        for event in events:
            try:
                self.rewriter.event(event)
            except StreamBroken:
                return
            if self.rewriter.end is not None:
                return

    def _events(self, events: list) -> bytes:
        out = b""
        rewriter = self.rewriter
        for event in events:
            try:
                out += rewriter.event(event)
            except StreamBroken as exc:
                return out + self._fail(str(exc), "upstream_error")
            if rewriter.end is not None:
                self._take_end()
                break
        return out

    def _take_end(self) -> None:
        end = self.rewriter.end
        assert end is not None and end.kind in _DONE_KINDS
        self.end = StreamEnd(end.kind)

    def _fail(self, message: str, code: str) -> bytes:
        out = self.rewriter.broken(message, code)
        self.end = StreamEnd("timeout" if code == "upstream_timeout" else "upstream_error", code)
        return out
