"""Structured logs: structlog, one JSON object per line, request id on every line.

The request id is bound in a context variable by the server's middleware, so
every line logged while serving a request carries it without being passed
around. Secrets never reach a log call: the gateway only ever holds digests
of client keys and logs key ids, never keys.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import select
import sys
import time
from collections.abc import Callable
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


# The most bytes the kernel writes to a pipe in one piece (POSIX guarantees 512; Linux has 4096).
# Workers share the supervisor's stdout: a write of more than this to a pipe is not atomic, and
# the lines of another worker can land inside it.
PIPE_BUF = getattr(select, "PIPE_BUF", 4096)


def line_bytes(line: str) -> int:
    """``line``'s length written out in UTF-8 (stdout's encoding), plus its newline; cheap for the usual ASCII line.

    A lone surrogate is counted as the three bytes ``surrogatepass`` makes of
    it, no fewer than stdout's handlers write (``strict`` raises,
    ``surrogateescape`` writes one), so the count never falls short of what
    reaches the file.
    """
    return (len(line) if line.isascii() else len(line.encode("utf-8", "surrogatepass"))) + 1


def cut_writes(lines: list[str], limit: int = PIPE_BUF) -> list[str]:
    """``lines`` as the fewest writes of at most ``limit`` bytes each, cut only between lines.

    Invariants: every write is whole lines, each ending in ``"\n"``, in order;
    their concatenation is ``"\n".join(lines) + "\n"``; a write exceeds
    ``limit`` bytes only when it is a single line longer than that on its
    own, which no write can make atomic on a pipe (another process's line
    may then land inside it). Greedy: a write takes lines until the next
    would not fit, which for this packing is also the fewest writes.
    """
    writes: list[str] = []
    start, size = 0, 0
    for i, line in enumerate(lines):
        n = line_bytes(line)
        if size + n > limit and i > start:
            writes.append("\n".join(lines[start:i]) + "\n")
            start, size = i, 0
        size += n
    if start < len(lines):
        writes.append("\n".join(lines[start:] if start else lines) + "\n")
    return writes


class LineBatcher:
    """structlog's output: the lines logged in one event-loop turn go out in as few writes as can be atomic.

    A busy gateway logs a line per request, and writing and flushing each one
    is a system call per request, which cost more CPU than rendering the line.
    Lines are written at the start of the loop's next turn, so each still
    reaches the file within moments of being logged. Where no loop runs (the
    command line, another thread, after shutdown) a line is written at once.

    The workers of ``sluice serve --workers N`` all write to the stdout they
    inherited, usually one pipe: each write is at most ``PIPE_BUF`` bytes and
    cut at a line's end (``cut_writes``), so the kernel never puts another
    worker's line inside one of this worker's. A single line longer than
    ``PIPE_BUF`` goes out in a write of its own and cannot be atomic.
    """

    def __init__(self, file: TextIO):
        self._file = file
        self._lines: list[str] = []
        self._flush_scheduled = False

    def msg(self, message: str) -> None:
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            self._write(message + "\n")
            return
        self._lines.append(message)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            loop.call_soon(self.flush)

    debug = info = warning = warn = error = err = critical = exception = fatal = failure = log = msg

    def flush(self) -> None:
        self._flush_scheduled = False
        if self._lines:
            lines, self._lines = self._lines, []
            for text in cut_writes(lines):
                self._write(text)

    def _write(self, text: str) -> None:
        # Flushed at once, so each piece is one write of its own (the buffer holds nothing else).
        self._file.write(text)
        self._file.flush()


_output: LineBatcher | None = None
# How the per-request line is written, chosen when logging is configured (None when
# info lines are dropped).
_request_line: Callable[[dict[str, Any], str], None] | None = None


def _utc_iso(now: float) -> str:
    """``2026-12-03T05:14:00.123456Z``: structlog's ISO UTC timestamp, so every line reads alike."""
    micros = int(now % 1 * 1_000_000)
    return time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now)) + f".{micros:06d}Z"


def _json_request_line(output: LineBatcher) -> Callable[[dict[str, Any], str], None]:
    """The request line rendered here rather than by structlog's processors.

    A busy gateway writes one such line per request, and structlog's chain
    (copying the context variables, stamping, rendering through its processor
    calls) made a line cost nearly twice what building the same JSON object
    directly does. The line has the same fields in the same order as a
    structlog line.
    """

    def write(fields: dict[str, Any], request_id: str) -> None:
        fields["event"] = "request"
        fields["request_id"] = request_id
        fields["level"] = "info"
        fields["timestamp"] = _utc_iso(time.time())
        output.msg(json.dumps(fields))

    return write


def _structlog_request_line(fields: dict[str, Any], request_id: str) -> None:
    log.info("request", **fields)  # the request id comes from the context variables


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
    global _output, _request_line
    if _output is not None:
        _output.flush()  # lines of the old configuration go where they were meant to
    _output = output = LineBatcher(stream or sys.stdout)
    renderer: Any
    if fmt == "console":
        renderer = structlog.dev.ConsoleRenderer(colors=False)
    else:
        renderer = structlog.processors.JSONRenderer()
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=lambda *_: output,
        cache_logger_on_first_use=False,
    )
    if _LEVELS[level] > logging.INFO:
        _request_line = None
    else:
        _request_line = _json_request_line(output) if fmt == "json" else _structlog_request_line
    # aiohttp and asyncio log through the standard library; keep their warnings, in the same stream.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_no_traceback_for_bad_requests)


@atexit.register
def flush() -> None:
    """Write every line logged and not yet written: at exit, and by a forked worker before ``os._exit``,
    which runs no exit hooks."""
    if _output is not None:
        _output.flush()


def _no_traceback_for_bad_requests(record: logging.LogRecord) -> bool:
    """A malformed request is the client's problem, already answered with a 400: not worth a traceback."""
    return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


log = structlog.get_logger("sluice")


def log_request(fields: Callable[[], dict[str, Any]], request_id: str) -> None:
    """Log the line a request ends with; ``fields`` is only called if the line is kept."""
    if _request_line is not None:
        _request_line(fields(), request_id)
    elif _output is None:  # logging not configured (a library user, a test): structlog's defaults
        log.info("request", **fields())
