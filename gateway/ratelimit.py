"""Per-key rate limits: a budget for tool calls and a looser one for every other request.

Redis unreachable: with `rate_limit_fail_open` (the default) requests pass and a warning is logged at
most every 30 s, since a limiter outage should not become a gateway outage; otherwise they get 503.
A Redis that hangs costs one `redis_timeout`, then is skipped until it answers (`breaker.py`).
"""

from __future__ import annotations

import hashlib
import json
import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from functools import lru_cache
from typing import TYPE_CHECKING, Literal

from limits import RateLimitItem, parse_many
from limits.aio.storage import Storage
from limits.aio.strategies import SlidingWindowCounterRateLimiter
from limits.errors import StorageError
from limits.storage import storage_from_string
from loguru import logger
from starlette.datastructures import Headers, MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway.breaker import GuardedStorage
from gateway.refusal import RATE_LIMITED, UNAVAILABLE, refusal
from gateway.settings import GatewaySettings
from mcp_server.body import buffer_body
from mcp_server.openai_relay import ENDPOINTS

# A completion or an embedding through the OpenAI API counts like the tool call it stands for.
OPENAI_CALLS = frozenset(path for path, method in ENDPOINTS.items() if method == "POST")

if TYPE_CHECKING:
    from redis.asyncio import BlockingConnectionPool

RequestKind = Literal["tool", "other"]

MAX_INSPECTED_BODY = 4 * 1024 * 1024
_WARN_EVERY_SECONDS = 30.0
# Connections to Redis at most: a check takes well under a millisecond, so a few serve thousands of requests a
# second, while a pool without a bound would open one per concurrent request, and spend descriptors with them.
REDIS_CONNECTIONS = 32


@dataclass(frozen=True)
class Decision:
    """The outcome of one check; `unavailable` means the store could not be asked."""

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    window: int = 0
    description: str = ""
    unavailable: bool = False

    @property
    def retry_after(self) -> int:
        return max(1, math.ceil(self.reset_after))


class RateLimiter:
    """Counts requests per key name in memory, or in Redis when `settings.redis_url` is set."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self._pool: BlockingConnectionPool | None = None
        self._guarded: GuardedStorage | None = None
        self.storage = self._open_storage(settings.redis_url)
        # `hit()` is one atomic step in the store (a lock in memory, a Lua script in Redis), so a
        # burst cannot slip past the limit between a test and a count. A sliding-window counter is
        # O(1) per hit; the moving window keeps an entry per request and, in memory, searches them
        # in a worker thread on every hit.
        self.strategy = SlidingWindowCounterRateLimiter(self.storage)
        self._last_warning = -math.inf

    def _open_storage(self, redis_url: str | None) -> Storage:
        if redis_url is None:
            storage = storage_from_string("async+memory://")
        else:
            # Imported here: Redis is only needed when several gateways share a budget.
            from redis.asyncio import BlockingConnectionPool
            from redis.asyncio.retry import Retry
            from redis.backoff import NoBackoff

            # Our own pool so that aclose() can close it; one retry covers a pooled connection that
            # Redis dropped, while redis-py's default of ten backed-off retries would stall requests.
            # Waiting for a free connection is bounded by the breaker's timeout, like the command itself.
            timeout = self.settings.redis_timeout
            self._pool = BlockingConnectionPool.from_url(
                redis_url.removeprefix("async+"),
                socket_connect_timeout=timeout,
                socket_timeout=timeout,
                retry=Retry(NoBackoff(), 1),
                max_connections=REDIS_CONNECTIONS,
                timeout=None,
            )
            redis = storage_from_string(
                "async+redis://",
                implementation="redispy",
                key_prefix="llm-hub",
                wrap_exceptions=True,
                connection_pool=self._pool,  # type: ignore[arg-type]
            )
            assert isinstance(redis, Storage)
            storage = self._guarded = GuardedStorage(redis, timeout)
        assert isinstance(storage, Storage)
        return storage

    async def check(self, key_name: str, kind: RequestKind) -> Decision:
        """Counts one request of this kind against the key's budget."""
        text = self.settings.limit_for(key_name) if kind == "tool" else self.settings.request_limit
        # The name is not secret, but hashing makes any name a safe, fixed-size store key.
        identity = hashlib.sha256(key_name.encode()).hexdigest()[:32]
        try:
            return await self._hit_all(_parse(text), kind, identity)
        except StorageError as exc:
            return self._store_down(exc)

    async def _hit_all(self, items: tuple[RateLimitItem, ...], kind: RequestKind, identity: str) -> Decision:
        # With several limits ("10/second;100/minute") an earlier one keeps its count when a later
        # one refuses; stopping at the first refusal keeps that overcount to the limits already hit.
        tightest: Decision | None = None
        for item in items:
            allowed = await self.strategy.hit(item, kind, identity)
            stats = await self.strategy.get_window_stats(item, kind, identity)
            decision = Decision(
                allowed=allowed,
                limit=item.amount,
                remaining=max(0, stats.remaining),
                reset_after=max(0.0, stats.reset_time - time.time()),
                window=item.get_expiry(),
                description=_describe(item, kind),
            )
            if not allowed:
                return decision
            if tightest is None or decision.remaining < tightest.remaining:
                tightest = decision
        assert tightest is not None
        return tightest

    def _store_down(self, exc: Exception) -> Decision:
        now = time.monotonic()
        if now - self._last_warning >= _WARN_EVERY_SECONDS:
            self._last_warning = now
            policy = "letting requests through" if self.settings.rate_limit_fail_open else "refusing requests (503)"
            logger.warning("rate-limit store unreachable, {} until it is back: {}", policy, exc)
        return Decision(
            allowed=self.settings.rate_limit_fail_open, limit=0, remaining=0, reset_after=1.0, unavailable=True
        )

    async def run(self) -> None:
        """The breaker's probe, while the gateway runs (nothing to do for counts kept in memory)."""
        if self._guarded is not None:
            await self._guarded.run()

    def store_unreachable(self, exc: Exception) -> bool:
        """For other counts kept in `storage` (token budgets): logs the outage as the limits do, and
        says whether to let the request through."""
        return self._store_down(exc).allowed

    async def aclose(self) -> None:
        if self._pool is not None:
            await self._pool.aclose()


@lru_cache(maxsize=64)
def _parse(text: str) -> tuple[RateLimitItem, ...]:
    return tuple(parse_many(text))


def _describe(item: RateLimitItem, kind: RequestKind) -> str:
    noun = "tool calls" if kind == "tool" else "requests"
    unit = item.GRANULARITY.name
    period = unit if item.multiples == 1 else f"{item.multiples} {unit}s"
    return f"{item.amount} {noun} per {period}"


class RateLimitMiddleware:
    """Applies `RateLimiter` to each request of an authenticated key (`scope["state"]["key_name"]`).

    Place it inside the authentication middleware; requests without a key name pass untouched.
    """

    def __init__(self, app: ASGIApp, limiter: RateLimiter, *, on_reject: Callable[[str], None] | None = None) -> None:
        self.app = app
        self.limiter = limiter
        self.on_reject = on_reject

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        key_name = scope.get("state", {}).get("key_name") if scope["type"] == "http" else None
        if key_name is None or (scope["method"] == "GET" and scope["path"] == "/health"):
            await self.app(scope, receive, send)
            return
        kind, receive = await self.classify(scope, receive)
        decision = await self.limiter.check(key_name, kind)
        if not decision.allowed:
            await self.refuse(key_name, kind, decision, scope, receive, send)
            return
        if kind == "tool" and not decision.unavailable:
            send = _with_headers(send, decision)
        await self.app(scope, receive, send)

    async def classify(self, scope: Scope, receive: Receive) -> tuple[RequestKind, Receive]:
        """The request's kind, and a `receive` that still yields the whole body to the app."""
        path: str = scope["path"]
        if scope["method"] != "POST":
            return "other", receive
        if (path.startswith("/v1/tools/") and len(path) > len("/v1/tools/")) or path in OPENAI_CALLS:
            return "tool", receive
        if path.rstrip("/") != "/mcp":
            return "other", receive
        # The header is trusted only to say "tool call": a false "tools/list" must not hide one.
        if Headers(scope=scope).get("mcp-method") == "tools/call":
            return "tool", receive
        body, overflowed, replay = await buffer_body(receive, MAX_INSPECTED_BODY)
        # A body too large to inspect counts as a tool call, so padding cannot dodge the budget.
        return ("tool" if overflowed or _calls_a_tool(body) else "other"), replay

    async def refuse(
        self, key_name: str, kind: RequestKind, decision: Decision, scope: Scope, receive: Receive, send: Send
    ) -> None:
        if decision.unavailable:
            message = (
                "Rate limiting is unavailable (its Redis store cannot be reached) and this gateway refuses "
                "requests until it is back. Retry shortly."
            )
            status, headers = 503, {"Retry-After": "1"}
        else:
            message = (
                f"Rate limit exceeded for key '{key_name}': {decision.description}. Retry in {decision.retry_after} s."
            )
            status, headers = 429, {"Retry-After": str(decision.retry_after), **_rate_limit_headers(decision)}
            if self.on_reject is not None:
                self.on_reject(kind)
        code = UNAVAILABLE if decision.unavailable else RATE_LIMITED
        await refusal(scope, status, code, message, headers)(scope, receive, send)


def _calls_a_tool(body: bytes) -> bool:
    try:
        payload = json.loads(body)
    except (ValueError, RecursionError):
        return False
    messages = payload if isinstance(payload, list) else [payload]
    return any(isinstance(message, dict) and message.get("method") == "tools/call" for message in messages)


def _rate_limit_headers(decision: Decision) -> dict[str, str]:
    return {
        "RateLimit-Limit": str(decision.limit),
        "RateLimit-Remaining": str(decision.remaining),
        "RateLimit-Reset": str(math.ceil(decision.reset_after)),
        "RateLimit-Policy": f"{decision.limit};w={decision.window}",
    }


def _with_headers(send: Send, decision: Decision) -> Send:
    async def send_with_headers(message: Message) -> None:
        if message["type"] == "http.response.start":
            headers = MutableHeaders(scope=message)
            for name, value in _rate_limit_headers(decision).items():
                headers[name] = value
        await send(message)

    return send_with_headers
