"""The MCP server: the registry's tools offered through the SDK, over stdio or streamable HTTP.

The SDK speaks the protocol; the handlers here decide what the tools are and what a call does.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import Any

import anyio
import mcp_types as types
from loguru import logger
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server import __version__
from mcp_server.calls import Report, embed, embed_result, error_result, generate, generation_result
from mcp_server.errors import LMStudioError, ModelNotFound
from mcp_server.lmstudio import LMStudioClient
from mcp_server.notify import ChangeNotifier, ListChangedServer
from mcp_server.registry import ModelRegistry
from mcp_server.settings import BridgeSettings
from mcp_server.tools import (
    ARGS,
    LIST_MODELS,
    LIST_MODELS_TOOL,
    ChatArgs,
    EmbedArgs,
    InvalidArguments,
    ListModelsArgs,
    ModelTool,
    parse_arguments,
)

MODELS_URI = "llm-hub://models"
REQUEST_ID_META = "llm-hub/request-id"
"""`_meta` key under which a gateway sends its X-Request-ID with a tool call."""


class Bridge:
    """Everything one bridge process holds: settings, LM Studio client, registry, MCP server."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        token = settings.lmstudio_api_token.get_secret_value() if settings.lmstudio_api_token else None
        self.client = LMStudioClient(settings.lmstudio_url, token=token, timeout=settings.request_timeout)
        self.registry = ModelRegistry(self.client, settings)
        self.notifier = ChangeNotifier()
        self.registry.on_change(self.notifier.tools_changed)
        self.server = ListChangedServer(
            "llm-hub",
            version=__version__,
            title="LM Studio models (llm-hub)",
            instructions=(
                "Each model served by LM Studio is a tool: chat_* answers prompts, embed_* returns vectors, "
                "complete_* continues raw text. Call list_models for details on every model."
            ),
            lifespan=self._lifespan,
            get_tool_input_schema=self._input_schema,
            on_list_tools=self._list_tools,
            on_call_tool=self._call_tool,
            on_list_resources=self._list_resources,
            on_read_resource=self._read_resource,
        )
        self.notifier.attach(self.server)

    # -- lifecycle -----------------------------------------------------------------------

    @asynccontextmanager
    async def _lifespan(self, _server: Server[Any]) -> AsyncIterator[dict[str, Any]]:
        # Discovery runs beside the server, so a slow or absent LM Studio never delays the handshake.
        async with anyio.create_task_group() as tg:
            tg.start_soon(self.registry.run)
            yield {}
            tg.cancel_scope.cancel()

    async def __aenter__(self) -> Bridge:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.client.__aexit__(*exc_info)

    # -- handlers ------------------------------------------------------------------------

    def _input_schema(self, name: str) -> dict[str, Any] | None:
        if name == LIST_MODELS:
            return LIST_MODELS_TOOL.input_schema
        tool = self.registry.tools.get(name)
        return tool.definition.input_schema if tool else None

    async def _list_tools(self, _ctx: ServerRequestContext[Any], _params: Any) -> types.ListToolsResult:
        return types.ListToolsResult(tools=[LIST_MODELS_TOOL, *(t.definition for t in self.registry.tools.values())])

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        if params.name == LIST_MODELS:
            try:
                parse_arguments(LIST_MODELS, ListModelsArgs, params.arguments)
            except InvalidArguments as exc:
                return error_result(str(exc))
            return types.CallToolResult(
                content=[types.TextContent(type="text", text=json.dumps(self.catalog(), indent=1))],
                structured_content=self.catalog(),
            )
        tool = self.registry.tools.get(params.name)
        if tool is None:
            raise MCPError(
                types.INVALID_PARAMS,
                f"Unknown tool {params.name!r}: its model may have left LM Studio. List the tools again.",
            )
        try:
            args = parse_arguments(tool.name, ARGS[tool.kind], params.arguments)
        except InvalidArguments as exc:
            return error_result(str(exc))

        # A gateway passes its request id along, so one id follows a call through both logs.
        with logger.contextualize(request_id=(ctx.meta or {}).get(REQUEST_ID_META)):
            return await self._run(tool, args, _reporter(ctx))

    async def _run(self, tool: ModelTool, args: Any, report: Report) -> types.CallToolResult:
        started = time.monotonic()
        settings = self.settings
        try:
            if isinstance(args, EmbedArgs):
                result = embed_result(await embed(self.client, tool, args, timeout=settings.request_timeout))
            else:
                gen = await generate(
                    self.client, tool, args, report,
                    timeout=settings.request_timeout, heartbeat=settings.heartbeat_interval,
                )
                wants_json = isinstance(args, ChatArgs) and args.json_schema is not None
                result = generation_result(gen, wants_json)
        except LMStudioError as exc:
            if isinstance(exc, ModelNotFound):
                self.registry.poke()
            logger.warning("tool {} failed after {:.2f} s: {}", tool.name, time.monotonic() - started, exc)
            return error_result(str(exc), exc.partial)
        except anyio.get_cancelled_exc_class():
            logger.info("tool {} cancelled by the client after {:.2f} s", tool.name, time.monotonic() - started)
            raise
        logger.info("tool {} done in {:.2f} s", tool.name, time.monotonic() - started)
        return result

    async def _list_resources(self, _ctx: ServerRequestContext[Any], _params: Any) -> types.ListResourcesResult:
        return types.ListResourcesResult(
            resources=[
                types.Resource(
                    uri=MODELS_URI,
                    name="models",
                    title="LM Studio models",
                    description="Every model LM Studio serves, with its metadata and tool names (JSON).",
                    mime_type="application/json",
                )
            ]
        )

    async def _read_resource(
        self, _ctx: ServerRequestContext[Any], params: types.ReadResourceRequestParams
    ) -> types.ReadResourceResult:
        if str(params.uri) != MODELS_URI:
            raise MCPError(types.INVALID_PARAMS, f"Unknown resource {params.uri!s}; this server has {MODELS_URI}.")
        return types.ReadResourceResult(
            contents=[
                types.TextResourceContents(uri=MODELS_URI, mime_type="application/json", text=json.dumps(self.catalog()))
            ]
        )

    # -- views ---------------------------------------------------------------------------

    def catalog(self) -> dict[str, Any]:
        """The models with their tool names, and what we know of LM Studio (for list_models)."""
        names: dict[str, list[str]] = {}
        for tool in self.registry.tools.values():
            names.setdefault(tool.model.id, []).append(tool.name)
        return {
            "models": [{**m.as_dict(), "tools": names.get(m.id, [])} for m in self.registry.models.values()],
            "lmstudio": {
                "url": self.settings.lmstudio_url,
                "reachable": self.registry.reachable,
                "api": self.client.flavour,
                "last_error": self.registry.last_error,
            },
        }

    def health(self) -> dict[str, Any]:
        registry = self.registry
        return {
            "status": "ok" if registry.reachable else "degraded",
            "version": __version__,
            "lmstudio": {
                "url": self.settings.lmstudio_url,
                "reachable": registry.reachable,
                "api": self.client.flavour,
                "last_poll": registry.last_poll.isoformat() if registry.last_poll else None,
                "last_error": registry.last_error,
            },
            "models": len(registry.models),
            "tools": [LIST_MODELS, *registry.tools],
            "catalog_version": registry.version,
        }

    # -- transports ----------------------------------------------------------------------

    async def serve_stdio(self) -> None:
        async with stdio_server() as (read, write):
            await self.server.run(read, write, self.server.create_initialization_options())

    def http_app(self) -> ASGIApp:
        settings = self.settings
        loopback_hosts = ["127.0.0.1:*", "localhost:*", "[::1]:*"]
        loopback_origins = ["http://127.0.0.1:*", "http://localhost:*", "http://[::1]:*"]
        security = TransportSecuritySettings(
            enable_dns_rebinding_protection=True,
            allowed_hosts=[*loopback_hosts, *settings.allowed_hosts],
            allowed_origins=[*loopback_origins, *settings.allowed_origins],
        )

        async def health(_request: Request) -> JSONResponse:
            body = self.health()
            return JSONResponse(body, status_code=200 if self.registry.reachable else 503)

        app = self.server.streamable_http_app(
            streamable_http_path="/mcp",
            host=settings.host,
            transport_security=security,
            custom_starlette_routes=[Route("/health", health, methods=["GET"])],
        )
        if settings.bridge_token is not None:
            return BearerGuard(app, settings.bridge_token.get_secret_value(), protected_prefix="/mcp")
        return app


def _reporter(ctx: ServerRequestContext[Any]) -> Report:
    async def report(progress: float, message: str | None) -> None:
        await ctx.session.report_progress(progress, None, message)

    return report


class BearerGuard:
    """Requires `Authorization: Bearer <token>` on paths under a prefix; compares in constant time."""

    def __init__(self, app: ASGIApp, token: str, *, protected_prefix: str) -> None:
        self.app = app
        self.expected = f"Bearer {token}".encode()
        self.prefix = protected_prefix

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefix) and not self.is_authorized(scope):
            response = PlainTextResponse(
                "Missing or wrong bearer token for this bridge (LLM_HUB_BRIDGE_TOKEN).",
                status_code=401,
                headers={"WWW-Authenticate": "Bearer"},
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def is_authorized(self, scope: Scope) -> bool:
        for name, value in scope["headers"]:
            if name == b"authorization":
                return hmac.compare_digest(value, self.expected)
        return False
