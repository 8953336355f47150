"""Server-sent events: an incremental decoder and the encoder, with no I/O.

The decoder follows the WHATWG event-stream rules in the sans-I/O style of
h11: feed it bytes exactly as they came off the socket, split anywhere, and it
returns the events completed so far. It never waits, never reads a socket and
never looks at the clock, so every split of a byte stream can be tested to
decode to the same events.
"""

from __future__ import annotations

from typing import NamedTuple

_BOM = b"\xef\xbb\xbf"


class Event(NamedTuple):
    """One dispatched event. ``data`` joins multi-line ``data:`` fields with ``\\n``.

    A tuple, not a frozen dataclass: one is built per streamed chunk.
    """

    data: str
    event: str | None = None
    id: str | None = None
    retry: int | None = None


class EventTooLarge(Exception):
    """An event grew past ``max_event_bytes``: the stream is unsafe to keep buffering.

    ``events`` are the ones completed in the same ``feed`` before it: they are
    good and must still be delivered.
    """

    def __init__(self, message: str, events: list[Event] | None = None):
        super().__init__(message)
        self.events = events or []


class SSEDecoder:
    """Bytes in, events out. Call ``feed`` per received chunk and ``finish`` at EOF."""

    def __init__(self, max_event_bytes: int | None = None):
        self._max_event_bytes = max_event_bytes
        self._buffer = b""  # the start of a line whose end has not arrived
        self._after_cr = False  # the last chunk ended in CR: a leading LF is part of that line end
        self._at_stream_start = True
        self._data: list[str] = []
        self._data_bytes = 0
        self._event_type: str | None = None
        self._last_id: str | None = None
        self._retry: int | None = None

    def feed(self, chunk: bytes) -> list[Event]:
        if chunk[:6] == b"data: " and chunk[-2:] == b"\n\n" and self._between_events():
            # The usual chunk, one whole one-line event: decoded without splitting it into lines.
            data = chunk[6:-2]
            if b"\n" not in data and b"\r" not in data and (
                self._max_event_bytes is None or len(chunk) - 2 <= self._max_event_bytes
            ):
                return [Event(data.decode("utf-8", errors="replace"), None, self._last_id, self._retry)]
        if self._after_cr and chunk[:1] == b"\n":
            chunk = chunk[1:]
        self._after_cr = False
        if not chunk:
            return []
        buffer = self._buffer + chunk if self._buffer else chunk
        if self._at_stream_start:
            if len(buffer) < len(_BOM) and _BOM.startswith(buffer):
                self._buffer = buffer
                return []
            self._at_stream_start = False
            if buffer.startswith(_BOM):
                buffer = buffer[len(_BOM) :]
        if b"\r" in buffer:
            self._after_cr = buffer.endswith(b"\r")
            buffer = buffer.replace(b"\r\n", b"\n").replace(b"\r", b"\n")
        events: list[Event] = []
        start = 0
        find = buffer.find
        try:
            while (end := find(b"\n", start)) != -1:
                event = self._line(buffer[start:end])
                if event is not None:
                    events.append(event)
                start = end + 1
            self._buffer = buffer[start:]
            self._check_size(len(self._buffer))
        except EventTooLarge as exc:
            raise EventTooLarge(str(exc), events) from None
        return events

    def _between_events(self) -> bool:
        """Nothing of an event has arrived since the last one was dispatched (and the stream has begun)."""
        return not (self._buffer or self._data or self._after_cr or self._at_stream_start) and self._event_type is None

    def finish(self) -> list[Event]:
        """End of stream: a last line and event without their terminators still count."""
        events = []
        if self._buffer:
            line, self._buffer = self._buffer, b""
            event = self._line(line)
            if event is not None:
                events.append(event)
        event = self._dispatch()
        if event is not None:
            events.append(event)
        return events

    def _check_size(self, pending: int) -> None:
        if self._max_event_bytes is not None and self._data_bytes + pending > self._max_event_bytes:
            raise EventTooLarge(f"an event exceeded {self._max_event_bytes} bytes")

    def _line(self, raw: bytes) -> Event | None:
        if not raw:
            return self._dispatch()
        if raw[0] == 0x3A:  # ":" starts a comment, such as a keep-alive
            return None
        line = raw.decode("utf-8", errors="replace")
        field, colon, value = line.partition(":")
        if colon and value[:1] == " ":
            value = value[1:]
        if field == "data":
            self._data.append(value)
            self._data_bytes += len(raw)
            self._check_size(0)
        elif field == "event":
            self._event_type = value
        elif field == "id":
            if "\0" not in value:
                self._last_id = value
        elif field == "retry":
            if value.isascii() and value.isdigit():
                self._retry = int(value)
        return None

    def _dispatch(self) -> Event | None:
        if not self._data:
            self._event_type = None
            return None
        event = Event("\n".join(self._data), self._event_type, self._last_id, self._retry)
        self._data = []
        self._data_bytes = 0
        self._event_type = None
        return event


DONE = b"data: [DONE]\n\n"
KEEPALIVE = b": keep-alive\n\n"


def encode_data(data: bytes) -> bytes:
    """One ``data:`` event; a payload with newlines becomes several data lines."""
    if b"\n" in data:
        data = data.replace(b"\n", b"\ndata: ")
    return b"data: " + data + b"\n\n"
