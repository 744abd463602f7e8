"""The bridges behind the gateway: one connection each, health-checked, with its tools.

Each bridge gets one long-lived task that owns its SDK `Client` (a client must be entered and
left in the same task), checks the bridge's `/health` on the interval, and re-reads its tools
when the bridge says they changed. Calls run in the callers' tasks on that shared client.
"""

from __future__ import annotations

import time
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

import anyio
import httpx2
import mcp_types as types
from loguru import logger
from mcp import Client
from mcp.client.streamable_http import streamable_http_client

from gateway.settings import GatewaySettings

ChangeListener = Callable[[], Awaitable[None]]
_FIRST_RETRY = 0.25


class BridgeUnavailable(Exception):
    """The bridge cannot take calls now (down, ejected, or failing mid-call)."""


class BridgeConnection:
    """One bridge: its state, its tools, and the client the gateway calls it with."""

    def __init__(self, url: str, settings: GatewaySettings, on_change: ChangeListener) -> None:
        self.url = url
        self.name = url.split("://", 1)[-1]
        self.settings = settings
        self._on_change = on_change
        self.healthy = False
        self.tools: dict[str, types.Tool] = {}
        self.latency_ms: float | None = None
        self.last_check: datetime | None = None
        self.last_error: str | None = None
        self.calls = 0
        self._client: Client | None = None
        self._wake = anyio.Event()
        self._tools_stale = False
        self._eject_reason: str | None = None
        token = settings.bridge_token.get_secret_value() if settings.bridge_token else None
        self._headers = {"Authorization": f"Bearer {token}"} if token else {}

    # -- what callers use ----------------------------------------------------------------

    def state(self) -> dict[str, Any]:
        return {
            "url": self.url,
            "healthy": self.healthy,
            "latency_ms": self.latency_ms,
            "last_check": self.last_check.isoformat() if self.last_check else None,
            "last_error": self.last_error,
            "calls": self.calls,
            "tools": sorted(self.tools),
        }

    async def call(
        self, name: str, arguments: dict[str, Any] | None, progress: Callable[[float, float | None, str | None], Awaitable[None]],
        meta: dict[str, Any] | None,
    ) -> types.CallToolResult:
        client = self._client
        if client is None or not self.healthy:
            raise BridgeUnavailable(f"bridge {self.name} is not connected")
        self.calls += 1
        try:
            return await client.call_tool(name, arguments, progress_callback=progress, meta=meta)  # type: ignore[arg-type]
        except anyio.get_cancelled_exc_class():
            raise
        except Exception as exc:
            raise BridgeUnavailable(f"bridge {self.name} failed: {_describe(exc)}") from exc

    def eject(self, reason: str) -> None:
        """Take the bridge out of rotation until a health check passes again."""
        if self.healthy:
            logger.warning("bridge {} ejected: {}", self.name, reason)
        self.healthy = False
        self.last_error = reason
        self._eject_reason = reason
        self._wake.set()

    def refresh_tools_soon(self) -> None:
        self._tools_stale = True
        self._wake.set()

    # -- the owner task ------------------------------------------------------------------

    async def run(self, http: httpx2.AsyncClient) -> None:
        retry = _FIRST_RETRY
        while True:
            if await self._check(http):
                retry = _FIRST_RETRY
                try:
                    await self._serve_connected(http)
                except Exception as exc:
                    self.last_error = f"connection lost: {_describe(exc)}"
                    logger.warning("bridge {}: {}", self.name, self.last_error)
                await self._set_healthy(False)
            # A bridge that is starting or restarting is back within seconds: look again soon,
            # backing off to the health interval while it stays down.
            await self._sleep(min(retry, self.settings.health_interval))
            retry *= 2

    async def _serve_connected(self, http: httpx2.AsyncClient) -> None:
        async with httpx2.AsyncClient(
            headers=self._headers, timeout=httpx2.Timeout(self.settings.call_timeout, connect=5.0)
        ) as mcp_http:
            transport = streamable_http_client(f"{self.url}/mcp", http_client=mcp_http)
            # No response cache: the tool list changes under us and must never be served stale.
            async with Client(transport, mode="legacy", cache=None, message_handler=self._on_message) as client:
                self._client = client
                try:
                    self._eject_reason = None
                    await self._load_tools(client)
                    await self._set_healthy(True)
                    while True:
                        await self._sleep()
                        if self._eject_reason is not None or not await self._check(http):
                            return
                        if self._tools_stale:
                            await self._load_tools(client)
                finally:
                    self._client = None

    async def _on_message(self, message: Any) -> None:
        if isinstance(message, types.ToolListChangedNotification):
            self.refresh_tools_soon()

    async def _load_tools(self, client: Client) -> None:
        self._tools_stale = False
        listed = await client.list_tools()
        tools = {tool.name: tool for tool in listed.tools}
        if tools != self.tools:
            self.tools = tools
            if self.healthy:
                await self._on_change()

    async def _check(self, http: httpx2.AsyncClient) -> bool:
        started = time.monotonic()
        self.last_check = datetime.now(UTC)
        try:
            response = await http.get(f"{self.url}/health", timeout=self.settings.health_timeout)
        except httpx2.HTTPError as exc:
            return self._failed_check(f"health check failed: {_describe(exc)}")
        self.latency_ms = round((time.monotonic() - started) * 1000, 2)
        if response.status_code != 200:
            detail = _health_detail(response)
            return self._failed_check(f"health check answered {response.status_code}{detail}")
        return True

    def _failed_check(self, reason: str) -> bool:
        if self.healthy or self.last_error != reason:
            logger.warning("bridge {}: {}", self.name, reason)
        self.last_error = reason
        return False

    async def _set_healthy(self, healthy: bool) -> None:
        if healthy == self.healthy:
            return
        self.healthy = healthy
        if healthy:
            self.last_error = None
            logger.info("bridge {} admitted with {} tools", self.name, len(self.tools))
        await self._on_change()

    async def _sleep(self, seconds: float | None = None) -> None:
        with anyio.move_on_after(self.settings.health_interval if seconds is None else seconds):
            await self._wake.wait()
        self._wake = anyio.Event()


def _describe(exc: BaseException) -> str:
    if isinstance(exc, BaseExceptionGroup) and exc.exceptions:
        return _describe(exc.exceptions[0])
    return str(exc) or type(exc).__name__


def _health_detail(response: httpx2.Response) -> str:
    try:
        error = response.json().get("lmstudio", {}).get("last_error")
    except (ValueError, AttributeError):
        return ""
    return f": {error}" if error else ""


class BridgePool:
    """All bridges: the union of their tools and round-robin choice among the healthy ones."""

    def __init__(self, settings: GatewaySettings, on_change: ChangeListener) -> None:
        self.settings = settings
        self._on_change = on_change
        self.bridges = [BridgeConnection(url, settings, self._changed) for url in settings.bridges]
        self._turn: dict[str, int] = {}
        self._union: dict[str, types.Tool] = {}

    async def run(self) -> None:
        async with httpx2.AsyncClient(headers={}) as http, anyio.create_task_group() as tg:
            for bridge in self.bridges:
                tg.start_soon(bridge.run, http)

    async def _changed(self) -> None:
        # Clients hear about changes to the union only, not every bridge flapping behind it.
        union = self.tools()
        if union != self._union:
            self._union = union
            await self._on_change()

    @property
    def healthy(self) -> list[BridgeConnection]:
        return [b for b in self.bridges if b.healthy]

    def tools(self) -> dict[str, types.Tool]:
        union: dict[str, types.Tool] = {}
        for bridge in self.healthy:
            for name, tool in bridge.tools.items():
                union.setdefault(name, tool)
        return union

    def candidates(self, tool: str) -> list[BridgeConnection]:
        """Healthy bridges offering `tool`, starting with the next one in round-robin order."""
        having = [b for b in self.healthy if tool in b.tools]
        if not having:
            return []
        turn = self._turn.get(tool, 0)
        self._turn[tool] = turn + 1
        start = turn % len(having)
        return having[start:] + having[:start]
