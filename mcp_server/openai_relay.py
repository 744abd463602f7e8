"""LM Studio's OpenAI-compatible endpoints, relayed as they are: the bridge adds its guard and LM
Studio's token, and passes the bytes both ways unchanged.

`GET /v1/models`, `POST /v1/chat/completions`, `/v1/completions` and `/v1/embeddings` go to LM
Studio on the bridge's one connection pool (`LMStudioClient`). A streamed answer goes on as it
arrives; a caller that goes away closes LM Studio's request, which is how LM Studio learns to stop
generating. When LM Studio cannot answer, the caller gets OpenAI's error envelope: 503 when it is
not reachable (another bridge may serve the call), 504 when it took too long, 502 when it broke
off or sent what cannot be passed on.

Every answer carries `X-LLM-Hub-Source`: `lmstudio` when it is LM Studio's own (whatever its
status), `bridge` when the bridge made it, so a gateway can tell a model's error from a bridge's.
"""

from __future__ import annotations

import asyncio
import json
import re
import time
from collections.abc import Awaitable, Callable

import anyio
import httpx2
from loguru import logger
from mcp.server.transport_security import TransportSecurityMiddleware
from starlette.requests import Request
from starlette.responses import JSONResponse
from starlette.routing import Route
from starlette.types import Message, Receive, Scope, Send

from mcp_server.body import buffer_body
from mcp_server.errors import LMStudioError, Unreachable, UpstreamTimeout
from mcp_server.lmstudio import LMStudioClient

ENDPOINTS = {
    "/v1/models": "GET",
    "/v1/chat/completions": "POST",
    "/v1/completions": "POST",
    "/v1/embeddings": "POST",
}
SOURCE_HEADER = "x-llm-hub-source"
_SANE_REQUEST_ID = re.compile(rb"[A-Za-z0-9._:-]{1,128}")
_PASSED_HEADERS = ("content-type", "cache-control")


def openai_error(
    status: int,
    message: str,
    type_: str,
    *,
    code: str | None = None,
    param: str | None = None,
    headers: dict[str, str] | None = None,
) -> JSONResponse:
    """OpenAI's error envelope, which OpenAI clients read the message and code from."""
    body = {"error": {"message": message, "type": type_, "param": param, "code": code}}
    return JSONResponse(body, status_code=status, headers=headers)


def sse_error(message: str, code: str | None = None) -> bytes:
    """The event that ends a stream which broke off: OpenAI clients raise it as an error."""
    error = {"error": {"message": message, "type": "server_error", "param": None, "code": code}}
    return b"data: " + json.dumps(error).encode() + b"\n\n"


def lmstudio_failure(exc: LMStudioError) -> JSONResponse:
    """The envelope for a request LM Studio did not answer: the status says whether to go elsewhere."""
    if isinstance(exc, Unreachable):
        status, code = 503, "lmstudio_unreachable"
    elif isinstance(exc, UpstreamTimeout):
        status, code = 504, "lmstudio_timeout"
    else:
        status, code = 502, "lmstudio_failed"
    return openai_error(status, str(exc), "server_error", code=code, headers={SOURCE_HEADER: "bridge"})


async def until_caller_leaves(receive: Receive, send: Send, work: Callable[[Send], Awaitable[None]]) -> bool:
    """Run `work(send)` while watching the caller; True when the caller left before the answer was
    complete (and `work` was cancelled).

    The body must have been read already: from here on `receive` only says whether the caller is there.

    The watcher is a bare asyncio task (uvicorn serves on asyncio only), not a task group's: a group's
    own scope, task handle and wait for the cancelled watcher cost some 40 us a call, about a twentieth
    of a hop's CPU on a short answer.
    """
    left = complete = False
    failure: Exception | None = None

    async def sending(message: Message) -> None:
        nonlocal complete
        await send(message)
        if message["type"] == "http.response.body" and not message.get("more_body", False):
            complete = True  # the server says "disconnect" after a complete answer too

    async def watch() -> None:
        nonlocal left, failure
        try:
            while (await receive())["type"] != "http.disconnect":
                pass
        except Exception as exc:  # noqa: BLE001 - ends the call and is raised from it, as a task group would
            failure = exc
            scope.cancel()
            return
        if not complete:  # after a complete answer, `work` is left to read its upstream to the end
            left = True
            scope.cancel()

    with anyio.CancelScope() as scope:
        watcher = asyncio.get_running_loop().create_task(watch())
        try:
            await work(sending)
        except Exception as exc:  # noqa: BLE001 - raised below, after the watcher is stopped
            failure = exc
        finally:
            watcher.cancel()
    if failure is not None:
        raise failure
    return left


class OpenAIRelay:
    """The relay's routes; guarded like `/mcp` (Host and Origin here, the bearer token by `BearerGuard`)."""

    def __init__(self, client: LMStudioClient, security: TransportSecurityMiddleware, max_body: int) -> None:
        self.client = client
        self.security = security
        self.max_body = max_body

    def routes(self) -> list[Route]:
        return [Route(path, self, methods=[method]) for path, method in ENDPOINTS.items()]

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        refused = await self.security.validate_request(Request(scope), is_post=False)
        if refused is not None:
            await refused(scope, receive, send)
            return
        body, too_large, _ = await buffer_body(receive, self.max_body)
        if too_large:
            response = openai_error(
                413,
                f"The request body is larger than {self.max_body} bytes.",
                "invalid_request_error",
                headers={SOURCE_HEADER: "bridge"},
            )
            await response(scope, receive, send)
            return
        started = time.monotonic()
        path: str = scope["path"]
        status = 0

        async def relay(sending: Send) -> None:
            nonlocal status
            status = await self._relay(scope["method"], path, body, scope, sending)

        # A gateway's request id, so one id follows a call through both logs.
        given = next((value for name, value in scope["headers"] if name == b"x-request-id"), b"")
        with logger.contextualize(request_id=given.decode() if _SANE_REQUEST_ID.fullmatch(given) else None):
            if await until_caller_leaves(receive, send, relay):
                logger.info(
                    "relay {} {}: the caller left after {:.2f} s", scope["method"], path, time.monotonic() - started
                )
            else:
                logger.info("relay {} {}: {} in {:.2f} s", scope["method"], path, status, time.monotonic() - started)

    async def _relay(self, method: str, path: str, body: bytes, scope: Scope, send: Send) -> int:
        headers = {"content-type": "application/json"} if method == "POST" else {}
        try:
            async with self.client.relay(method, path, body, headers) as response:
                start = {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": _passed_headers(response),
                }
                if response.headers.get("content-length") is not None:  # a whole answer: one write, its length
                    whole = await self._whole(response)
                    start["headers"].append((b"content-length", str(len(whole)).encode()))
                    await send(start)
                    await send({"type": "http.response.body", "body": whole, "more_body": False})
                    return int(response.status_code)
                await send(start)
                ending = b""
                try:
                    with self.client.mapped_errors(mid_stream=True):
                        async for chunk in response.aiter_raw():
                            await send({"type": "http.response.body", "body": chunk, "more_body": True})
                except LMStudioError as exc:
                    logger.warning("relay {} {}: {}", method, path, exc)
                    # Too late for an error status: a stream ends with OpenAI's error event, which clients raise.
                    if response.headers.get("content-type", "").startswith("text/event-stream"):
                        ending = sse_error(str(exc), "lmstudio_failed")
                await send({"type": "http.response.body", "body": ending, "more_body": False})
                return int(response.status_code)
        except LMStudioError as exc:
            logger.warning("relay {} {}: {}", method, path, exc)
            failure = lmstudio_failure(exc)
            await failure(scope, _no_body, send)
            return failure.status_code

    async def _whole(self, response: httpx2.Response) -> bytes:
        with self.client.mapped_errors(mid_stream=True):
            return await response.aread()


async def _no_body() -> Message:
    return {"type": "http.disconnect"}


def _passed_headers(response: httpx2.Response) -> list[tuple[bytes, bytes]]:
    headers = [(SOURCE_HEADER.encode(), b"lmstudio")]
    for name in _PASSED_HEADERS:
        if (value := response.headers.get(name)) is not None:
            headers.append((name.encode(), value.encode("latin-1")))
    return headers
