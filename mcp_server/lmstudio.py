"""LM Studio's HTTP API as the bridge needs it: list models, chat, complete, embed.

One pooled `httpx2.AsyncClient` per bridge. Every failure leaves this module as an
`LMStudioError` subclass whose message tells a person what to do.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from typing import Any, Literal, Self

import httpx2
from loguru import logger

from mcp_server.errors import (
    AuthRequired,
    BadUpstreamResponse,
    LMStudioError,
    ModelNotFound,
    Unreachable,
    UpstreamError,
    UpstreamTimeout,
)
from mcp_server.httpclient import async_transport
from mcp_server.jsonsafe import sendable_text, unsendable

ApiFlavour = Literal["lmstudio-v1", "lmstudio-v0", "openai"]
ModelKind = Literal["llm", "embedding"]

# Richest surface first: LM Studio 0.4+, then 0.3.6+, then any OpenAI-compatible server.
_LISTING_PATHS: tuple[tuple[ApiFlavour, str], ...] = (
    ("lmstudio-v1", "/api/v1/models"),
    ("lmstudio-v0", "/api/v0/models"),
    ("openai", "/v1/models"),
)


@dataclass(frozen=True)
class ModelInfo:
    """What we know of one model; fields the serving API does not report stay None."""

    id: str
    kind: ModelKind = "llm"
    display_name: str | None = None
    loaded: bool | None = None
    context_length: int | None = None
    quantization: str | None = None
    architecture: str | None = None
    publisher: str | None = None
    capabilities: tuple[str, ...] = field(default_factory=tuple)
    slots: int | None = None
    """Predictions the loaded instances run at once (only LM Studio's v1 listing reports it)."""

    def as_dict(self) -> dict[str, Any]:
        return {
            "id": self.id,
            "type": self.kind,
            "display_name": self.display_name,
            "loaded": self.loaded,
            "context_length": self.context_length,
            "quantization": self.quantization,
            "architecture": self.architecture,
            "publisher": self.publisher,
            "capabilities": list(self.capabilities),
        }


# LM Studio runs 4 predictions at once per loaded instance unless told otherwise ("Max Concurrent
# Predictions"); versions before `config.parallel` was reported use that default too.
_DEFAULT_PARALLEL = 4


# Python's JSON parser recurses, so an answer nested about a thousand levels deep raises
# RecursionError, whose text ("maximum recursion depth exceeded...") must not reach a caller.
_TOO_DEEP = "%s is nested too deeply to be read"


class Unreadable(Exception):
    """Part of LM Studio's answer is not in the documented shape; the message says which part.

    Raised by the parsers; their callers turn it into `unreadable_answer(...)`, naming the endpoint.
    """


def unreadable_answer(where: str, exc: Unreadable) -> BadUpstreamResponse:
    return BadUpstreamResponse(
        f"LM Studio's answer from {where} could not be read: {exc}. Check that LMSTUDIO_URL points at "
        "LM Studio or another OpenAI-compatible server; its log may say more."
    )


# Listings are parsed field by field: optional metadata of the wrong type counts as absent (it
# only decorates a tool's description), while a listing whose models or ids cannot be read is
# refused, so the registry keeps its last good tools rather than offering garbage.


def _entries(payload: Any, key: str) -> list[dict[str, Any]]:
    entries = payload.get(key) if isinstance(payload, dict) else None
    if not isinstance(entries, list):
        raise Unreadable(f"`{key}` is missing or not a list")
    if not all(isinstance(entry, dict) for entry in entries):
        raise Unreadable(f"`{key}` holds an entry that is not an object")
    return entries


def _model_id(raw: dict[str, Any], key: str) -> str:
    value = raw.get(key)
    if not isinstance(value, str) or not value or unsendable(value) is not None:
        raise Unreadable(f"a model's `{key}` is not a usable name")
    return value


def _text(value: Any) -> str | None:
    return value if isinstance(value, str) and value and unsendable(value) is None else None


def _count(value: Any) -> int | None:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else None


def _instance_configs(raw: dict[str, Any]) -> list[dict[str, Any]]:
    """The `config` of each loaded instance ({} where it has none): as many as are loaded."""
    instances = raw.get("loaded_instances")
    if not isinstance(instances, list):
        return []
    configs = [instance.get("config") for instance in instances if isinstance(instance, dict)]
    return [config if isinstance(config, dict) else {} for config in configs]


def _parse_v1(payload: Any) -> list[ModelInfo]:
    models = []
    for raw in _entries(payload, "models"):
        configs = _instance_configs(raw)
        loaded_ctx = next((ctx for c in configs if (ctx := _count(c.get("context_length")))), None)
        caps = raw.get("capabilities")
        caps = caps if isinstance(caps, dict) else {}
        capabilities = tuple(
            name
            for name, present in (
                ("vision", caps.get("vision")),
                ("tool_use", caps.get("trained_for_tool_use")),
                ("reasoning", caps.get("reasoning")),
            )
            if present
        )
        quant = raw.get("quantization")
        models.append(
            ModelInfo(
                id=_model_id(raw, "key"),
                kind="embedding" if raw.get("type") == "embedding" else "llm",
                display_name=_text(raw.get("display_name")),
                loaded=bool(configs),
                context_length=loaded_ctx or _count(raw.get("max_context_length")),
                quantization=_text(quant.get("name") if isinstance(quant, dict) else quant),
                architecture=_text(raw.get("architecture")),
                publisher=_text(raw.get("publisher")),
                capabilities=capabilities,
                slots=sum(_count(c.get("parallel")) or _DEFAULT_PARALLEL for c in configs) or None,
            )
        )
    return models


def _parse_v0(payload: Any) -> list[ModelInfo]:
    models = []
    for raw in _entries(payload, "data"):
        kind = raw.get("type")
        listed = raw.get("capabilities")
        capabilities = tuple(c for c in listed if _text(c)) if isinstance(listed, list) else ()
        if kind == "vlm" and "vision" not in capabilities:
            capabilities = ("vision", *capabilities)
        models.append(
            ModelInfo(
                id=_model_id(raw, "id"),
                kind="embedding" if kind in ("embeddings", "embedding") else "llm",
                loaded=raw.get("state") == "loaded",
                context_length=_count(raw.get("max_context_length")),
                quantization=_text(raw.get("quantization")),
                architecture=_text(raw.get("arch")),
                publisher=_text(raw.get("publisher")),
                capabilities=capabilities,
            )
        )
    return models


def _parse_openai(payload: Any) -> list[ModelInfo]:
    # The OpenAI listing has no type: embedding models are recognised by name, as LM Studio's own ids
    # (text-embedding-nomic-embed-text-v1.5, ...) and llama.cpp aliases conventionally carry "embed".
    models = []
    for raw in _entries(payload, "data"):
        model_id = _model_id(raw, "id")
        models.append(
            ModelInfo(
                id=model_id,
                kind="embedding" if "embed" in model_id.lower() else "llm",
                publisher=_text(raw.get("owned_by")),
            )
        )
    return models


_PARSERS = {"lmstudio-v1": _parse_v1, "lmstudio-v0": _parse_v0, "openai": _parse_openai}


def parse_listing(flavour: ApiFlavour, payload: Any) -> list[ModelInfo]:
    """The models in one listing surface's answer; raises `Unreadable` if they cannot be read."""
    return _PARSERS[flavour](payload)

KEEPALIVE_EXPIRY = 3.0
"""Seconds an idle connection to LM Studio is kept for reuse. LM Studio (like uvicorn and most
servers) closes idle connections after about 5 s; dropping ours first means a request is rarely
sent on a connection the server is closing at that very moment."""

# Failures that happen before any answer arrives, most often a kept-alive connection the server
# closed just as it was reused; timeouts are not among them (LM Studio may be busy, not gone).
_RETRY_ONCE = (httpx2.ConnectError, httpx2.WriteError, httpx2.ReadError, httpx2.RemoteProtocolError)


class LMStudioClient:
    """Async client for one LM Studio server. Use as an async context manager."""

    def __init__(
        self, base_url: str, *, token: str | None = None, timeout: float = 300.0,
        keepalive_expiry: float = KEEPALIVE_EXPIRY, connections: int = 64,
    ) -> None:
        self.base_url = base_url.rstrip("/")
        self.timeout = timeout
        headers = {"Authorization": f"Bearer {token}"} if token else {}
        # A call waiting for a free connection waits within its own deadline (and sends heartbeats meanwhile).
        # Every connection may stay for reuse: with a quarter kept, 32 calls in flight had each burst of answers
        # close the surplus and the next calls connect again (a few percent of the bridge's CPU, and LM Studio's),
        # while an idle one closes after `keepalive_expiry` anyway.
        limits = httpx2.Limits(
            max_connections=connections, max_keepalive_connections=connections, keepalive_expiry=keepalive_expiry
        )
        self._http = httpx2.AsyncClient(
            base_url=self.base_url,
            headers=headers,
            timeout=httpx2.Timeout(timeout, connect=min(5.0, timeout)),
            limits=limits,  # for a proxy from the environment, which gets a stock transport
            transport=async_transport(limits),
        )
        self.flavour: ApiFlavour | None = None
        self._urls: dict[str, httpx2.URL] = {}

    async def __aenter__(self) -> Self:
        return self

    async def __aexit__(self, *exc_info: object) -> None:
        await self._http.aclose()

    # -- listing -------------------------------------------------------------------------

    async def list_models(self) -> list[ModelInfo]:
        """Models from the richest listing surface that answers; remembers which one did."""
        order = list(_LISTING_PATHS)
        if self.flavour is not None:
            order.sort(key=lambda item: item[0] != self.flavour)
        missing: LMStudioError | None = None
        unreadable: BadUpstreamResponse | None = None
        for flavour, path in order:
            try:
                payload = await self._get_json(path)
            except (ModelNotFound, UpstreamError) as exc:
                missing = exc  # this surface does not exist here (404/405...): try the next one
                continue
            if isinstance(payload, dict) and "error" in payload:
                # LM Studio before 0.4 answers endpoints it lacks with 200 and an error body.
                missing = UpstreamError(f"{self.base_url} does not serve {path}.")
                continue
            try:
                models = parse_listing(flavour, payload)
            except Unreadable as exc:
                unreadable = unreadable_answer(f"{self.base_url}{path}", exc)
                continue  # a poorer surface may still be readable
            self.flavour = flavour
            # An id listed twice would make two tools for one model: the first entry counts.
            unique: dict[str, ModelInfo] = {}
            for model in models:
                unique.setdefault(model.id, model)
            return list(unique.values())
        # A garbled answer says more about what is wrong than the surfaces that do not exist.
        raise unreadable or missing  # type: ignore[misc]

    async def _get_json(self, path: str) -> Any:
        response = await self._fetch(self._http.build_request("GET", self._url(path)))
        self._raise_for_status(response)
        return self._json(response, f"{self.base_url}{path}")

    async def _fetch(self, request: httpx2.Request) -> httpx2.Response:
        """A whole answer; a failure while its body arrives is not retried (see `_send`)."""
        with self.mapped_errors():
            response = await self._send(request)
        with self.mapped_errors(mid_stream=True):
            try:
                await response.aread()
            finally:
                await response.aclose()
        return response

    def _url(self, path: str) -> httpx2.URL:
        """`path` under the base URL, joined once per path (a handful of endpoints): httpx2 parses and
        joins a relative one on every request, a twentieth of the bridge's CPU per relayed call."""
        url = self._urls.get(path)
        if url is None:
            url = self._urls[path] = self._http.base_url.join(path.lstrip("/"))
        return url

    async def _send(self, request: httpx2.Request) -> httpx2.Response:
        """Send `request` and wait for the answer's status and headers, not its body.

        Sent once more if it failed before any answer arrived (see `_RETRY_ONCE`): nothing of the
        answer reached anyone, so sending again cannot repeat text a caller has, and httpx2 has
        dropped the failed connection, so the retry goes out on another one.
        """
        try:
            return await self._http.send(request, stream=True)
        except _RETRY_ONCE as exc:
            logger.debug("LM Studio request {} failed before answering ({}); retrying once", request.url.path,
                         type(exc).__name__)
            return await self._http.send(request, stream=True)

    # -- inference -----------------------------------------------------------------------

    async def post_json(self, path: str, body: dict[str, Any]) -> dict[str, Any]:
        """A non-streamed inference request (`/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`)."""
        response = await self._fetch(self._http.build_request("POST", self._url(path), json=body))
        self._raise_for_status(response)
        payload = self._json(response)
        if not isinstance(payload, dict):
            raise unreadable_answer(path, Unreadable("it is not a JSON object"))
        return payload

    @asynccontextmanager
    async def stream(self, path: str, body: dict[str, Any]) -> AsyncIterator[AsyncIterator[dict[str, Any]]]:
        """A streamed inference request: yields the parsed SSE chunks.

        Leaving the context (normally, on error or on cancellation) closes the HTTP response,
        which is how LM Studio learns to stop generating.
        """
        request = self._http.build_request("POST", self._url(path), json={**body, "stream": True})
        with self.mapped_errors():
            response = await self._send(request)
            try:
                if response.status_code >= 400:
                    await response.aread()
                    self._raise_for_status(response)
                yield self._chunks(response)
            finally:
                await response.aclose()

    @asynccontextmanager
    async def relay(self, method: str, path: str, body: bytes, headers: dict[str, str]) -> AsyncIterator[httpx2.Response]:
        """A request passed on as bytes (`openai_relay.py`): the answer, whatever its status, open
        inside the context; leaving it closes the request, which stops LM Studio generating."""
        request = self._http.build_request(method, self._url(path), content=body or None, headers=headers)
        with self.mapped_errors():
            response = await self._send(request)
        try:
            yield response
        finally:
            await response.aclose()

    async def _chunks(self, response: httpx2.Response) -> AsyncIterator[dict[str, Any]]:
        done = False
        with self.mapped_errors(mid_stream=True):
            async for line in response.aiter_lines():
                # After [DONE] the rest is read, not parsed: a response left unread cannot go back
                # to the pool, and a new connection per call costs more than the call itself.
                if done or not line.startswith("data:"):
                    continue  # blank separators, comments and event names carry nothing we need
                data = line[5:].strip()
                if data == "[DONE]":
                    done = True
                    continue
                try:
                    chunk = json.loads(data)
                except ValueError:
                    raise unreadable_answer(response.request.url.path, Unreadable("a streamed chunk is not valid JSON")) from None
                except RecursionError:
                    raise unreadable_answer(response.request.url.path, Unreadable(_TOO_DEEP % "a streamed chunk")) from None
                if isinstance(chunk, dict) and "error" in chunk:
                    raise _error_from_envelope(chunk, response.status_code, self.base_url)
                yield chunk

    # -- error mapping -------------------------------------------------------------------

    def mapped_errors(self, *, mid_stream: bool = False) -> _ErrorMapper:
        """A context that turns httpx2's errors into the `LMStudioError` family (also for `relay`'s callers)."""
        return _ErrorMapper(self.base_url, self.timeout, mid_stream)

    def _raise_for_status(self, response: httpx2.Response) -> None:
        if response.status_code < 400:
            return
        try:
            payload = response.json()
        except (ValueError, RecursionError):  # not JSON, or nested too deeply: classified by status alone
            payload = None
        raise _error_from_envelope(payload, response.status_code, self.base_url)

    def _json(self, response: httpx2.Response, where: str | None = None) -> Any:
        """The answer's JSON; `where` names the endpoint in an error (its path unless given)."""
        try:
            return response.json()
        except ValueError:
            raise BadUpstreamResponse(
                f"LM Studio at {self.base_url} answered {response.request.url.path} with something that is not JSON."
            ) from None
        except RecursionError:
            raise unreadable_answer(where or response.request.url.path, Unreadable(_TOO_DEEP % "it")) from None


class _ErrorMapper:
    """Turns httpx2 transport errors into the bridge's error family (a context manager)."""

    def __init__(self, base_url: str, timeout: float, mid_stream: bool) -> None:
        self.base_url = base_url
        self.timeout = timeout
        self.mid_stream = mid_stream

    def __enter__(self) -> None:
        return None

    def __exit__(self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: object) -> bool:
        if exc is None or isinstance(exc, LMStudioError):
            return False
        if isinstance(exc, httpx2.ConnectError | httpx2.ConnectTimeout):
            raise Unreachable(
                f"LM Studio is not reachable at {self.base_url}. Start its server (LM Studio > Developer > "
                "Start Server, or `lms server start`) or set LMSTUDIO_URL to where it listens."
            ) from exc
        if isinstance(exc, httpx2.TimeoutException):
            raise UpstreamTimeout(
                f"LM Studio at {self.base_url} did not answer within {self.timeout:g} s. The model may still be "
                "loading or the prompt is long: try again, or raise LLM_HUB_REQUEST_TIMEOUT."
            ) from exc
        if isinstance(exc, httpx2.TransportError):
            where = "in the middle of the answer" if self.mid_stream else "before answering"
            raise BadUpstreamResponse(
                f"LM Studio at {self.base_url} closed the connection {where} ({type(exc).__name__}). "
                "The model may have crashed or been unloaded; check LM Studio's server log."
            ) from exc
        return False


def _scalar_text(value: Any) -> str:
    """A string or number as text; anything else (a list, an object, however deep) says nothing."""
    return str(value) if value and isinstance(value, str | int | float) else ""


def _error_from_envelope(payload: Any, status: int, base_url: str) -> LMStudioError:
    """Classify an error answer by LM Studio's envelope (code and message), not only the status."""
    error = payload.get("error") if isinstance(payload, dict) else None
    if isinstance(error, dict):
        message = _scalar_text(error.get("message"))
        code = _scalar_text(error.get("code"))
    else:
        message, code = _scalar_text(error), ""
    message = sendable_text(message)  # it reaches the caller
    lowered = message.lower()
    if status in (401, 403) or code == "invalid_api_key":
        return AuthRequired(
            f"LM Studio at {base_url} requires an API token"
            + (" and rejected the one sent" if status == 403 else "")
            + ". Set LMSTUDIO_API_TOKEN (or LM_API_TOKEN) to a token from LM Studio's server settings."
        )
    if "no models loaded" in lowered:
        return ModelNotFound(f"LM Studio has no model loaded: {message} Load one in LM Studio or with `lms load`.")
    if code == "model_not_found" or (status == 404 and "model" in lowered):
        return ModelNotFound(f"LM Studio does not have this model: {message or 'model not found'}")
    if status in (404, 405):
        return UpstreamError(f"{base_url} does not serve this endpoint (HTTP {status}).")
    detail = message or f"HTTP {status}"
    return UpstreamError(f"LM Studio at {base_url} answered with an error: {detail}")
