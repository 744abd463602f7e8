"""Logging for both services: loguru on stderr, JSON lines by default.

stdout belongs to the stdio protocol, so nothing here ever writes there. Call sites log
what happened (tool, timing, outcome), never prompt or completion text, never a token.
"""

from __future__ import annotations

import json
import logging
import sys
from typing import Any

from loguru import logger


class _ToLoguru(logging.Handler):
    """Routes the standard-library loggers (uvicorn, the SDK, httpx2) through loguru."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            level: str | int = logger.level(record.levelname).name
        except ValueError:
            level = record.levelno
        logger.opt(exception=record.exc_info, depth=6).log(level, record.getMessage())


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
    logging.basicConfig(handlers=[_ToLoguru()], level=level if level != "TRACE" else "DEBUG", force=True)
    # httpx2 logs every request line at INFO, which would bury ours.
    logging.getLogger("httpx2").setLevel(logging.WARNING)
    logging.getLogger("httpx").setLevel(logging.WARNING)
