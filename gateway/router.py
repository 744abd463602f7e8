"""Where a tool call goes: a healthy bridge that has the tool, round-robin, retried once.

A retry is only safe before anything was relayed to the caller: progress numbering would
restart on another bridge and the caller would see text twice.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any

import mcp_types as types
from loguru import logger
from mcp.shared.exceptions import MCPError

from gateway.pool import BridgeConnection, BridgePool, BridgeUnavailable

Progress = Callable[[float, float | None, str | None], Awaitable[None]]


async def no_progress(_value: float, _total: float | None, _message: str | None) -> None:
    """For callers that want only the result."""


class NoBridge(Exception):
    """No healthy bridge offers the tool."""


class CallFailed(Exception):
    """Every bridge tried failed, or the one streaming the answer died."""


async def route_call(
    pool: BridgePool, name: str, arguments: dict[str, Any] | None, progress: Progress, meta: dict[str, Any] | None
) -> tuple[types.CallToolResult, BridgeConnection]:
    candidates = pool.candidates(name)
    if not candidates:
        raise NoBridge(f"No healthy bridge offers the tool {name!r} right now; GET /v1/bridges shows why.")
    failures: list[str] = []
    for bridge in candidates[:2]:
        relayed = False

        async def relay(value: float, total: float | None, message: str | None) -> None:
            nonlocal relayed
            relayed = True
            await progress(value, total, message)

        try:
            return await bridge.call(name, arguments, relay, meta), bridge
        except BridgeUnavailable as exc:
            cause = exc.__cause__
            if isinstance(cause, MCPError) and cause.error.code == types.INVALID_PARAMS:
                # The bridge no longer has the tool (its model left): our list was stale, not the bridge.
                bridge.refresh_tools_soon()
            else:
                bridge.eject(str(exc))
            failures.append(str(exc))
            if relayed:
                raise CallFailed(
                    f"{exc}. The answer had already started streaming, so it was not retried; call the tool again."
                ) from exc
            logger.warning("call to {} on {} failed before streaming; {}", name, bridge.name,
                           "retrying on another bridge" if len(candidates) > 1 else "no other bridge has it")
    raise CallFailed("; ".join(failures))
