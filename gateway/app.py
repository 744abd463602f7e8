"""The gateway's ASGI app: middleware, routes and the lifespan that runs the bridge pool.

A request passes, outermost first: request id -> metrics -> capacity -> CORS -> body-size limit ->
API-key auth -> rate limit -> route (MCP at /mcp, where 2026-era tool calls take the fast path
straight to a bridge and handshake-era sessions are capped per key; the OpenAI API and REST under
/v1, /health, /metrics, and the dashboard page at / with its files under /static/).
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import anyio
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.middleware.cors import CORSMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway import __version__, openapi
from gateway.auth import ApiKeyAuth
from gateway.capacity import CapacityGuard, open_file_limit, request_capacity
from gateway.dashboard import Dashboard
from gateway.fastpath import FastPath
from gateway.metrics import Metrics, MetricsMiddleware
from gateway.openai_api import OpenAIApi
from gateway.pool import BridgePool
from gateway.ratelimit import RateLimiter, RateLimitMiddleware
from gateway.refusal import BodyLimit
from gateway.request_id import RequestIdMiddleware
from gateway.rest import RestApi
from gateway.router import Router
from gateway.server import GatewayServer, ToolCaller
from gateway.sessions import SessionLimits
from gateway.settings import GatewaySettings
from gateway.usage import Accounting

# The dashboard's page and files hold no data; the page asks for a key before it reads any.
OPEN_PATHS = frozenset({"/health", "/"})
OPEN_PREFIXES = ("/static/",)
_MCP_HEADERS = ["Mcp-Session-Id", "Mcp-Protocol-Version", "Mcp-Method", "Mcp-Name", "Last-Event-ID"]


class Gateway:
    """Everything one gateway process holds."""

    def __init__(self, settings: GatewaySettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.limiter = RateLimiter(settings)
        self.accounting = Accounting(settings, self.limiter, self.metrics)
        self.pool = BridgePool(settings, on_change=self._tools_changed)
        self.router = Router(self.pool, settings, self.metrics)
        self.caller = ToolCaller(self.pool, self.router, self.metrics, settings, self.accounting)
        self.mcp = GatewayServer(self.pool, self.caller)
        self.rest = RestApi(self.pool, self.caller)
        self.dashboard = Dashboard(self.pool, self.metrics, self.accounting)
        self.openai = OpenAIApi(self.caller)

    async def _tools_changed(self) -> None:
        await self.mcp.notifier.tools_changed()

    async def health(self, _request: Request) -> Response:
        healthy = len(self.pool.healthy)
        body = {
            "status": "ok" if healthy else "unavailable",
            "version": __version__,
            "bridges": {"healthy": healthy, "total": len(self.pool.bridges)},
            "tools": len(self.pool.union()),
        }
        return JSONResponse(body, status_code=200 if healthy else 503)

    async def metrics_endpoint(self, request: Request) -> Response:
        for bridge in self.pool.bridges:
            self.metrics.set_bridge_up(bridge.name, bridge.healthy)
        return await self.metrics.endpoint(request)

    @asynccontextmanager
    async def lifespan(self, _app: Starlette) -> AsyncIterator[None]:
        async with self.mcp.server.session_manager.run(), anyio.create_task_group() as tg:
            tg.start_soon(self.pool.run)
            tg.start_soon(self.limiter.run)
            try:
                yield
            finally:
                tg.cancel_scope.cancel()
                await self.limiter.aclose()

    def app(self) -> Starlette:
        settings = self.settings
        mcp_app = self.mcp.server.streamable_http_app(
            streamable_http_path="/mcp", host=settings.host, session_idle_timeout=settings.session_idle_timeout
        )
        sessions = SessionLimits(
            mcp_app, per_key=settings.max_sessions_per_key, idle_timeout=settings.session_idle_timeout
        )
        descriptors = open_file_limit()
        keys = None if settings.auth_disabled else settings.keys()
        return Starlette(
            routes=[
                Route("/health", self.health, methods=["GET"]),
                Route("/metrics", self.metrics_endpoint, methods=["GET"]),
                Route("/openapi.json", openapi.endpoint, methods=["GET"]),
                *self.rest.routes(),
                *self.openai.routes(),
                *self.dashboard.routes(),
                # A route of its own rather than a catch-all mount, so that a wrong method on the others gets 405.
                Route("/mcp", FastPath(sessions, self.caller, self.router)),
            ],
            middleware=[
                Middleware(RequestIdMiddleware),
                Middleware(MetricsMiddleware, metrics=self.metrics),
                Middleware(CapacityGuard, capacity=request_capacity(settings, descriptors), descriptors=descriptors),
                Middleware(
                    CORSMiddleware,
                    allow_origins=settings.cors_origins,
                    allow_methods=["GET", "POST", "DELETE", "OPTIONS"],
                    allow_headers=["Authorization", "Content-Type", "Accept", "X-Request-ID", *_MCP_HEADERS],
                    expose_headers=["X-Request-ID", "Retry-After", "RateLimit-Limit", "RateLimit-Remaining",
                                    "RateLimit-Reset", "Mcp-Session-Id"],
                ),
                Middleware(BodyLimit, max_body_size=settings.max_body_bytes),
                Middleware(ApiKeyAuth, keys=keys, open_paths=OPEN_PATHS, open_prefixes=OPEN_PREFIXES),
                Middleware(RateLimitMiddleware, limiter=self.limiter, on_reject=self.metrics.rate_limit_rejected),
            ],
            lifespan=self.lifespan,
        )
