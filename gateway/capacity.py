"""How many requests the gateway holds at once, from the file descriptors it may open.

A request in flight holds two descriptors: the caller's connection and, for a call, one towards a bridge. Run
out, and the failure lands somewhere unhelpful: accepting a connection fails (the caller sees a reset, no
answer at all), or connecting to a bridge does (which must not be taken for the bridge being down). So the
gateway refuses a request beyond what its open-file limit leaves room for, with a 503 the caller can act on,
before either happens. The room is the limit less a reserve: the listening socket, logs, Redis, and per
bridge its health check, change stream and the connections kept alive between calls.
"""

from __future__ import annotations

import sys

from loguru import logger
from starlette.types import ASGIApp, Receive, Scope, Send

from gateway.ratelimit import REDIS_CONNECTIONS
from gateway.refusal import UNAVAILABLE, refusal
from gateway.settings import GatewaySettings

DESCRIPTORS_PER_REQUEST = 2
_BASE_RESERVE = 64  # the process itself: listening socket, event loop, logs, standard streams, imports
_PER_BRIDGE = 2  # its health check and its change stream


def open_file_limit() -> int | None:
    """This process's soft limit on open files; None where there is none to read (Windows)."""
    if sys.platform == "win32":
        return None
    import resource

    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    return None if soft == resource.RLIM_INFINITY else soft


def request_capacity(settings: GatewaySettings, descriptors: int | None) -> int | None:
    """Requests the gateway can hold at once with `descriptors`; None: no limit to keep to."""
    if descriptors is None:
        return None
    kept_alive = max(1, settings.bridge_connections // 4)
    reserve = _BASE_RESERVE + (REDIS_CONNECTIONS if settings.redis_url else 0)
    reserve += len(settings.bridges) * (_PER_BRIDGE + kept_alive)
    return max(1, (descriptors - reserve) // DESCRIPTORS_PER_REQUEST)


class CapacityGuard:
    """Answers 503 (a JSON-RPC error on /mcp) to a request beyond `capacity` in flight; `/health` always passes,
    so a balancer does not take a full gateway for a dead one."""

    def __init__(self, app: ASGIApp, capacity: int | None, descriptors: int | None) -> None:
        self.app = app
        self.capacity = capacity
        self.descriptors = descriptors
        self.in_flight = 0
        if capacity is not None:
            logger.info("holding up to {} requests at once ({} open files allowed)", capacity, descriptors)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or self.capacity is None or scope["path"] == "/health":
            await self.app(scope, receive, send)
            return
        if self.in_flight >= self.capacity:
            await self.refuse(scope, receive, send)
            return
        self.in_flight += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.in_flight -= 1

    async def refuse(self, scope: Scope, receive: Receive, send: Send) -> None:
        message = (
            f"The gateway is holding {self.capacity} requests, as many as its limit of {self.descriptors} open "
            "files allows. Retry shortly; its operator can raise the limit (ulimit -n, or `nofile` in Compose)."
        )
        await refusal(scope, 503, UNAVAILABLE, message, {"Retry-After": "1"})(scope, receive, send)
