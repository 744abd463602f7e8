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
    stack: list[tuple[Any, str, int]] = [(value, where, 0)]
    while stack:
        item, path, depth = stack.pop()
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
                return f"{path} is nested deeper than {MAX_DEPTH} levels"
            if isinstance(item, dict):
                for key, child in item.items():
                    if not isinstance(key, str):
                        return f"{path} has a key of type {type(key).__name__}; JSON keys are strings"
                    if _has_surrogate(key):
                        return f"{path} has a key holding a lone surrogate, which UTF-8 cannot carry"
                    stack.append((child, f"{path}.{key}", depth + 1))
            else:
                stack.extend((child, f"{path}[{index}]", depth + 1) for index, child in enumerate(item))
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
