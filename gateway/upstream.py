"""Talking to one bridge: every request is its own stateless 2026-07-28 HTTP request.

No session is shared between calls, so one call's failure (its arguments, its model's answer,
its stream dying) ends that call and no other. Messages are built and read with the SDK's own
types (`mcp_types`); the transport is one pooled `httpx2.AsyncClient` per bridge.

Failures are sorted by what they say about the bridge, because that decides the consequence:
`BridgeDown` (refused, reset, 5xx: take it out of rotation), `CallFailed` (this call went wrong,
the bridge is fine) and `GatewayBusy` (the gateway itself ran out of connections or descriptors:
never the bridge's fault).
"""

from __future__ import annotations

import errno
import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager, suppress
from typing import Any

import anyio
import httpx2
import mcp_types as types
from mcp.shared.inbound import (
    MCP_METHOD_HEADER,
    MCP_NAME_HEADER,
    MCP_PROTOCOL_VERSION_HEADER,
    encode_header_value,
)
from mcp_types.version import LATEST_MODERN_VERSION
from pydantic import ValidationError

from gateway import __version__
from mcp_server.httpclient import async_transport
from mcp_server.openai_relay import SOURCE_HEADER as RELAY_SOURCE_HEADER

PROTOCOL_VERSION = LATEST_MODERN_VERSION
ACCEPT = "application/json, text/event-stream"
CLIENT_INFO = {"name": "llm-hub-gateway", "version": __version__}
# The bridge's uvicorn closes idle connections after 5 s; dropping ours first means a request is
# never written onto a connection the bridge is closing.
KEEPALIVE_SECONDS = 3.0
_EXHAUSTED = {errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM}
# The bridge ends a call's stream right after its result (well under a millisecond later); this long at most is
# spent reading that end, so a stream held open past its result delays the call by no more than this.
_FINISH_SECONDS = 0.25

Progress = Callable[[float, float | None, str | None], Awaitable[None]]


class UpstreamError(Exception):
    """Base of what can go wrong talking to a bridge; `str()` is for the caller."""


class BridgeDown(UpstreamError):
    """Evidence that the bridge itself is down: refused, reset, or a 5xx."""


class CallFailed(UpstreamError):
    """This call failed; the bridge is fine (it said no, or sent something unreadable)."""


class CallRejected(CallFailed):
    """The bridge answered with a JSON-RPC error, kept as is for the caller."""

    def __init__(self, error: types.ErrorData) -> None:
        super().__init__(error.message)
        self.error = error


class GatewayBusy(UpstreamError):
    """The gateway ran out of its own resources (connection pool, file descriptors)."""


def modern_meta(extra: dict[str, Any] | None = None) -> dict[str, Any]:
    """The `_meta` every 2026-07-28 request carries."""
    return {
        types.PROTOCOL_VERSION_META_KEY: PROTOCOL_VERSION,
        types.CLIENT_CAPABILITIES_META_KEY: {},
        types.CLIENT_INFO_META_KEY: CLIENT_INFO,
        **(extra or {}),
    }


class BridgeClient:
    """One bridge's HTTP client; safe to share between any number of concurrent calls."""

    def __init__(self, url: str, *, token: str | None, timeout: float, connections: int = 256) -> None:
        self.url = url
        self.name = url.split("://", 1)[-1]
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # The read timeout only has to outlast the bridge's heartbeats (at most 5 s apart). A call that finds
        # every connection taken waits for one within its own deadline: the pool is a queue (the caller gets
        # heartbeats meanwhile), not a shortage to report.
        limits = httpx2.Limits(
            max_connections=connections,
            max_keepalive_connections=max(1, connections // 4),
            keepalive_expiry=KEEPALIVE_SECONDS,
        )
        self.http = httpx2.AsyncClient(
            base_url=url,
            headers=headers,
            timeout=httpx2.Timeout(timeout, connect=5.0, read=60.0, pool=timeout),
            limits=limits,  # for a proxy from the environment, which gets a stock transport
            transport=async_transport(limits),
        )
        # Health checks have a connection of their own, so a pool full of calls never delays one or reads as a
        # failed check.
        self.health_http = httpx2.AsyncClient(
            base_url=url,
            headers=headers,
            limits=httpx2.Limits(max_connections=1, max_keepalive_connections=1, keepalive_expiry=KEEPALIVE_SECONDS),
        )
        # Joined once: merging a relative "/mcp" into the base URL is half of building each request.
        self._mcp_url = self.http.base_url.join("mcp")
        self._relay_urls: dict[str, httpx2.URL] = {}
        self._ids = itertools.count(1)

    async def aclose(self) -> None:
        await self.http.aclose()
        await self.health_http.aclose()

    # -- requests ------------------------------------------------------------------------

    def _request(self, method: str, params: dict[str, Any]) -> tuple[bytes, dict[str, str]]:
        message = types.JSONRPCRequest(jsonrpc="2.0", id=next(self._ids), method=method, params=params)
        headers = {
            "Content-Type": "application/json",
            "Accept": ACCEPT,
            MCP_PROTOCOL_VERSION_HEADER: PROTOCOL_VERSION,
            MCP_METHOD_HEADER: method,
        }
        if method == "tools/call":
            headers[MCP_NAME_HEADER] = encode_header_value(params["name"])
        return message.model_dump_json(by_alias=True, exclude_none=True).encode(), headers

    @asynccontextmanager
    async def post(
        self, body: bytes, headers: dict[str, str], *, timeout: httpx2.Timeout | None = None
    ) -> AsyncIterator[httpx2.Response]:
        """POST to the bridge's `/mcp`; the response is open (streaming) inside the context.

        Answers of 5xx raise `BridgeDown`, other error answers are the caller's to read.
        """
        async with AsyncExitStack() as stack:
            with _mapped(self.name):
                response = await self._open(stack, body, headers, timeout or httpx2.USE_CLIENT_DEFAULT)
                if response.status_code >= 500:
                    raise BridgeDown(f"bridge {self.name} answered HTTP {response.status_code}")
                yield response

    @asynccontextmanager
    async def relay(self, path: str, body: bytes, headers: dict[str, str], timeout: float) -> AsyncIterator[httpx2.Response]:
        """POST to the bridge's OpenAI relay (`path` such as `/v1/chat/completions`); the response is
        open (streaming) inside the context.

        Raises `BridgeDown` for a 5xx the bridge itself answered, or its relay saying its LM Studio is
        not reachable (another bridge may serve the call); LM Studio's own answers, errors included,
        are the caller's to pass on.
        """
        url = self._relay_urls.get(path) or self._relay_urls.setdefault(path, self.http.base_url.join(path.lstrip("/")))
        # No read deadline short of the call's: LM Studio sends nothing while it loads a model or reads a long prompt.
        limits = httpx2.Timeout(timeout, connect=5.0)
        async with AsyncExitStack() as stack:
            with _mapped(self.name):
                response = await self._open(stack, body, headers, limits, url)
                source = response.headers.get(RELAY_SOURCE_HEADER)
                if source is None and response.status_code >= 500:
                    raise BridgeDown(f"bridge {self.name} answered HTTP {response.status_code}")
                if source == "bridge" and response.status_code == 503:
                    raise BridgeDown(f"bridge {self.name} cannot reach its LM Studio")
                yield response

    async def _open(
        self, stack: AsyncExitStack, body: bytes, headers: dict[str, str], timeout: Any, url: httpx2.URL | None = None
    ) -> httpx2.Response:
        def request() -> AbstractAsyncContextManager[httpx2.Response]:
            return self.http.stream("POST", url or self._mcp_url, content=body, headers=headers, timeout=timeout)

        try:
            return await stack.enter_async_context(request())
        except (httpx2.RemoteProtocolError, httpx2.WriteError) as exc:
            if _out_of_resources(exc):
                raise
            # A kept-alive connection the bridge closed as the request went out: the bridge never
            # saw it, so it is sent once more on a fresh connection before anyone is blamed.
            return await stack.enter_async_context(request())

    async def call_tool(
        self, name: str, arguments: dict[str, Any] | None, progress: Progress | None, meta: dict[str, Any]
    ) -> types.CallToolResult:
        params = types.CallToolRequestParams(name=name, arguments=arguments).model_dump(
            by_alias=True, mode="json", exclude_none=True
        )
        # Always ask for progress: the bridge's heartbeats are what tell a slow call from a dead one.
        params["_meta"] = modern_meta({**meta, "progressToken": 1})
        body, headers = self._request("tools/call", params)
        async with self.post(body, headers) as response:
            messages = self._messages(response)
            async for message in messages:
                if isinstance(message, types.JSONRPCNotification):
                    if message.method == "notifications/progress" and progress is not None:
                        try:
                            update = types.ProgressNotificationParams.model_validate(message.params or {})
                        except ValidationError:
                            raise CallFailed(f"bridge {self.name} sent an unreadable progress update") from None
                        await progress(update.progress, update.total, update.message)
                    continue
                if isinstance(message, types.JSONRPCError):
                    raise CallRejected(message.error)
                if isinstance(message, types.JSONRPCResponse):
                    try:
                        result = types.CallToolResult.model_validate(message.result)
                    except ValidationError:
                        raise CallFailed(f"bridge {self.name} answered the call with an unreadable result") from None
                    await _finish(messages)
                    return result
        raise CallFailed(f"bridge {self.name} ended its answer without a result")

    async def list_tools(self) -> list[types.Tool]:
        body, headers = self._request("tools/list", {"_meta": modern_meta()})
        async with self.post(body, headers, timeout=httpx2.Timeout(10.0)) as response:
            async for message in self._messages(response):
                if isinstance(message, types.JSONRPCResponse):
                    try:
                        return types.ListToolsResult.model_validate(message.result).tools
                    except ValidationError:
                        raise CallFailed(f"bridge {self.name} sent an unreadable tool list") from None
                if isinstance(message, types.JSONRPCError):
                    raise CallRejected(message.error)
        raise CallFailed(f"bridge {self.name} sent no tool list")

    @asynccontextmanager
    async def listen(self) -> AsyncIterator[AsyncIterator[types.JSONRPCNotification]]:
        """A `subscriptions/listen` stream for tool-list changes, open inside the context."""
        params = types.SubscriptionsListenRequestParams(
            notifications=types.SubscriptionFilter(tools_list_changed=True)
        ).model_dump(by_alias=True, mode="json", exclude_none=True)
        body, headers = self._request("subscriptions/listen", {**params, "_meta": modern_meta()})
        async with self.post(body, headers, timeout=httpx2.Timeout(10.0, read=None)) as response:
            yield self._notifications(response)

    async def health(self, timeout: float) -> httpx2.Response:
        with _mapped(self.name):
            try:
                return await self.health_http.get("/health", timeout=timeout)
            except httpx2.ReadTimeout as exc:  # the calls' message would name their 60 s
                raise CallFailed(
                    f"bridge {self.name} did not answer /health within {timeout:g} s (LLM_HUB_HEALTH_TIMEOUT)"
                ) from exc

    # -- reading answers -----------------------------------------------------------------

    async def _notifications(self, response: httpx2.Response) -> AsyncIterator[types.JSONRPCNotification]:
        async for message in self._messages(response):
            if isinstance(message, types.JSONRPCNotification):
                yield message

    async def _messages(self, response: httpx2.Response) -> AsyncIterator[types.JSONRPCMessage]:
        """The JSON-RPC messages of an answer, as they arrive (SSE) or at once (JSON)."""
        content_type = response.headers.get("content-type", "").partition(";")[0].strip().lower()
        with _mapped(self.name, mid_answer=True):
            if content_type == "text/event-stream":
                async for event in httpx2.EventSource(response):
                    if event.data:
                        yield self._parse(event.data)
                return
            raw = await response.aread()
        if response.status_code == 401:
            raise CallFailed(f"bridge {self.name} refused the gateway's token (set LLM_HUB_BRIDGE_TOKEN to the bridge's)")
        if content_type != "application/json":
            raise CallFailed(f"bridge {self.name} answered HTTP {response.status_code} ({content_type or 'no body'})")
        yield self._parse(raw)

    def _parse(self, data: str | bytes) -> types.JSONRPCMessage:
        try:
            return types.jsonrpc_message_adapter.validate_json(data)
        except ValidationError:
            raise CallFailed(f"bridge {self.name} sent a message that is not JSON-RPC") from None


class _mapped:
    """Sorts httpx2's transport errors into BridgeDown and GatewayBusy (a context manager)."""

    def __init__(self, name: str, *, mid_answer: bool = False) -> None:
        self.name = name
        self.mid_answer = mid_answer

    def __enter__(self) -> None:
        return None

    def __exit__(self, _type: type[BaseException] | None, exc: BaseException | None, _tb: object) -> None:
        if exc is None or isinstance(exc, UpstreamError) or not isinstance(exc, httpx2.HTTPError | OSError):
            return
        if _out_of_resources(exc):
            raise GatewayBusy(
                "The gateway has no free connection or file descriptor for this call right now; retry shortly."
            ) from exc
        if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
            raise BridgeDown(f"bridge {self.name} is not reachable ({_reason(exc)})") from exc
        if isinstance(exc, httpx2.ReadTimeout):
            raise CallFailed(f"bridge {self.name} sent nothing for 60 s") from exc
        # A reset or broken pipe that reached us unwrapped says the same as httpx2's own errors.
        if isinstance(exc, httpx2.TransportError | ConnectionError):
            where = "in the middle of its answer" if self.mid_answer else "before answering"
            raise BridgeDown(f"bridge {self.name} closed the connection {where} ({_reason(exc)})") from exc
        raise CallFailed(f"bridge {self.name}: {_reason(exc)}") from exc


async def _finish(messages: AsyncIterator[types.JSONRPCMessage]) -> None:
    """Read an answer to its end once its result is in, so its connection goes back to the pool:
    httpx2 closes a connection whose response is closed unread, and every call would open a new
    one. Nothing after the result can change the call, so a failure here, or a stream the bridge
    keeps open past `_FINISH_SECONDS`, only costs that connection, as before."""
    with anyio.move_on_after(_FINISH_SECONDS), suppress(Exception):  # the call already has its result
        async for _ in messages:
            pass


def _out_of_resources(exc: BaseException) -> bool:
    if isinstance(exc, httpx2.PoolTimeout):
        return True
    seen: BaseException | None = exc
    while seen is not None:
        if isinstance(seen, OSError) and seen.errno in _EXHAUSTED:
            return True
        # A name with several addresses fails as a group of attempts (anyio's connect_tcp).
        if isinstance(seen, BaseExceptionGroup):
            return any(_out_of_resources(inner) for inner in seen.exceptions)
        seen = seen.__cause__ or seen.__context__
    return False


def _reason(exc: BaseException) -> str:
    return str(exc) or type(exc).__name__
