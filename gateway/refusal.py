"""How the gateway's edge says no (401, 429, 503) so that every kind of client can read why."""

from __future__ import annotations

from starlette.responses import JSONResponse
from starlette.types import Scope

# JSON-RPC codes from the implementation-defined server-error range.
UNAUTHORIZED = -32001
RATE_LIMITED = -32029
UNAVAILABLE = -32003


def refusal(scope: Scope, status: int, code: int, message: str, headers: dict[str, str]) -> JSONResponse:
    """`{"error": message}`, or on /mcp a JSON-RPC error: MCP clients show its message, and for any
    other body only "Server returned an error response"."""
    if scope["path"].rstrip("/") == "/mcp":
        body: dict[str, object] = {"jsonrpc": "2.0", "id": None, "error": {"code": code, "message": message}}
    else:
        body = {"error": message}
    return JSONResponse(body, status_code=status, headers=headers)
