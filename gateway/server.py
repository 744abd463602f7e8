"""The gateway's MCP server: the union of the bridges' tools, each call relayed to one of them.

The SDK is the server towards clients and the client towards bridges; nothing here speaks
JSON-RPC by hand.
"""

from __future__ import annotations

import time
from typing import Any

import anyio
import mcp_types as types
from loguru import logger
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPError

from gateway import __version__
from gateway.metrics import Metrics
from gateway.pool import BridgePool
from gateway.request_id import current_request_id
from gateway.router import CallFailed, NoBridge, Progress, route_call
from gateway.settings import GatewaySettings
from mcp_server.notify import ChangeNotifier, ListChangedServer
from mcp_server.server import REQUEST_ID_META


class ToolCaller:
    """A tool call through the gateway, shared by the MCP endpoint and the REST one."""

    def __init__(self, pool: BridgePool, metrics: Metrics, settings: GatewaySettings) -> None:
        self.pool = pool
        self.metrics = metrics
        self.settings = settings

    async def call(self, name: str, arguments: dict[str, Any] | None, progress: Progress) -> types.CallToolResult:
        """Run the call; failures of the bridges come back as `is_error` results saying what happened."""
        started = time.monotonic()
        bridge_name, outcome = "none", "error"
        request_id = current_request_id()
        meta = {REQUEST_ID_META: request_id} if request_id else None
        try:
            with anyio.fail_after(self.settings.call_timeout):
                result, bridge = await route_call(self.pool, name, arguments, progress, meta)
            bridge_name = bridge.name
            outcome = "error" if result.is_error else "ok"
            return result
        except TimeoutError:
            return _error(f"The call to {name} took longer than {self.settings.call_timeout:g} s (LLM_HUB_CALL_TIMEOUT).")
        except (NoBridge, CallFailed) as exc:
            return _error(str(exc))
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            seconds = time.monotonic() - started
            self.metrics.observe_tool_call(name, bridge_name, outcome, seconds)
            logger.info("tool {} via {}: {} in {:.2f} s", name, bridge_name, outcome, seconds)


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


class GatewayServer:
    def __init__(self, pool: BridgePool, caller: ToolCaller) -> None:
        self.pool = pool
        self.caller = caller
        self.notifier = ChangeNotifier()
        self.server = ListChangedServer(
            "llm-hub-gateway",
            version=__version__,
            title="llm-hub gateway",
            instructions="Models served by LM Studio on several machines, one tool each (chat_*, embed_*).",
            get_tool_input_schema=self._input_schema,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
        )
        self.notifier.attach(self.server)

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        tool = self.pool.tools().get(name)
        return tool.input_schema if tool else None

    async def _list_tools(self, _ctx: ServerRequestContext[Any], _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=list(self.pool.tools().values()))

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name not in self.pool.tools():
            raise MCPError(types.INVALID_PARAMS, f"Unknown tool {params.name!r}: no healthy bridge offers it.")

        async def progress(value: float, total: float | None, message: str | None) -> None:
            await ctx.session.report_progress(value, total, message)

        return await self.caller.call(params.name, params.arguments, progress)
