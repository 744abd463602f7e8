"""Handshake-era MCP sessions per key: how many one key may hold open.

The SDK keeps each session (from `initialize` to DELETE) in this process's memory, ends one that has had no
request in flight for `LLM_HUB_SESSION_IDLE_TIMEOUT`, and past its own table size (10,000) refuses new
sessions to everyone. One key that initializes without end would fill that table (10,000 sessions took the
gateway from 77 to 472 MB) and lock every other handshake-era client out, so each key may hold
`LLM_HUB_MAX_SESSIONS_PER_KEY`; 2026-07-28 clients hold no session and are not counted.

Past its cap, a key's next session is refused (429, Retry-After: when its oldest idle session expires) rather
than made room for by closing the key's least recently used session. Several people or hosts may share a key,
and closing would break one that is still working, while the client that forgets its sessions is told why
and its forgotten sessions expire by themselves.

The table follows the SDK's: a session is learned from the `Mcp-Session-Id` header of the answer that opened
it, and forgotten when it is deleted, when the SDK answers 404 for it (it ended or expired), or once it has
been idle for the timeout by the SDK's own rule (no request of it in flight, counted from the end of the last
one; ours ends a moment after the SDK's, so it is never forgotten here while the SDK still has it). A session
serves only the key that opened it: another key asking for it is answered as for an unknown session.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass, field

from loguru import logger
from mcp_types.version import HANDSHAKE_PROTOCOL_VERSIONS
from starlette.datastructures import Headers
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.auth import ANONYMOUS
from gateway.refusal import RATE_LIMITED, refusal

_WARN_EVERY_SECONDS = 60.0
# What the SDK answers for a session it does not know (INVALID_REQUEST).
_NOT_FOUND = {"jsonrpc": "2.0", "id": None, "error": {"code": -32600, "message": "Session not found"}}


@dataclass
class _Session:
    key: str
    in_flight: int = 1  # learned from the answer to the request that opened it, still running
    idle_since: float = field(default_factory=time.monotonic)


class SessionLimits:
    """ASGI wrapper around the MCP app that caps the handshake-era sessions of each key
    (`scope["state"]["key_name"]`, set by `ApiKeyAuth`)."""

    def __init__(
        self, app: ASGIApp, *, per_key: int, idle_timeout: float, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.app = app
        self.per_key = per_key
        self.idle_timeout = idle_timeout
        self.clock = clock
        self._sessions: dict[str, _Session] = {}
        self._by_key: dict[str, set[str]] = {}
        self._opening: dict[str, int] = {}  # admitted, not answered yet: counted, so a burst cannot pass the cap
        self._warned: dict[str, float] = {}

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not _handshake_era(scope):
            await self.app(scope, receive, send)
            return
        key: str = scope.get("state", {}).get("key_name", ANONYMOUS)
        session_id = Headers(scope=scope).get("mcp-session-id")
        if session_id is not None:
            await self.use(key, session_id, scope, receive, send)
        elif scope["method"] == "POST":  # only a POST without a session id can open one
            await self.open(key, scope, receive, send)
        else:
            await self.app(scope, receive, send)

    def held(self, key: str) -> int:
        """Sessions the key holds now, those being opened included."""
        self._expire(key)
        return len(self._by_key.get(key, ())) + self._opening.get(key, 0)

    async def open(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        if self.held(key) >= self.per_key:
            await self.refuse(key, scope, receive, send)
            return
        self._opening[key] = self._opening.get(key, 0) + 1
        opened: str | None = None

        async def learn(message: Message) -> None:
            nonlocal opened
            if message["type"] == "http.response.start" and opened is None:
                session_id = Headers(raw=message.get("headers", [])).get("mcp-session-id")
                if message["status"] < 400 and session_id:
                    opened = session_id
                    self._sessions[session_id] = _Session(key, idle_since=self.clock())
                    self._by_key.setdefault(key, set()).add(session_id)
                    self._opened(key)  # from being opened to held, with no moment free in between
            await send(message)

        try:
            await self.app(scope, receive, learn)
        finally:
            if opened is None:
                self._opened(key)
            else:
                self._finished(opened, status=None)

    def _opened(self, key: str) -> None:
        """One opening request of the key is answered (or failed)."""
        if self._opening[key] == 1:
            del self._opening[key]
        else:
            self._opening[key] -= 1

    async def use(self, key: str, session_id: str, scope: Scope, receive: Receive, send: Send) -> None:
        session = self._sessions.get(session_id)
        if session is None:  # ended or never was: the SDK says so
            await self.app(scope, receive, send)
            return
        if session.key != key:
            await JSONResponse(_NOT_FOUND, status_code=404)(scope, receive, send)
            return
        session.in_flight += 1
        status: int | None = None

        async def watch(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, watch)
        finally:
            deleted = scope["method"] == "DELETE" and status is not None and status < 300
            self._finished(session_id, status=404 if deleted else status)

    def _finished(self, session_id: str, *, status: int | None) -> None:
        session = self._sessions.get(session_id)
        if session is None:
            return
        session.in_flight -= 1
        session.idle_since = self.clock()
        if status == 404:
            self._forget(session_id)

    def _forget(self, session_id: str) -> None:
        session = self._sessions.pop(session_id)
        ids = self._by_key[session.key]
        ids.discard(session_id)
        if not ids:
            del self._by_key[session.key]

    def _expire(self, key: str) -> None:
        now = self.clock()
        for session_id in list(self._by_key.get(key, ())):
            session = self._sessions[session_id]
            if not session.in_flight and now - session.idle_since >= self.idle_timeout:
                self._forget(session_id)

    def retry_after(self, key: str) -> int:
        """Seconds until the key's oldest idle session expires (the whole timeout if none is idle)."""
        now = self.clock()
        idle = [self._sessions[s].idle_since for s in self._by_key.get(key, ()) if not self._sessions[s].in_flight]
        return max(1, math.ceil(min(idle) + self.idle_timeout - now)) if idle else max(1, math.ceil(self.idle_timeout))

    async def refuse(self, key: str, scope: Scope, receive: Receive, send: Send) -> None:
        retry = self.retry_after(key)
        now = self.clock()
        if now - self._warned.get(key, -math.inf) >= _WARN_EVERY_SECONDS:
            self._warned[key] = now
            logger.warning(
                "key {} holds {} MCP sessions, its limit (LLM_HUB_MAX_SESSIONS_PER_KEY): refusing more until some end",
                key,
                self.per_key,
            )
        message = (
            f"Too many open MCP sessions for key '{key}': {self.per_key} are open, the limit per key "
            f"(LLM_HUB_MAX_SESSIONS_PER_KEY). Close the sessions you no longer use (an MCP client does when it "
            f"exits), or wait: one that is idle ends after {self.idle_timeout:g} s (LLM_HUB_SESSION_IDLE_TIMEOUT). "
            f"Retry in {retry} s."
        )
        await refusal(scope, 429, RATE_LIMITED, message, {"Retry-After": str(retry)})(scope, receive, send)


def _handshake_era(scope: Scope) -> bool:
    """As the SDK decides: no `MCP-Protocol-Version`, or a version of the handshake era."""
    version = Headers(scope=scope).get("mcp-protocol-version")
    return version is None or version in HANDSHAKE_PROTOCOL_VERSIONS
