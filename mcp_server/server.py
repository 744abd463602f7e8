"""The MCP server: the registry's tools offered through the SDK, over stdio or streamable HTTP.

The SDK speaks the protocol; the handlers here decide what the tools are and what a call does.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import re
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from datetime import datetime
from typing import Any

import anyio
import mcp_types as types
from loguru import logger
from mcp.server import Server, ServerRequestContext
from mcp.server.stdio import stdio_server
from mcp.server.transport_security import TransportSecurityMiddleware, TransportSecuritySettings
from mcp.shared.exceptions import MCPError
from mcp.shared.message import SessionMessage
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from pydantic import ValidationError
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route
from starlette.types import ASGIApp, Receive, Scope, Send

from mcp_server import __version__
from mcp_server.body import buffer_body
from mcp_server.calls import Report, embed, embed_result, error_result, generate, generation_result
from mcp_server.delivery import ProgressRelay
from mcp_server.errors import LMStudioError, ModelNotFound
from mcp_server.jsonsafe import refused_tool_call, unsendable
from mcp_server.lmstudio import LMStudioClient
from mcp_server.notify import ChangeNotifier, ListChangedServer
from mcp_server.openai_relay import OpenAIRelay, openai_error
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
_SANE_REQUEST_ID = re.compile(r"[A-Za-z0-9._:-]{1,128}")
# The SDK refuses larger bodies on /mcp (413) itself; the OpenAI relay refuses them alike.
_MAX_CHECKED_BODY = 4 * 1024 * 1024


class Bridge:
    """Everything one bridge process holds: settings, LM Studio client, registry, MCP server."""

    def __init__(self, settings: BridgeSettings) -> None:
        self.settings = settings
        token = settings.lmstudio_api_token.get_secret_value() if settings.lmstudio_api_token else None
        self.client = LMStudioClient(
            settings.lmstudio_url, token=token, timeout=settings.request_timeout, connections=settings.lmstudio_connections
        )
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
        self.in_flight: dict[str, int] = {}
        # Model -> the poll that was the latest when it last answered a call.
        self._answered: dict[str, datetime | None] = {}
        """Tool calls running now, by model id (published in /health for a gateway's routing)."""

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

    async def _first_discovery(self) -> None:
        """Wait, a bounded time, for the first discovery to end (the handshake itself never waits).

        Many hosts list the tools once, right after connecting; that listing should see the models.
        """
        discovered = self.registry.discovered
        if not discovered.is_set():
            with anyio.move_on_after(self.settings.first_list_wait):
                await discovered.wait()

    async def _list_tools(self, _ctx: ServerRequestContext[Any], _params: Any) -> types.ListToolsResult:
        await self._first_discovery()
        return types.ListToolsResult(tools=[LIST_MODELS_TOOL, *(t.definition for t in self.registry.tools.values())])

    async def _call_tool(self, ctx: ServerRequestContext[Any], params: types.CallToolRequestParams) -> types.CallToolResult:
        try:
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
            if tool is None and not self.registry.discovered.is_set():
                await self._first_discovery()  # a 2026-era client may call a tool it knows without listing
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

            relay = ProgressRelay(ctx)
            # A gateway passes its request id along, so one id follows a call through both logs.
            with logger.contextualize(request_id=_request_id(ctx)):
                result = await self._run(tool, args, relay.report)
                await relay.settle()  # TypeScript clients drop progress that arrives in one read with the result
            return result
        except MCPError:
            raise  # a protocol error meant for the client (an unknown tool)
        except Exception as exc:  # noqa: BLE001 - the last resort
            # Last resort, so nothing a call meets becomes internal text in the caller's answer (or a
            # -32603). Only the type is logged: the exception's text may quote a prompt or completion.
            # Cancellation is a BaseException and still propagates.
            logger.error("tool {} failed inside the bridge: {}", params.name, type(exc).__name__)
            return error_result(f"The bridge failed on this call ({params.name}); its log has the error type.")

    async def _run(self, tool: ModelTool, args: Any, report: Report) -> types.CallToolResult:
        started = time.monotonic()
        settings = self.settings
        model = tool.model.id
        self.in_flight[model] = self.in_flight.get(model, 0) + 1
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
            # LM Studio answered, so the model is loaded now (it may have just loaded it), whatever
            # the last poll said: a gateway routing by `serving` should not count it cold until the next.
            self._answered[model] = self.registry.last_poll
        except LMStudioError as exc:
            if isinstance(exc, ModelNotFound):
                self.registry.poke()
            logger.warning("tool {} failed after {:.2f} s: {}", tool.name, time.monotonic() - started, exc)
            return error_result(str(exc), exc.partial)
        except anyio.get_cancelled_exc_class():
            logger.info("tool {} cancelled by the client after {:.2f} s", tool.name, time.monotonic() - started)
            raise
        finally:
            if running := self.in_flight[model] - 1:
                self.in_flight[model] = running
            else:
                del self.in_flight[model]
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
        names = self._tool_names()
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
            "serving": self.serving(),
        }

    def serving(self) -> list[dict[str, Any]]:
        """Per model offered as tools, what a gateway routes by: loaded, parallel slots, calls running."""
        names = self._tool_names()
        default_slots = self.settings.parallel_slots
        return [
            {
                "model": model.id,
                "tools": names[model.id],
                # A backend that cannot say (the OpenAI listing) serves what it lists.
                "loaded": model.loaded is not False or self._answered.get(model.id) == self.registry.last_poll,
                "slots": (model.slots if model.loaded else None) or default_slots,
                "in_flight": self.in_flight.get(model.id, 0),
            }
            for model in self.registry.models.values()
            if model.id in names
        ]

    def _tool_names(self) -> dict[str, list[str]]:
        names: dict[str, list[str]] = {}
        for tool in self.registry.tools.values():
            names.setdefault(tool.model.id, []).append(tool.name)
        return names

    # -- transports ----------------------------------------------------------------------

    async def serve_stdio(self) -> None:
        async with stdio_server() as (read, write):
            await self.server.run(_ReparsedToolCalls(read), write, self.server.create_initialization_options())

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

        relay = OpenAIRelay(self.client, TransportSecurityMiddleware(security), _MAX_CHECKED_BODY)
        app = self.server.streamable_http_app(
            streamable_http_path="/mcp",
            host=settings.host,
            transport_security=security,
            custom_starlette_routes=[Route("/health", health, methods=["GET"]), *relay.routes()],
        )
        app = UnsendableCallGuard(app)
        if settings.bridge_token is not None:
            return BearerGuard(app, settings.bridge_token.get_secret_value(), protected_prefixes=("/mcp", "/v1/"))
        return app


class _ReparsedToolCalls:
    """The stdio transport's incoming messages, with tool calls its JSON parser refused parsed again.

    The SDK's stdio reader parses with pydantic's parser, which refuses the escape of a lone
    surrogate (`"\\ud800"`, what JavaScript's JSON.stringify writes for a broken string) and
    nesting deeper than about 200 levels, and then leaves the request unanswered: the client waits
    forever. Python's parser takes both: parsed here, the call reaches the handler, which refuses
    the argument by name like any other input that cannot be sent on.
    """

    def __init__(self, inner: Any) -> None:
        self._inner = inner

    @property
    def last_context(self) -> Any:  # the sender's context, which the SDK's dispatcher restores
        return getattr(self._inner, "last_context", None)

    async def receive(self) -> SessionMessage | Exception:
        return _parsed_again(await self._inner.receive())

    def __aiter__(self) -> _ReparsedToolCalls:
        return self

    async def __anext__(self) -> SessionMessage | Exception:
        return _parsed_again(await self._inner.__anext__())

    async def aclose(self) -> None:
        await self._inner.aclose()

    async def __aenter__(self) -> _ReparsedToolCalls:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self.aclose()


def _parsed_again(item: SessionMessage | Exception) -> SessionMessage | Exception:
    if not isinstance(item, ValidationError):
        return item
    errors = item.errors()
    line = errors[0].get("input") if len(errors) == 1 and errors[0]["type"] == "json_invalid" else None
    if not isinstance(line, str):
        return item
    try:
        message = json.loads(line)
    except (ValueError, RecursionError):  # not JSON after all, or absurdly deep
        return item
    params = message.get("params") if isinstance(message, dict) and message.get("method") == "tools/call" else None
    # Only the arguments may hold what cannot be sent on: they are refused before anything echoes
    # them, while an id or a name would be written back into the answer and break the stream.
    if not isinstance(params, dict) or unsendable({**message, "params": {**params, "arguments": None}}):
        return item
    try:
        return SessionMessage(types.jsonrpc_message_adapter.validate_python(message, by_name=False))
    except ValidationError:
        return item


def _request_id(ctx: ServerRequestContext[Any]) -> str | None:
    """The gateway's id for this call, so one id follows it through both logs: in `_meta`, or in the
    X-Request-ID header of a call relayed as it came (stdio has no HTTP request)."""
    given = (ctx.meta or {}).get(REQUEST_ID_META)
    if isinstance(given, str) and _SANE_REQUEST_ID.fullmatch(given):
        return given
    header = ctx.request.headers.get("x-request-id") if ctx.request is not None else None
    return header if header is not None and _SANE_REQUEST_ID.fullmatch(header) else None


class UnsendableCallGuard:
    """Answers a handshake-era `tools/call` on `/mcp` whose input cannot be sent on with the same
    argument error as every other transport.

    That era's SDK transport parses the body with pydantic's parser, which refuses a lone surrogate
    or deep nesting with a bare -32700 parse error; Python's parser takes both, so the answer can say
    which argument is wrong. (In the 2026 era the SDK's own path gets the call to `parse_arguments`.)
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not self.applies(scope):
            await self.app(scope, receive, send)
            return
        body, too_large, receive = await buffer_body(receive, _MAX_CHECKED_BODY)
        refused = None
        if not too_large:  # the SDK refuses those itself (413)
            try:
                refused = refused_tool_call(json.loads(body))
            except RecursionError:
                refused = (None, "The request is nested too deeply to be read.")
            except ValueError:
                pass  # not JSON: the SDK answers with its parse error
        if refused is None:
            await self.app(scope, receive, send)
            return
        ident, message = refused
        result = error_result(message).model_dump(by_alias=True, mode="json", exclude_none=True)
        await JSONResponse({"jsonrpc": "2.0", "id": ident, "result": result})(scope, receive, send)

    def applies(self, scope: Scope) -> bool:
        if scope["type"] != "http" or scope["method"] != "POST" or not scope["path"].startswith("/mcp"):
            return False
        version = next((v for k, v in scope["headers"] if k == b"mcp-protocol-version"), b"")
        return version.decode("latin-1") not in MODERN_PROTOCOL_VERSIONS


class BearerGuard:
    """Requires `Authorization: Bearer <token>` on paths under the prefixes, read as RFC 7235 has it
    (the scheme in any case, any spacing around the token); compares in constant time."""

    def __init__(self, app: ASGIApp, token: str, *, protected_prefixes: tuple[str, ...]) -> None:
        self.app = app
        self.expected = _digest(token.encode())
        self.prefixes = protected_prefixes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["path"].startswith(self.prefixes) and not self.is_authorized(scope):
            message = "Missing or wrong bearer token for this bridge (LLM_HUB_BRIDGE_TOKEN)."
            challenge = {"WWW-Authenticate": "Bearer"}
            response = (
                openai_error(401, message, "invalid_request_error", code="invalid_api_key", headers=challenge)
                if scope["path"].startswith("/v1/")
                else PlainTextResponse(message, status_code=401, headers=challenge)
            )
            await response(scope, receive, send)
            return
        await self.app(scope, receive, send)

    def is_authorized(self, scope: Scope) -> bool:
        values = [value for name, value in scope["headers"] if name == b"authorization"]
        if len(values) != 1:
            return False
        parts = values[0].split()
        if len(parts) != 2 or parts[0].lower() != b"bearer":
            return False
        # Digests have one length, so the time taken tells nothing about the token's length either.
        return hmac.compare_digest(_digest(parts[1]), self.expected)


def _digest(value: bytes) -> bytes:
    return hashlib.sha256(value).digest()
