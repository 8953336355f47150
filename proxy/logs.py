"""Structured logs: structlog, one JSON object per line, request id on every line.

The request id is bound in a context variable by the server's middleware, so
every line logged while serving a request carries it without being passed
around. Secrets never reach a log call: the gateway only ever holds digests
of client keys and logs key ids, never keys.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, TextIO

import structlog
from aiohttp.http_exceptions import HttpProcessingError

_LEVELS = {"debug": logging.DEBUG, "info": logging.INFO, "warning": logging.WARNING, "error": logging.ERROR}


def configure_logging(level: str = "info", fmt: str = "json", stream: TextIO | None = None) -> None:
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
        logger_factory=structlog.WriteLoggerFactory(file=stream or sys.stdout),
        cache_logger_on_first_use=False,
    )
    # aiohttp and asyncio log through the standard library; keep their warnings, in the same stream.
    logging.basicConfig(level=logging.WARNING, stream=stream or sys.stderr, format="%(levelname)s %(name)s: %(message)s")
    logging.getLogger("aiohttp.server").addFilter(_no_traceback_for_bad_requests)


def _no_traceback_for_bad_requests(record: logging.LogRecord) -> bool:
    """A malformed request is the client's problem, already answered with a 400: not worth a traceback."""
    return not (record.exc_info and isinstance(record.exc_info[1], HttpProcessingError))


log = structlog.get_logger("sluice")
