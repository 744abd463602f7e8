"""A request id for every HTTP request: taken from `X-Request-ID` when sane, else made up.

The id is echoed in the response, kept in `scope["state"]["request_id"]` (so `request.state.request_id`),
bound to every loguru line logged while the request runs (`record["extra"]["request_id"]`), and
readable anywhere below through `current_request_id()`.
"""

from __future__ import annotations

import re
from contextvars import ContextVar
from uuid import uuid4

from loguru import logger
from starlette.datastructures import MutableHeaders
from starlette.types import ASGIApp, Message, Receive, Scope, Send

HEADER = "X-Request-ID"
# A client's id ends up in our logs and headers: keep it short and free of anything that could
# forge a log line or a header.
_SANE = re.compile(rb"[A-Za-z0-9._:-]{1,128}")

_current: ContextVar[str | None] = ContextVar("request_id", default=None)


def current_request_id() -> str | None:
    """The id of the request being handled in this context, or None outside one."""
    return _current.get()


class RequestIdMiddleware:
    """Gives each HTTP request an id, echoes it in `X-Request-ID` and binds it to the logs."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return

        request_id = self.client_id(scope) or uuid4().hex
        scope.setdefault("state", {})["request_id"] = request_id

        async def send_with_id(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                MutableHeaders(scope=message)[HEADER] = request_id
            await send(message)

        token = _current.set(request_id)
        try:
            with logger.contextualize(request_id=request_id):
                await self.app(scope, receive, send_with_id)
        finally:
            _current.reset(token)

    def client_id(self, scope: Scope) -> str | None:
        """The client's `X-Request-ID` if it is 1-128 characters of `[A-Za-z0-9._:-]`."""
        for name, value in scope["headers"]:
            if name == b"x-request-id":
                return value.decode("ascii") if _SANE.fullmatch(value) else None
        return None
