"""Can a value be sent on as JSON? Shared by the bridge (tool arguments) and the gateway's edge.

A JSON parser happily hands us things no JSON encoder will write back: a lone surrogate
(`"\\ud800"` decodes, but UTF-8 cannot carry it), NaN and Infinity (Python's parser accepts them,
the JSON standard does not), and nesting deep enough to exhaust a recursive encoder. Such input is
refused where it enters, naming where it is, rather than failing somewhere downstream.
"""

from __future__ import annotations

import math
from typing import Any

MAX_DEPTH = 64
"""Deepest nesting of arrays and objects accepted in tool arguments (a JSON Schema needs a dozen)."""


def unsendable(value: Any, where: str = "arguments") -> str | None:
    """Why `value` cannot be sent on as JSON, naming the place (`arguments.messages[0].content`), or None."""
    # Iterative, so the check itself cannot hit the recursion limit it guards against.
    stack: list[tuple[Any, str, int, str]] = [(value, where, 0, where)]
    while stack:
        # `field` is the path cut at two levels (`arguments.stop[0]`), to name where a too-deep value
        # starts without a path sixty levels long.
        item, path, depth, field = stack.pop()
        if isinstance(item, str):
            if _has_surrogate(item):
                return f"{path} holds a lone surrogate (an invalid \\ud800-\\udfff escape), which UTF-8 cannot carry"
        elif isinstance(item, bool) or item is None or isinstance(item, int):
            continue
        elif isinstance(item, float):
            if not math.isfinite(item):
                return f"{path} is {item!r}, which JSON cannot carry"
        elif isinstance(item, dict | list | tuple):
            if depth >= MAX_DEPTH:
                return f"{field} is nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"{path} has a key of type {type(key).__name__}; JSON keys are strings"
                    if _has_surrogate(key):
                        return f"{path} has a key holding a lone surrogate, which UTF-8 cannot carry"
                    child_path = f"{path}.{key}"
                    stack.append((child, child_path, depth + 1, child_path if depth < 2 else field))
            else:
                for index, child in enumerate(item):
                    child_path = f"{path}[{index}]"
                    stack.append((child, child_path, depth + 1, child_path if depth < 2 else field))
        else:
            return f"{path} is a {type(item).__name__}, which JSON cannot carry"
    return None


def _has_surrogate(text: str) -> bool:
    try:
        text.encode("utf-8")
    except UnicodeEncodeError:
        return True
    return False


def sendable_text(text: str) -> str:
    """`text` with each lone surrogate replaced by U+FFFD, the usual mark of undecodable text.

    For text that arrives from elsewhere (LM Studio's answers): one bad character should not cost
    the whole answer, nor break the JSON it is sent on in.
    """
    if not _has_surrogate(text):
        return text
    return "".join("\ufffd" if "\ud800" <= char <= "\udfff" else char for char in text)


def refused_tool_call(message: Any) -> tuple[int | str | None, str] | None:
    """For a decoded JSON-RPC body holding a `tools/call` whose input cannot be sent on: its id and why.

    For HTTP front doors, which see the body before the SDK does: the SDK's own parser refuses a
    lone surrogate or deep nesting with a bare parse error that does not say which argument is wrong.
    """
    for item in message if isinstance(message, list) else [message]:
        if not isinstance(item, dict) or item.get("method") != "tools/call":
            continue
        params = item.get("params")
        params = params if isinstance(params, dict) else {}
        name = params.get("name")
        problem = unsendable(params.get("arguments")) or unsendable(name, "name") or unsendable(params.get("_meta"), "_meta")
        if problem:
            ident = item.get("id")
            ident = ident if isinstance(ident, int | str) and not isinstance(ident, bool) else None
            subject = name if isinstance(name, str) and not unsendable(name) else "the tool"
            return ident, f"Invalid arguments for {subject}: {problem}"
    return None
