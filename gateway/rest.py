"""Plain HTTP for curl and scripts: list tools, call one (JSON or SSE), see the bridges.

Described by the OpenAPI document served at /openapi.json (`openapi.py`).
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import anyio
import mcp_types as types
from sse_starlette.sse import EventSourceResponse, ServerSentEvent
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import Route

from gateway.auth import key_name_of
from gateway.pool import BridgePool
from gateway.router import Unavailable
from gateway.server import InvalidInput, ToolCaller, UnknownTool
from gateway.upstream import CallRejected, GatewayBusy
from gateway.usage import UsageRefused


def _dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _problem(status: int, message: str, headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status, headers=headers)


_BODY = "The body must be a JSON object of tool arguments, e.g. {\"prompt\": \"Hello\"}."


class RestApi:
    def __init__(self, pool: BridgePool, caller: ToolCaller) -> None:
        self.pool = pool
        self.caller = caller

    def routes(self) -> list[Route]:
        return [
            Route("/v1/tools", self.list_tools, methods=["GET"]),
            Route("/v1/tools/{name}", self.call_tool, methods=["POST"]),
            Route("/v1/bridges", self.bridges, methods=["GET"]),
        ]

    async def list_tools(self, request: Request) -> Response:
        tools = []
        key_name = key_name_of(request.scope)
        for entry in self.pool.union().values():
            if not self.caller.accounting.may_use_tool(key_name, entry.model):
                continue
            tool = {**_dump(entry.tool), "available": entry.available, "bridges": [b.name for b in entry.bridges]}
            if not entry.available:
                tool["unavailable_reason"] = entry.unavailable_reason()
            tools.append(tool)
        return JSONResponse({"tools": tools})

    async def bridges(self, request: Request) -> Response:
        key_name, accounting = key_name_of(request.scope), self.caller.accounting
        states = []
        for bridge in self.pool.bridges:
            state = bridge.state()
            state["tools"] = [t for t in state["tools"] if accounting.may_use_tool(key_name, bridge.model_for(t))]
            state["models"] = [m for m in state["models"] if accounting.may_use(key_name, m["model"])]
            states.append(state)
        return JSONResponse({"bridges": states})

    async def call_tool(self, request: Request) -> Response:
        name = request.path_params["name"]
        raw = await request.body()
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except RecursionError:
            return _problem(400, "The body is nested too deeply to be read.")
        except ValueError:
            return _problem(400, _BODY)
        if not isinstance(arguments, dict):
            return _problem(400, _BODY)
        try:
            self.caller.check(name, arguments)
        except InvalidInput as exc:
            return _problem(400, str(exc))
        except UnknownTool:
            return _problem(404, f"Unknown tool {name!r}; GET /v1/tools lists the tools available now.")
        key_name = key_name_of(request.scope)
        try:
            await self.caller.admit(key_name, name)
        except UsageRefused as exc:
            return _problem(exc.status, str(exc), exc.headers())
        if "text/event-stream" in request.headers.get("accept", ""):
            entry = self.pool.union()[name]
            if not entry.available:  # a status the client can act on, before the stream starts
                return _problem(503, entry.unavailable_reason(), {"Retry-After": str(self.pool.retry_after(entry))})
            return self._stream(name, arguments, key_name)
        try:
            result = await self.caller.call(name, arguments, None, key_name)
        except Unavailable as exc:
            return _problem(503, str(exc), {"Retry-After": str(exc.retry_after)})
        except GatewayBusy as exc:
            return _problem(503, str(exc), {"Retry-After": "1"})
        except CallRejected as exc:
            return _problem(502, f"The bridge refused the call: {exc}")
        return JSONResponse(_dump(result))

    def _stream(self, name: str, arguments: dict[str, Any], key_name: str | None) -> Response:
        """`progress` events as text arrives, then one `result` event.

        The call runs as sse-starlette's data sender, inside the response's task group, so a
        client that goes away cancels the call (and with it the bridge's request to LM Studio).
        """
        send, receive = anyio.create_memory_object_stream[ServerSentEvent](64)

        async def progress(value: float, total: float | None, message: str | None) -> None:
            event = {"progress": value, "total": total, "message": message}
            try:
                await send.send(ServerSentEvent(json.dumps(event), event="progress"))
            except (anyio.ClosedResourceError, anyio.BrokenResourceError):
                pass  # the client left; its call is being cancelled

        async def run() -> None:
            async with send:
                try:
                    result = await self.caller.call(name, arguments, progress, key_name)
                except (Unavailable, GatewayBusy, CallRejected) as exc:
                    result = types.CallToolResult(content=[types.TextContent(type="text", text=str(exc))], is_error=True)
                await send.send(ServerSentEvent(json.dumps(_dump(result)), event="result"))

        async def events() -> AsyncIterator[ServerSentEvent]:
            async with receive:
                async for event in receive:
                    yield event

        return EventSourceResponse(events(), data_sender_callable=run, ping=15)
