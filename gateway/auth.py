"""API keys: who is calling the gateway, decided once at the edge."""

from __future__ import annotations

import hashlib
import hmac
import time
from collections.abc import Callable
from dataclasses import dataclass

from loguru import logger
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.refusal import UNAUTHORIZED, refusal

ANONYMOUS = "anonymous"
FAILURE_LOG_SECONDS = 60.0
# Distinct sources counted one by one per interval; beyond, a flood from many addresses is counted together,
# so the tally stays small whatever arrives.
_MAX_SOURCES = 1000
_OTHERS = "other sources"

_HOW_TO = "Send your API key as 'Authorization: Bearer <key>'."


@dataclass(frozen=True)
class _Rejection:
    """Why a request carries no usable key: the message for the caller and the challenge header."""

    message: str
    challenge: str = "Bearer"


_MISSING = _Rejection(f"Missing API key. {_HOW_TO}")
_MALFORMED = _Rejection(f"Malformed Authorization header. {_HOW_TO}")
_UNKNOWN = _Rejection(f"Unknown API key. {_HOW_TO}", 'Bearer error="invalid_token"')


class ApiKeyAuth:
    """Requires `Authorization: Bearer <key>` and records the key's name in `scope["state"]["key_name"]`.

    `keys` maps names to keys; `None` disables authentication and names every caller "anonymous".
    The client's Authorization header never reaches the wrapped app, so nothing downstream can
    forward it.
    """

    def __init__(
        self,
        app: ASGIApp,
        keys: dict[str, str] | None,
        *,
        open_paths: frozenset[str] = frozenset({"/health"}),
        open_prefixes: tuple[str, ...] = (),
        failure_log_seconds: float = FAILURE_LOG_SECONDS,
    ) -> None:
        self.app = app
        # Digests have one length, so comparing them reveals nothing about a key's length either.
        self.digests = None if keys is None else [(name, _digest(key.encode())) for name, key in keys.items()]
        self.open_paths = open_paths
        self.open_prefixes = open_prefixes
        self.unknown_keys = FailureTally(failure_log_seconds)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] not in ("http", "websocket"):
            await self.app(scope, receive, send)
            return
        self.unknown_keys.report_due()
        headers: list[tuple[bytes, bytes]] = scope["headers"]
        authorizations = [value for name, value in headers if name == b"authorization"]
        scope["headers"] = [(name, value) for name, value in headers if name != b"authorization"]
        if self.is_open(scope):
            await self.app(scope, receive, send)
            return
        outcome = self.key_name(authorizations)
        if isinstance(outcome, _Rejection):
            if outcome is _UNKNOWN:
                self.unknown_keys.count((scope.get("client") or ("an unknown address",))[0])
            await self.reject(outcome, scope, receive, send)
            return
        scope.setdefault("state", {})["key_name"] = outcome
        await self.app(scope, receive, send)

    def is_open(self, scope: Scope) -> bool:
        # CORS preflights carry no credentials by design; the CORS layer answers them.
        if scope.get("method") == "OPTIONS":
            return True
        path: str = scope["path"]
        return path in self.open_paths or path.startswith(self.open_prefixes)

    def key_name(self, authorizations: list[bytes]) -> str | _Rejection:
        if self.digests is None:
            return ANONYMOUS
        if not authorizations:
            return _MISSING
        parts = authorizations[0].split()
        if len(authorizations) > 1 or len(parts) != 2 or parts[0].lower() != b"bearer":
            return _MALFORMED
        return self.match(parts[1])

    def match(self, token: bytes) -> str | _Rejection:
        assert self.digests is not None
        given = _digest(token)
        found: str | _Rejection = _UNKNOWN
        # Every key is compared, whatever matched earlier, so timing does not tell which key it was.
        for name, digest in self.digests:
            if hmac.compare_digest(given, digest):
                found = name
        return found

    async def reject(self, rejection: _Rejection, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "websocket":
            # Closing before accepting makes the server answer the handshake with 403.
            await send({"type": "websocket.close", "code": 1008, "reason": rejection.message})
            return
        response = refusal(scope, 401, UNAUTHORIZED, rejection.message, {"WWW-Authenticate": rejection.challenge})
        await response(scope, receive, send)


class FailureTally:
    """Requests with an unknown key, counted per source (client address) and logged as one WARNING line per
    source per interval: a guessing client or a stale key would otherwise write a line per request."""

    def __init__(self, interval: float = FAILURE_LOG_SECONDS, clock: Callable[[], float] = time.monotonic) -> None:
        self.interval = interval
        self.clock = clock
        self.counts: dict[str, int] = {}
        self.since = clock()

    def count(self, source: str) -> None:
        if source not in self.counts and len(self.counts) >= _MAX_SOURCES:
            source = _OTHERS
        self.counts[source] = self.counts.get(source, 0) + 1

    def report_due(self) -> None:
        """Log the interval's counts once it is over (checked on every request: one clock read)."""
        now = self.clock()
        if now - self.since < self.interval:
            return
        for source, count in self.counts.items():
            noun = "request" if count == 1 else "requests"
            logger.warning(
                "{} {} with an unknown API key from {} in the last {:.0f} s", count, noun, source, now - self.since
            )
        self.counts.clear()
        self.since = now


def key_name_of(scope: Scope) -> str | None:
    """The name of the key this request came with (set by `ApiKeyAuth`); None on open paths."""
    return scope.get("state", {}).get("key_name")


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()
