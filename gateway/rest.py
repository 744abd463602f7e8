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

from gateway.pool import BridgePool
from gateway.router import no_progress
from gateway.server import ToolCaller


def _dump(model: Any) -> Any:
    return model.model_dump(by_alias=True, mode="json", exclude_none=True)


def _problem(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


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

    async def list_tools(self, _request: Request) -> Response:
        return JSONResponse({"tools": [_dump(tool) for tool in self.pool.tools().values()]})

    async def bridges(self, _request: Request) -> Response:
        return JSONResponse({"bridges": [bridge.state() for bridge in self.pool.bridges]})

    async def call_tool(self, request: Request) -> Response:
        name = request.path_params["name"]
        if name not in self.pool.tools():
            return _problem(404, f"Unknown tool {name!r}; GET /v1/tools lists the tools available now.")
        raw = await request.body()
        try:
            arguments = json.loads(raw) if raw.strip() else {}
        except ValueError:
            return _problem(400, "The body must be a JSON object of tool arguments, e.g. {\"prompt\": \"Hello\"}.")
        if not isinstance(arguments, dict):
            return _problem(400, "The body must be a JSON object of tool arguments, e.g. {\"prompt\": \"Hello\"}.")
        if "text/event-stream" in request.headers.get("accept", ""):
            return self._stream(name, arguments)

        result = await self.caller.call(name, arguments, no_progress)
        return JSONResponse(_dump(result))

    def _stream(self, name: str, arguments: dict[str, Any]) -> Response:
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
                result: types.CallToolResult = await self.caller.call(name, arguments, progress)
                await send.send(ServerSentEvent(json.dumps(_dump(result)), event="result"))

        async def events() -> AsyncIterator[ServerSentEvent]:
            async with receive:
                async for event in receive:
                    yield event

        return EventSourceResponse(events(), data_sender_callable=run, ping=15)
