"""The OpenAI API on the gateway: `GET /v1/models`, and chat, completions and embeddings relayed to a
bridge that has the model (the bridge relays them to its LM Studio, `mcp_server/openai_relay.py`).

A call is routed like a tool call of its model (loaded first, fewest calls per slot) and retried
once on another bridge when its bridge proves down before anything reached the caller. The answer's
bytes go on as the bridge sends them: a streamed one event by event, a whole one in one piece (read
to its end first, so a bridge that dies while sending it can still be retried). The only change is
the usage chunk: streamed calls always ask LM Studio for usage (`stream_options.include_usage`),
so the key can be charged, and the chunk reaches only callers that asked for it. Usage is read from
the last chunk or the end of the body, without decoding the rest.

Errors are OpenAI's envelope (`{"error": {"message", "type", "param", "code"}}`), so OpenAI clients
raise them as their own exceptions.
"""

from __future__ import annotations

import json
import re
import time
from dataclasses import dataclass
from typing import Any

import anyio
import httpx2
from loguru import logger
from starlette.requests import Request
from starlette.responses import JSONResponse, Response
from starlette.routing import BaseRoute, Route
from starlette.types import Receive, Scope, Send

from gateway.auth import key_name_of
from gateway.metrics import ToolOutcome
from gateway.pool import Bridge
from gateway.request_id import HEADER as REQUEST_ID_HEADER
from gateway.request_id import current_request_id
from gateway.router import Unavailable
from gateway.server import ToolCaller
from gateway.settings import GatewaySettings
from gateway.upstream import CallFailed, GatewayBusy
from gateway.usage import Forbidden, OverBudget
from mcp_server.body import buffer_body
from mcp_server.jsonsafe import unsendable
from mcp_server.openai_relay import SOURCE_HEADER as RELAY_SOURCE_HEADER
from mcp_server.openai_relay import openai_error, sse_error, until_caller_leaves

# The field each endpoint cannot do without, and the JSON types it may have.
_REQUIRED: dict[str, tuple[str, tuple[type, ...], str]] = {
    "/v1/chat/completions": ("messages", (list,), 'a list of messages, e.g. [{"role": "user", "content": "Hi"}]'),
    "/v1/completions": ("prompt", (str, list), "a string (or a list of them)"),
    "/v1/embeddings": ("input", (str, list), "a string or a list of strings"),
}
ENDPOINTS = tuple(_REQUIRED)
_EVENT_END = re.compile(rb"\r\n\r\n|\n\n|\r\r")
_SSE_HEADERS = [(b"cache-control", b"no-cache, no-transform"), (b"x-accel-buffering", b"no")]


class BadRequest(Exception):
    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass
class _Call:
    """One call's state, as far as its caller and its key's account care."""

    model: str
    wants_usage: bool
    started_answer: bool = False
    status: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def take_usage(self, usage: Any) -> None:
        if isinstance(usage, dict):
            self.prompt_tokens = _tokens(usage.get("prompt_tokens"))
            self.completion_tokens = _tokens(usage.get("completion_tokens"))


class OpenAIApi:
    def __init__(self, caller: ToolCaller) -> None:
        self.caller = caller  # the tool-call path's parts: OpenAI calls share its routing, limits and usage
        self.pool, self.router, self.accounting, self.settings = caller.pool, caller.router, caller.accounting, caller.settings
        self.started = int(time.time())

    def routes(self) -> list[BaseRoute]:
        return [
            Route("/v1/models", self.models, methods=["GET"]),
            *(Route(p, self, methods=["POST"]) for p in ENDPOINTS),
        ]

    async def models(self, request: Request) -> Response:
        """OpenAI's model list (what the key may use); `llm_hub` says where each model is loaded."""
        key_name = key_name_of(request.scope)
        listed: dict[str, dict[str, Any]] = {}
        for bridge in self.pool.bridges:
            if not bridge.in_grace():
                continue
            for load in bridge.models.values():
                if not self.accounting.may_use(key_name, load.model):
                    continue
                entry = listed.get(load.model)
                if entry is None:
                    entry = listed[load.model] = {
                        "id": load.model,
                        "object": "model",
                        "created": self.started,
                        "owned_by": _owner(load.model),
                        "llm_hub": {"type": _kind(load.tools), "loaded_on": [], "bridges": [], "available": False},
                    }
                facts = entry["llm_hub"]
                facts["bridges"].append(bridge.name)
                if bridge.healthy:
                    facts["available"] = True
                    if load.loaded:
                        facts["loaded_on"].append(bridge.name)
        return JSONResponse({"object": "list", "data": list(listed.values())})

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path: str = scope["path"]
        # The body-size middleware in front has capped the body already.
        raw, _, _ = await buffer_body(receive, self.settings.max_body_bytes)
        try:
            body = _request_body(raw, path)
        except BadRequest as exc:
            await _send(send, openai_error(400, str(exc), "invalid_request_error", param=exc.param))
            return
        model: str = body["model"]
        key_name = key_name_of(scope)
        tool = await self._tool(key_name, model)
        if isinstance(tool, Response):
            await _send(send, tool)
            return
        call = _Call(model, wants_usage=_asks_for_usage(body))
        if body.get("stream") is True and not call.wants_usage:
            body["stream_options"] = {**(body.get("stream_options") or {}), "include_usage": True}
            raw = json.dumps(body).encode()
        started = time.monotonic()
        outcome: ToolOutcome = "error"
        bridge_name = "none"

        async def work(sending: Send) -> None:
            nonlocal outcome

            async def run(bridge: Bridge) -> None:
                nonlocal bridge_name
                bridge_name = bridge.name
                await self._relay(bridge, path, raw, call, sending)

            try:
                with anyio.fail_after(self.settings.call_timeout):
                    await self.router.attempt(tool, None, run)
                outcome = "ok" if call.status < 400 else "error"
            except Unavailable as exc:
                outcome = "rejected"
                await _send(sending, _unavailable(f"Model '{model}' cannot be served now. {exc}", exc.retry_after))
            except GatewayBusy as exc:
                outcome = "rejected"
                await _send(sending, _unavailable(str(exc), 1))
            except CallFailed as exc:
                await self._fail(sending, call, str(exc))
            except TimeoutError:
                await self._fail(sending, call, _too_long(self.settings), status=504)

        try:
            if await until_caller_leaves(receive, send, work):
                outcome = "cancelled"
        finally:
            self.caller.observe(tool, bridge_name, outcome, started)
            if bridge_name != "none":  # usage is what a bridge served; a call none could take used nothing
                await self.accounting.charge(key_name, model, call.prompt_tokens, call.completion_tokens)

    async def _tool(self, key_name: str | None, model: str) -> str | Response:
        """The tool to route the call as, or the refusal when this key cannot call this model now."""
        try:
            await self.accounting.admit(key_name, model)
        except Forbidden as exc:
            return openai_error(403, str(exc), "permission_denied", param="model", code="model_not_allowed")
        except OverBudget as exc:
            over = exc.status == 429
            return openai_error(
                exc.status,
                str(exc),
                "rate_limit_error" if over else "server_error",
                code="token_budget_exceeded" if over else None,
                headers={"Retry-After": str(exc.retry_after)},
            )
        tool = self.router.tool_for(model)
        if tool is None:
            return openai_error(
                404,
                f"The model '{model}' does not exist on any bridge; GET /v1/models lists the models there are.",
                "invalid_request_error",
                param="model",
                code="model_not_found",
            )
        return tool

    async def _relay(self, bridge: Bridge, path: str, raw: bytes, call: _Call, send: Send) -> None:
        """One bridge's answer to the caller. Raises `BridgeDown` only while nothing was sent."""
        headers = {"content-type": "application/json"}
        if request_id := current_request_id():
            headers[REQUEST_ID_HEADER] = request_id
        async with bridge.client.relay(path, raw, headers, self.settings.call_timeout) as response:
            if response.status_code == 401:  # relayed as is, the caller would think its own key was wrong
                await response.aread()
                call.status = 502
                await _send(send, openai_error(502, _token_refused(bridge, response), "server_error"))
                return
            call.status = response.status_code
            content_type = response.headers.get("content-type", "application/json")
            if not content_type.startswith("text/event-stream"):
                answer = await response.aread()  # before anything is sent: a bridge dying here is retried
                call.take_usage(_usage_at_end(answer))
                await send(
                    {
                        "type": "http.response.start",
                        "status": response.status_code,
                        "headers": [
                            (b"content-type", content_type.encode("latin-1")),
                            (b"content-length", str(len(answer)).encode()),
                        ],
                    }
                )
                await send({"type": "http.response.body", "body": answer})
                return
            chunks = response.aiter_raw()
            first = await anext(chunks, b"")
            await send(
                {
                    "type": "http.response.start",
                    "status": response.status_code,
                    "headers": [(b"content-type", content_type.encode("latin-1")), *_SSE_HEADERS],
                }
            )
            call.started_answer = True
            try:
                await self._stream(first, chunks, call, send)
            except httpx2.HTTPError as exc:
                if isinstance(exc, httpx2.TransportError) and not isinstance(exc, httpx2.TimeoutException):
                    await bridge.eject(f"bridge {bridge.name} closed the connection mid-answer")
                await self._fail(send, call, f"The answer from bridge {bridge.name} was cut off; ask again.")

    async def _stream(self, first: bytes, chunks: Any, call: _Call, send: Send) -> None:
        """SSE events on as they complete, the usage chunk kept back from callers that did not ask for it."""
        pending = b""
        chunk = first
        while True:
            events = pending + chunk
            ends = [match.end() for match in _EVENT_END.finditer(events)]
            cut = ends[-1] if ends else 0
            ready, pending = events[:cut], events[cut:]
            if b'"usage"' in ready:
                ready = self._usage_events(ready, ends, call)
            if ready:
                await send({"type": "http.response.body", "body": ready, "more_body": True})
            chunk = await anext(chunks, None)
            if chunk is None:
                break
        await send({"type": "http.response.body", "body": pending, "more_body": False})

    def _usage_events(self, ready: bytes, ends: list[int], call: _Call) -> bytes:
        """`ready` without the usage-only chunk (unless the caller asked for it), usage taken from it."""
        kept = []
        start = 0
        for end in ends:
            event = ready[start:end]
            start = end
            if b'"usage"' in event:
                chunk = _event_json(event)
                if isinstance(chunk, dict) and isinstance(chunk.get("usage"), dict):
                    call.take_usage(chunk["usage"])
                    if chunk.get("choices") == [] and not call.wants_usage:
                        continue
            kept.append(event)
        return b"".join(kept)

    async def _fail(self, send: Send, call: _Call, message: str, status: int = 502) -> None:
        """A failure after routing: `status` while nothing was sent, else a last SSE error event."""
        logger.warning("OpenAI call to {} failed: {}", call.model, message)
        if not call.started_answer:
            call.status = status
            await _send(send, openai_error(status, message, "server_error"))
            return
        await send({"type": "http.response.body", "body": sse_error(message), "more_body": False})


def _request_body(raw: bytes, path: str) -> dict[str, Any]:
    try:
        body = json.loads(raw)
    except RecursionError:
        raise BadRequest("The body is nested too deeply to be read.") from None
    except ValueError:
        body = None
    field, types, shape = _REQUIRED[path]
    if not isinstance(body, dict):
        raise BadRequest(f'The body must be a JSON object with "model" and "{field}".')
    model = body.get("model")
    if not isinstance(model, str) or not model:
        raise BadRequest("'model' is required: a model id, as GET /v1/models lists them.", "model")
    if not isinstance(body.get(field), types) or not body[field]:
        raise BadRequest(f"'{field}' is required: {shape}.", field)
    if "stream" in body and not isinstance(body["stream"], bool):
        raise BadRequest("'stream' must be true or false.", "stream")
    if body.get("stream_options") is not None and not isinstance(body["stream_options"], dict):
        raise BadRequest("'stream_options' must be an object, e.g. {\"include_usage\": true}.", "stream_options")
    if problem := unsendable(body, "body"):
        raise BadRequest(f"The request cannot be sent on: {problem}.")
    return body


def _asks_for_usage(body: dict[str, Any]) -> bool:
    options = body.get("stream_options")
    return isinstance(options, dict) and options.get("include_usage") is True


def _usage_at_end(answer: bytes) -> Any:
    """The `usage` object of a whole answer, read from where it starts: LM Studio puts it last, and an
    embeddings answer is mostly vectors that need no decoding."""
    at = answer.rfind(b'"usage"')
    if at < 0:
        return None
    text = answer[at + len(b'"usage"') :].decode("utf-8", "replace").lstrip()
    if not text.startswith(":"):
        return None
    try:
        usage, _ = json.JSONDecoder().raw_decode(text[1:].lstrip())
    except (ValueError, RecursionError):
        return None
    return usage


def _event_json(event: bytes) -> Any:
    data = b"".join(line[5:].strip() for line in event.splitlines() if line.startswith(b"data:"))
    try:
        return json.loads(data)
    except (ValueError, RecursionError):
        return None


def _tokens(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _owner(model: str) -> str:
    return model.split("/", 1)[0] if "/" in model else "llm-hub"


def _kind(tools: list[str]) -> str:
    return "embedding" if any(tool.startswith("embed_") for tool in tools) else "llm"


def _unavailable(message: str, retry_after: int) -> JSONResponse:
    return openai_error(
        503, message, "server_error", code="model_unavailable", headers={"Retry-After": str(retry_after)}
    )


def _too_long(settings: GatewaySettings) -> str:
    return f"The call took longer than {settings.call_timeout:g} s (LLM_HUB_CALL_TIMEOUT)."


def _token_refused(bridge: Bridge, response: httpx2.Response) -> str:
    if response.headers.get(RELAY_SOURCE_HEADER) == "lmstudio":
        return (
            f"LM Studio behind bridge {bridge.name} requires an API token: set LMSTUDIO_API_TOKEN for that "
            "bridge to a token from LM Studio's server settings."
        )
    return f"Bridge {bridge.name} refused the gateway's token (LLM_HUB_BRIDGE_TOKEN must match the bridge's)."


async def _send(send: Send, response: Response) -> None:
    async def nothing() -> dict[str, Any]:
        return {"type": "http.disconnect"}

    await response({"type": "http"}, nothing, send)
