"""Telling connected MCP clients that the tool list changed, in both protocol eras.

The SDK has no broadcast for this: 2026-era clients listen on a subscription bus, while
handshake-era connections must each be sent `notifications/tools/list_changed`, so we keep them.
"""

from __future__ import annotations

from typing import Any

import anyio
import mcp_types as types
from mcp.server import NotificationOptions, Server, ServerRequestContext
from mcp.server.models import InitializationOptions
from mcp.server.session import ServerSession
from mcp.server.subscriptions import InMemorySubscriptionBus, ListenHandler, ResourcesListChanged, ToolsListChanged

# A dead or stuck peer must not hold up telling the others.
_NOTIFY_TIMEOUT = 5.0


class ChangeNotifier:
    """`resources`: whether the server has resources, whose list changes with the tools (the
    bridge's model catalog); a server must not send notifications for capabilities it lacks."""

    def __init__(self, *, resources: bool = True) -> None:
        self.bus = InMemorySubscriptionBus()
        self.resources = resources
        self._sessions: dict[int, ServerSession] = {}

    def attach(self, server: Server[Any]) -> None:
        """Let `server` serve `subscriptions/listen` and remember handshake-era connections."""
        server.add_request_handler("subscriptions/listen", types.SubscriptionsListenRequestParams, ListenHandler(self.bus))
        server.add_notification_handler("notifications/initialized", types.NotificationParams, self._initialized)

    async def _initialized(self, ctx: ServerRequestContext[Any], _params: types.NotificationParams) -> None:
        key = id(ctx.session)
        self._sessions[key] = ctx.session
        # Forget the session when its connection closes, or every HTTP client that ever connected
        # would stay here until the next change. The SDK gives handlers no public handle on the
        # connection; its exit stack is the documented place for per-connection teardown.
        ctx.session._connection.exit_stack.callback(self._sessions.pop, key, None)  # noqa: SLF001

    @property
    def connected(self) -> int:
        """Handshake-era connections that will be told of changes."""
        return len(self._sessions)

    async def tools_changed(self) -> None:
        await self.bus.publish(ToolsListChanged())
        if self.resources:
            await self.bus.publish(ResourcesListChanged())
        async with anyio.create_task_group() as tg:
            for key, session in list(self._sessions.items()):
                tg.start_soon(self._notify, key, session)

    async def _notify(self, key: int, session: ServerSession) -> None:
        try:
            with anyio.fail_after(_NOTIFY_TIMEOUT):
                await session.send_ping()  # the cheapest way to learn the peer is gone
                await session.send_tool_list_changed()
                if self.resources:
                    await session.send_resource_list_changed()
        except Exception:
            self._sessions.pop(key, None)


class ListChangedServer(Server[Any]):
    """The SDK builds HTTP and in-memory sessions with default options, which advertise
    `tools.listChanged: false`; our tool lists do change, so say so on every transport."""

    def create_initialization_options(
        self,
        notification_options: NotificationOptions | None = None,
        experimental_capabilities: dict[str, dict[str, Any]] | None = None,
        extensions: dict[str, dict[str, Any]] | None = None,
    ) -> InitializationOptions:
        return super().create_initialization_options(
            notification_options or NotificationOptions(tools_changed=True, resources_changed=True),
            experimental_capabilities,
            extensions,
        )
