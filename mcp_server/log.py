"""Logging for both services: loguru on stderr, JSON lines by default.

stdout belongs to the stdio protocol, so nothing here ever writes there. Call sites log
what happened (tool, timing, outcome), never prompt or completion text, never a token.

Libraries log through the standard library, and at DEBUG they print what passes through them:
the SDK's messages, sse-starlette's events, httpcore2's traffic, uvicorn's ASGI messages. So
their records are taken at INFO and above whatever the level, and the text of exceptions they
log (a validation error quotes its input) is left out; the type and the traceback stay.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from loguru import logger

LIBRARY_LEVEL = logging.INFO
"""The lowest level taken from the standard-library loggers (only libraries use them here)."""


class _Withheld(Exception):
    """Stands in for a library's exception in the logs: its type, not its text."""


class _ToLoguru(logging.Handler):
    """Routes the standard-library loggers (uvicorn, the SDK, httpx2) through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        exception = record.exc_info
        if exception and exception[1] is not None:
            kind, _, traceback = exception
            withheld = _Withheld(f"{kind.__module__}.{kind.__qualname__} (its text is not logged)")
            exception = (_Withheld, withheld.with_traceback(traceback), traceback)
        logger.opt(exception=exception, depth=6).log(level, record.getMessage())


def _json_line(record: Any) -> str:
    # One flat object a line (time, level, where, message, context such as request_id): loguru's
    # own serialize=True writes the whole record twice over, several times the size and the cost.
    line = {
        "time": record["time"].isoformat(timespec="milliseconds"),
        "level": record["level"].name,
        "logger": record["name"],
        "message": record["message"],
        **record["extra"],
    }
    if record["exception"] is not None:
        line["exception"] = repr(record["exception"].value)
    record["extra"]["_line"] = json.dumps(line, default=str)
    return "{extra[_line]}\n"


def setup_logging(level: str = "INFO", fmt: str = "json") -> None:
    logger.remove()
    if fmt == "json":
        logger.add(sys.stderr, level=level, format=_json_line, backtrace=False, diagnose=False)
    else:
        logger.add(
            sys.stderr,
            level=level,
            format="<green>{time:HH:mm:ss.SSS}</green> <level>{level: <7}</level> {message}",
            backtrace=False,
            diagnose=False,
        )
    wanted = logging.DEBUG if level == "TRACE" else logging.getLevelName(level)
    # The handler's level holds even for loggers given a lower level of their own (uvicorn's config does).
    logging.basicConfig(handlers=[_ToLoguru(LIBRARY_LEVEL)], level=max(wanted, LIBRARY_LEVEL), force=True)
    # httpx2 logs every request line at INFO, which would bury ours.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
