"""How the gateway's edge says no (401, 403, 429, 503) so that every kind of client can read why."""

from __future__ import annotations

from mcp.server.transport_security import RequestBodyLimitMiddleware
from starlette.responses import JSONResponse
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from mcp_server.openai_relay import ENDPOINTS as OPENAI_ENDPOINTS
from mcp_server.openai_relay import openai_error

# JSON-RPC codes from the implementation-defined server-error range.
UNAUTHORIZED = -32001
RATE_LIMITED = -32029
FORBIDDEN = -32043
UNAVAILABLE = -32003
_OPENAI_KINDS = {
    401: ("invalid_request_error", "invalid_api_key"),
    403: ("permission_denied", None),
    429: ("rate_limit_error", "rate_limit_exceeded"),
}


def refusal(scope: Scope, status: int, code: int, message: str, headers: dict[str, str]) -> JSONResponse:
    """`{"error": message}`, on /mcp a JSON-RPC error (MCP clients show its message, and for any
    other body only "Server returned an error response"), on the OpenAI API OpenAI's envelope."""
    path = scope["path"].rstrip("/")
    if path == "/mcp":
        body: dict[str, object] = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    elif path in OPENAI_ENDPOINTS:
        # OpenAI's envelope, so OpenAI clients raise their own AuthenticationError, RateLimitError...
        kind, reason = _OPENAI_KINDS.get(status, ("server_error", None))
        return openai_error(status, message, kind, code=reason, headers=headers)
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)


class BodyLimit:
    """The SDK's body-size limit (413), said in OpenAI's envelope on the OpenAI API, where the SDK's
    plain text would reach an OpenAI client as a bare status."""

    def __init__(self, app: ASGIApp, max_body_size: int) -> None:
        self.limited = RequestBodyLimitMiddleware(app, max_body_size)
        self.message = f"The request body is larger than {max_body_size} bytes (LLM_HUB_MAX_BODY_BYTES)."

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["path"] not in OPENAI_ENDPOINTS:
            await self.limited(scope, receive, send)
            return
        refused = False

        async def sending(message: Message) -> None:
            nonlocal refused
            if message["type"] == "http.response.start" and message["status"] == 413:
                refused = True  # nothing behind this limit answers 413 itself: the limit's own answer
                await openai_error(413, self.message, "invalid_request_error")(scope, receive, send)
            elif not refused:
                await send(message)

        await self.limited(scope, receive, sending)
