"""Progress that TypeScript clients can read: a call's notifications reach them before its result.

The official TypeScript SDK (v1 and v2, and so mcp-remote and the hosts built on them) handles a
response at once but a notification a microtask later. When progress and the result arrive in the
same read, the result retires the call's progress handler first and the text is dropped
("Received a progress notification for an unknown token", modelcontextprotocol/typescript-sdk#2580).
Over stdio that cost a few calls in a hundred their last pieces; through mcp-remote, which writes
what it receives to the host's pipe back to back, a quarter to a half of them.

So a call that streamed progress pings the client before its result goes out (handshake era): the
client answers only after reading everything sent before the ping, so the result lands in a later
read, whatever the load. That costs one round trip, about 1 ms over stdio.

The 2026 era forbids server requests, so nothing can prove the client has read. Over stdio a short
pause gives it time to read the progress on its own, which makes a loss rare but cannot rule it
out. Over 2026-era HTTP nothing is added: TypeScript clients reading that SSE stream themselves take
one event at a time and lose nothing, and a pause would slow every call of the callers there, the
gateway among them, which always asks for progress; mcp-remote in its opt-in `--protocol auto` mode
still loses there. `bench/bench_delivery.py` measures what each choice costs and loses.
"""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as types
from loguru import logger
from mcp.server import ServerRequestContext
from mcp.shared.message import ServerMessageMetadata

PING_TIMEOUT = 2.0
"""Seconds to wait for the ping's answer: a client that never answers still gets its result."""

PAUSE = 0.002
"""Seconds between the last progress and the result over stdio when the client cannot be pinged."""


class ProgressRelay:
    """One call's progress sender (`report`), and `settle()`, to await before returning its result."""

    def __init__(self, ctx: ServerRequestContext[Any]) -> None:
        self._ctx = ctx
        self._token = (ctx.meta or {}).get("progress_token") is not None
        self._reported = False

    async def report(self, progress: float, message: str | None, total: float | None = None) -> None:
        await self._ctx.session.report_progress(progress, total, message)
        # Without a token the SDK sent nothing, and there is nothing to settle.
        self._reported = self._token

    async def settle(self) -> None:
        """Return once the client has read the progress sent so far, when that can be known."""
        if not self._reported:
            return
        session = self._ctx.session
        if not session.can_send_request:
            if self._ctx.request is None:  # stdio: over HTTP no pause, as the module docstring says
                await anyio.sleep(PAUSE)
            return
        try:
            # Scoped to the call, so over HTTP the ping rides the same response stream as the progress.
            await session.send_request(
                types.PingRequest(),
                types.EmptyResult,
                request_read_timeout_seconds=PING_TIMEOUT,
                metadata=ServerMessageMetadata(related_request_id=self._ctx.request_id),
            )
        except Exception as exc:  # noqa: BLE001 - the result goes out either way
            logger.debug("ping before the result not answered: {!r}", exc)
