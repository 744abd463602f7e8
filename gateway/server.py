"""The gateway's MCP server: the union of the bridges' tools, each call sent on to one of them.

The SDK is the server towards clients, in both eras. Towards the bridges each call is its own
stateless request (`upstream.py`), chosen by the router; 2026-07-28 `tools/call` requests skip
this server altogether (`fastpath.py`).
"""

from __future__ import annotations

import time
import traceback
from typing import Any

import anyio
import mcp_types as types
from loguru import logger
from mcp.server import ServerRequestContext
from mcp.shared.exceptions import MCPError
from starlette.requests import Request

from gateway import __version__
from gateway.auth import key_name_of
from gateway.heartbeat import kept_alive
from gateway.metrics import Metrics, ToolOutcome
from gateway.pool import BridgePool
from gateway.request_id import current_request_id
from gateway.router import Router, StreamBroken, Unavailable
from gateway.settings import GatewaySettings
from gateway.upstream import CallFailed, CallRejected, GatewayBusy, Progress
from gateway.usage import Accounting, tokens_used
from mcp_server.delivery import ProgressRelay
from mcp_server.jsonsafe import unsendable
from mcp_server.notify import ChangeNotifier, ListChangedServer
from mcp_server.server import REQUEST_ID_META


class InvalidInput(Exception):
    """The caller's input cannot be sent on (see `mcp_server.jsonsafe`)."""


class UnknownTool(Exception):
    """No bridge has offered this tool within the grace period."""


class ToolCaller:
    """A tool call through the gateway, shared by the MCP endpoint and the REST one.

    Raises `InvalidInput`, `UnknownTool`, `Unavailable`, `GatewayBusy` and `CallRejected` for the
    edge to map to its own statuses (and `admit` the refusals of `gateway.usage`); every other
    failure is an `is_error` result saying what happened.
    """

    def __init__(
        self, pool: BridgePool, router: Router, metrics: Metrics, settings: GatewaySettings, accounting: Accounting
    ) -> None:
        self.pool = pool
        self.router = router
        self.metrics = metrics
        self.settings = settings
        self.accounting = accounting

    def check(self, name: str, arguments: Any) -> None:
        """Refuse what no bridge could take: unsendable input, unknown tools."""
        if arguments is not None and not isinstance(arguments, dict):
            raise InvalidInput("Tool arguments must be a JSON object.")
        if problem := unsendable(arguments):
            raise InvalidInput(f"Invalid arguments for {name}: {problem}")
        if name not in self.pool.union():
            raise UnknownTool(f"Unknown tool {name!r}: no bridge offers it. List the tools again.")

    def visible(self, key_name: str | None) -> list[types.Tool]:
        """The union's tools this key may call."""
        union = self.pool.union()
        return [tool for tool in self.pool.tools() if self.accounting.may_use_tool(key_name, union[tool.name].model)]

    async def admit(self, key_name: str | None, name: str) -> None:
        """Raises `Forbidden` or `OverBudget` when the key may not call this (known) tool now."""
        await self.accounting.admit_tool(key_name, name, self.pool.union()[name].model)

    async def charge(self, key_name: str | None, name: str, structured: Any) -> None:
        """Charges the key for a call the bridge answered, from the usage in its structured result."""
        entry = self.pool.union().get(name)
        if entry is not None and (model := entry.model) is not None:
            await self.accounting.charge(key_name, model, *tokens_used(structured))

    async def call(
        self, name: str, arguments: dict[str, Any] | None, progress: Progress | None, key_name: str | None
    ) -> types.CallToolResult:
        """`progress=None`: the caller receives nothing until the result (so a retry is always safe).

        Admission (`admit`) is the edge's to check first; the call is charged to `key_name` here.
        """
        self.check(name, arguments)
        started = time.monotonic()
        bridge_name = "none"
        outcome: ToolOutcome = "error"
        request_id = current_request_id()
        meta = {REQUEST_ID_META: request_id} if request_id else {}
        try:
            with anyio.fail_after(self.settings.call_timeout):
                async with kept_alive(progress, self.settings.heartbeat_interval) as relayed:
                    result, bridge = await self.router.call(name, arguments, relayed, meta)
            if result.meta:  # the bridge's name is not this server's: the SDK stamps the gateway's
                result.meta.pop(types.SERVER_INFO_META_KEY, None)
                result.meta = result.meta or None
            bridge_name = bridge.name
            outcome = "error" if result.is_error else "ok"
            await self.charge(key_name, name, result.structured_content)
            return result
        except TimeoutError:
            return _error(f"The call to {name} took longer than {self.settings.call_timeout:g} s (LLM_HUB_CALL_TIMEOUT).")
        except (StreamBroken, CallFailed) as exc:
            if isinstance(exc, CallRejected):
                if exc.error.code == types.INVALID_PARAMS:
                    self._refresh_tools(name)
                raise
            return _error(str(exc))
        except (Unavailable, GatewayBusy):
            outcome = "rejected"
            raise
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            self.observe(name, bridge_name, outcome, started)

    def observe(self, name: str, bridge: str, outcome: ToolOutcome, started: float) -> None:
        seconds = time.monotonic() - started
        self.metrics.observe_tool_call(name, bridge, outcome, seconds)
        logger.info("tool {} via {}: {} in {:.2f} s", name, bridge, outcome, seconds)

    def _refresh_tools(self, name: str) -> None:
        # A bridge no longer has the tool (its model left): our list was stale, not the bridge.
        for bridge in self.pool.bridges:
            if name in bridge.tools:
                bridge.refresh_tools_soon()


def _error(message: str) -> types.CallToolResult:
    return types.CallToolResult(content=[types.TextContent(type="text", text=message)], is_error=True)


class GatewayServer:
    def __init__(self, pool: BridgePool, caller: ToolCaller) -> None:
        self.pool = pool
        self.caller = caller
        self.notifier = ChangeNotifier(resources=False)
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
        entry = self.pool.union().get(name)
        return entry.tool.input_schema if entry else None

    async def _list_tools(self, ctx: ServerRequestContext[Any], _params: Any) -> types.ListToolsResult:
        # Each key sees the tools of its own models, so no cache may hand one caller's list to another.
        return types.ListToolsResult(tools=self.caller.visible(_key_name(ctx)), cache_scope="private")

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        relay = ProgressRelay(ctx)
        progress: Progress | None = None
        if (ctx.meta or {}).get("progress_token") is not None:

            async def progress(value: float, total: float | None, message: str | None) -> None:
                await relay.report(value, message, total)

        try:
            # Admission was checked at the HTTP edge (`fastpath.py`), where a refusal gets its status.
            result = await self.caller.call(params.name, params.arguments, progress, _key_name(ctx))
            await relay.settle()  # as the bridge does: TypeScript clients drop progress read with the result
            return result
        except (InvalidInput, UnknownTool) as exc:
            raise MCPError(types.INVALID_PARAMS, str(exc)) from None
        except CallRejected as exc:
            raise MCPError(exc.error.code, exc.error.message) from None
        except (Unavailable, GatewayBusy) as exc:
            return _error(str(exc))
        except Exception as exc:  # noqa: BLE001
            # A bug of ours. The log gets its type and place, not its text, which may quote the
            # caller's arguments or the answer; the caller gets a line it can quote.
            frame = traceback.extract_tb(exc.__traceback__)[-1]
            logger.error("tool {} failed inside the gateway: {} at {}:{}", params.name, type(exc).__name__,
                         frame.filename, frame.lineno)
            return _error(f"The gateway failed on this call (request id {current_request_id()}); its log has why.")


def _key_name(ctx: ServerRequestContext[Any]) -> str | None:
    """The caller's key name (`auth.py`); None for a caller from inside the process, which no key limits."""
    return key_name_of(ctx.request.scope) if isinstance(ctx.request, Request) else None
