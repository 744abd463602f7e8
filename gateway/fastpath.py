"""2026-07-28 `tools/call` relayed straight to a bridge, without being served again here.

Such a request is self-contained (no session: its protocol version and capabilities travel in
`_meta`), and the spec has the server check its `Mcp-Method`/`Mcp-Name` headers against the body,
so an intermediary may route on them. The gateway still reads the body once, to refuse input no
bridge could take and to make sure the header names the tool the body calls; then the bytes go to
the chosen bridge unchanged (the client's key replaced by the bridge token, `Mcp-Param-*` passed
on) and the bridge's SSE comes back as it arrives. A client that closes its stream closes the
bridge's. Anything else (older versions, other methods, anything odd) is left to the SDK.

Every `tools/call` on `/mcp`, in either era, is also checked here for input no bridge could take.
"""

from __future__ import annotations

import contextlib
import json
import time
from collections.abc import AsyncIterator
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp.shared.inbound import (
    ERROR_CODE_HTTP_STATUS,
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PARAM_HEADER_PREFIX,
    MCP_PROTOCOL_VERSION_HEADER,
    decode_header_value,
)
from mcp_types.version import MODERN_PROTOCOL_VERSIONS
from starlette.responses import Response
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from gateway import __version__
from gateway.auth import key_name_of
from gateway.heartbeat import kept_alive_answer
from gateway.metrics import ToolOutcome
from gateway.pool import Bridge
from gateway.refusal import FORBIDDEN, RATE_LIMITED, UNAVAILABLE, refusal
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import current_request_id
from gateway.router import Router, Unavailable
from gateway.server import InvalidInput, ToolCaller, UnknownTool
from gateway.upstream import BridgeDown, CallFailed, GatewayBusy
from gateway.usage import UsageRefused
from mcp_server.body import buffer_body
from mcp_server.jsonsafe import refused_tool_call
from mcp_server.openai_relay import until_caller_leaves

_FORWARDED = {"content-type", "accept", MCP_PROTOCOL_VERSION_HEADER, MCP_METHOD_HEADER, MCP_NAME_HEADER}
_SERVER_INFO = {"io.modelcontextprotocol/serverInfo": {"name": "llm-hub-gateway", "version": __version__}}


class FastPath:
    """ASGI wrapper around the gateway's MCP app; takes the 2026-era `tools/call` requests."""

    def __init__(self, app: ASGIApp, caller: ToolCaller, router: Router) -> None:
        self.app = app
        self.caller = caller
        self.router = router

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST" or scope["path"].rstrip("/") != "/mcp":
            await self.app(scope, receive, send)
            return
        # The body-size middleware in front has capped the body already.
        body, _, receive = await buffer_body(receive, self.caller.settings.max_body_bytes)
        try:
            message = json.loads(body)
        except RecursionError:
            await _answer(send, _rpc_error(None, "The request is nested too deeply to be read."))
            return
        except ValueError:
            message = None  # the SDK answers with the precise parse error
        if (refused := refused_tool_call(message)) is not None:
            await _answer(send, _rpc_error(*refused))
            return
        if (denied := await self.admission(scope, message)) is not None:
            await denied(scope, receive, send)
            return
        call = _tool_call(message, scope) if self.routable(scope) else None
        if call is None:  # not ours to judge: the SDK serves it, or answers with the precise error
            await self.app(scope, receive, send)
            return
        ident, name, arguments = call
        try:
            self.caller.check(name, arguments)
        except (InvalidInput, UnknownTool) as exc:
            await _answer(send, _rpc_error(ident, str(exc)))
            return
        meta = message["params"].get("_meta")
        token = meta.get("progressToken") if isinstance(meta, dict) else None
        async with kept_alive_answer(send, token, self.caller.settings.heartbeat_interval) as answer:
            await self.relay(scope, receive, answer, body, ident, name, arguments)

    async def admission(self, scope: Scope, message: Any) -> Response | None:
        """The HTTP answer to tool calls (either era) this key may not make now: 403 (model not
        allowed) or 429 (token budget spent), with a JSON-RPC error MCP clients show.

        Answered here rather than by the SDK so the status and Retry-After reach the client in
        both eras, as the request limiter's do; a refusal ends no session.
        """
        union = self.caller.pool.union()
        for item in message if isinstance(message, list) else [message]:
            params = item.get("params") if isinstance(item, dict) and item.get("method") == "tools/call" else None
            name = params.get("name") if isinstance(params, dict) else None
            if not isinstance(name, str) or name not in union:
                continue  # nothing to call: the SDK or the fast path answers why
            try:
                await self.caller.admit(key_name_of(scope), name)
            except UsageRefused as exc:
                code = {403: FORBIDDEN, 429: RATE_LIMITED}.get(exc.status, UNAVAILABLE)
                return refusal(scope, exc.status, code, str(exc), exc.headers())
        return None

    def routable(self, scope: Scope) -> bool:
        """A `tools/call` under a version whose servers must check headers against the body."""
        method = version = None
        for key, value in scope["headers"]:
            if key == MCP_METHOD_HEADER.encode():
                method = value
            elif key == MCP_PROTOCOL_VERSION_HEADER.encode():
                version = value
        return method == b"tools/call" and version is not None and version.decode("latin-1") in MODERN_PROTOCOL_VERSIONS

    async def relay(
        self, scope: Scope, receive: Receive, send: Send, body: bytes, ident: types.RequestId, name: str,
        arguments: dict[str, Any] | None,
    ) -> None:
        started = time.monotonic()
        deadline = started + self.caller.settings.call_timeout
        headers = _forwarded_headers(scope)
        outcome: ToolOutcome = "rejected"
        bridge_name = "none"
        tail = _LastEvent()

        async def watched(message: Message) -> None:  # the answer's last event carries the usage to charge
            if message["type"] == "http.response.body":
                tail.feed(message.get("body", b""))
            await send(message)

        async def run(bridge: Bridge) -> ToolOutcome:
            nonlocal bridge_name
            bridge_name = bridge.name
            return await self._stream(bridge, body, headers, ident, receive, watched, deadline)

        try:
            outcome, _ = await self.router.attempt(name, arguments, run)
        except Unavailable as exc:
            await _answer(send, _rpc_result(ident, str(exc), is_error=True))
        except GatewayBusy as exc:
            await _answer(send, _rpc_error(ident, str(exc), types.INTERNAL_ERROR), status=503)
        except CallFailed as exc:
            outcome = "error"
            await _answer(send, _rpc_result(ident, str(exc), is_error=True))
        except anyio.get_cancelled_exc_class():
            outcome = "cancelled"
            raise
        finally:
            self.caller.observe(name, bridge_name, outcome, started)
            if (result := tail.result()) is not None:
                await self.caller.charge(key_name_of(scope), name, result.get("structuredContent"))

    async def _stream(
        self, bridge: Bridge, body: bytes, headers: dict[str, str], ident: types.RequestId, receive: Receive,
        send: Send, deadline: float,
    ) -> ToolOutcome:
        """Relay one bridge's answer, watching the caller from the start (the bridge may take a while
        to begin its answer): a caller that leaves closes the bridge's request.

        Returns the outcome. Raises BridgeDown and CallFailed only before anything was sent.
        """
        outcome: ToolOutcome = "error"

        async def work(sending: Send) -> None:
            nonlocal outcome
            outcome = await self._answer_from(bridge, body, headers, ident, sending, deadline)

        return "cancelled" if await until_caller_leaves(receive, send, work) else outcome

    async def _answer_from(
        self, bridge: Bridge, body: bytes, headers: dict[str, str], ident: types.RequestId, send: Send,
        deadline: float,
    ) -> ToolOutcome:
        async with bridge.client.post(body, headers) as response:
            if response.status_code == 401:  # relayed as is, the caller would think its own key was wrong
                message = f"Bridge {bridge.name} refused the gateway's token (LLM_HUB_BRIDGE_TOKEN must match the bridge's)."
                await _answer(send, _rpc_result(ident, message, is_error=True))
                return "error"
            chunks = response.aiter_raw()
            with anyio.move_on_after(deadline - time.monotonic()) as waiting:
                first = await _first_chunk(chunks, bridge)
            if waiting.cancelled_caught:
                await _answer(send, _rpc_result(ident, _too_long(self.caller.settings.call_timeout), is_error=True))
                return "error"
            if first is not None and _whole_json(response, first):
                return await _relay_whole(response, first, chunks, send)
            await send({"type": "http.response.start", "status": response.status_code,
                        "headers": _response_headers(response)})
            tail = _LastEvent()
            ending: str | None = None
            with anyio.move_on_after(deadline - time.monotonic()) as streaming:
                try:
                    chunk = first
                    while chunk is not None:
                        tail.feed(chunk)
                        await send({"type": "http.response.body", "body": chunk, "more_body": True})
                        chunk = await anext(chunks, None)
                except httpx2.HTTPError as exc:
                    if isinstance(exc, httpx2.TransportError) and not isinstance(exc, httpx2.TimeoutException):
                        await bridge.eject(f"bridge {bridge.name} closed the connection mid-answer")
                    ending = f"The answer from bridge {bridge.name} was cut off; call the tool again."
            if streaming.cancelled_caught:
                ending = _too_long(self.caller.settings.call_timeout)
            # Too late to retry: the caller has part of the answer. A closing result says why, so
            # the client shows a reason instead of a dropped connection.
            last = _sse(_rpc_result(ident, ending, is_error=True)) if ending else b""
            await send({"type": "http.response.body", "body": last, "more_body": False})
        return "error" if ending else tail.outcome()


def _whole_json(response: httpx2.Response, first: bytes) -> bool:
    """Whether the bridge answered with one JSON message (no progress was asked for) and it is all in `first`."""
    length = response.headers.get("content-length")
    return (response.headers.get("content-type", "").startswith("application/json")
            and length is not None and length.isdigit() and int(length) == len(first))


async def _relay_whole(response: httpx2.Response, body: bytes, chunks: AsyncIterator[bytes], send: Send) -> ToolOutcome:
    """A whole JSON answer goes on in one piece, with its length: nothing is left to stream, so there
    is no chunked framing to write and no caller to watch while waiting."""
    with contextlib.suppress(httpx2.HTTPError):  # the end, already read: the connection goes back to the pool
        await anext(chunks, None)
    headers = [*_response_headers(response), (b"content-length", str(len(body)).encode())]
    await send({"type": "http.response.start", "status": response.status_code, "headers": headers})
    await send({"type": "http.response.body", "body": body, "more_body": False})
    tail = _LastEvent()
    tail.feed(body)
    return tail.outcome()


def _too_long(seconds: float) -> str:
    return f"The call took longer than {seconds:g} s (LLM_HUB_CALL_TIMEOUT)."


async def _first_chunk(chunks: AsyncIterator[bytes], bridge: Bridge) -> bytes | None:
    try:
        return await anext(chunks, None)
    except httpx2.TimeoutException as exc:  # slow, not down: the health check judges that
        raise CallFailed(f"bridge {bridge.name} sent nothing for 60 s") from exc
    except httpx2.TransportError as exc:
        raise BridgeDown(f"bridge {bridge.name} closed the connection before answering") from exc


class _LastEvent:
    """Keeps the last complete SSE event, to tell from it whether the call succeeded."""

    def __init__(self) -> None:
        self.pending = b""
        self.last = b""

    def feed(self, chunk: bytes) -> None:
        events = (self.pending + chunk).split(b"\n\n")
        self.pending = events.pop()
        complete = [event for event in events if event.strip()]
        if complete:
            self.last = complete[-1]

    def result(self) -> dict[str, Any] | None:
        """The tool result the last event (or whole JSON answer) carries, if it is one."""
        event = self.last or self.pending
        payload = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:")) or event
        try:
            message = json.loads(payload)
        except (ValueError, RecursionError):
            return None
        result = message.get("result") if isinstance(message, dict) else None
        return result if isinstance(result, dict) else None

    def outcome(self) -> ToolOutcome:
        result = self.result()
        return "ok" if result is not None and not result.get("isError") else "error"


def _tool_call(message: Any, scope: Scope) -> tuple[types.RequestId, str, dict[str, Any] | None] | None:
    """(id, tool, arguments) of a well-formed single `tools/call`, or None to leave it to the SDK."""
    if not isinstance(message, dict) or message.get("jsonrpc") != "2.0" or message.get("method") != "tools/call":
        return None
    ident, params = message.get("id"), message.get("params")
    if isinstance(ident, bool) or not isinstance(ident, int | str) or not isinstance(params, dict):
        return None
    name, arguments = params.get("name"), params.get("arguments")
    if not isinstance(name, str) or (arguments is not None and not isinstance(arguments, dict)):
        return None
    header = next((v for k, v in scope["headers"] if k == MCP_NAME_HEADER.encode()), None)
    if header is None or decode_header_value(header.decode("latin-1")) != name:
        return None  # the SDK answers a header that disagrees with the body with -32020
    return ident, name, arguments


def _forwarded_headers(scope: Scope) -> dict[str, str]:
    headers = {}
    for key, value in scope["headers"]:
        name = key.decode("latin-1")
        if name in _FORWARDED or name.startswith(MCP_PARAM_HEADER_PREFIX.lower()):
            headers[name] = value.decode("latin-1")
    if request_id := current_request_id():
        headers[REQUEST_ID_HEADER] = request_id
    return headers


def _response_headers(response: httpx2.Response) -> list[tuple[bytes, bytes]]:
    headers = [(b"content-type", response.headers.get("content-type", "application/json").encode("latin-1"))]
    if response.headers.get("content-type", "").startswith("text/event-stream"):
        headers += [(b"cache-control", b"no-cache, no-transform"), (b"x-accel-buffering", b"no")]
    return headers


def _rpc_error(ident: types.RequestId | None, message: str, code: int = types.INVALID_PARAMS) -> types.JSONRPCError:
    return types.JSONRPCError(jsonrpc="2.0", id=ident, error=types.ErrorData(code=code, message=message))


def _rpc_result(ident: types.RequestId, text: str, *, is_error: bool) -> types.JSONRPCResponse:
    result = types.CallToolResult(content=[types.TextContent(type="text", text=text)], is_error=is_error)
    dumped = result.model_dump(by_alias=True, mode="json", exclude_none=True)
    return types.JSONRPCResponse(jsonrpc="2.0", id=ident, result={**dumped, "_meta": _SERVER_INFO})


def _sse(message: types.JSONRPCResponse | types.JSONRPCError) -> bytes:
    return b"event: message\ndata: " + message.model_dump_json(by_alias=True, exclude_none=True).encode() + b"\n\n"


async def _answer(send: Send, message: types.JSONRPCResponse | types.JSONRPCError, status: int | None = None) -> None:
    if status is None:
        status = ERROR_CODE_HTTP_STATUS.get(message.error.code, 200) if isinstance(message, types.JSONRPCError) else 200
    payload = message.model_dump(by_alias=True, mode="json", exclude_none=True)
    payload.setdefault("id", None)  # JSON-RPC: an id that could not be read is null, not absent
    body = json.dumps(payload).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]})
    await send({"type": "http.response.body", "body": body})

